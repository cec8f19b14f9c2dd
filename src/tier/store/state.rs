//! The store's state: each parameter's copies ([`Param`]), what the store was set up
//! with ([`Setup`]), and what changes under its lock ([`State`]); the helpers every
//! part of the store reads them through.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::pool::host::size_class;
use crate::pool::{DevicePool, HostBlock, HostPool, PoolBlock, StagingRing};
use crate::stream::{Event, Stream};
use crate::tier::config::{Planner, TierStats};
pub(super) use crate::tier::fnv1a;
use crate::tier::learn::{Learner, Learnt, Token};
use crate::tier::plan::{Plan, Traits};
use crate::tier::policy::{Cursor, ParamId, Policy, Sequence};
use crate::tier::source::Source;

/// Device allocations are rounded to this (the pool's granularity).
pub(super) const DEVICE_ROUND: usize = crate::pool::device::MIN_BLOCK;
/// Larger ones to whole pool pages (see the module docs), above the pool's small sizes.
pub(super) const PAGE_ROUND_ABOVE: usize = crate::pool::device::SMALL_SIZE;
/// Pool pages: the pool's own budget is the device budget rounded up to these.
pub(super) const POOL_PAGE: usize = 2 << 20;

/// A parameter's device copy.
#[derive(Debug)]
pub(super) struct DevCopy {
    pub(super) block: Arc<PoolBlock>,
    /// Recorded on the copy stream after the load.
    pub(super) ready: Event,
}

/// A parameter's one host copy.
#[derive(Debug)]
pub(super) enum HostCopy {
    Cold(Source),
    Pinned(HostBlock),
}

#[derive(Debug)]
pub(super) struct Param {
    pub(super) name: String,
    pub(super) size: usize,
    pub(super) host: HostCopy,
    pub(super) dev: Option<DevCopy>,
    pub(super) refs: u32,
    /// The device copy is newer than the host copy.
    pub(super) dirty: bool,
    pub(super) keep: bool,
    pub(super) priority: i32,
    /// Events recorded by guards when they were dropped (work queued up to the end of
    /// each use), since the last load.
    pub(super) uses: Vec<Event>,
    /// The end of the last use that wrote it (a dirty guard's drop), since the last
    /// load: acquires on any stream wait for it, so no reader overtakes a write.
    pub(super) written: Option<Event>,
    pub(super) checksum: Option<u64>,
}

/// What the store was set up with: its settings, pools and copy stream (fixed).
#[derive(Debug)]
pub(super) struct Setup {
    pub(super) device: usize,
    pub(super) device_budget: usize,
    pub(super) pinned_cap: usize,
    pub(super) ring_bytes: usize,
    pub(super) prefetch_depth: usize,
    pub(super) spare_slots: usize,
    pub(super) planner: Planner,
    pub(super) learn: bool,
    pub(super) checksums: bool,
    pub(super) pool: DevicePool,
    pub(super) host: HostPool,
    pub(super) copy: Stream,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) params: Vec<Param>,
    pub(super) names: HashMap<String, ParamId>,
    /// The parameters on the device (the candidates for eviction), in no order.
    pub(super) resident: Vec<ParamId>,
    /// Device bytes of resident parameters.
    pub(super) used: usize,
    /// Pinned bytes of parameter copies (size classes).
    pub(super) pinned: usize,
    pub(super) last_released: Option<ParamId>,
    pub(super) ring: StagingRing,
    pub(super) stats: TierStats,
    /// Where the store stands under its eviction policy.
    pub(super) cursor: Cursor,
    /// Learns the sequence from the acquires (Learn mode).
    pub(super) learner: Learner,
    /// Acquires begun and sequences set: a failed acquire rewinds the sequence only if
    /// nothing came in since it began.
    pub(super) acquires: u64,
    /// The runtime's progress along the sequence, and the plan run ahead of it.
    pub(super) progress: Progress,
}

/// The runtime's progress along the sequence and the streaming plan run ahead of it
/// (sequence policy): what the plan executor (`run.rs`) reads and moves. Residency is
/// [`State`]'s; the plan is dropped and built again from it whenever residency changes
/// outside the plan.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// The streaming plan (built lazily, dropped when residency changes outside it).
    pub(super) plan: Option<Plan>,
    /// The step the runtime is at, counted from the sequence's start without wrapping.
    pub(super) step: u64,
    /// Loads queued for steps after `step`: (step, bytes).
    pub(super) ahead: VecDeque<(u64, usize)>,
    /// The parameter of `step` has been handed out (a plan started now begins after
    /// it, instead of loading it again).
    pub(super) served: bool,
    /// The last acquire was the step the sequence expected: only then does the plan
    /// load ahead (a runtime off the sequence would waste the copies).
    pub(super) on_track: bool,
    /// By id: kept for good by the plan (the static planner's fixed set, or what
    /// Belady's sizing keeps), chosen when the plan is built.
    pub(super) fixed: Vec<bool>,
    /// Belady's logical capacity and the size above which it keeps parameters for good,
    /// with the digest of what they were chosen for (the sequence, sizes and hints), so
    /// that a plan rebuilt for the same is not sized again.
    pub(super) belady_cap: Option<(u64, usize, Option<usize>)>,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) setup: Setup,
    pub(super) state: Mutex<State>,
    /// Signalled whenever room may have appeared: a guard dropped, a hint.
    pub(super) released: Condvar,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`Error::Forked`] in a forked child, checked before the lock (which a thread of
    /// the parent may have held at the fork).
    pub(super) fn live(&self) -> Result<()> {
        self.setup.copy.inner.backend().check_fork()
    }
}

pub(super) fn device_bytes(size: usize) -> usize {
    if size > PAGE_ROUND_ABOVE {
        size.next_multiple_of(POOL_PAGE)
    } else {
        size.next_multiple_of(DEVICE_ROUND)
    }
}

pub(super) fn pinned_bytes(size: usize) -> usize {
    size_class(size).unwrap_or(usize::MAX)
}

pub(super) fn param(st: &State, id: ParamId) -> Result<&Param> {
    st.params.get(id as usize).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "no parameter with id {id} ({} registered)",
            st.params.len()
        ))
    })
}

pub(super) fn host_bytes(host: &HostCopy, size: usize) -> Result<&[u8]> {
    Ok(match host {
        HostCopy::Cold(src) => src.bytes(),
        HostCopy::Pinned(b) => &b.as_slice()?[..size],
    })
}

/// Sequence learning (Learn mode): record the acquire of `id`, install a sequence
/// learnt, or drop one the acquire left ([`crate::tier::learn`]). Returns the token that
/// takes the record back if the acquire fails.
pub(super) fn learn_from_acquire(setup: &Setup, st: &mut State, id: ParamId) -> Option<Token> {
    if !setup.learn {
        return None;
    }
    let in_force = matches!(st.cursor.policy(), Policy::Sequence(_));
    let following = in_force && st.cursor.next_use(id) == Some(1);
    let (learnt, token) = st.learner.observe(id, following, st.params.len());
    match learnt {
        Learnt::Same => {}
        Learnt::Install { order, pos } => {
            tracing::info!(target: "hetmem", steps = order.len(), "execution sequence learnt");
            set_policy(st, Cursor::at(Policy::Sequence(Sequence::new(order)), pos));
            st.stats.sequences_learnt += 1;
        }
        Learnt::Drop => {
            tracing::info!(target: "hetmem", id, "acquire left the learnt sequence; learning again");
            set_policy(st, Cursor::new(Policy::Lru));
            st.stats.sequences_dropped += 1;
        }
    }
    token
}

/// Puts `cursor` in force; the plan starts again from what is on the device.
pub(super) fn set_policy(st: &mut State, cursor: Cursor) {
    st.progress.step = cursor.pos() as u64;
    st.cursor = cursor;
    st.progress.plan = None;
    st.progress.fixed.clear();
    st.progress.ahead.clear();
    st.progress.served = false;
}

pub(super) fn count_host_bytes(setup: &Setup, st: &mut State) {
    st.stats.host_bytes = st.pinned + setup.ring_bytes;
    st.stats.host_peak_bytes = st.stats.host_peak_bytes.max(st.stats.host_bytes);
}

/// What the plan needs to know of a parameter.
pub(super) fn traits(st: &State, id: ParamId) -> Traits {
    let p = &st.params[id as usize];
    Traits {
        bytes: device_bytes(p.size),
        kept: p.keep || st.progress.fixed.get(id as usize).copied().unwrap_or(false),
        priority: p.priority,
    }
}
