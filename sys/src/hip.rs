//! The HIP runtime (`libamdhip64.so`), loaded at run time.
//!
//! [`HipRuntime`] opens the library with `dlopen`, resolves every entry point hetmem
//! uses up front, and keeps the library loaded for as long as the function pointers
//! live. Nothing is linked at build time, so a binary built here starts on machines
//! with no ROCm installed and reports [`HipLoadError`] instead.
//!
//! Types and constants carry the names and values of HIP's `hip_runtime_api.h`
//! (checked against ROCm 5.2's header and `hip-sys` 0.1.2). The C enums (`hipError_t`,
//! `hipMemcpyKind`, ...) are plain `c_int`s here, not Rust enums: a newer runtime may
//! return a value that an enum generated from an older header does not have, and
//! receiving such a value as a Rust enum would be undefined behaviour.
//!
//! With the `rocm-link` feature the crate also compiles a check that every function
//! pointer type below has exactly the signature `hip-sys` gives the same function, and
//! that every constant equals `hip-sys`'s value (this links `libamdhip64`).

#![allow(non_camel_case_types, non_upper_case_globals, non_snake_case)]

use std::ffi::{c_char, c_int, c_uint, c_void, OsStr, OsString};
use std::fmt;
use std::path::Path;

/// A HIP status code (`hipError_t`, a C enum).
pub type hipError_t = c_int;
/// A device handle (`hipDevice_t`); on AMD it equals the ordinal.
pub type hipDevice_t = c_int;
/// An opaque stream handle (`hipStream_t`, `struct ihipStream_t*`).
pub type hipStream_t = *mut c_void;
/// An opaque event handle (`hipEvent_t`, `struct ihipEvent_t*`).
pub type hipEvent_t = *mut c_void;
/// Direction of a copy (`hipMemcpyKind`, a C enum).
pub type hipMemcpyKind = c_int;
/// A device attribute (`hipDeviceAttribute_t`, a C enum).
pub type hipDeviceAttribute_t = c_int;
/// Advice for managed memory (`hipMemoryAdvise`, a C enum).
pub type hipMemoryAdvise = c_int;
/// A stream's capture status (`hipStreamCaptureStatus`, a C enum).
pub type hipStreamCaptureStatus = c_int;

/// `hipStreamCaptureStatusNone`: the stream is not capturing (`Active` is 1,
/// `Invalidated` 2: both still in capture mode).
pub const hipStreamCaptureStatusNone: hipStreamCaptureStatus = 0;

/// Success.
pub const hipSuccess: hipError_t = 0;
/// An argument was invalid (also: `hipFree` of an unknown pointer).
pub const hipErrorInvalidValue: hipError_t = 1;
/// Out of memory (`hipErrorMemoryAllocation` is an alias).
pub const hipErrorOutOfMemory: hipError_t = 2;
/// The runtime is not initialised.
pub const hipErrorNotInitialized: hipError_t = 3;
/// No ROCm-capable device was found.
pub const hipErrorNoDevice: hipError_t = 100;
/// A device ordinal out of range.
pub const hipErrorInvalidDevice: hipError_t = 101;
/// A stale or foreign stream/event handle (`hipErrorInvalidResourceHandle` is an alias).
pub const hipErrorInvalidHandle: hipError_t = 400;
/// Queued work has not finished yet (from `hipEventQuery`; not a failure).
pub const hipErrorNotReady: hipError_t = 600;
/// The host range is already registered.
pub const hipErrorHostMemoryAlreadyRegistered: hipError_t = 712;
/// The host pointer was not registered.
pub const hipErrorHostMemoryNotRegistered: hipError_t = 713;
/// The operation is not supported on this device or system.
pub const hipErrorNotSupported: hipError_t = 801;
/// An unknown error.
pub const hipErrorUnknown: hipError_t = 999;

/// `hipMemcpyDefault`: the runtime infers the direction from the pointers (unified
/// addressing).
pub const hipMemcpyDefault: hipMemcpyKind = 4;

/// `hipDeviceAttributeManagedMemory`: whether the device supports managed memory.
pub const hipDeviceAttributeManagedMemory: hipDeviceAttribute_t = 24;

/// `hipStreamNonBlocking`: the stream does not synchronise with the null stream.
pub const hipStreamNonBlocking: c_uint = 1;
/// `hipEventDisableTiming`: the event records no timestamp (cheaper).
pub const hipEventDisableTiming: c_uint = 2;
/// `hipHostRegisterDefault`.
pub const hipHostRegisterDefault: c_uint = 0;
/// `hipHostRegisterPortable`: the registration is visible to every device.
pub const hipHostRegisterPortable: c_uint = 1;
/// `hipMemAttachGlobal`: managed memory accessible from any stream on any device.
pub const hipMemAttachGlobal: c_uint = 1;
/// `hipCpuDeviceId` (`((int)-1)`): the host, as a prefetch or advice target.
pub const hipCpuDeviceId: c_int = -1;

/// `hipMemAdviseSetReadMostly`.
pub const hipMemAdviseSetReadMostly: hipMemoryAdvise = 1;
/// `hipMemAdviseUnsetReadMostly`.
pub const hipMemAdviseUnsetReadMostly: hipMemoryAdvise = 2;
/// `hipMemAdviseSetPreferredLocation`.
pub const hipMemAdviseSetPreferredLocation: hipMemoryAdvise = 3;
/// `hipMemAdviseUnsetPreferredLocation`.
pub const hipMemAdviseUnsetPreferredLocation: hipMemoryAdvise = 4;
/// `hipMemAdviseSetAccessedBy`.
pub const hipMemAdviseSetAccessedBy: hipMemoryAdvise = 5;
/// `hipMemAdviseUnsetAccessedBy`.
pub const hipMemAdviseUnsetAccessedBy: hipMemoryAdvise = 6;

/// The environment variable that names the HIP library to load instead of the defaults.
pub const HIP_LIBRARY_ENV: &str = "HETMEM_HIP_LIBRARY";

/// The names tried, in order, when neither a path nor [`HIP_LIBRARY_ENV`] is given.
pub const DEFAULT_LIBRARY_NAMES: [&str; 3] =
    ["libamdhip64.so", "libamdhip64.so.5", "libamdhip64.so.6"];

/// Why the HIP runtime could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HipLoadError {
    /// No candidate library could be opened.
    Library {
        /// Every name or path tried, with the loader's reason for each.
        tried: Vec<(String, String)>,
    },
    /// The library opened but lacks an entry point hetmem needs.
    Symbol {
        /// The library that was opened.
        library: String,
        /// The missing function.
        symbol: &'static str,
        /// The loader's message.
        reason: String,
    },
}

impl fmt::Display for HipLoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HipLoadError::Library { tried } => {
                f.write_str("cannot load the HIP runtime: ")?;
                for (i, (name, reason)) in tried.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{name}: {reason}")?;
                }
                Ok(())
            }
            HipLoadError::Symbol {
                library,
                symbol,
                reason,
            } => write!(f, "HIP runtime {library} lacks symbol {symbol}: {reason}"),
        }
    }
}

impl std::error::Error for HipLoadError {}

/// Declares the table of HIP entry points once; expands to the [`HipApi`] struct, its
/// resolver, and (with `rocm-link`) the signature checks against `hip-sys`.
macro_rules! hip_api {
    ($( $(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty; )*) => {
        /// Every HIP runtime entry point hetmem calls, resolved from one library.
        ///
        /// The pointers are only valid while the library they came from stays loaded, so
        /// they are private, and the table is neither `Copy` nor `Clone` and cannot be
        /// built outside this module: it is only reachable as the `&HipApi` that
        /// [`HipRuntime::api`] lends, tied to the runtime's lifetime, and every entry
        /// point is called through a method of that borrow. No pointer can outlive the
        /// library.
        pub struct HipApi {
            $( $name: unsafe extern "C" fn($($arg: $ty),*) -> $ret, )*
        }

        impl HipApi {
            $(
                $(#[$doc])*
                ///
                /// # Safety
                /// The arguments must meet HIP's own contract for this call: pointers
                /// valid for what the call reads or writes, handles live and from this
                /// runtime, values of the documented ranges.
                #[inline]
                pub unsafe fn $name(&self, $($arg: $ty),*) -> $ret {
                    // SAFETY: the pointer was resolved from the library `self` is lent
                    // by (still loaded while this borrow lives) under this name with
                    // this signature; the caller meets the call's own contract.
                    unsafe { (self.$name)($($arg),*) }
                }
            )*
        }

        impl HipApi {
            /// The names of every symbol [`HipApi`] resolves, in declaration order.
            pub const SYMBOLS: &'static [&'static str] = &[$(stringify!($name)),*];

            /// Resolves every entry point from `lib`.
            ///
            /// # Safety
            /// `lib` must be a HIP runtime: each symbol found under one of these names
            /// must have the C signature declared here. The returned pointers must not
            /// be called after `lib` is unloaded.
            unsafe fn resolve(lib: &libloading::Library, library: &str) -> Result<Self, HipLoadError> {
                Ok(HipApi {
                    $(
                        // SAFETY: the caller guarantees that `lib` is a HIP runtime, whose
                        // symbol of this name has exactly the declared signature.
                        $name: unsafe {
                            symbol::<unsafe extern "C" fn($($ty),*) -> $ret>(
                                lib,
                                library,
                                stringify!($name),
                                concat!(stringify!($name), "\0").as_bytes(),
                            )?
                        },
                    )*
                })
            }
        }

        /// Compile-time proof that the signatures above are hip-sys's: each `$ty` is
        /// re-read here, where the HIP type names resolve to hip-sys's own types, and
        /// hip-sys's function item must coerce to that pointer type.
        #[cfg(feature = "rocm-link")]
        #[allow(dead_code, unused_imports)]
        mod link_check {
            use hip_sys::hiprt::*;
            use std::ffi::{c_char, c_int, c_uint, c_void};
            $( const _: unsafe extern "C" fn($($ty),*) -> $ret = hip_sys::hiprt::$name; )*
        }
    };
}

hip_api! {
    /// `hipInit(flags)`.
    fn hipInit(flags: c_uint) -> hipError_t;
    /// `hipGetDeviceCount(count)`.
    fn hipGetDeviceCount(count: *mut c_int) -> hipError_t;
    /// `hipDeviceGet(device, ordinal)`.
    fn hipDeviceGet(device: *mut hipDevice_t, ordinal: c_int) -> hipError_t;
    /// `hipDeviceGetName(name, len, device)`.
    fn hipDeviceGetName(name: *mut c_char, len: c_int, device: hipDevice_t) -> hipError_t;
    /// `hipDeviceTotalMem(bytes, device)`.
    fn hipDeviceTotalMem(bytes: *mut usize, device: hipDevice_t) -> hipError_t;
    /// `hipDeviceGetPCIBusId(pciBusId, len, device)`.
    fn hipDeviceGetPCIBusId(pci_bus_id: *mut c_char, len: c_int, device: c_int) -> hipError_t;
    /// `hipDeviceGetAttribute(pi, attr, deviceId)`.
    fn hipDeviceGetAttribute(value: *mut c_int, attr: hipDeviceAttribute_t, device: c_int) -> hipError_t;
    /// `hipSetDevice(deviceId)`: the calling thread's current device.
    fn hipSetDevice(device: c_int) -> hipError_t;
    /// `hipMemGetInfo(free, total)` of the current device.
    fn hipMemGetInfo(free: *mut usize, total: *mut usize) -> hipError_t;
    /// `hipMalloc(ptr, size)` on the current device.
    fn hipMalloc(ptr: *mut *mut c_void, size: usize) -> hipError_t;
    /// `hipFree(ptr)`.
    fn hipFree(ptr: *mut c_void) -> hipError_t;
    /// `hipMallocManaged(ptr, size, flags)`.
    fn hipMallocManaged(ptr: *mut *mut c_void, size: usize, flags: c_uint) -> hipError_t;
    /// `hipHostRegister(hostPtr, sizeBytes, flags)`.
    fn hipHostRegister(host_ptr: *mut c_void, size: usize, flags: c_uint) -> hipError_t;
    /// `hipHostUnregister(hostPtr)`.
    fn hipHostUnregister(host_ptr: *mut c_void) -> hipError_t;
    /// `hipMemcpy(dst, src, sizeBytes, kind)`.
    fn hipMemcpy(dst: *mut c_void, src: *const c_void, size: usize, kind: hipMemcpyKind) -> hipError_t;
    /// `hipMemcpyAsync(dst, src, sizeBytes, kind, stream)`.
    fn hipMemcpyAsync(
        dst: *mut c_void,
        src: *const c_void,
        size: usize,
        kind: hipMemcpyKind,
        stream: hipStream_t,
    ) -> hipError_t;
    /// `hipStreamCreateWithFlags(stream, flags)` on the current device.
    fn hipStreamCreateWithFlags(stream: *mut hipStream_t, flags: c_uint) -> hipError_t;
    /// `hipStreamDestroy(stream)`.
    fn hipStreamDestroy(stream: hipStream_t) -> hipError_t;
    /// `hipStreamSynchronize(stream)`.
    fn hipStreamSynchronize(stream: hipStream_t) -> hipError_t;
    /// `hipStreamIsCapturing(stream, pCaptureStatus)`: whether a graph capture is
    /// recording the stream's work.
    fn hipStreamIsCapturing(stream: hipStream_t, status: *mut hipStreamCaptureStatus) -> hipError_t;
    /// `hipDeviceSynchronize()`: every stream of the current device.
    fn hipDeviceSynchronize() -> hipError_t;
    /// `hipEventCreateWithFlags(event, flags)` on the current device.
    fn hipEventCreateWithFlags(event: *mut hipEvent_t, flags: c_uint) -> hipError_t;
    /// `hipEventDestroy(event)`.
    fn hipEventDestroy(event: hipEvent_t) -> hipError_t;
    /// `hipEventRecord(event, stream)`.
    fn hipEventRecord(event: hipEvent_t, stream: hipStream_t) -> hipError_t;
    /// `hipStreamWaitEvent(stream, event, flags)`.
    fn hipStreamWaitEvent(stream: hipStream_t, event: hipEvent_t, flags: c_uint) -> hipError_t;
    /// `hipEventSynchronize(event)`.
    fn hipEventSynchronize(event: hipEvent_t) -> hipError_t;
    /// `hipEventQuery(event)`: `hipSuccess` when passed, `hipErrorNotReady` when not.
    fn hipEventQuery(event: hipEvent_t) -> hipError_t;
    /// `hipMemPrefetchAsync(dev_ptr, count, device, stream)`.
    fn hipMemPrefetchAsync(ptr: *const c_void, count: usize, device: c_int, stream: hipStream_t) -> hipError_t;
    /// `hipMemAdvise(dev_ptr, count, advice, device)`.
    fn hipMemAdvise(ptr: *const c_void, count: usize, advice: hipMemoryAdvise, device: c_int) -> hipError_t;
    /// `hipGetErrorString(error)`: a static C string.
    fn hipGetErrorString(error: hipError_t) -> *const c_char;
    /// `hipRuntimeGetVersion(version)`.
    fn hipRuntimeGetVersion(version: *mut c_int) -> hipError_t;
}

/// Looks up one function symbol and copies the pointer out of the library handle.
///
/// # Safety
/// `T` must be the function pointer type of the symbol named `name` in `lib`; the
/// returned pointer must not be used after `lib` is unloaded.
unsafe fn symbol<T: Copy>(
    lib: &libloading::Library,
    library: &str,
    name: &'static str,
    name_nul: &[u8],
) -> Result<T, HipLoadError> {
    // SAFETY: the caller guarantees `T` is the symbol's real type; the copied pointer's
    // lifetime is the caller's concern (documented above).
    match unsafe { lib.get::<T>(name_nul) } {
        Ok(sym) => Ok(*sym),
        Err(e) => Err(HipLoadError::Symbol {
            library: library.to_owned(),
            symbol: name,
            reason: e.to_string(),
        }),
    }
}

/// A loaded HIP runtime: the library and its resolved entry points.
///
/// Dropping it unloads the library (when no other handle to it is open); the
/// [`HipApi`] borrowed from it cannot outlive it, and its function pointers cannot be
/// copied out of it.
pub struct HipRuntime {
    api: HipApi,
    name: String,
    // Declared last so that it is dropped after the pointer table (which needs no drop,
    // but this makes the ownership explicit).
    _lib: libloading::Library,
}

impl fmt::Debug for HipRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HipRuntime")
            .field("library", &self.name)
            .finish_non_exhaustive()
    }
}

impl HipRuntime {
    /// Loads the library named by `HETMEM_HIP_LIBRARY`, or else the first of
    /// [`DEFAULT_LIBRARY_NAMES`] that opens.
    ///
    /// The same trust as [`HipRuntime::load`] applies, to whatever file the environment
    /// variable or the dynamic loader's search path (`LD_LIBRARY_PATH`) leads to.
    pub fn load_default() -> Result<HipRuntime, HipLoadError> {
        if let Some(name) = std::env::var_os(HIP_LIBRARY_ENV).filter(|v| !v.is_empty()) {
            return HipRuntime::load(&name);
        }
        let mut tried = Vec::new();
        for name in DEFAULT_LIBRARY_NAMES {
            match HipRuntime::load(OsStr::new(name)) {
                Ok(rt) => return Ok(rt),
                Err(HipLoadError::Library { tried: t }) => tried.extend(t),
                // A library that opens but lacks a symbol is the answer, not a reason
                // to try an older one silently.
                Err(e) => return Err(e),
            }
        }
        Err(HipLoadError::Library { tried })
    }

    /// Loads the HIP runtime from a path, or a bare library name that the dynamic
    /// loader searches for, and resolves every entry point of [`HipApi`].
    ///
    /// # Trust
    ///
    /// This is a safe function that runs foreign code, a deliberate and documented
    /// exception to Rust's usual rule. Opening the library runs its initialisers, and
    /// every later call through [`HipApi`] trusts that each exported symbol has the C
    /// signature and behaviour of HIP's `hip_runtime_api.h`: nothing can check that at
    /// run time. A file that is not a HIP runtime (or a malicious one) can therefore
    /// cause undefined behaviour. This is the same trust a program places in any
    /// shared library it is linked against or finds through `LD_LIBRARY_PATH`, and that
    /// cudarc's dynamic loading places in `libcuda`: whoever chooses `path_or_name` (or
    /// the environment) chooses the code that runs. Pass only HIP runtimes, or test
    /// doubles that honour the same signatures.
    pub fn load(path_or_name: impl AsRef<OsStr>) -> Result<HipRuntime, HipLoadError> {
        let os: OsString = path_or_name.as_ref().to_owned();
        let name = Path::new(&os).display().to_string();
        // Not checkable here: this fn is safe by the deliberate, documented exception
        // under "Trust" above, the same trust as LD_LIBRARY_PATH or cudarc's loader.
        // SAFETY: opening runs the library's initialisers; the file is trusted to be a
        // HIP runtime, whose initialisers are meant to run in any process loading it.
        let lib = match unsafe { libloading::Library::new(&os) } {
            Ok(lib) => lib,
            Err(e) => {
                return Err(HipLoadError::Library {
                    tried: vec![(name, e.to_string())],
                })
            }
        };
        // The pointers are stored privately beside `lib` in the returned value and only
        // reachable through borrows of it, so they never outlive it.
        // SAFETY: `lib` is trusted to be a HIP runtime (the documented exception above),
        // so each symbol has the declared signature.
        let api = unsafe { HipApi::resolve(&lib, &name) }?;
        Ok(HipRuntime {
            api,
            name,
            _lib: lib,
        })
    }

    /// The resolved entry points, valid while `self` lives.
    pub fn api(&self) -> &HipApi {
        &self.api
    }

    /// The name or path the library was opened under.
    pub fn library_name(&self) -> &str {
        &self.name
    }

    /// The message `hipGetErrorString` gives for `code`.
    pub fn error_string(&self, code: hipError_t) -> String {
        // SAFETY: hipGetErrorString takes any value and returns a pointer to a static,
        // NUL-terminated string (or, defensively handled here, null).
        let ptr = unsafe { self.api.hipGetErrorString(code) };
        if ptr.is_null() {
            return format!("unknown HIP error {code}");
        }
        // SAFETY: non-null, NUL-terminated and static per the HIP API.
        unsafe { std::ffi::CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }
}

/// With `rocm-link`: the constants and the ABI of the type aliases equal hip-sys's.
#[cfg(feature = "rocm-link")]
#[allow(dead_code)]
mod const_check {
    use hip_sys::hiprt as h;
    use std::mem::{align_of, size_of};

    macro_rules! same_layout {
        ($($ours:ty => $theirs:ty),* $(,)?) => {$(
            const _: () = assert!(size_of::<$ours>() == size_of::<$theirs>());
            const _: () = assert!(align_of::<$ours>() == align_of::<$theirs>());
        )*};
    }
    same_layout! {
        super::hipError_t => h::hipError_t,
        super::hipDevice_t => h::hipDevice_t,
        super::hipStream_t => h::hipStream_t,
        super::hipEvent_t => h::hipEvent_t,
        super::hipMemcpyKind => h::hipMemcpyKind,
        super::hipDeviceAttribute_t => h::hipDeviceAttribute_t,
        super::hipMemoryAdvise => h::hipMemoryAdvise,
        super::hipStreamCaptureStatus => h::hipStreamCaptureStatus,
    }

    macro_rules! same_enum_value {
        ($($ours:ident => $enum:ident),* $(,)?) => {$(
            const _: () = assert!(super::$ours as i64 == h::$enum::$ours as i64);
        )*};
    }
    same_enum_value! {
        hipSuccess => hipError_t,
        hipErrorInvalidValue => hipError_t,
        hipErrorOutOfMemory => hipError_t,
        hipErrorNotInitialized => hipError_t,
        hipErrorNoDevice => hipError_t,
        hipErrorInvalidDevice => hipError_t,
        hipErrorInvalidHandle => hipError_t,
        hipErrorNotReady => hipError_t,
        hipErrorHostMemoryAlreadyRegistered => hipError_t,
        hipErrorHostMemoryNotRegistered => hipError_t,
        hipErrorNotSupported => hipError_t,
        hipErrorUnknown => hipError_t,
        hipMemcpyDefault => hipMemcpyKind,
        hipDeviceAttributeManagedMemory => hipDeviceAttribute_t,
        hipMemAdviseSetReadMostly => hipMemoryAdvise,
        hipMemAdviseUnsetReadMostly => hipMemoryAdvise,
        hipMemAdviseSetPreferredLocation => hipMemoryAdvise,
        hipMemAdviseUnsetPreferredLocation => hipMemoryAdvise,
        hipMemAdviseSetAccessedBy => hipMemoryAdvise,
        hipMemAdviseUnsetAccessedBy => hipMemoryAdvise,
        hipStreamCaptureStatusNone => hipStreamCaptureStatus,
    }

    macro_rules! same_define {
        ($($ours:ident),* $(,)?) => {$(
            const _: () = assert!(super::$ours as i64 == h::$ours as i64);
        )*};
    }
    same_define! {
        hipStreamNonBlocking,
        hipEventDisableTiming,
        hipHostRegisterDefault,
        hipHostRegisterPortable,
        hipMemAttachGlobal,
    }
    // hipCpuDeviceId is `#define hipCpuDeviceId ((int)-1)`, which bindgen does not
    // translate, so hip-sys has no constant to compare with; it was checked against
    // ROCm 5.2's hip_runtime_api.h by hand.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_names_itself() {
        let err = HipRuntime::load("/nonexistent/libamdhip64-hetmem-test.so").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/libamdhip64-hetmem-test.so"),
            "{msg}"
        );
        assert!(matches!(err, HipLoadError::Library { .. }));
    }

    #[test]
    fn symbol_table_is_complete() {
        assert_eq!(HipApi::SYMBOLS.len(), 31);
        assert!(HipApi::SYMBOLS.contains(&"hipMemAdvise"));
        assert!(HipApi::SYMBOLS.contains(&"hipDeviceSynchronize"));
        assert!(HipApi::SYMBOLS.contains(&"hipStreamIsCapturing"));
    }
}
