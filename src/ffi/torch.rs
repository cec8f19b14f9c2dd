//! PyTorch's pluggable allocator: `hetmem_torch_malloc` / `hetmem_torch_free`, the
//! two symbols `torch.cuda.memory.CUDAPluggableAllocator(path, "hetmem_torch_malloc",
//! "hetmem_torch_free")` loads; and the entry points of the hooks its C++ class has but
//! its Python class does not set (`python/hetmem/torch_hooks.cpp` sets them):
//! `hetmem_torch_record_stream` (`tensor.record_stream`), `hetmem_torch_empty_cache`
//! (`torch.cuda.empty_cache()`), and the graph-pool hooks (`torch.cuda.graph`: the
//! device pool's private pools).
//!
//! (Over 800 lines, about 330 of them the tests of the hooks, kept beside them.)
//!
//! One process-wide [`Manager`] (backend from `HETMEM_BACKEND`, else the first GPU
//! backend that opens, never the simulator: [`gpu_only`](crate::manager::ManagerBuilder::gpu_only)), built on
//! the first call; one [`DevicePool`] per device with
//! [`PoolConfig::default`]; the live blocks by address; and each raw stream PyTorch
//! passes, wrapped once ([`Stream::wrap`]) and kept.
//!
//! Stream semantics are PyTorch's: a block belongs to the stream it was allocated for;
//! freed, it may be reused at once on that stream, and on another stream only after
//! the work queued on its stream before the free (the pool makes the new stream wait
//! for an event, without a host sync).
//!
//! The stream argument is the driver's value, with the driver's meaning. PyTorch passes
//! its current stream: 0 for its default stream (the legacy default stream, which the
//! driver orders against blocking streams only; PyTorch's side streams are
//! non-blocking, so hand-overs between them and 0 go behind events here, as in
//! PyTorch's own allocator), or 2 (`cudaStreamPerThread`, in a build with per-thread
//! default streams): one value, but each calling thread's own stream, and the pool
//! keeps them apart (a block freed by one thread's stream reaches another thread's
//! only behind an event, see [`Stream::wrap`]). A block freed on another thread than
//! the one that allocated it on stream 2 is handed on after a device-wide wait.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Mutex;

use rustc_hash::FxHashMap;

use super::{
    call, call_with, device_arg, json_array, json_object, json_str, last_error_message, lock,
    write_c_text, FfiError, FfiResult, HETMEM_ERR_FOREIGN_POINTER,
};
use crate::backend::check_device;
use crate::manager::Manager;
use crate::pool::{DevicePool, PoolBlock, PoolConfig, PrivatePoolId};
use crate::stream::Stream;

/// The allocator's state, built on first use.
struct Torch {
    mgr: Manager,
    /// By device.
    pools: Vec<Option<DevicePool>>,
    /// (device, raw stream) → the stream wrapped.
    streams: FxHashMap<(usize, u64), Stream>,
    /// Live blocks by address.
    blocks: FxHashMap<u64, PoolBlock>,
}

static TORCH: Mutex<Option<Torch>> = Mutex::new(None);

impl Torch {
    fn new() -> FfiResult<Torch> {
        // Never the simulator by automatic choice: PyTorch would get addresses no kernel
        // can use, and crash far from the cause.
        let mgr = Manager::builder().gpu_only().build()?;
        tracing::info!(target: "hetmem::ffi", backend = %mgr.backend_kind(),
            "PyTorch allocator ready");
        Ok(Torch::with_manager(mgr))
    }

    fn with_manager(mgr: Manager) -> Torch {
        let n = mgr.devices().len();
        Torch {
            mgr,
            pools: (0..n).map(|_| None).collect(),
            streams: FxHashMap::default(),
            blocks: FxHashMap::default(),
        }
    }

    fn pool(&mut self, device: usize) -> FfiResult<DevicePool> {
        check_device(self.mgr.backend(), device)?;
        if let Some(p) = &self.pools[device] {
            return Ok(p.clone());
        }
        let p = self.mgr.device_pool(device, PoolConfig::default())?;
        self.pools[device] = Some(p.clone());
        Ok(p)
    }

    fn stream(&mut self, device: usize, raw: u64) -> FfiResult<Stream> {
        if let Some(s) = self.streams.get(&(device, raw)) {
            return Ok(s.clone());
        }
        // PyTorch's streams come from pools that live as long as the process; the header
        // states the contract for other callers (live until `hetmem_torch_empty_cache`
        // lets go of it, when nothing allocated on it is cached, or the process ends).
        // SAFETY: PyTorch passes a live stream of `device` from the driver the manager
        // uses (its current stream, 0 for the default one), kept live as above.
        let s = unsafe { Stream::wrap(&self.mgr, device, raw)? };
        self.streams.insert((device, raw), s.clone());
        Ok(s)
    }

    /// The address of the live block that contains `addr`. PyTorch passes a storage's
    /// base (a block's own address: one hash look-up); an address inside a block costs a
    /// scan of the live blocks, which only other callers pay.
    fn block_containing(&self, addr: u64) -> Option<u64> {
        if self.blocks.contains_key(&addr) {
            return Some(addr);
        }
        self.blocks
            .iter()
            .find(|(&base, b)| addr > base && addr - base < b.len() as u64)
            .map(|(&base, _)| base)
    }
}

/// Runs `f` on the allocator's state, building it first if needed.
fn with_torch<T>(f: impl FnOnce(&mut Torch) -> FfiResult<T>) -> FfiResult<T> {
    let mut slot = lock(&TORCH);
    if slot.is_none() {
        *slot = Some(Torch::new()?);
    }
    let t = slot
        .as_mut()
        .ok_or_else(|| FfiError::invalid("the allocator is not initialised"))?;
    f(t)
}

/// Allocates `size` bytes on `device` for use on `stream` (a `cudaStream_t` /
/// `hipStream_t`; NULL for the default stream, 2 for the calling thread's per-thread
/// default stream) from hetmem's device pool: the entry
/// point PyTorch's `CUDAPluggableAllocator` calls. Returns the device address, or NULL
/// with the last error set (out of memory, bad device, negative size). Size 0 returns
/// NULL and is not an error (PyTorch gives empty storage no memory).
///
/// # Safety
/// `stream` is NULL or a live stream of `device` from the driver hetmem uses, and stays
/// live until `hetmem_torch_empty_cache` (called when nothing allocated on it is live)
/// or the end of the process; PyTorch's streams do.
#[no_mangle]
pub unsafe extern "C" fn hetmem_torch_malloc(
    size: isize,
    device: c_int,
    stream: *mut c_void,
) -> *mut c_void {
    call_with("hetmem_torch_malloc", std::ptr::null_mut(), || {
        let size = usize::try_from(size).map_err(|_| crate::Error::InvalidSize {
            requested: 0,
            reason: "negative size",
        })?;
        if size == 0 {
            return Ok(std::ptr::null_mut());
        }
        let device = device_arg(device, "device")?;
        let raw = stream.addr() as u64;
        let addr = with_torch(|t| {
            let pool = t.pool(device)?;
            let s = t.stream(device, raw)?;
            let block = pool.alloc(size, &s)?;
            let addr = block.ptr().0;
            if let Some(old) = t.blocks.insert(addr, block) {
                // A pool never hands out a live block twice; keep the old one rather
                // than free memory that PyTorch still uses.
                tracing::error!(target: "hetmem::ffi", addr, "a live block was handed out again");
                std::mem::forget(old);
            }
            Ok(addr)
        })?;
        Ok(std::ptr::with_exposed_provenance_mut(addr as usize))
    })
}

/// [`hetmem_torch_malloc`] for C++ callers, whose interface has no error return:
/// PyTorch's `CUDAPluggableAllocator` uses a NULL it gets back as the tensor's address,
/// and the first kernel to touch it faults on the device. Where
/// [`hetmem_torch_malloc`] would return NULL for a size above 0, this throws
/// `std::runtime_error` with the last error message instead (PyTorch raises it in Python as
/// a `RuntimeError`); it returns NULL only where the process has no libstdc++ loaded.
/// Size 0 returns NULL, as PyTorch expects.
///
/// # Safety
/// As [`hetmem_torch_malloc`]; and the caller is C++ that lets the exception reach a
/// `catch` (PyTorch's Python bindings catch it).
#[no_mangle]
pub unsafe extern "C-unwind" fn hetmem_torch_malloc_cxx(
    size: isize,
    device: c_int,
    stream: *mut c_void,
) -> *mut c_void {
    // SAFETY: the caller's contract is hetmem_torch_malloc's.
    let p = unsafe { hetmem_torch_malloc(size, device, stream) };
    if p.is_null() && size > 0 {
        // "hetmem_torch_malloc: out of memory on device 0: requested ..." (the slot is
        // gone at a thread's exit: say at least what failed).
        let mut message = last_error_message();
        if message.is_empty() {
            message = c"hetmem_torch_malloc failed".to_owned();
        }
        // SAFETY: this function is "C-unwind" and outside any catch_unwind (the
        // allocation's guard has returned), and its caller expects C++ exceptions.
        unsafe { hetmem_sys::cxx::throw_runtime_error(&message) };
    }
    p
}

/// Gives back memory from [`hetmem_torch_malloc`]; it may be reused at once on the
/// stream it was allocated for, and on other streams after the work queued on that
/// stream until now. NULL is ignored; an address hetmem did not hand out (or freed
/// already) is logged and ignored, with the last error set.
///
/// # Safety
/// `ptr` may be any value: it is only looked up. `size`, `device` and `stream` are
/// PyTorch's record of the allocation and only logged when they disagree with hetmem's.
#[no_mangle]
pub unsafe extern "C" fn hetmem_torch_free(
    ptr: *mut c_void,
    size: isize,
    device: c_int,
    stream: *mut c_void,
) {
    call_with("hetmem_torch_free", (), || {
        if ptr.is_null() {
            return Ok(());
        }
        let addr = ptr.addr() as u64;
        let block = {
            let mut slot = lock(&TORCH);
            slot.as_mut().and_then(|t| t.blocks.remove(&addr))
        };
        let Some(block) = block else {
            tracing::error!(target: "hetmem::ffi", addr, size, device,
                "hetmem_torch_free of an address hetmem_torch_malloc did not return");
            return Err(FfiError::new(
                HETMEM_ERR_FOREIGN_POINTER,
                format!("{addr:#x} was not returned by hetmem_torch_malloc, or was freed already"),
            ));
        };
        if usize::try_from(size).ok() != Some(block.len())
            || usize::try_from(device).ok() != Some(block.device())
        {
            tracing::debug!(target: "hetmem::ffi", addr, size, device, stream = ?stream,
                len = block.len(), "hetmem_torch_free: size or device differ from the allocation");
        }
        // Dropped outside the allocator's lock: the pool parks it on its stream.
        drop(block);
        Ok(())
    })
}

/// Marks the block that contains `ptr` (from [`hetmem_torch_malloc`]) as used by the
/// work queued on `stream` too (`tensor.record_stream(stream)` in PyTorch): once it is
/// freed, it is not reused, on any stream, before the work queued on `stream` until
/// the free is done (the reusing stream waits for an event, without a host sync).
/// Recording the block's own stream, or a stream twice, changes nothing. NULL is
/// ignored (PyTorch's empty tensors have no memory).
///
/// Returns 0, or FOREIGN_POINTER (an address in no live block of hetmem_torch_malloc:
/// never allocated there, or freed already; PyTorch's hook ignores it, as PyTorch's own
/// allocator ignores memory it did not make), UNKNOWN_DEVICE, INVALID_ARGUMENT (a
/// stream of another device, on the simulator).
///
/// # Safety
/// `ptr` may be any value: it is only looked up. `stream` is as for
/// [`hetmem_torch_malloc`] (NULL or a live stream of the block's device, kept live as
/// said there).
#[no_mangle]
pub unsafe extern "C" fn hetmem_torch_record_stream(
    ptr: *mut c_void,
    stream: *mut c_void,
) -> c_int {
    call("hetmem_torch_record_stream", || {
        if ptr.is_null() {
            return Ok(());
        }
        let addr = ptr.addr() as u64;
        let raw = stream.addr() as u64;
        let mut slot = lock(&TORCH);
        let t = slot.as_mut().ok_or_else(|| not_ours(addr))?;
        let base = t.block_containing(addr).ok_or_else(|| not_ours(addr))?;
        let device = t.blocks[&base].device();
        let s = t.stream(device, raw)?;
        t.blocks[&base].record_stream(&s)?;
        tracing::trace!(target: "hetmem::ffi", addr, stream = raw, "record_stream");
        Ok(())
    })
}

fn not_ours(addr: u64) -> FfiError {
    FfiError::new(
        HETMEM_ERR_FOREIGN_POINTER,
        format!("{addr:#x} is in no live block of hetmem_torch_malloc (freed already, or another allocator's)"),
    )
}

/// A graph pool's filter (`hetmem_stream_filter` in the header): 1 when an allocation
/// on `stream` (the raw stream PyTorch passed to [`hetmem_torch_malloc`]) goes to the
/// pool, 0 when not, negative when it failed (the allocation then fails).
pub type StreamFilterFn = unsafe extern "C" fn(ctx: *mut c_void, stream: *mut c_void) -> c_int;
/// Lets go of a filter's context.
pub type DropCtxFn = unsafe extern "C" fn(ctx: *mut c_void);

/// The caller's filter and its context, owned by a route of the pool: the context is
/// let go of (`drop_ctx`) when the route ends, exactly once.
struct CFilter {
    filter: Option<StreamFilterFn>,
    ctx: *mut c_void,
    drop_ctx: Option<DropCtxFn>,
}

// SAFETY: `hetmem_torch_begin_allocate_to_pool`'s contract: the filter and drop_ctx may
// be called from any thread with this context, which hetmem only passes back to them.
unsafe impl Send for CFilter {}
// SAFETY: as for Send: the filter is called concurrently only as the contract allows.
unsafe impl Sync for CFilter {}

impl CFilter {
    fn picks(&self, stream: &Stream) -> crate::Result<bool> {
        let Some(f) = self.filter else {
            return Ok(true);
        };
        let raw: *mut c_void = std::ptr::with_exposed_provenance_mut(stream.raw() as usize);
        // SAFETY: the caller's contract: `f` takes this context and any stream value,
        // from any thread, and does not unwind (C++ callers catch in it).
        match unsafe { f(self.ctx, raw) } {
            0 => Ok(false),
            rc if rc > 0 => Ok(true),
            rc => Err(crate::Error::InvalidArgument(format!(
                "the graph pool's stream filter failed ({rc}) for stream {:#x}",
                stream.raw()
            ))),
        }
    }
}

impl Drop for CFilter {
    fn drop(&mut self) {
        if let Some(d) = self.drop_ctx {
            // SAFETY: the caller's contract: drop_ctx takes this context, once.
            unsafe { d(self.ctx) };
        }
    }
}

/// PyTorch's `beginAllocateToPool(device, pool, filter)` (`torch.cuda.graph`,
/// `torch.cuda.use_mem_pool`, `torch.compile(mode="reduce-overhead")`): from now on,
/// the allocations on `device` whose stream `filter` picks come from the private pool
/// `(pool_a, pool_b)` (PyTorch's `MempoolId_t`, made on first use; each begin counts
/// a use), until [`hetmem_torch_end_allocate_to_pool`]. Blocks of the pool, freed, are
/// reused only by its own later allocations until [`hetmem_torch_release_pool`] has
/// undone every begin: the graph replays into their addresses
/// ([`DevicePool::begin_allocate_to_pool`]).
///
/// `filter(ctx, stream)` is called on every allocation of the device while any pool of
/// it is being allocated to, with the raw stream the allocation is for (NULL for the
/// default stream); 1 sends it to the pool, 0 does not, negative fails the allocation.
/// NULL sends every allocation of the device. hetmem owns `ctx` from this call on,
/// failed or not: it calls `drop_ctx(ctx)` (if not NULL) exactly once, at the end of
/// the routing or at once when this call fails.
///
/// Returns 0, or INVALID_ARGUMENT (allocations already go to this pool),
/// UNKNOWN_DEVICE, and the errors of building the allocator.
///
/// # Safety
/// `filter` and `drop_ctx` are NULL or functions of these signatures that may be called
/// from any thread (the filter also concurrently, under hetmem's locks: it must not
/// call hetmem) and do not unwind; `ctx` is whatever they accept.
#[no_mangle]
pub unsafe extern "C" fn hetmem_torch_begin_allocate_to_pool(
    device: c_int,
    pool_a: u64,
    pool_b: u64,
    filter: Option<StreamFilterFn>,
    ctx: *mut c_void,
    drop_ctx: Option<DropCtxFn>,
) -> c_int {
    // Owned from here, whatever happens below (dropped at the end or on failure).
    let owned = CFilter {
        filter,
        ctx,
        drop_ctx,
    };
    call("hetmem_torch_begin_allocate_to_pool", move || {
        let device = device_arg(device, "device")?;
        let id = PrivatePoolId(pool_a, pool_b);
        let pool = with_torch(|t| t.pool(device))?;
        pool.begin_allocate_to_pool_with(id, Box::new(move |s| owned.picks(s)))?;
        tracing::debug!(target: "hetmem::ffi", device, pool_a, pool_b, "begin_allocate_to_pool");
        Ok(())
    })
}

/// PyTorch's `endAllocateToPool(device, pool)`, once the capture has ended: allocations
/// stop going to the pool (its memory stays its own until released), and the filter's
/// context is let go of. Returns 0, or INVALID_ARGUMENT when allocations do not go to
/// that pool on `device`.
#[no_mangle]
pub extern "C" fn hetmem_torch_end_allocate_to_pool(
    device: c_int,
    pool_a: u64,
    pool_b: u64,
) -> c_int {
    call("hetmem_torch_end_allocate_to_pool", || {
        let device = device_arg(device, "device")?;
        let pool = existing_pool(device).ok_or_else(|| {
            FfiError::invalid(format!(
                "no graph pool ({pool_a}, {pool_b}) is being allocated to on device {device}"
            ))
        })?;
        pool.end_allocate_to_pool(PrivatePoolId(pool_a, pool_b))?;
        Ok(())
    })
}

/// PyTorch's `releasePool(device, pool)`, when a graph (or memory pool) that used the
/// pool is reset or destroyed: undoes one begin. When none is left, the pool's memory
/// goes back to the common pool (its free blocks at once, after the device has been
/// synchronised since replays may still run; its live ones when freed), and
/// `torch.cuda.empty_cache()` can then give it to the driver. A pool hetmem does not
/// have (released already, or never begun: PyTorch's `MemPool` releases its id when
/// destroyed) is no error. Returns 0, or INVALID_ARGUMENT while the pool is still being
/// allocated to, DRIVER when synchronising the device failed. PyTorch calls it from
/// destructors: its C++ hook prints a failure, never throws.
#[no_mangle]
pub extern "C" fn hetmem_torch_release_pool(device: c_int, pool_a: u64, pool_b: u64) -> c_int {
    call("hetmem_torch_release_pool", || {
        let device = device_arg(device, "device")?;
        let id = PrivatePoolId(pool_a, pool_b);
        let Some(pool) = existing_pool(device).filter(|p| p.private_pool(id).is_some()) else {
            tracing::debug!(target: "hetmem::ffi", device, pool_a, pool_b,
                "release of a graph pool hetmem does not have");
            return Ok(());
        };
        pool.release_pool(id)?;
        Ok(())
    })
}

/// The device pool of `device` if the allocator has made one.
fn existing_pool(device: usize) -> Option<DevicePool> {
    lock(&TORCH)
        .as_ref()
        .and_then(|t| t.pools.get(device).cloned().flatten())
}

/// Gives every cached, unused page or segment of every pool back to the driver, and
/// lets go of wrapped streams that nothing allocated on them uses any more (PyTorch's
/// `torch.cuda.empty_cache()`).
#[no_mangle]
pub extern "C" fn hetmem_torch_empty_cache() -> c_int {
    call("hetmem_torch_empty_cache", || {
        let mut slot = lock(&TORCH);
        let Some(t) = slot.as_mut() else {
            return Ok(());
        };
        let mut released = 0usize;
        for p in t.pools.iter().flatten() {
            released += p.trim()?;
        }
        // A wrapped stream held only by this cache is used by no block (nor are its
        // per-thread views, for stream 2): forget it.
        t.streams.retain(|_, s| s.in_use_elsewhere());
        tracing::debug!(target: "hetmem::ffi", released, "empty_cache");
        Ok(())
    })
}

/// Writes the allocator's stats as NUL-terminated JSON into `buf` if it fits in `cap`
/// bytes; `*needed` (if not NULL) is always set to the bytes needed, NUL included.
/// Keys: `backend` (null before the first allocation), `live_blocks`, `live_bytes`,
/// `streams`, and `devices`: per pool `device`, `budget`, `reserved`, `private_pools`
/// (graph pools not yet released: `id` as `[a, b]`, `uses`, `allocating`,
/// `allocated_bytes`, `free_bytes`), and `stats` with PyTorch's `memory_stats()` key
/// names (`allocated_bytes.all.current`, ...).
///
/// # Safety
/// `buf` is NULL or valid for `cap` bytes of writes; `needed` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn hetmem_torch_stats_json(
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> c_int {
    call("hetmem_torch_stats_json", || {
        let json = {
            let slot = lock(&TORCH);
            match slot.as_ref() {
                None => json_object([
                    ("backend", "null".to_owned()),
                    ("live_blocks", "0".to_owned()),
                    ("live_bytes", "0".to_owned()),
                    ("streams", "0".to_owned()),
                    ("devices", "[]".to_owned()),
                ]),
                Some(t) => {
                    let devices = t.pools.iter().flatten().map(|p| {
                        let stats = p.stats().to_map();
                        let private = p.private_pools().into_iter().map(|(id, ps)| {
                            json_object([
                                ("id", json_array([id.0.to_string(), id.1.to_string()])),
                                ("uses", ps.uses.to_string()),
                                ("allocating", ps.allocating.to_string()),
                                ("allocated_bytes", ps.allocated_bytes.to_string()),
                                ("free_bytes", ps.free_bytes.to_string()),
                            ])
                        });
                        json_object([
                            ("device", p.device().to_string()),
                            ("budget", p.budget().to_string()),
                            ("reserved", p.reserved().to_string()),
                            ("private_pools", json_array(private)),
                            (
                                "stats",
                                json_object(stats.iter().map(|(k, v)| (k, v.to_string()))),
                            ),
                        ])
                    });
                    json_object([
                        ("backend", json_str(t.mgr.backend_kind().name())),
                        ("live_blocks", t.blocks.len().to_string()),
                        (
                            "live_bytes",
                            t.blocks
                                .values()
                                .map(PoolBlock::len)
                                .sum::<usize>()
                                .to_string(),
                        ),
                        ("streams", t.streams.len().to_string()),
                        ("devices", json_array(devices)),
                    ])
                }
            }
        };
        // SAFETY: the caller's contract.
        unsafe { write_c_text(&json, buf, cap, needed) }
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;
    use std::time::Duration;

    use super::*;
    use crate::ffi::{
        hetmem_last_error, HETMEM_ERR_INVALID_ARGUMENT, HETMEM_ERR_STREAM_CAPTURING, HETMEM_OK,
    };
    use crate::{BackendKind, SimConfig};

    const MIB: usize = 1 << 20;

    /// The allocator's state is process-wide: these tests take turns with it.
    static TURN: Mutex<()> = Mutex::new(());

    fn last_error() -> String {
        // SAFETY: hetmem_last_error returns a live NUL-terminated string.
        unsafe { CStr::from_ptr(hetmem_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    fn raw(s: &Stream) -> *mut c_void {
        std::ptr::with_exposed_provenance_mut(s.handle().0 as usize)
    }

    /// A simulator whose streams the test can see, installed as the allocator's state
    /// (what `Torch::new` builds from `HETMEM_BACKEND`, with the manager kept here).
    fn on_sim() -> Manager {
        let mgr = Manager::builder()
            .backend(BackendKind::Sim)
            .sim_config(SimConfig::with_devices(1, 1 << 30))
            .build()
            .unwrap();
        *lock(&TORCH) = Some(Torch::with_manager(mgr.clone()));
        mgr
    }

    #[test]
    fn record_stream_keeps_a_freed_block_from_work_still_queued_on_the_recorded_stream() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let mgr = on_sim();
        let sim = mgr.sim().unwrap();
        let (a, b) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
        let n = MIB as isize;
        // SAFETY: a and b are live sim streams of device 0; the
        // pointers are the allocator's own or only looked up.
        unsafe {
            // Without record_stream: a block that b still reads is reused at once on a,
            // and a does not wait for b (the silent reuse record_stream exists to stop).
            let p = hetmem_torch_malloc(n, 0, raw(&a));
            assert!(!p.is_null(), "{}", last_error());
            let k = sim
                .launch_kernel(b.handle(), Duration::from_millis(3))
                .unwrap();
            hetmem_torch_free(p, n, 0, raw(&a));
            let q = hetmem_torch_malloc(n, 0, raw(&a));
            assert_eq!(q, p, "reused at once on its own stream");
            assert!(sim.stream_time_ns(a.handle()).unwrap() < k.end_ns);

            // With it: b's work queued before the free is done before a's next use.
            assert_eq!(
                hetmem_torch_record_stream(q, raw(&b)),
                HETMEM_OK,
                "{}",
                last_error()
            );
            // Twice, the block's own stream, an address inside the block: no change.
            assert_eq!(hetmem_torch_record_stream(q, raw(&b)), HETMEM_OK);
            assert_eq!(hetmem_torch_record_stream(q, raw(&a)), HETMEM_OK);
            let inside = q.cast::<u8>().wrapping_add(4096).cast::<c_void>();
            assert_eq!(hetmem_torch_record_stream(inside, raw(&b)), HETMEM_OK);
            let k = sim
                .launch_kernel(b.handle(), Duration::from_millis(3))
                .unwrap();
            hetmem_torch_free(q, n, 0, raw(&a));
            let r = hetmem_torch_malloc(n, 0, raw(&a));
            assert!(!r.is_null(), "{}", last_error());
            let a_at = sim.stream_time_ns(a.handle()).unwrap();
            assert!(
                r != q || a_at >= k.end_ns,
                "the block went back to a at {a_at} ns while b used it until {} ns",
                k.end_ns
            );
            // A recorded stream is a stream of the allocator's until empty_cache.
            hetmem_torch_free(r, n, 0, raw(&a));
            assert_eq!(hetmem_torch_empty_cache(), HETMEM_OK);
        }
        *lock(&TORCH) = None;
    }

    /// PyTorch's stream argument 2 (`cudaStreamPerThread`) from two threads: two
    /// streams. A block freed by one thread's stream with a kernel still running on it
    /// is not the other thread's at once (it gets other memory, or waits for the
    /// kernel).
    #[test]
    fn per_thread_stream_2_is_a_stream_per_calling_thread() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let mgr = on_sim();
        let sim = mgr.sim().unwrap();
        // The test's own handle of the same stream, for the simulator's kernels.
        // SAFETY: every thread has a per-thread stream on device 0.
        let s = unsafe { Stream::wrap(&mgr, 0, crate::backend::PER_THREAD_STREAM) }.unwrap();
        let two = std::ptr::with_exposed_provenance_mut::<c_void>(2);
        let n = MIB as isize;
        // SAFETY: 2 is a live stream on every thread; the pointers are the allocator's.
        let (p, k) = unsafe {
            let p = hetmem_torch_malloc(n, 0, two);
            assert!(!p.is_null(), "{}", last_error());
            let k = sim
                .launch_kernel(s.handle(), Duration::from_millis(3))
                .unwrap();
            hetmem_torch_free(p, n, 0, two);
            (p.addr(), k)
        };
        std::thread::scope(|t| {
            t.spawn(|| {
                let two = std::ptr::with_exposed_provenance_mut::<c_void>(2);
                // SAFETY: as above.
                unsafe {
                    let q = hetmem_torch_malloc(n, 0, two);
                    assert!(!q.is_null(), "{}", last_error());
                    let at = sim.stream_time_ns(s.handle()).unwrap();
                    assert!(
                        q.addr() != p || at >= k.end_ns,
                        "the block went to this thread's stream at {at} ns while the \
                         other thread's kernel used it until {} ns",
                        k.end_ns
                    );
                    hetmem_torch_free(q, n, 0, two);
                }
            });
        });
        // SAFETY: as above.
        unsafe {
            // Back on the first thread: its own stream takes its block back at once.
            let r = hetmem_torch_malloc(n, 0, two);
            assert_eq!(r.addr(), p, "{}", last_error());
            hetmem_torch_free(r, n, 0, two);
        }
        *lock(&TORCH) = None;
    }

    #[test]
    fn record_stream_refuses_addresses_it_did_not_hand_out() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let mgr = on_sim();
        let s = mgr.create_stream(0).unwrap();
        // SAFETY: s is a live sim stream of device 0; the pointers
        // are only looked up.
        unsafe {
            assert_eq!(
                hetmem_torch_record_stream(std::ptr::null_mut(), raw(&s)),
                HETMEM_OK
            );
            let mut local = 0u64;
            let foreign = (&raw mut local).cast::<c_void>();
            assert_eq!(
                hetmem_torch_record_stream(foreign, raw(&s)),
                HETMEM_ERR_FOREIGN_POINTER
            );
            assert!(
                last_error().contains("hetmem_torch_record_stream"),
                "{}",
                last_error()
            );
            let p = hetmem_torch_malloc(4096, 0, std::ptr::null_mut());
            assert!(!p.is_null(), "{}", last_error());
            // One past the end is not in the block.
            let end = p.cast::<u8>().wrapping_add(4096).cast::<c_void>();
            assert_eq!(
                hetmem_torch_record_stream(end, raw(&s)),
                HETMEM_ERR_FOREIGN_POINTER
            );
            hetmem_torch_free(p, 4096, 0, std::ptr::null_mut());
            assert_eq!(
                hetmem_torch_record_stream(p, raw(&s)),
                HETMEM_ERR_FOREIGN_POINTER
            );
            // A value that is no stream of the simulator's.
            let q = hetmem_torch_malloc(4096, 0, std::ptr::null_mut());
            let bogus = std::ptr::with_exposed_provenance_mut(0xdead_beef);
            assert_ne!(hetmem_torch_record_stream(q, bogus), HETMEM_OK);
            hetmem_torch_free(q, 4096, 0, std::ptr::null_mut());
        }
        *lock(&TORCH) = None;
    }

    /// Contexts the graph-pool tests' filters let go of.
    static DROPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// Picks the stream whose raw value the context holds; -1 for a context of 0.
    unsafe extern "C" fn pick(ctx: *mut c_void, stream: *mut c_void) -> c_int {
        // SAFETY: the tests pass a live Box<u64> as the context.
        let want = unsafe { *ctx.cast::<u64>() };
        if want == 0 {
            return -1;
        }
        c_int::from(stream.addr() as u64 == want)
    }

    unsafe extern "C" fn drop_ctx(ctx: *mut c_void) {
        // SAFETY: the context is the Box<u64> the test leaked, let go of once.
        drop(unsafe { Box::from_raw(ctx.cast::<u64>()) });
        DROPPED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn ctx(want: u64) -> *mut c_void {
        Box::into_raw(Box::new(want)).cast()
    }

    /// The graph-pool hooks as PyTorch calls them around a capture: the capture's
    /// allocations (picked by the filter) come from the private pool, a block freed in
    /// it comes back only to the pool until release, the filter's context is let go of
    /// once, and no call the driver refuses in a capture is made.
    #[test]
    fn graph_pools_route_a_capture_and_keep_its_memory_until_release() {
        use std::sync::atomic::Ordering::SeqCst;
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let mgr = on_sim();
        let sim = mgr.sim().unwrap();
        let (a, b) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
        let n = MIB as isize;
        let dropped = DROPPED.load(SeqCst);
        // SAFETY: a and b are live sim streams of device 0; the pointers are the
        // allocator's own or only looked up; the contexts are Box<u64>s for `pick`.
        unsafe {
            let begin = |id: u64, want: u64| {
                hetmem_torch_begin_allocate_to_pool(0, id, 0, Some(pick), ctx(want), Some(drop_ctx))
            };
            assert_eq!(begin(3, a.handle().0), HETMEM_OK, "{}", last_error());
            assert_eq!(begin(3, a.handle().0), HETMEM_ERR_INVALID_ARGUMENT);
            assert_eq!(
                DROPPED.load(SeqCst),
                dropped + 1,
                "a refused begin lets go at once"
            );
            sim.begin_capture(a.handle()).unwrap();
            let p = hetmem_torch_malloc(n, 0, raw(&a));
            assert!(!p.is_null(), "{}", last_error());
            hetmem_torch_free(p, n, 0, raw(&a));
            assert_eq!(hetmem_torch_malloc(n, 0, raw(&a)), p, "reused in its pool");
            hetmem_torch_free(p, n, 0, raw(&a));
            // Another stream's allocation meanwhile is the common pool's.
            let q = hetmem_torch_malloc(n, 0, raw(&b));
            assert!(!q.is_null() && q != p);
            hetmem_torch_free(q, n, 0, raw(&b));
            assert_eq!(hetmem_torch_empty_cache(), HETMEM_ERR_STREAM_CAPTURING);
            let mut buf = vec![0u8; 1 << 16];
            let mut need = 0usize;
            assert_eq!(
                hetmem_torch_stats_json(buf.as_mut_ptr().cast(), buf.len(), &mut need),
                HETMEM_OK
            );
            let json = CStr::from_bytes_until_nul(&buf)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            assert!(
                json.contains(r#""private_pools":[{"id":[3,0],"uses":1,"allocating":true"#),
                "{json}"
            );
            sim.end_capture(a.handle()).unwrap();
            assert_eq!(hetmem_torch_end_allocate_to_pool(0, 3, 0), HETMEM_OK);
            assert_eq!(
                DROPPED.load(SeqCst),
                dropped + 2,
                "the end lets go of the filter"
            );
            assert_eq!(
                hetmem_torch_end_allocate_to_pool(0, 3, 0),
                HETMEM_ERR_INVALID_ARGUMENT
            );
            // Until release, no allocation outside the pool gets the graph's block.
            let outside: Vec<*mut c_void> = (0..3)
                .flat_map(|_| {
                    [
                        hetmem_torch_malloc(n, 0, raw(&a)),
                        hetmem_torch_malloc(n, 0, raw(&b)),
                    ]
                })
                .collect();
            assert!(outside.iter().all(|o| !o.is_null() && *o != p));
            for o in &outside {
                hetmem_torch_free(*o, n, 0, std::ptr::null_mut());
            }
            assert_eq!(
                hetmem_torch_release_pool(0, 3, 0),
                HETMEM_OK,
                "{}",
                last_error()
            );
            assert_eq!(
                hetmem_torch_release_pool(0, 3, 0),
                HETMEM_OK,
                "unknown: nothing to do"
            );
            let again: Vec<*mut c_void> =
                (0..4).map(|_| hetmem_torch_malloc(n, 0, raw(&a))).collect();
            assert!(again.contains(&p), "released: the common pool reuses it");
            for o in again {
                hetmem_torch_free(o, n, 0, raw(&a));
            }
            // A filter that fails fails the allocation it was asked about.
            assert_eq!(begin(4, 0), HETMEM_OK);
            assert!(hetmem_torch_malloc(n, 0, raw(&a)).is_null());
            assert!(
                last_error().contains("stream filter failed"),
                "{}",
                last_error()
            );
            assert_eq!(hetmem_torch_end_allocate_to_pool(0, 4, 0), HETMEM_OK);
            assert_eq!(hetmem_torch_release_pool(0, 4, 0), HETMEM_OK);
            // No filter: every allocation of the device.
            assert_eq!(
                hetmem_torch_begin_allocate_to_pool(0, 5, 0, None, std::ptr::null_mut(), None),
                HETMEM_OK
            );
            let r = hetmem_torch_malloc(n, 0, raw(&b));
            assert!(!r.is_null());
            hetmem_torch_free(r, n, 0, raw(&b));
            assert_eq!(hetmem_torch_end_allocate_to_pool(0, 5, 0), HETMEM_OK);
            let other = hetmem_torch_malloc(n, 0, raw(&b));
            assert_ne!(other, r, "r is pool 5's");
            hetmem_torch_free(other, n, 0, raw(&b));
            assert_eq!(hetmem_torch_release_pool(0, 5, 0), HETMEM_OK);
            assert_eq!(hetmem_torch_empty_cache(), HETMEM_OK);
        }
        assert_eq!(DROPPED.load(SeqCst), dropped + 3);
        assert_eq!(sim.stats().capture_violations, 0);
        *lock(&TORCH) = None;
    }
}
