//! The tiered parameter store: parameters live on the device (under a budget), in
//! pinned host memory (under a budget), or cold in their [`Source`] (a mapped
//! safetensors file or host bytes), and move between those tiers as the runtime uses
//! them.
//!
//! ```
//! use hetmem::{BackendKind, Manager, TierConfig, TierStore};
//!
//! let mgr = Manager::builder().backend(BackendKind::Sim).build()?;
//! let store = TierStore::new(&mgr, TierConfig::new(8 << 20, 64 << 20))?;
//! let w = store.register("layer.0", vec![3u8; 4 << 20].into())?;
//! let stream = mgr.create_stream(0)?;
//! let guard = store.acquire(w, &stream)?;   // the stream waits for the load, the host does not
//! let _ptr = guard.ptr();                   // valid for work queued on `stream` from now on
//! drop(guard);                              // the use ends after that work
//! # Ok::<(), hetmem::Error>(())
//! ```
//!
//! # Tiers and copies
//!
//! - **Device**: one [`PoolBlock`] per resident parameter from the store's own
//!   [`DevicePool`]; the bytes of resident parameters never exceed the device budget.
//!   A parameter counts as its size rounded up to 512 bytes, or to the pool's 2 MiB page
//!   above 1 MiB: then every large block owns whole pages, and the pages a block frees
//!   can be mapped again wherever the next load needs them. Counted exactly, partly
//!   used pages left the pool short of contiguous room under the budget while the
//!   store's count said it fitted; with parameters of mixed sizes that forced evictions
//!   outside the plan and stream synchronisations on most loads.
//! - **Pinned host**: the first time a parameter is loaded, its source bytes are
//!   copied once into a pinned [`HostBlock`] if the host budget has room. From then on
//!   that block *is* the parameter's host copy: the store drops its reference to the
//!   source (a host `Arc` the caller does not share is freed; a mapped slice lets go
//!   of its file range), so the store holds at most one host copy of each parameter.
//!   Loads from the pinned tier are a single asynchronous copy on the store's copy
//!   stream followed by an event; the host never blocks, so prefetching layer N+1
//!   overlaps the compute of layer N.
//! - **Cold**: parameters beyond the host budget are loaded from their source through
//!   the [`StagingRing`], which blocks the calling thread (with the store's lock held)
//!   while it fills its slots. Fine for a first pass; a steady state wants the host
//!   budget to cover the model.
//!
//! - **Empty** parameters (zero-element tensors of a file, see
//!   [`TierStore::register_safetensors`]) have no bytes: they take no memory, are never
//!   loaded, and acquire at once to a guard of length 0 with a null pointer.
//!
//! The host budget covers the pinned parameter copies *and* the staging ring.
//! [`TierStats::host_bytes`] reports exactly that; pages of mapped files still cold
//! are the page cache's and are reported separately ([`TierStats::mapped_bytes`]).
//!
//! # Residency and concurrency
//!
//! One mutex guards the store's state. Every transition (load, eviction, write-back,
//! reference counting) happens under it, so concurrent callers see a parameter as
//! cold, on the host, loading, or on the device with a reference count
//! ([`Residency`]). Eviction, write-back included, completes under the lock, so an
//! "evicting" state is never observable. The lock is held while waiting on the GPU
//! only on slow paths: the staging ring on cold loads, the write-back of dirty
//! parameters, and checksum verification.
//!
//! # Eviction
//!
//! Candidates are device-resident parameters with no guard and not kept resident
//! ([`TierStore::keep_resident`]); the lowest [`TierStore::priority`] class goes first.
//!
//! With an execution sequence, the plan (`src/tier/plan.rs`) decides: Belady's MIN over the
//! budget less one parameter (the spare, where the next layer loads while the current
//! one computes), run ahead of the runtime while its acquires follow the sequence, each
//! load queued as soon as memory the runtime is done with allows. A loop of layers then
//! moves exactly MIN(C−1) per pass. An acquire off the sequence, or a plan that cannot
//! make room, falls back to a demand load and the plan starts again from what is
//! resident. The plan loads from [`Drop`] of a guard too (that release may be what frees
//! the memory), so dropping a guard can do a load's host work: a pinned promotion on
//! the first pass, a staging-ring upload for cold parameters.
//!
//! Without a sequence, the least recently used goes. A demand load skips the parameter
//! released last (its kernel may still run, so reusing its memory would serialise the
//! load behind it) whenever another candidate exists. A hinted prefetch evicts only
//! parameters needed later than the one it loads.
//!
//! A parameter marked dirty ([`ParamGuard::mark_dirty`]) is copied back before its
//! device copy is dropped: into its pinned block, or into a new pinned block if the
//! host budget has room, or else into a new host buffer that replaces its source (a
//! mapped source is never written).
//!
//! # Graph capture
//!
//! An acquire on a stream that is capturing a graph (CUDA stream capture,
//! `torch.cuda.graph`) never loads and never makes that stream wait for an event:
//! a load queued on the copy stream behind the capture would pull the copy stream into
//! it (and run at every replay), and a capturing stream may not wait for an event
//! recorded outside the capture. So such an acquire serves resident parameters only
//! (a load still in flight is waited for on the host: its event was recorded outside
//! the capture), fails with [`Error::StreamCapturing`] for any other, and is no step
//! of the sequence (no prefetch follows it). Its guard records nothing when dropped
//! while the capture lasts. The graph replays into the parameter's device address long
//! after: keep the parameters a graph uses resident ([`TierStore::keep_resident`]) for
//! as long as the graph lives, and acquire them before capturing.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::DevicePtr;
use crate::error::{Error, Result};
use crate::placement::{NumaPolicy, Tier};
use crate::pool;
use crate::pool::host::size_class;
use crate::pool::{
    Budget, DevicePool, HostBlock, HostPool, HostPoolConfig, PoolBlock, PoolConfig, PoolStats,
    StagingRing,
};
use crate::stream::{Event, Stream};
use crate::tier::learn::{Learner, Learnt, Token};
use crate::tier::plan::{fixed_set, zombie_done, Candidate, Plan, Step, Traits};
use crate::tier::policy::{Eviction, ParamId, Policy, Sequence};
use crate::tier::profile as prof;
use crate::tier::source::{SafetensorsFile, Source};

/// Device allocations are rounded to this (the pool's granularity).
const DEVICE_ROUND: usize = 512;
/// Larger ones to whole pool pages (see the module docs), above the pool's small sizes.
const PAGE_ROUND_ABOVE: usize = crate::pool::device::SMALL_SIZE;
/// Pool pages: the pool's own budget is the device budget rounded up to these.
const POOL_PAGE: usize = 2 << 20;

/// Where the execution sequence comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SequenceHint {
    /// The runtime knows it: one pass, in order (ids may repeat).
    Given(Vec<ParamId>),
    /// Record the order of [`TierStore::acquire`] calls during the first pass and
    /// install it when the first id comes round again (a longer one when the next
    /// acquires show the pass was longer: a weight used first and last); drop it (back
    /// to LRU, learning again) when later acquires leave it. A failed acquire counts
    /// once, however often it is retried. See [`crate::tier`]'s `learn` module.
    Learn,
    /// No sequence: LRU eviction, no prefetching along a sequence.
    None,
}

/// How the store decides what stays on the device when a sequence is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Planner {
    /// Belady's MIN over the sequence with the budget less `spare_slots` of the largest
    /// parameter it streams: the fewest bytes for layers of one size (the optimum of the
    /// module docs). With mixed sizes it may keep the parameters above a size for good
    /// (a large embedding and head) and stream the rest through room for that size,
    /// where a simulation of six passes says that loads less. What stays rotates from
    /// pass to pass, so runs of hits come together.
    #[default]
    Belady,
    /// A fixed resident set chosen once, when the plan is built: the highest priority
    /// first, then the parameters used most often per pass, then the largest, as many
    /// as fit beside room for `spare_slots` of the largest parameter *left out*
    /// (spread evenly along the pass where only some of a kind fit); everything else
    /// is loaded before each use and freed after it. For a loop of distinct layers of
    /// one size, with one spare slot, it moves no more than `Belady` (MIN(C-1)), at
    /// times less. With mixed sizes it usually moves less (the room is sized for the
    /// streamed parameters, not for the largest of all, which usually stays), and with
    /// `spare_slots` ≥ 2 streamed loads overlap the kept layers' kernels, so a pass
    /// reaches max(copy, compute) when kernels take about as long as copies, where
    /// `Belady` leaves the copy engine idle through its runs of hits. A runtime that
    /// holds several streamed parameters at once (a module's weight and bias) needs as
    /// many spare slots.
    Static,
}

/// Settings of a [`TierStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierConfig {
    /// The device the parameters are loaded onto.
    pub device: usize,
    /// Most device bytes resident parameters may use (each rounded up to 512).
    pub device_budget: usize,
    /// Most pinned host bytes: the staging ring plus the pinned parameter copies.
    pub host_budget: usize,
    /// How many steps of the sequence ahead of the runtime loads may be queued (at most
    /// one pass; memory is the usual limit).
    pub prefetch_depth: usize,
    /// The execution sequence, given or learnt.
    pub sequence: SequenceHint,
    /// Verify every load against a checksum taken at registration (or write-back) by
    /// copying the bytes back; slow, for tests and debugging. A mismatch whose host copy
    /// is intact is loaded once more; a second one, or a host copy that changed (a
    /// mapped file rewritten under the store), fails the load with
    /// [`Error::Checksum`]: wrong bytes are never handed out.
    pub checksums: bool,
    /// Slots of the staging ring (at least 2).
    pub staging_slots: usize,
    /// Bytes per staging slot.
    pub staging_slot_size: usize,
    /// Host threads that fill a staging slot.
    pub staging_threads: usize,
    /// Parameters' worth of the device budget the plan keeps out of MIN's cache for
    /// loading ahead (at least 1: the layer computing while the next loads). One moves
    /// the fewest bytes (MIN with `C - 1` slots); a second lets loads run ahead through
    /// runs of hits, which overlaps better when a kernel takes about as long as a copy,
    /// at the price of MIN with `C - 2` slots.
    pub spare_slots: usize,
    /// What stays on the device under a sequence.
    pub planner: Planner,
}

impl TierConfig {
    /// Device 0, the given budgets, loads queued as far ahead as memory allows, no
    /// sequence, no checksums, and a staging ring of 4 slots of 4 MiB filled by 2
    /// threads.
    pub fn new(device_budget: usize, host_budget: usize) -> Self {
        TierConfig {
            device: 0,
            device_budget,
            host_budget,
            prefetch_depth: usize::MAX,
            sequence: SequenceHint::None,
            checksums: false,
            staging_slots: 4,
            staging_slot_size: 4 << 20,
            staging_threads: 2,
            spare_slots: 1,
            planner: Planner::Belady,
        }
    }
}

/// Where a parameter is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// Only in its source (mapped file or host bytes the caller gave).
    Cold,
    /// In a pinned host block, not on the device.
    Host,
    /// On the device, its load queued but not known to be done.
    Loading {
        /// Guards held.
        refs: u32,
    },
    /// On the device, loaded.
    Device {
        /// Guards held.
        refs: u32,
    },
}

/// What a [`TierStore`] has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Acquires that found the parameter on the device (loaded or loading).
    pub hits: u64,
    /// Acquires that had to load the parameter.
    pub misses: u64,
    /// Loads, demand and prefetch.
    pub loads: u64,
    /// Of which prefetches.
    pub prefetches: u64,
    /// Bytes copied host→device by loads.
    pub bytes_loaded: u64,
    /// Of `bytes_loaded`, the bytes of loads queued for steps of the sequence the
    /// runtime has not reached yet: `bytes_loaded - bytes_ahead` is what the steps run
    /// so far have cost.
    pub bytes_ahead: u64,
    /// Loads that went through the staging ring (cold, unpinned source).
    pub staged_loads: u64,
    /// Device copies dropped.
    pub evictions: u64,
    /// Dirty parameters copied back before their device copy was dropped.
    pub writebacks: u64,
    /// Bytes copied device→host by write-backs.
    pub writeback_bytes: u64,
    /// Loads whose bytes on the device did not match the checksum (each try counts).
    pub checksum_mismatches: u64,
    /// Times a learnt sequence was installed.
    pub sequences_learnt: u64,
    /// Times a learnt sequence was dropped because acquires left it.
    pub sequences_dropped: u64,
    /// Evictions nobody chose: the pool could not place a load in the room the store
    /// counted (fragmentation), so another parameter was given up and the plan started
    /// again. Zero on a healthy run.
    pub unplanned_evictions: u64,
    /// Device bytes of resident parameters now (each rounded as the module docs say).
    pub device_bytes: usize,
    /// The most `device_bytes` has been.
    pub device_peak_bytes: usize,
    /// Pinned host bytes now: parameter copies plus the staging ring.
    pub host_bytes: usize,
    /// The most `host_bytes` has been.
    pub host_peak_bytes: usize,
    /// Bytes of parameters whose one host copy is a mapped file range (the page cache's
    /// memory, not counted in `host_bytes`).
    pub mapped_bytes: usize,
}

/// A parameter's device copy.
#[derive(Debug)]
struct DevCopy {
    block: Arc<PoolBlock>,
    /// Recorded on the copy stream after the load.
    ready: Event,
}

/// A parameter's one host copy.
#[derive(Debug)]
enum HostCopy {
    Cold(Source),
    Pinned(HostBlock),
}

#[derive(Debug)]
struct Param {
    name: String,
    size: usize,
    host: HostCopy,
    dev: Option<DevCopy>,
    refs: u32,
    /// The device copy is newer than the host copy.
    dirty: bool,
    keep: bool,
    priority: i32,
    /// Events recorded by guards when they were dropped (work queued up to the end of
    /// each use), since the last load.
    uses: Vec<Event>,
    /// The end of the last use that wrote it (a dirty guard's drop), since the last
    /// load: acquires on any stream wait for it, so no reader overtakes a write.
    written: Option<Event>,
    checksum: Option<u64>,
}

#[derive(Debug)]
struct Resources {
    device: usize,
    device_budget: usize,
    pinned_cap: usize,
    ring_bytes: usize,
    prefetch_depth: usize,
    spare_slots: usize,
    planner: Planner,
    learn: bool,
    checksums: bool,
    pool: DevicePool,
    host: HostPool,
    copy: Stream,
}

#[derive(Debug)]
struct State {
    params: Vec<Param>,
    names: HashMap<String, ParamId>,
    ev: Eviction,
    /// Learns the sequence from the acquires (Learn mode).
    learner: Learner,
    /// Acquires begun and sequences set: a failed acquire rewinds the sequence only if
    /// nothing came in since it began.
    acquires: u64,
    last_released: Option<ParamId>,
    /// The streaming plan (sequence policy; built lazily, dropped when residency
    /// changes outside it).
    plan: Option<Plan>,
    /// The step the runtime is at, counted from the sequence's start without wrapping
    /// (sequence policy).
    step: u64,
    /// Loads queued for steps after `step`: (step, bytes).
    ahead: VecDeque<(u64, usize)>,
    /// The parameter of `step` has been handed out (a plan started now begins after
    /// it, instead of loading it again).
    served: bool,
    /// The last acquire was the step the sequence expected: only then does the plan
    /// load ahead (a runtime off the sequence would waste the copies).
    on_track: bool,
    /// The parameters on the device (the candidates for eviction), in no order.
    resident: Vec<ParamId>,
    /// By id: in the static planner's fixed set (chosen when the plan is built).
    fixed: Vec<bool>,
    /// Belady's logical capacity and the size above which it keeps parameters for good,
    /// with the digest of what they were chosen for (the sequence, sizes and hints), so
    /// that a plan rebuilt for the same is not sized again.
    belady_cap: Option<(u64, usize, Option<usize>)>,
    /// Device bytes of resident parameters.
    used: usize,
    /// Pinned bytes of parameter copies (size classes).
    pinned: usize,
    ring: StagingRing,
    stats: TierStats,
}

#[derive(Debug)]
struct Shared {
    res: Resources,
    state: Mutex<State>,
    /// Signalled whenever room may have appeared: a guard dropped, a hint.
    released: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`Error::Forked`] in a forked child, checked before the lock (which a thread of
    /// the parent may have held at the fork).
    fn live(&self) -> Result<()> {
        self.res.copy.inner.backend().check_fork()
    }
}

/// The tiered parameter store; see the [module documentation](self). Cheap to clone:
/// clones share the store, and it may be used from any number of threads.
#[derive(Debug, Clone)]
pub struct TierStore {
    shared: Arc<Shared>,
}

/// A parameter in use on the device. Its pointer is valid for work queued on the
/// guard's stream after [`TierStore::acquire`] returned and until the guard is
/// dropped; the store does not reuse the memory before that work is done.
#[derive(Debug)]
pub struct ParamGuard {
    shared: Arc<Shared>,
    id: ParamId,
    /// `None` for an empty parameter, and while the guard is being dropped.
    block: Option<Arc<PoolBlock>>,
    /// The parameter's size (its block may be rounded up to whole pages).
    size: usize,
    stream: Stream,
    dirty: bool,
}

/// The message of an acquire refused on a capturing stream.
fn not_resident_in_capture(id: ParamId, name: &str) -> Error {
    Error::StreamCapturing {
        what: format!(
            "acquiring parameter {id} ({name}), which is not on the device, on a capturing \
             stream: its load would be recorded into the graph and pull the store's copy \
             stream into the capture. Acquire it before the capture begins, and keep it \
             resident while the graph lives"
        ),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// What a parameter of `size` bytes takes of the device budget, and asks the pool for:
/// up to 1 MiB, `size` rounded to 512 bytes; above, whole 2 MiB pool pages (so that the
/// pool can always place a load in the room the store counts).
///
/// ```
/// use hetmem::tier::device_footprint;
/// assert_eq!(device_footprint(1000), 1024);
/// assert_eq!(device_footprint(3 << 20), 4 << 20);
/// ```
pub fn device_footprint(size: usize) -> usize {
    device_bytes(size)
}

fn device_bytes(size: usize) -> usize {
    if size > PAGE_ROUND_ABOVE {
        size.next_multiple_of(POOL_PAGE)
    } else {
        size.next_multiple_of(DEVICE_ROUND)
    }
}

fn pinned_bytes(size: usize) -> usize {
    size_class(size).unwrap_or(usize::MAX)
}

impl TierStore {
    /// Checks `cfg` before anything is made ([`TierStore::new`]'s argument errors),
    /// `device_memory` being the device's total memory if the device exists. Returns the
    /// staging ring's pinned bytes.
    pub(crate) fn check_config(cfg: &TierConfig, device_memory: Option<usize>) -> Result<usize> {
        if cfg.device_budget == 0 {
            return Err(Error::InvalidArgument(
                "a tier store needs a device budget above zero".into(),
            ));
        }
        if cfg.spare_slots == 0 {
            return Err(Error::InvalidArgument(
                "a tier store needs at least one spare slot (one layer loads while another \
                 computes)"
                    .into(),
            ));
        }
        // A budget the device cannot hold would be planned for and then fail load after
        // load (each failure a demand load that throws the plan away): refuse it.
        if let Some(total) = device_memory {
            if cfg.device_budget > total {
                return Err(Error::InvalidArgument(format!(
                    "the device budget ({} bytes) is larger than device {}'s memory ({total} \
                     bytes)",
                    cfg.device_budget, cfg.device
                )));
            }
        }
        // The ring's shape first: a slot no memory can hold is that, whatever the budget.
        let ring_bytes = StagingRing::pinned_bytes(cfg.staging_slots, cfg.staging_slot_size)?;
        if cfg.host_budget < ring_bytes {
            return Err(Error::InvalidArgument(format!(
                "the host budget ({} bytes) is smaller than the staging ring ({} slots of \
                 {} bytes = {ring_bytes} pinned bytes)",
                cfg.host_budget, cfg.staging_slots, cfg.staging_slot_size
            )));
        }
        Ok(ring_bytes)
    }

    /// The settings of the store's own device pool.
    pub(crate) fn pool_config(cfg: &TierConfig) -> PoolConfig {
        PoolConfig {
            // The store keeps its own exact account; the pool's budget only adds the
            // page rounding of its segments.
            budget: Budget::Bytes(cfg.device_budget.next_multiple_of(POOL_PAGE) + POOL_PAGE),
            // Page-sized chunks, made for what is needed only: the store fills its
            // budget, and only pages can always move to where a load needs room.
            min_chunk: POOL_PAGE,
            max_chunk: Some(POOL_PAGE),
            chunk_fraction: 0.0,
            grow_ahead: 0.0,
            ..PoolConfig::default()
        }
    }

    /// The settings of the store's own host pool.
    pub(crate) fn host_pool_config(cfg: &TierConfig) -> HostPoolConfig {
        HostPoolConfig {
            pinned_budget: Some(cfg.host_budget),
            ..HostPoolConfig::default()
        }
    }

    /// The store over its parts (made by [`TierStore::new`] from a manager, after
    /// [`TierStore::check_config`]): `pool` with [`TierStore::pool_config`], `host` with
    /// [`TierStore::host_pool_config`], and `copy`, a stream of `cfg.device`.
    pub(crate) fn from_parts(
        cfg: TierConfig,
        ring_bytes: usize,
        pool: DevicePool,
        host: HostPool,
        copy: Stream,
    ) -> Result<TierStore> {
        let ring = StagingRing::new(
            &host,
            &NumaPolicy::NearDevice(cfg.device),
            cfg.staging_slots,
            cfg.staging_slot_size,
            cfg.staging_threads,
        )?;
        let ev = match &cfg.sequence {
            SequenceHint::Given(order) if !order.is_empty() => {
                Eviction::new(Policy::Sequence(Sequence::new(order.clone())))
            }
            _ => Eviction::new(Policy::Lru),
        };
        let step = ev.pos() as u64;
        let stats = TierStats {
            host_bytes: ring_bytes,
            host_peak_bytes: ring_bytes,
            ..TierStats::default()
        };
        tracing::info!(target: "hetmem", device = cfg.device, device_budget = cfg.device_budget,
            host_budget = cfg.host_budget, "tier store ready");
        prof_budgets(&cfg);
        Ok(TierStore {
            shared: Arc::new(Shared {
                res: Resources {
                    device: cfg.device,
                    device_budget: cfg.device_budget,
                    pinned_cap: cfg.host_budget - ring_bytes,
                    ring_bytes,
                    prefetch_depth: cfg.prefetch_depth,
                    spare_slots: cfg.spare_slots,
                    planner: cfg.planner,
                    learn: cfg.sequence == SequenceHint::Learn,
                    checksums: cfg.checksums,
                    pool,
                    host,
                    copy,
                },
                state: Mutex::new(State {
                    params: Vec::new(),
                    names: HashMap::new(),
                    ev,
                    learner: Learner::default(),
                    acquires: 0,
                    last_released: None,
                    plan: None,
                    step,
                    ahead: VecDeque::new(),
                    served: false,
                    on_track: false,
                    resident: Vec::new(),
                    fixed: Vec::new(),
                    belady_cap: None,
                    used: 0,
                    pinned: 0,
                    ring,
                    stats,
                }),
                released: Condvar::new(),
            }),
        })
    }

    /// Registers a parameter called `name` whose bytes are `source`. It starts cold.
    ///
    /// # Errors
    /// [`Error::InvalidSize`] for an empty source (a caller's empty buffer is taken for
    /// a mistake; a file's empty tensors are registered by
    /// [`TierStore::register_safetensors`]); [`Error::OutOfMemory`] for a
    /// parameter whose device footprint is larger than the device budget (it could never
    /// be loaded): `requested` is that footprint (above 1 MiB a parameter takes whole
    /// 2 MiB pool pages), `free` the whole budget;
    /// [`Error::InvalidArgument`] for a name already registered.
    pub fn register(&self, name: &str, source: Source) -> Result<ParamId> {
        self.shared.live()?;
        if source.is_empty() {
            return Err(Error::InvalidSize {
                requested: 0,
                reason: "a parameter needs at least one byte",
            });
        }
        let ids = self.register_all(vec![(name, source)])?;
        Ok(ids[0])
    }

    /// Registers every tensor of `file`, in file order, under its own name: all of
    /// them, or none (the first fault found fails the call before any is registered).
    ///
    /// A tensor of zero elements (legal in safetensors) becomes an *empty parameter*:
    /// it has no bytes to move, so it takes no memory in any tier, is never loaded,
    /// evicted or written back, and is always [`Residency::Device`]. Acquiring it is a
    /// step of the sequence like any other and returns at once a guard of length 0
    /// whose [`ParamGuard::ptr`] is null (as PyTorch's empty CUDA tensors have) and
    /// whose [`ParamGuard::block`] is `None`.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] for a tensor whose device footprint is larger than the
    /// device budget, [`Error::InvalidArgument`] for a name already registered, as
    /// [`TierStore::register`].
    pub fn register_safetensors(&self, file: &SafetensorsFile) -> Result<Vec<ParamId>> {
        self.shared.live()?;
        let params = file
            .tensors()
            .iter()
            .map(|t| Ok((t.name.as_str(), file.source(&t.name)?)))
            .collect::<Result<Vec<_>>>()?;
        self.register_all(params)
    }

    /// Registers `params` in order, all or none: every one is checked (its footprint
    /// against the budget, its name against those taken and the others given) before
    /// the first is registered, under one hold of the lock.
    fn register_all(&self, params: Vec<(&str, Source)>) -> Result<Vec<ParamId>> {
        let res = &self.shared.res;
        for (_, source) in &params {
            let need = device_bytes(source.len());
            if need > res.device_budget {
                return Err(Error::oom(
                    Tier::Device(res.device),
                    need,
                    res.device_budget,
                ));
            }
        }
        // Outside the lock: hashing reads every byte.
        let checksums: Vec<Option<u64>> = params
            .iter()
            .map(|(_, source)| res.checksums.then(|| fnv1a(source.bytes())))
            .collect();
        let mut st = self.shared.lock();
        let mut given = std::collections::HashSet::with_capacity(params.len());
        for (name, _) in &params {
            if st.names.contains_key(*name) {
                return Err(Error::InvalidArgument(format!(
                    "a parameter named `{name}` is already registered"
                )));
            }
            if !given.insert(*name) {
                return Err(Error::InvalidArgument(format!(
                    "parameter `{name}` given twice"
                )));
            }
        }
        let first = st.params.len();
        let ids = first..first + params.len();
        if ids.end > 0 && ParamId::try_from(ids.end - 1).is_err() {
            return Err(Error::InvalidArgument(format!(
                "too many parameters: {first} registered, {} more asked, ids end at {}",
                params.len(),
                ParamId::MAX
            )));
        }
        let mut out = Vec::with_capacity(params.len());
        for ((name, source), checksum) in params.into_iter().zip(checksums) {
            // In range: checked above.
            let id = st.params.len() as ParamId;
            let size = source.len();
            st.params.push(Param {
                name: name.to_owned(),
                size,
                host: HostCopy::Cold(source),
                dev: None,
                refs: 0,
                dirty: false,
                keep: false,
                priority: 0,
                uses: Vec::new(),
                written: None,
                checksum,
            });
            st.names.insert(name.to_owned(), id);
            tracing::debug!(target: "hetmem", id, name, size, "parameter registered");
            crate::profile::emit(|| crate::record::EventKind::Param {
                id: u64::from(id),
                size: size as u64,
                name: name.to_owned(),
            });
            out.push(id);
        }
        // The plan's spare is the largest parameter: size it again.
        st.plan = None;
        Ok(out)
    }

    /// The id of the parameter called `name`.
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.shared.lock().names.get(name).copied()
    }

    /// The name of parameter `id`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown id.
    pub fn name(&self, id: ParamId) -> Result<String> {
        self.shared.live()?;
        let st = self.shared.lock();
        Ok(param(&st, id)?.name.clone())
    }

    /// How many parameters are registered.
    pub fn len(&self) -> usize {
        self.shared.lock().params.len()
    }

    /// Whether no parameter is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [`Error::Forked`] in a forked child, before any lock is taken: for callers (the C
    /// ABI) about to use accessors that cannot fail, such as [`TierStore::len`].
    pub(crate) fn check_fork(&self) -> Result<()> {
        self.shared.live()
    }

    /// The copy stream loads run on (for timing and interop).
    pub fn copy_stream(&self) -> &Stream {
        &self.shared.res.copy
    }

    /// Makes parameter `id` usable on the device for work queued on `stream` from now
    /// on: loads it if needed (evicting others), makes `stream` wait for the load
    /// (the host does not wait, except on the cold staging path), and then prefetches
    /// the next parameters of the sequence within the budget.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown id or a stream of another device;
    /// [`Error::ForeignHandle`] for a stream of another manager (both before anything
    /// is loaded); [`Error::OutOfMemory`] when there is no room: every device-resident
    /// parameter is acquired or kept resident (nothing is evicted then). Where other
    /// threads' guards will make room, [`TierStore::acquire_timeout`] waits.
    /// [`Error::Checksum`] when checksums are on and the load's bytes are wrong (see
    /// [`TierConfig::checksums`]). Errors of the copy, the staging ring or the pool pass
    /// through. A failed acquire is not a step of the sequence: retrying it is not a
    /// deviation. On a stream capturing a graph, resident parameters only
    /// ([`Error::StreamCapturing`] for others: see the module docs, "Graph capture").
    pub fn acquire(&self, id: ParamId, stream: &Stream) -> Result<ParamGuard> {
        self.acquire_until(id, stream, None)
    }

    /// [`TierStore::acquire`], but when there is no room it waits up to `timeout` for
    /// guards to be released (by other threads: this thread's own guards cannot be
    /// released while it waits) or hints to free some.
    ///
    /// # Errors
    /// As [`TierStore::acquire`]; [`Error::OutOfMemory`] once `timeout` has passed.
    pub fn acquire_timeout(
        &self,
        id: ParamId,
        stream: &Stream,
        timeout: Duration,
    ) -> Result<ParamGuard> {
        self.acquire_until(id, stream, Some(Instant::now() + timeout))
    }

    fn acquire_until(
        &self,
        id: ParamId,
        stream: &Stream,
        deadline: Option<Instant>,
    ) -> Result<ParamGuard> {
        let sh = &self.shared;
        sh.live()?;
        let res = &sh.res;
        // Before anything changes: a stream this store cannot order work on.
        if !stream.belongs_to(res.copy.inner.backend()) {
            return Err(Error::ForeignHandle { what: "stream" });
        }
        if stream.device() != res.device {
            return Err(Error::InvalidArgument(format!(
                "a stream of device {} used with the store of device {}",
                stream.device(),
                res.device
            )));
        }
        if stream.is_capturing()? {
            return self.acquire_in_capture(id, stream);
        }
        let mut st = sh.lock();
        param(&st, id)?;
        let token = note_use(res, &mut st, id);
        st.acquires += 1;
        let nth = st.acquires;
        // Where the sequence stood: an acquire that fails has not run its step, so that
        // a retry is not taken for a step off the sequence (or recorded twice).
        let (pos, step, served, on_track) = (st.ev.pos(), st.step, st.served, st.on_track);
        // An empty parameter is always where it is needed.
        let hit = st.params[id as usize].dev.is_some() || st.params[id as usize].size == 0;
        let next = st.ev.next_use(id);
        st.on_track = next == Some(1);
        if let Some(d) = next {
            if d != 1 {
                // Not the step the plan expects: start it again from here.
                st.plan = None;
            }
            st.step += d as u64;
            st.served = false;
        }
        st.ev.touch(id);
        let (mut st, made) = self.make_resident(st, id, stream, deadline);
        if let Err(e) = made {
            let st = &mut *st;
            // Unless other threads' acquires moved the sequence on while this one waited
            // (then it stays where they left it).
            if st.acquires == nth {
                st.ev.rewind(pos);
                (st.step, st.served, st.on_track) = (step, served, on_track);
            }
            // Resumes from what is resident when the retry comes.
            st.plan = None;
            if let Some(t) = token {
                st.learner.unobserve(t);
            }
            return Err(e);
        }
        if hit {
            st.stats.hits += 1;
        } else {
            st.stats.misses += 1;
        }
        crate::profile::emit(|| prof_acquire(&st, id, hit));
        // The loads queued ahead for the steps run now have been used (only once the
        // acquire stands: a failed one has not run its step).
        let now = st.step;
        st.ahead.retain(|(m, _)| *m > now);
        let p = &mut st.params[id as usize];
        // Made resident above, unless empty (then there is no block).
        debug_assert!(p.dev.is_some() || p.size == 0);
        // No record_stream with the pool: the guard's drop records the use's end, and
        // every path that gives the block back waits the copy stream on those events
        // first (`release_block`). Recording would keep every caller's stream alive in
        // the pool and make a freed block wait for all later work on them.
        let block = p.dev.as_ref().map(|dev| Arc::clone(&dev.block));
        p.refs += 1;
        let size = p.size;
        st.served = true;
        let guard = ParamGuard {
            shared: Arc::clone(sh),
            id,
            block,
            size,
            // A per-thread default stream: the acquiring thread's, which the guard's
            // drop records the end of the use on (or, dropped on another thread that
            // cannot name it, waits for the device).
            stream: stream.this_thread().into_owned(),
            dirty: false,
        };
        if let Err(e) = pump(res, &mut st, res.prefetch_depth) {
            tracing::warn!(target: "hetmem", error = %e, "prefetch failed");
        }
        Ok(guard)
    }

    /// An acquire on a stream that is capturing a graph: a resident parameter only, its
    /// load and last write waited for on the host (their events were recorded outside
    /// the capture, which the stream may not wait for), no step of the sequence, no
    /// prefetch.
    fn acquire_in_capture(&self, id: ParamId, stream: &Stream) -> Result<ParamGuard> {
        let sh = &self.shared;
        let mut st = sh.lock();
        let p = param(&st, id)?;
        let block = match p.dev.as_ref() {
            Some(dev) => {
                if !dev.ready.is_done()? {
                    dev.ready.synchronize()?;
                }
                if let Some(w) = &p.written {
                    if !w.is_done()? {
                        w.synchronize()?;
                    }
                }
                Some(Arc::clone(&dev.block))
            }
            // Nothing to load: served like a resident one.
            None if p.size == 0 => None,
            None => return Err(not_resident_in_capture(id, &p.name)),
        };
        let size = p.size;
        st.params[id as usize].refs += 1;
        st.stats.hits += 1;
        tracing::debug!(target: "hetmem", id, "acquired on a capturing stream");
        Ok(ParamGuard {
            shared: Arc::clone(sh),
            id,
            block,
            size,
            stream: stream.clone(),
            dirty: false,
        })
    }

    /// For an acquire: loads `id` (the plan's load, or a demand load), waiting until
    /// `deadline` for room, and makes `stream` wait for the load.
    fn make_resident<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        id: ParamId,
        stream: &Stream,
        deadline: Option<Instant>,
    ) -> (MutexGuard<'a, State>, Result<()>) {
        let sh = &self.shared;
        let res = &sh.res;
        // Under a sequence the plan loads the step's parameter (normally long before);
        // otherwise, or when the plan cannot make room, a demand load.
        match pump(res, &mut st, 0) {
            // An empty parameter has nothing to load or wait for.
            _ if st.params[id as usize].size == 0 => return (st, Ok(())),
            // Loading it again on demand would hand the same verdict over twice the copies.
            Err(e @ Error::Checksum { param, .. }) if param == id => return (st, Err(e)),
            Err(e) => tracing::warn!(target: "hetmem", id, error = %e, "the plan's load failed"),
            Ok(_) => {}
        }
        while st.params[id as usize].dev.is_none() {
            match load(res, &mut st, id, Need::Demand) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => return (st, Err(e)),
            }
            // No room: everything resident is acquired or kept.
            let wait = deadline.and_then(|d| d.checked_duration_since(Instant::now()));
            match wait {
                Some(left) if !left.is_zero() => {
                    st = sh
                        .released
                        .wait_timeout(st, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                _ => {
                    let free = res.device_budget.saturating_sub(st.used);
                    let size = st.params[id as usize].size;
                    return (st, Err(Error::oom(Tier::Device(res.device), size, free)));
                }
            }
        }
        let p = &st.params[id as usize];
        let ready = &p.dev.as_ref().expect("loaded").ready;
        let mut waited = stream.wait(ready);
        if let (Ok(()), Some(w)) = (&waited, &p.written) {
            waited = stream.wait(w);
        }
        (st, waited)
    }

    /// Loads `id` now if it is not on the device and room can be made without evicting
    /// anything acquired, kept resident, or (with a sequence) needed sooner than `id`.
    /// Returns whether `id` is on the device afterwards.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown id; errors of the copy.
    pub fn prefetch(&self, id: ParamId) -> Result<bool> {
        self.shared.live()?;
        let res = &self.shared.res;
        let mut st = self.shared.lock();
        param(&st, id)?;
        if st.params[id as usize].dev.is_some() || st.params[id as usize].size == 0 {
            return Ok(true);
        }
        let need = match st.ev.next_use(id) {
            Some(d) => Need::Prefetch(d),
            None => Need::Hint,
        };
        let loaded = load(res, &mut st, id, need)?;
        if loaded {
            st.stats.prefetches += 1;
        }
        Ok(loaded)
    }

    /// The runtime will need `id` soon: [`TierStore::prefetch`].
    ///
    /// # Errors
    /// As [`TierStore::prefetch`].
    pub fn will_need(&self, id: ParamId) -> Result<bool> {
        self.prefetch(id)
    }

    /// The runtime will not need `id` for a while: drops its device copy now (writing
    /// it back if dirty) unless it is acquired. Returns whether it was dropped.
    /// A parameter kept resident is dropped too: the hint is explicit.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown id; errors of the write-back.
    pub fn dont_need(&self, id: ParamId) -> Result<bool> {
        self.shared.live()?;
        let res = &self.shared.res;
        let mut st = self.shared.lock();
        let p = param(&st, id)?;
        if p.dev.is_none() || p.refs > 0 {
            return Ok(false);
        }
        let (block, uses) = evict(res, &mut st, id)?;
        release_block(res, block, &uses)?;
        drop(st);
        self.shared.released.notify_all();
        Ok(true)
    }

    /// Keeps `id` on the device once loaded (`true`) or lets it be evicted again.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown id.
    pub fn keep_resident(&self, id: ParamId, keep: bool) -> Result<()> {
        self.shared.live()?;
        let mut st = self.shared.lock();
        param(&st, id)?;
        if std::mem::replace(&mut st.params[id as usize].keep, keep) != keep {
            // The plan orders its evictions by this: it starts again.
            st.plan = None;
        }
        drop(st);
        if !keep {
            self.shared.released.notify_all();
        }
        Ok(())
    }

    /// Sets `id`'s eviction priority (default 0): the lowest priority among the
    /// candidates is evicted first; the policy chooses within it.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown id.
    pub fn priority(&self, id: ParamId, priority: i32) -> Result<()> {
        self.shared.live()?;
        let mut st = self.shared.lock();
        param(&st, id)?;
        if std::mem::replace(&mut st.params[id as usize].priority, priority) != priority {
            st.plan = None;
        }
        Ok(())
    }

    /// Where `id` is now.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown id.
    pub fn residency(&self, id: ParamId) -> Result<Residency> {
        self.shared.live()?;
        let st = self.shared.lock();
        let p = param(&st, id)?;
        Ok(match (&p.dev, &p.host) {
            // Empty: needs no memory, so it is on the device as much as anywhere.
            (None, _) if p.size == 0 => Residency::Device { refs: p.refs },
            (Some(d), _) => {
                if d.ready.is_done()? {
                    Residency::Device { refs: p.refs }
                } else {
                    Residency::Loading { refs: p.refs }
                }
            }
            (None, HostCopy::Pinned(_)) => Residency::Host,
            (None, HostCopy::Cold(_)) => Residency::Cold,
        })
    }

    /// Installs `order` as the execution sequence (one pass, ids may repeat), or with
    /// `None` drops the sequence and goes back to LRU (and to learning, in learn mode).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an id that is not registered.
    pub fn set_sequence(&self, order: Option<Vec<ParamId>>) -> Result<()> {
        self.shared.live()?;
        let mut st = self.shared.lock();
        if let Some(bad) = order
            .iter()
            .flatten()
            .find(|id| st.params.get(**id as usize).is_none())
        {
            return Err(Error::InvalidArgument(format!(
                "the sequence names parameter {bad}, but only {} are registered",
                st.params.len()
            )));
        }
        st.learner.reset();
        // An acquire waiting for room must not rewind the new sequence's cursor to where
        // the old one stood when it fails.
        st.acquires += 1;
        let ev = match order {
            Some(o) if !o.is_empty() => {
                // In learn mode a given sequence is followed until acquires leave it.
                st.learner.given(o.len());
                Eviction::new(Policy::Sequence(Sequence::new(o)))
            }
            _ => Eviction::new(Policy::Lru),
        };
        set_policy(&mut st, ev);
        Ok(())
    }

    /// The execution sequence in force (given or learnt), if any.
    pub fn sequence(&self) -> Option<Vec<ParamId>> {
        match self.shared.lock().ev.policy() {
            Policy::Sequence(s) => Some(s.order().to_vec()),
            Policy::Lru => None,
        }
    }

    /// Reads parameter `id`'s current bytes (from the device if it is resident there,
    /// after the work queued on the copy stream and by finished guards; else from its
    /// host copy). Synchronous: for tests and checks.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown id; copy errors.
    pub fn read(&self, id: ParamId) -> Result<Vec<u8>> {
        self.shared.live()?;
        let st = self.shared.lock();
        let p = param(&st, id)?;
        let mut out = vec![0u8; p.size];
        match &p.dev {
            Some(d) => {
                d.ready.synchronize()?;
                for e in &p.uses {
                    e.synchronize()?;
                }
                d.block.read(0, &mut out)?;
            }
            None => out.copy_from_slice(host_bytes(&p.host, p.size)?),
        }
        Ok(out)
    }

    /// What the store has done, and its memory now.
    pub fn stats(&self) -> TierStats {
        let st = self.shared.lock();
        let mut s = st.stats;
        s.bytes_ahead = st.ahead.iter().map(|(_, b)| *b as u64).sum();
        s.mapped_bytes = st
            .params
            .iter()
            .filter_map(|p| match &p.host {
                HostCopy::Cold(src) if src.is_mapped() => Some(p.size),
                _ => None,
            })
            .sum();
        s
    }

    /// The statistics of the store's own device pool: how often it had to map or unmap
    /// pages, or synchronise streams to give pages back (`num_sync_all_streams`), which
    /// parameters of mixed sizes can make it do between passes.
    pub fn pool_stats(&self) -> PoolStats {
        self.shared.res.pool.stats()
    }
}

impl ParamGuard {
    /// The parameter.
    pub fn id(&self) -> ParamId {
        self.id
    }

    /// The device address; null (0) for an empty parameter, which has no memory.
    pub fn ptr(&self) -> DevicePtr {
        self.block().map_or(DevicePtr(0), |b| b.ptr())
    }

    /// The parameter's size in bytes.
    pub fn len(&self) -> usize {
        self.size
    }

    /// Whether the parameter is empty (a zero-element tensor of a file: see
    /// [`TierStore::register_safetensors`]).
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The device block (for synchronous reads and writes in tests and set-up); `None`
    /// for an empty parameter. It may be longer than the parameter: large ones take
    /// whole pages.
    pub fn block(&self) -> Option<&PoolBlock> {
        self.block.as_deref()
    }

    /// The stream the guard was acquired for (for a wrapped per-thread default stream,
    /// the acquiring thread's, usable on that thread only).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Says the device copy will be written by work queued on the guard's stream after
    /// this call: it is copied back to the host before it is dropped, and acquires made
    /// after this guard is dropped (on any stream) wait for the write.
    ///
    /// The guard's stream is ordered after the uses of the parameter that have ended
    /// (guards dropped, on any stream), so the write does not overtake them. Uses that
    /// are still going on (live guards on other streams) are the caller's to order. On
    /// a capturing stream the host waits for those uses instead (the stream may not
    /// wait for events recorded outside the capture).
    pub fn mark_dirty(&mut self) {
        // An empty parameter has no bytes to write; a forked child must not touch the
        // driver or the store's lock (a thread of the parent may have held it).
        if self.dirty || self.size == 0 || self.shared.live().is_err() {
            return;
        }
        self.dirty = true;
        let st = self.shared.lock();
        if self.stream.is_capturing().unwrap_or(false) {
            for e in &st.params[self.id as usize].uses {
                if let Err(err) = e.synchronize() {
                    tracing::error!(target: "hetmem", id = self.id, error = %err,
                        "cannot wait for an earlier use before a captured write");
                }
            }
            return;
        }
        for e in &st.params[self.id as usize].uses {
            if let Err(err) = self.stream.wait(e) {
                // Wait on the host instead: the write must not start before the read.
                tracing::error!(target: "hetmem", id = self.id, error = %err,
                    "cannot order a write after earlier uses on the device; waiting");
                if let Err(err) = e.synchronize() {
                    tracing::error!(target: "hetmem", id = self.id, error = %err,
                        "cannot wait for an earlier use either");
                }
            }
        }
    }

    /// [`Error::Forked`] in a forked child (see [`TierStore::check_fork`]).
    pub(crate) fn check_fork(&self) -> Result<()> {
        self.shared.live()
    }

    /// Ends the use (the same as dropping the guard).
    pub fn release(self) {}
}

impl Drop for ParamGuard {
    fn drop(&mut self) {
        if self.shared.live().is_err() {
            // A forked child: no driver call, no lock; the block and stream leak.
            return;
        }
        if self.size == 0 {
            // An empty parameter: no memory whose reuse must wait for the use.
            let mut st = self.shared.lock();
            let p = &mut st.params[self.id as usize];
            p.refs = p.refs.saturating_sub(1);
            drop(st);
            self.shared.released.notify_all();
            return;
        }
        // (An error: the usual path, which synchronises where it cannot record.)
        if self.stream.is_capturing().unwrap_or(false) {
            // The use is work of the graph, which runs at replays, not now: no event
            // to record (a captured one could be neither queried nor waited for).
            self.block = None;
            let mut st = self.shared.lock();
            let p = &mut st.params[self.id as usize];
            p.refs = p.refs.saturating_sub(1);
            p.dirty |= self.dirty;
            drop(st);
            self.shared.released.notify_all();
            return;
        }
        // A write's end is kept apart too: later acquires wait for it.
        let written = if self.dirty {
            self.stream.record().ok()
        } else {
            None
        };
        let done = match self.stream.record() {
            Ok(e) => Some(e),
            Err(e) => {
                // No event: wait for the work instead, so the memory is never reused
                // under it.
                tracing::error!(target: "hetmem", id = self.id, error = %e,
                    "cannot record the end of a parameter's use; synchronising");
                if let Err(e) = self.stream.synchronize() {
                    tracing::error!(target: "hetmem", id = self.id, error = %e,
                        "cannot synchronise the stream either");
                }
                None
            }
        };
        // Let go of the block first, so that the pump below can reuse it.
        self.block = None;
        let mut st = self.shared.lock();
        let p = &mut st.params[self.id as usize];
        p.refs = p.refs.saturating_sub(1);
        p.dirty |= self.dirty;
        if self.dirty {
            if written.is_none() && done.is_some() {
                // No event for the write's end: wait for it here, so that no later
                // reader can overtake it.
                if let Err(e) = self.stream.synchronize() {
                    tracing::error!(target: "hetmem", id = self.id, error = %e,
                        "cannot wait for a write's end");
                }
            }
            // Without an event the stream was synchronised: nothing to wait for.
            p.written = written.filter(|_| done.is_some());
        }
        if let Some(e) = done {
            if p.uses.len() >= 4 {
                p.uses.retain(|e| !e.is_done().unwrap_or(false));
            }
            p.uses.push(e);
        }
        st.last_released = Some(self.id);
        // The end of this use may free the memory the next load of the plan waits for.
        if let Err(e) = pump(&self.shared.res, &mut st, self.shared.res.prefetch_depth) {
            tracing::warn!(target: "hetmem", error = %e, "prefetch failed");
        }
        drop(st);
        self.shared.released.notify_all();
    }
}

/// The profiler's acquire event: a miss, a hit whose load is done, or one still in
/// flight (a late prefetch).
fn prof_acquire(st: &State, id: ParamId, hit: bool) -> crate::record::EventKind {
    use crate::record::acquire;
    let p = &st.params[id as usize];
    let outcome = if !hit {
        acquire::MISS
    } else if p
        .dev
        .as_ref()
        .is_some_and(|d| !d.ready.is_done().unwrap_or(true))
    {
        acquire::LATE
    } else {
        acquire::HIT
    };
    crate::record::EventKind::Acquire {
        id: u64::from(id),
        bytes: p.size as u64,
        outcome,
    }
}

/// The profiler's budget events of a store: device and pinned host.
fn prof_budgets(cfg: &TierConfig) {
    use crate::record::{EventKind, Placement as P};
    crate::profile::emit(|| EventKind::Budget {
        placement: P::Device,
        index: Some(cfg.device as u32),
        bytes: cfg.device_budget as u64,
    });
    crate::profile::emit(|| EventKind::Budget {
        placement: P::Pinned,
        index: None,
        bytes: cfg.host_budget as u64,
    });
}

fn param(st: &State, id: ParamId) -> Result<&Param> {
    st.params.get(id as usize).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "no parameter with id {id} ({} registered)",
            st.params.len()
        ))
    })
}

fn host_bytes(host: &HostCopy, size: usize) -> Result<&[u8]> {
    Ok(match host {
        HostCopy::Cold(src) => src.bytes(),
        HostCopy::Pinned(b) => &b.as_slice()?[..size],
    })
}

/// Sequence learning (Learn mode): record the acquire of `id`, install a sequence
/// learnt, or drop one the acquire left ([`crate::tier::learn`]). Returns the token that
/// takes the record back if the acquire fails.
fn note_use(res: &Resources, st: &mut State, id: ParamId) -> Option<Token> {
    if !res.learn {
        return None;
    }
    let in_force = matches!(st.ev.policy(), Policy::Sequence(_));
    let following = in_force && st.ev.next_use(id) == Some(1);
    let (learnt, token) = st.learner.observe(id, following, st.params.len());
    match learnt {
        Learnt::Same => {}
        Learnt::Install { order, pos } => {
            tracing::info!(target: "hetmem", steps = order.len(), "execution sequence learnt");
            set_policy(
                st,
                Eviction::at(Policy::Sequence(Sequence::new(order)), pos),
            );
            st.stats.sequences_learnt += 1;
        }
        Learnt::Drop => {
            tracing::info!(target: "hetmem", id, "acquire left the learnt sequence; learning again");
            set_policy(st, Eviction::new(Policy::Lru));
            st.stats.sequences_dropped += 1;
        }
    }
    token
}

/// Puts `ev` in force; the plan starts again from what is on the device.
fn set_policy(st: &mut State, ev: Eviction) {
    st.step = ev.pos() as u64;
    st.ev = ev;
    st.plan = None;
    st.fixed.clear();
    st.ahead.clear();
    st.served = false;
}

/// Why a load is made: it decides what may be evicted for it.
#[derive(Debug, Clone, Copy)]
enum Need {
    /// An acquire: anything not acquired or kept, preferring not the last released.
    Demand,
    /// Needed in this many steps: only what is needed later (or never) may go.
    Prefetch(usize),
    /// A hint with no sequence: as a demand load.
    Hint,
}

/// Whether resident `i` may be evicted to load `exclude` for `need`.
fn evictable(st: &State, i: ParamId, exclude: ParamId, need: Need) -> bool {
    let p = &st.params[i as usize];
    p.refs == 0
        && !p.keep
        && i != exclude
        && match need {
            Need::Prefetch(k) => st.ev.next_use(i).is_none_or(|d| d > k),
            Need::Demand | Need::Hint => true,
        }
}

fn pick_victim(st: &State, exclude: ParamId, need: Need) -> Option<ParamId> {
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
    let fixed = |c: &ParamId| st.fixed.get(*c as usize).copied().unwrap_or(false);
    if cands.iter().any(|c| !fixed(c)) {
        cands.retain(|c| !fixed(c));
    }
    st.ev.victim(cands)
}

/// Drops `id`'s device copy (writing it back first if dirty). Returns the block (if no
/// guard still holds it) and the events its last uses left, for reuse.
fn evict(res: &Resources, st: &mut State, id: ParamId) -> Result<(Option<PoolBlock>, Vec<Event>)> {
    let idx = id as usize;
    if st.params[idx].dirty {
        write_back(res, st, id)?;
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
    st.ev.forget(id);
    if let Some(plan) = &mut st.plan {
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
fn evict_into_spare(
    res: &Resources,
    st: &mut State,
    id: ParamId,
    size: usize,
    spare: &mut Option<(PoolBlock, Vec<Event>)>,
) -> Result<()> {
    let (block, uses) = evict(res, st, id)?;
    match block {
        Some(b) if spare.is_none() && b.len() == device_bytes(size) => {
            *spare = Some((b, uses));
            Ok(())
        }
        other => release_block(res, other, &uses),
    }
}

/// Gives an evicted parameter's block back to the pool, after making the copy stream
/// (the block's stream in the pool) wait for the parameter's last uses: the pool reuses
/// it on that stream at once, or hands it to another behind an event recorded there.
fn release_block(res: &Resources, block: Option<PoolBlock>, uses: &[Event]) -> Result<()> {
    let Some(block) = block else {
        return Ok(());
    };
    if let Err(e) = order_after(res, uses) {
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
fn order_after(res: &Resources, uses: &[Event]) -> Result<()> {
    for e in uses {
        if let Err(err) = res.copy.wait(e) {
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
fn write_back(res: &Resources, st: &mut State, id: ParamId) -> Result<()> {
    let idx = id as usize;
    let size = st.params[idx].size;
    for e in &st.params[idx].uses {
        res.copy.wait(e)?;
    }
    // A cold parameter moves to the pinned tier if there is room: one copy, and the
    // next load is direct.
    let promoted = if matches!(st.params[idx].host, HostCopy::Cold(_))
        && st.pinned + pinned_bytes(size) <= res.pinned_cap
    {
        res.host
            .alloc_pinned(&NumaPolicy::NearDevice(res.device), size)
            .ok()
    } else {
        None
    };
    let t0 = prof::copy_start(&res.copy);
    let p = &mut st.params[idx];
    let dev = p.dev.as_ref().expect("writing back a resident parameter");
    let d2h = |dst: &HostBlock| -> Result<()> {
        pool::copy::block_to_host(dst, 0, &dev.block, 0, size, &res.copy)?;
        res.copy.synchronize()
    };
    match (&mut p.host, promoted) {
        (host, Some(b)) => {
            d2h(&b)?;
            let cap = b.capacity();
            *host = HostCopy::Pinned(b);
            st.pinned += cap;
            note_host(res, st);
        }
        (HostCopy::Pinned(b), None) => d2h(b)?,
        (HostCopy::Cold(src), None) => {
            res.copy.synchronize()?;
            let mut bytes = vec![0u8; size];
            dev.block.read(0, &mut bytes)?;
            *src = Source::Host(bytes.into());
        }
    }
    let p = &mut st.params[idx];
    if res.checksums {
        p.checksum = Some(fnv1a(host_bytes(&p.host, size)?));
    }
    p.dirty = false;
    st.stats.writebacks += 1;
    st.stats.writeback_bytes += size as u64;
    prof::copied(&res.copy, id, size, t0, None, None);
    tracing::debug!(target: "hetmem", id, size, "written back");
    Ok(())
}

fn note_host(res: &Resources, st: &mut State) {
    st.stats.host_bytes = st.pinned + res.ring_bytes;
    st.stats.host_peak_bytes = st.stats.host_peak_bytes.max(st.stats.host_bytes);
}

/// Makes room for `id` (as `need` allows) and queues its load, outside the plan.
/// Returns false, with nothing changed but possibly some evictions, when no room could
/// be made.
fn load(res: &Resources, st: &mut State, id: ParamId, need: Need) -> Result<bool> {
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
    if (st.used - evictable.min(st.used)).saturating_add(dsize) > res.device_budget {
        return Ok(false);
    }
    let mut spare: Option<(PoolBlock, Vec<Event>)> = None;
    while st.used + dsize > res.device_budget {
        let Some(v) = pick_victim(st, id, need) else {
            return Ok(false);
        };
        evict_into_spare(res, st, v, size, &mut spare)?;
    }
    // Residency changed behind the plan's back: it starts again from what is resident.
    st.plan = None;
    place(res, st, id, need, spare)?;
    Ok(true)
}

/// Runs the plan (sequence policy) until it has seen `lookahead` steps past the
/// runtime's step (none while the runtime is off the sequence), queueing the loads it
/// calls for, or until a load finds no room. Returns whether it reached the runtime's
/// step; false under LRU.
fn pump(res: &Resources, st: &mut State, lookahead: usize) -> Result<bool> {
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
fn belady_cap(res: &Resources, st: &mut State, seq: &Sequence) -> usize {
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
fn simulated_bytes(st: &State, seq: &Sequence, cap: usize, above: Option<usize>) -> u64 {
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

/// What the plan needs to know of a parameter.
fn traits(st: &State, id: ParamId) -> Traits {
    let p = &st.params[id as usize];
    Traits {
        bytes: device_bytes(p.size),
        kept: p.keep || st.fixed.get(id as usize).copied().unwrap_or(false),
        priority: p.priority,
    }
}

/// The static planner's fixed set ([`crate::tier::plan::fixed_set`]) for `seq`, into
/// `st.fixed`: from the parameters the sequence uses and the caller does not keep, in
/// the budget less what the caller keeps (on the device now or used by the sequence).
/// Returns the logical cache's capacity: those kept bytes and the fixed set's.
fn choose_fixed(res: &Resources, st: &mut State, seq: &Sequence) -> usize {
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
fn plan_load(
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
fn place(
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
    let t0 = prof::copy_start(&res.copy);
    let staged = matches!(st.params[idx].host, HostCopy::Cold(_));
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
    if crate::profile::enabled() {
        let ahead = match need {
            Need::Prefetch(a) => Some(a),
            Need::Demand | Need::Hint => None,
        };
        let ready = st.params[idx].dev.as_ref().map(|d| &d.ready);
        let flags = prof::load_flags(ahead, staged);
        prof::copied(&res.copy, id, size, t0, ready, Some(flags));
    }
    Ok(())
}

/// The error for parameter `id` whose host copy no longer matches its checksum.
fn host_mismatch(st: &State, id: ParamId, expected: u64, found: u64) -> Error {
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
fn upload(res: &Resources, st: &mut State, idx: usize, block: &PoolBlock) -> Result<Event> {
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
