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
//! The driver is loaded and its entry points resolved by `hetmem_sys::cuda` (one
//! declaration table: the functions, their symbol lists and a check of every signature
//! against cudarc's), which loads `libcuda.so.1`, the name the driver installs, before
//! `libcuda.so`, so that the CUDA toolkit's stub cannot shadow the driver; only
//! cudarc's types are used, never its loader. [`CudaBackend::new`] refuses a driver
//! that lacks any symbol of `hetmem_sys::cuda::REQUIRED` before the first driver call,
//! inside `catch_unwind` as a second guard. Any absence is `Error::BackendUnavailable`;
//! once `new` has succeeded, no later call can hit a missing symbol.
//!
//! The VMM symbols (`hetmem_sys::cuda::VMM`) are optional: when one is missing, or a
//! device has `CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED` = 0 (read in
//! `new`), or its granularity query fails (made once, in its context, when the device
//! is opened), that device's `vmm_granularity` is `None` and the other VMM methods
//! return `Error::Unsupported` without calling the driver. Likewise
//! `hetmem_sys::cuda::DRIVER_PINNED` (`cuMemAllocHost_v2`, `cuMemFreeHost`), used only
//! by [`DriverPinned`]: without them [`DriverPinned::new`] returns
//! `Error::Unsupported`.
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
//!
//! # Files
//!
//! `mod.rs` the backend's state and how a device is chosen and opened; `context.rs`
//! binding a context for one call; `device.rs` what `new` asks of each device and
//! opening one; `backend.rs` the [`Backend`](super::Backend) implementation (one `impl`, so one file:
//! Rust allows a trait's methods in a single `impl` block, and forwarding each to a
//! file of its own would only add a layer); `vmm.rs` the VMM descriptors; `pinned.rs`
//! [`DriverPinned`].

mod backend;
mod context;
mod device;
mod pinned;
#[cfg(test)]
mod tests;
mod vmm;

use std::ffi::c_int;
use std::ops::Deref;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::{Mutex, OnceLock};

use hetmem_sys::cuda::types::{
    CUcontext, CUdevice, CUevent, CUevent_flags, CUstream, CUstream_flags,
};
use hetmem_sys::cuda::{CudaApi, CudaDriver, Status, DRIVER_PINNED, REQUIRED, VMM};

use self::context::{bind_ctx, Bound};
use self::device::{open_device, query_device};
pub use self::pinned::DriverPinned;
use super::driver::{self, Handles};
use super::registered::{Registrations, RollbackError};
use super::{check_device, lock, BackendKind, DeviceInfo};
use crate::error::{Error, Result};

/// The `call` of the [`Error::Driver`] that [`Backend::register_host`](super::Backend::register_host)
/// returns when a chunk failed to register *and* undoing the chunks registered before
/// it failed too. Part of the range then stays registered with the driver, so the
/// caller must not unmap (or otherwise give back) the memory: it has to leak the
/// region. The error's `code` is that of the first failed `cuMemHostUnregister`, and
/// its `message` names the original failure and contains
/// `"rollback failed; region leaked"`.
#[doc(hidden)]
pub const REGISTER_ROLLBACK_CALL: &str = RollbackError::CUDA.call;

/// The loaded driver, with hetmem's mapping of its statuses to [`Error`]; derefs to
/// its entry points.
#[derive(Debug, Clone, Copy)]
struct Driver(&'static CudaDriver);

impl Deref for Driver {
    type Target = CudaApi;
    fn deref(&self) -> &CudaApi {
        self.0.api()
    }
}

impl Driver {
    /// Maps a failed driver status to [`Error::Driver`], with the driver's message.
    fn error(self, call: &'static str, code: Status) -> Error {
        Error::Driver {
            backend: BackendKind::Cuda,
            call,
            code: code.0 as i32,
            message: self.0.error_string(code),
        }
    }

    /// `Ok` for `CUDA_SUCCESS`, [`Error::Driver`] naming `call` otherwise.
    fn check(self, call: &'static str, code: Status) -> Result<()> {
        if code.is_ok() {
            Ok(())
        } else {
            Err(self.error(call, code))
        }
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
    driver::unavailable(BackendKind::Cuda, reason)
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
    drv: Driver,
    devices: Vec<DeviceInfo>,
    state: Vec<DeviceState>,
    /// The device of each live stream and event we made, and the streams lent to us.
    handles: Handles,
    /// The driver has every symbol of `DRIVER_PINNED` (checked once in `new`).
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
        let loaded = CudaDriver::get()
            .map_err(|tried| unavailable(format!("libcuda not found ({tried})")))?;
        let file = loaded.file();
        tracing::debug!(file = file.unwrap_or("?"), "libcuda loaded");
        if let Some((name, e)) = loaded.missing(REQUIRED) {
            return Err(unavailable(format!("libcuda lacks symbol {name} ({e})")));
        }
        let missing_vmm = loaded.missing(VMM);
        if let Some((name, _)) = missing_vmm {
            tracing::debug!(
                symbol = name,
                "libcuda lacks a VMM symbol; virtual memory management disabled"
            );
        }
        let missing_pinned = loaded.missing(DRIVER_PINNED);
        if let Some((name, _)) = missing_pinned {
            tracing::debug!(
                symbol = name,
                "libcuda lacks a pinned-allocation symbol; DriverPinned disabled"
            );
        }
        let drv = Driver(loaded);
        // SAFETY: symbol present (checked above); cuInit takes flags only.
        let status = unsafe { drv.cuInit(0) };
        match status {
            Status::SUCCESS => {}
            Status::NO_DEVICE => return Err(unavailable("no CUDA device")),
            Status::STUB_LIBRARY => {
                return Err(unavailable(format!(
                    "{} is the CUDA toolkit's stub library, not the driver \
                     (cuInit: CUDA_ERROR_STUB_LIBRARY, code {})",
                    file.unwrap_or("libcuda"),
                    status.0
                )))
            }
            other => {
                return Err(unavailable(format!(
                    "cuInit failed: {}",
                    drv.error("cuInit", other)
                )))
            }
        }
        let mut count: c_int = 0;
        // SAFETY: driver initialised; `count` is a valid out-pointer.
        drv.check("cuDeviceGetCount", unsafe {
            drv.cuDeviceGetCount(&mut count)
        })?;
        if count <= 0 {
            return Err(unavailable("no CUDA device"));
        }

        let mut devices = Vec::with_capacity(count as usize);
        let mut state = Vec::with_capacity(count as usize);
        for ordinal in 0..count {
            let (info, st) = query_device(drv, ordinal, missing_vmm.is_none())?;
            devices.push(info);
            state.push(st);
        }
        tracing::debug!(devices = ?devices, "CUDA backend ready");
        Ok(CudaBackend {
            drv,
            devices,
            state,
            handles: Handles::new(BackendKind::Cuda),
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
        let opened =
            open_device(self.drv, device, state).map_err(|e| self.open_error(device, e))?;
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
        let drv = self.drv;
        let _ctx = bind_ctx(drv, opened.ctx)?;
        let mut stream: CUstream = ptr::null_mut();
        // SAFETY: the device's context is current; `stream` is a valid out-pointer.
        drv.check("cuStreamCreate", unsafe {
            drv.cuStreamCreate(&mut stream, CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        let mut event: CUevent = ptr::null_mut();
        // SAFETY: as above; `event` is a valid out-pointer.
        let made = drv.check("cuEventCreate", unsafe {
            drv.cuEventCreate(&mut event, CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
        });
        if let Err(e) = made {
            // SAFETY: made just above in the current context; nothing else holds it.
            let status = unsafe { drv.cuStreamDestroy_v2(stream) };
            if let Err(undo) = drv.check("cuStreamDestroy", status) {
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
        if !unsafe { self.drv.cuCtxGetCurrent(&mut ctx) }.is_ok() || ctx.is_null() {
            return None;
        }
        let mut dev: CUdevice = 0;
        // SAFETY: a context is current; `dev` is a valid out-pointer.
        if !unsafe { self.drv.cuCtxGetDevice(&mut dev) }.is_ok() {
            return None;
        }
        self.state.iter().position(|s| s.dev == dev)
    }

    /// Makes `device`'s primary context current on this thread (opening the device
    /// first if need be) until the returned guard drops, which puts back whatever was
    /// current before (see [`Bound`]). One thread-local read in the driver when the
    /// context already is current.
    fn bind(&self, device: usize) -> Result<Bound> {
        bind_ctx(self.drv, self.opened(device)?.ctx)
    }

    fn cu_device(&self, device: usize) -> CUdevice {
        self.state[device].dev
    }

    /// `device`'s VMM granularity, after checking the ordinal; `Unsupported` without
    /// VMM, the open error when the device cannot be opened.
    fn vmm_page(&self, device: usize) -> Result<usize> {
        check_device(self, device)?;
        if !self.state[device].vmm {
            return Err(vmm::UNSUPPORTED);
        }
        self.opened(device)?.vmm_granularity.ok_or(vmm::UNSUPPORTED)
    }

    /// Whether device `accessor` can reach memory of device `owner` (peer access,
    /// which `cuMemSetAccess` for another device's memory needs).
    fn can_access_peer(&self, accessor: usize, owner: usize) -> Result<bool> {
        let mut can: c_int = 0;
        // SAFETY: `can` is a valid out-pointer; both handles came from cuDeviceGet.
        self.drv.check("cuDeviceCanAccessPeer", unsafe {
            self.drv.cuDeviceCanAccessPeer(
                &mut can,
                self.cu_device(accessor),
                self.cu_device(owner),
            )
        })?;
        Ok(can != 0)
    }

    /// Free bytes on `device` for an out-of-memory report (0 when even that fails).
    fn free_for_report(&self, device: usize) -> usize {
        use super::Backend;
        self.mem_info(device).map(|m| m.free).unwrap_or(0)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let drv = self.drv;
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
            match bind_ctx(drv, o.ctx) {
                Ok(_ctx) => {
                    // SAFETY: the stream and event were created by us on this context,
                    // which is current; nothing else holds them.
                    let status = unsafe { drv.cuStreamDestroy_v2(stream) };
                    if let Err(e) = drv.check("cuStreamDestroy", status) {
                        tracing::warn!(device, error = %e, "destroying internal copy stream");
                    }
                    // SAFETY: as above.
                    let status = unsafe { drv.cuEventDestroy_v2(event) };
                    if let Err(e) = drv.check("cuEventDestroy", status) {
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
            let status = unsafe { drv.cuDevicePrimaryCtxRelease_v2(dev) };
            if let Err(e) = drv.check("cuDevicePrimaryCtxRelease", status) {
                tracing::warn!(device, error = %e, "releasing primary context");
            }
        }
    }
}
