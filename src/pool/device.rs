//! The device memory pool: a caching allocator over one device of any backend.
//!
//! Raw device allocation costs tens to hundreds of microseconds and synchronises the
//! device (DESIGN.md); this pool keeps freed memory and hands it out again in well
//! under a microsecond.
//!
//! - **Blocks and sizes.** Requests are rounded up to 512 bytes. Blocks of up to 1 MiB
//!   come from the small pool, larger ones from the large pool, so that long-lived small
//!   blocks never pin pages that large ones need. A free block larger than a request is
//!   split; neighbouring free blocks of the same stream are merged again (coalescing).
//!   Memory no stream has used stays unowned, so a stream that needs fresh memory never
//!   queues behind another stream's work to get it.
//! - **Expandable segments.** Where the backend has virtual memory management (CUDA,
//!   the simulator), each pool is one large reserved address range whose 2 MiB pages
//!   are mapped only when a block over them is handed out, and given back when they lie
//!   wholly inside free blocks. Reserved memory (mapped pages) then follows allocated
//!   memory closely instead of keeping every segment ever made; with
//!   [`PoolConfig::release_on_grow`] free pages are unmapped before new ones are
//!   mapped, so the reserved peak stays at the allocated peak plus page rounding.
//!   Elsewhere (ROCm for now) plain segments: 2 MiB for small blocks, 20 MiB for
//!   requests under 10 MiB, the request rounded to 2 MiB above that.
//! - **Stream order.** A block belongs to the stream it was allocated on. Freed, it is
//!   at once reusable by later allocations on that stream: the stream runs in order,
//!   so new work there follows the old. Handed to another stream, the new stream first
//!   waits for an event recorded on the old one (no host wait). A block used on more
//!   streams ([`PoolBlock::record_stream`]) makes its own stream wait for them when
//!   freed. Pages are unmapped only once the streams that used them are done: found
//!   idle when making room to grow (busy ones are skipped, so an allocation never waits
//!   for a kernel), synchronised by `trim` and when the budget or the driver runs out.
//! - **Hot path.** A freed block is parked on a per-(stream, size) list without
//!   coalescing; an allocation of that size on that stream takes it back with two hash
//!   look-ups under one lock. Parked blocks are coalesced before anything slower is
//!   tried, so parking never costs memory.
//! - **Limits.** A budget caps reserved bytes. When an allocation would pass it (or the
//!   driver refuses), cached memory is given back and the allocation retried once
//!   before it fails with [`Error::OutOfMemory`] carrying the request, the free bytes
//!   under the budget, the reserved bytes and the largest free block.

use std::collections::BTreeSet;
use std::sync::Arc;

#[cfg(loom)]
use loom::sync::{Mutex, MutexGuard};
#[cfg(not(loom))]
use std::sync::{Mutex, MutexGuard};

use rustc_hash::FxHashMap;

use crate::backend::copy::{CopyEnd, SubEnd};
use crate::backend::fork::Epoch;
use crate::backend::owned::{OwnedMemory, OwnedStream, PhysPage, SharedBackend, VmmRegion};
use crate::backend::{check_device, DevicePtr};
use crate::error::{Error, Result};
use crate::placement::Tier;
use crate::pool::stats::PoolStats;
use crate::stream::Stream;

/// Requests are rounded up to this, as in PyTorch.
pub const MIN_BLOCK: usize = 512;
/// Blocks up to this size come from the small pool.
pub const SMALL_SIZE: usize = 1 << 20;
const SMALL_SEGMENT: usize = 2 << 20;
const MID_SEGMENT: usize = 20 << 20;
const MID_LIMIT: usize = 10 << 20;
const LARGE_ROUND: usize = 2 << 20;
/// Parked frees are coalesced once this many pile up.
const PARK_LIMIT: usize = 4096;
/// Stream key of memory that no stream has used yet.
const NO_STREAM: u64 = u64::MAX;

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
    /// With expandable segments: before mapping new pages that would raise reserved
    /// memory above its high-water mark, unmap as many wholly free ones, so that the
    /// reserved peak follows the allocated peak. Costs map/unmap calls on the slow path;
    /// off keeps free pages mapped until [`DevicePool::trim`] or the budget forces them
    /// out.
    pub release_on_grow: bool,
    /// How far (a fraction) reserved memory may run ahead of the allocated peak before
    /// `release_on_grow` unmaps free pages to make room for new ones. 0 keeps reserved
    /// as tight as pages allow, at the price of more map/unmap calls.
    pub reserve_slack: f64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            budget: Budget::Device,
            expandable_segments: true,
            release_on_grow: true,
            reserve_slack: 0.01,
        }
    }
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
    state: Mutex<PoolState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockState {
    Allocated,
    Free,
    Parked,
}

#[derive(Debug, Clone, Copy)]
struct Block {
    size: usize,
    requested: usize,
    seg: u32,
    prev: Option<u64>,
    next: Option<u64>,
    stream: u64,
    state: BlockState,
}

#[derive(Debug)]
enum SegMem {
    Vmm(VmmRegion),
    Plain(OwnedMemory),
}

#[derive(Debug)]
struct Segment {
    base: u64,
    size: usize,
    small: bool,
    mem: SegMem,
}

/// (small pool, stream, size, address): ordered so that a range query finds the
/// smallest fitting block of a stream (best fit), lowest address first.
type FreeKey = (bool, u64, usize, u64);

#[derive(Debug, Default)]
struct PoolState {
    segments: Vec<Option<Segment>>,
    blocks: FxHashMap<u64, Block>,
    free: BTreeSet<FreeKey>,
    parked: FxHashMap<(u64, usize), Vec<u64>>,
    n_parked: usize,
    /// Extra streams that used a block (record_stream), by block address.
    uses: FxHashMap<u64, Vec<u64>>,
    streams: FxHashMap<u64, Arc<OwnedStream>>,
    stats: PoolStats,
    reserved: usize,
    /// The most ever allocated: what `release_on_grow` measures reserved memory
    /// against (the stats' peak is the user's to reset).
    alloc_high: usize,
    /// `streams` is pruned when it reaches this many.
    streams_prune_at: usize,
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
    /// the segment cannot be released under the copy being queued; copies leave fences
    /// on the segment that unmapping waits for.
    pub(crate) fn with_end<T>(&self, f: impl FnOnce(&dyn CopyEnd) -> Result<T>) -> Result<T> {
        self.shared.epoch.check()?;
        let st = self.shared.lock();
        let b = st.blocks.get(&self.ptr.0).expect("a live block is known");
        let seg = st.segments[b.seg as usize]
            .as_ref()
            .expect("a live block's segment exists");
        let inner: &dyn CopyEnd = match &seg.mem {
            SegMem::Vmm(r) => r,
            SegMem::Plain(m) => m,
        };
        f(&SubEnd {
            inner,
            base: (self.ptr.0 - seg.base) as usize,
            len: self.len,
        })
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
        let end = |blk: &PoolBlock| -> SubEnd<'_> {
            let bl = st.blocks.get(&blk.ptr.0).expect("a live block is known");
            let seg = st.segments[bl.seg as usize]
                .as_ref()
                .expect("segment exists");
            let inner: &dyn CopyEnd = match &seg.mem {
                SegMem::Vmm(r) => r,
                SegMem::Plain(m) => m,
            };
            SubEnd {
                inner,
                base: (blk.ptr.0 - seg.base) as usize,
                len: blk.len,
            }
        };
        f(&end(a), &end(b))
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
        let b = st.blocks.get(&self.ptr.0).expect("a live block is known");
        let seg = st.segments[b.seg as usize]
            .as_ref()
            .expect("a live block's segment exists");
        f(&seg.mem, (self.ptr.0 - seg.base) as usize + offset)
    }

    /// Marks the block as used by work on `stream` as well as its own: when it is
    /// freed, its stream waits for `stream`'s work queued until then before the block
    /// is reused.
    pub fn record_stream(&self, stream: &Stream) -> Result<()> {
        self.shared.epoch.check()?;
        self.shared.check_stream(stream)?;
        let mut st = self.shared.lock();
        let own = st.blocks.get(&self.ptr.0).map(|b| b.stream);
        let key = stream.inner.id();
        if own == Some(key) {
            return Ok(());
        }
        st.streams
            .entry(key)
            .or_insert_with(|| stream.inner.clone());
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
        let expandable = cfg.expandable_segments && backend.vmm_granularity(device).is_some();
        tracing::debug!(target: "hetmem", device, budget, expandable, "device pool");
        Ok(DevicePool {
            shared: Arc::new(Shared {
                backend: backend.clone(),
                epoch,
                device,
                budget,
                expandable,
                release_on_grow: cfg.release_on_grow,
                reserve_slack: cfg.reserve_slack,
                state: Mutex::new(PoolState::default()),
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
        let rounded = size.next_multiple_of(MIN_BLOCK);
        let key = stream.inner.id();
        let mut st = sh.lock();
        // Hot path: a parked block of this size freed on this stream.
        if let Some(addr) = st.parked.get_mut(&(key, rounded)).and_then(Vec::pop) {
            st.n_parked -= 1;
            let b = st.blocks.get_mut(&addr).expect("parked blocks are known");
            b.state = BlockState::Allocated;
            b.requested = size;
            st.count_alloc(rounded, size);
            drop(st);
            return Ok(sh.block(addr, size));
        }
        let addr = sh.alloc_slow(&mut st, size, rounded, stream)?;
        drop(st);
        Ok(sh.block(addr, size))
    }

    /// Gives back every page or segment that no block uses (after synchronising the
    /// streams that used them). Returns the bytes released.
    pub fn trim(&self) -> Result<usize> {
        let sh = &self.shared;
        sh.epoch.check()?;
        let mut st = sh.lock();
        st.flush_parked();
        let before = st.reserved;
        sh.release_cached(&mut st, usize::MAX)?;
        st.forget_unused_streams();
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

    fn block(self: &Arc<Self>, addr: u64, len: usize) -> PoolBlock {
        PoolBlock {
            shared: self.clone(),
            ptr: DevicePtr(addr),
            len,
        }
    }

    fn free(&self, addr: u64) {
        let mut st = self.lock();
        let Some(b) = st.blocks.get_mut(&addr) else {
            tracing::error!(target: "hetmem", addr, "pool free of an unknown block");
            return;
        };
        if b.state != BlockState::Allocated {
            tracing::error!(target: "hetmem", addr, "pool free of a block that is not allocated");
            return;
        }
        b.state = BlockState::Parked;
        let (stream, size, requested) = (b.stream, b.size, b.requested);
        st.count_free(size, requested);
        if !st.uses.is_empty() {
            if let Some(others) = st.uses.remove(&addr) {
                if let Err(e) = self.order_after(&st, stream, &others) {
                    // The block cannot be proven free of other streams' work: keep it
                    // out of circulation rather than risk handing it out.
                    tracing::error!(target: "hetmem", addr, error = %e,
                        "ordering a multi-stream block failed; leaking it");
                    return;
                }
            }
        }
        st.parked.entry((stream, size)).or_default().push(addr);
        st.n_parked += 1;
        if st.n_parked > PARK_LIMIT {
            st.flush_parked();
        }
    }

    /// Makes `stream` wait for the work queued so far on each of `others`.
    fn order_after(&self, st: &PoolState, stream: u64, others: &[u64]) -> Result<()> {
        let own = st.streams.get(&stream).ok_or_else(|| {
            Error::InvalidArgument(format!("pool stream {stream} is not registered"))
        })?;
        for o in others {
            // Streams recorded on a live block are never forgotten (see `trim`); a
            // missing one would mean its work cannot be ordered: refuse, and the block
            // is kept out of circulation.
            let other = st.streams.get(o).ok_or_else(|| {
                Error::InvalidArgument(format!("pool stream {o} used by a block is not registered"))
            })?;
            let ev = other.record()?;
            own.wait(&ev)?;
        }
        Ok(())
    }

    fn alloc_slow(
        &self,
        st: &mut PoolState,
        size: usize,
        rounded: usize,
        stream: &Stream,
    ) -> Result<u64> {
        if rounded > self.budget {
            // Never fits: say so before reserving address space or releasing the cache.
            let e = Error::oom(Tier::Device(self.device), size, self.budget);
            return Err(self.oom(st, size, e));
        }
        let key = stream.inner.id();
        if !st.streams.contains_key(&key) {
            // A program that makes a stream per request would otherwise keep every one
            // alive here; forgetting the unused ones when their number doubles costs a
            // pass over the blocks now and then.
            if st.streams.len() >= st.streams_prune_at {
                st.forget_unused_streams();
                st.streams_prune_at = (2 * st.streams.len()).max(16);
            }
            st.streams.insert(key, stream.inner.clone());
        }
        let small = rounded <= SMALL_SIZE;
        // A free block that needs no new pages is taken without touching the parked
        // ones, which stay ready for the sizes they were freed at. Only when that fails
        // are they coalesced, before anything that maps memory.
        if let Some(found) = st.find_free(small, key, rounded) {
            if self.unmapped_pages(st, found, rounded) == 0 {
                return self.take(st, found, rounded, size, stream);
            }
        }
        st.flush_parked();
        // Before mapping fresh pages or queueing behind a busy stream: the free blocks of
        // streams with nothing left to run are anyone's (and merge with their
        // neighbours), at no wait.
        reclaim_idle(st, key);
        let mut retried = false;
        loop {
            if let Some(found) = st.find_free(small, key, rounded) {
                match self.take(st, found, rounded, size, stream) {
                    Ok(addr) => return Ok(addr),
                    // The pages under the block found did not fit; giving the cache back
                    // merges free blocks across streams, so a block that needs fewer new
                    // pages (or none) may be there now: look once more.
                    Err(Error::OutOfMemory { .. }) if !retried => {
                        // (Counted as a retry where the mapping gave the cache back.)
                        retried = true;
                        self.release_cached(st, usize::MAX)?;
                        continue;
                    }
                    Err(e @ Error::OutOfMemory { .. }) => return Err(self.oom(st, size, e)),
                    Err(e) => return Err(e),
                }
            }
            match self.grow(st, small, rounded) {
                Ok(()) => continue,
                Err(Error::OutOfMemory { .. }) if !retried => {
                    retried = true;
                    st.stats.num_alloc_retries += 1;
                    self.release_cached(st, usize::MAX)?;
                }
                Err(e @ Error::OutOfMemory { .. }) => return Err(self.oom(st, size, e)),
                Err(e) => return Err(e),
            }
        }
    }

    /// The pool's `OutOfMemory`: the request, the room left under the budget, what is
    /// reserved, and the largest free block.
    fn oom(&self, st: &mut PoolState, requested: usize, cause: Error) -> Error {
        st.stats.num_ooms += 1;
        let largest = st
            .free
            .iter()
            .map(|k| self.usable_size(st, k))
            .max()
            .unwrap_or(0);
        let device_free = match cause {
            Error::OutOfMemory { free, .. } => free,
            _ => usize::MAX,
        };
        tracing::warn!(target: "hetmem", device = self.device, requested, reserved = st.reserved,
            budget = self.budget, largest, "device pool out of memory");
        Error::OutOfMemory {
            tier: Tier::Device(self.device),
            requested,
            free: (self.budget - st.reserved.min(self.budget)).min(device_free),
            reserved: Some(st.reserved),
            largest_free_block: Some(largest),
        }
    }

    /// Bytes of a free block that could be handed out without mapping anything.
    fn usable_size(&self, st: &PoolState, key: &FreeKey) -> usize {
        let (_, _, size, addr) = *key;
        let Some(b) = st.blocks.get(&addr) else {
            return 0;
        };
        match &st.segments[b.seg as usize] {
            Some(Segment {
                mem: SegMem::Vmm(r),
                base,
                ..
            }) => {
                let mapped = pages_under(r, *base, addr, size)
                    .filter(|i| r.is_mapped(*i))
                    .count();
                (mapped * r.page_size()).min(size)
            }
            _ => size,
        }
    }

    /// Pages under `addr..addr+len` not mapped yet (0 for plain segments).
    fn unmapped_pages(&self, st: &PoolState, addr: u64, len: usize) -> usize {
        match &st.segments[st.blocks[&addr].seg as usize] {
            Some(Segment {
                mem: SegMem::Vmm(r),
                base,
                ..
            }) => pages_under(r, *base, addr, len)
                .filter(|i| !r.is_mapped(*i))
                .count(),
            _ => 0,
        }
    }

    /// Takes `rounded` bytes from the free block `addr` for `stream`: split, hand over
    /// between streams, map pages.
    fn take(
        &self,
        st: &mut PoolState,
        addr: u64,
        rounded: usize,
        size: usize,
        stream: &Stream,
    ) -> Result<u64> {
        let key = stream.inner.id();
        let b = st.blocks[&addr];
        st.free
            .remove(&(st.is_small(b.seg), b.stream, b.size, addr));
        if b.size - rounded >= MIN_BLOCK {
            let rest = addr + rounded as u64;
            let rb = Block {
                size: b.size - rounded,
                requested: 0,
                seg: b.seg,
                prev: Some(addr),
                next: b.next,
                stream: b.stream,
                state: BlockState::Free,
            };
            if let Some(n) = b.next {
                st.blocks.get_mut(&n).expect("linked").prev = Some(rest);
            }
            st.blocks.insert(rest, rb);
            st.free
                .insert((st.is_small(b.seg), b.stream, rb.size, rest));
            let bm = st.blocks.get_mut(&addr).expect("known");
            bm.size = rounded;
            bm.next = Some(rest);
        }
        // Taken from here on: releasing cached memory to make room for its pages must
        // not merge it into a neighbour.
        st.blocks.get_mut(&addr).expect("known").state = BlockState::Allocated;
        let size_now = st.blocks[&addr].size;
        if let Err(e) = self.ensure_mapped(st, addr, size_now) {
            // Put the block back as it was (free, coalesced) and report.
            st.coalesce(addr);
            return Err(e);
        }
        if b.stream != key && b.stream != NO_STREAM {
            let handed_over = match st.streams.get(&b.stream) {
                Some(prev_owner) => prev_owner.record().and_then(|ev| stream.inner.wait(&ev)),
                None => Ok(()),
            };
            if let Err(e) = handed_over {
                // Back to the free set as it was, still owned by the old stream.
                st.coalesce(addr);
                return Err(e);
            }
        }
        let bm = st.blocks.get_mut(&addr).expect("known");
        bm.state = BlockState::Allocated;
        bm.stream = key;
        bm.requested = size;
        st.count_alloc(size_now, size);
        Ok(addr)
    }

    /// Maps the pages under `addr..addr+len` that are not mapped, within the budget.
    fn ensure_mapped(&self, st: &mut PoolState, addr: u64, len: usize) -> Result<()> {
        // Pages unmapped to make room are mapped again where this block needs them rather
        // than given back to the driver and made anew; what is left over (or all of them,
        // on an error) goes back here, counted.
        let mut spare = Vec::new();
        let mapped = self.map_under(st, addr, len, &mut spare);
        give_back(st, spare);
        mapped
    }

    /// [`Shared::ensure_mapped`] with the unmapped pages kept in `spare`.
    fn map_under(
        &self,
        st: &mut PoolState,
        addr: u64,
        len: usize,
        spare: &mut Vec<PhysPage>,
    ) -> Result<()> {
        let seg = st.blocks[&addr].seg as usize;
        let (base, page, missing) = match &st.segments[seg] {
            Some(Segment {
                mem: SegMem::Vmm(r),
                base,
                ..
            }) => {
                let missing: Vec<usize> = pages_under(r, *base, addr, len)
                    .filter(|i| !r.is_mapped(*i))
                    .collect();
                (*base, r.page_size(), missing)
            }
            _ => return Ok(()),
        };
        let _ = base;
        if missing.is_empty() {
            return Ok(());
        }
        let need = missing.len() * page;
        if self.release_on_grow {
            // Unmapping costs driver calls, so free pages are given back only when mapping
            // would let reserved memory run more than the slack ahead of the most ever
            // allocated (this block included), and only as many as that takes.
            let now = st.stats.allocated_bytes.all.current as usize;
            let alloc_peak = (now + len).max(st.alloc_high);
            // `as` saturates, so a huge slack cannot overflow.
            let allowed =
                ((alloc_peak as f64 * (1.0 + self.reserve_slack)) as usize).saturating_add(page);
            let over = (st.reserved + need).saturating_sub(allowed);
            self.release_cached_into(st, over.div_ceil(page), spare)?;
        }
        if st.reserved + need > self.budget {
            st.stats.num_alloc_retries += 1;
            self.release_cached(st, usize::MAX)?;
            if st.reserved + need > self.budget {
                return Err(Error::oom(
                    Tier::Device(self.device),
                    need,
                    self.budget - st.reserved.min(self.budget),
                ));
            }
        }
        let mut retried = false;
        for p in &missing {
            let r = match &mut st.segments[seg] {
                Some(Segment {
                    mem: SegMem::Vmm(r),
                    ..
                }) => r,
                _ => unreachable!("checked above"),
            };
            let mut reused = spare.pop();
            let mapped = match r.map_page_with(*p, &mut reused) {
                // Once per call, at whichever page the driver refuses.
                Err(Error::OutOfMemory { .. }) if !retried => {
                    retried = true;
                    // The driver is short (other users of the device): give back what we
                    // cache and try once more.
                    st.stats.num_alloc_retries += 1;
                    self.release_cached(st, usize::MAX)?;
                    match &mut st.segments[seg] {
                        Some(Segment {
                            mem: SegMem::Vmm(r),
                            ..
                        }) => r.map_page_with(*p, &mut reused),
                        _ => unreachable!("checked above"),
                    }
                }
                other => other,
            };
            // A page the mapping did not take goes back to the others (and then to the
            // driver, counted).
            spare.extend(reused);
            if mapped? {
                st.stats.num_pages_moved += 1;
            } else {
                st.stats.num_device_alloc += 1;
            }
            st.reserved += page;
            st.stats
                .reserved_bytes
                .add(st.is_small(seg as u32), page as u64);
            // A region is one segment (as an expandable segment is in PyTorch), counted
            // while it has pages mapped.
            if let Some(Segment {
                mem: SegMem::Vmm(r),
                ..
            }) = &st.segments[seg]
            {
                if r.mapped_pages() == 1 {
                    st.stats.segment.add(st.is_small(seg as u32), 1);
                }
            }
        }
        Ok(())
    }

    /// Adds address space (expandable) or a segment (plain) for a `rounded`-byte block.
    fn grow(&self, st: &mut PoolState, small: bool, rounded: usize) -> Result<()> {
        if self.expandable {
            // Address space only: pages are mapped when blocks are taken. Twice the
            // budget leaves room for holes; more regions are added if even that fills.
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
            st.add_segment(base, size, small, SegMem::Vmm(region));
            return Ok(());
        }
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
        st.reserved += seg_size;
        st.stats.reserved_bytes.add(small, seg_size as u64);
        st.stats.segment.add(small, 1);
        st.stats.num_device_alloc += 1;
        st.add_segment(base, seg_size, small, SegMem::Plain(mem));
        Ok(())
    }

    /// Gives back up to `limit` pages (expandable) or every free segment (plain) that no
    /// block uses, after synchronising the streams that last used them.
    fn release_cached(&self, st: &mut PoolState, limit: usize) -> Result<()> {
        let mut pages = Vec::new();
        let released = self.release_cached_into(st, limit, &mut pages);
        give_back(st, pages);
        released
    }

    /// [`Shared::release_cached`], but unmapped pages of expandable segments are kept in
    /// `keep` (to be mapped again, or given back with [`give_back`]) rather than given
    /// back.
    fn release_cached_into(
        &self,
        st: &mut PoolState,
        limit: usize,
        keep: &mut Vec<PhysPage>,
    ) -> Result<()> {
        if limit == 0 {
            return Ok(());
        }
        st.flush_parked();
        if limit == usize::MAX {
            // Giving everything back: synchronise the streams once and merge free blocks
            // across streams, so that segments split between streams come back too.
            self.neutralise(st)?;
        }
        // Making room for growth must not stall on copies still running into the region
        // (unmapping waits for them): skip such regions then. Trim and out-of-memory
        // (`limit == MAX`) wait.
        let busy: Vec<bool> = st
            .segments
            .iter()
            .map(|sg| match sg {
                Some(Segment {
                    mem: SegMem::Vmm(r),
                    ..
                }) => limit != usize::MAX && !r.fences().all_done(),
                _ => false,
            })
            .collect();
        // Making room for growth does not wait for kernels either: only blocks whose
        // stream has finished everything queued (an event recorded now has passed) are
        // given back; the others wait for a trim or the budget. (Work queued on the
        // stream later never touches a block freed before it.)
        let mut idle: FxHashMap<u64, bool> = FxHashMap::default();
        let streams = &st.streams;
        let mut is_idle = |stream: u64| -> bool {
            *idle.entry(stream).or_insert_with(|| {
                streams
                    .get(&stream)
                    .is_none_or(|s| s.record().and_then(|e| e.is_done()).unwrap_or(false))
            })
        };
        // Candidates: (segment, page or None for a whole segment, owning stream).
        let mut cands: Vec<(usize, Option<usize>, u64)> = Vec::new();
        for &(_, stream, size, addr) in &st.free {
            if limit != usize::MAX && stream != NO_STREAM && !is_idle(stream) {
                continue;
            }
            let b = &st.blocks[&addr];
            let seg = b.seg as usize;
            match &st.segments[seg] {
                Some(Segment {
                    mem: SegMem::Vmm(r),
                    base,
                    ..
                }) if !busy[seg] => {
                    let p = r.page_size();
                    let off = (addr - base) as usize;
                    let first = off.div_ceil(p);
                    let end = (off + size) / p;
                    for page in first..end {
                        if r.is_mapped(page) {
                            cands.push((seg, Some(page), stream));
                        }
                    }
                }
                Some(Segment {
                    mem: SegMem::Plain(_),
                    ..
                }) if b.prev.is_none() && b.next.is_none() => {
                    cands.push((seg, None, stream));
                }
                _ => {}
            }
            if cands.len() >= limit {
                break;
            }
        }
        cands.truncate(limit);
        if cands.is_empty() {
            return Ok(());
        }
        // Work queued before the blocks were freed may still touch them (streams found
        // idle above have none).
        let mut synced: Vec<u64> = Vec::new();
        for &(_, _, stream) in &cands {
            if stream != NO_STREAM && !synced.contains(&stream) && limit == usize::MAX {
                if let Some(s) = st.streams.get(&stream) {
                    s.synchronize()?;
                }
                synced.push(stream);
            }
        }
        if !synced.is_empty() {
            st.stats.num_sync_all_streams += 1;
        }
        for (seg, page, _) in cands {
            let small = st.is_small(seg as u32);
            match page {
                Some(page) => {
                    let Some(Segment {
                        mem: SegMem::Vmm(r),
                        ..
                    }) = &mut st.segments[seg]
                    else {
                        continue;
                    };
                    let p = r.page_size();
                    keep.extend(r.unmap_page_keep(page)?);
                    let emptied = r.mapped_pages() == 0;
                    st.reserved -= p;
                    st.stats.reserved_bytes.sub(small, p as u64);
                    if emptied {
                        st.stats.segment.sub(small, 1);
                    }
                }
                None => {
                    let Some(s) = st.segments[seg].take() else {
                        continue;
                    };
                    st.free
                        .remove(&(small, st.blocks[&s.base].stream, s.size, s.base));
                    st.blocks.remove(&s.base);
                    st.reserved -= s.size;
                    st.stats.reserved_bytes.sub(small, s.size as u64);
                    st.stats.segment.sub(small, 1);
                    st.stats.num_device_free += 1;
                    drop(s); // frees the device memory
                }
            }
        }
        Ok(())
    }
}

/// Makes the free blocks of every stream but `except` whose queued work is all done
/// unowned, and merges them with their free neighbours: nothing can still touch them
/// (a block is freed after the work that used it was queued, and a block used on other
/// streams made its own stream wait for them when it was freed). Waits for nothing.
fn reclaim_idle(st: &mut PoolState, except: u64) {
    let owners: rustc_hash::FxHashSet<u64> = st
        .free
        .iter()
        .map(|k| k.1)
        .filter(|s| *s != NO_STREAM && *s != except)
        .collect();
    let idle: Vec<u64> = owners
        .into_iter()
        .filter(|o| {
            st.streams
                .get(o)
                .is_some_and(|s| s.record().and_then(|e| e.is_done()).unwrap_or(false))
        })
        .collect();
    if idle.is_empty() {
        return;
    }
    let addrs: Vec<(bool, u64, usize, u64)> = st
        .free
        .iter()
        .filter(|k| idle.contains(&k.1))
        .copied()
        .collect();
    for &k in &addrs {
        st.free.remove(&k);
        st.blocks
            .get_mut(&k.3)
            .expect("free blocks are known")
            .stream = NO_STREAM;
        st.free.insert((k.0, NO_STREAM, k.2, k.3));
    }
    for (_, _, _, a) in addrs {
        // A neighbour merged in an earlier round is gone from under its address.
        if st
            .blocks
            .get(&a)
            .is_some_and(|b| b.state == BlockState::Free)
        {
            let b = st.blocks[&a];
            st.free.remove(&(st.is_small(b.seg), b.stream, b.size, a));
            st.coalesce(a);
        }
    }
}

/// Gives unmapped physical pages back to the driver, counted as device frees.
fn give_back(st: &mut PoolState, pages: Vec<PhysPage>) {
    st.stats.num_device_free += pages.len() as u64;
    drop(pages);
}

impl Shared {
    /// Synchronises every stream that owns free blocks, then makes those blocks
    /// unowned and coalesces them with each other.
    fn neutralise(&self, st: &mut PoolState) -> Result<()> {
        let owners: rustc_hash::FxHashSet<u64> = st
            .free
            .iter()
            .map(|k| k.1)
            .filter(|s| *s != NO_STREAM)
            .collect();
        if owners.is_empty() {
            return Ok(());
        }
        for o in &owners {
            if let Some(s) = st.streams.get(o) {
                s.synchronize()?;
            }
        }
        st.stats.num_sync_all_streams += 1;
        let mut addrs: Vec<u64> = st.free.iter().map(|k| k.3).collect();
        addrs.sort_unstable();
        st.free.clear();
        for a in &addrs {
            st.blocks.get_mut(a).expect("free blocks are known").stream = NO_STREAM;
        }
        for a in addrs {
            if st
                .blocks
                .get(&a)
                .is_some_and(|b| b.state == BlockState::Free)
            {
                st.coalesce(a);
            }
        }
        Ok(())
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
        for s in st.streams.values() {
            if let Err(e) = s.synchronize() {
                tracing::warn!(target: "hetmem", error = %e, "synchronising a stream before dropping a pool failed");
            }
        }
    }
}

impl PoolState {
    fn is_small(&self, seg: u32) -> bool {
        self.segments[seg as usize]
            .as_ref()
            .is_some_and(|s| s.small)
    }

    fn add_segment(&mut self, base: u64, size: usize, small: bool, mem: SegMem) {
        let seg = self
            .segments
            .iter()
            .position(Option::is_none)
            .unwrap_or_else(|| {
                self.segments.push(None);
                self.segments.len() - 1
            });
        self.segments[seg] = Some(Segment {
            base,
            size,
            small,
            mem,
        });
        self.blocks.insert(
            base,
            Block {
                size,
                requested: 0,
                seg: seg as u32,
                prev: None,
                next: None,
                stream: NO_STREAM,
                state: BlockState::Free,
            },
        );
        self.free.insert((small, NO_STREAM, size, base));
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

    /// The smallest free block of at least `size` bytes: first the stream's own, then
    /// untouched memory, then another stream's (which costs a hand-over).
    fn find_free(&self, small: bool, stream: u64, size: usize) -> Option<u64> {
        let fit = |s: u64| {
            self.free
                .range((small, s, size, 0)..=(small, s, usize::MAX, u64::MAX))
                .next()
                .map(|k| k.3)
        };
        fit(stream).or_else(|| fit(NO_STREAM)).or_else(|| {
            self.streams
                .keys()
                .filter(|s| **s != stream)
                .filter_map(|s| fit(*s).map(|a| (self.blocks[&a].size, a)))
                .min()
                .map(|(_, a)| a)
        })
    }

    /// Coalesces every parked block into the free set.
    /// Drops the streams that own no block and are recorded on none: nothing needs
    /// ordering after them any more.
    fn forget_unused_streams(&mut self) {
        let in_use: rustc_hash::FxHashSet<u64> = self
            .blocks
            .values()
            .map(|b| b.stream)
            .chain(self.uses.values().flatten().copied())
            .collect();
        self.streams.retain(|k, _| in_use.contains(k));
    }

    fn flush_parked(&mut self) {
        if self.n_parked == 0 {
            return;
        }
        // Drained, keys and all: one per (stream, size) ever freed would pile up.
        let parked: Vec<u64> = self.parked.drain().flat_map(|(_, v)| v).collect();
        self.n_parked = 0;
        for addr in parked {
            self.coalesce(addr);
        }
    }

    /// Marks `addr` free and merges it with free neighbours of a compatible stream.
    fn coalesce(&mut self, addr: u64) {
        let mut b = self.blocks[&addr];
        let small = self.is_small(b.seg);
        let mut start = addr;
        b.state = BlockState::Free;
        if let Some(p) = b.prev {
            let pb = self.blocks[&p];
            if pb.state == BlockState::Free && compatible(pb.stream, b.stream) {
                self.free.remove(&(small, pb.stream, pb.size, p));
                self.blocks.remove(&addr);
                b.size += pb.size;
                b.prev = pb.prev;
                start = p;
            }
        }
        if let Some(n) = b.next {
            let nb = self.blocks[&n];
            if nb.state == BlockState::Free && compatible(nb.stream, b.stream) {
                self.free.remove(&(small, nb.stream, nb.size, n));
                self.blocks.remove(&n);
                b.size += nb.size;
                b.next = nb.next;
            }
        }
        if let Some(n) = b.next {
            self.blocks.get_mut(&n).expect("linked").prev = Some(start);
        }
        b.requested = 0;
        self.blocks.insert(start, b);
        self.free.insert((small, b.stream, b.size, start));
    }
}

/// The pages of region `r` (based at `base`) that `addr..addr+len` touches.
fn pages_under(r: &VmmRegion, base: u64, addr: u64, len: usize) -> std::ops::RangeInclusive<usize> {
    let p = r.page_size();
    let off = (addr - base) as usize;
    off / p..=(off + len - 1) / p
}

/// Whether free blocks owned by `a` and `b` may merge: only of one owner. A stream's
/// freed block merged into untouched memory would make all of it that stream's, and
/// another stream taking any of it would then wait for the first one's queued work.
fn compatible(a: u64, b: u64) -> bool {
    a == b
}
