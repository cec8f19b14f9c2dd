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
//!   copied once into a pinned [`HostBlock`](crate::pool::HostBlock) if the host budget has room. From then on
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
//! ([`Residency`]). Cursor, write-back included, completes under the lock, so an
//! "evicting" state is never observable. The lock is held while waiting on the GPU
//! only on slow paths: the staging ring on cold loads, the write-back of dirty
//! parameters, and checksum verification.
//!
//! # Cursor
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

mod evict;
mod guard;
mod run;
mod state;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, Result};
use crate::placement::{MemKind, NumaPolicy};
use crate::pool::{
    Budget, DevicePool, HostPool, HostPoolConfig, PoolBlock, PoolConfig, PoolStats, StagingRing,
};
use crate::stream::Stream;
use crate::tier::config::{Residency, SequenceHint, TierConfig, TierStats};
use crate::tier::learn::Learner;
use crate::tier::policy::{Cursor, ParamId, Policy, Sequence};
use crate::tier::source::{SafetensorsFile, Source};
use evict::{evict, load, release_block, Need};
use state::*;

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
        let cursor = match &cfg.sequence {
            SequenceHint::Given(order) if !order.is_empty() => {
                Cursor::new(Policy::Sequence(Sequence::new(order.clone())))
            }
            _ => Cursor::new(Policy::Lru),
        };
        let step = cursor.pos() as u64;
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
                setup: Setup {
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
                    cursor,
                    learner: Learner::default(),
                    acquires: 0,
                    last_released: None,
                    progress: Progress {
                        step,
                        ..Progress::default()
                    },
                    resident: Vec::new(),
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
        let setup = &self.shared.setup;
        for (_, source) in &params {
            let need = device_bytes(source.len());
            if need > setup.device_budget {
                return Err(Error::oom(
                    MemKind::Device(setup.device),
                    need,
                    setup.device_budget,
                ));
            }
        }
        // Outside the lock: hashing reads every byte.
        let checksums: Vec<Option<u64>> = params
            .iter()
            .map(|(_, source)| setup.checksums.then(|| fnv1a(source.bytes())))
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
        st.progress.plan = None;
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
        &self.shared.setup.copy
    }

    /// Loads `id` now if it is not on the device and room can be made without evicting
    /// anything acquired, kept resident, or (with a sequence) needed sooner than `id`.
    /// Returns whether `id` is on the device afterwards.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown id; errors of the copy.
    pub fn prefetch(&self, id: ParamId) -> Result<bool> {
        self.shared.live()?;
        let setup = &self.shared.setup;
        let mut st = self.shared.lock();
        param(&st, id)?;
        if st.params[id as usize].dev.is_some() || st.params[id as usize].size == 0 {
            return Ok(true);
        }
        let need = match st.cursor.next_use(id) {
            Some(d) => Need::Prefetch(d),
            None => Need::Hint,
        };
        let loaded = load(setup, &mut st, id, need)?;
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
        let setup = &self.shared.setup;
        let mut st = self.shared.lock();
        let p = param(&st, id)?;
        if p.dev.is_none() || p.refs > 0 {
            return Ok(false);
        }
        let (block, uses) = evict(setup, &mut st, id)?;
        release_block(setup, block, &uses)?;
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
            st.progress.plan = None;
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
            st.progress.plan = None;
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
        let cursor = match order {
            Some(o) if !o.is_empty() => {
                // In learn mode a given sequence is followed until acquires leave it.
                st.learner.given(o.len());
                Cursor::new(Policy::Sequence(Sequence::new(o)))
            }
            _ => Cursor::new(Policy::Lru),
        };
        set_policy(&mut st, cursor);
        Ok(())
    }

    /// The execution sequence in force (given or learnt), if any.
    pub fn sequence(&self) -> Option<Vec<ParamId>> {
        match self.shared.lock().cursor.policy() {
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
        s.bytes_ahead = st.progress.ahead.iter().map(|(_, b)| *b as u64).sum();
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
        self.shared.setup.pool.stats()
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
