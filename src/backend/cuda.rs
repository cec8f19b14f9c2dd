//! NVIDIA CUDA backend: the driver API with cudarc's raw `sys` types, with `libcuda.so.1`
//! loaded at run time.
//!
//! # Why CUDA API version 12080
//!
//! cudarc needs one API-version feature; it decides which symbol names and signatures
//! the bindings resolve. We build against `cuda-12080` because every call this module
//! makes exists, with the signature used here, in every driver from 12.8 on, including
//! the lent GPU host's driver 580 (CUDA 13), which keeps all older entry points for
//! binary compatibility. Checked in cudarc 0.19.10's `driver/sys/mod.rs`:
//!
//! * Unconditional under every feature (so also 13000 and later): `cuInit`,
//!   `cuDeviceGet{,Count,Name,PCIBusId,Attribute}`, `cuDeviceTotalMem_v2`,
//!   `cuDeviceCanAccessPeer`, `cuDevicePrimaryCtxRetain`, `cuDevicePrimaryCtxRelease_v2`,
//!   `cuCtx{Get,Set}Current`, `cuCtxGetDevice`, `cuCtxSynchronize`,
//!   `cuGetErrorString`, `cuMemAlloc_v2`, `cuMemFree_v2`, `cuMemGetInfo_v2`,
//!   `cuMemAllocManaged`, `cuMemHostRegister_v2`, `cuMemHostUnregister`,
//!   `cuStreamCreate`, `cuStreamDestroy_v2`, `cuStreamSynchronize`, `cuStreamWaitEvent`,
//!   `cuStreamIsCapturing` (not `cuStreamGetCaptureInfo*`: CUDA 13 removed `_v2`),
//!   `cuEventCreate`, `cuEventDestroy_v2`, `cuEventRecord`, `cuEventSynchronize`,
//!   `cuEventQuery`, `cuMemcpyAsync`, `cuMemcpyPeerAsync`.
//! * Prefetch and advice come in two forms. `cuMemPrefetchAsync` / `cuMemAdvise` (a
//!   `CUdevice`, host = `CU_DEVICE_CPU`) are bound for `cuda-11040..=cuda-12090` only:
//!   CUDA 13 removed them from its headers. `cuMemPrefetchAsync_v2` / `cuMemAdvise_v2`
//!   (a `CUmemLocation`, host = `CU_MEM_LOCATION_TYPE_HOST`) are bound for
//!   `cuda-12020` onwards, 13000 included. We call the `_v2` forms: they are what the
//!   CUDA 13 headers name, exist in every driver since 12.2, and keep this file
//!   compiling if the feature is ever raised to 13000.
//! * `CUmemLocation` is `{ type_, id }` under 12080; from `cuda-13020` it becomes a
//!   union, so raising the feature past 13010 needs a change in `mem_location`,
//!   `allocation_prop` and `access_desc`.
//! * Virtual memory management (`cuMemGetAllocationGranularity`,
//!   `cuMemAddress{Reserve,Free}`, `cuMemCreate`, `cuMemRelease`, `cuMemMap`,
//!   `cuMemSetAccess`, `cuMemUnmap`, all since CUDA 10.2) is bound unconditionally.
//!   `CUmemAllocationType` gains `MANAGED` in 13000; we only use `PINNED`.
//!
//! # Loading and failure
//!
//! hetmem loads `libcuda` itself (`driver_library`): `libcuda.so.1`, the name the
//! driver installs, and `libcuda.so` only when that is not found. cudarc 0.19's own
//! loader (`sys::culib()`, `get_lib_name_candidates`) tries `libcuda.so` first and
//! `libcuda.so.1` last, with no hook to change the order; on a host with the CUDA
//! toolkit's `lib64/stubs` on the library path it would load the toolkit's stub
//! `libcuda.so`, which answers every call with `CUDA_ERROR_STUB_LIBRARY`, instead of
//! the driver. So cudarc's loader is never called: this module takes only its types.
//! [`CudaBackend::new`] looks up every symbol this module calls (list in
//! `REQUIRED_SYMBOLS`) before the first driver call, inside `catch_unwind` as a second
//! guard. Any absence is `Error::BackendUnavailable`; once `new` has succeeded, no
//! later call can hit a missing symbol.
//!
//! The VMM symbols (`VMM_SYMBOLS`) are optional: when one is missing, or a device has
//! `CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED` = 0 (read in `new`), or its
//! granularity query fails (made once, in its context, when the device is opened), that
//! device's `vmm_granularity` is `None` and the other VMM methods return
//! `Error::Unsupported` without calling the driver.
//! Likewise `DRIVER_PINNED_SYMBOLS` (`cuMemAllocHost_v2`, `cuMemFreeHost`), used only by
//! [`DriverPinned`]: without them [`DriverPinned::new`] returns `Error::Unsupported`.
//!
//! # Devices are opened on first use
//!
//! `new` lists every device (name, memory, PCI id and attributes need no context) but
//! opens none. A device is opened by the first call that needs it: its primary context
//! is retained (the same context the CUDA runtime uses, so memory is shared with
//! runtime-API code in the process) and released in `Drop`. So one GPU that refuses
//! contexts (EXCLUSIVE_PROCESS mode held by another process, PROHIBITED mode, a failed
//! GPU) does not make the backend unavailable: calls on that device return the
//! driver's error, its message naming the device, and the next call tries again. And a
//! process that uses one GPU of several (a `torchrun` rank) creates a context on that
//! GPU only: host-side calls (registering host memory, host-to-host copies, host
//! advice) use one device chosen once (see `CudaBackend::host_device`: the device of
//! the caller's current context, else one already open), not device 0. The internal
//! copy stream of a device is made at its first synchronous copy.
//!
//! # Contexts
//!
//! Every call first makes the right context current on the calling thread:
//! `cuCtxGetCurrent`, and `cuCtxSetCurrent` only when it differs, so the common case (a
//! PyTorch thread, whose current context is that same primary context) is one
//! thread-local read in the driver. When it did switch, the call puts back what was
//! current before (none included): the runtime takes its current device from the
//! current context, so hetmem must not move PyTorch's device on a multi-GPU host nor
//! give a thread a device it never chose. Dropping the backend leaves the dropping
//! thread's current context as it found it, too: the releases do not change it (as
//! `cuDevicePrimaryCtxRelease` documents), and a caller whose context is one of ours
//! holds its own reference to it (PyTorch's runtime does), so unbinding it would move
//! the caller off its device.
//!
//! # Copies
//!
//! Every device has unified addressing (checked in `new`), so `cuMemcpyAsync` infers
//! any direction from the pointers. Device-to-device copies across two devices use
//! `cuMemcpyPeerAsync` instead, which names both contexts explicitly and works whether
//! or not peer access is enabled (the driver stages through host memory when it is not).
//!
//! A copy on a caller's stream must be queued on a stream of the device it touches
//! (either device, for a copy between two), as in the simulator; anything else is
//! refused with `Error::InvalidArgument` before the driver is called.
//!
//! A copy with no stream is ordered as `cuMemcpy` is, and done when it returns: an
//! event recorded on the legacy default stream (`CU_STREAM_LEGACY`) of the device it
//! runs on (the destination's, for a copy between two devices) makes a per-device
//! internal non-blocking stream wait, the copy runs there, and `cuStreamSynchronize`
//! waits for it. So it follows the work queued before it on the legacy stream and, by
//! the driver's rule, on every blocking stream of the context (the per-thread default
//! streams included): a kernel the caller queued on stream 0 has written its output
//! before the copy reads it. It does not follow work on non-blocking streams (hetmem's
//! own, PyTorch's side streams): those are ordered by the fences copies leave on
//! buffers, or by the caller. `cuMemcpy` itself is not used: for pageable-to-device
//! copies it may return once the bytes are staged, before the DMA lands, and work then
//! queued on a non-blocking stream could read stale device memory. Like `cuMemcpy`, it
//! acts on the legacy stream, which a stream capture in global mode forbids.
//!
//! # Special streams
//!
//! [`Backend::import_stream`] takes the driver's special handles: 0 and 1 are the
//! legacy default stream of the device's primary context (one for all threads); 2 is
//! `CU_STREAM_PER_THREAD`, passed to the driver as it is, so every call acts on the
//! per-thread default stream of the calling thread. hetmem's own streams are
//! `CU_STREAM_NON_BLOCKING`: the legacy stream neither waits for them nor makes them
//! wait, and nothing in hetmem relies on that implicit ordering (hand-overs in the
//! pool and fences are explicit events).

use std::any::Any;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{self, NonNull};
use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys::{
    self, CUcontext, CUdevice, CUdevice_attribute, CUdeviceptr, CUevent, CUevent_flags,
    CUmemAccessDesc, CUmemAccess_flags, CUmemAllocationGranularity_flags,
    CUmemAllocationHandleType, CUmemAllocationProp, CUmemAllocationProp_st__bindgen_ty_1,
    CUmemAllocationType, CUmemAttach_flags, CUmemGenericAllocationHandle, CUmemLocation,
    CUmemLocationType, CUmem_advise, CUresult, CUstream, CUstream_flags,
};

use libloading::Library;

use super::host::available_memory;
use super::registered::{for_each_piece, Registrations};
use super::{
    check_copy_stream, check_device, check_vmm_size, lock, normalize_pci_bus_id, raw_stream,
    register_in_pieces, Backend, BackendKind, DeviceInfo, DevicePtr, EventHandle, ForeignStreams,
    MemInfo, MemRef, PhysHandle, Refusal, RollbackError, StreamHandle, LEGACY_STREAM,
};
use crate::error::{Error, Result};
use crate::placement::{Advice, Location, Tier};

/// A status as the driver returns it: a number. A newer driver may return codes that
/// the 12.8 bindings' `CUresult` enum lacks (CUDA 13.1's `CUDA_ERROR_STREAM_DETACHED`),
/// and such a value read as the enum is undefined behaviour: matching on it or printing
/// it crashed. So every call goes through [`drv`], whose function types return `u32`,
/// and the enum is used only to name the codes below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Status(u32);

impl Status {
    const SUCCESS: Status = Status(CUresult::CUDA_SUCCESS as u32);
    const NOT_READY: Status = Status(CUresult::CUDA_ERROR_NOT_READY as u32);
    const NO_DEVICE: Status = Status(CUresult::CUDA_ERROR_NO_DEVICE as u32);
    const OUT_OF_MEMORY: Status = Status(CUresult::CUDA_ERROR_OUT_OF_MEMORY as u32);
    const STUB_LIBRARY: Status = Status(CUresult::CUDA_ERROR_STUB_LIBRARY as u32);
    const ALREADY_REGISTERED: Status =
        Status(CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED as u32);
    const UNKNOWN: Status = Status(CUresult::CUDA_ERROR_UNKNOWN as u32);
    /// What a call whose symbol cannot be found returns (never in practice: `init`
    /// checks every symbol first).
    const MISSING: Status = Status(CUresult::CUDA_ERROR_NOT_FOUND as u32);

    fn is_ok(self) -> bool {
        self == Status::SUCCESS
    }
}

/// The names `libcuda` is loaded by, in this order (see the module docs): the driver's
/// own name first, so that a toolkit stub named `libcuda.so` cannot shadow it.
const LIBRARY_NAMES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];

/// The driver library, loaded once per process and never unloaded (the entry points
/// bound in [`drv`] point into it), or what each name's `dlopen` said.
fn driver_library() -> std::result::Result<&'static Library, &'static str> {
    static LIB: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let mut tried = Vec::new();
        for name in LIBRARY_NAMES {
            // SAFETY: loading libcuda runs only the driver's own initialisers, as at the
            // start of any CUDA program; the library is never unloaded.
            match unsafe { Library::new(name) } {
                Ok(lib) => return Ok(lib),
                Err(e) => tried.push(format!("{name}: {e}")),
            }
        }
        Err(tried.join("; "))
    })
    .as_ref()
    .map_err(String::as_str)
}

/// The file the driver was loaded from, for messages: where `cuInit` lives.
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

/// Declares, for each driver entry point, a function of the same name and arguments
/// that calls it through a function type returning `u32` (the C ABI of an enum
/// return), looked up in the loaded `libcuda` ([`driver_library`]) once.
macro_rules! driver_calls {
    ($($name:ident($($arg:ident: $ty:ty),* $(,)?);)*) => {
        /// The driver's entry points, returning [`Status`].
        #[allow(non_snake_case, clippy::too_many_arguments)]
        mod drv {
            use super::*;
            $(
                /// Calls the driver's entry point of this name.
                ///
                /// # Safety
                /// As the driver documents for the call: valid handles and pointers of
                /// the right sizes; `libcuda` is loaded (`CudaBackend::init` ran).
                pub(super) unsafe fn $name($($arg: $ty),*) -> Status {
                    type F = unsafe extern "C" fn($($ty),*) -> u32;
                    static FN: std::sync::OnceLock<Option<F>> = std::sync::OnceLock::new();
                    let f = FN.get_or_init(|| {
                        // `init` loaded the library before any call, and it stays
                        // loaded for the process's life.
                        let lib = driver_library().ok()?;
                        // SAFETY: `F` is the entry point's C signature (cudarc's, the
                        // enum return read as its u32); the pointer is copied out.
                        unsafe {
                            lib.get::<F>(concat!(stringify!($name), "\0").as_bytes())
                                .ok()
                                .map(|sym| *sym)
                        }
                    });
                    match f {
                        // SAFETY: the caller's contract, as above.
                        Some(f) => Status(unsafe { f($($arg),*) }),
                        None => Status::MISSING,
                    }
                }
            )*
        }
    };
}

driver_calls! {
    cuCtxGetCurrent(pctx: *mut CUcontext);
    cuCtxGetDevice(device: *mut CUdevice);
    cuCtxSetCurrent(ctx: CUcontext);
    cuCtxSynchronize();
    cuDeviceCanAccessPeer(can_access: *mut c_int, dev: CUdevice, peer: CUdevice);
    cuDeviceGet(device: *mut CUdevice, ordinal: c_int);
    cuDeviceGetAttribute(pi: *mut c_int, attrib: CUdevice_attribute, dev: CUdevice);
    cuDeviceGetCount(count: *mut c_int);
    cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice);
    cuDeviceGetPCIBusId(bus_id: *mut c_char, len: c_int, dev: CUdevice);
    cuDevicePrimaryCtxRelease_v2(dev: CUdevice);
    cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice);
    cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice);
    cuEventCreate(event: *mut CUevent, flags: c_uint);
    cuEventDestroy_v2(event: CUevent);
    cuEventQuery(event: CUevent);
    cuEventRecord(event: CUevent, stream: CUstream);
    cuEventSynchronize(event: CUevent);
    cuGetErrorString(error: u32, text: *mut *const c_char);
    cuInit(flags: c_uint);
    cuMemAddressFree(ptr: CUdeviceptr, size: usize);
    cuMemAddressReserve(ptr: *mut CUdeviceptr, size: usize, alignment: usize, addr: CUdeviceptr, flags: c_ulonglong);
    cuMemAdvise_v2(ptr: CUdeviceptr, count: usize, advice: CUmem_advise, location: CUmemLocation);
    cuMemAllocHost_v2(pp: *mut *mut c_void, bytes: usize);
    cuMemAllocManaged(dptr: *mut CUdeviceptr, bytes: usize, flags: c_uint);
    cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytes: usize);
    cuMemCreate(handle: *mut CUmemGenericAllocationHandle, size: usize, prop: *const CUmemAllocationProp, flags: c_ulonglong);
    cuMemFreeHost(p: *mut c_void);
    cuMemFree_v2(dptr: CUdeviceptr);
    cuMemGetAllocationGranularity(granularity: *mut usize, prop: *const CUmemAllocationProp, option: CUmemAllocationGranularity_flags);
    cuMemGetInfo_v2(free: *mut usize, total: *mut usize);
    cuMemHostRegister_v2(p: *mut c_void, bytes: usize, flags: c_uint);
    cuMemHostUnregister(p: *mut c_void);
    cuMemMap(ptr: CUdeviceptr, size: usize, offset: usize, handle: CUmemGenericAllocationHandle, flags: c_ulonglong);
    cuMemPrefetchAsync_v2(ptr: CUdeviceptr, count: usize, location: CUmemLocation, flags: c_uint, stream: CUstream);
    cuMemRelease(handle: CUmemGenericAllocationHandle);
    cuMemSetAccess(ptr: CUdeviceptr, size: usize, desc: *const CUmemAccessDesc, count: usize);
    cuMemUnmap(ptr: CUdeviceptr, size: usize);
    cuMemcpyAsync(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize, stream: CUstream);
    cuMemcpyPeerAsync(dst: CUdeviceptr, dst_ctx: CUcontext, src: CUdeviceptr, src_ctx: CUcontext, bytes: usize, stream: CUstream);
    cuStreamCreate(stream: *mut CUstream, flags: c_uint);
    cuStreamDestroy_v2(stream: CUstream);
    cuStreamIsCapturing(stream: CUstream, status: *mut c_uint);
    cuStreamSynchronize(stream: CUstream);
    cuStreamWaitEvent(stream: CUstream, event: CUevent, flags: c_uint);
}

/// The `call` of the [`Error::Driver`] that [`Backend::register_host`] returns when a
/// chunk failed to register *and* undoing the chunks registered before it failed too.
/// Part of the range then stays registered with the driver, so the caller must not
/// unmap (or otherwise give back) the memory: it has to leak the region. The error's
/// `code` is that of the first failed `cuMemHostUnregister`, and its `message` names
/// the original failure and contains `"rollback failed; region leaked"`.
pub const REGISTER_ROLLBACK_CALL: &str = "cuMemHostRegister(rollback)";

/// Every driver symbol this module calls, looked up before the first call so that a
/// driver lacking one is refused in `new` instead of panicking in cudarc later.
const REQUIRED_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuGetErrorString",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetPCIBusId",
    "cuDeviceGetAttribute",
    "cuDeviceCanAccessPeer",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxGetDevice",
    "cuCtxSynchronize",
    "cuMemGetInfo_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemAllocManaged",
    "cuMemHostRegister_v2",
    "cuMemHostUnregister",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
    "cuStreamIsCapturing",
    "cuEventCreate",
    "cuEventDestroy_v2",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventQuery",
    "cuMemcpyAsync",
    "cuMemcpyPeerAsync",
    "cuMemPrefetchAsync_v2",
    "cuMemAdvise_v2",
];

/// The virtual memory management calls. Optional: a driver lacking any of them still
/// loads, and every device then reports no VMM (`vmm_granularity` is `None`).
const VMM_SYMBOLS: &[&str] = &[
    "cuMemGetAllocationGranularity",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemCreate",
    "cuMemRelease",
    "cuMemMap",
    "cuMemSetAccess",
    "cuMemUnmap",
];

/// The driver's own pinned host allocation, for [`DriverPinned`]. Optional: a driver
/// lacking either still loads, and only `DriverPinned::new` is refused.
const DRIVER_PINNED_SYMBOLS: &[&str] = &["cuMemAllocHost_v2", "cuMemFreeHost"];

/// What the VMM methods report on a device (or driver) without virtual memory
/// management.
const VMM_UNSUPPORTED: Error = Error::Unsupported {
    backend: BackendKind::Cuda,
    what: "virtual memory management (not supported by this device or driver)",
};

/// The driver's description of a status, from `cuGetErrorString`.
///
/// `code` may be a value the 12.8 bindings' enum lacks (see [`Status`]); the driver
/// names it, or the message gives its number.
fn error_message(code: Status) -> String {
    let mut text: *const c_char = ptr::null();
    // SAFETY: only reached after `new` found libcuda and this symbol; `text` is a valid
    // out-pointer, and the driver stores a pointer to a static string or nothing.
    let status = unsafe { drv::cuGetErrorString(code.0, &mut text) };
    if status != Status::SUCCESS || text.is_null() {
        return format!("unrecognised CUDA status {}", code.0);
    }
    // SAFETY: on success `text` points at a NUL-terminated string with static lifetime
    // owned by the driver.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

/// Maps a failed driver status to [`Error::Driver`].
fn driver_error(call: &'static str, code: Status) -> Error {
    Error::Driver {
        backend: BackendKind::Cuda,
        call,
        code: code.0 as i32,
        message: error_message(code),
    }
}

/// `Ok` for `CUDA_SUCCESS`, [`Error::Driver`] naming `call` otherwise.
fn check(call: &'static str, code: Status) -> Result<()> {
    if code.is_ok() {
        Ok(())
    } else {
        Err(driver_error(call, code))
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: BackendKind::Cuda,
        reason: reason.into(),
    }
}

/// A `CUmemLocation` for prefetch and advice.
fn mem_location(location: Location, device: impl Fn(usize) -> CUdevice) -> CUmemLocation {
    match location {
        Location::Host => CUmemLocation {
            type_: CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
            id: 0,
        },
        Location::Device(d) => CUmemLocation {
            type_: CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: device(d),
        },
    }
}

/// The properties of VMM physical memory on device `dev`: ordinary pinned device
/// memory, no shareable handle, no compression. Also what the granularity is asked for.
fn allocation_prop(dev: CUdevice) -> CUmemAllocationProp {
    CUmemAllocationProp {
        type_: CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
        location: CUmemLocation {
            type_: CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: dev,
        },
        win32HandleMetaData: ptr::null_mut(),
        allocFlags: CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

/// Read-write access for device `dev`, for `cuMemSetAccess` after a map.
fn access_desc(dev: CUdevice) -> CUmemAccessDesc {
    CUmemAccessDesc {
        location: CUmemLocation {
            type_: CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: dev,
        },
        flags: CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    }
}

/// `Ok` when `ptr` is aligned to the VMM page `granularity`.
fn check_vmm_addr(ptr: DevicePtr, granularity: usize) -> Result<()> {
    if !ptr.0.is_multiple_of(granularity as u64) {
        Err(Error::InvalidArgument(format!(
            "address {:#x} is not aligned to the VMM granularity {granularity}",
            ptr.0
        )))
    } else {
        Ok(())
    }
}

fn stream_ptr(handle: StreamHandle) -> CUstream {
    ptr::with_exposed_provenance_mut(raw_stream(handle) as usize)
}

fn event_ptr(handle: EventHandle) -> CUevent {
    ptr::with_exposed_provenance_mut(handle.0 as usize)
}

fn host_addr(ptr: NonNull<u8>) -> CUdeviceptr {
    ptr.as_ptr().expose_provenance() as CUdeviceptr
}

/// Per-device driver state.
#[derive(Debug)]
struct DeviceState {
    /// The driver's device handle.
    dev: CUdevice,
    /// `CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS`: needed to prefetch to it.
    concurrent_managed: bool,
    /// The driver has every VMM symbol and the device
    /// `CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED`.
    vmm: bool,
    /// Set when the device is opened (`CudaBackend::opened`), at its first use.
    opened: OnceLock<Opened>,
}

/// What opening a device made: released (and destroyed) in `Drop`.
#[derive(Debug)]
struct Opened {
    /// The retained primary context.
    ctx: CUcontext,
    /// Minimum VMM granularity, queried once when the device is opened; `None` without
    /// VMM (see `DeviceState::vmm`) or when the query fails.
    vmm_granularity: Option<usize>,
    /// Internal non-blocking stream for copies made without a stream, and the event
    /// that orders them after the legacy default stream, created at the first such copy.
    copy_stream: OnceLock<(CUstream, CUevent)>,
}

/// NVIDIA GPUs through the CUDA driver API. See the module docs.
#[derive(Debug)]
pub struct CudaBackend {
    devices: Vec<DeviceInfo>,
    state: Vec<DeviceState>,
    /// Device of each live stream we created, by handle.
    streams: Mutex<HashMap<u64, usize>>,
    /// Streams the caller made and lent us ([`Backend::import_stream`]).
    foreign: ForeignStreams,
    /// Device of each live event we created, by handle.
    events: Mutex<HashMap<u64, usize>>,
    /// The driver has every symbol in `DRIVER_PINNED_SYMBOLS` (checked once in `new`).
    driver_pinned: bool,
    /// Our host registrations, one per `cuMemHostRegister` call: copies are cut at
    /// their edges (see [`super::registered`]), and `unregister_host` undoes exactly
    /// the pieces `register_host` made.
    registered: Registrations,
    /// Held while a device is opened or its copy stream made, so each happens once.
    open_lock: Mutex<()>,
    /// The device whose context host-side calls use, chosen at the first one
    /// ([`CudaBackend::host_device`]).
    host_device: OnceLock<usize>,
}

// The raw pointers inside are driver handles (primary contexts, internal streams) that
// we never dereference; the maps are behind Mutexes, the opened devices behind OnceLocks.
// SAFETY: the CUDA driver API is thread-safe: a primary context may be made current on
// any thread, a stream used from any, and every call binds the context on its thread.
unsafe impl Send for CudaBackend {}
// SAFETY: as for Send; `&self` methods only pass the handles to thread-safe driver calls.
unsafe impl Sync for CudaBackend {}

impl CudaBackend {
    /// Loads `libcuda` (`libcuda.so.1`, else `libcuda.so`), initialises the driver and
    /// lists the devices. No device is opened (no context is made) until a call uses
    /// it: see the module docs.
    ///
    /// Returns [`Error::BackendUnavailable`] when the library or a symbol we need is
    /// missing, when `cuInit` fails (no driver, no device, driver too old, the CUDA
    /// toolkit's stub library), when there is no device, or when a device lacks unified
    /// addressing; never panics for any of these.
    pub fn new() -> Result<CudaBackend> {
        match catch_unwind(AssertUnwindSafe(Self::init)) {
            Ok(result) => result,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("panic");
                Err(unavailable(format!(
                    "loading the CUDA driver failed: {what}"
                )))
            }
        }
    }

    fn init() -> Result<CudaBackend> {
        let lib = driver_library()
            .map_err(|tried| unavailable(format!("libcuda not found ({tried})")))?;
        let file = library_file(lib);
        tracing::debug!(file = file.as_deref().unwrap_or("?"), "libcuda loaded");
        for name in REQUIRED_SYMBOLS {
            // SAFETY: we only ask whether the symbol exists; the value is read as an
            // untyped address and never called through this path.
            if let Err(e) = unsafe { lib.get::<*const c_void>(name.as_bytes()) } {
                return Err(unavailable(format!("libcuda lacks symbol {name} ({e})")));
            }
        }
        // SAFETY: as above, only existence is checked; nothing is called.
        let missing_vmm = VMM_SYMBOLS
            .iter()
            .find(|name| unsafe { lib.get::<*const c_void>(name.as_bytes()) }.is_err());
        if let Some(name) = missing_vmm {
            tracing::debug!(
                symbol = name,
                "libcuda lacks a VMM symbol; virtual memory management disabled"
            );
        }
        let vmm_symbols = missing_vmm.is_none();
        // SAFETY: as above, only existence is checked; nothing is called.
        let missing_pinned = DRIVER_PINNED_SYMBOLS
            .iter()
            .find(|name| unsafe { lib.get::<*const c_void>(name.as_bytes()) }.is_err());
        if let Some(name) = missing_pinned {
            tracing::debug!(
                symbol = name,
                "libcuda lacks a pinned-allocation symbol; DriverPinned disabled"
            );
        }
        // SAFETY: symbol present (checked above); cuInit takes flags only.
        let status = unsafe { drv::cuInit(0) };
        match status {
            Status::SUCCESS => {}
            Status::NO_DEVICE => return Err(unavailable("no CUDA device")),
            Status::STUB_LIBRARY => {
                return Err(unavailable(format!(
                    "{} is the CUDA toolkit's stub library, not the driver \
                     (cuInit: CUDA_ERROR_STUB_LIBRARY, code {})",
                    file.as_deref().unwrap_or("libcuda"),
                    status.0
                )))
            }
            other => {
                return Err(unavailable(format!(
                    "cuInit failed: {}",
                    driver_error("cuInit", other)
                )))
            }
        }
        let mut count: c_int = 0;
        // SAFETY: driver initialised; `count` is a valid out-pointer.
        check("cuDeviceGetCount", unsafe {
            drv::cuDeviceGetCount(&mut count)
        })?;
        if count <= 0 {
            return Err(unavailable("no CUDA device"));
        }

        let mut devices = Vec::with_capacity(count as usize);
        let mut state = Vec::with_capacity(count as usize);
        for ordinal in 0..count {
            let (info, st) = query_device(ordinal, vmm_symbols)?;
            devices.push(info);
            state.push(st);
        }
        tracing::debug!(devices = ?devices, "CUDA backend ready");
        Ok(CudaBackend {
            devices,
            state,
            streams: Mutex::new(HashMap::new()),
            foreign: ForeignStreams::default(),
            events: Mutex::new(HashMap::new()),
            driver_pinned: missing_pinned.is_none(),
            registered: Registrations::default(),
            open_lock: Mutex::new(()),
            host_device: OnceLock::new(),
        })
    }

    /// Device `device`, opened: its primary context retained and its VMM granularity
    /// queried in it, at the first call that needs it. A failure (the driver's code,
    /// the message naming the device) is not remembered: the next call tries again, as
    /// a GPU held by another process in exclusive mode may come free.
    fn opened(&self, device: usize) -> Result<&Opened> {
        let state = &self.state[device];
        if let Some(opened) = state.opened.get() {
            return Ok(opened);
        }
        let _one_at_a_time = lock(&self.open_lock);
        if let Some(opened) = state.opened.get() {
            return Ok(opened);
        }
        let opened = open_device(device, state).map_err(|e| self.open_error(device, e))?;
        tracing::debug!(device, name = %self.devices[device].name, "CUDA device opened");
        Ok(state.opened.get_or_init(|| opened))
    }

    /// `e`, from opening `device`, with the device named in its message.
    fn open_error(&self, device: usize, e: Error) -> Error {
        let name = &self.devices[device].name;
        tracing::warn!(device, name, error = %e, "cannot open CUDA device");
        match e {
            Error::Driver {
                backend,
                call,
                code,
                message,
            } => Error::Driver {
                backend,
                call,
                code,
                message: format!("CUDA device {device} ({name}) cannot be opened: {message}"),
            },
            other => other,
        }
    }

    /// `device`'s internal copy stream and its legacy-stream event, made at the first
    /// call.
    fn copy_stream(&self, device: usize) -> Result<(CUstream, CUevent)> {
        let opened = self.opened(device)?;
        if let Some(&made) = opened.copy_stream.get() {
            return Ok(made);
        }
        let _one_at_a_time = lock(&self.open_lock);
        if let Some(&made) = opened.copy_stream.get() {
            return Ok(made);
        }
        let _ctx = bind_ctx(opened.ctx)?;
        let mut stream: CUstream = ptr::null_mut();
        // SAFETY: the device's context is current; `stream` is a valid out-pointer.
        check("cuStreamCreate", unsafe {
            drv::cuStreamCreate(&mut stream, CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        let mut event: CUevent = ptr::null_mut();
        // SAFETY: as above; `event` is a valid out-pointer.
        let made = check("cuEventCreate", unsafe {
            drv::cuEventCreate(&mut event, CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
        });
        if let Err(e) = made {
            // SAFETY: made just above in the current context; nothing else holds it.
            let status = unsafe { drv::cuStreamDestroy_v2(stream) };
            if let Err(undo) = check("cuStreamDestroy", status) {
                tracing::warn!(device, error = %undo, "destroying a copy stream left without its event");
            }
            return Err(e);
        }
        Ok(*opened.copy_stream.get_or_init(|| (stream, event)))
    }

    /// The device whose context host-side calls use: registering and unregistering
    /// host memory (`PORTABLE`, so pinned for every context: one will do), copies
    /// between two host ranges, advice with a host location. Chosen once, at the first
    /// such call, so that registration and unregistration meet one context, and
    /// without opening a device the process does not use: the device of the context
    /// current on the calling thread (a PyTorch rank's own GPU), else the lowest device
    /// already open, else the first that opens.
    fn host_device(&self) -> Result<usize> {
        if let Some(&device) = self.host_device.get() {
            return Ok(device);
        }
        let chosen = self.choose_host_device()?;
        Ok(*self.host_device.get_or_init(|| chosen))
    }

    fn choose_host_device(&self) -> Result<usize> {
        if let Some(device) = self.current_device() {
            if self.opened(device).is_ok() {
                return Ok(device);
            }
        }
        if let Some(device) = self.state.iter().position(|s| s.opened.get().is_some()) {
            return Ok(device);
        }
        let mut first_error = None;
        for device in 0..self.state.len() {
            match self.opened(device) {
                Ok(_) => return Ok(device),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| unavailable("no CUDA device")))
    }

    /// Our ordinal of the device of the context current on this thread, if any.
    fn current_device(&self) -> Option<usize> {
        let mut ctx: CUcontext = ptr::null_mut();
        // SAFETY: `ctx` is a valid out-pointer; the call only reads thread state.
        if !unsafe { drv::cuCtxGetCurrent(&mut ctx) }.is_ok() || ctx.is_null() {
            return None;
        }
        let mut dev: CUdevice = 0;
        // SAFETY: a context is current; `dev` is a valid out-pointer.
        if !unsafe { drv::cuCtxGetDevice(&mut dev) }.is_ok() {
            return None;
        }
        self.state.iter().position(|s| s.dev == dev)
    }

    /// Makes `device`'s primary context current on this thread (opening the device
    /// first if need be) until the returned guard drops, which puts back whatever was
    /// current before (see [`Bound`]). One thread-local read in the driver when the
    /// context already is current.
    fn bind(&self, device: usize) -> Result<Bound> {
        bind_ctx(self.opened(device)?.ctx)
    }

    fn cu_device(&self, device: usize) -> CUdevice {
        self.state[device].dev
    }

    fn stream_device(&self, stream: StreamHandle) -> Result<usize> {
        let own = lock(&self.streams).get(&stream.0).copied();
        own.or_else(|| self.foreign.device(stream))
            .ok_or_else(|| unknown_stream(stream))
    }

    fn event_device(&self, event: EventHandle) -> Result<usize> {
        lock(&self.events)
            .get(&event.0)
            .copied()
            .ok_or_else(|| unknown_event(event))
    }

    /// `device`'s VMM granularity, after checking the ordinal; `Unsupported` without
    /// VMM, the open error when the device cannot be opened.
    fn vmm_page(&self, device: usize) -> Result<usize> {
        check_device(self, device)?;
        if !self.state[device].vmm {
            return Err(VMM_UNSUPPORTED);
        }
        self.opened(device)?.vmm_granularity.ok_or(VMM_UNSUPPORTED)
    }

    /// Whether device `accessor` can reach memory of device `owner` (peer access,
    /// which `cuMemSetAccess` for another device's memory needs).
    fn can_access_peer(&self, accessor: usize, owner: usize) -> Result<bool> {
        let mut can: c_int = 0;
        // SAFETY: `can` is a valid out-pointer; both handles came from cuDeviceGet.
        check("cuDeviceCanAccessPeer", unsafe {
            drv::cuDeviceCanAccessPeer(&mut can, self.cu_device(accessor), self.cu_device(owner))
        })?;
        Ok(can != 0)
    }

    /// Free bytes on `device` for an out-of-memory report (0 when even that fails).
    fn free_for_report(&self, device: usize) -> usize {
        self.mem_info(device).map(|m| m.free).unwrap_or(0)
    }
}

/// The context a caller had current before [`CudaBackend::bind`] switched it, put back on
/// drop. The CUDA runtime takes its current device from the current context, so leaving
/// ours current would move PyTorch's (or any runtime user's) device on a multi-GPU
/// host, or give a thread that had none a device it never chose.
#[must_use = "the caller's context is put back when the guard drops"]
struct Bound {
    /// `None`: nothing was switched. `Some(null)`: no context was current.
    prev: Option<CUcontext>,
}

/// Makes `ctx` (a primary context we retained) current on this thread until the
/// returned guard drops; no switch when it already is current.
fn bind_ctx(ctx: CUcontext) -> Result<Bound> {
    let mut current: CUcontext = ptr::null_mut();
    // SAFETY: `current` is a valid out-pointer; the call only reads thread state.
    check("cuCtxGetCurrent", unsafe {
        drv::cuCtxGetCurrent(&mut current)
    })?;
    if current == ctx {
        return Ok(Bound { prev: None });
    }
    // SAFETY: `ctx` is a primary context we retained and have not released.
    check("cuCtxSetCurrent", unsafe { drv::cuCtxSetCurrent(ctx) })?;
    Ok(Bound {
        prev: Some(current),
    })
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Some(prev) = self.prev {
            // SAFETY: `prev` was current on this thread a moment ago (or is null, which
            // unbinds); setting a context only changes this thread's binding.
            let status = unsafe { drv::cuCtxSetCurrent(prev) };
            if let Err(e) = check("cuCtxSetCurrent", status) {
                tracing::warn!(error = %e, "restoring the caller's CUDA context");
            }
        }
    }
}

fn unknown_stream(stream: StreamHandle) -> Error {
    Error::InvalidArgument(format!(
        "stream {:#x} was not created by this CUDA backend",
        stream.0
    ))
}

fn unknown_event(event: EventHandle) -> Error {
    Error::InvalidArgument(format!(
        "event {:#x} was not created by this CUDA backend",
        event.0
    ))
}

/// The error of a registration whose failure could not be undone: see
/// [`REGISTER_ROLLBACK_CALL`].
const ROLLBACK: RollbackError = RollbackError {
    backend: BackendKind::Cuda,
    call: REGISTER_ROLLBACK_CALL,
    unknown_code: Status::UNKNOWN.0 as i32,
};

fn c_buf_to_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// What `new` learns of device `ordinal` without a context: its [`DeviceInfo`] and
/// attributes. `vmm_symbols`: the driver has every VMM call. A device without unified
/// addressing is refused (every copy here relies on it).
fn query_device(ordinal: c_int, vmm_symbols: bool) -> Result<(DeviceInfo, DeviceState)> {
    let mut dev: CUdevice = 0;
    // SAFETY: driver initialised; `dev` is a valid out-pointer, ordinal < count.
    check("cuDeviceGet", unsafe {
        drv::cuDeviceGet(&mut dev, ordinal)
    })?;

    let mut name_buf = [0 as c_char; 256];
    // SAFETY: the buffer is valid for its full length, which we pass; the driver
    // writes a NUL-terminated name that fits.
    check("cuDeviceGetName", unsafe {
        drv::cuDeviceGetName(name_buf.as_mut_ptr(), name_buf.len() as c_int, dev)
    })?;
    let name = c_buf_to_string(&name_buf);

    let mut total: usize = 0;
    // SAFETY: `total` is a valid out-pointer; `dev` came from cuDeviceGet.
    check("cuDeviceTotalMem", unsafe {
        drv::cuDeviceTotalMem_v2(&mut total, dev)
    })?;

    let mut pci_buf = [0 as c_char; 64];
    // SAFETY: the buffer is valid for its full length, which we pass (the driver
    // needs 13 bytes).
    let pci_status =
        unsafe { drv::cuDeviceGetPCIBusId(pci_buf.as_mut_ptr(), pci_buf.len() as c_int, dev) };
    let pci_bus_id = if pci_status == Status::SUCCESS {
        let raw = c_buf_to_string(&pci_buf);
        let id = normalize_pci_bus_id(&raw);
        if id.is_none() {
            tracing::warn!(device = ordinal, raw, "unparseable CUDA PCI bus id");
        }
        id
    } else {
        tracing::warn!(
            device = ordinal,
            error = %driver_error("cuDeviceGetPCIBusId", pci_status),
            "no PCI bus id"
        );
        None
    };

    let managed = device_attribute(dev, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY)?;
    let concurrent = device_attribute(
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS,
    )?;
    let unified = device_attribute(
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING,
    )?;
    if unified == 0 {
        return Err(unavailable(format!(
            "device {ordinal} ({name}) lacks unified addressing"
        )));
    }
    let vmm = vmm_symbols && vmm_supported(ordinal, dev);
    Ok((
        DeviceInfo {
            ordinal: ordinal as usize,
            name,
            total_memory: total,
            pci_bus_id,
            managed_memory: managed != 0,
        },
        DeviceState {
            dev,
            concurrent_managed: concurrent != 0,
            vmm,
            opened: OnceLock::new(),
        },
    ))
}

/// Opens device `device`: retains its primary context and, in it, queries the VMM
/// granularity. On failure nothing stays retained.
fn open_device(device: usize, state: &DeviceState) -> Result<Opened> {
    let mut ctx: CUcontext = ptr::null_mut();
    // SAFETY: `ctx` is a valid out-pointer; `dev` came from cuDeviceGet.
    check("cuDevicePrimaryCtxRetain", unsafe {
        drv::cuDevicePrimaryCtxRetain(&mut ctx, state.dev)
    })?;
    let vmm_granularity = if state.vmm {
        match bind_ctx(ctx) {
            Ok(_ctx) => query_vmm_granularity(device, state.dev),
            Err(e) => {
                // SAFETY: retained just above, released once here; nothing was made in it.
                let status = unsafe { drv::cuDevicePrimaryCtxRelease_v2(state.dev) };
                if let Err(undo) = check("cuDevicePrimaryCtxRelease", status) {
                    tracing::warn!(device, error = %undo, "releasing a context after a failed open");
                }
                return Err(e);
            }
        }
    } else {
        None
    };
    Ok(Opened {
        ctx,
        vmm_granularity,
        copy_stream: OnceLock::new(),
    })
}

fn device_attribute(dev: CUdevice, attr: CUdevice_attribute) -> Result<c_int> {
    let mut value: c_int = 0;
    // SAFETY: `value` is a valid out-pointer; `dev` came from cuDeviceGet after cuInit.
    check("cuDeviceGetAttribute", unsafe {
        drv::cuDeviceGetAttribute(&mut value, attr, dev)
    })?;
    Ok(value)
}

/// Whether device `dev` has virtual memory management (`false`, logged, when the
/// query fails: VMM is optional, so this never fails the backend). Only called once
/// every VMM symbol was found.
fn vmm_supported(ordinal: c_int, dev: CUdevice) -> bool {
    let supported = device_attribute(
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
    );
    match supported {
        Ok(0) => {
            tracing::debug!(device = ordinal, "device lacks virtual memory management");
            false
        }
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(device = ordinal, error = %e, "querying VMM support");
            false
        }
    }
}

/// Device `dev`'s minimum VMM granularity, or `None` (logged) when the query fails.
/// Called with the device's context current, for a device with VMM.
fn query_vmm_granularity(ordinal: usize, dev: CUdevice) -> Option<usize> {
    let prop = allocation_prop(dev);
    let mut granularity: usize = 0;
    // SAFETY: the symbol exists (VMM_SYMBOLS checked by the caller); `granularity` is a
    // valid out-pointer and `prop` a fully initialised property struct that outlives
    // the call.
    let status = unsafe {
        drv::cuMemGetAllocationGranularity(
            &mut granularity,
            &prop,
            CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    };
    match check("cuMemGetAllocationGranularity", status) {
        Ok(()) if granularity > 0 => Some(granularity),
        Ok(()) => {
            tracing::warn!(device = ordinal, "VMM granularity reported as 0");
            None
        }
        Err(e) => {
            tracing::warn!(device = ordinal, error = %e, "querying VMM granularity");
            None
        }
    }
}

fn check_size(size: usize) -> Result<()> {
    if size == 0 {
        Err(Error::InvalidSize {
            requested: 0,
            reason: "size must be greater than zero",
        })
    } else {
        Ok(())
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let streams = lock(&self.streams).len();
        let events = lock(&self.events).len();
        if streams + events > 0 {
            tracing::debug!(
                streams,
                events,
                "CUDA backend dropped with live streams/events; the driver reclaims them with the context"
            );
        }
        let opened = || {
            self.state
                .iter()
                .enumerate()
                .filter_map(|(device, state)| Some((device, state.dev, state.opened.get()?)))
        };
        for (device, _, o) in opened() {
            let Some(&(stream, event)) = o.copy_stream.get() else {
                continue;
            };
            match bind_ctx(o.ctx) {
                Ok(_ctx) => {
                    // SAFETY: the stream and event were created by us on this context,
                    // which is current; nothing else holds them.
                    let status = unsafe { drv::cuStreamDestroy_v2(stream) };
                    if let Err(e) = check("cuStreamDestroy", status) {
                        tracing::warn!(device, error = %e, "destroying internal copy stream");
                    }
                    // SAFETY: as above.
                    let status = unsafe { drv::cuEventDestroy_v2(event) };
                    if let Err(e) = check("cuEventDestroy", status) {
                        tracing::warn!(device, error = %e, "destroying internal copy event");
                    }
                }
                Err(e) => tracing::warn!(device, error = %e, "binding context in drop"),
            }
        }
        // The calling thread's current context is left as it is (every bind above put
        // it back; a release does not change it): a caller whose context is one of ours
        // holds its own reference, so it stays alive, and unbinding it would move the
        // caller (PyTorch's current device) off it.
        for (device, dev, _) in opened() {
            // SAFETY: we retained this primary context exactly once, when the device
            // was opened, and release it exactly once here.
            let status = unsafe { drv::cuDevicePrimaryCtxRelease_v2(dev) };
            if let Err(e) = check("cuDevicePrimaryCtxRelease", status) {
                tracing::warn!(device, error = %e, "releasing primary context");
            }
        }
    }
}

/// Pinned host memory allocated by the driver itself: `cuMemAllocHost`, the call behind
/// `cudaMallocHost` / `cudaHostAlloc(.., cudaHostAllocDefault)`. Freed with
/// `cuMemFreeHost` on drop.
///
/// hetmem never hands this out. It is kept as the baseline that hetmem's own pinned
/// path — map and place the pages first (NUMA binding, parallel pre-fault), then
/// `cuMemHostRegister` them — is measured against (`benches/pinning.rs`): the driver
/// allocates, zeroes and locks the pages in one serial call, which DESIGN.md measured at
/// 587 ms per GiB (`cudaHostAlloc`) against 102 ms for registering 1 GiB already in
/// place (`cudaHostRegister`).
///
/// `cuMemAllocHost_v2` rather than `cuMemHostAlloc(.., 0)`: the two are the same
/// allocation (the driver documents `cuMemAllocHost` as `cuMemHostAlloc` with no
/// flags), and `cuMemAllocHost` is the call the comparison names. Neither passes
/// `CU_MEMHOSTALLOC_PORTABLE`, so the pages count as pinned for `device`'s context only
/// (hetmem registers with `PORTABLE`); with unified addressing every device can still
/// address them. The pages land where the driver's zeroing faults them (the calling
/// thread's NUMA policy), not near `device`.
///
/// The borrow of the backend keeps the primary context that owns the allocation alive
/// until the memory is freed.
#[derive(Debug)]
pub struct DriverPinned<'a> {
    backend: &'a CudaBackend,
    device: usize,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the struct owns its allocation exclusively, like a `Box<[u8]>`; pinned host
// memory is ordinary memory readable from any thread, and `Drop` binds the context on
// whichever thread it runs (the driver API is thread-safe, see `CudaBackend`).
unsafe impl Send for DriverPinned<'_> {}
// SAFETY: `&self` only exposes the address and length; nothing is mutated through it.
unsafe impl Sync for DriverPinned<'_> {}

impl<'a> DriverPinned<'a> {
    /// Allocates `len` bytes of page-locked host memory with `cuMemAllocHost_v2`, in
    /// `device`'s primary context. When it returns, the pages are resident, zeroed and
    /// pinned: nothing more is needed before a DMA copy.
    ///
    /// Errors: [`Error::UnknownDevice`] for a device this backend does not have,
    /// [`Error::InvalidSize`] for 0 bytes, [`Error::Unsupported`] when libcuda lacks
    /// `cuMemAllocHost_v2` or `cuMemFreeHost` (checked once in [`CudaBackend::new`]),
    /// [`Error::OutOfMemory`] (tier `Pinned`) when the driver cannot pin that much, and
    /// [`Error::Driver`] for any other failure.
    pub fn new(backend: &'a CudaBackend, device: usize, len: usize) -> Result<DriverPinned<'a>> {
        check_device(backend, device)?;
        check_size(len)?;
        if !backend.driver_pinned {
            return Err(Error::Unsupported {
                backend: BackendKind::Cuda,
                what: "cuMemAllocHost (libcuda lacks cuMemAllocHost_v2 or cuMemFreeHost)",
            });
        }
        let _ctx = backend.bind(device)?;
        let mut p: *mut c_void = ptr::null_mut();
        // SAFETY: the symbol exists (checked in `new`), the device's context is current
        // and `p` is a valid out-pointer.
        match unsafe { drv::cuMemAllocHost_v2(&mut p, len) } {
            Status::SUCCESS => match NonNull::new(p.cast::<u8>()) {
                Some(ptr) => Ok(DriverPinned {
                    backend,
                    device,
                    ptr,
                    len,
                }),
                None => Err(driver_error("cuMemAllocHost", Status::UNKNOWN)),
            },
            Status::OUT_OF_MEMORY => Err(Error::oom(Tier::Pinned, len, available_memory())),
            other => Err(driver_error("cuMemAllocHost", other)),
        }
    }

    /// The first byte; valid for [`len`](Self::len) bytes until `self` is dropped.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// The size asked for, in bytes (never 0).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: a zero-byte allocation is refused by [`new`](Self::new).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device whose context the memory was allocated in.
    pub fn device(&self) -> usize {
        self.device
    }
}

impl Drop for DriverPinned<'_> {
    fn drop(&mut self) {
        let _ctx = self
            .backend
            .bind(self.device)
            .inspect_err(|e| tracing::warn!(device = self.device, error = %e, "binding context to free pinned host memory"));
        // SAFETY: `ptr` came from cuMemAllocHost_v2 in `new` (so the symbols exist) and
        // is freed exactly once, here; the borrow of the backend kept its context alive.
        let status = unsafe { drv::cuMemFreeHost(self.ptr.as_ptr().cast::<c_void>()) };
        if let Err(e) = check("cuMemFreeHost", status) {
            tracing::warn!(
                device = self.device,
                len = self.len,
                error = %e,
                "freeing driver-pinned host memory; it leaks"
            );
        }
    }
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    fn mem_info(&self, device: usize) -> Result<MemInfo> {
        check_device(self, device)?;
        let _ctx = self.bind(device)?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: the device's context is current; both are valid out-pointers.
        check("cuMemGetInfo", unsafe {
            drv::cuMemGetInfo_v2(&mut free, &mut total)
        })?;
        Ok(MemInfo { free, total })
    }

    fn alloc_device(&self, device: usize, size: usize) -> Result<DevicePtr> {
        check_device(self, device)?;
        check_size(size)?;
        let _ctx = self.bind(device)?;
        let mut dptr: CUdeviceptr = 0;
        // SAFETY: the device's context is current; `dptr` is a valid out-pointer.
        match unsafe { drv::cuMemAlloc_v2(&mut dptr, size) } {
            Status::SUCCESS => Ok(DevicePtr(dptr)),
            Status::OUT_OF_MEMORY => Err(Error::oom(
                Tier::Device(device),
                size,
                self.free_for_report(device),
            )),
            other => Err(driver_error("cuMemAlloc", other)),
        }
    }

    /// # Safety
    /// As [`Backend::free_device`].
    unsafe fn free_device(&self, device: usize, ptr: DevicePtr, _size: usize) -> Result<()> {
        check_device(self, device)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees `ptr` came from alloc_device on this backend,
        // is not freed and no queued work uses it.
        check("cuMemFree", unsafe { drv::cuMemFree_v2(ptr.0) })
    }

    fn alloc_managed(&self, device: usize, size: usize) -> Result<NonNull<u8>> {
        check_device(self, device)?;
        check_size(size)?;
        if !self.devices[device].managed_memory {
            return Err(Error::Unsupported {
                backend: BackendKind::Cuda,
                what: "managed memory on a device without it",
            });
        }
        let _ctx = self.bind(device)?;
        let mut dptr: CUdeviceptr = 0;
        // SAFETY: the device's context is current; `dptr` is a valid out-pointer.
        let status = unsafe {
            drv::cuMemAllocManaged(
                &mut dptr,
                size,
                CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL as u32,
            )
        };
        match status {
            Status::SUCCESS => {
                let p: *mut u8 = ptr::with_exposed_provenance_mut(dptr as usize);
                NonNull::new(p).ok_or_else(|| driver_error("cuMemAllocManaged", Status::UNKNOWN))
            }
            Status::OUT_OF_MEMORY => Err(Error::oom(
                Tier::Managed(device),
                size,
                self.free_for_report(device),
            )),
            other => Err(driver_error("cuMemAllocManaged", other)),
        }
    }

    /// # Safety
    /// As [`Backend::free_managed`].
    unsafe fn free_managed(&self, device: usize, ptr: NonNull<u8>, _size: usize) -> Result<()> {
        check_device(self, device)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees `ptr` came from alloc_managed on this backend,
        // is not freed and no queued work uses it; managed memory is freed with cuMemFree.
        check("cuMemFree", unsafe { drv::cuMemFree_v2(host_addr(ptr)) })
    }

    /// # Safety
    /// As [`Backend::register_host`].
    ///
    /// In pieces of at most 64 GiB; a piece the driver refuses for another reason than
    /// memory or an overlap (some hosts answer `CUDA_ERROR_INVALID_VALUE` for one
    /// registration above about 96-128 GiB) is tried again in halves, down to 1 GiB,
    /// then the first refusal is the error (`register_in_pieces`). Out of memory is
    /// never retried that way: it is [`Error::OutOfMemory`] at once, so that a pool
    /// gives memory back first. On failure every piece registered is undone.
    unsafe fn register_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        check_size(len)?;
        // PORTABLE registrations are visible to every context; any one will do.
        let _ctx = self.bind(self.host_device()?)?;
        let base = ptr.as_ptr();
        let outcome = register_in_pieces(len, |off, n| {
            // SAFETY: the caller guarantees base..base+len is mapped host memory that it
            // owns; off + n <= len, so the piece lies inside it.
            let status = unsafe {
                drv::cuMemHostRegister_v2(
                    base.add(off).cast::<c_void>(),
                    n,
                    sys::CU_MEMHOSTREGISTER_PORTABLE,
                )
            };
            match status {
                Status::SUCCESS => {
                    self.registered.insert(base as usize + off, n);
                    Ok(())
                }
                // The driver could not pin the pages: out of pinned memory, as the host
                // backend reports an mlock refused for RLIMIT_MEMLOCK, so that callers
                // (the host pool's give-back-and-retry) see the tier and the numbers.
                Status::OUT_OF_MEMORY => Err(Refusal::Final(Error::oom(
                    Tier::Pinned,
                    len,
                    available_memory(),
                ))),
                // Overlapping another registration: no smaller piece helps.
                Status::ALREADY_REGISTERED => {
                    Err(Refusal::Final(driver_error("cuMemHostRegister", status)))
                }
                other => Err(Refusal::Size(driver_error("cuMemHostRegister", other))),
            }
        });
        let (err, done) = match outcome {
            Ok(_) => return Ok(()),
            Err(failure) => failure,
        };
        // Undo the pieces that did register, so a failure leaves nothing behind.
        let mut undo_error = None;
        for &(off, _) in &done {
            // SAFETY: this piece start was registered just above.
            let status = unsafe { drv::cuMemHostUnregister(base.add(off).cast::<c_void>()) };
            if status == Status::SUCCESS {
                self.registered.remove(base as usize + off);
            }
            if let Err(e) = check("cuMemHostUnregister", status) {
                tracing::error!(
                    error = %e,
                    offset = off,
                    "rolling back a partial host registration failed; the region leaks"
                );
                undo_error.get_or_insert(e);
            }
        }
        let registered = done.iter().map(|&(_, n)| n).sum();
        match undo_error {
            Some(undo) => Err(ROLLBACK.error(&err, &undo, ptr, len, registered)),
            None => Err(err),
        }
    }

    /// # Safety
    /// As [`Backend::unregister_host`].
    ///
    /// Undoes exactly the pieces `register_host` registered in the range (recorded as
    /// they succeeded, so also when it had to split them).
    unsafe fn unregister_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        check_size(len)?;
        let _ctx = self.bind(self.host_device()?)?;
        let base = ptr.as_ptr() as usize;
        let mut starts: Vec<usize> = self
            .registered
            .within(base, len)
            .into_iter()
            .map(|(start, _)| start)
            .collect();
        if starts.is_empty() {
            // Nothing of ours here (a contract breach): the driver's answer says so.
            starts.push(base);
        }
        let mut first_error = None;
        for start in starts {
            // SAFETY: the caller guarantees ptr..ptr+len was registered by
            // register_host, which recorded exactly these piece starts inside it, so
            // `start - base < len`.
            let status = unsafe {
                drv::cuMemHostUnregister(ptr.as_ptr().add(start - base).cast::<c_void>())
            };
            if status == Status::SUCCESS {
                self.registered.remove(start);
            }
            if let Err(e) = check("cuMemHostUnregister", status) {
                tracing::warn!(error = %e, offset = start - base, "unregistering host memory");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn create_stream(&self, device: usize) -> Result<StreamHandle> {
        check_device(self, device)?;
        let _ctx = self.bind(device)?;
        let mut stream: CUstream = ptr::null_mut();
        // SAFETY: the device's context is current; `stream` is a valid out-pointer.
        check("cuStreamCreate", unsafe {
            drv::cuStreamCreate(&mut stream, CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        let handle = StreamHandle(stream.expose_provenance() as u64);
        lock(&self.streams).insert(handle.0, device);
        Ok(handle)
    }

    /// # Safety
    /// As [`Backend::destroy_stream`].
    unsafe fn destroy_stream(&self, stream: StreamHandle) -> Result<()> {
        // Out of the map first: once the driver has destroyed the stream, a concurrent
        // create may get the same handle value back and insert it, and a remove after
        // that would delete the new stream's entry.
        let device = lock(&self.streams)
            .remove(&stream.0)
            .ok_or_else(|| unknown_stream(stream))?;
        let result = self.bind(device).and_then(|_ctx| {
            // SAFETY: the caller guarantees the stream is live, ours and not used again;
            // cuStreamDestroy lets queued work finish first.
            check("cuStreamDestroy", unsafe {
                drv::cuStreamDestroy_v2(stream_ptr(stream))
            })
        });
        if result.is_err() {
            // Not destroyed, so the value cannot have been handed out again: keep it.
            lock(&self.streams).insert(stream.0, device);
        }
        result
    }

    /// # Safety
    /// As [`Backend::import_stream`]. 0 and 1 are the legacy default stream of
    /// `device`'s primary context, 2 the calling thread's per-thread default stream of it
    /// (every call binds that context before it uses the handle, and passes 2 on: the
    /// driver picks the thread's stream).
    unsafe fn import_stream(&self, device: usize, raw: u64) -> Result<StreamHandle> {
        check_device(self, device)?;
        self.foreign.import(device, raw)
    }

    /// # Safety
    /// As [`Backend::forget_stream`].
    unsafe fn forget_stream(&self, stream: StreamHandle) -> Result<()> {
        self.foreign.forget(stream)
    }

    /// # Safety
    /// As [`Backend::synchronize_stream`].
    unsafe fn synchronize_stream(&self, stream: StreamHandle) -> Result<()> {
        let device = self.stream_device(stream)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees the stream is live and ours.
        check("cuStreamSynchronize", unsafe {
            drv::cuStreamSynchronize(stream_ptr(stream))
        })
    }

    fn synchronize_device(&self, device: usize) -> Result<()> {
        check_device(self, device)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the device's primary context is current; the call takes no arguments.
        check("cuCtxSynchronize", unsafe { drv::cuCtxSynchronize() })
    }

    fn create_event(&self, device: usize) -> Result<EventHandle> {
        check_device(self, device)?;
        let _ctx = self.bind(device)?;
        let mut event: CUevent = ptr::null_mut();
        // SAFETY: the device's context is current; `event` is a valid out-pointer.
        check("cuEventCreate", unsafe {
            drv::cuEventCreate(&mut event, CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
        })?;
        let handle = EventHandle(event.expose_provenance() as u64);
        lock(&self.events).insert(handle.0, device);
        Ok(handle)
    }

    /// # Safety
    /// As [`Backend::destroy_event`].
    unsafe fn destroy_event(&self, event: EventHandle) -> Result<()> {
        // Out of the map first, as in `destroy_stream`: the driver may hand the value
        // out again as soon as the event is destroyed.
        let device = lock(&self.events)
            .remove(&event.0)
            .ok_or_else(|| unknown_event(event))?;
        let result = self.bind(device).and_then(|_ctx| {
            // SAFETY: the caller guarantees the event is live, ours and not used again.
            check("cuEventDestroy", unsafe {
                drv::cuEventDestroy_v2(event_ptr(event))
            })
        });
        if result.is_err() {
            // Not destroyed, so the value cannot have been handed out again: keep it.
            lock(&self.events).insert(event.0, device);
        }
        result
    }

    /// # Safety
    /// As [`Backend::record_event`].
    unsafe fn record_event(&self, event: EventHandle, stream: StreamHandle) -> Result<()> {
        let event_device = self.event_device(event)?;
        let stream_device = self.stream_device(stream)?;
        if event_device != stream_device {
            // cuEventRecord requires both in one context; say so plainly instead of
            // CUDA_ERROR_INVALID_HANDLE.
            return Err(Error::InvalidArgument(format!(
                "event on device {event_device} cannot be recorded on a stream of device {stream_device}"
            )));
        }
        let _ctx = self.bind(stream_device)?;
        // SAFETY: the caller guarantees both handles are live and ours; they share a
        // context (checked above).
        check("cuEventRecord", unsafe {
            drv::cuEventRecord(event_ptr(event), stream_ptr(stream))
        })
    }

    /// # Safety
    /// As [`Backend::stream_wait_event`].
    unsafe fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()> {
        self.event_device(event)?;
        let device = self.stream_device(stream)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees both handles are live and ours; waiting on an
        // event from another device's context is allowed.
        check("cuStreamWaitEvent", unsafe {
            drv::cuStreamWaitEvent(stream_ptr(stream), event_ptr(event), 0)
        })
    }

    /// # Safety
    /// As [`Backend::synchronize_event`].
    unsafe fn synchronize_event(&self, event: EventHandle) -> Result<()> {
        let device = self.event_device(event)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees the event is live and ours.
        check("cuEventSynchronize", unsafe {
            drv::cuEventSynchronize(event_ptr(event))
        })
    }

    /// # Safety
    /// As [`Backend::event_done`].
    unsafe fn event_done(&self, event: EventHandle) -> Result<bool> {
        let device = self.event_device(event)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees the event is live and ours.
        match unsafe { drv::cuEventQuery(event_ptr(event)) } {
            Status::SUCCESS => Ok(true),
            Status::NOT_READY => Ok(false),
            other => Err(driver_error("cuEventQuery", other)),
        }
    }

    /// # Safety
    /// As [`Backend::is_capturing`]. `cuStreamIsCapturing` exists unchanged in every
    /// driver from 10.0 to 13 (the capture-info calls do not: CUDA 13 removed
    /// `cuStreamGetCaptureInfo_v2`).
    unsafe fn is_capturing(&self, stream: StreamHandle) -> Result<bool> {
        let device = self.stream_device(stream)?;
        let _ctx = self.bind(device)?;
        let mut status: c_uint = 0;
        // SAFETY: the caller guarantees the stream is live and ours; `status` is a
        // valid out-pointer (CUstreamCaptureStatus is a C enum, read as its u32).
        check("cuStreamIsCapturing", unsafe {
            drv::cuStreamIsCapturing(stream_ptr(stream), &mut status)
        })?;
        // CU_STREAM_CAPTURE_STATUS_NONE is 0; ACTIVE (1) and INVALIDATED (2) are both
        // still in capture mode.
        Ok(status != 0)
    }

    /// # Safety
    /// As [`Backend::copy`].
    unsafe fn copy(
        &self,
        dst: MemRef,
        src: MemRef,
        len: usize,
        stream: Option<StreamHandle>,
    ) -> Result<()> {
        let side = |m: MemRef| -> Result<(CUdeviceptr, Option<usize>)> {
            match m {
                MemRef::Host { ptr, .. } => Ok((host_addr(ptr), None)),
                MemRef::Device { device, ptr } => {
                    check_device(self, device)?;
                    Ok((ptr.0, Some(device)))
                }
            }
        };
        let (dst_addr, dst_dev) = side(dst)?;
        let (src_addr, src_dev) = side(src)?;
        if len == 0 {
            return Ok(());
        }
        let (device, cu_stream, after_legacy) = match stream {
            Some(s) => {
                let device = self.stream_device(s)?;
                check_copy_stream(&dst, &src, device)?;
                (device, stream_ptr(s), None)
            }
            None => {
                let device = match dst_dev.or(src_dev) {
                    Some(device) => device,
                    None => self.host_device()?,
                };
                let (stream, event) = self.copy_stream(device)?;
                (device, stream, Some(event))
            }
        };
        let _ctx = self.bind(device)?;
        if let Some(event) = after_legacy {
            // Ordered as cuMemcpy is: after the work queued so far on the legacy default
            // stream, which by the driver's rule waits for every blocking stream of the
            // context (so a kernel the caller queued on stream 0 has written its output
            // before it is read). A concurrent copy may record the event again before
            // the wait: the wait then covers more, never less.
            let legacy: CUstream = ptr::without_provenance_mut(LEGACY_STREAM as usize);
            // SAFETY: the event is ours, made in this device's context, which is
            // current; CU_STREAM_LEGACY names that context's legacy stream.
            check("cuEventRecord", unsafe {
                drv::cuEventRecord(event, legacy)
            })?;
            // SAFETY: the internal stream and the event are ours, of this context.
            check("cuStreamWaitEvent", unsafe {
                drv::cuStreamWaitEvent(cu_stream, event, 0)
            })?;
        }
        let queued = match (dst_dev, src_dev) {
            (Some(dd), Some(sd)) if dd != sd => {
                // Both devices' contexts take part: both must be open.
                let (dst_ctx, src_ctx) = (self.opened(dd)?.ctx, self.opened(sd)?.ctx);
                // SAFETY: the caller guarantees both ranges are valid device memory of
                // these devices for `len` bytes until the copy is done, and the stream
                // (ours or the live one given) is valid; both contexts are retained.
                check("cuMemcpyPeerAsync", unsafe {
                    drv::cuMemcpyPeerAsync(dst_addr, dst_ctx, src_addr, src_ctx, len, cu_stream)
                })
            }
            _ => {
                // A host side may span several of our registrations: one copy each.
                let host_side = |dev: Option<usize>, addr: CUdeviceptr| match dev {
                    None => Some(addr as usize),
                    Some(_) => None,
                };
                for_each_piece(
                    &self.registered,
                    host_side(dst_dev, dst_addr),
                    host_side(src_dev, src_addr),
                    len,
                    |off, n| {
                        let off = off as CUdeviceptr;
                        // SAFETY: the caller guarantees both ranges are valid for `len`
                        // bytes, do not overlap and outlive the copy; off + n <= len.
                        // With unified addressing the driver infers the direction.
                        check("cuMemcpyAsync", unsafe {
                            drv::cuMemcpyAsync(dst_addr + off, src_addr + off, n, cu_stream)
                        })
                    },
                )
            }
        };
        if stream.is_none() {
            // Also when a later piece failed: the earlier ones are queued and must be
            // done before the caller's memory is let go.
            // SAFETY: the internal copy stream lives as long as `self`.
            let done = check("cuStreamSynchronize", unsafe {
                drv::cuStreamSynchronize(cu_stream)
            });
            queued?;
            return done;
        }
        queued
    }

    /// # Safety
    /// As [`Backend::prefetch`].
    unsafe fn prefetch(
        &self,
        ptr: NonNull<u8>,
        len: usize,
        to: Location,
        stream: StreamHandle,
    ) -> Result<()> {
        if let Location::Device(d) = to {
            check_device(self, d)?;
            if !self.state[d].concurrent_managed {
                return Err(Error::Unsupported {
                    backend: BackendKind::Cuda,
                    what: "prefetch to a device without concurrent managed access",
                });
            }
        }
        let device = self.stream_device(stream)?;
        if len == 0 {
            return Ok(());
        }
        let _ctx = self.bind(device)?;
        let location = mem_location(to, |d| self.cu_device(d));
        // SAFETY: the caller guarantees ptr..ptr+len is managed memory from this
        // backend and the stream is live and ours.
        check("cuMemPrefetchAsync", unsafe {
            drv::cuMemPrefetchAsync_v2(host_addr(ptr), len, location, 0, stream_ptr(stream))
        })
    }

    /// # Safety
    /// As [`Backend::advise`].
    unsafe fn advise(&self, ptr: NonNull<u8>, len: usize, advice: Advice) -> Result<()> {
        use CUmem_advise::*;
        let (cu_advice, location) = match advice {
            Advice::SetReadMostly => (CU_MEM_ADVISE_SET_READ_MOSTLY, Location::Host),
            Advice::UnsetReadMostly => (CU_MEM_ADVISE_UNSET_READ_MOSTLY, Location::Host),
            Advice::SetPreferredLocation(loc) => (CU_MEM_ADVISE_SET_PREFERRED_LOCATION, loc),
            Advice::UnsetPreferredLocation => {
                (CU_MEM_ADVISE_UNSET_PREFERRED_LOCATION, Location::Host)
            }
            Advice::SetAccessedBy(d) => (CU_MEM_ADVISE_SET_ACCESSED_BY, Location::Device(d)),
            Advice::UnsetAccessedBy(d) => (CU_MEM_ADVISE_UNSET_ACCESSED_BY, Location::Device(d)),
        };
        // Read-mostly and unset-preferred ignore the location; host stands in.
        if let Location::Device(d) = location {
            check_device(self, d)?;
        }
        if len == 0 {
            return Ok(());
        }
        let bind_device = match location {
            Location::Device(d) => d,
            Location::Host => self.host_device()?,
        };
        let _ctx = self.bind(bind_device)?;
        let location = mem_location(location, |d| self.cu_device(d));
        // SAFETY: the caller guarantees ptr..ptr+len lies in managed memory from this
        // backend; advice only changes driver policy for the range.
        check("cuMemAdvise", unsafe {
            drv::cuMemAdvise_v2(host_addr(ptr), len, cu_advice, location)
        })
    }

    /// Opens the device (when it has VMM) to query it in its context; `None` also
    /// when the device cannot be opened (the pool then uses plain segments, whose
    /// allocation reports the open error).
    fn vmm_granularity(&self, device: usize) -> Option<usize> {
        if !self.state.get(device)?.vmm {
            return None;
        }
        self.opened(device).ok()?.vmm_granularity
    }

    fn reserve_address(&self, device: usize, size: usize) -> Result<DevicePtr> {
        let page = self.vmm_page(device)?;
        check_vmm_size("reservation", size, page)?;
        let _ctx = self.bind(device)?;
        let mut dptr: CUdeviceptr = 0;
        // SAFETY: VMM symbols present (vmm_page); `dptr` is a valid out-pointer. Aligned
        // to the VMM page (the default alignment is not documented, and every map into
        // the range must be page-aligned), no fixed address, no flags.
        check("cuMemAddressReserve", unsafe {
            drv::cuMemAddressReserve(&mut dptr, size, page, 0, 0)
        })?;
        Ok(DevicePtr(dptr))
    }

    /// # Safety
    /// As [`Backend::free_address`].
    unsafe fn free_address(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        self.vmm_page(device)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees ptr/size is one reservation from reserve_address
        // on this device with nothing mapped in it any more.
        check("cuMemAddressFree", unsafe {
            drv::cuMemAddressFree(ptr.0, size)
        })
    }

    fn create_physical(&self, device: usize, size: usize) -> Result<PhysHandle> {
        let page = self.vmm_page(device)?;
        check_vmm_size("physical allocation", size, page)?;
        let _ctx = self.bind(device)?;
        let prop = allocation_prop(self.cu_device(device));
        let mut handle: CUmemGenericAllocationHandle = 0;
        // SAFETY: VMM symbols present; `handle` is a valid out-pointer and `prop` a fully
        // initialised property struct that outlives the call; flags must be 0.
        match unsafe { drv::cuMemCreate(&mut handle, size, &prop, 0) } {
            Status::SUCCESS => Ok(PhysHandle(handle)),
            Status::OUT_OF_MEMORY => Err(Error::oom(
                Tier::Device(device),
                size,
                self.free_for_report(device),
            )),
            other => Err(driver_error("cuMemCreate", other)),
        }
    }

    /// # Safety
    /// As [`Backend::release_physical`].
    unsafe fn release_physical(&self, device: usize, handle: PhysHandle) -> Result<()> {
        self.vmm_page(device)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees `handle` came from create_physical on this
        // device, is live and not mapped (so this frees the memory at once).
        check("cuMemRelease", unsafe { drv::cuMemRelease(handle.0) })
    }

    /// # Safety
    /// As [`Backend::map`].
    unsafe fn map(
        &self,
        device: usize,
        ptr: DevicePtr,
        size: usize,
        handle: PhysHandle,
    ) -> Result<()> {
        let page = self.vmm_page(device)?;
        check_vmm_size("mapping", size, page)?;
        check_vmm_addr(ptr, page)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees ptr..ptr+size lies in a reservation of this
        // device with nothing mapped there, and `handle` is live, of `size` bytes and not
        // mapped elsewhere; offset and flags must be 0.
        match unsafe { drv::cuMemMap(ptr.0, size, 0, handle.0, 0) } {
            Status::SUCCESS => Ok(()),
            // Page tables are device memory too: the pool gives back cache and retries.
            Status::OUT_OF_MEMORY => Err(Error::oom(
                Tier::Device(device),
                size,
                self.free_for_report(device),
            )),
            other => Err(driver_error("cuMemMap", other)),
        }
    }

    /// # Safety
    /// As [`Backend::set_access`].
    unsafe fn set_access(
        &self,
        device: usize,
        ptr: DevicePtr,
        size: usize,
        devices: &[usize],
    ) -> Result<()> {
        let page = self.vmm_page(device)?;
        check_vmm_size("access range", size, page)?;
        check_vmm_addr(ptr, page)?;
        if !devices.contains(&device) {
            return Err(Error::InvalidArgument(format!(
                "access to memory of device {device} must include device {device}"
            )));
        }
        for &d in devices {
            check_device(self, d)?;
            // The driver would refuse (or the device fault) without a peer link; say
            // which device and why instead.
            if d != device && !self.can_access_peer(d, device)? {
                return Err(Error::InvalidArgument(format!(
                    "device {d} cannot be given access to memory of device {device}: \
                     the driver reports no peer access from {d} to {device} \
                     (cuDeviceCanAccessPeer)"
                )));
            }
        }
        let descs: Vec<CUmemAccessDesc> = devices
            .iter()
            .map(|&d| access_desc(self.cu_device(d)))
            .collect();
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees ptr..ptr+size is fully mapped in a reservation of
        // this device and covers whole mappings; `descs` holds `descs.len()` initialised
        // descriptors that outlive the call.
        check("cuMemSetAccess", unsafe {
            drv::cuMemSetAccess(ptr.0, size, descs.as_ptr(), descs.len())
        })
    }

    /// # Safety
    /// As [`Backend::unmap`].
    unsafe fn unmap(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        self.vmm_page(device)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees the range is exactly one earlier map on this
        // device and no queued work uses it.
        check("cuMemUnmap", unsafe { drv::cuMemUnmap(ptr.0, size) })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn culib_present() -> bool {
        driver_library().is_ok()
    }

    #[test]
    fn new_without_driver_is_unavailable_not_a_panic() {
        match CudaBackend::new() {
            Err(Error::BackendUnavailable { backend, reason }) => {
                assert_eq!(backend, BackendKind::Cuda);
                assert!(!reason.is_empty());
            }
            Ok(b) => {
                assert!(culib_present(), "Ok without libcuda");
                assert!(!b.devices().is_empty());
            }
            Err(e) => panic!("expected BackendUnavailable, got {e:?}"),
        }
        if !culib_present() {
            // Twice: the second attempt must not trip over state from the first.
            assert!(matches!(
                CudaBackend::new(),
                Err(Error::BackendUnavailable { .. })
            ));
        }
    }

    #[test]
    fn rollback_failure_is_a_distinct_driver_error() {
        let cause = Error::Driver {
            backend: BackendKind::Cuda,
            call: "cuMemHostRegister",
            code: 2,
            message: "out of memory".into(),
        };
        let undo = Error::Driver {
            backend: BackendKind::Cuda,
            call: "cuMemHostUnregister",
            code: 1,
            message: "invalid argument".into(),
        };
        let p = NonNull::<u8>::dangling();
        match ROLLBACK.error(&cause, &undo, p, 3 << 30, 1 << 30) {
            Error::RegistrationLeaked {
                backend,
                call,
                code,
                message,
            } => {
                assert_eq!(backend, BackendKind::Cuda);
                assert_eq!(call, REGISTER_ROLLBACK_CALL);
                assert_eq!(call, "cuMemHostRegister(rollback)");
                assert_eq!(code, 1);
                assert!(
                    message.contains("rollback failed; region leaked"),
                    "{message}"
                );
                assert!(message.contains("out of memory"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn vmm_allocation_prop_is_pinned_device_memory() {
        let prop = allocation_prop(3);
        assert_eq!(
            prop.type_,
            CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED
        );
        assert_eq!(
            prop.requestedHandleTypes,
            CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE
        );
        assert_eq!(
            prop.location.type_,
            CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE
        );
        assert_eq!(prop.location.id, 3);
        assert!(prop.win32HandleMetaData.is_null());
        assert_eq!(prop.allocFlags.compressionType, 0);
        assert_eq!(prop.allocFlags.gpuDirectRDMACapable, 0);
        assert_eq!(prop.allocFlags.usage, 0);
        assert_eq!(prop.allocFlags.reserved, [0; 4]);
        // The C layout of CUDA 12's CUmemAllocationProp: 4 + 4 + 8 + 8 + 8 bytes.
        assert_eq!(std::mem::size_of::<CUmemAllocationProp>(), 32);
    }

    #[test]
    fn vmm_access_is_read_write_for_the_device() {
        let desc = access_desc(1);
        assert_eq!(
            desc.location.type_,
            CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE
        );
        assert_eq!(desc.location.id, 1);
        assert_eq!(
            desc.flags,
            CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        );
        assert_eq!(std::mem::size_of::<CUmemAccessDesc>(), 12);
    }

    #[test]
    fn vmm_sizes_and_addresses_must_be_whole_pages() {
        let page = 2 << 20;
        assert!(check_vmm_size("x", page, page).is_ok());
        assert!(check_vmm_size("x", 3 * page, page).is_ok());
        for bad in [0, 1, page - 1, page + 4096] {
            assert!(
                matches!(
                    check_vmm_size("x", bad, page),
                    Err(Error::InvalidArgument(_))
                ),
                "{bad}"
            );
        }
        assert!(check_vmm_addr(DevicePtr(0x7f00_0000_0000), page).is_ok());
        assert!(matches!(
            check_vmm_addr(DevicePtr(0x7f00_0000_1000), page),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            VMM_UNSUPPORTED,
            Error::Unsupported {
                backend: BackendKind::Cuda,
                ..
            }
        ));
    }

    #[test]
    fn driver_pinned_symbols_are_optional() {
        for name in DRIVER_PINNED_SYMBOLS {
            assert!(!REQUIRED_SYMBOLS.contains(name), "{name} would be required");
            assert!(!VMM_SYMBOLS.contains(name), "{name}");
        }
    }

    /// The driver's own pinned allocation: usable at once, copied through, refused for
    /// bad arguments, freed on drop.
    #[test]
    #[ignore = "needs a CUDA driver and GPU: cargo test --lib cuda -- --ignored"]
    fn gpu_driver_pinned() {
        let b = CudaBackend::new().expect("a CUDA driver and device");
        assert!(matches!(
            DriverPinned::new(&b, 0, 0),
            Err(Error::InvalidSize { .. })
        ));
        assert!(matches!(
            DriverPinned::new(&b, b.devices().len(), 4096),
            Err(Error::UnknownDevice { .. })
        ));
        let n = 1 << 20;
        let pinned = DriverPinned::new(&b, 0, n).unwrap();
        assert_eq!((pinned.len(), pinned.device()), (n, 0));
        assert!(!pinned.is_empty());
        let mut back = vec![0u8; n];
        let dev = b.alloc_device(0, n).unwrap();
        // SAFETY: `pinned` owns n bytes that nothing else uses; `back` and the device
        // buffer are live for n bytes and the copies are synchronous.
        unsafe {
            let p = std::slice::from_raw_parts_mut(pinned.ptr().as_ptr(), n);
            for (i, x) in p.iter_mut().enumerate() {
                *x = (i * 5 + 1) as u8;
            }
            let d = MemRef::Device {
                device: 0,
                ptr: dev,
            };
            let src = MemRef::Host {
                ptr: pinned.ptr(),
                kind: super::super::HostKind::Pinned,
            };
            let dst = MemRef::Host {
                ptr: NonNull::new(back.as_mut_ptr()).unwrap(),
                kind: super::super::HostKind::Pageable,
            };
            b.copy(d, src, n, None).unwrap();
            b.copy(dst, d, n, None).unwrap();
            b.free_device(0, dev, n).unwrap();
            assert_eq!(p, &back[..]);
        }
        drop(pinned);
    }

    #[test]
    #[ignore = "needs a CUDA driver and GPU: cargo test --lib cuda -- --ignored"]
    fn driver_error_carries_call_and_code() {
        // cuGetErrorString needs a driver that `new` accepted.
        let _backend = CudaBackend::new().expect("a CUDA driver and device");
        match driver_error("cuMemAlloc", Status::OUT_OF_MEMORY) {
            Error::Driver {
                backend,
                call,
                code,
                message,
            } => {
                assert_eq!(backend, BackendKind::Cuda);
                assert_eq!(call, "cuMemAlloc");
                assert_eq!(code, 2);
                assert!(!message.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    /// End to end on a real GPU, through the trait alone.
    #[test]
    #[ignore = "needs a CUDA driver and GPU: cargo test --lib cuda -- --ignored"]
    fn gpu_round_trip() {
        let b = CudaBackend::new().expect("a CUDA driver and device");
        for d in b.devices() {
            if let Some(id) = &d.pci_bus_id {
                assert_eq!(normalize_pci_bus_id(id).as_ref(), Some(id));
            }
        }
        let n = 1 << 20;
        let src: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
        let mut back = vec![0u8; n];
        let dev = b.alloc_device(0, n).unwrap();
        let info = b.mem_info(0).unwrap();
        assert!(info.free <= info.total);
        let host = |p: *const u8| MemRef::Host {
            ptr: NonNull::new(p as *mut u8).unwrap(),
            kind: super::super::HostKind::Pageable,
        };
        let d = MemRef::Device {
            device: 0,
            ptr: dev,
        };
        // SAFETY: buffers are live for n bytes and outlive the synchronous/synced copies.
        unsafe {
            b.copy(d, host(src.as_ptr()), n, None).unwrap();
            let s = b.create_stream(0).unwrap();
            let e = b.create_event(0).unwrap();
            b.copy(host(back.as_mut_ptr()), d, n, Some(s)).unwrap();
            b.record_event(e, s).unwrap();
            b.synchronize_event(e).unwrap();
            assert!(b.event_done(e).unwrap());
            b.register_host(NonNull::new(back.as_mut_ptr()).unwrap(), n)
                .unwrap();
            b.unregister_host(NonNull::new(back.as_mut_ptr()).unwrap(), n)
                .unwrap();
            if b.devices()[0].managed_memory {
                let m = b.alloc_managed(0, n).unwrap();
                b.advise(m, n, Advice::SetPreferredLocation(Location::Device(0)))
                    .unwrap();
                b.prefetch(m, n, Location::Host, s).unwrap();
                b.synchronize_stream(s).unwrap();
                b.free_managed(0, m, n).unwrap();
            }
            b.destroy_event(e).unwrap();
            b.destroy_stream(s).unwrap();
            b.free_device(0, dev, n).unwrap();
        }
        assert_eq!(src, back);
        let too_big = b.devices()[0].total_memory * 2;
        assert!(matches!(
            b.alloc_device(0, too_big),
            Err(Error::OutOfMemory {
                tier: Tier::Device(0),
                ..
            })
        ));
    }

    /// Virtual memory management on a real GPU: physical allocations mapped side by side,
    /// made accessible with one call, written, read back, unmapped, released.
    #[test]
    #[ignore = "needs a CUDA driver and GPU: cargo test --lib cuda -- --ignored"]
    fn gpu_vmm_round_trip() {
        let b = CudaBackend::new().expect("a CUDA driver and device");
        let Some(page) = b.vmm_granularity(0) else {
            // A device (or vGPU) without VMM: every call must say Unsupported.
            assert!(matches!(
                b.reserve_address(0, 2 << 20),
                Err(Error::Unsupported { .. })
            ));
            assert!(matches!(
                b.create_physical(0, 2 << 20),
                Err(Error::Unsupported { .. })
            ));
            return;
        };
        assert!(page.is_power_of_two(), "granularity {page}");
        assert_eq!(b.vmm_granularity(b.devices().len()), None);
        assert!(matches!(
            b.reserve_address(0, page + 1),
            Err(Error::InvalidArgument(_))
        ));

        let pages = 3;
        let base = b.reserve_address(0, pages * page).unwrap();
        assert!(base.0.is_multiple_of(page as u64));
        let handles: Vec<PhysHandle> = (0..pages)
            .map(|_| b.create_physical(0, page).unwrap())
            .collect();
        let src: Vec<u8> = (0..page).map(|i| (i * 13 + 1) as u8).collect();
        let mut back = vec![0u8; page];
        let host = |p: *const u8| MemRef::Host {
            ptr: NonNull::new(p as *mut u8).unwrap(),
            kind: super::super::HostKind::Pageable,
        };
        // SAFETY: every page lies in our reservation with nothing mapped, each handle is
        // fresh and one page long; copies are synchronous and the buffers outlive them;
        // pages are unmapped before release and the range is empty before it is freed.
        unsafe {
            for (i, &h) in handles.iter().enumerate() {
                b.map(0, base.offset(i * page), page, h).unwrap();
            }
            // One access call for the three mappings: device 0 and, in the same call,
            // every device with a peer link to it (one descriptor each).
            let peers: Vec<usize> = (0..b.devices().len())
                .filter(|&d| d == 0 || b.can_access_peer(d, 0).unwrap())
                .collect();
            b.set_access(0, base, pages * page, &peers).unwrap();
            let last = MemRef::Device {
                device: 0,
                ptr: base.offset((pages - 1) * page),
            };
            b.copy(last, host(src.as_ptr()), page, None).unwrap();
            b.copy(host(back.as_mut_ptr()), last, page, None).unwrap();
            // Give the middle page back and map a new one in its place.
            b.unmap(0, base.offset(page), page).unwrap();
            b.release_physical(0, handles[1]).unwrap();
            let again = b.create_physical(0, page).unwrap();
            b.map(0, base.offset(page), page, again).unwrap();
            b.unmap(0, base.offset(page), page).unwrap();
            b.release_physical(0, again).unwrap();
            for i in [0, pages - 1] {
                b.unmap(0, base.offset(i * page), page).unwrap();
                b.release_physical(0, handles[i]).unwrap();
            }
            b.free_address(0, base, pages * page).unwrap();
        }
        assert_eq!(src, back);

        let too_big = (b.devices()[0].total_memory * 2).next_multiple_of(page);
        assert!(matches!(
            b.create_physical(0, too_big),
            Err(Error::OutOfMemory {
                tier: Tier::Device(0),
                requested,
                ..
            }) if requested == too_big
        ));
    }

    /// A copy with no stream reads what work queued on the legacy stream wrote, as
    /// `cuMemcpy` does: a 256 MiB host-to-device copy queued on stream 0 (milliseconds
    /// on a GPU), then a synchronous read of the end of the destination on the other
    /// copy engine. Unordered, the read would likely see the old bytes.
    #[test]
    #[ignore = "needs a CUDA driver and GPU: cargo test --lib cuda -- --ignored"]
    fn gpu_sync_copy_follows_the_legacy_stream() {
        let b = CudaBackend::new().expect("a CUDA driver and device");
        let n = 256 << 20;
        let tail = 1 << 20;
        let pinned = DriverPinned::new(&b, 0, n).unwrap();
        let dev = b.alloc_device(0, n).unwrap();
        let mut back = vec![0u8; tail];
        // SAFETY: the legacy stream of device 0; `pinned`, `dev` and `back` are live for
        // the sizes given until the synchronisations below.
        unsafe {
            let legacy = b.import_stream(0, 0).unwrap();
            let d = |off: usize| MemRef::Device {
                device: 0,
                ptr: dev.offset(off),
            };
            let src = MemRef::Host {
                ptr: pinned.ptr(),
                kind: super::super::HostKind::Pinned,
            };
            let out = MemRef::Host {
                ptr: NonNull::new(back.as_mut_ptr()).unwrap(),
                kind: super::super::HostKind::Pageable,
            };
            for round in 1..=3u8 {
                std::ptr::write_bytes(pinned.ptr().as_ptr(), round, n);
                b.copy(d(0), src, n, Some(legacy)).unwrap();
                b.copy(out, d(n - tail), tail, None).unwrap();
                assert!(
                    back.iter().all(|&x| x == round),
                    "round {round}: the synchronous copy read {} before the legacy \
                     stream's copy landed",
                    back[0]
                );
            }
            b.synchronize_stream(legacy).unwrap();
            b.forget_stream(legacy).unwrap();
            b.free_device(0, dev, n).unwrap();
        }
    }

    /// The device pool and the per-thread stream (2) on two threads: a block freed on
    /// the first thread's stream, with a copy into it queued behind 256 MiB of other
    /// copies (milliseconds), goes to the second thread's stream only behind it. The
    /// second thread's copy into the block lands last; unordered it would likely land
    /// first and be overwritten.
    #[test]
    #[ignore = "needs a CUDA driver and GPU: cargo test --lib cuda -- --ignored"]
    fn gpu_per_thread_stream_hand_over_between_threads() {
        use crate::placement::{NumaPolicy, Placement};
        use crate::pool::{Budget, PoolConfig};
        let mgr = crate::Manager::builder()
            .backend(BackendKind::Cuda)
            .build()
            .expect("a CUDA driver and device");
        let head = 2 << 20;
        let cfg = PoolConfig {
            budget: Budget::Bytes(head),
            expandable_segments: false,
            ..PoolConfig::default()
        };
        let pool = mgr.device_pool(0, cfg).unwrap();
        // SAFETY: every thread has a per-thread stream on device 0.
        let s = unsafe { crate::Stream::wrap(&mgr, 0, super::super::PER_THREAD_STREAM) }.unwrap();
        let big = 256 << 20;
        let host = Placement::Pinned(NumaPolicy::Default);
        let busy_src = mgr.alloc(host.clone(), big).unwrap();
        let mut busy_dst = mgr.alloc(Placement::Device(0), big).unwrap();
        let mut first = mgr.alloc(host.clone(), head).unwrap();
        first.as_mut_slice().unwrap().fill(1);
        let blk = pool.alloc(head, &s).unwrap();
        let addr = blk.ptr();
        mgr.copy_async(&mut busy_dst, 0, &busy_src, 0, big, &s)
            .unwrap();
        mgr.copy_to_block(&blk, 0, &first, 0, head, &s).unwrap();
        drop(blk);
        let blk = std::thread::scope(|t| {
            t.spawn(|| {
                let mut second = mgr.alloc(host.clone(), head).unwrap();
                second.as_mut_slice().unwrap().fill(2);
                let blk = pool.alloc(head, &s).unwrap();
                assert_eq!(blk.ptr(), addr, "the budget leaves one block");
                mgr.copy_to_block(&blk, 0, &second, 0, head, &s).unwrap();
                s.synchronize().unwrap();
                blk
            })
            .join()
            .unwrap()
        });
        s.synchronize().unwrap();
        let mut out = vec![0u8; head];
        blk.read(0, &mut out).unwrap();
        assert!(
            out.iter().all(|&x| x == 2),
            "the first thread's copy landed after the second thread's: {}",
            out[0]
        );
    }
}
