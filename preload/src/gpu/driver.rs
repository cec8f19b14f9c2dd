//! The CUDA driver's allocation entry points, interposed by symbol and handed out by
//! `dlsym` and `cuGetProcAddress`/`_v2` ([`super::real`]).
//!
//! Inside a runtime wrapper (`nested`) every call passes straight through: the
//! runtime wrapper has counted it. Bad input (a NULL out-pointer, size 0) goes to the
//! driver before any limit, so the code is the driver's own; a free of a pointer the
//! shim never saw goes to the driver too.
#![allow(non_snake_case)]

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::atomic::Ordering;

use super::real::{call_real, wrap_proc, Real};
use super::state::{self, Kind, Rec};
use super::{
    admit, config, guard, limit_mem_info, nested, pool_alloc, pool_free, pool_free_pinned,
    pool_pinned, Admit,
};

/// `CUresult`.
pub type CUresult = c_int;
/// `CUdeviceptr`.
pub type CUdeviceptr = u64;
/// `CUstream`.
pub type CUstream = *mut c_void;

/// `CUDA_ERROR_INVALID_VALUE`.
pub const INVALID_VALUE: CUresult = 1;
/// `CUDA_ERROR_OUT_OF_MEMORY`.
pub const OUT_OF_MEMORY: CUresult = 2;
/// `CUDA_ERROR_NOT_INITIALIZED`: what a wrapper answers when no driver is loaded.
pub const NOT_INITIALIZED: CUresult = 3;

const LIB: &[u8] = b"libcuda.so";

static MEM_ALLOC: Real = Real::new(c"cuMemAlloc_v2", LIB);
static MEM_FREE: Real = Real::new(c"cuMemFree_v2", LIB);
static MEM_ALLOC_ASYNC: Real = Real::new(c"cuMemAllocAsync", LIB);
static MEM_ALLOC_ASYNC_PTSZ: Real = Real::new(c"cuMemAllocAsync_ptsz", LIB);
static MEM_FREE_ASYNC: Real = Real::new(c"cuMemFreeAsync", LIB);
static MEM_FREE_ASYNC_PTSZ: Real = Real::new(c"cuMemFreeAsync_ptsz", LIB);
static MEM_ALLOC_POOL: Real = Real::new(c"cuMemAllocFromPoolAsync", LIB);
static MEM_ALLOC_POOL_PTSZ: Real = Real::new(c"cuMemAllocFromPoolAsync_ptsz", LIB);
static MEM_ALLOC_HOST: Real = Real::new(c"cuMemAllocHost_v2", LIB);
static MEM_HOST_ALLOC: Real = Real::new(c"cuMemHostAlloc", LIB);
static MEM_FREE_HOST: Real = Real::new(c"cuMemFreeHost", LIB);
static MEM_HOST_REGISTER: Real = Real::new(c"cuMemHostRegister_v2", LIB);
static MEM_HOST_UNREGISTER: Real = Real::new(c"cuMemHostUnregister", LIB);
static MEM_GET_INFO: Real = Real::new(c"cuMemGetInfo_v2", LIB);
static MEM_ALLOC_MANAGED: Real = Real::new(c"cuMemAllocManaged", LIB);
static MEM_CREATE: Real = Real::new(c"cuMemCreate", LIB);
static MEM_RELEASE: Real = Real::new(c"cuMemRelease", LIB);
static GET_PROC: Real = Real::new(c"cuGetProcAddress", LIB);
static GET_PROC_V2: Real = Real::new(c"cuGetProcAddress_v2", LIB);
// Used, not wrapped.
static CTX_GET_DEVICE: Real = Real::new(c"cuCtxGetDevice", LIB);
static DEVICE_TOTAL_MEM: Real = Real::new(c"cuDeviceTotalMem_v2", LIB);
static STREAM_IS_CAPTURING: Real = Real::new(c"cuStreamIsCapturing", LIB);
static MEM_PREFETCH_V2: Real = Real::new(c"cuMemPrefetchAsync_v2", LIB);
static CTX_GET_CURRENT: Real = Real::new(c"cuCtxGetCurrent", LIB);
static CTX_SET_CURRENT: Real = Real::new(c"cuCtxSetCurrent", LIB);
static MEM_ADVISE_V2: Real = Real::new(c"cuMemAdvise_v2", LIB);
static MEM_HOST_REGISTER_USE: Real = Real::new(c"cuMemHostRegister_v2", LIB);
static MEM_HOST_UNREGISTER_USE: Real = Real::new(c"cuMemHostUnregister", LIB);

super::wrapped! {
    cuMemAlloc_v2 => MEM_ALLOC,
    cuMemFree_v2 => MEM_FREE,
    cuMemAllocAsync => MEM_ALLOC_ASYNC,
    cuMemAllocAsync_ptsz => MEM_ALLOC_ASYNC_PTSZ,
    cuMemFreeAsync => MEM_FREE_ASYNC,
    cuMemFreeAsync_ptsz => MEM_FREE_ASYNC_PTSZ,
    cuMemAllocFromPoolAsync => MEM_ALLOC_POOL,
    cuMemAllocFromPoolAsync_ptsz => MEM_ALLOC_POOL_PTSZ,
    cuMemAllocHost_v2 => MEM_ALLOC_HOST,
    cuMemHostAlloc => MEM_HOST_ALLOC,
    cuMemFreeHost => MEM_FREE_HOST,
    cuMemHostRegister_v2 => MEM_HOST_REGISTER,
    cuMemHostUnregister => MEM_HOST_UNREGISTER,
    cuMemGetInfo_v2 => MEM_GET_INFO,
    cuMemAllocManaged => MEM_ALLOC_MANAGED,
    cuMemCreate => MEM_CREATE,
    cuMemRelease => MEM_RELEASE,
    cuGetProcAddress => GET_PROC,
    cuGetProcAddress_v2 => GET_PROC_V2,
    cuMemGetAddressRange_v2 => MEM_GET_ADDRESS_RANGE,
    cuPointerGetAttribute => POINTER_GET_ATTRIBUTE,
    cuPointerGetAttributes => POINTER_GET_ATTRIBUTES,
    cuIpcGetMemHandle => IPC_GET_MEM_HANDLE,
}

/// The current context's device (0 when there is none or no driver).
pub fn ctx_device() -> i32 {
    let mut d: c_int = 0;
    let rc = call_real!(
        CTX_GET_DEVICE,
        NOT_INITIALIZED,
        fn(*mut c_int) -> CUresult,
        &mut d
    );
    if rc == 0 {
        d
    } else {
        0
    }
}

/// A device's memory, from the driver.
pub fn total_mem(dev: i32) -> Option<u64> {
    let mut b: usize = 0;
    let rc = call_real!(
        DEVICE_TOTAL_MEM,
        NOT_INITIALIZED,
        fn(*mut usize, c_int) -> CUresult,
        &mut b,
        dev
    );
    (rc == 0).then_some(b as u64)
}

/// Whether `s` is capturing a graph (errors: not known to be). The handle is only
/// passed to the driver.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn capturing(s: CUstream) -> bool {
    let mut st: c_int = 0;
    let rc = call_real!(
        STREAM_IS_CAPTURING,
        NOT_INITIALIZED,
        fn(CUstream, *mut c_int) -> CUresult,
        s,
        &mut st
    );
    rc == 0 && st != 0
}

/// Managed memory preferring the host, for an allocation past the limit.
///
/// # Safety
/// `dptr` is writable.
pub unsafe fn oversubscribed(dptr: *mut CUdeviceptr, size: usize) -> CUresult {
    // CU_MEM_ATTACH_GLOBAL
    let rc = call_real!(
        MEM_ALLOC_MANAGED,
        NOT_INITIALIZED,
        fn(*mut CUdeviceptr, usize, c_uint) -> CUresult,
        dptr,
        size,
        1
    );
    if rc != 0 {
        // No managed memory: out of memory, as without oversubscription.
        return OUT_OF_MEMORY;
    }
    // SAFETY: written by the successful call.
    let p = unsafe { *dptr };
    advise_host(p, size);
    state::note(
        p,
        Rec {
            size: size as u64,
            dev: ctx_device(),
            kind: Kind::Oversubscribed,
        },
    );
    0
}

/// `CUmemLocation`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Loc {
    ty: c_int,
    id: c_int,
}

/// Advises managed memory to prefer the host (CU_MEM_ADVISE_SET_PREFERRED_LOCATION,
/// CU_MEM_LOCATION_TYPE_HOST); best effort (a driver without `cuMemAdvise_v2` keeps
/// the default placement).
pub fn advise_host(p: CUdeviceptr, size: usize) {
    let _ = call_real!(
        MEM_ADVISE_V2,
        NOT_INITIALIZED,
        fn(CUdeviceptr, usize, c_int, Loc) -> CUresult,
        p,
        size,
        3,
        Loc { ty: 2, id: 0 }
    );
}

/// Before work on stream `s` touches `p`: an oversubscribed allocation seen for the
/// first time is prefetched to its device on that stream (best effort).
#[allow(clippy::not_unsafe_ptr_arg_deref)] // `s` is only passed to the driver
pub fn prefetch_on_first_use(p: u64, s: CUstream) {
    let Some((a, size, dev)) = state::first_use(p) else {
        return;
    };
    let rc = call_real!(
        MEM_PREFETCH_V2,
        NOT_INITIALIZED,
        fn(CUdeviceptr, usize, Loc, c_uint, CUstream) -> CUresult,
        a,
        size as usize,
        Loc { ty: 1, id: dev },
        0,
        s
    );
    if rc == 0 {
        state::PREFETCHES.fetch_add(1, Ordering::Relaxed);
    }
}

/// The calling thread's current context (0: none).
pub fn current_ctx() -> usize {
    let mut c: *mut c_void = std::ptr::null_mut();
    let rc = call_real!(
        CTX_GET_CURRENT,
        NOT_INITIALIZED,
        fn(*mut *mut c_void) -> CUresult,
        &mut c
    );
    if rc == 0 {
        c as usize
    } else {
        0
    }
}

/// Unregisters `p` with context `ctx` current (the one that registered it), the
/// thread's own context restored after.
pub fn unregister_in(ctx: usize, p: u64) {
    let before = current_ctx();
    if before != ctx && ctx != 0 {
        let _ = call_real!(
            CTX_SET_CURRENT,
            NOT_INITIALIZED,
            fn(*mut c_void) -> CUresult,
            ctx as *mut c_void
        );
    }
    let _ = unregister(p);
    if before != ctx && ctx != 0 {
        let _ = call_real!(
            CTX_SET_CURRENT,
            NOT_INITIALIZED,
            fn(*mut c_void) -> CUresult,
            before as *mut c_void
        );
    }
}

/// A device allocation through `call`, counted and limited.
///
/// # Safety
/// `dptr` is null or writable; `call` makes the allocation into it.
unsafe fn device_alloc(
    dptr: *mut CUdeviceptr,
    size: usize,
    stream: Option<CUstream>,
    call: &dyn Fn() -> CUresult,
) -> CUresult {
    let Some(cfg) = config() else { return call() };
    if nested() || dptr.is_null() || size == 0 {
        return call();
    }
    if let Some(s) = stream {
        if capturing(s) {
            state::CAPTURED.fetch_add(1, Ordering::Relaxed);
            return call();
        }
    }
    guard(OUT_OF_MEMORY, || {
        let dev = ctx_device();
        match admit(cfg, dev, size as u64, &|| total_mem(dev)) {
            Admit::Charged => {
                let s = stream.unwrap_or(std::ptr::null_mut());
                // SAFETY: `dptr` is writable.
                let mut out = |a: u64| unsafe { *dptr = a };
                if let Some(rc) = pool_alloc(cfg, dev, size, s, OUT_OF_MEMORY, &mut out) {
                    return rc;
                }
                let rc = call();
                // SAFETY: written by the call when it succeeded.
                let addr = || unsafe { *dptr };
                super::driver_alloc_done(rc == 0, addr, size, dev, stream.map_or(0, |s| s as u64));
                rc
            }
            Admit::Refused => OUT_OF_MEMORY,
            // SAFETY: `dptr` is writable.
            Admit::Over => unsafe { oversubscribed(dptr, size) },
        }
    })
}

/// The stream a `_ptsz` entry point means: 0 is the per-thread default stream.
fn ptsz(s: CUstream) -> CUstream {
    if s.is_null() {
        2 as CUstream
    } else {
        s
    }
}

/// A free through `call`, counted (a pool block given back to the pool, on `stream`
/// when given).
fn any_free(addr: u64, stream: Option<CUstream>, call: &dyn Fn() -> CUresult) -> CUresult {
    if config().is_none() || nested() || addr == 0 {
        return call();
    }
    if let Some(rc) = guard(None, || {
        pool_free(addr, stream.map(|s| (ctx_device(), s)), INVALID_VALUE)
    }) {
        return rc;
    }
    let r = guard(None, || state::take(addr));
    // An async free of memory oversubscribed as managed memory (which cuMemFreeAsync
    // does not take): cuMemFree, which waits for the device's work first.
    let over = stream.is_some() && r.is_some_and(|r| r.kind == Kind::Oversubscribed);
    let rc = if over {
        call_real!(MEM_FREE, NOT_INITIALIZED, fn(CUdeviceptr) -> CUresult, addr)
    } else {
        call()
    };
    if rc != 0 {
        if let Some(r) = r {
            guard((), || state::restore(addr, r));
        }
    }
    rc
}

/// A host allocation (pinned or registered) through `call`, counted.
fn host_note(rc: CUresult, addr: u64, size: usize, kind: Kind) -> CUresult {
    if rc == 0 && config().is_some() && !nested() && addr != 0 {
        guard((), || {
            state::note(
                addr,
                Rec {
                    size: size as u64,
                    dev: -1,
                    kind,
                },
            )
        });
    }
    rc
}

/// `cuMemAlloc_v2`.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, size: usize) -> CUresult {
    let call = || {
        call_real!(
            MEM_ALLOC,
            NOT_INITIALIZED,
            fn(*mut CUdeviceptr, usize) -> CUresult,
            dptr,
            size
        )
    };
    // SAFETY: the caller's arguments.
    unsafe { device_alloc(dptr, size, None, &call) }
}

/// `cuMemFree_v2`.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(d: CUdeviceptr) -> CUresult {
    any_free(d, None, &|| {
        call_real!(MEM_FREE, NOT_INITIALIZED, fn(CUdeviceptr) -> CUresult, d)
    })
}

/// `cuMemAllocAsync`.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CUdeviceptr,
    size: usize,
    s: CUstream,
) -> CUresult {
    let call = || {
        call_real!(
            MEM_ALLOC_ASYNC,
            NOT_INITIALIZED,
            fn(*mut CUdeviceptr, usize, CUstream) -> CUresult,
            dptr,
            size,
            s
        )
    };
    // SAFETY: the caller's arguments.
    unsafe { device_alloc(dptr, size, Some(s), &call) }
}

/// `cuMemAllocAsync_ptsz`.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync_ptsz(
    dptr: *mut CUdeviceptr,
    size: usize,
    s: CUstream,
) -> CUresult {
    let call = || {
        call_real!(
            MEM_ALLOC_ASYNC_PTSZ,
            NOT_INITIALIZED,
            fn(*mut CUdeviceptr, usize, CUstream) -> CUresult,
            dptr,
            size,
            s
        )
    };
    // SAFETY: the caller's arguments.
    unsafe { device_alloc(dptr, size, Some(ptsz(s)), &call) }
}

/// `cuMemFreeAsync`.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync(d: CUdeviceptr, s: CUstream) -> CUresult {
    any_free(d, Some(s), &|| {
        call_real!(
            MEM_FREE_ASYNC,
            NOT_INITIALIZED,
            fn(CUdeviceptr, CUstream) -> CUresult,
            d,
            s
        )
    })
}

/// `cuMemFreeAsync_ptsz`.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync_ptsz(d: CUdeviceptr, s: CUstream) -> CUresult {
    any_free(d, Some(ptsz(s)), &|| {
        call_real!(
            MEM_FREE_ASYNC_PTSZ,
            NOT_INITIALIZED,
            fn(CUdeviceptr, CUstream) -> CUresult,
            d,
            s
        )
    })
}

/// `cuMemAllocFromPoolAsync`.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(
    dptr: *mut CUdeviceptr,
    size: usize,
    pool: *mut c_void,
    s: CUstream,
) -> CUresult {
    let call = || {
        call_real!(
            MEM_ALLOC_POOL,
            NOT_INITIALIZED,
            fn(*mut CUdeviceptr, usize, *mut c_void, CUstream) -> CUresult,
            dptr,
            size,
            pool,
            s
        )
    };
    if pool.is_null() {
        return call();
    }
    // SAFETY: the caller's arguments.
    unsafe { device_alloc(dptr, size, Some(s), &call) }
}

/// `cuMemAllocFromPoolAsync_ptsz`.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync_ptsz(
    dptr: *mut CUdeviceptr,
    size: usize,
    pool: *mut c_void,
    s: CUstream,
) -> CUresult {
    let call = || {
        call_real!(
            MEM_ALLOC_POOL_PTSZ,
            NOT_INITIALIZED,
            fn(*mut CUdeviceptr, usize, *mut c_void, CUstream) -> CUresult,
            dptr,
            size,
            pool,
            s
        )
    };
    if pool.is_null() {
        return call();
    }
    // SAFETY: the caller's arguments.
    unsafe { device_alloc(dptr, size, Some(ptsz(s)), &call) }
}

/// `cuMemAllocHost_v2`.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, size: usize) -> CUresult {
    if !pp.is_null() {
        if let Some(a) = guard(None, || pool_pinned(size, 0)) {
            // SAFETY: the caller's out-pointer.
            unsafe { *pp = a as *mut c_void };
            return 0;
        }
    }
    let rc = call_real!(
        MEM_ALLOC_HOST,
        NOT_INITIALIZED,
        fn(*mut *mut c_void, usize) -> CUresult,
        pp,
        size
    );
    let p = if rc == 0 && !pp.is_null() {
        // SAFETY: written by the successful call.
        (unsafe { *pp }) as u64
    } else {
        0
    };
    host_note(rc, p, size, Kind::Pinned)
}

/// `cuMemHostAlloc`.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemHostAlloc(
    pp: *mut *mut c_void,
    size: usize,
    flags: c_uint,
) -> CUresult {
    if !pp.is_null() {
        if let Some(a) = guard(None, || pool_pinned(size, flags)) {
            // SAFETY: the caller's out-pointer.
            unsafe { *pp = a as *mut c_void };
            return 0;
        }
    }
    let rc = call_real!(
        MEM_HOST_ALLOC,
        NOT_INITIALIZED,
        fn(*mut *mut c_void, usize, c_uint) -> CUresult,
        pp,
        size,
        flags
    );
    let p = if rc == 0 && !pp.is_null() {
        // SAFETY: written by the successful call.
        (unsafe { *pp }) as u64
    } else {
        0
    };
    host_note(rc, p, size, Kind::Pinned)
}

/// `cuMemFreeHost`.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    if guard(false, || pool_free_pinned(p as u64)) {
        return 0;
    }
    any_free(p as u64, None, &|| {
        call_real!(
            MEM_FREE_HOST,
            NOT_INITIALIZED,
            fn(*mut c_void) -> CUresult,
            p
        )
    })
}

/// `cuMemHostRegister_v2`.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemHostRegister_v2(
    p: *mut c_void,
    size: usize,
    flags: c_uint,
) -> CUresult {
    let rc = call_real!(
        MEM_HOST_REGISTER,
        NOT_INITIALIZED,
        fn(*mut c_void, usize, c_uint) -> CUresult,
        p,
        size,
        flags
    );
    host_note(rc, p as u64, size, Kind::Registered)
}

/// `cuMemHostUnregister`.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemHostUnregister(p: *mut c_void) -> CUresult {
    any_free(p as u64, None, &|| {
        call_real!(
            MEM_HOST_UNREGISTER,
            NOT_INITIALIZED,
            fn(*mut c_void) -> CUresult,
            p
        )
    })
}

/// Registers `len` bytes at `p` for pin-on-copy (the shim's own registration).
pub fn register(p: u64, len: usize) -> CUresult {
    // CU_MEMHOSTREGISTER_PORTABLE
    call_real!(
        MEM_HOST_REGISTER_USE,
        NOT_INITIALIZED,
        fn(*mut c_void, usize, c_uint) -> CUresult,
        p as *mut c_void,
        len,
        1
    )
}

/// Unregisters what [`register`] registered.
pub fn unregister(p: u64) -> CUresult {
    call_real!(
        MEM_HOST_UNREGISTER_USE,
        NOT_INITIALIZED,
        fn(*mut c_void) -> CUresult,
        p as *mut c_void
    )
}

/// `cuMemGetInfo_v2`: with a limit, total = the limit and free = the limit minus what
/// the process holds.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    let rc = call_real!(
        MEM_GET_INFO,
        NOT_INITIALIZED,
        fn(*mut usize, *mut usize) -> CUresult,
        free,
        total
    );
    // SAFETY: written by the call when it succeeded.
    unsafe { limit_mem_info(rc == 0, !nested(), free, total, ctx_device) };
    rc
}

/// `cuMemAllocManaged`: counted (not charged to the device: managed memory moves).
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut CUdeviceptr,
    size: usize,
    flags: c_uint,
) -> CUresult {
    let rc = call_real!(
        MEM_ALLOC_MANAGED,
        NOT_INITIALIZED,
        fn(*mut CUdeviceptr, usize, c_uint) -> CUresult,
        dptr,
        size,
        flags
    );
    if rc == 0 && !dptr.is_null() && config().is_some() && !nested() {
        // SAFETY: written by the successful call.
        let p = unsafe { *dptr };
        let dev = ctx_device();
        guard((), || {
            state::note(
                p,
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

/// `cuMemCreate`: physical memory on a device is charged to it (and limited).
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut u64,
    size: usize,
    prop: *const c_void,
    flags: u64,
) -> CUresult {
    let call = || {
        call_real!(
            MEM_CREATE,
            NOT_INITIALIZED,
            fn(*mut u64, usize, *const c_void, u64) -> CUresult,
            handle,
            size,
            prop,
            flags
        )
    };
    let Some(cfg) = config() else { return call() };
    if nested() || handle.is_null() || prop.is_null() || size == 0 {
        return call();
    }
    // CUmemAllocationProp: type, requestedHandleTypes, then CUmemLocation { type, id }
    // at byte 8; CU_MEM_LOCATION_TYPE_DEVICE = 1.
    // SAFETY: the caller's property struct, at least 16 bytes.
    let (lt, lid) = unsafe {
        let b = prop.cast::<u8>();
        (
            b.add(8).cast::<c_int>().read_unaligned(),
            b.add(12).cast::<c_int>().read_unaligned(),
        )
    };
    let dev = if lt == 1 { lid } else { -1 };
    guard(OUT_OF_MEMORY, || {
        // Physical memory cannot become managed memory: past the limit it is refused,
        // whatever the mode.
        if dev >= 0 && admit(cfg, dev, size as u64, &|| total_mem(dev)) != Admit::Charged {
            return OUT_OF_MEMORY;
        }
        let rc = call();
        if rc == 0 {
            // SAFETY: written by the successful call.
            let h = unsafe { *handle };
            state::note_handle(
                h,
                Rec {
                    size: size as u64,
                    dev,
                    kind: Kind::Physical,
                },
            );
        } else if dev >= 0 {
            state::uncharge(dev, size as u64);
        }
        rc
    })
}

/// `cuMemRelease`.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemRelease(h: u64) -> CUresult {
    let call = || call_real!(MEM_RELEASE, NOT_INITIALIZED, fn(u64) -> CUresult, h);
    if config().is_none() || nested() {
        return call();
    }
    let r = guard(None, || state::take_handle(h));
    let rc = call();
    if rc != 0 {
        if let Some(r) = r {
            guard((), || state::restore_handle(h, r));
        }
    }
    rc
}

/// After a successful lookup: the wrapper of exactly the variant returned.
///
/// # Safety
/// `symbol` is null or NUL-terminated; `pfn` null or written by the lookup.
unsafe fn wrap_lookup(rc: CUresult, symbol: *const c_char, pfn: *mut *mut c_void) {
    if rc != 0 || symbol.is_null() || pfn.is_null() {
        return;
    }
    guard((), || {
        // SAFETY: NUL-terminated, the caller's.
        let asked = unsafe { std::ffi::CStr::from_ptr(symbol) }.to_bytes();
        // SAFETY: written by the successful lookup.
        unsafe { *pfn = wrap_proc(asked, *pfn) };
    });
}

/// `cuGetProcAddress` (CUDA 11.3-12, four arguments): the real lookup first, then the
/// wrapper of exactly the variant it returned; anything not wrapped as returned.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
) -> CUresult {
    let rc = call_real!(
        GET_PROC,
        NOT_INITIALIZED,
        fn(*const c_char, *mut *mut c_void, c_int, u64) -> CUresult,
        symbol,
        pfn,
        version,
        flags
    );
    // SAFETY: the caller's arguments, after the lookup.
    unsafe { wrap_lookup(rc, symbol, pfn) };
    rc
}

/// `cuGetProcAddress_v2` (CUDA 12): as [`cuGetProcAddress`]; `symbolStatus` is the
/// driver's, untouched.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    let rc = call_real!(
        GET_PROC_V2,
        NOT_INITIALIZED,
        fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CUresult,
        symbol,
        pfn,
        version,
        flags,
        status
    );
    // SAFETY: the caller's arguments, after the lookup.
    unsafe { wrap_lookup(rc, symbol, pfn) };
    rc
}

static MEM_GET_ADDRESS_RANGE: Real = Real::new(c"cuMemGetAddressRange_v2", LIB);
static POINTER_GET_ATTRIBUTE: Real = Real::new(c"cuPointerGetAttribute", LIB);
static POINTER_GET_ATTRIBUTES: Real = Real::new(c"cuPointerGetAttributes", LIB);
static IPC_GET_MEM_HANDLE: Real = Real::new(c"cuIpcGetMemHandle", LIB);

/// The pool block holding `d`, in pool mode.
fn pool_range(d: CUdeviceptr) -> Option<(u64, u64)> {
    if !config().is_some_and(super::GpuConfig::pooled) || nested() {
        return None;
    }
    guard(None, || super::pool::range(d))
}

/// `cuMemGetAddressRange_v2`: for memory served by the pool, the block (what the
/// program allocated), not the pool's segment.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuMemGetAddressRange_v2(
    base: *mut CUdeviceptr,
    size: *mut usize,
    d: CUdeviceptr,
) -> CUresult {
    if let Some((a, len)) = pool_range(d) {
        // SAFETY: the caller's out-pointers (either may be null, as the driver allows).
        unsafe {
            if !base.is_null() {
                *base = a;
            }
            if !size.is_null() {
                *size = len as usize;
            }
        }
        return 0;
    }
    call_real!(
        MEM_GET_ADDRESS_RANGE,
        NOT_INITIALIZED,
        fn(*mut CUdeviceptr, *mut usize, CUdeviceptr) -> CUresult,
        base,
        size,
        d
    )
}

/// `cuPointerGetAttribute`: for memory served by the pool, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR
/// (11) and _RANGE_SIZE (12) describe the block; everything else is the driver's.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuPointerGetAttribute(
    data: *mut c_void,
    attribute: c_int,
    d: CUdeviceptr,
) -> CUresult {
    if !data.is_null() && (attribute == 11 || attribute == 12) {
        if let Some((a, len)) = pool_range(d) {
            // SAFETY: the caller's buffer for this attribute (a CUdeviceptr or a size_t).
            unsafe {
                if attribute == 11 {
                    *data.cast::<CUdeviceptr>() = a;
                } else {
                    *data.cast::<usize>() = len as usize;
                }
            }
            return 0;
        }
    }
    call_real!(
        POINTER_GET_ATTRIBUTE,
        NOT_INITIALIZED,
        fn(*mut c_void, c_int, CUdeviceptr) -> CUresult,
        data,
        attribute,
        d
    )
}

/// `cuPointerGetAttributes`: the driver's answers, with the range start and size
/// (11, 12) of memory served by the pool describing the block.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuPointerGetAttributes(
    n: c_uint,
    attributes: *mut c_int,
    data: *mut *mut c_void,
    d: CUdeviceptr,
) -> CUresult {
    let rc = call_real!(
        POINTER_GET_ATTRIBUTES,
        NOT_INITIALIZED,
        fn(c_uint, *mut c_int, *mut *mut c_void, CUdeviceptr) -> CUresult,
        n,
        attributes,
        data,
        d
    );
    if rc != 0 || attributes.is_null() || data.is_null() {
        return rc;
    }
    if let Some((a, len)) = pool_range(d) {
        for i in 0..n as usize {
            // SAFETY: the caller's arrays of `n` attributes and result pointers, which
            // the driver has just filled.
            unsafe {
                let out = *data.add(i);
                if out.is_null() {
                    continue;
                }
                match *attributes.add(i) {
                    11 => *out.cast::<CUdeviceptr>() = a,
                    12 => *out.cast::<usize>() = len as usize,
                    _ => {}
                }
            }
        }
    }
    rc
}

/// `cuIpcGetMemHandle`: refused (CUDA_ERROR_INVALID_VALUE, one line on stderr) for
/// memory served by the pool, whose handle would name the pool's whole segment.
///
/// # Safety
/// As the driver's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn cuIpcGetMemHandle(handle: *mut c_void, d: CUdeviceptr) -> CUresult {
    if pool_range(d).is_some() {
        super::pool::ipc_refused();
        return INVALID_VALUE;
    }
    call_real!(
        IPC_GET_MEM_HANDLE,
        NOT_INITIALIZED,
        fn(*mut c_void, CUdeviceptr) -> CUresult,
        handle,
        d
    )
}

/// Whether `d` was served by the pool (for the runtime's IPC wrapper).
pub fn pool_served(d: u64) -> bool {
    pool_range(d).is_some()
}
