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
mod pages;
mod private;
mod streams;

use std::sync::Arc;

#[cfg(loom)]
use loom::sync::{Mutex, MutexGuard};
#[cfg(not(loom))]
use std::sync::{Mutex, MutexGuard};

use rustc_hash::FxHashMap;

use crate::backend::owned::copy::{CopyEnd, SubEnd};
use crate::backend::owned::{OwnedMemory, PhysChunk, SharedBackend, VmmRegion};
use crate::backend::{check_device, DevicePtr};
use crate::error::{Error, Result};
use crate::host_mem::fork::Epoch;
use crate::placement::MemKind;
use crate::pool::stats::PoolStats;
use crate::record::{device_flags, EventKind};
use crate::stream::Stream;
use blocks::{BlockState, Blocks, COMMON};
use pages::reclaim_idle;
use private::{Private, Route};
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
    pub(crate) fn with_mem<T>(&self, f: impl FnOnce(&dyn CopyEnd) -> Result<T>) -> Result<T> {
        self.shared.epoch.check()?;
        let st = self.shared.lock();
        f(&st.mem_of(self))
    }

    /// Runs `f` with two blocks as copy ends (one lock when they share a pool).
    pub(crate) fn with_mems<T>(
        a: &PoolBlock,
        b: &PoolBlock,
        f: impl FnOnce(&dyn CopyEnd, &dyn CopyEnd) -> Result<T>,
    ) -> Result<T> {
        if !Arc::ptr_eq(&a.shared, &b.shared) {
            // Two pools: always lock the one at the lower address first, so that copies
            // in opposite directions on two threads cannot deadlock.
            return if Arc::as_ptr(&a.shared) < Arc::as_ptr(&b.shared) {
                a.with_mem(|ea| b.with_mem(|eb| f(ea, eb)))
            } else {
                b.with_mem(|eb| a.with_mem(|ea| f(ea, eb)))
            };
        }
        a.shared.epoch.check()?;
        let st = a.shared.lock();
        f(&st.mem_of(a), &st.mem_of(b))
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
            let e = Error::oom(MemKind::Device(self.device), size, self.budget);
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
    fn segment_of(&self, addr: u64) -> &Segment {
        let b = self.blocks.get(addr).expect("a live block is known");
        self.segments[b.seg as usize]
            .as_ref()
            .expect("a live block's segment exists")
    }

    /// The copy end of a live block.
    fn mem_of(&self, blk: &PoolBlock) -> SubEnd<'_> {
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
