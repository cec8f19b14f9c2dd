//! The CUDA runtime's allocation entry points (programs that link libcudart
//! dynamically, as PyTorch and CuPy do), and `cudaMemcpy[Async]` for pin-on-copy.
//!
//! Each wrapper counts and limits, then calls the real runtime with this thread marked
//! `nested`, so the driver calls the runtime makes on its behalf are not
//! counted again. Codes are the runtime's: `cudaErrorMemoryAllocation` (2) past the
//! limit, and for bad input whatever the real runtime answers (it is called).
#![allow(non_snake_case)]

use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::driver::{self, capturing, total_mem, CUstream};
use super::real::{call_real, Real};
use super::state::{self, Kind, Rec};
use super::{
    admit, config, guard, limit_mem_info, nested, pool_alloc, pool_free, pool_free_pinned,
    pool_pinned, Admit, Nest,
};
use crate::lock::Lock;

/// `cudaError_t`.
pub type CudaError = c_int;
/// `cudaErrorMemoryAllocation`.
pub const MEMORY_ALLOCATION: CudaError = 2;
/// `cudaErrorInsufficientDriver`: what a wrapper answers when no runtime is loaded.
pub const NO_RUNTIME: CudaError = 35;

const LIB: &[u8] = b"libcudart.so";

static MALLOC: Real = Real::new(c"cudaMalloc", LIB);
static FREE: Real = Real::new(c"cudaFree", LIB);
static MALLOC_ASYNC: Real = Real::new(c"cudaMallocAsync", LIB);
static FREE_ASYNC: Real = Real::new(c"cudaFreeAsync", LIB);
static MALLOC_POOL: Real = Real::new(c"cudaMallocFromPoolAsync", LIB);
static MALLOC_HOST: Real = Real::new(c"cudaMallocHost", LIB);
static HOST_ALLOC: Real = Real::new(c"cudaHostAlloc", LIB);
static FREE_HOST: Real = Real::new(c"cudaFreeHost", LIB);
static HOST_REGISTER: Real = Real::new(c"cudaHostRegister", LIB);
static HOST_UNREGISTER: Real = Real::new(c"cudaHostUnregister", LIB);
static MEM_GET_INFO: Real = Real::new(c"cudaMemGetInfo", LIB);
static MALLOC_MANAGED: Real = Real::new(c"cudaMallocManaged", LIB);
static MEMCPY: Real = Real::new(c"cudaMemcpy", LIB);
static MEMCPY_ASYNC: Real = Real::new(c"cudaMemcpyAsync", LIB);
static IPC_GET_MEM_HANDLE: Real = Real::new(c"cudaIpcGetMemHandle", LIB);
static GET_DEVICE: Real = Real::new(c"cudaGetDevice", LIB);

super::wrapped! {
    cudaMalloc => MALLOC,
    cudaFree => FREE,
    cudaMallocAsync => MALLOC_ASYNC,
    cudaFreeAsync => FREE_ASYNC,
    cudaMallocFromPoolAsync => MALLOC_POOL,
    cudaMallocHost => MALLOC_HOST,
    cudaHostAlloc => HOST_ALLOC,
    cudaFreeHost => FREE_HOST,
    cudaHostRegister => HOST_REGISTER,
    cudaHostUnregister => HOST_UNREGISTER,
    cudaMemGetInfo => MEM_GET_INFO,
    cudaMallocManaged => MALLOC_MANAGED,
    cudaMemcpy => MEMCPY,
    cudaMemcpyAsync => MEMCPY_ASYNC,
    cudaIpcGetMemHandle => IPC_GET_MEM_HANDLE,
}

/// The runtime's current device (0 if it cannot say).
fn device() -> i32 {
    let _n = Nest::enter();
    let mut d: c_int = 0;
    let rc = call_real!(GET_DEVICE, NO_RUNTIME, fn(*mut c_int) -> CudaError, &mut d);
    if rc == 0 {
        d
    } else {
        0
    }
}

/// A device allocation through `call` (made nested), counted and limited.
///
/// # Safety
/// `p` is null or writable; `call` allocates into it.
unsafe fn device_alloc(
    p: *mut *mut c_void,
    size: usize,
    stream: Option<CUstream>,
    call: &dyn Fn() -> CudaError,
) -> CudaError {
    let outer = !nested();
    let _n = Nest::enter();
    let Some(cfg) = config() else { return call() };
    if !outer || p.is_null() || size == 0 {
        return call();
    }
    if let Some(s) = stream {
        if capturing(s) {
            state::CAPTURED.fetch_add(1, Ordering::Relaxed);
            return call();
        }
    }
    guard(MEMORY_ALLOCATION, || {
        let dev = device();
        match admit(cfg, dev, size as u64, &|| total_mem(dev)) {
            Admit::Charged => {
                let st = stream.unwrap_or(std::ptr::null_mut());
                // SAFETY: `p` is writable.
                let mut out = |a: u64| unsafe { *p = a as *mut c_void };
                if let Some(rc) = pool_alloc(cfg, dev, size, st, MEMORY_ALLOCATION, &mut out) {
                    return rc;
                }
                let rc = call();
                // SAFETY: written by the call when it succeeded.
                let addr = || (unsafe { *p }) as u64;
                super::driver_alloc_done(rc == 0, addr, size, dev, stream.map_or(0, |s| s as u64));
                rc
            }
            Admit::Refused => MEMORY_ALLOCATION,
            Admit::Over => {
                let rc = call_real!(
                    MALLOC_MANAGED,
                    NO_RUNTIME,
                    fn(*mut *mut c_void, usize, c_uint) -> CudaError,
                    p,
                    size,
                    1
                );
                if rc != 0 {
                    // No managed memory: out of memory, as without oversubscription.
                    return MEMORY_ALLOCATION;
                }
                // SAFETY: written by the successful call.
                let a = (unsafe { *p }) as u64;
                driver::advise_host(a, size);
                state::note(
                    a,
                    Rec {
                        size: size as u64,
                        dev,
                        kind: Kind::Oversubscribed,
                    },
                );
                0
            }
        }
    })
}

/// A free through `call` (made nested), counted (a pool block given back to the pool,
/// on `stream` when given).
fn any_free(a: u64, stream: Option<CUstream>, call: &dyn Fn() -> CudaError) -> CudaError {
    let outer = !nested();
    if outer && a != 0 {
        // cudaErrorInvalidValue for a second free, as the runtime answers one.
        if let Some(rc) = guard(None, || pool_free(a, stream.map(|s| (device(), s)), 1)) {
            return rc;
        }
    }
    let _n = Nest::enter();
    if config().is_none() || !outer || a == 0 {
        return call();
    }
    let r = guard(None, || state::take(a));
    // An async free of memory oversubscribed as managed memory (which cudaFreeAsync
    // does not take): cudaFree, which waits for the device's work first.
    let over = stream.is_some() && r.is_some_and(|r| r.kind == Kind::Oversubscribed);
    let rc = if over {
        call_real!(
            FREE,
            NO_RUNTIME,
            fn(*mut c_void) -> CudaError,
            a as *mut c_void
        )
    } else {
        call()
    };
    if rc != 0 {
        if let Some(r) = r {
            guard((), || state::restore(a, r));
        }
    }
    rc
}

/// A host allocation through `call` (made nested), counted.
///
/// # Safety
/// `p` is null or written by a successful `call`.
unsafe fn host_alloc(
    p: *mut *mut c_void,
    size: usize,
    flags: u32,
    call: &dyn Fn() -> CudaError,
) -> CudaError {
    if !p.is_null() {
        if let Some(a) = guard(None, || pool_pinned(size, flags)) {
            // SAFETY: the caller's out-pointer.
            unsafe { *p = a as *mut c_void };
            return 0;
        }
    }
    let outer = !nested();
    let _n = Nest::enter();
    let rc = call();
    if rc == 0 && outer && !p.is_null() && config().is_some() {
        // SAFETY: written by the successful call.
        let a = (unsafe { *p }) as u64;
        guard((), || {
            state::note(
                a,
                Rec {
                    size: size as u64,
                    dev: -1,
                    kind: Kind::Pinned,
                },
            )
        });
    }
    rc
}

/// `cudaMalloc`.
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaMalloc(p: *mut *mut c_void, size: usize) -> CudaError {
    let call = || {
        call_real!(
            MALLOC,
            NO_RUNTIME,
            fn(*mut *mut c_void, usize) -> CudaError,
            p,
            size
        )
    };
    // SAFETY: the caller's arguments.
    unsafe { device_alloc(p, size, None, &call) }
}

/// `cudaFree`.
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaFree(p: *mut c_void) -> CudaError {
    any_free(p as u64, None, &|| {
        call_real!(FREE, NO_RUNTIME, fn(*mut c_void) -> CudaError, p)
    })
}

/// `cudaMallocAsync`.
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaMallocAsync(
    p: *mut *mut c_void,
    size: usize,
    s: CUstream,
) -> CudaError {
    let call = || {
        call_real!(
            MALLOC_ASYNC,
            NO_RUNTIME,
            fn(*mut *mut c_void, usize, CUstream) -> CudaError,
            p,
            size,
            s
        )
    };
    // SAFETY: the caller's arguments.
    unsafe { device_alloc(p, size, Some(s), &call) }
}

/// `cudaFreeAsync`.
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaFreeAsync(p: *mut c_void, s: CUstream) -> CudaError {
    any_free(p as u64, Some(s), &|| {
        call_real!(
            FREE_ASYNC,
            NO_RUNTIME,
            fn(*mut c_void, CUstream) -> CudaError,
            p,
            s
        )
    })
}

/// `cudaMallocFromPoolAsync`.
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaMallocFromPoolAsync(
    p: *mut *mut c_void,
    size: usize,
    pool: *mut c_void,
    s: CUstream,
) -> CudaError {
    let call = || {
        call_real!(
            MALLOC_POOL,
            NO_RUNTIME,
            fn(*mut *mut c_void, usize, *mut c_void, CUstream) -> CudaError,
            p,
            size,
            pool,
            s
        )
    };
    if pool.is_null() {
        let _n = Nest::enter();
        return call();
    }
    // SAFETY: the caller's arguments.
    unsafe { device_alloc(p, size, Some(s), &call) }
}

/// `cudaMallocHost`.
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaMallocHost(p: *mut *mut c_void, size: usize) -> CudaError {
    let call = || {
        call_real!(
            MALLOC_HOST,
            NO_RUNTIME,
            fn(*mut *mut c_void, usize) -> CudaError,
            p,
            size
        )
    };
    // SAFETY: the caller's arguments.
    unsafe { host_alloc(p, size, 0, &call) }
}

/// `cudaHostAlloc`.
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaHostAlloc(
    p: *mut *mut c_void,
    size: usize,
    flags: c_uint,
) -> CudaError {
    let call = || {
        call_real!(
            HOST_ALLOC,
            NO_RUNTIME,
            fn(*mut *mut c_void, usize, c_uint) -> CudaError,
            p,
            size,
            flags
        )
    };
    // SAFETY: the caller's arguments.
    unsafe { host_alloc(p, size, flags, &call) }
}

/// `cudaFreeHost`.
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaFreeHost(p: *mut c_void) -> CudaError {
    if guard(false, || pool_free_pinned(p as u64)) {
        return 0;
    }
    any_free(p as u64, None, &|| {
        call_real!(FREE_HOST, NO_RUNTIME, fn(*mut c_void) -> CudaError, p)
    })
}

/// `cudaHostRegister`.
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaHostRegister(p: *mut c_void, size: usize, flags: c_uint) -> CudaError {
    let outer = !nested();
    let _n = Nest::enter();
    let rc = call_real!(
        HOST_REGISTER,
        NO_RUNTIME,
        fn(*mut c_void, usize, c_uint) -> CudaError,
        p,
        size,
        flags
    );
    if rc == 0 && outer && config().is_some() {
        guard((), || {
            state::note(
                p as u64,
                Rec {
                    size: size as u64,
                    dev: -1,
                    kind: Kind::Registered,
                },
            )
        });
    }
    rc
}

/// `cudaHostUnregister`.
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaHostUnregister(p: *mut c_void) -> CudaError {
    any_free(p as u64, None, &|| {
        call_real!(HOST_UNREGISTER, NO_RUNTIME, fn(*mut c_void) -> CudaError, p)
    })
}

/// `cudaMemGetInfo`: with a limit, total = the limit and free = the limit minus what
/// the process holds (so `torch.cuda.mem_get_info()` shows the limit).
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaMemGetInfo(free: *mut usize, total: *mut usize) -> CudaError {
    let outer = !nested();
    let rc = {
        let _n = Nest::enter();
        call_real!(
            MEM_GET_INFO,
            NO_RUNTIME,
            fn(*mut usize, *mut usize) -> CudaError,
            free,
            total
        )
    };
    // SAFETY: written by the call when it succeeded.
    unsafe { limit_mem_info(rc == 0, outer, free, total, device) };
    rc
}

/// `cudaMallocManaged`: counted, not charged.
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaMallocManaged(
    p: *mut *mut c_void,
    size: usize,
    flags: c_uint,
) -> CudaError {
    let outer = !nested();
    let _n = Nest::enter();
    let rc = call_real!(
        MALLOC_MANAGED,
        NO_RUNTIME,
        fn(*mut *mut c_void, usize, c_uint) -> CudaError,
        p,
        size,
        flags
    );
    if rc == 0 && outer && !p.is_null() && config().is_some() {
        // SAFETY: written by the successful call.
        let a = (unsafe { *p }) as u64;
        let dev = device();
        guard((), || {
            state::note(
                a,
                Rec {
                    size: size as u64,
                    dev,
                    kind: Kind::Managed,
                },
            )
        });
    }
    rc
}

// ---- pin-on-copy ---------------------------------------------------------------------------

/// Blocks registered on a copy: address, length, the context that registered them.
static PINS: Lock<Vec<(u64, usize, usize)>> = Lock::new(Vec::new());
/// How many (a lock-free "none" for the free hook).
static PIN_COUNT: AtomicUsize = AtomicUsize::new(0);
static PINNED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Before a copy of `n` bytes with `host` on the host side: registers the host side's
/// block (a block of the shim's large path, from its start) once, within the cap.
fn pin_for_copy(host: *const c_void, n: usize) {
    let Some(cfg) = config() else { return };
    let Some(threshold) = cfg.pin_on_copy else {
        return;
    };
    if n < threshold || host.is_null() || !crate::large::owns(host as *mut c_void) {
        return;
    }
    guard((), || {
        let a = host as u64;
        if PINS.with(|v| {
            v.iter()
                .any(|&(p, len, _)| a >= p && a + n as u64 <= p + len as u64)
        }) {
            state::PIN_HITS.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some((len, _)) = crate::large::sizes(host as *mut c_void) else {
            return;
        };
        if PINNED_BYTES.load(Ordering::Relaxed) + len as u64 > cfg.pin_cache as u64 {
            return;
        }
        if driver::register(a, len) != 0 {
            return;
        }
        let ctx = driver::current_ctx();
        PINS.with(|v| v.push((a, len, ctx)));
        PIN_COUNT.fetch_add(1, Ordering::Release);
        PINNED_BYTES.fetch_add(len as u64, Ordering::Relaxed);
        state::PIN_MISSES.fetch_add(1, Ordering::Relaxed);
        state::note(
            a,
            Rec {
                size: len as u64,
                dev: -1,
                kind: Kind::PinnedOnCopy,
            },
        );
    });
}

/// Called by the host side before it frees a large block: a block pinned on a copy is
/// unregistered first (in the context that registered it).
pub fn host_block_freed(p: *mut c_void) {
    if PIN_COUNT.load(Ordering::Acquire) == 0 {
        return;
    }
    guard((), || {
        let a = p as u64;
        let hit = PINS.with(|v| {
            let i = v.iter().position(|&(q, _, _)| q == a)?;
            Some(v.swap_remove(i))
        });
        if let Some((q, len, ctx)) = hit {
            PIN_COUNT.fetch_sub(1, Ordering::Release);
            PINNED_BYTES.fetch_sub(len as u64, Ordering::Relaxed);
            driver::unregister_in(ctx, q);
            let _ = state::take(q);
        }
    });
}

/// Which side of a copy is the host's: `kind` 1 host-to-device, 2 device-to-host,
/// 4 default (the side that is a block of the large path).
fn host_side(dst: *mut c_void, src: *const c_void, kind: c_int) -> *const c_void {
    match kind {
        1 => src,
        2 => dst,
        4 if crate::large::owns(src as *mut c_void) => src,
        4 => dst,
        _ => std::ptr::null(),
    }
}

/// `cudaMemcpy`: with pin-on-copy, a large pageable host block is registered at its
/// first copy, so this copy and later ones run at pinned speed.
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaMemcpy(
    dst: *mut c_void,
    src: *const c_void,
    n: usize,
    kind: c_int,
) -> CudaError {
    if !nested() {
        pin_for_copy(host_side(dst, src, kind), n);
        driver::prefetch_on_first_use(dst as u64, std::ptr::null_mut());
        driver::prefetch_on_first_use(src as u64, std::ptr::null_mut());
    }
    let _n = Nest::enter();
    call_real!(
        MEMCPY,
        NO_RUNTIME,
        fn(*mut c_void, *const c_void, usize, c_int) -> CudaError,
        dst,
        src,
        n,
        kind
    )
}

/// `cudaMemcpyAsync`: as [`cudaMemcpy`].
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaMemcpyAsync(
    dst: *mut c_void,
    src: *const c_void,
    n: usize,
    kind: c_int,
    s: CUstream,
) -> CudaError {
    if !nested() && !capturing(s) {
        pin_for_copy(host_side(dst, src, kind), n);
        driver::prefetch_on_first_use(dst as u64, s);
        driver::prefetch_on_first_use(src as u64, s);
    }
    let _n = Nest::enter();
    call_real!(
        MEMCPY_ASYNC,
        NO_RUNTIME,
        fn(*mut c_void, *const c_void, usize, c_int, CUstream) -> CudaError,
        dst,
        src,
        n,
        kind,
        s
    )
}

/// `cudaIpcGetMemHandle`: refused (`cudaErrorInvalidValue`, one line on stderr) for
/// memory served by the pool, whose handle would name the pool's whole segment.
///
/// # Safety
/// As the runtime's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cudaIpcGetMemHandle(handle: *mut c_void, p: *mut c_void) -> CudaError {
    if !nested() && driver::pool_served(p as u64) {
        super::pool::ipc_refused();
        return 1;
    }
    let _n = Nest::enter();
    call_real!(
        IPC_GET_MEM_HANDLE,
        NO_RUNTIME,
        fn(*mut c_void, *mut c_void) -> CudaError,
        handle,
        p
    )
}

/// Held across `fork` (see `state`'s handlers).
pub(crate) fn fork_lock() {
    PINS.lock();
}

/// After `fork`: released in the parent, reset in the child.
pub(crate) fn fork_unlock(child: bool) {
    if child {
        PINS.reset_in_child();
    } else {
        PINS.unlock();
    }
}
