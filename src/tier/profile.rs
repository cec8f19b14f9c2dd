//! The tier store's events for the profiler ([`crate::profile`]): loads and write-backs
//! with their start and end on the device clock where the backend has one (the
//! simulator's virtual clock; a GPU backend gives none yet), evictions, acquires.

use crate::backend::sim::SimBackend;
use crate::record::{tier_flags, EventKind};
use crate::stream::{Event, Stream};

fn sim_of(copy: &Stream) -> Option<&SimBackend> {
    copy.inner.backend().as_any().downcast_ref::<SimBackend>()
}

/// When a copy queued now on `copy` would start on the device clock (`None`: profiling
/// is off, or the backend has no clock to ask).
pub(crate) fn copy_start(copy: &Stream) -> Option<u64> {
    if !crate::profile::enabled() {
        return None;
    }
    let sim = sim_of(copy)?;
    let tail = sim.stream_time_ns(copy.handle()).ok()?;
    Some(tail.max(sim.host_time_ns()))
}

/// When the work queued on `copy` so far ends on the device clock.
pub(crate) fn copy_end(copy: &Stream, ready: Option<&Event>) -> Option<u64> {
    let sim = sim_of(copy)?;
    match ready {
        Some(e) => sim.event_time_ns(e.handle()).ok().flatten(),
        None => sim.stream_time_ns(copy.handle()).ok(),
    }
}

/// The stream id the pool's events use for `s`.
pub(crate) fn stream_id(s: &Stream) -> u64 {
    s.inner.id()
}

/// A load's flags: ahead of its use, through the staging ring, outside the plan.
pub(crate) fn load_flags(ahead: Option<usize>, staged: bool) -> u8 {
    let mut f = 0;
    match ahead {
        Some(a) if a > 0 => f |= tier_flags::PREFETCH,
        Some(_) => {}
        None => f |= tier_flags::UNPLANNED,
    }
    if staged {
        f |= tier_flags::STAGED;
    }
    f
}

/// Records a load or write-back of `bytes` of parameter `id` on `copy` that started at
/// `start` (from [`copy_start`]) and ends at `ready`.
pub(crate) fn copied(
    copy: &Stream,
    id: u32,
    bytes: usize,
    start: Option<u64>,
    ready: Option<&Event>,
    load: Option<u8>,
) {
    crate::profile::emit(|| {
        let end = start.and_then(|_| copy_end(copy, ready));
        let (id, bytes, stream) = (u64::from(id), bytes as u64, stream_id(copy));
        match load {
            Some(flags) => EventKind::Load {
                id,
                bytes,
                stream,
                start,
                end,
                flags,
            },
            None => EventKind::WriteBack {
                id,
                bytes,
                stream,
                start,
                end,
            },
        }
    });
}
