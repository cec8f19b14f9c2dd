//! PyTorch's pluggable allocator: `hetmem_torch_malloc` / `hetmem_torch_free`, the
//! two symbols `torch.cuda.memory.CUDAPluggableAllocator(path, "hetmem_torch_malloc",
//! "hetmem_torch_free")` loads; and the entry points of the hooks its C++ class has but
//! its Python class does not set (`python/hetmem/torch_hooks.cpp` sets them):
//! `hetmem_torch_record_stream` (`tensor.record_stream`), `hetmem_torch_empty_cache`
//! (`torch.cuda.empty_cache()`), and the graph-pool hooks, which refuse for now.
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

use std::ffi::{c_char, c_int, c_void};
use std::sync::Mutex;

use rustc_hash::FxHashMap;

use super::{
    device_arg, guard, guard_with, json_array, json_object, json_str, last_error_message, lock,
    write_c_text, FfiError, FfiResult, HETMEM_ERR_FOREIGN_POINTER, HETMEM_ERR_UNSUPPORTED,
};
use crate::backend::check_device;
use crate::manager::Manager;
use crate::pool::{DevicePool, PoolBlock, PoolConfig};
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
/// `hipStream_t`; NULL for the default stream) from hetmem's device pool: the entry
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
    guard_with("hetmem_torch_malloc", std::ptr::null_mut(), || {
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
    guard_with("hetmem_torch_free", (), || {
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
    guard("hetmem_torch_record_stream", || {
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

/// The message every graph-pool entry point carries, and PyTorch raises.
const GRAPHS_UNSUPPORTED: &str = "CUDA graph capture with hetmem's allocator is not supported yet";

/// PyTorch's `beginAllocateToPool(device, pool)`: from now on, the allocations of the
/// streams being captured should come from graph pool `(pool_a, pool_b)` (PyTorch's
/// `MempoolId_t`), private to the graph. hetmem's device pool has no private pools yet,
/// and serving a capture from the shared pool would let memory the graph replays into
/// be handed to other tensors: so this always fails, with UNSUPPORTED and a message
/// that starts "CUDA graph capture with hetmem's allocator is not supported yet", and
/// PyTorch raises it as a RuntimeError before the capture begins (`torch.cuda.graph`,
/// `torch.cuda.use_mem_pool`, `torch.compile(mode="reduce-overhead")`).
#[no_mangle]
pub extern "C" fn hetmem_torch_begin_allocate_to_pool(
    device: c_int,
    pool_a: u64,
    pool_b: u64,
) -> c_int {
    guard("hetmem_torch_begin_allocate_to_pool", || {
        tracing::warn!(target: "hetmem::ffi", device, pool_a, pool_b,
            "graph pool refused: {GRAPHS_UNSUPPORTED}");
        Err(FfiError::new(
            HETMEM_ERR_UNSUPPORTED,
            format!(
                "{GRAPHS_UNSUPPORTED} (graph pool ({pool_a}, {pool_b}) on device {device}): \
                 hetmem's device pool has no private graph pools, and serving a capture from \
                 the shared one could hand the graph's memory to other tensors"
            ),
        ))
    })
}

/// PyTorch's `endAllocateToPool(device, pool)`, the end of a capture's allocations.
/// No pool can have begun ([`hetmem_torch_begin_allocate_to_pool`] always fails), so
/// this fails too: UNSUPPORTED, with the same message.
#[no_mangle]
pub extern "C" fn hetmem_torch_end_allocate_to_pool(
    device: c_int,
    pool_a: u64,
    pool_b: u64,
) -> c_int {
    guard("hetmem_torch_end_allocate_to_pool", || {
        Err(FfiError::new(
            HETMEM_ERR_UNSUPPORTED,
            format!(
                "no graph pool ({pool_a}, {pool_b}) is being allocated to on device {device}: \
                 {GRAPHS_UNSUPPORTED}"
            ),
        ))
    })
}

/// PyTorch's `releasePool(device, pool)`, when a graph or memory pool is destroyed.
/// hetmem holds no memory in any graph pool (none can begin), so nothing is lost; it
/// still fails, with UNSUPPORTED and the same message, so that a caller who expected a
/// pool hears of it. PyTorch calls it from destructors: its C++ hook warns, never
/// throws.
#[no_mangle]
pub extern "C" fn hetmem_torch_release_pool(device: c_int, pool_a: u64, pool_b: u64) -> c_int {
    guard("hetmem_torch_release_pool", || {
        Err(FfiError::new(
            HETMEM_ERR_UNSUPPORTED,
            format!(
                "hetmem has no graph pool ({pool_a}, {pool_b}) on device {device} to release: \
                 {GRAPHS_UNSUPPORTED}"
            ),
        ))
    })
}

/// Gives every cached, unused page or segment of every pool back to the driver, and
/// lets go of wrapped streams that nothing allocated on them uses any more (PyTorch's
/// `torch.cuda.empty_cache()`).
#[no_mangle]
pub extern "C" fn hetmem_torch_empty_cache() -> c_int {
    guard("hetmem_torch_empty_cache", || {
        let mut slot = lock(&TORCH);
        let Some(t) = slot.as_mut() else {
            return Ok(());
        };
        let mut released = 0usize;
        for p in t.pools.iter().flatten() {
            released += p.trim()?;
        }
        // A wrapped stream held only by this cache is used by no block: forget it.
        t.streams
            .retain(|_, s| std::sync::Arc::strong_count(&s.inner) > 1);
        tracing::debug!(target: "hetmem::ffi", released, "empty_cache");
        Ok(())
    })
}

/// Writes the allocator's stats as NUL-terminated JSON into `buf` if it fits in `cap`
/// bytes; `*needed` (if not NULL) is always set to the bytes needed, NUL included.
/// Keys: `backend` (null before the first allocation), `live_blocks`, `live_bytes`,
/// `streams`, and `devices`: per pool `device`, `budget`, `reserved`, and `stats` with
/// PyTorch's `memory_stats()` key names (`allocated_bytes.all.current`, ...).
///
/// # Safety
/// `buf` is NULL or valid for `cap` bytes of writes; `needed` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn hetmem_torch_stats_json(
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> c_int {
    guard("hetmem_torch_stats_json", || {
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
                        json_object([
                            ("device", p.device().to_string()),
                            ("budget", p.budget().to_string()),
                            ("reserved", p.reserved().to_string()),
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
    use crate::ffi::{hetmem_last_error, HETMEM_OK};
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

    #[test]
    fn graph_pools_are_refused_with_the_message_pytorch_raises() {
        let calls: [(extern "C" fn(c_int, u64, u64) -> c_int, &str); 3] = [
            (
                hetmem_torch_begin_allocate_to_pool,
                "begin_allocate_to_pool",
            ),
            (hetmem_torch_end_allocate_to_pool, "end_allocate_to_pool"),
            (hetmem_torch_release_pool, "release_pool"),
        ];
        for (f, name) in calls {
            assert_eq!(f(0, 1, 2), HETMEM_ERR_UNSUPPORTED, "{name}");
            let msg = last_error();
            assert!(msg.contains(GRAPHS_UNSUPPORTED), "{name}: {msg}");
            assert!(
                msg.contains(name) && msg.contains("(1, 2)"),
                "{name}: {msg}"
            );
        }
    }
}
