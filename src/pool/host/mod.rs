//! The host memory pool: NUMA-placed pageable and pinned host memory, kept between
//! allocations so that a freed pinned block is reused instead of pinned again.
//!
//! Pinning is the expensive part of host memory: registering 1 GiB with CUDA took
//! 102 ms on the H200 host (and `cudaHostAlloc` 587 ms, DESIGN.md), against well under
//! a microsecond for taking a cached block. So:
//!
//! - **Placement first.** Every region is mapped, advised for transparent huge pages
//!   (regions of 2 MiB and more), bound to its NUMA node(s) with `mbind`, and
//!   pre-faulted before it is registered: pinned pages cannot migrate, so they must be
//!   on the right node before the driver locks them. `NearDevice(d)` is resolved by the
//!   [`Manager`](crate::Manager) to device `d`'s node.
//! - **Large regions in parallel.** Regions of at least
//!   [`HostPoolConfig::parallel_threshold`] (1 GiB) are pre-faulted by
//!   [`HostPoolConfig::threads`] threads, each populating its own part, and registered
//!   in one piece per thread (each its own registration, made concurrently), but no
//!   piece smaller than [`HostPoolConfig::min_register_chunk`] (256 MiB) or larger than
//!   64 GiB (one registration of 512 GiB or more fails on CUDA). Few, large pieces keep
//!   the registrations few. A driver refuses a copy whose host range runs from one
//!   registration into the next, so the CUDA and ROCm backends cut such copies at the
//!   edge (`src/backend/registered.rs`). Smaller regions are one registration from the
//!   calling thread.
//! - **Size classes.** Requests are rounded up to a class and cached per (pinned or
//!   pageable, resolved NUMA policy, class); see [`size_class`] for the choice.
//! - **Limits.** A budget caps the bytes each kind (pinned, pageable) holds, live and cached together.
//!   An allocation that would pass it first evicts cached blocks (when that is enough),
//!   then fails with [`Error::OutOfMemory`] `{ tier, requested, free, reserved,
//!   largest_free_block }`. [`HostPool::trim`] gives every cached block back.
//! - **Copies in flight.** A freed block may still be the source or target of an
//!   asynchronous copy: the block's memory carries the copy's fence, and a cached block
//!   is handed out again only after those fences have passed. Evicted blocks wait for
//!   them before they are unregistered and unmapped.
//!
//! [`PinnedAllocator`] puts the pool behind `allocator_api2::alloc::Allocator`, so that
//! `allocator_api2::vec::Vec<T, PinnedAllocator>` lives in pinned memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::owned::{MemoryKind, OwnedMemory, SharedBackend};
use crate::error::{Error, Result};
use crate::host_mem::{page_size, HostRegion, HUGE_PAGE_SIZE};
use crate::placement::{MemKind, NumaPolicy, Placement};
use crate::pool::stats::Stat;

mod allocator;
mod block;
use block::profile_placement;

pub use allocator::PinnedAllocator;
pub use block::HostBlock;

/// Default [`HostPoolConfig::parallel_threshold`]: regions from 1 GiB up are populated
/// and registered by several threads.
pub const PARALLEL_THRESHOLD: usize = 1 << 30;

/// Default [`HostPoolConfig::min_register_chunk`]: with threads, no registration piece
/// is smaller than 256 MiB (a 1 GiB region is four pieces, registered by four threads).
pub const MIN_REGISTER_CHUNK: usize = 256 << 20;

/// A cached block of a larger class may serve a request when it is at most this
/// fraction (1/`REUSE_SLACK_DIV`) larger than the request's class: re-pinning costs far
/// more than the few megabytes of slack.
const REUSE_SLACK_DIV: usize = 8;

/// Resolves a host placement's policy (`NearDevice` to a node) and, given `Some(size)`,
/// checks that the nodes exist and have room for `size` bytes; the
/// [`Manager`](crate::Manager) provides it (placement is its business, not the pool's).
/// A cache hit needs only the resolution (its memory exists already, on valid nodes);
/// the checks, which may read `/proc/meminfo`, run for new regions only.
pub(crate) type Placer = Arc<dyn Fn(&Placement, Option<usize>) -> Result<NumaPolicy> + Send + Sync>;

/// The class a request of `size` bytes is rounded up to.
///
/// - Below 2 MiB: the next power of two, at least one page. Small blocks then fall into
///   a handful of classes (4 KiB … 1 MiB: nine), so a freed block almost always fits the
///   next request of about that size; the waste (under half the block) is at most 1 MiB.
/// - From 2 MiB: the next multiple of 2 MiB (the huge page). Every block is whole huge
///   pages, so transparent huge pages back all of it, and the waste is under 2 MiB:
///   under 0.2 % of a 1 GiB block, where powers of two would lose up to half of it —
///   pinned memory is locked RAM under a budget, and that loss would be real. Reuse
///   across nearby sizes comes instead from taking a cached block up to 1/8 larger than
///   the class (see the module docs).
///
/// `None` when the class would overflow.
pub fn size_class(size: usize) -> Option<usize> {
    if size >= HUGE_PAGE_SIZE {
        size.checked_next_multiple_of(HUGE_PAGE_SIZE)
    } else {
        Some(size.max(1).next_power_of_two().max(page_size()))
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8)
}

/// Settings of a [`HostPool`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPoolConfig {
    /// Most bytes of pinned memory the pool holds, live and cached together; `None`:
    /// no limit of the pool's own (the backend's and the kernel's still apply).
    pub pinned_budget: Option<usize>,
    /// The same for pageable memory.
    pub host_budget: Option<usize>,
    /// Threads that populate and register a region of at least `parallel_threshold`
    /// bytes. Default: the available parallelism, at most 8.
    pub threads: usize,
    /// Regions of at least this many bytes use `threads` threads. Default 1 GiB.
    pub parallel_threshold: usize,
    /// The smallest piece a region is registered in when threads are used: a region is
    /// cut into one piece per thread, but no piece is smaller than this (nor larger than
    /// 64 GiB). Default 256 MiB.
    pub min_register_chunk: usize,
}

impl Default for HostPoolConfig {
    fn default() -> Self {
        HostPoolConfig {
            pinned_budget: None,
            host_budget: None,
            threads: default_threads(),
            parallel_threshold: PARALLEL_THRESHOLD,
            min_register_chunk: MIN_REGISTER_CHUNK,
        }
    }
}

/// What a [`HostPool`] counts for one kind of memory (pinned or pageable).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostKindStats {
    /// Bytes in blocks handed out (class sizes).
    pub live_bytes: Stat,
    /// Bytes in cached blocks, ready for reuse.
    pub cached_bytes: Stat,
    /// Live plus cached: what the pool holds from the system.
    pub held_bytes: Stat,
    /// Blocks handed out.
    pub live_blocks: Stat,
    /// Requests served by a cached block.
    pub hits: u64,
    /// Requests that needed a new region.
    pub misses: u64,
    /// Regions mapped (and, for pinned memory, registered).
    pub regions_created: u64,
    /// Regions given back (by `trim`, eviction under the budget, or the pool's end).
    pub regions_released: u64,
    /// Registrations made with the backend (pieces: a region registered in 1 GiB
    /// pieces counts one per piece). Always 0 for pageable memory.
    pub registrations: u64,
    /// Allocations that failed with `OutOfMemory`.
    pub num_ooms: u64,
    /// Bytes never to be used again: blocks a copy may still use that could not be
    /// fenced (rare; a driver failure). Still held: `held_bytes` is live, cached and
    /// these, and they count against the budget.
    pub leaked_bytes: u64,
}

/// Everything a [`HostPool`] counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostPoolStats {
    /// Pinned (registered) memory.
    pub pinned: HostKindStats,
    /// Pageable memory.
    pub pageable: HostKindStats,
}

impl HostPoolStats {
    /// Starts peak tracking again from the current values.
    pub fn reset_peak(&mut self) {
        self.pinned.reset_kind_peak();
        self.pageable.reset_kind_peak();
    }
}

/// Cache key: (pinned, resolved policy).
type Key = (bool, NumaPolicy);

#[derive(Debug, Default)]
struct KindState {
    live: usize,
    cached: usize,
    /// Bytes of regions being created now (outside the lock), already counted against
    /// the budget.
    pending: usize,
    /// Bytes of blocks that can never be used again (see `HostKindStats::leaked_bytes`).
    leaked: usize,
    stats: HostKindStats,
}

impl KindState {
    fn held(&self) -> usize {
        self.live + self.cached + self.pending + self.leaked
    }
}

#[derive(Debug, Default)]
struct State {
    cache: HashMap<Key, BTreeMap<usize, Vec<OwnedMemory>>>,
    pinned: KindState,
    pageable: KindState,
}

impl State {
    fn kind(&mut self, pinned: bool) -> &mut KindState {
        if pinned {
            &mut self.pinned
        } else {
            &mut self.pageable
        }
    }

    /// Takes a cached block of class `class` (or up to 1/8 larger) for `key`.
    fn take_cached(&mut self, key: &Key, class: usize) -> Option<(usize, OwnedMemory)> {
        let classes = self.cache.get_mut(key)?;
        let max = class.saturating_add(class / REUSE_SLACK_DIV);
        let (&found, list) = classes.range_mut(class..=max).next()?;
        let mem = list.pop().expect("empty class lists are removed");
        if list.is_empty() {
            classes.remove(&found);
        }
        Some((found, mem))
    }

    /// Takes cached blocks of one kind, largest first, until `want` bytes are taken
    /// (`usize::MAX`: all). The caller drops them outside the lock.
    fn evict(&mut self, pinned: bool, want: usize) -> Vec<OwnedMemory> {
        let mut out = Vec::new();
        let mut taken = 0usize;
        while taken < want {
            let largest = self
                .cache
                .iter()
                .filter(|(k, _)| k.0 == pinned)
                .filter_map(|(k, c)| c.keys().next_back().map(|&cl| (cl, k.clone())))
                .max_by_key(|(cl, _)| *cl);
            let Some((class, key)) = largest else { break };
            let classes = self.cache.get_mut(&key).expect("found above");
            let list = classes.get_mut(&class).expect("found above");
            out.push(list.pop().expect("empty class lists are removed"));
            if list.is_empty() {
                classes.remove(&class);
                if classes.is_empty() {
                    self.cache.remove(&key);
                }
            }
            taken += class;
            let t = self.kind(pinned);
            t.cached -= class;
            t.stats.cached_bytes.sub(class as u64);
            t.stats.held_bytes.sub(class as u64);
            t.stats.regions_released += 1;
        }
        out
    }

    fn largest_cached(&self, key: &Key) -> usize {
        self.cache
            .get(key)
            .and_then(|c| c.keys().next_back().copied())
            .unwrap_or(0)
    }
}

#[derive(Debug)]
struct Shared {
    backend: SharedBackend,
    cfg: HostPoolConfig,
    state: Mutex<State>,
}

/// A caching pool of NUMA-placed host memory, pageable and pinned; see the
/// [module docs](self). Cheap to clone; clones share the pool. Made by
/// [`Manager::host_pool`](crate::Manager::host_pool).
///
/// ```
/// use hetmem::{BackendKind, Manager, NumaPolicy};
/// use hetmem::pool::HostPoolConfig;
/// let mgr = Manager::builder().backend(BackendKind::Sim).build()?;
/// let pool = mgr.host_pool(HostPoolConfig::default())?;
/// let a = pool.alloc_pinned(&NumaPolicy::NearDevice(0), 4 << 20)?;
/// let addr = a.as_ptr();
/// drop(a);                                        // cached, still registered
/// let b = pool.alloc_pinned(&NumaPolicy::NearDevice(0), 4 << 20)?;
/// assert_eq!(b.as_ptr(), addr);                   // no second registration
/// assert_eq!(pool.stats().pinned.registrations, 1);
/// # Ok::<(), hetmem::Error>(())
/// ```
#[derive(Clone)]
pub struct HostPool {
    shared: Arc<Shared>,
    placer: Placer,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("cfg", &self.shared.cfg)
            .finish_non_exhaustive()
    }
}

impl HostPool {
    pub(crate) fn new(
        backend: &SharedBackend,
        cfg: HostPoolConfig,
        placer: Placer,
    ) -> Result<Self> {
        for (name, b) in [
            ("pinned_budget", cfg.pinned_budget),
            ("host_budget", cfg.host_budget),
        ] {
            if b == Some(0) {
                return Err(Error::InvalidArgument(format!(
                    "host pool {name} must be positive (None for no limit)"
                )));
            }
        }
        if cfg.threads == 0 || cfg.min_register_chunk == 0 || cfg.parallel_threshold == 0 {
            return Err(Error::InvalidArgument(
                "host pool threads, min_register_chunk and parallel_threshold must be positive"
                    .into(),
            ));
        }
        tracing::debug!(target: "hetmem", ?cfg, "host pool");
        for (placement, b) in [
            (crate::record::Placement::Pinned, cfg.pinned_budget),
            (crate::record::Placement::Host, cfg.host_budget),
        ] {
            if let Some(bytes) = b {
                crate::profile::emit(|| crate::record::EventKind::Budget {
                    placement,
                    index: None,
                    bytes: bytes as u64,
                });
            }
        }
        Ok(HostPool {
            shared: Arc::new(Shared {
                backend: backend.clone(),
                cfg,
                state: Mutex::new(State::default()),
            }),
            placer,
        })
    }

    /// The settings.
    pub fn config(&self) -> &HostPoolConfig {
        &self.shared.cfg
    }

    /// Pinned memory placed by `policy`.
    pub fn alloc_pinned(&self, policy: &NumaPolicy, size: usize) -> Result<HostBlock> {
        self.alloc(&Placement::Pinned(policy.clone()), size)
    }

    /// Pageable memory placed by `policy`.
    pub fn alloc_host(&self, policy: &NumaPolicy, size: usize) -> Result<HostBlock> {
        self.alloc(&Placement::Host(policy.clone()), size)
    }

    /// `size` bytes of [`Placement::Host`] or [`Placement::Pinned`] memory: a cached
    /// block of the same (kind, resolved policy, class) when there is one, else a new
    /// region. The bytes of a new block are zero; a reused one holds what its last
    /// user left.
    ///
    /// Errors: [`Error::InvalidArgument`] for device or managed placements;
    /// [`Error::InvalidSize`] for 0 or sizes no mapping can have; the node errors of
    /// [`Manager::alloc`](crate::Manager::alloc); [`Error::OutOfMemory`] with the tier
    /// when the budget (with cached blocks evicted) or the system has no room.
    pub fn alloc(&self, placement: &Placement, size: usize) -> Result<HostBlock> {
        // Before the lock: in a forked child a thread of the parent may have held it.
        self.shared.backend.check_fork()?;
        let pinned = match placement {
            Placement::Pinned(_) => true,
            Placement::Host(_) => false,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "the host pool allocates host and pinned memory, not {other:?}"
                )))
            }
        };
        if size == 0 || size > isize::MAX as usize {
            return Err(Error::InvalidSize {
                requested: size,
                reason: if size == 0 {
                    "zero-byte allocations are refused"
                } else {
                    "larger than isize::MAX"
                },
            });
        }
        let class = size_class(size)
            .filter(|c| *c <= isize::MAX as usize)
            .ok_or(Error::InvalidSize {
                requested: size,
                reason: "overflows when rounded up to a size class",
            })?;
        let policy = (self.placer)(placement, None)?;
        let key: Key = (pinned, policy);
        let sh = &self.shared;
        let tier = placement.kind();

        let mut st = sh.lock();
        if let Some((found, mem)) = st.take_cached(&key, class) {
            let t = st.kind(pinned);
            t.cached -= found;
            t.live += found;
            t.stats.cached_bytes.sub(found as u64);
            t.stats.live_bytes.add(found as u64);
            t.stats.live_blocks.add(1);
            t.stats.hits += 1;
            drop(st);
            // The block may have been freed with a copy still in flight.
            let block = self.block(key, found, size, mem);
            block.mem().wait_fences()?;
            return Ok(block);
        }
        drop(st);
        // A new region: check the nodes and the room for it first.
        (self.placer)(placement, Some(class))?;
        let mut st = sh.lock();
        st.kind(pinned).stats.misses += 1;
        let mut evicted = Vec::new();
        let mut retried = false;
        loop {
            // Room under the budget: evict cached blocks of this kind when that makes
            // enough; fail otherwise, leaving the cache as it is.
            let budget = sh.budget(pinned);
            let t = st.kind(pinned);
            if let Some(budget) = budget {
                let held = t.held();
                if held.saturating_add(class) > budget {
                    let without_cache = t.live + t.pending + t.leaked;
                    if without_cache.saturating_add(class) <= budget {
                        let want = held + class - budget;
                        evicted.extend(st.evict(pinned, want));
                    } else {
                        t.stats.num_ooms += 1;
                        let err = Error::OutOfMemory {
                            kind: tier,
                            requested: size,
                            free: budget.saturating_sub(held),
                            reserved: Some(held),
                            largest_free_block: Some(st.largest_cached(&key)),
                        };
                        drop(st);
                        drop(evicted);
                        return Err(err);
                    }
                }
            }
            st.kind(pinned).pending += class;
            drop(st);
            // Evicted blocks are unregistered and unmapped before new memory is made.
            drop(std::mem::take(&mut evicted));
            let made = sh.create(&key.1, pinned, class, tier);
            st = sh.lock();
            let t = st.kind(pinned);
            t.pending -= class;
            match made {
                Ok(mem) => {
                    let pieces = registrations(&mem);
                    t.live += class;
                    t.stats.live_bytes.add(class as u64);
                    t.stats.held_bytes.add(class as u64);
                    t.stats.live_blocks.add(1);
                    t.stats.regions_created += 1;
                    t.stats.registrations += pieces;
                    drop(st);
                    return Ok(self.block(key, class, size, mem));
                }
                // The system refused: give back what this kind has cached and retry once.
                Err(Error::OutOfMemory { .. }) if !retried && t.cached > 0 => {
                    retried = true;
                    evicted.extend(st.evict(pinned, usize::MAX));
                }
                Err(e) => {
                    if matches!(e, Error::OutOfMemory { .. }) {
                        t.stats.num_ooms += 1;
                    }
                    return Err(e);
                }
            }
        }
    }

    fn block(&self, key: Key, class: usize, len: usize, mem: OwnedMemory) -> HostBlock {
        crate::profile::emit(|| crate::record::EventKind::Alloc {
            addr: mem.host_ptr().map_or(0, |p| p.as_ptr() as u64),
            size: len as u64,
            placement: profile_placement(key.0),
            node: crate::profile::node_of(&key.1),
        });
        HostBlock {
            shared: self.shared.clone(),
            key: Some(key),
            class,
            len,
            mem: Some(mem),
        }
    }

    /// Gives every cached block back (unregistering pinned ones, after the copies that
    /// used them are done). Returns the bytes released.
    pub fn trim(&self) -> usize {
        if self.shared.backend.check_fork().is_err() {
            // A forked child: the cache is the parent's; nothing is given back here.
            return 0;
        }
        let mut st = self.shared.lock();
        let before = st.pinned.cached + st.pageable.cached;
        let mut out = st.evict(true, usize::MAX);
        out.extend(st.evict(false, usize::MAX));
        drop(st);
        drop(out);
        before
    }

    /// A copy of the statistics.
    pub fn stats(&self) -> HostPoolStats {
        let st = self.shared.lock();
        HostPoolStats {
            pinned: st.pinned.stats,
            pageable: st.pageable.stats,
        }
    }

    /// Starts peak tracking again from the current values.
    pub fn reset_peak(&self) {
        let mut st = self.shared.lock();
        st.pinned.stats.reset_kind_peak();
        st.pageable.stats.reset_kind_peak();
    }

    /// An [`Allocator`](allocator_api2::alloc::Allocator) handing out pinned memory placed by `policy` from this pool.
    pub fn pinned_allocator(&self, policy: NumaPolicy) -> PinnedAllocator {
        PinnedAllocator {
            pool: self.clone(),
            policy,
            live: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl HostKindStats {
    fn reset_kind_peak(&mut self) {
        for s in [
            &mut self.live_bytes,
            &mut self.cached_bytes,
            &mut self.held_bytes,
            &mut self.live_blocks,
        ] {
            s.peak = s.current;
        }
    }
}

/// The piece a region of `len` bytes is registered in by `threads` threads: one piece
/// per thread, in whole huge pages, at least `min` and at most the 64 GiB cap.
pub(crate) fn register_chunk(len: usize, threads: usize, min: usize) -> usize {
    len.div_ceil(threads.max(1))
        .next_multiple_of(HUGE_PAGE_SIZE)
        .max(min)
        .min(crate::backend::registered::HOST_REGISTER_CHUNK)
}

/// Registrations `mem` was pinned with: its pieces, or 1 when registered whole; 0 for
/// pageable memory.
fn registrations(mem: &OwnedMemory) -> u64 {
    match mem.kind() {
        MemoryKind::Pinned(r) if r.register_chunk() > 0 => {
            r.len().div_ceil(r.register_chunk()) as u64
        }
        MemoryKind::Pinned(_) => 1,
        _ => 0,
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between calls; a panic elsewhere (a bug) is no reason
        // to stop serving memory.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn budget(&self, pinned: bool) -> Option<usize> {
        if pinned {
            self.cfg.pinned_budget
        } else {
            self.cfg.host_budget
        }
    }

    /// Maps, places, pre-faults and (for pinned memory) registers a new region.
    fn create(
        &self,
        policy: &NumaPolicy,
        pinned: bool,
        class: usize,
        tier: MemKind,
    ) -> Result<OwnedMemory> {
        let threads = if class >= self.cfg.parallel_threshold {
            self.cfg.threads
        } else {
            1
        };
        let region = HostRegion::alloc_parallel(class, policy, threads).map_err(|e| match e {
            // The host allocator speaks for pageable memory; say which tier.
            Error::OutOfMemory {
                requested, free, ..
            } => Error::oom(tier, requested, free),
            other => other,
        })?;
        if !pinned {
            return Ok(OwnedMemory::host(&self.backend, region));
        }
        if threads > 1 {
            let chunk = register_chunk(class, threads, self.cfg.min_register_chunk);
            OwnedMemory::pinned_chunked(&self.backend, region, chunk, threads)
        } else {
            OwnedMemory::pinned(&self.backend, region)
        }
    }

    /// Takes a block back into the cache.
    fn give_back(&self, key: Key, class: usize, mem: OwnedMemory) {
        let mut st = self.lock();
        let pinned = key.0;
        let t = st.kind(pinned);
        if mem.must_leak() {
            // A copy may still use it: never hand it out again (its drop leaks it). It
            // stays held, against the budget.
            t.live -= class;
            t.leaked += class;
            t.stats.live_bytes.sub(class as u64);
            t.stats.live_blocks.sub(1);
            t.stats.leaked_bytes += class as u64;
            drop(st);
            drop(mem);
            return;
        }
        t.live -= class;
        t.cached += class;
        t.stats.live_bytes.sub(class as u64);
        t.stats.cached_bytes.add(class as u64);
        t.stats.live_blocks.sub(1);
        st.cache
            .entry(key)
            .or_default()
            .entry(class)
            .or_default()
            .push(mem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block a copy may still use (its fence could not be left) is never handed out
    /// again and stays counted: in `held_bytes`, in `leaked_bytes`, against the budget.
    #[test]
    fn leaked_blocks_stay_held_and_counted() {
        use crate::backend::owned::copy::CopyEnd;
        use crate::{BackendKind, Manager};
        let mgr = Manager::builder()
            .backend(BackendKind::Sim)
            .build()
            .unwrap();
        let class = 64 << 10;
        let pool = mgr
            .host_pool(HostPoolConfig {
                pinned_budget: Some(2 * class),
                ..HostPoolConfig::default()
            })
            .unwrap();
        let placement = Placement::Pinned(NumaPolicy::Default);
        let b = pool.alloc(&placement, class).unwrap();
        b.mem().fences().mark_leak();
        drop(b);
        let st = pool.stats().pinned;
        assert_eq!(st.leaked_bytes, class as u64);
        assert_eq!(st.live_bytes.current, 0);
        assert_eq!(st.cached_bytes.current, 0, "not cached for reuse");
        assert_eq!(
            st.held_bytes.current,
            st.live_bytes.current + st.cached_bytes.current + st.leaked_bytes
        );
        // The budget has room for one more block of that class, not two.
        let one = pool.alloc(&placement, class).unwrap();
        assert!(matches!(
            pool.alloc(&placement, class),
            Err(Error::OutOfMemory { .. })
        ));
        drop(one);
    }

    #[test]
    fn size_classes() {
        let page = page_size();
        assert_eq!(size_class(1), Some(page));
        assert_eq!(size_class(page + 1), Some((page + 1).next_power_of_two()));
        assert_eq!(size_class(100 << 10), Some(128 << 10));
        assert_eq!(size_class((1 << 20) + 1), Some(2 << 20));
        assert_eq!(size_class(2 << 20), Some(2 << 20));
        assert_eq!(size_class((2 << 20) + 1), Some(4 << 20));
        assert_eq!(size_class((5 << 20) + 3), Some(6 << 20));
        assert_eq!(size_class(1 << 30), Some(1 << 30));
        assert_eq!(size_class(usize::MAX), None);
    }

    #[test]
    fn a_failed_piece_rolls_back_the_registered_ones() {
        use crate::backend::sim::{SimBackend, SimConfig};
        let sim: SharedBackend =
            Arc::new(SimBackend::new(SimConfig::with_devices(1, 1 << 30)).unwrap());
        let len = 64 << 20;
        let mut region = HostRegion::alloc(len, &NumaPolicy::Default).unwrap();
        // Kept mapped after the failure below, so that the range can be registered again.
        region.leak();
        let base = region.ptr();
        // SAFETY: 40 MiB + 4 KiB lies inside the region, which stays mapped (leaked).
        let blocker = unsafe { base.add(40 << 20) };
        // SAFETY: mapped memory we own; unregistered below.
        unsafe { sim.register_host(blocker, 4096).unwrap() };
        // Four 16 MiB pieces from four threads; the third overlaps the blocker.
        let err = OwnedMemory::pinned_chunked(&sim, region, 16 << 20, 4).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(ref m) if m.contains("already registered")),
            "{err:?}"
        );
        // SAFETY: registered above.
        unsafe { sim.unregister_host(blocker, 4096).unwrap() };
        // Nothing of the region stays registered: the whole range registers again.
        // SAFETY: the range is still mapped (leaked) and ours.
        unsafe { sim.register_host(base, len).unwrap() };
        // SAFETY: registered just above.
        unsafe { sim.unregister_host(base, len).unwrap() };
    }

    #[test]
    fn chunked_pinning_unregisters_every_piece() {
        use crate::backend::sim::{SimBackend, SimConfig};
        let sim: SharedBackend =
            Arc::new(SimBackend::new(SimConfig::with_devices(1, 1 << 30)).unwrap());
        let len = (48 << 20) + 4096;
        let mut region = HostRegion::alloc(len, &NumaPolicy::Default).unwrap();
        // Kept mapped after `mem` is dropped, so that the range can be registered again.
        region.leak();
        let base = region.ptr();
        let mem = OwnedMemory::pinned_chunked(&sim, region, 16 << 20, 3).unwrap();
        assert_eq!(
            registrations(&mem),
            4,
            "three 16 MiB pieces and a 4 KiB tail"
        );
        // Each piece is its own registration: the tail's is exactly 4 KiB.
        // SAFETY: probing only: a registration over a registered range is refused.
        let again = unsafe { sim.register_host(base, 4096) };
        assert!(again.is_err());
        drop(mem);
        // Dropped: every piece was unregistered (the sim refuses an unregistration of a
        // range it does not know, so a wrong piece would stay registered and overlap).
        // SAFETY: the range is still mapped (leaked) and ours.
        unsafe { sim.register_host(base, len).unwrap() };
        // SAFETY: registered just above.
        unsafe { sim.unregister_host(base, len).unwrap() };
    }

    #[test]
    fn registration_pieces() {
        let g = 1usize << 30;
        assert_eq!(register_chunk(g, 4, MIN_REGISTER_CHUNK), 256 << 20);
        // Eight threads would make 128 MiB pieces: the minimum keeps them at 256 MiB.
        assert_eq!(register_chunk(g, 8, MIN_REGISTER_CHUNK), 256 << 20);
        assert_eq!(register_chunk(64 * g, 8, MIN_REGISTER_CHUNK), 8 * g);
        // One thread on a huge region: the 64 GiB cap.
        assert_eq!(register_chunk(600 * g, 1, MIN_REGISTER_CHUNK), 64 * g);
        // Odd sizes: whole huge pages.
        assert_eq!(register_chunk(g + (2 << 20), 2, 1), 514 << 20);
    }
}
