//! Pool mode (`HETMEM_GPU_MODE=pool`): the program's device allocations (CUDA) served by
//! hetmem's device pool, one per device, on the program's own streams (wrapped with
//! [`hetmem::Stream::wrap`]: `cudaMallocAsync` memory is stream-ordered, as promised),
//! and its pinned allocations (`cudaMallocHost`, `cudaHostAlloc`, `cuMemAllocHost_v2`,
//! `cuMemHostAlloc`) by hetmem's host pool, which pins registered memory in chunks on
//! several threads.
//!
//! The pool is made at the first pooled allocation, inside the program's call (the
//! driver is loaded by then), with this thread marked nested: the driver calls hetmem
//! makes pass through the wrappers uncounted. Any pool error other than running out of
//! memory (a forked child, a driver the backend cannot use) sends the call to the
//! driver as in observe mode; the pointer is then the driver's and freed by it.
//!
//! Pointers: `cuMemGetAddressRange_v2` and `cuPointerGetAttribute`/`_Attributes` (range
//! start and size) answer the pool block, not the pool's segment; `cuIpcGetMemHandle` /
//! `cudaIpcGetMemHandle` of a pool block fail with `CUDA_ERROR_INVALID_VALUE` (one line
//! on stderr, once) instead of handing out a handle to the whole segment.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use hetmem::pool::host::HostPoolConfig;
use hetmem::pool::{Budget, DevicePool, HostBlock, HostPool, PoolBlock, PoolConfig};
use hetmem::{BackendKind, Error, Manager, NumaPolicy, Stream};
use rustc_hash::FxHashMap;

use super::{Own, MAX_DEVICES};
use crate::lock::Lock;

struct Pools {
    mgr: Manager,
    devices: Vec<Option<DevicePool>>,
    host: Option<HostPool>,
    /// Wrapped streams by (device, raw handle).
    streams: FxHashMap<(usize, u64), Stream>,
    /// Live device blocks by address.
    blocks: BTreeMap<u64, PoolBlock>,
    /// Live pinned blocks by address.
    pinned: FxHashMap<u64, HostBlock>,
    /// Addresses the pool handed out and took back, not handed out since (by the pool
    /// or the driver): a second free of one must not reach the driver, which would take
    /// it for its own allocation where a pool segment starts there.
    freed: rustc_hash::FxHashSet<u64>,
}

// SAFETY: the pools are only reached under `POOLS`'s lock; hetmem's handles are
// thread-safe (Send + Sync) apart from the raw stream handles they wrap, which the
// driver allows any thread to use.
unsafe impl Send for Pools {}

static POOLS: Lock<Option<Pools>> = Lock::new(None);
static FAILED: OnceLock<()> = OnceLock::new();

/// What a pooled allocation came to.
pub enum Served {
    /// From the pool: the address.
    Pool(u64),
    /// The pool is out of memory (the budget or the device).
    OutOfMemory,
    /// Not for the pool: call the driver.
    Driver,
}

fn with_pools<R>(f: impl FnOnce(&mut Pools) -> Option<R>) -> Option<R> {
    if FAILED.get().is_some() {
        return None;
    }
    let _n = Own::enter();
    POOLS.with(|p| {
        if p.is_none() {
            match Manager::builder()
                .backend(BackendKind::Cuda)
                .gpu_only()
                .build()
            {
                Ok(mgr) => {
                    *p = Some(Pools {
                        mgr,
                        devices: Vec::new(),
                        host: None,
                        streams: FxHashMap::default(),
                        blocks: BTreeMap::new(),
                        pinned: FxHashMap::default(),
                        freed: rustc_hash::FxHashSet::default(),
                    })
                }
                Err(e) => {
                    let _ = FAILED.set(());
                    crate::say(&format!(
                        "HETMEM_GPU_MODE=pool: {e}; device allocations go to the driver"
                    ));
                    return None;
                }
            }
        }
        f(p.as_mut()?)
    })
}

/// A device allocation of `size` bytes on `dev` for `stream` (raw handle; 0 the legacy
/// default stream) from the pool; `budget` the device's limit.
pub fn alloc(dev: i32, size: usize, stream: u64, budget: Option<u64>) -> Served {
    let Ok(d) = usize::try_from(dev) else {
        return Served::Driver;
    };
    if d >= MAX_DEVICES {
        return Served::Driver;
    }
    with_pools(|p| {
        if p.devices.len() <= d {
            p.devices.resize_with(d + 1, || None);
        }
        if p.devices[d].is_none() {
            let cfg = PoolConfig {
                budget: budget.map_or(Budget::Device, |b| Budget::Bytes(b as usize)),
                ..PoolConfig::default()
            };
            p.devices[d] = Some(p.mgr.device_pool(d, cfg).ok()?);
        }
        let s = match p.streams.get(&(d, stream)) {
            Some(s) => s.clone(),
            None => {
                // SAFETY: the program's live stream of device `d` (or 0), which it
                // passed to the call; it stays live while it queues work.
                let s = unsafe { Stream::wrap(&p.mgr, d, stream) }.ok()?;
                p.streams.insert((d, stream), s.clone());
                s
            }
        };
        let pool = p.devices[d].as_ref()?;
        Some(match pool.alloc(size, &s) {
            Ok(b) => {
                let a = b.ptr().0;
                p.freed.remove(&a);
                p.blocks.insert(a, b);
                Served::Pool(a)
            }
            Err(Error::OutOfMemory { .. }) => Served::OutOfMemory,
            Err(_) => Served::Driver,
        })
    })
    .unwrap_or(Served::Driver)
}

/// Frees a pool block at `addr` (stream-ordered on `stream` when given): false when it
/// is no pool block.
pub fn free(addr: u64, stream: Option<(i32, u64)>) -> bool {
    if addr == 0 || FAILED.get().is_some() {
        return false;
    }
    let _n = Own::enter();
    let (block, s) = POOLS.with(|p| {
        let Some(p) = p.as_mut() else {
            return (None, None);
        };
        let b = p.blocks.remove(&addr);
        if b.is_some() {
            p.freed.insert(addr);
        }
        let s = stream.and_then(|(dev, raw)| {
            let d = usize::try_from(dev).ok()?;
            if let Some(s) = p.streams.get(&(d, raw)) {
                return Some(s.clone());
            }
            // SAFETY: as in `alloc`.
            let s = unsafe { Stream::wrap(&p.mgr, d, raw) }.ok()?;
            p.streams.insert((d, raw), s.clone());
            Some(s)
        });
        (b, s)
    });
    let Some(block) = block else { return false };
    if let Some(s) = s {
        // Freed on another stream than its own: reuse waits for that stream's work.
        let _ = block.record_stream(&s);
    }
    drop(block);
    true
}

/// Whether `addr` is a pool block freed already (a double free), not handed out since.
pub fn freed_before(addr: u64) -> bool {
    if FAILED.get().is_some() {
        return false;
    }
    POOLS.with(|p| p.as_ref().is_some_and(|p| p.freed.contains(&addr)))
}

/// The driver handed out `addr`: it is no longer a freed pool address.
pub fn driver_gave(addr: u64) {
    if FAILED.get().is_some() {
        return;
    }
    POOLS.with(|p| {
        if let Some(p) = p.as_mut() {
            p.freed.remove(&addr);
        }
    });
}

/// The pool block holding `addr`: its start and length.
pub fn range(addr: u64) -> Option<(u64, u64)> {
    if FAILED.get().is_some() {
        return None;
    }
    POOLS.with(|p| {
        let p = p.as_ref()?;
        let (&a, b) = p.blocks.range(..=addr).next_back()?;
        let len = b.len() as u64;
        (addr - a < len.max(1)).then_some((a, len))
    })
}

/// Pinned memory from the host pool; `None`: not served (call the driver).
pub fn alloc_pinned(size: usize) -> Option<u64> {
    if size == 0 {
        return None;
    }
    with_pools(|p| {
        if p.host.is_none() {
            p.host = Some(p.mgr.host_pool(HostPoolConfig::default()).ok()?);
        }
        let b = p
            .host
            .as_ref()?
            .alloc_pinned(&NumaPolicy::Default, size)
            .ok()?;
        let a = b.as_ptr().as_ptr() as u64;
        p.pinned.insert(a, b);
        Some(a)
    })
}

/// Frees pinned memory of the host pool: false when `addr` is not one of its blocks.
pub fn free_pinned(addr: u64) -> bool {
    if addr == 0 || FAILED.get().is_some() {
        return false;
    }
    let _n = Own::enter();
    let b = POOLS.with(|p| p.as_mut().and_then(|p| p.pinned.remove(&addr)));
    b.is_some()
}

/// Says once that IPC of pool memory is refused.
pub fn ipc_refused() {
    static SAID: OnceLock<()> = OnceLock::new();
    if SAID.set(()).is_ok() {
        crate::say(
            "cudaIpcGetMemHandle/cuIpcGetMemHandle of memory served by hetmem's pool: refused \
             (CUDA_ERROR_INVALID_VALUE); run with HETMEM_GPU_MODE=observe for IPC",
        );
    }
}

/// Held across `fork` (see `state`'s handlers).
pub(crate) fn fork_lock() {
    POOLS.lock();
}

/// After `fork`: released in the parent, reset in the child.
pub(crate) fn fork_unlock(child: bool) {
    if child {
        POOLS.reset_in_child();
    } else {
        POOLS.unlock();
    }
}
