//! The [`Backend`] implementation: every call that depends on the current device sets
//! it first (see the module docs).

use std::any::Any;
use std::ffi::{c_int, c_void};
use std::ptr::NonNull;

use hetmem_sys::hip;

use super::{ordinal, RocmBackend};
use crate::backend::registered::{
    for_each_piece, PieceRegistrar, PieceResult, Refusal, Registrations,
};
use crate::backend::{
    check_copy_stream, check_device, raw_stream, Backend, BackendKind, DeviceInfo, DevicePtr,
    EventHandle, MemInfo, MemRef, StreamHandle,
};
use crate::error::{Error, Result};
use crate::placement::{Advice, Location, MemKind};

/// The runtime's value for a stream handle (see [`raw_stream`]).
fn hip_stream(stream: StreamHandle) -> hip::hipStream_t {
    raw_stream(stream) as usize as hip::hipStream_t
}

/// The runtime's value for an event handle.
fn hip_event(event: EventHandle) -> hip::hipEvent_t {
    event.0 as usize as hip::hipEvent_t
}

impl Backend for RocmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Rocm
    }

    fn as_any(&self) -> &dyn Any {
        self
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
            return Err(self.alloc_error("hipMalloc", code, MemKind::Device(device), device, size));
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
                MemKind::Managed(device),
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
        // SAFETY: the caller's contract, as this method's.
        unsafe { self.register_pieces(ptr, len) }
    }

    unsafe fn unregister_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        if len == 0 {
            return Err(Error::InvalidSize {
                requested: len,
                reason: "cannot unregister an empty range",
            });
        }
        // SAFETY: the caller's contract, as this method's.
        unsafe { self.unregister_pieces(ptr, len) }
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
        let handle = StreamHandle(stream as usize as u64);
        self.handles.add_stream(handle, device);
        Ok(handle)
    }

    unsafe fn destroy_stream(&self, stream: StreamHandle) -> Result<()> {
        self.handles.destroy_stream(stream, |device| {
            self.set_device(device)?;
            // SAFETY: the handle was in our table, so it came from
            // hipStreamCreateWithFlags and has not been destroyed; the caller does not
            // use it afterwards.
            let code = unsafe { self.api().hipStreamDestroy(hip_stream(stream)) };
            self.check("hipStreamDestroy", code)
        })
    }

    unsafe fn synchronize_stream(&self, stream: StreamHandle) -> Result<()> {
        let device = self.handles.stream_device(stream)?;
        self.set_device(device)?;
        // SAFETY: the handle is in our maps, so it is a live stream of this runtime (one
        // we made, or one the caller lent us and keeps live: import_stream's contract).
        let code = unsafe { self.api().hipStreamSynchronize(hip_stream(stream)) };
        self.check("hipStreamSynchronize", code)
    }

    /// `hipStreamIsCapturing`: active and invalidated captures both count.
    unsafe fn is_capturing(&self, stream: StreamHandle) -> Result<bool> {
        let device = self.handles.stream_device(stream)?;
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

    /// 0 is the null stream of `device`, 2 (`hipStreamPerThread`) the calling thread's
    /// per-thread stream of it (every call makes the stream's device current before it
    /// uses the handle, and passes 2 on: the runtime picks the thread's stream).
    unsafe fn import_stream(&self, device: usize, raw: u64) -> Result<StreamHandle> {
        self.handles.import(self, device, raw)
    }

    unsafe fn forget_stream(&self, stream: StreamHandle) -> Result<()> {
        self.handles.forget(stream)
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
        let handle = EventHandle(event as usize as u64);
        self.handles.add_event(handle, device);
        Ok(handle)
    }

    unsafe fn destroy_event(&self, event: EventHandle) -> Result<()> {
        self.handles.destroy_event(event, |device| {
            self.set_device(device)?;
            // SAFETY: the handle was in our table, so it came from
            // hipEventCreateWithFlags and has not been destroyed; the caller does not use
            // it afterwards.
            let code = unsafe { self.api().hipEventDestroy(hip_event(event)) };
            self.check("hipEventDestroy", code)
        })
    }

    unsafe fn record_event(&self, event: EventHandle, stream: StreamHandle) -> Result<()> {
        self.handles.event_device(event)?;
        let device = self.handles.stream_device(stream)?;
        self.set_device(device)?;
        // SAFETY: both handles are in our maps, so both are live objects of this runtime
        // (an imported stream is kept live by the caller: import_stream's contract).
        let code = unsafe {
            self.api()
                .hipEventRecord(hip_event(event), hip_stream(stream))
        };
        self.check("hipEventRecord", code)
    }

    unsafe fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()> {
        self.handles.event_device(event)?;
        let device = self.handles.stream_device(stream)?;
        self.set_device(device)?;
        // SAFETY: both handles are in our maps, so both are live objects of this
        // runtime; flags must be 0.
        let code = unsafe {
            self.api()
                .hipStreamWaitEvent(hip_stream(stream), hip_event(event), 0)
        };
        self.check("hipStreamWaitEvent", code)
    }

    unsafe fn synchronize_event(&self, event: EventHandle) -> Result<()> {
        let device = self.handles.event_device(event)?;
        self.set_device(device)?;
        // SAFETY: the handle is in our map, so it is a live event of this runtime.
        let code = unsafe { self.api().hipEventSynchronize(hip_event(event)) };
        self.check("hipEventSynchronize", code)
    }

    unsafe fn event_done(&self, event: EventHandle) -> Result<bool> {
        let device = self.handles.event_device(event)?;
        self.set_device(device)?;
        // SAFETY: the handle is in our map, so it is a live event of this runtime.
        let code = unsafe { self.api().hipEventQuery(hip_event(event)) };
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
                let device = self.handles.stream_device(stream)?;
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
        let device = self.handles.stream_device(stream)?;
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
}

impl PieceRegistrar for RocmBackend {
    fn registrations(&self) -> &Registrations {
        &self.registered
    }

    /// Every refusal is final: HIP pieces are never split smaller.
    ///
    /// # Safety
    /// As [`PieceRegistrar::register_piece`].
    unsafe fn register_piece(&self, piece: *mut u8, n: usize, _len: usize) -> PieceResult {
        // SAFETY: the caller guarantees piece..piece+n is mapped host memory it owns and
        // keeps mapped until it is unregistered.
        let code = unsafe {
            self.api()
                .hipHostRegister(piece.cast(), n, hip::hipHostRegisterPortable)
        };
        self.check("hipHostRegister", code).map_err(Refusal::Final)
    }

    /// # Safety
    /// As [`PieceRegistrar::unregister_piece`].
    unsafe fn unregister_piece(&self, piece: *mut u8) -> Result<()> {
        // SAFETY: the caller guarantees `piece` starts one of our registrations; the
        // runtime only looks the address up.
        let code = unsafe { self.api().hipHostUnregister(piece.cast()) };
        self.check("hipHostUnregister", code)
    }
}
