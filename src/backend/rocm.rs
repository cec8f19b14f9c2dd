//! AMD GPUs through the HIP runtime (`libamdhip64.so`), loaded at run time.
//!
//! Nothing is linked at build time: [`RocmBackend::new`] opens the library through
//! [`hetmem_sys::hip::HipRuntime`] (the name in `HETMEM_HIP_LIBRARY`, else
//! `libamdhip64.so`, `.so.5`, `.so.6`), resolves every entry point, calls `hipInit` and
//! enumerates the devices. Any failure on that path (no library, a missing symbol,
//! `hipInit` failing, no device) is [`Error::BackendUnavailable`], so that automatic
//! selection can fall back to another backend; failures of later calls are
//! [`Error::Driver`] with HIP's own message.
//!
//! HIP keeps a *current device* per thread, and allocations, streams and events belong
//! to the device current when they are made. Since the backend may be called from any
//! thread, every call that depends on it sets the device first (`hipSetDevice` is a
//! cheap thread-local store in the runtime). Streams and events remember their device
//! in a map, keyed by handle; an entry leaves the map *before* the runtime destroys
//! the handle (and comes back if that fails), because the runtime may hand the same
//! value out again to a concurrent create at once.
//!
//! A copy on a stream must be queued on a stream of the device it touches (either
//! device, for a copy between two), as in the simulator; anything else is refused with
//! [`Error::InvalidArgument`] before the runtime is called. A copy with no stream is
//! `hipMemcpy` on the device it touches: ordered on that device's null stream, so after
//! the work queued before it on the null stream and the blocking streams (the
//! per-thread streams included), not after hetmem's streams, which are
//! `hipStreamNonBlocking` (as [`Backend::copy`] says for every backend).
//!
//! Special streams, as the CUDA backend takes them: 0 is the null stream of a device
//! (one for all threads), 2 (`hipStreamPerThread`) the per-thread stream of the thread
//! making each call.
//!
//! Status: the whole path is exercised against a fake HIP runtime
//! (`tests/fake_hip/fake_hip.c`) and the loader against ROCm 5.2's real
//! `libamdhip64.so` (which answers `hipErrorNoDevice` without a GPU); it has not run
//! on AMD hardware.

use std::any::Any;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Mutex;

use hetmem_sys::hip::{self, hipError_t, HipApi, HipLoadError, HipRuntime};

use super::registered::{for_each_piece, Registrations};
use super::{
    check_copy_stream, check_device, lock, normalize_pci_bus_id, raw_stream, register_chunks,
    Backend, BackendKind, DeviceInfo, DevicePtr, EventHandle, ForeignStreams, MemInfo, MemRef,
    RollbackError, StreamHandle,
};
use crate::error::{Error, Result};
use crate::placement::{Advice, Location, Tier};

/// Largest range registered with one `hipHostRegister` call; longer ranges are
/// registered in pieces of this size. The same value as every backend's host
/// registration chunk, kept public for tests that register more than one chunk.
pub const REGISTER_CHUNK: usize = super::HOST_REGISTER_CHUNK;

/// The `call` of the [`Error::Driver`] that [`Backend::register_host`] returns when a
/// chunk failed to register *and* undoing the chunks registered before it failed too.
/// Part of the range then stays registered with the runtime, so the caller must not
/// unmap (or otherwise give back) the memory: it has to leak the region. The error's
/// `code` is that of the failed `hipHostUnregister`, and its `message` names the
/// original failure and contains `"rollback failed; region leaked"`.
pub const REGISTER_ROLLBACK_CALL: &str = "hipHostRegister(rollback)";

/// The ROCm backend: one loaded HIP runtime and the devices it reported.
#[derive(Debug)]
pub struct RocmBackend {
    rt: HipRuntime,
    devices: Vec<DeviceInfo>,
    runtime_version: i32,
    /// Live streams (handle value) → device ordinal.
    streams: Mutex<HashMap<u64, usize>>,
    /// Streams the caller made and lent us ([`Backend::import_stream`]).
    foreign: ForeignStreams,
    /// Live events (handle value) → device ordinal.
    events: Mutex<HashMap<u64, usize>>,
    /// Our host registrations, one per `hipHostRegister` call: copies are cut at their
    /// edges (see [`super::registered`]).
    registered: Registrations,
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: BackendKind::Rocm,
        reason: reason.into(),
    }
}

fn load_error(e: HipLoadError) -> Error {
    unavailable(e.to_string())
}

/// Reads a NUL-terminated string out of a buffer the runtime filled.
fn string_from_buf(buf: &mut [c_char]) -> String {
    if let Some(last) = buf.last_mut() {
        *last = 0;
    }
    // SAFETY: the buffer is NUL-terminated (its last element was just set to 0) and
    // lives for the duration of the borrow.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The runtime's value for a stream handle (see [`raw_stream`]).
fn hip_stream(stream: StreamHandle) -> hip::hipStream_t {
    raw_stream(stream) as usize as hip::hipStream_t
}

fn unknown_stream(stream: StreamHandle) -> Error {
    Error::InvalidArgument(format!("unknown ROCm stream {:#x}", stream.0))
}

fn unknown_event(event: EventHandle) -> Error {
    Error::InvalidArgument(format!("unknown ROCm event {:#x}", event.0))
}

fn ordinal(device: usize) -> c_int {
    // Device ordinals are checked against the device list (from a c_int count) first.
    c_int::try_from(device).unwrap_or(c_int::MAX)
}

impl RocmBackend {
    /// Loads the HIP runtime from its default names (or `HETMEM_HIP_LIBRARY`).
    pub fn new() -> Result<Self> {
        Self::from_runtime(HipRuntime::load_default().map_err(load_error)?)
    }

    /// Loads the HIP runtime from `path` (a path, or a bare name the loader searches).
    ///
    /// Loading runs the library's initialisers, and every later call trusts that its
    /// exported symbols have HIP's C signatures. This is safe to call by a deliberate,
    /// documented exception (see [`HipRuntime::load`]): the same trust as a library
    /// found through `LD_LIBRARY_PATH`, or cudarc's dynamic loading of `libcuda`. Pass
    /// only a HIP runtime (or a test double honouring the same signatures); the same
    /// holds for [`RocmBackend::new`] and the `HETMEM_HIP_LIBRARY` variable.
    pub fn with_library(path: &Path) -> Result<Self> {
        Self::from_runtime(HipRuntime::load(path).map_err(load_error)?)
    }

    fn from_runtime(rt: HipRuntime) -> Result<Self> {
        let api = rt.api();
        let describe = |call: &str, code: hipError_t| {
            format!(
                "{call} failed with code {code}: {} (library {})",
                rt.error_string(code),
                rt.library_name()
            )
        };
        // SAFETY: hipInit takes flags by value; 0 is the only documented value.
        let code = unsafe { api.hipInit(0) };
        if code != hip::hipSuccess {
            return Err(unavailable(describe("hipInit", code)));
        }
        let mut count: c_int = 0;
        // SAFETY: `count` is a valid, writable c_int.
        let code = unsafe { api.hipGetDeviceCount(&mut count) };
        if code == hip::hipErrorNoDevice || (code == hip::hipSuccess && count <= 0) {
            return Err(unavailable(format!(
                "no HIP device found (library {})",
                rt.library_name()
            )));
        }
        if code != hip::hipSuccess {
            return Err(unavailable(describe("hipGetDeviceCount", code)));
        }
        let mut runtime_version: c_int = 0;
        // SAFETY: `runtime_version` is a valid, writable c_int.
        let code = unsafe { api.hipRuntimeGetVersion(&mut runtime_version) };
        if code != hip::hipSuccess {
            tracing::debug!(code, "hipRuntimeGetVersion failed");
            runtime_version = 0;
        }

        let mut devices = Vec::with_capacity(count as usize);
        for index in 0..count {
            let mut dev: hip::hipDevice_t = 0;
            // SAFETY: `dev` is writable; `index` is below the reported device count.
            let code = unsafe { api.hipDeviceGet(&mut dev, index) };
            if code != hip::hipSuccess {
                return Err(unavailable(describe("hipDeviceGet", code)));
            }

            let mut name_buf: [c_char; 256] = [0; 256];
            // SAFETY: the buffer is writable for the length passed.
            let code = unsafe {
                api.hipDeviceGetName(name_buf.as_mut_ptr(), name_buf.len() as c_int, dev)
            };
            if code != hip::hipSuccess {
                return Err(unavailable(describe("hipDeviceGetName", code)));
            }
            let name = string_from_buf(&mut name_buf);

            let mut total: usize = 0;
            // SAFETY: `total` is a valid, writable size_t.
            let code = unsafe { api.hipDeviceTotalMem(&mut total, dev) };
            if code != hip::hipSuccess {
                return Err(unavailable(describe("hipDeviceTotalMem", code)));
            }

            let mut pci_buf: [c_char; 64] = [0; 64];
            // SAFETY: the buffer is writable for the length passed.
            let code = unsafe {
                api.hipDeviceGetPCIBusId(pci_buf.as_mut_ptr(), pci_buf.len() as c_int, index)
            };
            let pci_bus_id = if code == hip::hipSuccess {
                let raw = string_from_buf(&mut pci_buf);
                let id = normalize_pci_bus_id(&raw);
                if id.is_none() {
                    tracing::warn!(device = index, raw, "unparsable HIP PCI bus id");
                }
                id
            } else {
                tracing::debug!(device = index, code, "hipDeviceGetPCIBusId failed");
                None
            };

            let mut managed: c_int = 0;
            // SAFETY: `managed` is a valid, writable c_int; the attribute is a known one.
            let code = unsafe {
                api.hipDeviceGetAttribute(&mut managed, hip::hipDeviceAttributeManagedMemory, index)
            };
            if code != hip::hipSuccess {
                tracing::debug!(
                    device = index,
                    code,
                    "managed-memory attribute query failed"
                );
                managed = 0;
            }

            devices.push(DeviceInfo {
                ordinal: index as usize,
                name,
                total_memory: total,
                pci_bus_id,
                managed_memory: managed != 0,
            });
        }
        tracing::debug!(
            library = rt.library_name(),
            runtime_version,
            devices = devices.len(),
            "ROCm backend ready"
        );
        Ok(RocmBackend {
            rt,
            devices,
            runtime_version,
            streams: Mutex::new(HashMap::new()),
            foreign: ForeignStreams::default(),
            events: Mutex::new(HashMap::new()),
            registered: Registrations::default(),
        })
    }

    /// The version `hipRuntimeGetVersion` reported (0 where it failed).
    pub fn runtime_version(&self) -> i32 {
        self.runtime_version
    }

    /// The name or path the HIP library was loaded from.
    pub fn library_name(&self) -> &str {
        self.rt.library_name()
    }

    fn api(&self) -> &HipApi {
        self.rt.api()
    }

    /// The one mapping from a failed HIP call to hetmem's error.
    fn driver_error(&self, call: &'static str, code: hipError_t) -> Error {
        Error::Driver {
            backend: BackendKind::Rocm,
            call,
            code,
            message: self.rt.error_string(code),
        }
    }

    /// `Ok` for `hipSuccess`, else [`RocmBackend::driver_error`].
    fn check(&self, call: &'static str, code: hipError_t) -> Result<()> {
        if code == hip::hipSuccess {
            Ok(())
        } else {
            Err(self.driver_error(call, code))
        }
    }

    /// Checks the ordinal and makes `device` current on this thread.
    fn set_device(&self, device: usize) -> Result<()> {
        check_device(self, device)?;
        // SAFETY: hipSetDevice takes an ordinal by value; it was checked above.
        let code = unsafe { self.api().hipSetDevice(ordinal(device)) };
        self.check("hipSetDevice", code)
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

    fn free_bytes(&self, device: usize) -> usize {
        self.mem_info(device).map(|m| m.free).unwrap_or(0)
    }

    /// Maps an allocation failure: out-of-memory carries the numbers, the rest is a
    /// driver error.
    fn alloc_error(
        &self,
        call: &'static str,
        code: hipError_t,
        tier: Tier,
        device: usize,
        size: usize,
    ) -> Error {
        if code == hip::hipErrorOutOfMemory {
            Error::oom(tier, size, self.free_bytes(device))
        } else {
            self.driver_error(call, code)
        }
    }

    fn null_result(call: &'static str) -> Error {
        Error::Driver {
            backend: BackendKind::Rocm,
            call,
            code: hip::hipSuccess,
            message: "succeeded but returned a null pointer".into(),
        }
    }

    fn mem_ref_ptr(&self, m: MemRef) -> Result<*mut c_void> {
        match m {
            MemRef::Host { ptr, .. } => Ok(ptr.as_ptr().cast()),
            MemRef::Device { device, ptr } => {
                check_device(self, device)?;
                Ok(ptr.0 as usize as *mut c_void)
            }
        }
    }

    fn unregister_chunks(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        let mut first_err = None;
        for (offset, _) in register_chunks(len) {
            // SAFETY: offset < len, so the address stays inside the caller's range.
            let chunk = unsafe { ptr.as_ptr().add(offset) };
            // SAFETY: the chunk start was registered by `register_host` (the caller's
            // contract), and the runtime only looks the address up.
            let code = unsafe { self.api().hipHostUnregister(chunk.cast()) };
            if code == hip::hipSuccess {
                self.registered.remove(chunk as usize);
            }
            if let Err(e) = self.check("hipHostUnregister", code) {
                tracing::warn!(?chunk, error = %e, "unregistering a chunk failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// The error of a registration whose failure could not be undone: see
/// [`REGISTER_ROLLBACK_CALL`].
const ROLLBACK: RollbackError = RollbackError {
    backend: BackendKind::Rocm,
    call: REGISTER_ROLLBACK_CALL,
    unknown_code: hip::hipErrorUnknown,
};

impl Drop for RocmBackend {
    fn drop(&mut self) {
        let streams = lock(&self.streams).len();
        let events = lock(&self.events).len();
        if streams + events > 0 {
            tracing::warn!(
                streams,
                events,
                "ROCm backend dropped with live streams or events"
            );
        }
    }
}

impl Backend for RocmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Rocm
    }

    fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    fn mem_info(&self, device: usize) -> Result<MemInfo> {
        self.set_device(device)?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both out-pointers are valid, writable size_t's.
        let code = unsafe { self.api().hipMemGetInfo(&mut free, &mut total) };
        self.check("hipMemGetInfo", code)?;
        Ok(MemInfo { free, total })
    }

    fn alloc_device(&self, device: usize, size: usize) -> Result<DevicePtr> {
        if size == 0 {
            return Err(Error::InvalidSize {
                requested: size,
                reason: "device allocations must not be empty",
            });
        }
        self.set_device(device)?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer; the size is nonzero.
        let code = unsafe { self.api().hipMalloc(&mut ptr, size) };
        if code != hip::hipSuccess {
            return Err(self.alloc_error("hipMalloc", code, Tier::Device(device), device, size));
        }
        if ptr.is_null() {
            return Err(Self::null_result("hipMalloc"));
        }
        Ok(DevicePtr(ptr as usize as u64))
    }

    unsafe fn free_device(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        let _ = size;
        self.set_device(device)?;
        // SAFETY: the caller guarantees `ptr` came from hipMalloc on this backend, is
        // live, and no queued work uses it.
        let code = unsafe { self.api().hipFree(ptr.0 as usize as *mut c_void) };
        self.check("hipFree", code)
    }

    fn alloc_managed(&self, device: usize, size: usize) -> Result<NonNull<u8>> {
        if size == 0 {
            return Err(Error::InvalidSize {
                requested: size,
                reason: "managed allocations must not be empty",
            });
        }
        check_device(self, device)?;
        if !self.devices[device].managed_memory {
            return Err(Error::Unsupported {
                backend: BackendKind::Rocm,
                what: "managed memory on a device without hipDeviceAttributeManagedMemory",
            });
        }
        self.set_device(device)?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer; the size is nonzero; the flag is valid.
        let code = unsafe {
            self.api()
                .hipMallocManaged(&mut ptr, size, hip::hipMemAttachGlobal)
        };
        if code != hip::hipSuccess {
            return Err(self.alloc_error(
                "hipMallocManaged",
                code,
                Tier::Managed(device),
                device,
                size,
            ));
        }
        NonNull::new(ptr.cast::<u8>()).ok_or_else(|| Self::null_result("hipMallocManaged"))
    }

    unsafe fn free_managed(&self, device: usize, ptr: NonNull<u8>, size: usize) -> Result<()> {
        let _ = size;
        self.set_device(device)?;
        // SAFETY: the caller guarantees `ptr` came from hipMallocManaged on this backend,
        // is live, and no queued work uses it.
        let code = unsafe { self.api().hipFree(ptr.as_ptr().cast()) };
        self.check("hipFree", code)
    }

    unsafe fn register_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        if len == 0 {
            return Err(Error::InvalidSize {
                requested: len,
                reason: "cannot register an empty range",
            });
        }
        for (offset, chunk_len) in register_chunks(len) {
            // SAFETY: offset < len, so the address stays inside the caller's range.
            let chunk = unsafe { ptr.as_ptr().add(offset) };
            // SAFETY: chunk..chunk+chunk_len lies in mapped memory the caller owns and
            // keeps mapped until it is unregistered (the caller's contract).
            let code = unsafe {
                self.api()
                    .hipHostRegister(chunk.cast(), chunk_len, hip::hipHostRegisterPortable)
            };
            if let Err(e) = self.check("hipHostRegister", code) {
                if offset > 0 {
                    // Undo the chunks already registered, so that failure leaves nothing.
                    if let Err(undo) = self.unregister_chunks(ptr, offset) {
                        tracing::error!(
                            error = %undo,
                            "undoing a partial registration failed; the region leaks"
                        );
                        return Err(ROLLBACK.error(&e, &undo, ptr, len, offset));
                    }
                }
                return Err(e);
            }
            self.registered.insert(chunk as usize, chunk_len);
        }
        Ok(())
    }

    unsafe fn unregister_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        if len == 0 {
            return Err(Error::InvalidSize {
                requested: len,
                reason: "cannot unregister an empty range",
            });
        }
        self.unregister_chunks(ptr, len)
    }

    fn create_stream(&self, device: usize) -> Result<StreamHandle> {
        self.set_device(device)?;
        let mut stream: hip::hipStream_t = std::ptr::null_mut();
        // SAFETY: `stream` is a valid out-pointer; the flag is valid.
        let code = unsafe {
            self.api()
                .hipStreamCreateWithFlags(&mut stream, hip::hipStreamNonBlocking)
        };
        self.check("hipStreamCreateWithFlags", code)?;
        if stream.is_null() {
            return Err(Self::null_result("hipStreamCreateWithFlags"));
        }
        let handle = stream as usize as u64;
        lock(&self.streams).insert(handle, device);
        Ok(StreamHandle(handle))
    }

    unsafe fn destroy_stream(&self, stream: StreamHandle) -> Result<()> {
        // Out of the map first: once the runtime has destroyed the stream, a concurrent
        // create may get the same handle value back and insert it, and a remove after
        // that would delete the new stream's entry.
        let device = lock(&self.streams)
            .remove(&stream.0)
            .ok_or_else(|| unknown_stream(stream))?;
        let result = self.set_device(device).and_then(|()| {
            // SAFETY: the handle was in our map, so it came from hipStreamCreateWithFlags
            // and has not been destroyed; the caller does not use it afterwards.
            let code = unsafe { self.api().hipStreamDestroy(hip_stream(stream)) };
            self.check("hipStreamDestroy", code)
        });
        if result.is_err() {
            // Not destroyed, so the value cannot have been handed out again: keep it.
            lock(&self.streams).insert(stream.0, device);
        }
        result
    }

    /// 0 is the null stream of `device`, 2 (`hipStreamPerThread`) the calling thread's
    /// per-thread stream of it (every call makes the stream's device current before it
    /// uses the handle, and passes 2 on: the runtime picks the thread's stream).
    unsafe fn import_stream(&self, device: usize, raw: u64) -> Result<StreamHandle> {
        check_device(self, device)?;
        self.foreign.import(device, raw)
    }

    unsafe fn forget_stream(&self, stream: StreamHandle) -> Result<()> {
        self.foreign.forget(stream)
    }

    unsafe fn synchronize_stream(&self, stream: StreamHandle) -> Result<()> {
        let device = self.stream_device(stream)?;
        self.set_device(device)?;
        // SAFETY: the handle is in our maps, so it is a live stream of this runtime (one
        // we made, or one the caller lent us and keeps live: import_stream's contract).
        let code = unsafe { self.api().hipStreamSynchronize(hip_stream(stream)) };
        self.check("hipStreamSynchronize", code)
    }

    /// `hipStreamIsCapturing`: active and invalidated captures both count.
    unsafe fn is_capturing(&self, stream: StreamHandle) -> Result<bool> {
        let device = self.stream_device(stream)?;
        self.set_device(device)?;
        let mut status: hip::hipStreamCaptureStatus = hip::hipStreamCaptureStatusNone;
        // SAFETY: the handle is in our maps, so it is a live stream of this runtime (as
        // in synchronize_stream); `status` is a valid out-pointer.
        let code = unsafe {
            self.api()
                .hipStreamIsCapturing(hip_stream(stream), &mut status)
        };
        self.check("hipStreamIsCapturing", code)?;
        Ok(status != hip::hipStreamCaptureStatusNone)
    }

    fn synchronize_device(&self, device: usize) -> Result<()> {
        check_device(self, device)?;
        self.set_device(device)?;
        // SAFETY: takes no arguments; acts on the current device, set just above.
        let code = unsafe { self.api().hipDeviceSynchronize() };
        self.check("hipDeviceSynchronize", code)
    }

    fn create_event(&self, device: usize) -> Result<EventHandle> {
        self.set_device(device)?;
        let mut event: hip::hipEvent_t = std::ptr::null_mut();
        // SAFETY: `event` is a valid out-pointer; the flag is valid.
        let code = unsafe {
            self.api()
                .hipEventCreateWithFlags(&mut event, hip::hipEventDisableTiming)
        };
        self.check("hipEventCreateWithFlags", code)?;
        if event.is_null() {
            return Err(Self::null_result("hipEventCreateWithFlags"));
        }
        let handle = event as usize as u64;
        lock(&self.events).insert(handle, device);
        Ok(EventHandle(handle))
    }

    unsafe fn destroy_event(&self, event: EventHandle) -> Result<()> {
        // Out of the map first, as in `destroy_stream`: the runtime may hand the value
        // out again as soon as the event is destroyed.
        let device = lock(&self.events)
            .remove(&event.0)
            .ok_or_else(|| unknown_event(event))?;
        let result = self.set_device(device).and_then(|()| {
            // SAFETY: the handle was in our map, so it came from hipEventCreateWithFlags
            // and has not been destroyed; the caller does not use it afterwards.
            let code = unsafe {
                self.api()
                    .hipEventDestroy(event.0 as usize as hip::hipEvent_t)
            };
            self.check("hipEventDestroy", code)
        });
        if result.is_err() {
            // Not destroyed, so the value cannot have been handed out again: keep it.
            lock(&self.events).insert(event.0, device);
        }
        result
    }

    unsafe fn record_event(&self, event: EventHandle, stream: StreamHandle) -> Result<()> {
        self.event_device(event)?;
        let device = self.stream_device(stream)?;
        self.set_device(device)?;
        // SAFETY: both handles are in our maps, so both are live objects of this runtime
        // (an imported stream is kept live by the caller: import_stream's contract).
        let code = unsafe {
            self.api()
                .hipEventRecord(event.0 as usize as hip::hipEvent_t, hip_stream(stream))
        };
        self.check("hipEventRecord", code)
    }

    unsafe fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()> {
        self.event_device(event)?;
        let device = self.stream_device(stream)?;
        self.set_device(device)?;
        // SAFETY: both handles are in our maps, so both are live objects of this
        // runtime; flags must be 0.
        let code = unsafe {
            self.api().hipStreamWaitEvent(
                hip_stream(stream),
                event.0 as usize as hip::hipEvent_t,
                0,
            )
        };
        self.check("hipStreamWaitEvent", code)
    }

    unsafe fn synchronize_event(&self, event: EventHandle) -> Result<()> {
        let device = self.event_device(event)?;
        self.set_device(device)?;
        // SAFETY: the handle is in our map, so it is a live event of this runtime.
        let code = unsafe {
            self.api()
                .hipEventSynchronize(event.0 as usize as hip::hipEvent_t)
        };
        self.check("hipEventSynchronize", code)
    }

    unsafe fn event_done(&self, event: EventHandle) -> Result<bool> {
        let device = self.event_device(event)?;
        self.set_device(device)?;
        // SAFETY: the handle is in our map, so it is a live event of this runtime.
        let code = unsafe {
            self.api()
                .hipEventQuery(event.0 as usize as hip::hipEvent_t)
        };
        match code {
            hip::hipSuccess => Ok(true),
            hip::hipErrorNotReady => Ok(false),
            other => self.check("hipEventQuery", other).map(|()| false),
        }
    }

    unsafe fn copy(
        &self,
        dst: MemRef,
        src: MemRef,
        len: usize,
        stream: Option<StreamHandle>,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let dst_ptr = self.mem_ref_ptr(dst)?;
        let src_ptr = self.mem_ref_ptr(src)?.cast_const();
        let host_side = |m: MemRef, p: usize| matches!(m, MemRef::Host { .. }).then_some(p);
        let (dst_host, src_host) = (
            host_side(dst, dst_ptr as usize),
            host_side(src, src_ptr as usize),
        );
        match stream {
            Some(stream) => {
                let device = self.stream_device(stream)?;
                check_copy_stream(&dst, &src, device)?;
                self.set_device(device)?;
                // A host side may span several of our registrations: one copy each.
                for_each_piece(&self.registered, dst_host, src_host, len, |off, n| {
                    // SAFETY: both ranges are valid for `len` bytes, disjoint, and stay
                    // valid until the stream passes the copy (the caller's contract);
                    // off + n <= len. The stream is in our map, so it is live.
                    let code = unsafe {
                        self.api().hipMemcpyAsync(
                            dst_ptr.byte_add(off),
                            src_ptr.byte_add(off),
                            n,
                            hip::hipMemcpyDefault,
                            hip_stream(stream),
                        )
                    };
                    self.check("hipMemcpyAsync", code)
                })
            }
            None => {
                // hipMemcpy runs on the current device's null stream: make it the device
                // the copy touches.
                let device = match (dst, src) {
                    (MemRef::Device { device, .. }, _) | (_, MemRef::Device { device, .. }) => {
                        Some(device)
                    }
                    _ => None,
                };
                if let Some(device) = device {
                    self.set_device(device)?;
                }
                for_each_piece(&self.registered, dst_host, src_host, len, |off, n| {
                    // SAFETY: both ranges are valid for `len` bytes and disjoint (the
                    // caller's contract), off + n <= len; the copy is complete when the
                    // call returns.
                    let code = unsafe {
                        self.api().hipMemcpy(
                            dst_ptr.byte_add(off),
                            src_ptr.byte_add(off),
                            n,
                            hip::hipMemcpyDefault,
                        )
                    };
                    self.check("hipMemcpy", code)
                })
            }
        }
    }

    unsafe fn prefetch(
        &self,
        ptr: NonNull<u8>,
        len: usize,
        to: Location,
        stream: StreamHandle,
    ) -> Result<()> {
        let target = match to {
            Location::Host => hip::hipCpuDeviceId,
            Location::Device(d) => {
                check_device(self, d)?;
                ordinal(d)
            }
        };
        let device = self.stream_device(stream)?;
        self.set_device(device)?;
        // SAFETY: the range lies in managed memory from this backend and the stream is
        // live (the caller's contract; the stream is also in our map).
        let code = unsafe {
            self.api().hipMemPrefetchAsync(
                ptr.as_ptr().cast_const().cast(),
                len,
                target,
                hip_stream(stream),
            )
        };
        self.check("hipMemPrefetchAsync", code)
    }

    unsafe fn advise(&self, ptr: NonNull<u8>, len: usize, advice: Advice) -> Result<()> {
        let location = |l: Location| -> Result<c_int> {
            match l {
                Location::Host => Ok(hip::hipCpuDeviceId),
                Location::Device(d) => check_device(self, d).map(|()| ordinal(d)),
            }
        };
        // The device argument is ignored for read-mostly and for unsetting the
        // preferred location; HIP still validates it, so pass device 0, which exists.
        let (value, device) = match advice {
            Advice::SetReadMostly => (hip::hipMemAdviseSetReadMostly, 0),
            Advice::UnsetReadMostly => (hip::hipMemAdviseUnsetReadMostly, 0),
            Advice::SetPreferredLocation(l) => {
                (hip::hipMemAdviseSetPreferredLocation, location(l)?)
            }
            Advice::UnsetPreferredLocation => (hip::hipMemAdviseUnsetPreferredLocation, 0),
            Advice::SetAccessedBy(d) => (
                hip::hipMemAdviseSetAccessedBy,
                location(Location::Device(d))?,
            ),
            Advice::UnsetAccessedBy(d) => (
                hip::hipMemAdviseUnsetAccessedBy,
                location(Location::Device(d))?,
            ),
        };
        // SAFETY: the range lies in managed memory from this backend (the caller's
        // contract); advice and device are valid values.
        let code = unsafe {
            self.api()
                .hipMemAdvise(ptr.as_ptr().cast_const().cast(), len, value, device)
        };
        self.check("hipMemAdvise", code)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
