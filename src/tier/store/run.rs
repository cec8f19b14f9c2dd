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
use crate::tier::plan::{zombie_done, Plan, Step, Traits};
use crate::tier::policy::{ParamId, Policy, Sequence};
use crate::tier::profile as prof;
use crate::tier::sizing::{self, ParamTraits};

/// Runs the plan (sequence policy) until it has seen `lookahead` steps past the
/// runtime's step (none while the runtime is off the sequence), queueing the loads it
/// calls for, or until a load finds no room. Returns whether it reached the runtime's
/// step; false under LRU.
pub(super) fn run_plan(setup: &Setup, st: &mut State, lookahead: usize) -> Result<bool> {
    let lookahead = if st.progress.on_track { lookahead } else { 0 };
    let seq = match st.cursor.policy() {
        Policy::Sequence(seq) if !seq.is_empty() => seq.clone(),
        _ => return Ok(false),
    };
    let plan = match st.progress.plan.take() {
        Some(p) => p,
        None => {
            // Everything on the device starts in the logical cache; beside it, room for
            // the parameters the plan streams, so that one loads while another computes.
            let cap = match setup.planner {
                Planner::Belady => belady_cap(setup, st, &seq),
                // The logical cache is the fixed set and what the caller keeps: every
                // other load evicts the streamed ones before it (zombies, freed once
                // done and when their room is needed).
                Planner::Static => choose_fixed(setup, st, &seq),
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
            let pos = if st.progress.served {
                st.progress.step
            } else {
                st.progress.step.saturating_sub(1)
            };
            Plan::new(&seq, resident, cap, pos)
        }
    };
    st.progress.plan = Some(plan);
    let horizon = st.progress.step + lookahead.min(seq.len()) as u64;
    loop {
        let Some(plan) = st.progress.plan.as_ref() else {
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
            st.progress.plan.as_mut().expect("checked").skip();
            continue;
        }
        let step = plan.next(&seq, |i| device_bytes(params[i as usize].size));
        match step {
            Step::Hit => st.progress.plan.as_mut().expect("checked").hit(&seq),
            Step::Revive => {
                let id = seq.order()[(m % seq.len() as u64) as usize];
                let t = traits(st, id);
                st.progress
                    .plan
                    .as_mut()
                    .expect("checked")
                    .revive(&seq, id, t);
            }
            Step::Load { id, victims } => {
                if !plan_load(setup, st, &seq, m, id, &victims)? {
                    return Ok(m > st.progress.step);
                }
                if m > st.progress.step {
                    st.stats.prefetches += 1;
                    let size = st.params[id as usize].size;
                    st.progress.ahead.push_back((m, size));
                }
            }
        }
    }
}

/// What the planners' sizing weighs of each registered parameter, by id.
fn param_traits(st: &State) -> Vec<ParamTraits> {
    st.params
        .iter()
        .map(|p| ParamTraits {
            size: p.size,
            bytes: device_bytes(p.size),
            keep: p.keep,
            priority: p.priority,
            resident: p.dev.is_some(),
        })
        .collect()
}

/// Belady's logical capacity ([`sizing::belady_choice`], kept for as long as the
/// sequence, sizes and hints it was chosen for stay the same); sets `st.progress.fixed` to the
/// parameters it keeps for good.
pub(super) fn belady_cap(setup: &Setup, st: &mut State, seq: &Sequence) -> usize {
    let params = param_traits(st);
    let digest = sizing::belady_digest(&params, seq);
    let (cap, above) = match st.progress.belady_cap {
        Some((d, cap, above)) if d == digest => (cap, above),
        _ => {
            let (cap, above) =
                sizing::belady_choice(&params, seq, setup.device_budget, setup.spare_slots);
            st.progress.belady_cap = Some((digest, cap, above));
            (cap, above)
        }
    };
    st.progress.fixed = sizing::belady_fixed(&params, seq, above);
    cap
}

/// The static planner's logical capacity ([`sizing::static_choice`]); sets `st.progress.fixed` to
/// its fixed set.
pub(super) fn choose_fixed(setup: &Setup, st: &mut State, seq: &Sequence) -> usize {
    let params = param_traits(st);
    let (cap, fixed, weighed) =
        sizing::static_choice(&params, seq, setup.device_budget, setup.spare_slots);
    let kept = fixed.iter().filter(|f| **f).count();
    st.progress.fixed = fixed;
    tracing::debug!(target: "hetmem", fixed = kept, of = weighed, cap, "static plan");
    cap
}

/// Frees zombies for the load of `id` at step `m` and queues it, or returns false when
/// the zombies still in use leave no room.
pub(super) fn plan_load(
    setup: &Setup,
    st: &mut State,
    seq: &Sequence,
    m: u64,
    id: ParamId,
    victims: &[ParamId],
) -> Result<bool> {
    let size = st.params[id as usize].size;
    let dsize = device_bytes(size);
    let plan = st.progress.plan.as_ref().expect("pumping");
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
            p.dev.is_some() && p.refs == 0 && !p.keep && zombie_done(seq, z, st.progress.step)
        })
        .map(|z| {
            let at = (st.progress.step % seq.len() as u64) as usize;
            (
                z.id,
                seq.distance_to_next_use(z.id, at).unwrap_or(usize::MAX),
            )
        })
        .collect();
    free.sort_by_key(|(id, next)| (std::cmp::Reverse(*next), *id));
    let mut need = (st.used + dsize).saturating_sub(setup.device_budget);
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
    st.progress
        .plan
        .as_mut()
        .expect("pumping")
        .load(seq, id, t, &sized);
    let done = (|| {
        let mut spare = None;
        for z in chosen {
            evict_into_spare(setup, st, z, size, &mut spare)?;
        }
        let ahead = usize::try_from(m.saturating_sub(st.progress.step)).unwrap_or(usize::MAX);
        place(setup, st, id, Need::Prefetch(ahead), spare)
    })();
    if done.is_err() {
        // The plan counted `id` as loaded: start it again from what is resident.
        st.progress.plan = None;
    }
    done.map(|()| true)
}

/// Queues the load of `id` into `spare` (a victim's block of the same size, with the
/// events of its last uses) or a new block from the pool, evicting as `need` allows if
/// the pool's pages are fragmented.
pub(super) fn place(
    setup: &Setup,
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
            if let Err(e) = order_after(setup, &uses) {
                // Unordered, the block could be written under the victim's last use.
                std::mem::forget(b);
                return Err(e);
            }
            b
        }
        None => loop {
            match setup.pool.alloc(dsize, &setup.copy) {
                Ok(b) => break b,
                Err(e @ Error::OutOfMemory { .. }) => {
                    // Pool pages can be fragmented; give up another resident parameter.
                    let Some(v) = pick_victim(st, id, need) else {
                        return Err(e);
                    };
                    st.stats.unplanned_evictions += 1;
                    let (block, uses) = evict(setup, st, v)?;
                    release_block(setup, block, &uses)?;
                    st.progress.plan = None;
                }
                Err(e) => return Err(e),
            }
        },
    };
    // Promote a cold parameter to the pinned tier if the host budget has room; with
    // checksums, only bytes that match (a source that changed stays as it is, refused).
    if matches!(st.params[idx].host, HostCopy::Cold(_))
        && st.pinned + pinned_bytes(size) <= setup.pinned_cap
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
        match setup
            .host
            .alloc_pinned(&NumaPolicy::NearDevice(setup.device), size)
        {
            Ok(mut b) => {
                if let HostCopy::Cold(src) = &st.params[idx].host {
                    b.as_mut_slice()?[..size].copy_from_slice(src.bytes());
                }
                st.pinned += b.capacity();
                st.params[idx].host = HostCopy::Pinned(b);
                count_host_bytes(setup, st);
            }
            Err(e) => {
                tracing::debug!(target: "hetmem", id, error = %e,
                    "no pinned copy; loading through the staging ring");
            }
        }
    }
    let t0 = prof::copy_start(&setup.copy);
    let staged = matches!(st.params[idx].host, HostCopy::Cold(_));
    let mut ready = upload(setup, st, idx, &block)?;
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
                    ready = upload(setup, st, idx, &block)?;
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
    if crate::profile::enabled() {
        let ahead = match need {
            Need::Prefetch(a) => Some(a),
            Need::Demand | Need::Hint => None,
        };
        let ready = st.params[idx].dev.as_ref().map(|d| &d.ready);
        let flags = prof::load_flags(ahead, staged);
        prof::copied(&setup.copy, id, size, t0, ready, Some(flags));
    }
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
    setup: &Setup,
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
            pool::copy::host_to_block(block, 0, h, 0, size, &setup.copy)?;
        }
        HostCopy::Cold(src) => {
            ring.upload(src.bytes(), block, 0, &setup.copy)?;
            stats.staged_loads += 1;
        }
    }
    setup.copy.record()
}
