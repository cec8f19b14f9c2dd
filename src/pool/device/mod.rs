//! The device memory pool: a caching allocator over one device of any backend.
//!
//! Raw device allocation costs tens to hundreds of microseconds and synchronises the
//! device (DESIGN.md); this pool keeps freed memory and hands it out again in well
//! under a microsecond, and calls the driver as rarely as it can.
//!
//! - **Blocks and sizes.** Requests are rounded up to 512 bytes. Blocks of up to 1 MiB
//!   come from the small pool, larger ones from the large pool, so that long-lived small
//!   blocks never pin memory that large ones need. A free block larger than a request
//!   is split; neighbouring free blocks of the same stream merge again. The bookkeeping
//!   is `blocks.rs`, which makes no driver calls.
//! - **Expandable segments.** Where the backend has virtual memory management (CUDA,
//!   the simulator), each pool is one large reserved address range into which physical
//!   memory is mapped as it is needed, so that free blocks merge across what would be
//!   separate segments elsewhere and reserved memory follows allocated memory closely.
//!   Memory is mapped in **chunks**: one driver allocation each, at least 64 MiB (2 MiB
//!   in the small pool) and a sixteenth of what the pool holds (up to 1 GiB), so a pool
//!   reaches its size in a few dozen driver calls; each run of chunks mapped together is
//!   made accessible with one call, for the device and its peers
//!   ([`PoolConfig::peer_access`]). Chunks are never given back in steady state.
//!   Elsewhere (ROCm for now) plain segments as PyTorch makes them: 2 MiB for small
//!   blocks, 20 MiB for requests under 10 MiB, the request rounded to 2 MiB above that.
//! - **Remapping, only as a last resort.** Growth that would take reserved memory more
//!   than [`PoolConfig::reserve_slack`] above the most ever allocated first moves idle
//!   chunks that lie wholly in free memory (unmapped and mapped where the new block
//!   needs them, one batch, no new driver allocation, no host wait: only chunks whose
//!   streams have finished are moved). An allocation that the budget (or the driver)
//!   would refuse synchronises the streams that own free memory once, unmaps every free
//!   chunk and maps them again where needed (and gives back the ones that fit nowhere,
//!   to make new ones of the right size), before it fails with [`Error::OutOfMemory`];
//!   [`DevicePool::trim`] gives everything free back.
//! - **Stream order.** A block belongs to the stream it was allocated on. Freed, it is
//!   at once reusable by later allocations on that stream: the stream runs in order,
//!   so new work there follows the old. Handed to another stream, the new stream first
//!   waits for an event recorded on the old one (no host wait; `streams.rs`). A block
//!   used on more streams ([`PoolBlock::record_stream`]) makes its own stream wait for
//!   them when freed. Memory is unmapped only once the streams that used it are done.
//!   A wrapped per-thread default stream is a stream per thread here, as it is to the
//!   driver ([`Stream::wrap`]).
//! - **Hot path.** A freed block is parked on a per-(stream, size) list without
//!   coalescing; an allocation of that size on that stream takes it back with two hash
//!   look-ups under one lock. Parked blocks are coalesced before anything slower is
//!   tried, so parking never costs memory.
//! - **Limits.** A budget caps reserved bytes (mapped chunks, chunks kept for remapping,
//!   segments). The [`Error::OutOfMemory`] carries the request, the free bytes under the
//!   budget, the reserved bytes and the largest free block.
//! - **Graph capture.** A graph captured on a stream bakes in the addresses its work
//!   used and replays into them until the graph is gone, and while a stream captures,
//!   the driver refuses event queries and synchronisation that touch it (and each such
//!   call invalidates the capture). So: between [`DevicePool::begin_allocate_to_pool`]
//!   and [`DevicePool::end_allocate_to_pool`] the allocations whose stream the
//!   caller's filter picks come from a **private pool**, whose blocks, freed, serve
//!   only later allocations of the same pool, until [`DevicePool::release_pool`] gives
//!   them to the common pool (after waiting for the device: replays may still run).
//!   While any allocation is routed to a private pool the pool makes no event query,
//!   no synchronisation and no unmapping at all (as PyTorch's allocator, whose
//!   graph-pool semantics these are): idle streams are not reclaimed, memory is not
//!   moved between streams or remapped, frees of blocks used on other streams
//!   ([`PoolBlock::record_stream`]) wait until the capture ends, and a growth the
//!   budget refuses fails at once. Outside such a window, every path that records on,
//!   queries or synchronises a stream first asks the driver whether that stream is
//!   capturing ([`Stream::is_capturing`], off the hot path) and leaves it alone if so;
//!   memory is unmapped only while no stream the pool knows is capturing.

mod bins;
mod blocks;
mod streams;

use std::sync::Arc;

#[cfg(loom)]
use loom::sync::{Mutex, MutexGuard};
#[cfg(not(loom))]
use std::sync::{Mutex, MutexGuard};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::backend::copy::{CopyEnd, SubEnd};
use crate::backend::fork::Epoch;
use crate::backend::owned::{OwnedMemory, PhysChunk, SharedBackend, VmmRegion};
use crate::backend::{check_device, DevicePtr};
use crate::error::{Error, Result};
use crate::placement::Tier;
use crate::pool::stats::PoolStats;
use crate::record::{device_flags, EventKind};
use crate::stream::Stream;
use blocks::{BlockState, Blocks, Growth, COMMON, NO_STREAM};
use streams::Streams;

pub use blocks::MIN_BLOCK;

/// Blocks up to this size come from the small pool.
pub const SMALL_SIZE: usize = 1 << 20;
const SMALL_SEGMENT: usize = 2 << 20;
const MID_SEGMENT: usize = 20 << 20;
const MID_LIMIT: usize = 10 << 20;
const LARGE_ROUND: usize = 2 << 20;
/// The largest chunk without a budget below the device's memory.
const DEFAULT_MAX_CHUNK: usize = 1 << 30;
/// Parked frees are coalesced once this many pile up.
const PARK_LIMIT: usize = 4096;

/// How much device memory a pool may reserve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// All of the device's memory.
    Device,
    /// At most this many bytes.
    Bytes(usize),
    /// This fraction (0, 1] of the device's total memory.
    Fraction(f64),
}

/// Settings of a [`DevicePool`].
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// The most memory the pool holds from the device.
    pub budget: Budget,
    /// Use virtual memory management where the backend has it (expandable segments).
    pub expandable_segments: bool,
    /// With expandable segments: before new chunks would take reserved memory more than
    /// `reserve_slack` above the most ever allocated, move idle free chunks to where the
    /// memory is needed (unmap and map: no driver allocation). Off, free chunks stay
    /// where they are until [`DevicePool::trim`] or the budget forces them out.
    pub release_on_grow: bool,
    /// The hysteresis band (a fraction): how far reserved memory may run ahead of the
    /// allocated peak before growth moves free chunks instead of making new ones.
    pub reserve_slack: f64,
    /// The least a growth of the large pool maps (the small pool's start at the
    /// granularity and grow to this), in bytes.
    pub min_chunk: usize,
    /// A new chunk is at least this fraction of what its pool holds already, so that a
    /// pool grows in a number of driver calls that grows with the logarithm of its size.
    pub chunk_fraction: f64,
    /// The largest chunk (one driver allocation), in bytes: a growth larger than this is
    /// made of several. Chunks of the granularity (2 MiB) let every free page move to
    /// where it is needed, so a pool can use all of a tight budget; larger ones cost
    /// fewer driver calls but move only when wholly free. `None`: 1 GiB, or the
    /// granularity under a budget below the device's memory.
    pub max_chunk: Option<usize>,
    /// How far (a fraction of the most ever allocated) a new chunk may map ahead of what
    /// is allocated: the size rules above, capped so that reserved memory stays within
    /// this of the allocated peak when the chunk is made.
    pub grow_ahead: f64,
    /// Other devices given read-write access to the pool's memory (with expandable
    /// segments; plain segments follow the driver's peer access settings).
    pub peer_access: Vec<usize>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            budget: Budget::Device,
            expandable_segments: true,
            release_on_grow: true,
            reserve_slack: 0.02,
            min_chunk: 256 << 20,
            chunk_fraction: 1.0 / 16.0,
            max_chunk: None,
            grow_ahead: 0.08,
            peer_access: Vec::new(),
        }
    }
}

/// The id of a private pool ([`DevicePool::begin_allocate_to_pool`]): PyTorch's
/// `MempoolId_t`, two numbers chosen by the caller (PyTorch's graph pools are `(n, 0)`,
/// its user pools `(0, n)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrivatePoolId(pub u64, pub u64);

/// What a private pool holds ([`DevicePool::private_pool`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrivatePoolStats {
    /// Begins not yet released (PyTorch's use count: graphs that share the pool).
    pub uses: usize,
    /// Whether allocations are routed to it now (between begin and end).
    pub allocating: bool,
    /// Bytes of its blocks that are allocated (freed blocks waiting for the end of a
    /// capture count too).
    pub allocated_bytes: usize,
    /// Bytes of its blocks that are free: reused only by its own allocations.
    pub free_bytes: usize,
}

/// Decides whether an allocation on a stream goes to a private pool: true for yes; an
/// error fails the allocation.
type StreamFilter = Box<dyn Fn(&Stream) -> Result<bool> + Send + Sync>;

/// Allocations routed to a private pool between begin and end.
struct Route {
    id: PrivatePoolId,
    tag: u32,
    filter: StreamFilter,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("id", &self.id)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

/// A private pool: the tag its blocks carry, and its begins not yet released.
#[derive(Debug)]
struct Private {
    tag: u32,
    uses: usize,
}

/// A caching allocator for one device. Cheap to clone; clones share the pool.
///
/// ```
/// use hetmem::{BackendKind, Manager, pool::PoolConfig};
/// let mgr = Manager::builder().backend(BackendKind::Sim).build()?;
/// let pool = mgr.device_pool(0, PoolConfig::default())?;
/// let stream = mgr.create_stream(0)?;
/// let a = pool.alloc(1 << 20, &stream)?;
/// let addr = a.ptr();
/// drop(a);                                   // cached, not returned to the device
/// let b = pool.alloc(1 << 20, &stream)?;     // the same block, no driver call
/// assert_eq!(b.ptr(), addr);
/// # Ok::<(), hetmem::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct DevicePool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    backend: SharedBackend,
    /// Where the pool was made: in a forked child it refuses to work (`Error::Forked`).
    /// Its own copy, so the hot path checks it without a call through the backend.
    epoch: Epoch,
    device: usize,
    budget: usize,
    expandable: bool,
    release_on_grow: bool,
    reserve_slack: f64,
    min_chunk: usize,
    chunk_fraction: f64,
    max_chunk: usize,
    /// The most one growth maps (several chunks when `max_chunk` is smaller).
    grow_max: usize,
    grow_ahead: f64,
    /// The devices given access to mapped chunks: this one, then the peers.
    access: Vec<usize>,
    state: Mutex<PoolState>,
}

#[derive(Debug)]
enum SegMem {
    Vmm(VmmRegion),
    Plain(OwnedMemory),
}

#[derive(Debug)]
struct Segment {
    base: u64,
    small: bool,
    mem: SegMem,
}

#[derive(Debug)]
struct PoolState {
    segments: Vec<Option<Segment>>,
    blocks: Blocks,
    /// Extra streams that used a block (record_stream), by block address.
    uses: FxHashMap<u64, Vec<u64>>,
    streams: Streams,
    stats: PoolStats,
    /// Bytes held from the device: mapped chunks, spare chunks and plain segments.
    reserved: usize,
    /// `reserved` of the large (0) and small (1) pool.
    held: [usize; 2],
    /// Chunks unmapped to be mapped again elsewhere, by pool (large 0, small 1).
    spares: [Vec<PhysChunk>; 2],
    /// The most ever allocated: what the hysteresis band measures reserved memory
    /// against (the stats' peak is the user's to reset).
    alloc_high: usize,
    /// Allocations routed to private pools now, in the order they began (the latest
    /// begin that picks a stream wins). Not empty: a capture may be under way.
    routes: Vec<Route>,
    /// Private pools not yet released, by id.
    private: FxHashMap<PrivatePoolId, Private>,
    next_tag: u32,
    /// Blocks freed while a capture was under way whose other streams' uses could not
    /// be ordered yet (no event may be recorded then): kept allocated until no capture
    /// is under way.
    deferred: Vec<u64>,
    /// Released private pools whose blocks join the common pool once the device can be
    /// synchronised (no capture under way).
    releasing: Vec<u32>,
}

/// Device memory from a [`DevicePool`]; given back to the pool on drop.
#[derive(Debug)]
pub struct PoolBlock {
    shared: Arc<Shared>,
    ptr: DevicePtr,
    len: usize,
}

impl PoolBlock {
    /// The device address.
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }

    /// Bytes asked for.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: zero-byte requests are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device it lives on.
    pub fn device(&self) -> usize {
        self.shared.device
    }

    /// Copies `data` into the block at `offset`, synchronously (for tests, set-up and
    /// small transfers; bulk copies belong on streams).
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.with_segment(offset, data.len(), |mem, at| match mem {
            SegMem::Vmm(r) => r.write(at, data),
            SegMem::Plain(m) => m.write_at(at, data),
        })
    }

    /// Copies `out.len()` bytes of the block from `offset`, synchronously.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.with_segment(offset, out.len(), |mem, at| match mem {
            SegMem::Vmm(r) => r.read(at, out),
            SegMem::Plain(m) => m.read_at(at, out),
        })
    }

    /// Runs `f` with this block as a copy end. The pool's lock is held meanwhile, so
    /// the memory cannot be unmapped under the copy being queued; copies leave fences
    /// on the segment that unmapping waits for.
    pub(crate) fn with_end<T>(&self, f: impl FnOnce(&dyn CopyEnd) -> Result<T>) -> Result<T> {
        self.shared.epoch.check()?;
        let st = self.shared.lock();
        f(&st.end(self))
    }

    /// Runs `f` with two blocks as copy ends (one lock when they share a pool).
    pub(crate) fn with_ends<T>(
        a: &PoolBlock,
        b: &PoolBlock,
        f: impl FnOnce(&dyn CopyEnd, &dyn CopyEnd) -> Result<T>,
    ) -> Result<T> {
        if !Arc::ptr_eq(&a.shared, &b.shared) {
            // Two pools: always lock the one at the lower address first, so that copies
            // in opposite directions on two threads cannot deadlock.
            return if Arc::as_ptr(&a.shared) < Arc::as_ptr(&b.shared) {
                a.with_end(|ea| b.with_end(|eb| f(ea, eb)))
            } else {
                b.with_end(|eb| a.with_end(|ea| f(ea, eb)))
            };
        }
        a.shared.epoch.check()?;
        let st = a.shared.lock();
        f(&st.end(a), &st.end(b))
    }

    fn with_segment<T>(
        &self,
        offset: usize,
        len: usize,
        f: impl FnOnce(&SegMem, usize) -> Result<T>,
    ) -> Result<T> {
        self.shared.epoch.check()?;
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => {
                return Err(Error::OutOfBounds {
                    offset,
                    len,
                    size: self.len,
                })
            }
        }
        let st = self.shared.lock();
        let seg = st.segment_of(self.ptr.0);
        f(&seg.mem, (self.ptr.0 - seg.base) as usize + offset)
    }

    /// Marks the block as used by work on `stream` as well as its own: when it is
    /// freed, its stream waits for `stream`'s work queued until then before the block
    /// is reused.
    pub fn record_stream(&self, stream: &Stream) -> Result<()> {
        self.shared.epoch.check()?;
        self.shared.check_stream(stream)?;
        // A per-thread default stream: the calling thread's is the one that uses it.
        let stream = &*stream.this_thread();
        let mut st = self.shared.lock();
        let own = st.blocks.get(self.ptr.0).map(|b| b.stream);
        let key = stream.inner.id();
        if own == Some(key) {
            return Ok(());
        }
        st.register_stream(stream);
        let uses = st.uses.entry(self.ptr.0).or_default();
        if !uses.contains(&key) {
            uses.push(key);
        }
        Ok(())
    }
}

impl Drop for PoolBlock {
    fn drop(&mut self) {
        // In a forked child the block stays allocated (leaked): the pool's lock may
        // have been held by a thread of the parent at the fork.
        if self.shared.epoch.is_current() {
            crate::profile::emit(|| EventKind::DeviceFree {
                addr: self.ptr.0,
                size: self.len as u64,
                device: self.shared.device as u32,
                flags: device_flags::POOL,
            });
            self.shared.free(self.ptr.0);
        }
    }
}

impl DevicePool {
    /// A pool over `device` of `backend`.
    pub(crate) fn new(backend: &SharedBackend, device: usize, cfg: PoolConfig) -> Result<Self> {
        // The backend's epoch and the pool's are then the same process generation.
        backend.check_fork()?;
        let epoch = Epoch::now();
        check_device(&**backend, device)?;
        let total = backend.devices()[device].total_memory;
        let budget = match cfg.budget {
            Budget::Device => total,
            Budget::Bytes(b) if b > 0 => b,
            Budget::Fraction(f) if f > 0.0 && f <= 1.0 => (total as f64 * f) as usize,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "pool budget {other:?}: bytes must be positive, fractions in (0, 1]"
                )))
            }
        };
        // More than the device has could never be reserved anyway.
        let budget = budget.min(total);
        if !(cfg.reserve_slack.is_finite() && cfg.reserve_slack >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "pool reserve_slack must be a non-negative fraction, got {}",
                cfg.reserve_slack
            )));
        }
        if !(cfg.grow_ahead.is_finite() && cfg.grow_ahead >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "pool grow_ahead must be a non-negative fraction, got {}",
                cfg.grow_ahead
            )));
        }
        if !(cfg.chunk_fraction.is_finite() && (0.0..=1.0).contains(&cfg.chunk_fraction)) {
            return Err(Error::InvalidArgument(format!(
                "pool chunk_fraction must be in [0, 1], got {}",
                cfg.chunk_fraction
            )));
        }
        let mut access = vec![device];
        for &p in &cfg.peer_access {
            check_device(&**backend, p)?;
            if !access.contains(&p) {
                access.push(p);
            }
        }
        let expandable = cfg.expandable_segments && backend.vmm_granularity(device).is_some();
        // Under a budget below the device's memory, memory must be able to move to where
        // it is needed as the pool nears the budget, and a chunk moves only when wholly
        // free: pages (measured: 16 MiB chunks, 1/1024 of the budget, left the ddp and
        // random traces out of memory at 1.02 times their peak; pages did not).
        let max_chunk = match cfg.max_chunk {
            Some(m) => m.max(1),
            None if budget < total => 1,
            None => DEFAULT_MAX_CHUNK,
        };
        tracing::debug!(target: "hetmem", device, budget, expandable, max_chunk, "device pool");
        crate::profile::emit(|| EventKind::Budget {
            placement: crate::record::Placement::Device,
            index: Some(device as u32),
            bytes: budget as u64,
        });
        Ok(DevicePool {
            shared: Arc::new(Shared {
                backend: backend.clone(),
                epoch,
                device,
                budget,
                expandable,
                release_on_grow: cfg.release_on_grow,
                reserve_slack: cfg.reserve_slack,
                min_chunk: cfg.min_chunk,
                chunk_fraction: cfg.chunk_fraction,
                max_chunk,
                grow_max: cfg
                    .max_chunk
                    .unwrap_or(DEFAULT_MAX_CHUNK)
                    .max(cfg.min_chunk),
                grow_ahead: cfg.grow_ahead,
                access,
                state: Mutex::new(PoolState {
                    segments: Vec::new(),
                    blocks: Blocks::default(),
                    uses: FxHashMap::default(),
                    streams: Streams::new(),
                    stats: PoolStats::default(),
                    reserved: 0,
                    held: [0; 2],
                    spares: [Vec::new(), Vec::new()],
                    alloc_high: 0,
                    routes: Vec::new(),
                    private: FxHashMap::default(),
                    next_tag: COMMON + 1,
                    deferred: Vec::new(),
                    releasing: Vec::new(),
                }),
            }),
        })
    }

    /// The device it allocates on.
    pub fn device(&self) -> usize {
        self.shared.device
    }

    /// The budget in bytes.
    pub fn budget(&self) -> usize {
        self.shared.budget
    }

    /// Whether it uses expandable segments (virtual memory management).
    pub fn expandable(&self) -> bool {
        self.shared.expandable
    }

    /// Allocates `size` bytes for use on `stream`.
    pub fn alloc(&self, size: usize, stream: &Stream) -> Result<PoolBlock> {
        let sh = &self.shared;
        sh.epoch.check()?;
        if size == 0 || size > isize::MAX as usize / 2 {
            return Err(Error::InvalidSize {
                requested: size,
                reason: if size == 0 {
                    "zero-byte allocations are refused"
                } else {
                    "larger than any device"
                },
            });
        }
        sh.check_stream(stream)?;
        // A per-thread default stream: the calling thread's (a stream of its own here).
        let stream = &*stream.this_thread();
        let rounded = size.next_multiple_of(MIN_BLOCK);
        let key = stream.inner.id();
        let mut st = sh.lock();
        if !st.routes.is_empty() {
            let addr = sh.alloc_routed(&mut st, size, rounded, stream)?;
            drop(st);
            return Ok(sh.block(addr, size, key));
        }
        // Hot path: a parked block of this size freed on this stream.
        if let Some(addr) = st.blocks.unpark(key, rounded, size) {
            st.count_alloc(rounded, size);
            drop(st);
            return Ok(sh.block(addr, size, key));
        }
        let addr = sh.alloc_slow(&mut st, size, rounded, stream, COMMON)?;
        drop(st);
        Ok(sh.block(addr, size, key))
    }

    /// From now on, allocations on the streams that `filter` picks come from private
    /// pool `id` (made on first use), until [`DevicePool::end_allocate_to_pool`]: for
    /// CUDA graph capture (PyTorch's `beginAllocateToPool`). Blocks of a private pool,
    /// freed, serve only later allocations of the same pool, on their stream, until
    /// the pool is released: the graph replays into their addresses. The pool may
    /// also take cached memory no stream owns (it becomes the pool's) and map new
    /// memory; it never takes another stream's memory, synchronises, queries events or
    /// unmaps while any pool is being allocated to (see the module docs).
    ///
    /// Each begin counts a use of the pool (graphs may share one: begin again with the
    /// same id); [`DevicePool::release_pool`] undoes one. `filter` runs on every
    /// allocation of the pool's device while any pool is being allocated to (newest
    /// begin first), under the pool's lock: it must not call into this pool. Begin
    /// before the capture starts (as PyTorch does), so that no allocation of the
    /// capture reaches the common pool.
    ///
    /// ```
    /// use hetmem::{BackendKind, Manager};
    /// use hetmem::pool::{PoolConfig, PrivatePoolId};
    /// let mgr = Manager::builder().backend(BackendKind::Sim).build()?;
    /// let sim = mgr.sim().unwrap();
    /// let pool = mgr.device_pool(0, PoolConfig::default())?;
    /// let (capture, other) = (mgr.create_stream(0)?, mgr.create_stream(0)?);
    /// let graph = PrivatePoolId(1, 0);
    /// let handle = capture.handle();
    /// pool.begin_allocate_to_pool(graph, move |s| s.handle() == handle)?;
    /// sim.begin_capture(capture.handle())?;
    /// let scratch = pool.alloc(1 << 20, &capture)?;        // the graph's
    /// let addr = scratch.ptr();
    /// drop(scratch);                                       // still the graph's
    /// sim.end_capture(capture.handle())?;
    /// pool.end_allocate_to_pool(graph)?;
    /// let b = pool.alloc(1 << 20, &other)?;                 // never the graph's memory
    /// assert_ne!(b.ptr(), addr);
    /// pool.release_pool(graph)?;                           // the graph is gone
    /// assert!(pool.private_pool(graph).is_none());
    /// # Ok::<(), hetmem::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when allocations already go to `id`.
    pub fn begin_allocate_to_pool(
        &self,
        id: PrivatePoolId,
        filter: impl Fn(&Stream) -> bool + Send + Sync + 'static,
    ) -> Result<()> {
        self.begin_allocate_to_pool_with(id, Box::new(move |s| Ok(filter(s))))
    }

    /// [`DevicePool::begin_allocate_to_pool`] with a filter that may fail (the C ABI's:
    /// an allocation whose filter fails fails).
    pub(crate) fn begin_allocate_to_pool_with(
        &self,
        id: PrivatePoolId,
        filter: StreamFilter,
    ) -> Result<()> {
        self.shared.epoch.check()?;
        let mut st = self.shared.lock();
        if st.routes.iter().any(|r| r.id == id) {
            drop(st);
            // The filter (the caller's context) is let go of outside the lock.
            drop(filter);
            return Err(Error::InvalidArgument(format!(
                "allocations already go to private pool {id:?}"
            )));
        }
        let tag = match st.private.get_mut(&id) {
            Some(p) => {
                p.uses += 1;
                p.tag
            }
            None => {
                let tag = st.next_tag;
                st.next_tag += 1;
                st.private.insert(id, Private { tag, uses: 1 });
                tag
            }
        };
        st.routes.push(Route { id, tag, filter });
        tracing::debug!(target: "hetmem", device = self.shared.device, ?id, tag, "allocating to a private pool");
        Ok(())
    }

    /// Ends the routing that [`DevicePool::begin_allocate_to_pool`] began (PyTorch's
    /// `endAllocateToPool`, after the capture ended). The pool's memory stays its own
    /// until released. Once no pool is being allocated to, frees that waited for the
    /// end of a capture go ahead, and released pools join the common pool.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when allocations do not go to `id`. Errors of the
    /// deferred work (ordering frees, synchronising for a release).
    pub fn end_allocate_to_pool(&self, id: PrivatePoolId) -> Result<()> {
        let sh = &self.shared;
        sh.epoch.check()?;
        let mut st = sh.lock();
        let Some(i) = st.routes.iter().position(|r| r.id == id) else {
            return Err(Error::InvalidArgument(format!(
                "allocations do not go to private pool {id:?}"
            )));
        };
        let route = st.routes.remove(i);
        if st.routes.is_empty() {
            sh.settle(&mut st)?;
        }
        drop(st);
        // The filter (the caller's context) is let go of outside the lock.
        drop(route);
        Ok(())
    }

    /// Undoes one begin of private pool `id` (PyTorch's `releasePool`, when a graph
    /// that used it is reset or destroyed). When none is left, the pool's blocks go to
    /// the common pool: its free ones at once, its allocated ones when freed. Before
    /// that the device is synchronised, since replays of its graphs may still run on
    /// any stream (every stream the pool knows, where the backend cannot synchronise a
    /// device); while a capture is under way that waits until none is.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a pool that does not exist or is still being
    /// allocated to. Errors of synchronising the device.
    pub fn release_pool(&self, id: PrivatePoolId) -> Result<()> {
        let sh = &self.shared;
        sh.epoch.check()?;
        let mut st = sh.lock();
        if st.routes.iter().any(|r| r.id == id) {
            return Err(Error::InvalidArgument(format!(
                "private pool {id:?} is still being allocated to: end it first"
            )));
        }
        let Some(p) = st.private.get_mut(&id) else {
            return Err(Error::InvalidArgument(format!(
                "no private pool {id:?} on device {}",
                sh.device
            )));
        };
        p.uses -= 1;
        if p.uses > 0 {
            return Ok(());
        }
        let tag = p.tag;
        st.private.remove(&id);
        st.releasing.push(tag);
        tracing::debug!(target: "hetmem", device = sh.device, ?id, tag, "private pool released");
        if st.routes.is_empty() {
            sh.settle(&mut st)?;
        }
        Ok(())
    }

    /// What private pool `id` holds, or `None` when there is no such pool (never made,
    /// or released). Scans every block: for tests and reports, not hot paths.
    pub fn private_pool(&self, id: PrivatePoolId) -> Option<PrivatePoolStats> {
        let st = self.shared.lock();
        let p = st.private.get(&id)?;
        Some(st.private_stats(id, p))
    }

    /// Every private pool not yet released, by id, with what it holds (as
    /// [`DevicePool::private_pool`]).
    pub fn private_pools(&self) -> Vec<(PrivatePoolId, PrivatePoolStats)> {
        let st = self.shared.lock();
        let mut v: Vec<_> = st
            .private
            .iter()
            .map(|(id, p)| (*id, st.private_stats(*id, p)))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }

    /// Gives back every chunk or segment that no block uses (after synchronising the
    /// streams that used them). Returns the bytes released.
    ///
    /// # Errors
    /// [`Error::StreamCapturing`] while a private pool is being allocated to: giving
    /// memory back synchronises streams and the device, which a capture forbids.
    pub fn trim(&self) -> Result<usize> {
        let sh = &self.shared;
        sh.epoch.check()?;
        let mut st = sh.lock();
        if !st.routes.is_empty() {
            return Err(Error::StreamCapturing {
                what: "giving cached memory back (trim, empty_cache) while allocations go to \
                       a private pool: end the capture first"
                    .into(),
            });
        }
        sh.settle(&mut st)?;
        let before = st.reserved;
        sh.release_cached(&mut st, true)?;
        let in_use = st.streams_in_use();
        st.streams.forget_unused(&in_use);
        Ok(before - st.reserved)
    }

    /// A copy of the statistics.
    pub fn stats(&self) -> PoolStats {
        self.shared.lock().stats.clone()
    }

    /// Starts peak tracking again from the current values.
    pub fn reset_peak(&self) {
        self.shared.lock().stats.reset_peak();
    }

    /// Bytes reserved from the device now.
    pub fn reserved(&self) -> usize {
        self.shared.lock().reserved
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // The state is consistent between calls; a panic in another thread mid-call
        // (only possible through a bug) is no reason to stop serving memory.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_stream(&self, stream: &Stream) -> Result<()> {
        if !stream.belongs_to(&self.backend) {
            return Err(Error::ForeignHandle { what: "stream" });
        }
        if stream.device() != self.device {
            return Err(Error::InvalidArgument(format!(
                "a stream of device {} used with the pool of device {}",
                stream.device(),
                self.device
            )));
        }
        Ok(())
    }

    fn block(self: &Arc<Self>, addr: u64, len: usize, stream: u64) -> PoolBlock {
        crate::profile::emit(|| EventKind::DeviceAlloc {
            addr,
            size: len as u64,
            device: self.device as u32,
            stream,
            flags: device_flags::POOL,
        });
        PoolBlock {
            shared: self.clone(),
            ptr: DevicePtr(addr),
            len,
        }
    }

    fn free(&self, addr: u64) {
        let mut st = self.lock();
        // A block used on other streams first makes its stream wait for them.
        if !st.uses.is_empty() && st.uses.contains_key(&addr) {
            let Some(b) = st.blocks.get(addr).copied() else {
                tracing::error!(target: "hetmem", addr, "pool free of an unknown block");
                return;
            };
            if b.state != BlockState::Allocated {
                tracing::error!(target: "hetmem", addr, "pool free of a block that is not allocated");
                return;
            }
            if !st.routes.is_empty() || st.touches_capture(addr, b.stream) {
                // No event may be recorded on a capturing stream (nor, conservatively,
                // anywhere while a capture may be under way): the block waits,
                // allocated, until no capture is (`settle`).
                st.count_free(b.size, b.requested);
                st.deferred.push(addr);
                return;
            }
            if !st.order_uses(addr, b.stream) {
                st.count_free(b.size, b.requested);
                return;
            }
        }
        // Hot path: one look-up, parked for the next allocation of its size (a private
        // pool's block: free in its pool).
        match st.blocks.park(addr) {
            Some(b) => {
                st.count_free(b.size, b.requested);
                // After the waits above: a per-thread stream's fence covers them too.
                st.streams.freed_on(b.stream);
            }
            None => {
                tracing::error!(target: "hetmem", addr, "pool free of a block that is not allocated");
                return;
            }
        }
        if st.blocks.parked() > PARK_LIMIT {
            st.blocks.flush_parked();
        }
    }

    /// An allocation while allocations are routed to private pools (a capture may be
    /// under way): its pool by the routes' filters; parked blocks are the common pool's.
    /// Out of line: the hot path is the unrouted one.
    #[cold]
    #[inline(never)]
    fn alloc_routed(
        &self,
        st: &mut PoolState,
        size: usize,
        rounded: usize,
        stream: &Stream,
    ) -> Result<u64> {
        let pool = st.route(stream)?;
        if pool == COMMON {
            if let Some(addr) = st.blocks.unpark(stream.inner.id(), rounded, size) {
                st.count_alloc(rounded, size);
                return Ok(addr);
            }
        }
        self.alloc_slow(st, size, rounded, stream, pool)
    }

    fn alloc_slow(
        &self,
        st: &mut PoolState,
        size: usize,
        rounded: usize,
        stream: &Stream,
        pool: u32,
    ) -> Result<u64> {
        if rounded > self.budget {
            // Never fits: say so before reserving address space or releasing the cache.
            let e = Error::oom(Tier::Device(self.device), size, self.budget);
            return Err(self.oom(st, size, e));
        }
        let key = stream.inner.id();
        st.register_stream(stream);
        let small = rounded <= SMALL_SIZE;
        // While allocations go to a private pool a capture may be under way: no event
        // queries, no synchronisation, no unmapping (module docs).
        let capture = !st.routes.is_empty();
        let pending = !st.deferred.is_empty() || !st.releasing.is_empty();
        if !capture && pending {
            if let Err(e) = self.settle(st) {
                // Left for a later try; this allocation does not need it.
                tracing::warn!(target: "hetmem", error = %e, "settling after a capture failed");
            }
        }
        // Mapped free memory first: no driver call. The parked blocks stay ready for the
        // sizes they were freed at unless nothing else fits.
        if let Some(a) = st.blocks.find_fit(small, pool, key, rounded) {
            return self.take(st, a, rounded, size, stream, pool);
        }
        if capture {
            st.blocks.flush_parked();
        } else {
            // Before growing or queueing behind a busy stream: the free and parked
            // blocks of streams with nothing left to run (this one's included) are
            // anyone's, and merge.
            reclaim_idle(st);
        }
        if let Some(a) = st.blocks.find_fit(small, pool, key, rounded) {
            return self.take(st, a, rounded, size, stream, pool);
        }
        // This stream's free block with free memory nobody owns beside it.
        if pool == COMMON {
            if let Some(a) = st.blocks.find_merged_fit(small, key, rounded) {
                let a = st.blocks.adopt_neighbours(a, key);
                return self.take(st, a, rounded, size, stream, pool);
            }
        }
        let mut pressure = false;
        loop {
            match self.grow(st, small, rounded, size, stream, pool, pressure) {
                Ok(addr) => return Ok(addr),
                Err(e @ Error::OutOfMemory { .. }) if !pressure => {
                    // While any stream the pool knows captures, no hand-over (its event
                    // would join the taker into the capture, or the wait cross its
                    // boundary) and no giving memory back (it synchronises).
                    if capture || st.streams.any_capturing() {
                        return Err(self.oom(st, size, e));
                    }
                    // No room to grow: another stream's free block, behind an event
                    // (the device waits for that stream's work, the host does not).
                    if let Some(a) =
                        st.blocks
                            .find_others_fit(small, key, rounded, st.streams.ids())
                    {
                        return self.take(st, a, rounded, size, stream, pool);
                    }
                    // The budget or the driver is short: wait for the streams that own
                    // free memory, unmap every free chunk (kept, to be mapped where this
                    // allocation needs it) or free segment, and try once more.
                    pressure = true;
                    st.stats.num_alloc_retries += 1;
                    self.release_cached(st, false)?;
                    if let Some(a) = st.blocks.find_fit(small, pool, key, rounded) {
                        return self.take(st, a, rounded, size, stream, pool);
                    }
                }
                Err(e @ Error::OutOfMemory { .. }) => return Err(self.oom(st, size, e)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Once no capture is under way: the frees that waited for one's end go ahead,
    /// and released private pools join the common pool (after the device is
    /// synchronised: replays of their graphs may still run).
    fn settle(&self, st: &mut PoolState) -> Result<()> {
        if !st.deferred.is_empty() {
            for addr in std::mem::take(&mut st.deferred) {
                let Some(b) = st.blocks.get(addr).copied() else {
                    continue;
                };
                if st.touches_capture(addr, b.stream) {
                    // A capture the pool was not told of: later.
                    st.deferred.push(addr);
                } else if st.order_uses(addr, b.stream) {
                    st.blocks.park(addr);
                    st.streams.freed_on(b.stream);
                }
            }
        }
        if st.releasing.is_empty() || st.streams.any_capturing() {
            return Ok(());
        }
        match self.backend.synchronize_device(self.device) {
            Ok(()) => {}
            Err(Error::Unsupported { .. }) => {
                // The streams the pool knows, at least.
                let ids: Vec<u64> = st.streams.ids().collect();
                for id in ids {
                    st.streams.synchronize(id)?;
                }
            }
            Err(e) => return Err(e),
        }
        for tag in std::mem::take(&mut st.releasing) {
            let bytes = st.blocks.release_pool(tag);
            tracing::debug!(target: "hetmem", device = self.device, tag, bytes,
                "a released private pool's memory joins the common pool");
        }
        Ok(())
    }

    /// Takes `rounded` bytes from the free mapped block `addr` for `stream` and private
    /// pool `pool`, handing it over from its previous stream with an event.
    #[allow(clippy::too_many_arguments)]
    fn take(
        &self,
        st: &mut PoolState,
        addr: u64,
        rounded: usize,
        size: usize,
        stream: &Stream,
        pool: u32,
    ) -> Result<u64> {
        let key = stream.inner.id();
        let (owner, taken) = st.blocks.take_sized(addr, rounded, size, key, pool);
        if owner != key && owner != NO_STREAM {
            // Another stream's block: only ever the common pool's (find_others_fit).
            if let Err(e) = st.streams.order(&stream.inner, owner) {
                st.blocks.untake(addr, owner, COMMON);
                return Err(e);
            }
        }
        st.count_alloc(taken, size);
        Ok(addr)
    }

    /// Makes room for a `rounded`-byte block in new memory and takes it: maps chunks
    /// into a hole of the address space (expandable), or allocates a segment (plain).
    #[allow(clippy::too_many_arguments)]
    fn grow(
        &self,
        st: &mut PoolState,
        small: bool,
        rounded: usize,
        size: usize,
        stream: &Stream,
        pool: u32,
        pressure: bool,
    ) -> Result<u64> {
        if !self.expandable {
            let base = self.grow_plain(st, small, rounded, pressure)?;
            return self.take(st, base, rounded, size, stream, pool);
        }
        let key = stream.inner.id();
        let mut g = match st.blocks.find_growth(small, pool, key, rounded) {
            Some(g) => g,
            None => {
                self.add_region(st, small, rounded)?;
                st.blocks
                    .find_growth(small, pool, key, rounded)
                    .expect("a new region holds the request")
            }
        };
        let gran = st.region(g.seg).granularity();
        let need = g.hole_needed(rounded).next_multiple_of(gran);
        let spare: usize = st.spares[small as usize].iter().map(PhysChunk::size).sum();
        let alloc_peak =
            (st.stats.allocated_bytes.all.current as usize + rounded).max(st.alloc_high);
        let band = (alloc_peak as f64 * (1.0 + self.reserve_slack)) as usize;
        if self.release_on_grow
            && !pressure
            && st.routes.is_empty()
            && spare < need
            && st.reserved + need - spare > band
        {
            // Past the band: chunks that are free and idle move here rather than new
            // ones being made. Unmapping changes the holes, and idle streams' blocks
            // became nobody's and merged: look again after. (Not while a capture may
            // be under way: it queries events and unmaps.)
            self.move_idle_chunks(st, small, need - spare)?;
            if let Some(a) = st.blocks.find_fit(small, pool, key, rounded) {
                return self.take(st, a, rounded, size, stream, pool);
            }
            g = match st.blocks.find_growth(small, pool, key, rounded) {
                Some(g) => g,
                None => {
                    self.add_region(st, small, rounded)?;
                    st.blocks
                        .find_growth(small, pool, key, rounded)
                        .expect("a new region holds the request")
                }
            };
        }
        let need = g.hole_needed(rounded).next_multiple_of(gran);
        tracing::trace!(target: "hetmem", need, rounded, hole = g.hole_size, reserved = st.reserved, "pool grows");
        let target = self.chunk_target(st, small, gran, rounded);
        let mapped = self.map_chunks(st, &g, need, target, pressure)?;
        // The new memory joins the block before it, whoever's that is (this stream's
        // or nobody's, in this pool or nobody's in the common one).
        let (owner, owner_pool) = g.prefix.map_or((NO_STREAM, COMMON), |(a, _)| {
            let b = st.blocks.get(a).expect("prefix");
            (b.stream, b.pool)
        });
        let start = st.blocks.fill_hole(g.hole, mapped, owner, owner_pool);
        debug_assert_eq!(start, g.start());
        self.take(st, start, rounded, size, stream, pool)
    }

    /// How much a new chunk of the small or large pool maps at least, for an allocation
    /// of `rounded` bytes: a share of what the pool holds, within the chunk limits, and
    /// no further ahead of the allocated peak than `grow_ahead`.
    fn chunk_target(&self, st: &PoolState, small: bool, gran: usize, rounded: usize) -> usize {
        let held = st.held[small as usize];
        let share = (held as f64 * self.chunk_fraction) as usize;
        let (lo, hi) = if small {
            (gran, self.min_chunk.max(gran))
        } else {
            (self.min_chunk.min(self.grow_max), self.grow_max)
        };
        let alloc_peak =
            (st.stats.allocated_bytes.all.current as usize + rounded).max(st.alloc_high);
        let ahead =
            ((alloc_peak as f64 * (1.0 + self.grow_ahead)) as usize).saturating_sub(st.reserved);
        share.clamp(lo, hi).min(ahead) / gran * gran
    }

    /// Maps at least `need` bytes (a multiple of the granularity) at the start of the
    /// hole of `g`: spare chunks first, then new ones (`target` bytes at least, within
    /// the budget and the hole), all made accessible with one call. Returns the bytes
    /// mapped.
    fn map_chunks(
        &self,
        st: &mut PoolState,
        g: &Growth,
        need: usize,
        target: usize,
        pressure: bool,
    ) -> Result<usize> {
        let (seg, hole, extent) = (g.seg, g.hole, g.hole_size);
        let small = st.segments[seg as usize].as_ref().expect("segment").small;
        let (base, gran) = {
            let r = st.region(seg);
            (r.base().0, r.granularity())
        };
        let idx = small as usize;
        // Spares: the smallest that covers what is left, else the largest that fits.
        let mut run: Vec<PhysChunk> = Vec::new();
        let mut acc = 0;
        while acc < need {
            let left = need - acc;
            let room = extent - acc;
            let spares = &st.spares[idx];
            let pick = spares
                .iter()
                .enumerate()
                .filter(|(_, c)| c.size() <= room && c.size() >= left)
                .min_by_key(|(_, c)| c.size())
                .or_else(|| {
                    spares
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.size() <= room)
                        .max_by_key(|(_, c)| c.size())
                })
                .map(|(i, _)| i);
            let Some(i) = pick else { break };
            let c = st.spares[idx].swap_remove(i);
            acc += c.size();
            run.push(c);
        }
        let reused = run.len();
        if acc < need {
            let left = need - acc;
            if pressure && st.reserved + left > self.budget {
                // Spares that fit nowhere here hold budget a chunk of the right size needs.
                for i in [idx, 1 - idx] {
                    while st.reserved + left > self.budget {
                        let Some(c) = st.spares[i].pop() else { break };
                        st.unhold(i == 1, c.size());
                        st.stats.num_device_free += 1;
                        drop(c);
                    }
                }
            }
            let room = self.budget.saturating_sub(st.reserved);
            if room < left {
                st.spares[idx].append(&mut run);
                return Err(Error::oom(Tier::Device(self.device), left, room));
            }
            let mut want = left
                .max(target)
                .min(extent - acc)
                .min(room - room % gran)
                .max(left);
            // In pieces of at most `max_chunk` (each one driver allocation).
            while acc < need {
                let piece = want.min((self.max_chunk / gran).max(1) * gran);
                let created = match PhysChunk::create(&self.backend, self.device, piece) {
                    Err(Error::OutOfMemory { .. }) if want > need - acc => {
                        // The device is short of a speculative chunk: the exact need may
                        // fit.
                        want = need - acc;
                        continue;
                    }
                    other => other,
                };
                match created {
                    Ok(c) => {
                        st.hold(small, c.size());
                        st.stats.num_device_alloc += 1;
                        acc += c.size();
                        want -= c.size();
                        run.push(c);
                    }
                    Err(e) => {
                        st.spares[idx].append(&mut run);
                        return Err(e);
                    }
                }
            }
            // Speculation left over (the device was short): nothing more to make.
            let _ = want;
        }
        let off = (hole - base) as usize;
        let was_empty = st.region(seg).mapped_bytes() == 0;
        let region = st.region_mut(seg);
        if let Err((e, mut back)) = region.map_run(off, run, &self.access) {
            // The chunks are intact: kept for the retry (or the budget's last resort).
            st.spares[idx].append(&mut back);
            return Err(e);
        }
        st.stats.num_pages_moved += reused as u64;
        crate::profile::emit(|| EventKind::SegmentMap {
            addr: hole,
            size: acc as u64,
            device: self.device as u32,
        });
        if was_empty {
            st.stats.segment.add(small, 1);
        }
        Ok(acc)
    }

    /// Unmaps free chunks whose streams are done (no host wait) until `need` bytes are
    /// spare, in one batch per region.
    fn move_idle_chunks(&self, st: &mut PoolState, small: bool, need: usize) -> Result<()> {
        // Free blocks of streams that are done (the allocating stream's own included)
        // are nobody's: their memory can be unmapped without a fault.
        let idle: Vec<u64> = st
            .blocks
            .free_owners()
            .into_iter()
            .filter(|o| st.streams.is_idle(*o))
            .collect();
        if !idle.is_empty() {
            st.blocks.disown(Some(&idle));
        }
        // (segment, block, chunk offset, chunk length)
        let mut cands: Vec<(u32, u64, usize, usize)> = Vec::new();
        for (addr, size, owner, seg) in st.blocks.free_blocks(0) {
            if owner != NO_STREAM {
                continue;
            }
            let Some(Segment {
                mem: SegMem::Vmm(r),
                base,
                small: s,
            }) = &st.segments[seg as usize]
            else {
                continue;
            };
            if *s != small || !r.copies_done() {
                continue;
            }
            for (off, len) in r.chunks_within((addr - base) as usize, size) {
                cands.push((seg, addr, off, len));
            }
        }
        tracing::trace!(target: "hetmem", need, candidates = cands.len(), "pool moves idle chunks");
        // Unmapping synchronises the device implicitly, which a capture forbids.
        if cands.is_empty() || st.streams.any_capturing() {
            return Ok(());
        }
        // One chunk that covers the need, the smallest such; else the largest first.
        let chosen: Vec<(u32, u64, usize, usize)> =
            match cands.iter().filter(|c| c.3 >= need).min_by_key(|c| c.3) {
                Some(c) => vec![*c],
                None => {
                    cands.sort_by_key(|c| std::cmp::Reverse(c.3));
                    let mut acc = 0;
                    cands
                        .into_iter()
                        .take_while(|c| {
                            let take = acc < need;
                            acc += c.3;
                            take
                        })
                        .collect()
                }
            };
        self.unmap_chosen(st, chosen)
    }

    /// Unmaps the chosen chunks (each wholly inside a free block owned by nobody) into
    /// the spares, and turns their ranges into holes.
    fn unmap_chosen(
        &self,
        st: &mut PoolState,
        mut chosen: Vec<(u32, u64, usize, usize)>,
    ) -> Result<()> {
        // By segment, and within a block from the highest chunk down: unmapping one
        // splits its block, and the block keeps its address below the hole.
        chosen.sort_by_key(|c| (c.0, c.1, std::cmp::Reverse(c.2)));
        let mut i = 0;
        while i < chosen.len() {
            let seg = chosen[i].0;
            let j = chosen[i..]
                .iter()
                .position(|c| c.0 != seg)
                .map_or(chosen.len(), |k| i + k);
            let offs: Vec<usize> = chosen[i..j].iter().map(|c| c.2).collect();
            let small = st.segments[seg as usize].as_ref().expect("segment").small;
            let base = st.segments[seg as usize].as_ref().expect("segment").base;
            let mut out = Vec::new();
            let res = st.region_mut(seg).unmap_chunks(&offs, &mut out);
            // What was unmapped is a hole now, whatever failed after it.
            for (k, c) in out.iter().enumerate() {
                let (_, block, off, _) = chosen[i + k];
                crate::profile::emit(|| EventKind::SegmentUnmap {
                    addr: base + off as u64,
                    size: c.size() as u64,
                    device: self.device as u32,
                });
                st.blocks.make_hole(block, base + off as u64, c.size());
            }
            st.spares[small as usize].append(&mut out);
            if st.region(seg).mapped_bytes() == 0 {
                st.stats.segment.sub(small, 1);
            }
            res?;
            i = j;
        }
        Ok(())
    }

    /// Reserves address space for a pool: the budget (16 GiB at most) for the small
    /// pool, twice the budget for the large one (room for holes); more regions are
    /// added if even that fills.
    fn add_region(&self, st: &mut PoolState, small: bool, rounded: usize) -> Result<()> {
        let size = if small {
            self.budget.min(16 << 30)
        } else {
            self.budget.saturating_mul(2)
        };
        let size = size.max(rounded);
        let region = VmmRegion::new(&self.backend, self.device, size)?
            .expect("expandable pools only exist where the backend has VMM");
        let base = region.base().0;
        let size = region.size();
        let seg = st.add_segment(Segment {
            base,
            small,
            mem: SegMem::Vmm(region),
        });
        st.blocks.add_segment(seg, base, size, small, false);
        Ok(())
    }

    /// Allocates a plain segment for a `rounded`-byte block; returns its base.
    fn grow_plain(
        &self,
        st: &mut PoolState,
        small: bool,
        rounded: usize,
        pressure: bool,
    ) -> Result<u64> {
        let _ = pressure;
        let exact = rounded.next_multiple_of(LARGE_ROUND);
        let seg_size = if small {
            SMALL_SEGMENT
        } else if rounded < MID_LIMIT && st.reserved + MID_SEGMENT <= self.budget {
            MID_SEGMENT
        } else {
            // A shared mid-size segment would not fit the budget: a segment of its own.
            exact
        };
        if st.reserved + seg_size > self.budget {
            return Err(Error::oom(
                Tier::Device(self.device),
                seg_size,
                self.budget - st.reserved.min(self.budget),
            ));
        }
        let mem = OwnedMemory::device(&self.backend, self.device, seg_size)?;
        let base = mem
            .device_ptr()
            .expect("device memory has a device address")
            .0;
        st.hold(small, seg_size);
        crate::profile::emit(|| EventKind::SegmentMap {
            addr: base,
            size: seg_size as u64,
            device: self.device as u32,
        });
        st.stats.segment.add(small, 1);
        st.stats.num_device_alloc += 1;
        let seg = st.add_segment(Segment {
            base,
            small,
            mem: SegMem::Plain(mem),
        });
        st.blocks.add_segment(seg, base, seg_size, small, true);
        Ok(base)
    }

    /// Gives free memory back: synchronises the streams that own free blocks (once
    /// each), then unmaps every chunk lying wholly in free memory (kept as spares for
    /// the retry of an allocation, or with `everything` given back with the spares) and
    /// frees every unused plain segment.
    /// A stream capturing a graph is not synchronised (its free blocks stay its own),
    /// and nothing is unmapped or freed while any stream the pool knows is capturing.
    fn release_cached(&self, st: &mut PoolState, everything: bool) -> Result<()> {
        st.blocks.flush_parked();
        let capturing = st.streams.any_capturing();
        // While one captures: not it, and not a stream whose synchronisation would wait
        // for the whole device.
        let owners: Vec<u64> = st
            .blocks
            .free_owners()
            .into_iter()
            .filter(|o| !capturing || !(st.streams.capturing(*o) || st.streams.syncs_device(*o)))
            .collect();
        for o in &owners {
            st.streams.synchronize(*o)?;
        }
        if !owners.is_empty() {
            st.stats.num_sync_all_streams += 1;
            st.blocks.disown(Some(&owners));
        }
        if capturing {
            return Ok(());
        }
        let mut chunks: Vec<(u32, u64, usize, usize)> = Vec::new();
        let mut plain: Vec<(u32, u64)> = Vec::new();
        for (addr, size, _, seg) in st.blocks.free_blocks(0) {
            match &st.segments[seg as usize] {
                Some(Segment {
                    mem: SegMem::Vmm(r),
                    base,
                    ..
                }) => {
                    for (off, len) in r.chunks_within((addr - base) as usize, size) {
                        chunks.push((seg, addr, off, len));
                    }
                }
                Some(Segment {
                    mem: SegMem::Plain(_),
                    base,
                    ..
                }) if *base == addr => plain.push((seg, addr)),
                _ => {}
            }
        }
        self.unmap_chosen(st, chunks)?;
        for (seg, base) in plain {
            if !st.blocks.remove_segment(base) {
                continue;
            }
            let s = st.segments[seg as usize].take().expect("segment");
            let SegMem::Plain(mem) = &s.mem else {
                unreachable!("plain")
            };
            let len = mem.len();
            crate::profile::emit(|| EventKind::SegmentUnmap {
                addr: base,
                size: len as u64,
                device: self.device as u32,
            });
            st.unhold(s.small, len);
            st.stats.segment.sub(s.small, 1);
            st.stats.num_device_free += 1;
            drop(s); // frees the device memory
        }
        if everything {
            for idx in 0..2 {
                for c in std::mem::take(&mut st.spares[idx]) {
                    st.unhold(idx == 1, c.size());
                    st.stats.num_device_free += 1;
                    drop(c);
                }
            }
        }
        Ok(())
    }

    /// The pool's `OutOfMemory`: the request, the room left under the budget, what is
    /// reserved, and the largest free block.
    fn oom(&self, st: &mut PoolState, requested: usize, cause: Error) -> Error {
        st.stats.num_ooms += 1;
        let largest = st.blocks.largest_free();
        let device_free = match cause {
            Error::OutOfMemory { free, .. } => free,
            _ => usize::MAX,
        };
        tracing::warn!(target: "hetmem", device = self.device, requested, reserved = st.reserved,
            budget = self.budget, largest, "device pool out of memory");
        crate::profile::emit(|| EventKind::OutOfMemory {
            placement: crate::record::Placement::Device,
            index: Some(self.device as u32),
            requested: requested as u64,
            free: (self.budget - st.reserved.min(self.budget)).min(device_free) as u64,
            reserved: Some(st.reserved as u64),
            largest_free_block: Some(largest as u64),
        });
        Error::OutOfMemory {
            tier: Tier::Device(self.device),
            requested,
            free: (self.budget - st.reserved.min(self.budget)).min(device_free),
            reserved: Some(st.reserved),
            largest_free_block: Some(largest),
        }
    }
}

/// Makes the free blocks of every stream whose queued work is all done nobody's,
/// merged with their free neighbours: nothing can still touch them (a block is freed
/// after the work that used it was queued, and a block used on other streams made its
/// own stream wait for them when it was freed). Waits for nothing.
fn reclaim_idle(st: &mut PoolState) {
    let mut owners = st.blocks.free_owners();
    owners.extend(st.blocks.parked_owners());
    owners.sort_unstable();
    owners.dedup();
    let idle: Vec<u64> = owners
        .into_iter()
        .filter(|o| st.streams.is_idle(*o))
        .collect();
    // Parked blocks of idle streams become nobody's as they are coalesced (one pass
    // each), the free ones of those streams after.
    st.blocks.flush_parked_with(&idle);
    if !idle.is_empty() {
        st.blocks.disown(Some(&idle));
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if !self.epoch.is_current() {
            // A forked child: the segments and streams drop without driver calls.
            return;
        }
        // Queued work may still use cached memory: let it finish before unmapping.
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        st.streams.synchronize_all();
    }
}

impl PoolState {
    fn private_stats(&self, id: PrivatePoolId, p: &Private) -> PrivatePoolStats {
        let (allocated_bytes, free_bytes) = self.blocks.pool_bytes(p.tag);
        PrivatePoolStats {
            uses: p.uses,
            allocating: self.routes.iter().any(|r| r.id == id),
            allocated_bytes,
            free_bytes,
        }
    }

    /// The private pool an allocation on `stream` goes to: the newest route whose
    /// filter picks it, else the common pool.
    fn route(&self, stream: &Stream) -> Result<u32> {
        for r in self.routes.iter().rev() {
            if (r.filter)(stream)? {
                return Ok(r.tag);
            }
        }
        Ok(COMMON)
    }

    /// Whether the block at `addr`, of stream `own`, or a stream it was used on is
    /// capturing a graph (driver calls: for blocks used on several streams only).
    fn touches_capture(&self, addr: u64, own: u64) -> bool {
        self.streams.capturing(own)
            || self
                .uses
                .get(&addr)
                .is_some_and(|u| u.iter().any(|o| self.streams.capturing(*o)))
    }

    /// Makes the block's stream `own` wait for the work queued so far on the other
    /// streams it was used on, and forgets them. False when that failed: the block
    /// cannot be proven free of their work, and is kept out of circulation (leaked).
    fn order_uses(&mut self, addr: u64, own: u64) -> bool {
        let Some(others) = self.uses.remove(&addr) else {
            return true;
        };
        let ordered = others
            .iter()
            .try_for_each(|o| self.streams.order_ids(own, *o));
        if let Err(e) = ordered {
            tracing::error!(target: "hetmem", addr, error = %e,
                "ordering a multi-stream block failed; leaking it");
            return false;
        }
        true
    }

    fn add_segment(&mut self, s: Segment) -> u32 {
        let seg = self
            .segments
            .iter()
            .position(Option::is_none)
            .unwrap_or_else(|| {
                self.segments.push(None);
                self.segments.len() - 1
            });
        self.segments[seg] = Some(s);
        seg as u32
    }

    fn segment_of(&self, addr: u64) -> &Segment {
        let b = self.blocks.get(addr).expect("a live block is known");
        self.segments[b.seg as usize]
            .as_ref()
            .expect("a live block's segment exists")
    }

    /// The copy end of a live block.
    fn end(&self, blk: &PoolBlock) -> SubEnd<'_> {
        let seg = self.segment_of(blk.ptr.0);
        let inner: &dyn CopyEnd = match &seg.mem {
            SegMem::Vmm(r) => r,
            SegMem::Plain(m) => m,
        };
        SubEnd {
            inner,
            base: (blk.ptr.0 - seg.base) as usize,
            len: blk.len,
        }
    }

    fn region(&self, seg: u32) -> &VmmRegion {
        match &self.segments[seg as usize] {
            Some(Segment {
                mem: SegMem::Vmm(r),
                ..
            }) => r,
            _ => unreachable!("segment {seg} is a region"),
        }
    }

    fn region_mut(&mut self, seg: u32) -> &mut VmmRegion {
        match &mut self.segments[seg as usize] {
            Some(Segment {
                mem: SegMem::Vmm(r),
                ..
            }) => r,
            _ => unreachable!("segment {seg} is a region"),
        }
    }

    /// Counts `bytes` more held from the device by the small or large pool.
    fn hold(&mut self, small: bool, bytes: usize) {
        self.reserved += bytes;
        self.held[small as usize] += bytes;
        self.stats.reserved_bytes.add(small, bytes as u64);
    }

    fn unhold(&mut self, small: bool, bytes: usize) {
        self.reserved -= bytes;
        self.held[small as usize] -= bytes;
        self.stats.reserved_bytes.sub(small, bytes as u64);
    }

    fn register_stream(&mut self, stream: &Stream) {
        if self.streams.contains(stream.inner.id()) {
            return;
        }
        let (blocks, uses) = (&self.blocks, &self.uses);
        self.streams.register(&stream.inner, || {
            blocks
                .owners()
                .chain(uses.values().flatten().copied())
                .collect()
        });
    }

    fn streams_in_use(&self) -> FxHashSet<u64> {
        self.blocks
            .owners()
            .chain(self.uses.values().flatten().copied())
            .collect()
    }

    fn count_alloc(&mut self, size: usize, requested: usize) {
        let small = size <= SMALL_SIZE;
        self.stats.allocated_bytes.add(small, size as u64);
        self.alloc_high = self
            .alloc_high
            .max(self.stats.allocated_bytes.all.current as usize);
        self.stats.requested_bytes.add(small, requested as u64);
        self.stats.allocation.add(small, 1);
    }

    fn count_free(&mut self, size: usize, requested: usize) {
        let small = size <= SMALL_SIZE;
        self.stats.allocated_bytes.sub(small, size as u64);
        self.stats.requested_bytes.sub(small, requested as u64);
        self.stats.allocation.sub(small, 1);
    }
}
