//! The CUDA driver (`libcuda`), loaded at run time, with cudarc's types.
//!
//! [`CudaDriver::get`] opens the library once per process (`libcuda.so.1`, the name the
//! driver installs, and `libcuda.so` only when that is not found) and resolves every
//! entry point of [`CudaApi`] up front; the library is never unloaded, so the table is
//! `'static`. cudarc's own loader (`sys::culib()`) tries `libcuda.so` first: on a host
//! with the CUDA toolkit's `lib64/stubs` on the library path it would load the stub
//! that answers every call with `CUDA_ERROR_STUB_LIBRARY`. So only cudarc's types are
//! used ([`types`], the `cuda-12080` API level), never its loader.
//!
//! One declaration, `cuda_api!` below, yields the function table, the symbol lists of
//! its three groups ([`REQUIRED`], [`VMM`], [`DRIVER_PINNED`]) and a compile-time check
//! that every signature is cudarc's (`signature_check`), as `hip_api!` does for HIP.
//! A missing symbol does not fail the load: the caller asks [`CudaDriver::missing`]
//! for each group (the required one refuses the driver, the optional ones switch a
//! feature off), and a call through a missing entry returns [`Status::MISSING`].
//!
//! Every entry point returns a [`Status`], the number the driver returned, not cudarc's
//! `CUresult` enum: a newer driver may return codes the 12.8 bindings' enum lacks
//! (CUDA 13.1's `CUDA_ERROR_STREAM_DETACHED`), and such a value read as the enum is
//! undefined behaviour. The enum only names the codes ([`Status`]'s constants).

#![allow(non_snake_case)]

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};
use std::fmt;
use std::sync::OnceLock;

use libloading::Library;

/// cudarc's raw driver types (`cuda-12080`): handles, enums and structs.
pub use cudarc::driver::sys as types;

use types::{
    CUcontext, CUdevice, CUdevice_attribute, CUdeviceptr, CUevent, CUmemAccessDesc,
    CUmemAllocationGranularity_flags, CUmemAllocationProp, CUmemGenericAllocationHandle,
    CUmemLocation, CUmem_advise, CUresult, CUstream,
};

/// A status passed *to* the driver (`cuGetErrorString`'s argument): the raw number.
pub type CUstatus = u32;
/// A stream's capture status as the driver writes it (`CUstreamCaptureStatus`, a C
/// enum, read as its number): 0 is `CU_STREAM_CAPTURE_STATUS_NONE`.
pub type CaptureStatus = c_uint;

/// A status as the driver returns it: a number (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u32);

impl Status {
    /// `CUDA_SUCCESS`.
    pub const SUCCESS: Status = Status(CUresult::CUDA_SUCCESS as u32);
    /// `CUDA_ERROR_NOT_READY`: queued work has not finished (not a failure).
    pub const NOT_READY: Status = Status(CUresult::CUDA_ERROR_NOT_READY as u32);
    /// `CUDA_ERROR_NO_DEVICE`.
    pub const NO_DEVICE: Status = Status(CUresult::CUDA_ERROR_NO_DEVICE as u32);
    /// `CUDA_ERROR_OUT_OF_MEMORY`.
    pub const OUT_OF_MEMORY: Status = Status(CUresult::CUDA_ERROR_OUT_OF_MEMORY as u32);
    /// `CUDA_ERROR_STUB_LIBRARY`: the toolkit's stub was loaded, not the driver.
    pub const STUB_LIBRARY: Status = Status(CUresult::CUDA_ERROR_STUB_LIBRARY as u32);
    /// `CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED`.
    pub const ALREADY_REGISTERED: Status =
        Status(CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED as u32);
    /// `CUDA_ERROR_UNKNOWN`.
    pub const UNKNOWN: Status = Status(CUresult::CUDA_ERROR_UNKNOWN as u32);
    /// What a call through a symbol the library lacks returns (`CUDA_ERROR_NOT_FOUND`;
    /// callers check [`CudaDriver::missing`] first, so never in practice).
    pub const MISSING: Status = Status(CUresult::CUDA_ERROR_NOT_FOUND as u32);

    /// Whether this is `CUDA_SUCCESS`.
    pub fn is_ok(self) -> bool {
        self == Status::SUCCESS
    }
}

/// Declares the driver entry points once, in groups; expands to [`CudaApi`], its
/// resolver, one symbol list per group, and the signature check against cudarc.
macro_rules! cuda_api {
    ($( $(#[$gdoc:meta])* $group:ident {
        $( fn $name:ident($($arg:ident: $ty:ty),* $(,)?); )*
    } )*) => {
        /// Every driver entry point hetmem calls, resolved from the one loaded `libcuda`
        /// (`None`: the library lacks it). Only reachable as [`CudaDriver::api`].
        pub struct CudaApi {
            $($( $name: Option<unsafe extern "C" fn($($ty),*) -> u32>, )*)*
        }

        impl CudaApi {
            $($(
                #[doc = concat!("`", stringify!($name), "`, or [`Status::MISSING`] when the library lacks it.")]
                ///
                /// # Safety
                /// As the driver documents for the call: valid handles and pointers of
                /// the sizes it reads or writes, a current context where it needs one.
                #[inline]
                #[allow(clippy::too_many_arguments)]
                pub unsafe fn $name(&self, $($arg: $ty),*) -> Status {
                    match self.$name {
                        // SAFETY: resolved under this name with this signature from the
                        // library, which stays loaded for the process's life; the caller
                        // meets the call's own contract.
                        Some(f) => Status(unsafe { f($($arg),*) }),
                        None => Status::MISSING,
                    }
                }
            )*)*

            /// Looks up every entry point in `lib`, recording each one it lacks.
            ///
            /// # Safety
            /// `lib` must be the CUDA driver: each symbol found under one of these
            /// names must have the C signature declared here (its enum return read as
            /// a `u32`); the pointers must not be called after `lib` is unloaded.
            unsafe fn resolve(lib: &Library) -> (CudaApi, Vec<(&'static str, String)>) {
                let mut missing = Vec::new();
                let api = CudaApi {
                    $($(
                        // SAFETY: the caller guarantees `lib` is the driver, whose symbol
                        // of this name has this signature; the pointer is copied out.
                        $name: match unsafe {
                            lib.get::<unsafe extern "C" fn($($ty),*) -> u32>(
                                concat!(stringify!($name), "\0").as_bytes(),
                            )
                        } {
                            Ok(sym) => Some(*sym),
                            Err(e) => {
                                missing.push((stringify!($name), e.to_string()));
                                None
                            }
                        },
                    )*)*
                };
                (api, missing)
            }
        }

        $(
            $(#[$gdoc])*
            pub const $group: &[&str] = &[$(stringify!($name)),*];
        )*

        /// Compile-time proof that every signature above is cudarc's: each `$ty` is
        /// re-read here, where the raw aliases name cudarc's enums, and cudarc's
        /// function of the same name must coerce to that function type.
        #[allow(dead_code, unused_imports)]
        mod signature_check {
            use cudarc::driver::sys::*;
            use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void};
            type CUstatus = CUresult;
            type CaptureStatus = CUstreamCaptureStatus;
            $($( const _: unsafe fn($($ty),*) -> CUresult = cudarc::driver::sys::$name; )*)*
        }
    };
}

cuda_api! {
    /// Every symbol the backend calls: a driver lacking one is refused.
    REQUIRED {
        fn cuInit(flags: c_uint);
        fn cuGetErrorString(error: CUstatus, text: *mut *const c_char);
        fn cuDeviceGetCount(count: *mut c_int);
        fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int);
        fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice);
        fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice);
        fn cuDeviceGetPCIBusId(bus_id: *mut c_char, len: c_int, dev: CUdevice);
        fn cuDeviceGetAttribute(pi: *mut c_int, attrib: CUdevice_attribute, dev: CUdevice);
        fn cuDeviceCanAccessPeer(can_access: *mut c_int, dev: CUdevice, peer: CUdevice);
        fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice);
        fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice);
        fn cuCtxGetCurrent(pctx: *mut CUcontext);
        fn cuCtxSetCurrent(ctx: CUcontext);
        fn cuCtxGetDevice(device: *mut CUdevice);
        fn cuCtxSynchronize();
        fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize);
        fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytes: usize);
        fn cuMemFree_v2(dptr: CUdeviceptr);
        fn cuMemAllocManaged(dptr: *mut CUdeviceptr, bytes: usize, flags: c_uint);
        fn cuMemHostRegister_v2(p: *mut c_void, bytes: usize, flags: c_uint);
        fn cuMemHostUnregister(p: *mut c_void);
        fn cuStreamCreate(stream: *mut CUstream, flags: c_uint);
        fn cuStreamDestroy_v2(stream: CUstream);
        fn cuStreamSynchronize(stream: CUstream);
        fn cuStreamWaitEvent(stream: CUstream, event: CUevent, flags: c_uint);
        fn cuStreamIsCapturing(stream: CUstream, status: *mut CaptureStatus);
        fn cuEventCreate(event: *mut CUevent, flags: c_uint);
        fn cuEventDestroy_v2(event: CUevent);
        fn cuEventRecord(event: CUevent, stream: CUstream);
        fn cuEventSynchronize(event: CUevent);
        fn cuEventQuery(event: CUevent);
        fn cuMemcpyAsync(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize, stream: CUstream);
        fn cuMemcpyPeerAsync(dst: CUdeviceptr, dst_ctx: CUcontext, src: CUdeviceptr, src_ctx: CUcontext, bytes: usize, stream: CUstream);
        fn cuMemPrefetchAsync_v2(ptr: CUdeviceptr, count: usize, location: CUmemLocation, flags: c_uint, stream: CUstream);
        fn cuMemAdvise_v2(ptr: CUdeviceptr, count: usize, advice: CUmem_advise, location: CUmemLocation);
    }
    /// Virtual memory management. Optional: without any of them every device reports
    /// no VMM.
    VMM {
        fn cuMemGetAllocationGranularity(granularity: *mut usize, prop: *const CUmemAllocationProp, option: CUmemAllocationGranularity_flags);
        fn cuMemAddressReserve(ptr: *mut CUdeviceptr, size: usize, alignment: usize, addr: CUdeviceptr, flags: c_ulonglong);
        fn cuMemAddressFree(ptr: CUdeviceptr, size: usize);
        fn cuMemCreate(handle: *mut CUmemGenericAllocationHandle, size: usize, prop: *const CUmemAllocationProp, flags: c_ulonglong);
        fn cuMemRelease(handle: CUmemGenericAllocationHandle);
        fn cuMemMap(ptr: CUdeviceptr, size: usize, offset: usize, handle: CUmemGenericAllocationHandle, flags: c_ulonglong);
        fn cuMemSetAccess(ptr: CUdeviceptr, size: usize, desc: *const CUmemAccessDesc, count: usize);
        fn cuMemUnmap(ptr: CUdeviceptr, size: usize);
    }
    /// The driver's own pinned host allocation (the baseline hetmem's pinning is
    /// measured against). Optional.
    DRIVER_PINNED {
        fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytes: usize);
        fn cuMemFreeHost(p: *mut c_void);
    }
}

/// The names `libcuda` is loaded by, in this order: the driver's own name first, so
/// that a toolkit stub named `libcuda.so` cannot shadow it.
pub const LIBRARY_NAMES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];

/// The loaded driver: its entry points, what it lacks, and where it was loaded from.
pub struct CudaDriver {
    api: CudaApi,
    missing: Vec<(&'static str, String)>,
    file: Option<String>,
    // Never dropped: the driver lives in a process-wide `static`.
    _lib: Library,
}

impl fmt::Debug for CudaDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaDriver")
            .field("file", &self.file)
            .field("missing", &self.missing)
            .finish_non_exhaustive()
    }
}

impl CudaDriver {
    /// The driver, loaded at the first call and kept for the process's life, or what
    /// each name's `dlopen` said (`name: reason; ...`).
    ///
    /// Loading runs the driver's initialisers, as at the start of any CUDA program, and
    /// every later call trusts that the library's symbols have the CUDA driver's C
    /// signatures: the same trust as a library found through `LD_LIBRARY_PATH`, or
    /// cudarc's own dynamic loading (see `HipRuntime::load` for the HIP side).
    pub fn get() -> Result<&'static CudaDriver, &'static str> {
        static DRIVER: OnceLock<Result<CudaDriver, String>> = OnceLock::new();
        DRIVER
            .get_or_init(|| {
                let mut tried = Vec::new();
                for name in LIBRARY_NAMES {
                    // SAFETY: loading libcuda runs only the driver's own initialisers,
                    // as at the start of any CUDA program; it is never unloaded.
                    match unsafe { Library::new(name) } {
                        Ok(lib) => {
                            // SAFETY: a library opened as libcuda is trusted to be the
                            // driver (the documented trust above); it stays loaded.
                            let (api, missing) = unsafe { CudaApi::resolve(&lib) };
                            let file = library_file(&lib);
                            return Ok(CudaDriver {
                                api,
                                missing,
                                file,
                                _lib: lib,
                            });
                        }
                        Err(e) => tried.push(format!("{name}: {e}")),
                    }
                }
                Err(tried.join("; "))
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// The entry points, valid for the process's life.
    pub fn api(&self) -> &CudaApi {
        &self.api
    }

    /// The first symbol of `group` ([`REQUIRED`], [`VMM`], [`DRIVER_PINNED`]) the
    /// library lacks, with the loader's reason.
    pub fn missing(&self, group: &[&str]) -> Option<(&'static str, &str)> {
        self.missing
            .iter()
            .find(|(name, _)| group.contains(name))
            .map(|(name, reason)| (*name, reason.as_str()))
    }

    /// The file the driver was loaded from (where `cuInit` lives), for messages.
    pub fn file(&self) -> Option<&str> {
        self.file.as_deref()
    }

    /// The driver's description of `code` (`cuGetErrorString`), or its number when the
    /// driver has none: `code` may be a value the bindings' enum lacks.
    pub fn error_string(&self, code: Status) -> String {
        let mut text: *const c_char = std::ptr::null();
        // SAFETY: `text` is a valid out-pointer; the driver stores a pointer to a static
        // string or nothing (missing symbol: MISSING, handled below).
        let status = unsafe { self.api.cuGetErrorString(code.0, &mut text) };
        if !status.is_ok() || text.is_null() {
            return format!("unrecognised CUDA status {}", code.0);
        }
        // SAFETY: on success `text` points at a NUL-terminated string with static
        // lifetime owned by the driver.
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }
}

/// The file `lib` was loaded from: where its `cuInit` lives.
fn library_file(lib: &Library) -> Option<String> {
    // SAFETY: only the symbol's address is read; nothing is called through it.
    let addr: *const c_void = *unsafe { lib.get::<*const c_void>(b"cuInit\0") }.ok()?;
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr only reads the loader's tables and fills `info`, which is valid
    // for writes; a zeroed Dl_info is a valid value (null pointers).
    if unsafe { libc::dladdr(addr, info.as_mut_ptr()) } == 0 {
        return None;
    }
    // SAFETY: zero-initialised and possibly filled by dladdr: valid either way.
    let info = unsafe { info.assume_init() };
    if info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated path owned by the loader, valid while the library stays
    // loaded (for the process's life); copied out at once.
    Some(
        unsafe { CStr::from_ptr(info.dli_fname) }
            .to_string_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbol_groups_are_disjoint_and_complete() {
        assert_eq!((REQUIRED.len(), VMM.len(), DRIVER_PINNED.len()), (35, 8, 2));
        for name in VMM.iter().chain(DRIVER_PINNED) {
            assert!(!REQUIRED.contains(name), "{name} would be required");
        }
        for name in DRIVER_PINNED {
            assert!(!VMM.contains(name), "{name}");
        }
        assert!(REQUIRED.contains(&"cuStreamIsCapturing"));
        assert!(VMM.contains(&"cuMemMap"));
    }

    #[test]
    fn statuses_are_the_drivers_numbers() {
        assert_eq!(Status::SUCCESS, Status(0));
        assert_eq!(Status::OUT_OF_MEMORY, Status(2));
        assert_eq!(Status::NOT_READY, Status(600));
        assert!(Status::SUCCESS.is_ok() && !Status::UNKNOWN.is_ok());
    }
}
