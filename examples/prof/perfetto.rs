//! `prof perfetto`: a Chrome trace-event JSON file that ui.perfetto.dev (and
//! chrome://tracing) opens. Counter tracks per tier, NUMA node and device (allocated and
//! reserved), the budgets as counters; loads and write-backs as slices on a track per
//! copy stream (on the device clock, in a process of their own); out-of-memory and
//! evictions as instants. Streamed out as it is read; counters thinned to at most two
//! points (the bucket's largest, then its last) per track per `resolution`, so the
//! viewer stays responsive; `--from`/`--to` cut a window.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};

use rustc_hash::FxHashMap;
use serde_json::json;

use crate::input::{Ev, Live, Stream, Tier};

pub struct Opts {
    pub from_ns: u64,
    pub to_ns: u64,
    /// Width of a counter bucket (ns); 0: the duration over `points`.
    pub resolution_ns: u64,
    pub points: u64,
}

const HOST_PID: u64 = 1;
const STORE_PID: u64 = 2;

fn device_pid(d: u32) -> u64 {
    10 + u64::from(d)
}

fn copies_pid(d: u32) -> u64 {
    1000 + u64::from(d)
}

/// One counter track, thinned.
struct Track {
    pid: u64,
    name: String,
    bucket: u64,
    max: (u64, f64),
    last: (u64, f64),
    open: bool,
    emitted: f64,
}

struct Out {
    w: BufWriter<File>,
    first: bool,
    events: u64,
}

impl Out {
    fn put(&mut self, v: serde_json::Value) -> std::io::Result<()> {
        if !self.first {
            self.w.write_all(b",\n")?;
        }
        self.first = false;
        self.events += 1;
        serde_json::to_writer(&mut self.w, &v)?;
        Ok(())
    }
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 1000.0 * 1000.0).round() / 1000.0
}

impl Track {
    fn flush(&mut self, out: &mut Out) -> std::io::Result<()> {
        if !self.open {
            return Ok(());
        }
        self.open = false;
        let (tm, vm) = self.max;
        let (tl, vl) = self.last;
        if vm != self.emitted || tm == tl {
            out.put(
                json!({"name": self.name, "ph": "C", "ts": us(tm), "pid": self.pid, "tid": 0,
                "args": {"bytes": vm}}),
            )?;
            self.emitted = vm;
        }
        if tl != tm && vl != self.emitted {
            out.put(
                json!({"name": self.name, "ph": "C", "ts": us(tl), "pid": self.pid, "tid": 0,
                "args": {"bytes": vl}}),
            )?;
            self.emitted = vl;
        }
        Ok(())
    }

    fn push(&mut self, t: u64, v: f64, width: u64, out: &mut Out) -> std::io::Result<()> {
        let b = t / width.max(1);
        if self.open && b != self.bucket {
            self.flush(out)?;
        }
        if !self.open {
            self.open = true;
            self.bucket = b;
            self.max = (t, v);
        } else if v > self.max.1 {
            self.max = (t, v);
        }
        self.last = (t, v);
        Ok(())
    }
}

/// Slices and instants of one track within one counter bucket, merged into one event
/// (named by their count) when there are several: so that a long run of copies or
/// evictions stays a few thousand events per track.
struct Agg {
    bucket: u64,
    first: serde_json::Value,
    start: u64,
    end: u64,
    n: u64,
    bytes: u64,
}

#[derive(Default)]
struct Aggs {
    open: BTreeMap<(u64, u64, &'static str), Agg>,
}

impl Aggs {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        out: &mut Out,
        key: (u64, u64, &'static str),
        width: u64,
        start: u64,
        end: u64,
        bytes: u64,
        event: serde_json::Value,
    ) -> std::io::Result<()> {
        let bucket = start / width.max(1);
        if let Some(a) = self.open.get_mut(&key) {
            if a.bucket == bucket {
                a.end = a.end.max(end);
                a.n += 1;
                a.bytes += bytes;
                return Ok(());
            }
            let a = self.open.remove(&key).expect("there");
            Self::emit(out, key, a)?;
        }
        self.open.insert(
            key,
            Agg {
                bucket,
                first: event,
                start,
                end,
                n: 1,
                bytes,
            },
        );
        Ok(())
    }

    fn emit(out: &mut Out, key: (u64, u64, &'static str), a: Agg) -> std::io::Result<()> {
        if a.n == 1 {
            return out.put(a.first);
        }
        let mut e = a.first;
        e["name"] = json!(format!("{} {}s", a.n, key.2));
        e["ts"] = json!(us(a.start));
        if e["ph"] == "X" {
            e["dur"] = json!(us(a.end - a.start));
        }
        e["args"] = json!({"count": a.n, "bytes": a.bytes});
        out.put(e)
    }

    fn flush_all(&mut self, out: &mut Out) -> std::io::Result<()> {
        for (k, a) in std::mem::take(&mut self.open) {
            Self::emit(out, k, a)?;
        }
        Ok(())
    }
}

/// The duration of the record(s): a pass that only reads.
pub fn duration(paths: &[String]) -> Result<u64, String> {
    let mut s = Stream::open(paths)?;
    let mut end = 0;
    while let Some(it) = s.next()? {
        end = end.max(it.t);
    }
    Ok(end)
}

pub fn run(paths: &[String], out_path: &str, o: &Opts) -> Result<u64, String> {
    let width = if o.resolution_ns > 0 {
        o.resolution_ns
    } else {
        let end = duration(paths)?.min(o.to_ns);
        (end.saturating_sub(o.from_ns) / o.points.max(1)).max(1)
    };
    let f = File::create(out_path).map_err(|e| format!("{out_path}: {e}"))?;
    let mut out = Out {
        w: BufWriter::with_capacity(1 << 20, f),
        first: true,
        events: 0,
    };
    let io = |e: std::io::Error| format!("{out_path}: {e}");
    out.w
        .write_all(b"{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n")
        .map_err(io)?;
    let mut s = Stream::open(paths)?;
    let mut live = Live::default();
    let mut tracks: BTreeMap<(u64, String), Track> = BTreeMap::new();
    let mut names: FxHashMap<u64, String> = FxHashMap::default();
    let mut procs: BTreeMap<u64, String> = BTreeMap::new();
    let mut threads: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut copy_end: FxHashMap<(u64, u64), u64> = FxHashMap::default();
    let mut aggs = Aggs::default();
    procs.insert(HOST_PID, "host memory".into());
    let push = |tracks: &mut BTreeMap<(u64, String), Track>,
                out: &mut Out,
                pid: u64,
                name: String,
                t: u64,
                v: f64|
     -> std::io::Result<()> {
        let tr = tracks.entry((pid, name.clone())).or_insert_with(|| Track {
            pid,
            name,
            bucket: 0,
            max: (0, 0.0),
            last: (0, 0.0),
            open: false,
            emitted: f64::NAN,
        });
        tr.push(t, v, width, out)
    };
    while let Some(it) = s.next()? {
        let changed = live.apply(&it);
        if it.t > o.to_ns {
            break;
        }
        let inside = it.t >= o.from_ns;
        let t = it.t;
        if let (Some(tier), true) = (changed, inside) {
            let v = live.total(tier) as f64;
            match tier {
                Tier::Device(d) => {
                    procs.insert(device_pid(d), format!("device {d}"));
                    push(
                        &mut tracks,
                        &mut out,
                        device_pid(d),
                        format!("device {d} allocated"),
                        t,
                        v,
                    )
                    .map_err(io)?;
                    let r = live.reserved.get(&d).copied().unwrap_or(0) as f64;
                    push(
                        &mut tracks,
                        &mut out,
                        device_pid(d),
                        format!("device {d} reserved"),
                        t,
                        r,
                    )
                    .map_err(io)?;
                }
                Tier::Managed(d) => {
                    procs.insert(device_pid(d), format!("device {d}"));
                    push(
                        &mut tracks,
                        &mut out,
                        device_pid(d),
                        format!("managed {d}"),
                        t,
                        v,
                    )
                    .map_err(io)?;
                }
                other => {
                    push(&mut tracks, &mut out, HOST_PID, other.name(), t, v).map_err(io)?;
                }
            }
        }
        match &it.ev {
            Ev::Param { id, name, .. } => {
                names.insert(*id, name.clone());
            }
            _ if !inside => {}
            Ev::Budget { tier, bytes } => {
                let pid = match tier {
                    Tier::Device(d) | Tier::Managed(d) => device_pid(*d),
                    _ => HOST_PID,
                };
                push(
                    &mut tracks,
                    &mut out,
                    pid,
                    format!("{} budget", tier.name()),
                    t,
                    *bytes as f64,
                )
                .map_err(io)?;
            }
            Ev::Oom {
                tier,
                requested,
                free,
                largest,
                ..
            } => {
                out.put(
                    json!({"name": format!("out of memory: {}", tier.name()), "ph": "i", "s": "g",
                    "ts": us(t), "pid": HOST_PID, "tid": 0,
                    "args": {"requested": requested, "free": free, "largest_free_block": largest}}),
                )
                .map_err(io)?;
            }
            Ev::Evict { id, bytes } => {
                procs.insert(STORE_PID, "tier store".into());
                let name = names
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| format!("param {id}"));
                let e = json!({"name": format!("evict {name}"), "ph": "i", "s": "p", "ts": us(t),
                    "pid": STORE_PID, "tid": 0, "args": {"bytes": bytes}});
                aggs.add(&mut out, (STORE_PID, 0, "eviction"), width, t, t, *bytes, e)
                    .map_err(io)?;
            }
            Ev::Acquire { id, outcome, .. } if *outcome != hetmem::record::acquire::HIT => {
                procs.insert(STORE_PID, "tier store".into());
                let name = names
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| format!("param {id}"));
                let what = if *outcome == hetmem::record::acquire::LATE {
                    "late"
                } else {
                    "miss"
                };
                let e = json!({"name": format!("{what} {name}"), "ph": "i", "s": "t", "ts": us(t),
                    "pid": STORE_PID, "tid": 1, "args": {}});
                let kind = if what == "late" {
                    "late acquire"
                } else {
                    "missed acquire"
                };
                aggs.add(&mut out, (STORE_PID, 1, kind), width, t, t, 0, e)
                    .map_err(io)?;
            }
            Ev::Load { .. } | Ev::WriteBack { .. } => {
                let (load, id, bytes, stream, start, end, flags) = match &it.ev {
                    Ev::Load {
                        id,
                        bytes,
                        stream,
                        start,
                        end,
                        flags,
                    } => (true, id, bytes, stream, start, end, *flags),
                    Ev::WriteBack {
                        id,
                        bytes,
                        stream,
                        start,
                        end,
                    } => (false, id, bytes, stream, start, end, 0),
                    _ => unreachable!("matched above"),
                };
                let name = names
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| format!("param {id}"));
                let what = if load { "load" } else { "write-back" };
                let d = 0u32;
                let (pid, ts, dur) = match (start, end) {
                    (Some(a), Some(b)) => (copies_pid(d), *a, b.saturating_sub(*a)),
                    // No device clock: the host's time of queueing, no length.
                    _ => (copies_pid(d), t, 0),
                };
                procs.insert(pid, format!("device {d} copies (device clock)"));
                threads.insert((pid, *stream), format!("copy stream {stream}"));
                // Slices of one track must nest: a copy starts when the one before ends.
                let prev = copy_end.entry((pid, *stream)).or_default();
                let ts = ts.max(*prev);
                *prev = ts + dur;
                let e = json!({"name": format!("{what} {name}"), "ph": "X", "ts": us(ts),
                    "dur": us(dur), "pid": pid, "tid": stream,
                    "args": {"bytes": bytes, "flags": flags,
                        "prefetch": flags & hetmem::record::tier_flags::PREFETCH != 0,
                        "staged": flags & hetmem::record::tier_flags::STAGED != 0}});
                aggs.add(
                    &mut out,
                    (pid, *stream, "copie"),
                    width,
                    ts,
                    ts + dur,
                    *bytes,
                    e,
                )
                .map_err(io)?;
            }
            _ => {}
        }
    }
    for tr in tracks.values_mut() {
        tr.flush(&mut out).map_err(io)?;
    }
    aggs.flush_all(&mut out).map_err(io)?;
    for (pid, name) in &procs {
        out.put(json!({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}}))
            .map_err(io)?;
    }
    for ((pid, tid), name) in &threads {
        out.put(json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}))
            .map_err(io)?;
    }
    let n = out.events;
    write!(
        out.w,
        "\n],\"otherData\":{{\"generator\":\"hetmem prof\",\"counter_resolution_us\":{}}}}}\n",
        us(width)
    )
    .map_err(io)?;
    out.w.flush().map_err(io)?;
    Ok(n)
}
