//! The plan executor: runs the streaming plan (`crate::tier::plan`) ahead of the
//! runtime and carries out what it calls for: frees zombies, places loads into a
//! victim's block or a new one, promotes cold parameters to pinned memory, and copies
//! (from the pinned copy, or through the staging ring) with the checksums checked.

use std::sync::Arc;

use super::evict::{evict, evict_into_spare, order_after, pick_victim, release_block, Need};
use super::state::*;
use crate::error::{Error, Result};
use crate::placement::NumaPolicy;
use crate::pool::{self, PoolBlock};
use crate::stream::Event;
use crate::tier::config::Planner;
use crate::tier::plan::{fixed_set, zombie_done, Candidate, Plan, Step, Traits};
use crate::tier::policy::{ParamId, Policy, Sequence};

/// Runs the plan (sequence policy) until it has seen `lookahead` steps past the
/// runtime's step (none while the runtime is off the sequence), queueing the loads it
/// calls for, or until a load finds no room. Returns whether it reached the runtime's
/// step; false under LRU.
pub(super) fn pump(res: &Resources, st: &mut State, lookahead: usize) -> Result<bool> {
    let lookahead = if st.on_track { lookahead } else { 0 };
    let seq = match st.ev.policy() {
        Policy::Sequence(seq) if !seq.is_empty() => seq.clone(),
        _ => return Ok(false),
    };
    let plan = match st.plan.take() {
        Some(p) => p,
        None => {
            // Everything on the device starts in the logical cache; beside it, room for
            // the parameters the plan streams, so that one loads while another computes.
            let cap = match res.planner {
                Planner::Belady => belady_cap(res, st, &seq),
                // The logical cache is the fixed set and what the caller keeps: every
                // other load evicts the streamed ones before it (zombies, freed once
                // done and when their room is needed).
                Planner::Static => choose_fixed(res, st, &seq),
            };
            let resident: Vec<(ParamId, Traits)> = st
                .params
                .iter()
                .enumerate()
                .filter(|(_, p)| p.dev.is_some())
                .map(|(i, _)| (i as ParamId, traits(st, i as ParamId)))
                .collect();
            // From the runtime's step, or the one before if its parameter is still to
            // be handed out.
            let pos = if st.served {
                st.step
            } else {
                st.step.saturating_sub(1)
            };
            Plan::new(&seq, resident, cap, pos)
        }
    };
    st.plan = Some(plan);
    let horizon = st.step + lookahead.min(seq.len()) as u64;
    loop {
        let Some(plan) = st.plan.as_ref() else {
            // A load outside the plan (a fragmented pool) dropped it; next time.
            return Ok(false);
        };
        if plan.pos >= horizon {
            return Ok(true);
        }
        let m = plan.pos + 1;
        let params = &st.params;
        let at = seq.order()[(m % seq.len() as u64) as usize] as usize;
        if params.get(at).is_none_or(|p| p.size == 0) {
            // A given sequence may name parameters not registered (yet), and empty ones
            // have nothing to load: skip them.
            st.plan.as_mut().expect("checked").skip();
            continue;
        }
        let step = plan.next(&seq, |i| device_bytes(params[i as usize].size));
        match step {
            Step::Hit => st.plan.as_mut().expect("checked").hit(&seq),
            Step::Revive => {
                let id = seq.order()[(m % seq.len() as u64) as usize];
                let t = traits(st, id);
                st.plan.as_mut().expect("checked").revive(&seq, id, t);
            }
            Step::Load { id, victims } => {
                if !plan_load(res, st, &seq, m, id, &victims)? {
                    return Ok(m > st.step);
                }
                if m > st.step {
                    st.stats.prefetches += 1;
                    let size = st.params[id as usize].size;
                    st.ahead.push_back((m, size));
                }
            }
        }
    }
}

/// Belady's logical capacity: the device budget less room for `spare_slots` parameters
/// the plan streams, so that one loads while another computes. Sets `st.fixed`.
///
/// Room for the largest parameter the plan may load (in the sequence, not kept) always
/// works. With mixed sizes the largest (an embedding, a head) cost that much room on
/// every load. So for each smaller size `s` (largest first, eight at most) the plan may
/// instead keep every parameter larger than `s` for good (in `st.fixed`: MIN never
/// evicts it, so the room for `s` always suffices) and run MIN over the rest; each choice
/// is simulated over six passes and the one that loads the fewest bytes in passes 2–5
/// is taken (ties: the fewest kept).
pub(super) fn belady_cap(res: &Resources, st: &mut State, seq: &Sequence) -> usize {
    let room = |s: usize| {
        res.device_budget
            .saturating_sub(s.saturating_mul(res.spare_slots))
    };
    // What the answer depends on: the sequence, each step's size and hints.
    let mut words: Vec<u8> = Vec::with_capacity(seq.len() * 24);
    for id in seq.order() {
        let (size, hints) = st.params.get(*id as usize).map_or((0, 0), |p| {
            (
                p.size as u64,
                u64::from(p.keep) | (u64::from(p.priority as u32) << 1),
            )
        });
        for w in [u64::from(*id), size, hints] {
            words.extend_from_slice(&w.to_le_bytes());
        }
    }
    let digest = fnv1a(&words);
    // The parameters of the sequence MIN may evict, with their device bytes.
    let mut streamable: Vec<(ParamId, usize)> = seq
        .order()
        .iter()
        .filter(|id| st.params.get(**id as usize).is_some_and(|p| !p.keep))
        .map(|id| (*id, device_bytes(st.params[*id as usize].size)))
        .collect();
    streamable.sort_unstable();
    streamable.dedup();
    let (cap, above) = match st.belady_cap {
        Some((d, cap, above)) if d == digest => (cap, above),
        _ => {
            let mut sizes: Vec<usize> = streamable.iter().map(|x| x.1).collect();
            sizes.sort_unstable_by(|a, b| b.cmp(a));
            sizes.dedup();
            let largest = sizes.first().copied().unwrap_or(0);
            let mut best = (room(largest), None, u64::MAX);
            // One size (a loop of equal layers): nothing to choose, nothing to simulate.
            let choices = if sizes.len() > 1 { 9 } else { 0 };
            for (i, &s) in sizes.iter().take(choices).enumerate() {
                let above = (i > 0).then_some(s);
                let cap = room(s);
                let kept: usize = streamable
                    .iter()
                    .filter(|x| above.is_some_and(|a| x.1 > a))
                    .map(|x| x.1)
                    .sum();
                if kept.saturating_add(s) > cap {
                    break; // keeping more leaves no room to stream through
                }
                let bytes = simulated_bytes(st, seq, cap, above);
                if bytes < best.2 {
                    best = (cap, above, bytes);
                }
            }
            st.belady_cap = Some((digest, best.0, best.1));
            (best.0, best.1)
        }
    };
    st.fixed.clear();
    st.fixed.resize(st.params.len(), false);
    if let Some(a) = above {
        for (id, bytes) in streamable {
            st.fixed[id as usize] = bytes > a;
        }
    }
    cap
}

/// The bytes MIN with logical capacity `cap` loads in passes 2–5 of six from an empty
/// device, keeping every parameter larger than `above` once loaded.
pub(super) fn simulated_bytes(st: &State, seq: &Sequence, cap: usize, above: Option<usize>) -> u64 {
    let n = seq.len() as u64;
    let size = |i: ParamId| device_bytes(st.params[i as usize].size);
    let traits = |i: ParamId| {
        let t = traits(st, i);
        Traits {
            kept: st.params[i as usize].keep || above.is_some_and(|a| t.bytes > a),
            ..t
        }
    };
    let mut plan = Plan::new(seq, Vec::new(), cap, n - 1);
    let mut bytes = 0u64;
    while plan.pos + 1 < 7 * n {
        let m = plan.pos + 1;
        let id = seq.order()[(m % n) as usize];
        if id as usize >= st.params.len() {
            plan.skip();
            continue;
        }
        match plan.next(seq, size) {
            Step::Hit => plan.hit(seq),
            Step::Revive => plan.revive(seq, id, traits(id)),
            Step::Load { id, victims } => {
                if (2 * n..6 * n).contains(&m) {
                    bytes += size(id) as u64;
                }
                let v: Vec<(ParamId, usize)> = victims.iter().map(|v| (*v, size(*v))).collect();
                plan.load(seq, id, traits(id), &v);
                plan.zombies.clear();
            }
        }
    }
    bytes
}

/// The static planner's fixed set ([`crate::tier::plan::fixed_set`]) for `seq`, into
/// `st.fixed`: from the parameters the sequence uses and the caller does not keep, in
/// the budget less what the caller keeps (on the device now or used by the sequence).
/// Returns the logical cache's capacity: those kept bytes and the fixed set's.
pub(super) fn choose_fixed(res: &Resources, st: &mut State, seq: &Sequence) -> usize {
    let mut seen: rustc_hash::FxHashMap<ParamId, (usize, usize)> = Default::default();
    for (at, id) in seq.order().iter().enumerate() {
        if (*id as usize) < st.params.len() {
            seen.entry(*id).or_insert((at, 0)).1 += 1;
        }
    }
    // One definition of what the caller's keeps take, for the set and for the capacity.
    let kept_bytes = |st: &State, i: usize| -> usize {
        let p = &st.params[i];
        if p.keep && (p.dev.is_some() || seen.contains_key(&(i as ParamId))) {
            device_bytes(p.size)
        } else {
            0
        }
    };
    let kept: usize = (0..st.params.len()).map(|i| kept_bytes(st, i)).sum();
    let cands: Vec<Candidate> = seen
        .iter()
        .filter(|(id, _)| !st.params[**id as usize].keep)
        .map(|(id, (at, uses))| Candidate {
            id: *id,
            bytes: device_bytes(st.params[*id as usize].size),
            at: *at,
            uses: *uses,
            priority: st.params[*id as usize].priority,
        })
        .collect();
    let fixed = fixed_set(
        &cands,
        res.device_budget.saturating_sub(kept),
        res.spare_slots,
    );
    st.fixed.clear();
    st.fixed.resize(st.params.len(), false);
    let mut cap = kept;
    for id in &fixed {
        st.fixed[*id as usize] = true;
        cap += device_bytes(st.params[*id as usize].size);
    }
    tracing::debug!(target: "hetmem", fixed = fixed.len(), of = cands.len(), cap, "static plan");
    cap
}

/// Frees zombies for the load of `id` at step `m` and queues it, or returns false when
/// the zombies still in use leave no room.
pub(super) fn plan_load(
    res: &Resources,
    st: &mut State,
    seq: &Sequence,
    m: u64,
    id: ParamId,
    victims: &[ParamId],
) -> Result<bool> {
    let size = st.params[id as usize].size;
    let dsize = device_bytes(size);
    let plan = st.plan.as_ref().expect("pumping");
    // Zombies (old, and the ones this load makes) that the runtime is done with, the
    // one needed farthest first.
    let mut free: Vec<(ParamId, usize)> = plan
        .zombies
        .iter()
        .copied()
        .chain(
            victims
                .iter()
                .map(|v| crate::tier::plan::Zombie { id: *v, until: m }),
        )
        .filter(|z| {
            let p = &st.params[z.id as usize];
            p.dev.is_some() && p.refs == 0 && !p.keep && zombie_done(seq, z, st.step)
        })
        .map(|z| {
            let at = (st.step % seq.len() as u64) as usize;
            (
                z.id,
                seq.distance_to_next_use(z.id, at).unwrap_or(usize::MAX),
            )
        })
        .collect();
    free.sort_by_key(|(id, next)| (std::cmp::Reverse(*next), *id));
    let mut need = (st.used + dsize).saturating_sub(res.device_budget);
    let mut chosen = Vec::new();
    for (z, _) in free {
        if need == 0 {
            break;
        }
        need = need.saturating_sub(device_bytes(st.params[z as usize].size));
        chosen.push(z);
    }
    if need > 0 {
        return Ok(false);
    }
    let sized: Vec<(ParamId, usize)> = victims
        .iter()
        .map(|v| (*v, device_bytes(st.params[*v as usize].size)))
        .collect();
    let t = traits(st, id);
    st.plan.as_mut().expect("pumping").load(seq, id, t, &sized);
    let done = (|| {
        let mut spare = None;
        for z in chosen {
            evict_into_spare(res, st, z, size, &mut spare)?;
        }
        let ahead = usize::try_from(m.saturating_sub(st.step)).unwrap_or(usize::MAX);
        place(res, st, id, Need::Prefetch(ahead), spare)
    })();
    if done.is_err() {
        // The plan counted `id` as loaded: start it again from what is resident.
        st.plan = None;
    }
    done.map(|()| true)
}

/// Queues the load of `id` into `spare` (a victim's block of the same size, with the
/// events of its last uses) or a new block from the pool, evicting as `need` allows if
/// the pool's pages are fragmented.
pub(super) fn place(
    res: &Resources,
    st: &mut State,
    id: ParamId,
    need: Need,
    spare: Option<(PoolBlock, Vec<Event>)>,
) -> Result<()> {
    let idx = id as usize;
    let size = st.params[idx].size;
    let dsize = device_bytes(size);
    let block = match spare {
        // The victim's block, same size: the copy stream waits for the victim's last
        // uses (not for everything queued since, as a free to the pool would).
        Some((b, uses)) => {
            if let Err(e) = order_after(res, &uses) {
                // Unordered, the block could be written under the victim's last use.
                std::mem::forget(b);
                return Err(e);
            }
            b
        }
        None => loop {
            match res.pool.alloc(dsize, &res.copy) {
                Ok(b) => break b,
                Err(e @ Error::OutOfMemory { .. }) => {
                    // Pool pages can be fragmented; give up another resident parameter.
                    let Some(v) = pick_victim(st, id, need) else {
                        return Err(e);
                    };
                    st.stats.unplanned_evictions += 1;
                    let (block, uses) = evict(res, st, v)?;
                    release_block(res, block, &uses)?;
                    st.plan = None;
                }
                Err(e) => return Err(e),
            }
        },
    };
    // Promote a cold parameter to the pinned tier if the host budget has room; with
    // checksums, only bytes that match (a source that changed stays as it is, refused).
    if matches!(st.params[idx].host, HostCopy::Cold(_))
        && st.pinned + pinned_bytes(size) <= res.pinned_cap
    {
        if let (Some(expected), HostCopy::Cold(src)) =
            (st.params[idx].checksum, &st.params[idx].host)
        {
            let found = fnv1a(src.bytes());
            if found != expected {
                st.stats.checksum_mismatches += 1;
                return Err(host_mismatch(st, id, expected, found));
            }
        }
        match res
            .host
            .alloc_pinned(&NumaPolicy::NearDevice(res.device), size)
        {
            Ok(mut b) => {
                if let HostCopy::Cold(src) = &st.params[idx].host {
                    b.as_mut_slice()?[..size].copy_from_slice(src.bytes());
                }
                st.pinned += b.capacity();
                st.params[idx].host = HostCopy::Pinned(b);
                note_host(res, st);
            }
            Err(e) => {
                tracing::debug!(target: "hetmem", id, error = %e,
                    "no pinned copy; loading through the staging ring");
            }
        }
    }
    let mut ready = upload(res, st, idx, &block)?;
    if let Some(expected) = st.params[idx].checksum {
        let mut again = true;
        loop {
            ready.synchronize()?;
            let mut back = vec![0u8; size];
            block.read(0, &mut back)?;
            let found = fnv1a(&back);
            if found == expected {
                break;
            }
            st.stats.checksum_mismatches += 1;
            let p = &st.params[idx];
            let host = fnv1a(host_bytes(&p.host, size)?);
            let (copy, found) = match (host == expected, again) {
                (true, true) => {
                    // The host copy is right: the transfer was wrong. Once more.
                    tracing::warn!(target: "hetmem", id, name = %p.name,
                        "checksum mismatch after load; loading again");
                    again = false;
                    ready = upload(res, st, idx, &block)?;
                    continue;
                }
                (true, false) => ("device", found),
                (false, _) => return Err(host_mismatch(st, id, expected, host)),
            };
            tracing::error!(target: "hetmem", id, name = %p.name, copy,
                "checksum mismatch; the load is refused");
            return Err(Error::Checksum {
                param: id,
                name: p.name.clone(),
                copy,
                expected,
                found,
            });
        }
    }
    st.resident.push(id);
    let p = &mut st.params[idx];
    p.dev = Some(DevCopy {
        block: Arc::new(block),
        ready,
    });
    p.uses.clear();
    p.written = None;
    st.used += dsize;
    st.stats.loads += 1;
    st.stats.bytes_loaded += size as u64;
    st.stats.device_bytes = st.used;
    st.stats.device_peak_bytes = st.stats.device_peak_bytes.max(st.used);
    tracing::trace!(target: "hetmem", id, size, ?need, "loaded");
    Ok(())
}

/// The error for parameter `id` whose host copy no longer matches its checksum.
pub(super) fn host_mismatch(st: &State, id: ParamId, expected: u64, found: u64) -> Error {
    let name = st.params[id as usize].name.clone();
    tracing::error!(target: "hetmem", id, %name,
        "the host copy changed since registration; the load is refused");
    Error::Checksum {
        param: id,
        name,
        copy: "host",
        expected,
        found,
    }
}

/// Queues the copy of parameter `idx`'s host copy into `block` on the copy stream (from
/// its pinned copy, or through the staging ring); returns the event of its end.
pub(super) fn upload(
    res: &Resources,
    st: &mut State,
    idx: usize,
    block: &PoolBlock,
) -> Result<Event> {
    let State {
        params,
        ring,
        stats,
        ..
    } = st;
    let size = params[idx].size;
    match &params[idx].host {
        HostCopy::Pinned(h) => {
            pool::copy::host_to_block(block, 0, h, 0, size, &res.copy)?;
        }
        HostCopy::Cold(src) => {
            ring.upload(src.bytes(), block, 0, &res.copy)?;
            stats.staged_loads += 1;
        }
    }
    res.copy.record()
}
