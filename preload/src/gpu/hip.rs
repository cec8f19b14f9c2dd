//! HIP's allocation entry points (`libamdhip64.so`), interposed by symbol and handed
//! out by `dlsym` and `hipGetProcAddress`: counted, limited (`hipErrorOutOfMemory`, 2,
//! past the limit; `hipMemGetInfo` answers the limit) and, in oversubscribe mode,
//! managed memory past the limit. Tested against the fake HIP runtime only: nothing
//! here has run on AMD hardware.
#![allow(non_snake_case)]

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::atomic::Ordering;

use super::real::{call_real, wrap_proc, Real};
use super::state::{self, Kind, Rec};
use super::{admit, config, guard, limit_mem_info, nested, Admit, Nest};

/// `hipError_t`.
pub type HipError = c_int;
/// `hipStream_t`.
pub type HipStream = *mut c_void;
/// `hipErrorOutOfMemory`.
pub const OUT_OF_MEMORY: HipError = 2;
/// `hipErrorNotInitialized`: no HIP runtime loaded.
pub const NOT_INITIALIZED: HipError = 3;

const LIB: &[u8] = b"libamdhip64.so";

static MALLOC: Real = Real::new(c"hipMalloc", LIB);
static FREE: Real = Real::new(c"hipFree", LIB);
static MALLOC_ASYNC: Real = Real::new(c"hipMallocAsync", LIB);
static FREE_ASYNC: Real = Real::new(c"hipFreeAsync", LIB);
static HOST_MALLOC: Real = Real::new(c"hipHostMalloc", LIB);
static HOST_FREE: Real = Real::new(c"hipHostFree", LIB);
static MEM_GET_INFO: Real = Real::new(c"hipMemGetInfo", LIB);
static GET_PROC: Real = Real::new(c"hipGetProcAddress", LIB);
// Used, not wrapped.
static GET_DEVICE: Real = Real::new(c"hipGetDevice", LIB);
static TOTAL_MEM: Real = Real::new(c"hipDeviceTotalMem", LIB);
static IS_CAPTURING: Real = Real::new(c"hipStreamIsCapturing", LIB);
static MALLOC_MANAGED: Real = Real::new(c"hipMallocManaged", LIB);
static MEM_ADVISE: Real = Real::new(c"hipMemAdvise", LIB);

super::wrapped! {
    hipMalloc => MALLOC,
    hipFree => FREE,
    hipMallocAsync => MALLOC_ASYNC,
    hipFreeAsync => FREE_ASYNC,
    hipHostMalloc => HOST_MALLOC,
    hipHostFree => HOST_FREE,
    hipMemGetInfo => MEM_GET_INFO,
    hipGetProcAddress => GET_PROC,
}

fn device() -> i32 {
    let mut d: c_int = 0;
    let rc = call_real!(
        GET_DEVICE,
        NOT_INITIALIZED,
        fn(*mut c_int) -> HipError,
        &mut d
    );
    if rc == 0 {
        d
    } else {
        0
    }
}

fn total_mem(dev: i32) -> Option<u64> {
    let mut b: usize = 0;
    let rc = call_real!(
        TOTAL_MEM,
        NOT_INITIALIZED,
        fn(*mut usize, c_int) -> HipError,
        &mut b,
        dev
    );
    (rc == 0).then_some(b as u64)
}

fn capturing(s: HipStream) -> bool {
    let mut st: c_int = 0;
    let rc = call_real!(
        IS_CAPTURING,
        NOT_INITIALIZED,
        fn(HipStream, *mut c_int) -> HipError,
        s,
        &mut st
    );
    rc == 0 && st != 0
}

/// # Safety
/// `p` is null or writable; `call` allocates into it.
unsafe fn device_alloc(
    p: *mut *mut c_void,
    size: usize,
    stream: Option<HipStream>,
    call: &dyn Fn() -> HipError,
) -> HipError {
    let outer = !nested();
    let _n = Nest::enter();
    let Some(cfg) = config() else { return call() };
    if !outer || p.is_null() || size == 0 {
        return call();
    }
    if stream.is_some_and(capturing) {
        state::CAPTURED.fetch_add(1, Ordering::Relaxed);
        return call();
    }
    guard(OUT_OF_MEMORY, || {
        let dev = device();
        match admit(cfg, dev, size as u64, &|| total_mem(dev)) {
            Admit::Charged => {
                let rc = call();
                if rc == 0 {
                    // SAFETY: written by the successful call.
                    let a = (unsafe { *p }) as u64;
                    state::note_on(
                        a,
                        Rec {
                            size: size as u64,
                            dev,
                            kind: Kind::Device,
                        },
                        stream.map_or(0, |s| s as u64),
                    );
                } else {
                    state::uncharge(dev, size as u64);
                }
                rc
            }
            Admit::Refused => OUT_OF_MEMORY,
            Admit::Over => {
                // hipMemAttachGlobal
                let rc = call_real!(
                    MALLOC_MANAGED,
                    NOT_INITIALIZED,
                    fn(*mut *mut c_void, usize, c_uint) -> HipError,
                    p,
                    size,
                    1
                );
                if rc != 0 {
                    return OUT_OF_MEMORY;
                }
                // SAFETY: written by the successful call.
                let a = unsafe { *p };
                // hipMemAdviseSetPreferredLocation (3) on hipCpuDeviceId (-1): best effort.
                let _ = call_real!(
                    MEM_ADVISE,
                    NOT_INITIALIZED,
                    fn(*const c_void, usize, c_int, c_int) -> HipError,
                    a,
                    size,
                    3,
                    -1
                );
                state::note(
                    a as u64,
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

fn any_free(a: u64, is_async: bool, call: &dyn Fn() -> HipError) -> HipError {
    let outer = !nested();
    let _n = Nest::enter();
    if config().is_none() || !outer || a == 0 {
        return call();
    }
    let r = guard(None, || state::take(a));
    // An async free of memory oversubscribed as managed memory: hipFree.
    let over = is_async && r.is_some_and(|r| r.kind == Kind::Oversubscribed);
    let rc = if over {
        call_real!(
            FREE,
            NOT_INITIALIZED,
            fn(*mut c_void) -> HipError,
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

/// `hipMalloc`.
///
/// # Safety
/// As HIP's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn hipMalloc(p: *mut *mut c_void, size: usize) -> HipError {
    let call = || {
        call_real!(
            MALLOC,
            NOT_INITIALIZED,
            fn(*mut *mut c_void, usize) -> HipError,
            p,
            size
        )
    };
    // SAFETY: the caller's arguments.
    unsafe { device_alloc(p, size, None, &call) }
}

/// `hipFree`.
///
/// # Safety
/// As HIP's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn hipFree(p: *mut c_void) -> HipError {
    any_free(p as u64, false, &|| {
        call_real!(FREE, NOT_INITIALIZED, fn(*mut c_void) -> HipError, p)
    })
}

/// `hipMallocAsync`.
///
/// # Safety
/// As HIP's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn hipMallocAsync(
    p: *mut *mut c_void,
    size: usize,
    s: HipStream,
) -> HipError {
    let call = || {
        call_real!(
            MALLOC_ASYNC,
            NOT_INITIALIZED,
            fn(*mut *mut c_void, usize, HipStream) -> HipError,
            p,
            size,
            s
        )
    };
    // SAFETY: the caller's arguments.
    unsafe { device_alloc(p, size, Some(s), &call) }
}

/// `hipFreeAsync`.
///
/// # Safety
/// As HIP's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn hipFreeAsync(p: *mut c_void, s: HipStream) -> HipError {
    any_free(p as u64, true, &|| {
        call_real!(
            FREE_ASYNC,
            NOT_INITIALIZED,
            fn(*mut c_void, HipStream) -> HipError,
            p,
            s
        )
    })
}

/// `hipHostMalloc`.
///
/// # Safety
/// As HIP's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn hipHostMalloc(
    p: *mut *mut c_void,
    size: usize,
    flags: c_uint,
) -> HipError {
    let outer = !nested();
    let _n = Nest::enter();
    let rc = call_real!(
        HOST_MALLOC,
        NOT_INITIALIZED,
        fn(*mut *mut c_void, usize, c_uint) -> HipError,
        p,
        size,
        flags
    );
    if rc == 0 && outer && !p.is_null() && config().is_some() {
        // SAFETY: written by the successful call.
        let a = (unsafe { *p }) as u64;
        if a != 0 {
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
    }
    rc
}

/// `hipHostFree`.
///
/// # Safety
/// As HIP's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn hipHostFree(p: *mut c_void) -> HipError {
    any_free(p as u64, false, &|| {
        call_real!(HOST_FREE, NOT_INITIALIZED, fn(*mut c_void) -> HipError, p)
    })
}

/// `hipMemGetInfo`: with a limit, total = the limit and free = the limit minus what the
/// process holds.
///
/// # Safety
/// As HIP's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn hipMemGetInfo(free: *mut usize, total: *mut usize) -> HipError {
    let outer = !nested();
    let rc = {
        let _n = Nest::enter();
        call_real!(
            MEM_GET_INFO,
            NOT_INITIALIZED,
            fn(*mut usize, *mut usize) -> HipError,
            free,
            total
        )
    };
    // SAFETY: written by the call when it succeeded.
    unsafe { limit_mem_info(rc == 0, outer, free, total, device) };
    rc
}

/// `hipGetProcAddress` (ROCm 6.2): the real lookup first, then the wrapper of exactly
/// the function it returned; `symbolStatus` untouched.
///
/// # Safety
/// As HIP's.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn hipGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> HipError {
    let rc = call_real!(
        GET_PROC,
        NOT_INITIALIZED,
        fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> HipError,
        symbol,
        pfn,
        version,
        flags,
        status
    );
    if rc == 0 && !symbol.is_null() && !pfn.is_null() {
        guard((), || {
            // SAFETY: the caller's NUL-terminated name.
            let asked = unsafe { std::ffi::CStr::from_ptr(symbol) }.to_bytes();
            // SAFETY: written by the successful lookup.
            unsafe { *pfn = wrap_proc(asked, *pfn) };
        });
    }
    rc
}
