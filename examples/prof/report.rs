//! `prof report`: peaks per tier, NUMA node and device with the moment of each and what
//! was live then, leaks at exit, fragmentation over time, tier traffic against the
//! optimum for the sequence seen, prefetch outcomes. Two streaming passes over the
//! record(s): the first finds the peaks, the second stops at each to list what was live.

use std::collections::{BTreeMap, BTreeSet};

use hetmem::record::{acquire, tier_flags};
use rustc_hash::FxHashMap;
use serde_json::{json, Value};

use crate::input::{bytes, secs, Ev, Live, Stream, Tier, NO_SITE};
use crate::series::Series;

#[derive(Default, Clone, Copy)]
struct Peak {
    bytes: u64,
    t: u64,
    /// Events read when it was reached.
    at: u64,
}

#[derive(Default)]
struct Store {
    names: FxHashMap<u64, (String, u64)>,
    loads: u64,
    loaded: u64,
    staged: u64,
    unplanned: u64,
    evictions: u64,
    writebacks: u64,
    written: u64,
    hits: u64,
    late: u64,
    misses: u64,
    prefetches: u64,
    on_time: u64,
    late_prefetch: u64,
    wasted: u64,
    /// Parameters loaded ahead and not used yet.
    pending: FxHashMap<u64, ()>,
    sequence: Vec<u64>,
    budget: Option<u64>,
    copy_ns: u64,
    acquired: u64,
}

pub fn run(paths: &[String], json_out: bool, top: usize) -> Result<(), String> {
    let mut s = Stream::open(paths)?;
    let mut live = Live::default();
    let mut peaks: BTreeMap<Tier, Peak> = BTreeMap::new();
    let mut reserved_peak: BTreeMap<u32, Peak> = BTreeMap::new();
    let mut frag: BTreeMap<u32, (Series, Series)> = BTreeMap::new();
    let mut budgets: BTreeMap<Tier, u64> = BTreeMap::new();
    let mut last_budget: Option<(Tier, u64)> = None;
    let mut ooms: Vec<Value> = Vec::new();
    let mut n_ooms = 0u64;
    let mut st = Store::default();
    let (mut dropped, mut complete, mut end_t) = (0u64, false, 0u64);
    let mut n = 0u64;
    while let Some(it) = s.next()? {
        n += 1;
        end_t = end_t.max(it.t);
        if let Some(tier) = live.apply(&it) {
            let v = live.total(tier);
            let p = peaks.entry(tier).or_default();
            if v > p.bytes {
                *p = Peak {
                    bytes: v,
                    t: it.t,
                    at: n,
                };
            }
            if let Tier::Device(d) = tier {
                let r = live.reserved.get(&d).copied().unwrap_or(0);
                let p = reserved_peak.entry(d).or_default();
                if r > p.bytes {
                    *p = Peak {
                        bytes: r,
                        t: it.t,
                        at: n,
                    };
                }
                let f = frag
                    .entry(d)
                    .or_insert_with(|| (Series::new(), Series::new()));
                f.0.push(it.t, live.total(tier) as f64);
                f.1.push(it.t, r as f64);
            }
        }
        match it.ev {
            Ev::Budget { tier, bytes } => {
                // The tier store says its device budget, then its pinned one.
                if let (Tier::Pinned, Some((Tier::Device(_), b))) = (tier, last_budget) {
                    st.budget = Some(b);
                }
                budgets.insert(tier, bytes);
                last_budget = Some((tier, bytes));
            }
            Ev::Oom {
                tier,
                requested,
                free,
                reserved,
                largest,
            } => {
                n_ooms += 1;
                if ooms.len() < 10 {
                    ooms.push(json!({"t_s": it.t as f64 / 1e9, "tier": tier.name(),
                        "requested": requested, "free": free, "reserved": reserved,
                        "largest_free_block": largest}));
                }
            }
            Ev::Param { id, size, name } => {
                st.names.insert(id, (name, size));
            }
            Ev::Load {
                id,
                bytes,
                flags,
                start,
                end,
                ..
            } => {
                st.loads += 1;
                st.loaded += bytes;
                if flags & tier_flags::STAGED != 0 {
                    st.staged += 1;
                }
                if flags & tier_flags::UNPLANNED != 0 {
                    st.unplanned += 1;
                }
                if flags & tier_flags::PREFETCH != 0 {
                    st.prefetches += 1;
                    st.pending.insert(id, ());
                }
                if let (Some(a), Some(b)) = (start, end) {
                    st.copy_ns += b.saturating_sub(a);
                }
            }
            Ev::Evict { id, .. } => {
                st.evictions += 1;
                if st.pending.remove(&id).is_some() {
                    st.wasted += 1;
                }
            }
            Ev::WriteBack { bytes, .. } => {
                st.writebacks += 1;
                st.written += bytes;
            }
            Ev::Acquire { id, outcome, bytes } => {
                st.sequence.push(id);
                st.acquired += bytes;
                match outcome {
                    acquire::HIT => st.hits += 1,
                    acquire::LATE => st.late += 1,
                    _ => st.misses += 1,
                }
                if st.pending.remove(&id).is_some() {
                    if outcome == acquire::LATE {
                        st.late_prefetch += 1;
                    } else {
                        st.on_time += 1;
                    }
                }
            }
            Ev::Dropped { count } => dropped += count,
            Ev::End => complete = true,
            _ => {}
        }
    }
    let events = n;
    let pids = s.input.pids.clone();
    let start_unix_s = s.input.origin_unix as f64 / 1e9;
    let sites = s.input.sites.clone();
    let truncated = s.input.truncated;
    // Leaks: what is live at the end.
    let leaks = live_summary(&live, None, &sites, top);
    // Second pass: what was live at each peak.
    let mut stops: Vec<(u64, Tier)> = peaks.iter().map(|(t, p)| (p.at, *t)).collect();
    stops.sort();
    let mut at_peak: BTreeMap<Tier, Value> = BTreeMap::new();
    if !stops.is_empty() {
        let mut s = Stream::open(paths)?;
        let mut live = Live::default();
        let mut n = 0u64;
        let mut k = 0;
        while k < stops.len() {
            let Some(it) = s.next()? else { break };
            n += 1;
            live.apply(&it);
            while k < stops.len() && stops[k].0 == n {
                // The site of the peak's own allocation comes with the next event; close
                // enough for the listing.
                at_peak.insert(
                    stops[k].1,
                    live_summary(&live, Some(stops[k].1), &sites, top),
                );
                k += 1;
            }
        }
    }
    let optimum = st.budget.map(|b| min_bytes(&st.sequence, &st.names, b));
    let mut tiers = Vec::new();
    for (tier, p) in &peaks {
        let mut v = json!({"tier": tier.name(), "peak_bytes": p.bytes, "peak_t_s": p.t as f64 / 1e9,
            "live_at_peak": at_peak.get(tier).cloned().unwrap_or(Value::Null),
            "budget": budgets.get(tier)});
        if let Tier::Device(d) = tier {
            let r = reserved_peak.get(d).copied().unwrap_or_default();
            v["reserved_peak_bytes"] = json!(r.bytes);
            v["reserved_peak_t_s"] = json!(r.t as f64 / 1e9);
            if p.bytes > 0 {
                v["reserved_over_allocated_peak"] = json!(r.bytes as f64 / p.bytes as f64);
            }
            if let Some((a, r)) = frag.get(d) {
                let pts: Vec<Value> = a
                    .points()
                    .iter()
                    .zip(r.points())
                    .step_by((a.points().len() / 20).max(1))
                    .map(|(a, r)| {
                        json!({"t_s": a.0 as f64 / 1e9, "allocated": a.2, "reserved": r.2,
                        "ratio": if a.2 > 0.0 { r.2 / a.2 } else { 0.0 }})
                    })
                    .collect();
                v["fragmentation"] = json!(pts);
            }
        }
        tiers.push(v);
    }
    let acquires = st.hits + st.late + st.misses;
    let store = if acquires + st.loads > 0 {
        json!({
            "parameters": st.names.len(),
            "acquires": acquires, "bytes_acquired": st.acquired, "hits": st.hits, "late_hits": st.late, "misses": st.misses,
            "hit_rate": if acquires > 0 { (st.hits + st.late) as f64 / acquires as f64 } else { 0.0 },
            "loads": st.loads, "bytes_loaded": st.loaded, "staged_loads": st.staged,
            "unplanned_loads": st.unplanned,
            "evictions": st.evictions, "writebacks": st.writebacks, "bytes_written_back": st.written,
            "prefetches": st.prefetches, "prefetch_on_time": st.on_time,
            "prefetch_late": st.late_prefetch, "prefetch_wasted": st.wasted,
            "device_budget": st.budget,
            "optimal_bytes": optimum,
            "traffic_over_optimum": optimum.filter(|o| *o > 0).map(|o| st.loaded as f64 / o as f64),
            "copy_busy_s": st.copy_ns as f64 / 1e9,
        })
    } else {
        Value::Null
    };
    let out = json!({
        "files": paths, "pids": pids, "start_unix_s": start_unix_s, "events": events, "duration_s": end_t as f64 / 1e9,
        "complete": complete, "truncated": truncated, "dropped": dropped,
        "tiers": tiers, "leaks": leaks, "out_of_memory": n_ooms, "ooms": ooms,
        "budgets": budgets.iter().map(|(t, b)| (t.name(), json!(b))).collect::<serde_json::Map<_, _>>(),
        "tier_store": store,
    });
    if json_out {
        outln!("{out}");
        return Ok(());
    }
    print_text(&out);
    Ok(())
}

/// Largest blocks and top sites of `tier` (all tiers when `None`).
fn live_summary(live: &Live, tier: Option<Tier>, sites: &[String], top: usize) -> Value {
    let mut blocks: Vec<(&(u32, u64), &crate::input::Block)> = live
        .blocks
        .iter()
        .filter(|(_, b)| tier.is_none_or(|t| b.tier == t))
        .collect();
    let total: u64 = blocks.iter().map(|(_, b)| b.size).sum();
    let count = blocks.len();
    blocks.sort_by_key(|(k, b)| (std::cmp::Reverse(b.size), k.1));
    let largest: Vec<Value> = blocks
        .iter()
        .take(top)
        .map(|(k, b)| {
            json!({"addr": format!("{:#x}", k.1), "size": b.size, "tier": b.tier.name(),
            "since_s": b.t as f64 / 1e9, "stream": b.stream,
            "site": if b.site == NO_SITE { Value::Null } else { json!(sites[b.site as usize]) }})
        })
        .collect();
    let mut by_site: FxHashMap<u32, (u64, u64)> = FxHashMap::default();
    for (_, b) in &blocks {
        let e = by_site.entry(b.site).or_default();
        e.0 += b.size;
        e.1 += 1;
    }
    let mut by_site: Vec<(u32, (u64, u64))> = by_site.into_iter().collect();
    by_site.sort_by_key(|(s, (b, _))| (std::cmp::Reverse(*b), *s));
    let sites_v: Vec<Value> = by_site
        .iter()
        .take(top)
        .map(|(s, (b, n))| {
            json!({"site": if *s == NO_SITE { "(not sampled)".to_owned() } else { sites[*s as usize].clone() },
            "bytes": b, "blocks": n})
        })
        .collect();
    let mut per_tier: BTreeMap<String, u64> = BTreeMap::new();
    for (_, b) in &blocks {
        *per_tier.entry(b.tier.name()).or_default() += b.size;
    }
    json!({"bytes": total, "blocks": count, "per_tier": per_tier, "largest": largest, "top_sites": sites_v})
}

/// Bytes Belady's MIN loads over `seq` with `budget` bytes of device memory less room
/// for the largest parameter (one loads while another computes): the optimum the tier
/// store's plan aims at.
fn min_bytes(seq: &[u64], names: &FxHashMap<u64, (String, u64)>, budget: u64) -> u64 {
    let size = |id: u64| names.get(&id).map_or(0, |(_, s)| *s);
    let largest = seq.iter().map(|&i| size(i)).max().unwrap_or(0);
    let cap = budget.saturating_sub(largest);
    let mut next = vec![u64::MAX; seq.len()];
    let mut seen: FxHashMap<u64, u64> = FxHashMap::default();
    for i in (0..seq.len()).rev() {
        next[i] = seen.get(&seq[i]).copied().unwrap_or(u64::MAX);
        seen.insert(seq[i], i as u64);
    }
    let mut resident: FxHashMap<u64, u64> = FxHashMap::default(); // id -> next use
    let mut order: BTreeSet<(u64, u64)> = BTreeSet::new(); // (next use, id)
    let (mut used, mut loaded) = (0u64, 0u64);
    for (i, &id) in seq.iter().enumerate() {
        let sz = size(id);
        if let Some(nu) = resident.remove(&id) {
            order.remove(&(nu, id));
        } else {
            loaded += sz;
            used += sz;
            while used > cap {
                let Some(&(nu, v)) = order.iter().next_back() else {
                    break;
                };
                order.remove(&(nu, v));
                resident.remove(&v);
                used -= size(v);
            }
        }
        if used > cap {
            // Streamed through the spare room: not kept.
            used -= sz;
            continue;
        }
        resident.insert(id, next[i]);
        order.insert((next[i], id));
    }
    loaded
}

fn print_text(v: &Value) {
    let b = |x: &Value| bytes(x.as_u64().unwrap_or(0));
    outln!(
        "hetmem profile report: {} events over {:.3} s{}{}",
        v["events"],
        v["duration_s"].as_f64().unwrap_or(0.0),
        if v["complete"] == true {
            ""
        } else {
            " (no end event: the process did not finish the record)"
        },
        match v["dropped"].as_u64() {
            Some(0) | None => String::new(),
            Some(d) => format!(", {d} events dropped"),
        }
    );
    outln!("\nPeaks (the moment, and what was live then):");
    for t in v["tiers"].as_array().into_iter().flatten() {
        out!(
            "  {:<14} {:>10} at {}",
            t["tier"].as_str().unwrap_or(""),
            b(&t["peak_bytes"]),
            secs((t["peak_t_s"].as_f64().unwrap_or(0.0) * 1e9) as u64)
        );
        if let Some(bud) = t["budget"].as_u64() {
            out!("  (budget {})", bytes(bud));
        }
        if t["reserved_peak_bytes"].is_u64() {
            out!(
                "; reserved peak {} ({:.4}x the allocated peak)",
                b(&t["reserved_peak_bytes"]),
                t["reserved_over_allocated_peak"].as_f64().unwrap_or(0.0)
            );
        }
        outln!();
        let lp = &t["live_at_peak"];
        for l in lp["largest"].as_array().into_iter().flatten().take(5) {
            outln!(
                "      {:>10} at {} since {:.6} s{}",
                b(&l["size"]),
                l["addr"].as_str().unwrap_or(""),
                l["since_s"].as_f64().unwrap_or(0.0),
                l["site"]
                    .as_str()
                    .map(|s| format!("  [{}]", s.lines().next().unwrap_or("")))
                    .unwrap_or_default()
            );
        }
        for s in lp["top_sites"].as_array().into_iter().flatten().take(3) {
            outln!(
                "      site {:>10} in {} blocks: {}",
                b(&s["bytes"]),
                s["blocks"],
                s["site"].as_str().unwrap_or("").replace('\n', " <- ")
            );
        }
        if let Some(f) = t["fragmentation"].as_array() {
            // Where little is allocated any ratio is large: judge where it matters.
            let peak = t["peak_bytes"].as_f64().unwrap_or(0.0);
            let worst = f
                .iter()
                .filter(|p| p["allocated"].as_f64().unwrap_or(0.0) >= peak / 2.0)
                .filter_map(|p| p["ratio"].as_f64())
                .fold(0.0f64, f64::max);
            let line: Vec<String> = f
                .iter()
                .map(|p| format!("{:.2}", p["ratio"].as_f64().unwrap_or(0.0)))
                .collect();
            outln!(
                "      fragmentation (reserved / allocated) over time: {}; worst {:.3} where at least half the peak is allocated",
                line.join(" "),
                worst
            );
        }
    }
    let l = &v["leaks"];
    outln!(
        "\nLive at the end (leaks if the program was done): {} in {} blocks",
        b(&l["bytes"]),
        l["blocks"]
    );
    for (t, x) in l["per_tier"].as_object().into_iter().flatten() {
        outln!("  {t:<14} {}", b(x));
    }
    for x in l["largest"].as_array().into_iter().flatten().take(5) {
        outln!(
            "    {:>10} {} at {}",
            b(&x["size"]),
            x["tier"].as_str().unwrap_or(""),
            x["addr"].as_str().unwrap_or("")
        );
    }
    if v["out_of_memory"].as_u64().unwrap_or(0) > 0 {
        outln!("\nOut of memory: {} times", v["out_of_memory"]);
        for o in v["ooms"].as_array().into_iter().flatten() {
            outln!(
                "  at {:.6} s on {}: requested {}, free {}, largest free block {}",
                o["t_s"].as_f64().unwrap_or(0.0),
                o["tier"].as_str().unwrap_or(""),
                b(&o["requested"]),
                b(&o["free"]),
                o["largest_free_block"]
                    .as_u64()
                    .map(bytes)
                    .unwrap_or("?".into())
            );
        }
    }
    let s = &v["tier_store"];
    if !s.is_null() {
        outln!("\nTier store: {} parameters", s["parameters"]);
        outln!(
            "  acquires {}: hits {}, hits with the load in flight {}, misses {} (hit rate {:.3})",
            s["acquires"],
            s["hits"],
            s["late_hits"],
            s["misses"],
            s["hit_rate"].as_f64().unwrap_or(0.0)
        );
        outln!(
            "  loads {} ({}), through the staging ring {}, outside the plan {}; evictions {}; write-backs {} ({})",
            s["loads"], b(&s["bytes_loaded"]), s["staged_loads"], s["unplanned_loads"],
            s["evictions"], s["writebacks"], b(&s["bytes_written_back"])
        );
        if let Some(o) = s["optimal_bytes"].as_u64() {
            outln!(
                "  traffic {} against {} for Belady's MIN over the {} acquires seen (budget {} less the largest parameter): {:.3}x",
                b(&s["bytes_loaded"]), bytes(o), s["acquires"], b(&s["device_budget"]),
                s["traffic_over_optimum"].as_f64().unwrap_or(0.0)
            );
        }
        outln!(
            "  prefetches {}: on time {}, late {}, wasted (evicted unused) {}",
            s["prefetches"],
            s["prefetch_on_time"],
            s["prefetch_late"],
            s["prefetch_wasted"]
        );
    }
}
