//! Making room: which resident parameter goes ([`pick_victim`]), dropping a device copy
//! (writing it back first if dirty) and giving its block back behind its last uses, and
//! the demand load outside the plan ([`load`]).

use std::sync::Arc;

use super::run::place;
use super::state::*;
use crate::error::Result;
use crate::placement::NumaPolicy;
use crate::pool::{self, HostBlock, PoolBlock};
use crate::stream::Event;
use crate::tier::policy::ParamId;
use crate::tier::profile as prof;
use crate::tier::source::Source;

/// Why a load is made: it decides what may be evicted for it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Need {
    /// An acquire: anything not acquired or kept, preferring not the last released.
    Demand,
    /// Needed in this many steps: only what is needed later (or never) may go.
    Prefetch(usize),
    /// A hint with no sequence: as a demand load.
    Hint,
}

/// Whether resident `i` may be evicted to load `exclude` for `need`.
pub(super) fn evictable(st: &State, i: ParamId, exclude: ParamId, need: Need) -> bool {
    let p = &st.params[i as usize];
    p.refs == 0
        && !p.keep
        && i != exclude
        && match need {
            Need::Prefetch(k) => st.cursor.next_use(i).is_none_or(|d| d > k),
            Need::Demand | Need::Hint => true,
        }
}

pub(super) fn pick_victim(st: &State, exclude: ParamId, need: Need) -> Option<ParamId> {
    let mut cands: Vec<ParamId> = st
        .resident
        .iter()
        .copied()
        .filter(|&i| evictable(st, i, exclude, need))
        .collect();
    if matches!(need, Need::Demand) && cands.len() > 1 {
        if let Some(last) = st.last_released {
            cands.retain(|c| *c != last);
        }
    }
    let lowest = cands
        .iter()
        .map(|c| st.params[*c as usize].priority)
        .min()?;
    cands.retain(|c| st.params[*c as usize].priority == lowest);
    // Within a priority, the static plan's fixed set goes last: giving one up costs a
    // load every pass.
    let fixed = |c: &ParamId| st.progress.fixed.get(*c as usize).copied().unwrap_or(false);
    if cands.iter().any(|c| !fixed(c)) {
        cands.retain(|c| !fixed(c));
    }
    st.cursor.victim(cands)
}

/// Drops `id`'s device copy (writing it back first if dirty). Returns the block (if no
/// guard still holds it) and the events its last uses left, for reuse.
pub(super) fn evict(
    setup: &Setup,
    st: &mut State,
    id: ParamId,
) -> Result<(Option<PoolBlock>, Vec<Event>)> {
    let idx = id as usize;
    if st.params[idx].dirty {
        write_back(setup, st, id)?;
    }
    let p = &mut st.params[idx];
    let dev = p.dev.take().expect("evicting a resident parameter");
    if let Some(i) = st.resident.iter().position(|r| *r == id) {
        st.resident.swap_remove(i);
    }
    let p = &mut st.params[idx];
    let uses = std::mem::take(&mut p.uses);
    p.written = None;
    let size = p.size;
    st.used -= device_bytes(size);
    st.cursor.forget(id);
    if let Some(plan) = &mut st.progress.plan {
        plan.forget(id, device_bytes(size));
    }
    st.stats.evictions += 1;
    st.stats.device_bytes = st.used;
    tracing::debug!(target: "hetmem", id, size, "evicted");
    crate::profile::emit(|| crate::record::EventKind::Evict {
        id: u64::from(id),
        bytes: device_bytes(size) as u64,
        flags: 0,
    });
    Ok((Arc::try_unwrap(dev.block).ok(), uses))
}

/// Evicts `id` and, if `spare` is still empty and its block is free and `size` bytes
/// long, keeps the block there (with the events of its last uses) for the next load.
pub(super) fn evict_into_spare(
    setup: &Setup,
    st: &mut State,
    id: ParamId,
    size: usize,
    spare: &mut Option<(PoolBlock, Vec<Event>)>,
) -> Result<()> {
    let (block, uses) = evict(setup, st, id)?;
    match block {
        Some(b) if spare.is_none() && b.len() == device_bytes(size) => {
            *spare = Some((b, uses));
            Ok(())
        }
        other => release_block(setup, other, &uses),
    }
}

/// Gives an evicted parameter's block back to the pool, after making the copy stream
/// (the block's stream in the pool) wait for the parameter's last uses: the pool reuses
/// it on that stream at once, or hands it to another behind an event recorded there.
pub(super) fn release_block(setup: &Setup, block: Option<PoolBlock>, uses: &[Event]) -> Result<()> {
    let Some(block) = block else {
        return Ok(());
    };
    if let Err(e) = order_after(setup, uses) {
        // Out of circulation rather than handed out by the pool under the use.
        std::mem::forget(block);
        return Err(e);
    }
    drop(block);
    Ok(())
}

/// Orders the copy stream after `uses`: on the device, or where the driver refuses, by
/// waiting on the host. An error means neither worked: the memory the uses touch must
/// not be reused.
pub(super) fn order_after(setup: &Setup, uses: &[Event]) -> Result<()> {
    for e in uses {
        if let Err(err) = setup.copy.wait(e) {
            e.synchronize().map_err(|_| err)?;
        }
    }
    Ok(())
}

/// Copies resident `id`'s device bytes to its host copy (after the uses recorded so
/// far). A copy that fails leaves the parameter dirty and on the device, so nothing is
/// lost: a cold source (or the mapping a promotion would replace) is replaced only once
/// the new bytes are in; a pinned copy, written in place, may hold part of them until
/// the next write-back.
pub(super) fn write_back(setup: &Setup, st: &mut State, id: ParamId) -> Result<()> {
    let idx = id as usize;
    let size = st.params[idx].size;
    for e in &st.params[idx].uses {
        setup.copy.wait(e)?;
    }
    // A cold parameter moves to the pinned tier if there is room: one copy, and the
    // next load is direct.
    let promoted = if matches!(st.params[idx].host, HostCopy::Cold(_))
        && st.pinned + pinned_bytes(size) <= setup.pinned_cap
    {
        setup
            .host
            .alloc_pinned(&NumaPolicy::NearDevice(setup.device), size)
            .ok()
    } else {
        None
    };
    let t0 = prof::copy_start(&setup.copy);
    let p = &mut st.params[idx];
    let dev = p.dev.as_ref().expect("writing back a resident parameter");
    let d2h = |dst: &HostBlock| -> Result<()> {
        pool::copy::block_to_host(dst, 0, &dev.block, 0, size, &setup.copy)?;
        setup.copy.synchronize()
    };
    match (&mut p.host, promoted) {
        (host, Some(b)) => {
            d2h(&b)?;
            let cap = b.capacity();
            *host = HostCopy::Pinned(b);
            st.pinned += cap;
            count_host_bytes(setup, st);
        }
        (HostCopy::Pinned(b), None) => d2h(b)?,
        (HostCopy::Cold(src), None) => {
            setup.copy.synchronize()?;
            let mut bytes = vec![0u8; size];
            dev.block.read(0, &mut bytes)?;
            *src = Source::Host(bytes.into());
        }
    }
    let p = &mut st.params[idx];
    if setup.checksums {
        p.checksum = Some(fnv1a(host_bytes(&p.host, size)?));
    }
    p.dirty = false;
    st.stats.writebacks += 1;
    st.stats.writeback_bytes += size as u64;
    prof::copied(&setup.copy, id, size, t0, None, None);
    tracing::debug!(target: "hetmem", id, size, "written back");
    Ok(())
}

/// Makes room for `id` (as `need` allows) and queues its load, outside the plan.
/// Returns false, with nothing changed but possibly some evictions, when no room could
/// be made.
pub(super) fn load(setup: &Setup, st: &mut State, id: ParamId, need: Need) -> Result<bool> {
    let size = st.params[id as usize].size;
    let dsize = device_bytes(size);
    // Evict nothing unless evicting can make the room: a load that cannot happen must
    // not cost the parameters that are on the device (each retry would cost more).
    let evictable: usize = st
        .resident
        .iter()
        .filter(|&&i| evictable(st, i, id, need))
        .map(|&i| device_bytes(st.params[i as usize].size))
        .sum();
    if (st.used - evictable.min(st.used)).saturating_add(dsize) > setup.device_budget {
        return Ok(false);
    }
    let mut spare: Option<(PoolBlock, Vec<Event>)> = None;
    while st.used + dsize > setup.device_budget {
        let Some(v) = pick_victim(st, id, need) else {
            return Ok(false);
        };
        evict_into_spare(setup, st, v, size, &mut spare)?;
    }
    // Residency changed behind the plan's back: it starts again from what is resident.
    st.progress.plan = None;
    place(setup, st, id, need, spare)?;
    Ok(true)
}
