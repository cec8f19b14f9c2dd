//! The [`Backend`] implementation: every method binds the device's context, then
//! makes its driver calls (see the module docs for contexts, copies and special
//! streams).

use std::any::Any;
use std::ptr::{self, NonNull};

use hetmem_sys::cuda::types::{
    self, CUdevice, CUdeviceptr, CUevent, CUevent_flags, CUmemAccessDesc, CUmemAttach_flags,
    CUmemGenericAllocationHandle, CUmemLocation, CUmemLocationType, CUmem_advise, CUstream,
    CUstream_flags,
};
use hetmem_sys::cuda::{CaptureStatus, Status};

use super::vmm::{access_desc, allocation_prop, check_vmm_addr};
use super::CudaBackend;
use crate::backend::registered::{
    for_each_piece, PieceRegistrar, PieceResult, Refusal, Registrations,
};
use crate::backend::{
    check_copy_stream, check_device, check_vmm_size, raw_stream, Backend, BackendKind, DeviceInfo,
    DevicePtr, EventHandle, MemInfo, MemRef, PhysHandle, StreamHandle, LEGACY_STREAM,
};
use crate::error::{Error, Result};
use crate::host_mem::available_memory;
use crate::placement::{Advice, Location, MemKind};

impl PieceRegistrar for CudaBackend {
    fn registrations(&self) -> &Registrations {
        &self.registered
    }

    /// # Safety
    /// As [`PieceRegistrar::register_piece`].
    unsafe fn register_piece(&self, piece: *mut u8, n: usize, len: usize) -> PieceResult {
        // SAFETY: the caller guarantees piece..piece+n is mapped host memory it owns.
        let status = unsafe {
            self.drv
                .cuMemHostRegister_v2(piece.cast(), n, types::CU_MEMHOSTREGISTER_PORTABLE)
        };
        match status {
            Status::SUCCESS => Ok(()),
            // The driver could not pin the pages: out of pinned memory, as the host
            // backend reports an mlock refused for RLIMIT_MEMLOCK, so that callers (the
            // host pool's give-back-and-retry) see the tier and the numbers.
            Status::OUT_OF_MEMORY => Err(Refusal::Final(Error::oom(
                MemKind::Pinned,
                len,
                available_memory(),
            ))),
            // Overlapping another registration: no smaller piece helps.
            Status::ALREADY_REGISTERED => {
                Err(Refusal::Final(self.drv.error("cuMemHostRegister", status)))
            }
            other => Err(Refusal::Size(self.drv.error("cuMemHostRegister", other))),
        }
    }

    /// # Safety
    /// As [`PieceRegistrar::unregister_piece`].
    unsafe fn unregister_piece(&self, piece: *mut u8) -> Result<()> {
        // SAFETY: the caller guarantees `piece` starts one of our registrations; the
        // driver only looks the address up.
        self.drv.check("cuMemHostUnregister", unsafe {
            self.drv.cuMemHostUnregister(piece.cast())
        })
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
        self.drv.check("cuMemGetInfo", unsafe {
            self.drv.cuMemGetInfo_v2(&mut free, &mut total)
        })?;
        Ok(MemInfo { free, total })
    }

    fn alloc_device(&self, device: usize, size: usize) -> Result<DevicePtr> {
        check_device(self, device)?;
        check_size(size)?;
        let _ctx = self.bind(device)?;
        let mut dptr: CUdeviceptr = 0;
        // SAFETY: the device's context is current; `dptr` is a valid out-pointer.
        match unsafe { self.drv.cuMemAlloc_v2(&mut dptr, size) } {
            Status::SUCCESS => Ok(DevicePtr(dptr)),
            Status::OUT_OF_MEMORY => Err(Error::oom(
                MemKind::Device(device),
                size,
                self.free_for_report(device),
            )),
            other => Err(self.drv.error("cuMemAlloc", other)),
        }
    }

    /// # Safety
    /// As [`Backend::free_device`].
    unsafe fn free_device(&self, device: usize, ptr: DevicePtr, _size: usize) -> Result<()> {
        check_device(self, device)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees `ptr` came from alloc_device on this backend,
        // is not freed and no queued work uses it.
        self.drv
            .check("cuMemFree", unsafe { self.drv.cuMemFree_v2(ptr.0) })
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
            self.drv.cuMemAllocManaged(
                &mut dptr,
                size,
                CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL as u32,
            )
        };
        match status {
            Status::SUCCESS => {
                let p: *mut u8 = ptr::with_exposed_provenance_mut(dptr as usize);
                NonNull::new(p).ok_or_else(|| self.drv.error("cuMemAllocManaged", Status::UNKNOWN))
            }
            Status::OUT_OF_MEMORY => Err(Error::oom(
                MemKind::Managed(device),
                size,
                self.free_for_report(device),
            )),
            other => Err(self.drv.error("cuMemAllocManaged", other)),
        }
    }

    /// # Safety
    /// As [`Backend::free_managed`].
    unsafe fn free_managed(&self, device: usize, ptr: NonNull<u8>, _size: usize) -> Result<()> {
        check_device(self, device)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees `ptr` came from alloc_managed on this backend,
        // is not freed and no queued work uses it; managed memory is freed with cuMemFree.
        self.drv.check("cuMemFree", unsafe {
            self.drv.cuMemFree_v2(host_addr(ptr))
        })
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
        // SAFETY: the caller's contract, as this method's.
        unsafe { self.register_pieces(ptr, len) }
    }

    /// # Safety
    /// As [`Backend::unregister_host`].
    ///
    /// Undoes exactly the pieces `register_host` registered in the range (recorded as
    /// they succeeded, so also when it had to split them).
    unsafe fn unregister_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        check_size(len)?;
        let _ctx = self.bind(self.host_device()?)?;
        // SAFETY: the caller's contract, as this method's.
        unsafe { self.unregister_pieces(ptr, len) }
    }

    fn create_stream(&self, device: usize) -> Result<StreamHandle> {
        check_device(self, device)?;
        let _ctx = self.bind(device)?;
        let mut stream: CUstream = ptr::null_mut();
        // SAFETY: the device's context is current; `stream` is a valid out-pointer.
        self.drv.check("cuStreamCreate", unsafe {
            self.drv
                .cuStreamCreate(&mut stream, CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        let handle = StreamHandle(stream.expose_provenance() as u64);
        self.handles.add_stream(handle, device);
        Ok(handle)
    }

    /// # Safety
    /// As [`Backend::destroy_stream`].
    unsafe fn destroy_stream(&self, stream: StreamHandle) -> Result<()> {
        self.handles.destroy_stream(stream, |device| {
            let _ctx = self.bind(device)?;
            // SAFETY: the caller guarantees the stream is live, ours and not used again;
            // cuStreamDestroy lets queued work finish first.
            self.drv.check("cuStreamDestroy", unsafe {
                self.drv.cuStreamDestroy_v2(stream_ptr(stream))
            })
        })
    }

    /// # Safety
    /// As [`Backend::import_stream`]. 0 and 1 are the legacy default stream of
    /// `device`'s primary context, 2 the calling thread's per-thread default stream of it
    /// (every call binds that context before it uses the handle, and passes 2 on: the
    /// driver picks the thread's stream).
    unsafe fn import_stream(&self, device: usize, raw: u64) -> Result<StreamHandle> {
        self.handles.import(self, device, raw)
    }

    /// # Safety
    /// As [`Backend::forget_stream`].
    unsafe fn forget_stream(&self, stream: StreamHandle) -> Result<()> {
        self.handles.forget(stream)
    }

    /// # Safety
    /// As [`Backend::synchronize_stream`].
    unsafe fn synchronize_stream(&self, stream: StreamHandle) -> Result<()> {
        let device = self.handles.stream_device(stream)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees the stream is live and ours.
        self.drv.check("cuStreamSynchronize", unsafe {
            self.drv.cuStreamSynchronize(stream_ptr(stream))
        })
    }

    fn synchronize_device(&self, device: usize) -> Result<()> {
        check_device(self, device)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the device's primary context is current; the call takes no arguments.
        self.drv
            .check("cuCtxSynchronize", unsafe { self.drv.cuCtxSynchronize() })
    }

    fn create_event(&self, device: usize) -> Result<EventHandle> {
        check_device(self, device)?;
        let _ctx = self.bind(device)?;
        let mut event: CUevent = ptr::null_mut();
        // SAFETY: the device's context is current; `event` is a valid out-pointer.
        self.drv.check("cuEventCreate", unsafe {
            self.drv
                .cuEventCreate(&mut event, CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
        })?;
        let handle = EventHandle(event.expose_provenance() as u64);
        self.handles.add_event(handle, device);
        Ok(handle)
    }

    /// # Safety
    /// As [`Backend::destroy_event`].
    unsafe fn destroy_event(&self, event: EventHandle) -> Result<()> {
        self.handles.destroy_event(event, |device| {
            let _ctx = self.bind(device)?;
            // SAFETY: the caller guarantees the event is live, ours and not used again.
            self.drv.check("cuEventDestroy", unsafe {
                self.drv.cuEventDestroy_v2(event_ptr(event))
            })
        })
    }

    /// # Safety
    /// As [`Backend::record_event`].
    unsafe fn record_event(&self, event: EventHandle, stream: StreamHandle) -> Result<()> {
        let event_device = self.handles.event_device(event)?;
        let stream_device = self.handles.stream_device(stream)?;
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
        self.drv.check("cuEventRecord", unsafe {
            self.drv.cuEventRecord(event_ptr(event), stream_ptr(stream))
        })
    }

    /// # Safety
    /// As [`Backend::stream_wait_event`].
    unsafe fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()> {
        self.handles.event_device(event)?;
        let device = self.handles.stream_device(stream)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees both handles are live and ours; waiting on an
        // event from another device's context is allowed.
        self.drv.check("cuStreamWaitEvent", unsafe {
            self.drv
                .cuStreamWaitEvent(stream_ptr(stream), event_ptr(event), 0)
        })
    }

    /// # Safety
    /// As [`Backend::synchronize_event`].
    unsafe fn synchronize_event(&self, event: EventHandle) -> Result<()> {
        let device = self.handles.event_device(event)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees the event is live and ours.
        self.drv.check("cuEventSynchronize", unsafe {
            self.drv.cuEventSynchronize(event_ptr(event))
        })
    }

    /// # Safety
    /// As [`Backend::event_done`].
    unsafe fn event_done(&self, event: EventHandle) -> Result<bool> {
        let device = self.handles.event_device(event)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees the event is live and ours.
        match unsafe { self.drv.cuEventQuery(event_ptr(event)) } {
            Status::SUCCESS => Ok(true),
            Status::NOT_READY => Ok(false),
            other => Err(self.drv.error("cuEventQuery", other)),
        }
    }

    /// # Safety
    /// As [`Backend::is_capturing`]. `cuStreamIsCapturing` exists unchanged in every
    /// driver from 10.0 to 13 (the capture-info calls do not: CUDA 13 removed
    /// `cuStreamGetCaptureInfo_v2`).
    unsafe fn is_capturing(&self, stream: StreamHandle) -> Result<bool> {
        let device = self.handles.stream_device(stream)?;
        let _ctx = self.bind(device)?;
        let mut status: CaptureStatus = 0;
        // SAFETY: the caller guarantees the stream is live and ours; `status` is a
        // valid out-pointer (CUstreamCaptureStatus is a C enum, read as its u32).
        self.drv.check("cuStreamIsCapturing", unsafe {
            self.drv
                .cuStreamIsCapturing(stream_ptr(stream), &mut status)
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
                let device = self.handles.stream_device(s)?;
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
            self.drv.check("cuEventRecord", unsafe {
                self.drv.cuEventRecord(event, legacy)
            })?;
            // SAFETY: the internal stream and the event are ours, of this context.
            self.drv.check("cuStreamWaitEvent", unsafe {
                self.drv.cuStreamWaitEvent(cu_stream, event, 0)
            })?;
        }
        let queued = match (dst_dev, src_dev) {
            (Some(dd), Some(sd)) if dd != sd => {
                // Both devices' contexts take part: both must be open.
                let (dst_ctx, src_ctx) = (self.opened(dd)?.ctx, self.opened(sd)?.ctx);
                // SAFETY: the caller guarantees both ranges are valid device memory of
                // these devices for `len` bytes until the copy is done, and the stream
                // (ours or the live one given) is valid; both contexts are retained.
                self.drv.check("cuMemcpyPeerAsync", unsafe {
                    self.drv
                        .cuMemcpyPeerAsync(dst_addr, dst_ctx, src_addr, src_ctx, len, cu_stream)
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
                        self.drv.check("cuMemcpyAsync", unsafe {
                            self.drv
                                .cuMemcpyAsync(dst_addr + off, src_addr + off, n, cu_stream)
                        })
                    },
                )
            }
        };
        if stream.is_none() {
            // Also when a later piece failed: the earlier ones are queued and must be
            // done before the caller's memory is let go.
            // SAFETY: the internal copy stream lives as long as `self`.
            let done = self.drv.check("cuStreamSynchronize", unsafe {
                self.drv.cuStreamSynchronize(cu_stream)
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
        let device = self.handles.stream_device(stream)?;
        if len == 0 {
            return Ok(());
        }
        let _ctx = self.bind(device)?;
        let location = mem_location(to, |d| self.cu_device(d));
        // SAFETY: the caller guarantees ptr..ptr+len is managed memory from this
        // backend and the stream is live and ours.
        self.drv.check("cuMemPrefetchAsync", unsafe {
            self.drv
                .cuMemPrefetchAsync_v2(host_addr(ptr), len, location, 0, stream_ptr(stream))
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
        self.drv.check("cuMemAdvise", unsafe {
            self.drv
                .cuMemAdvise_v2(host_addr(ptr), len, cu_advice, location)
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
        self.drv.check("cuMemAddressReserve", unsafe {
            self.drv.cuMemAddressReserve(&mut dptr, size, page, 0, 0)
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
        self.drv.check("cuMemAddressFree", unsafe {
            self.drv.cuMemAddressFree(ptr.0, size)
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
        match unsafe { self.drv.cuMemCreate(&mut handle, size, &prop, 0) } {
            Status::SUCCESS => Ok(PhysHandle(handle)),
            Status::OUT_OF_MEMORY => Err(Error::oom(
                MemKind::Device(device),
                size,
                self.free_for_report(device),
            )),
            other => Err(self.drv.error("cuMemCreate", other)),
        }
    }

    /// # Safety
    /// As [`Backend::release_physical`].
    unsafe fn release_physical(&self, device: usize, handle: PhysHandle) -> Result<()> {
        self.vmm_page(device)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees `handle` came from create_physical on this
        // device, is live and not mapped (so this frees the memory at once).
        self.drv
            .check("cuMemRelease", unsafe { self.drv.cuMemRelease(handle.0) })
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
        match unsafe { self.drv.cuMemMap(ptr.0, size, 0, handle.0, 0) } {
            Status::SUCCESS => Ok(()),
            // Page tables are device memory too: the pool gives back cache and retries.
            Status::OUT_OF_MEMORY => Err(Error::oom(
                MemKind::Device(device),
                size,
                self.free_for_report(device),
            )),
            other => Err(self.drv.error("cuMemMap", other)),
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
        self.drv.check("cuMemSetAccess", unsafe {
            self.drv
                .cuMemSetAccess(ptr.0, size, descs.as_ptr(), descs.len())
        })
    }

    /// # Safety
    /// As [`Backend::unmap`].
    unsafe fn unmap(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        self.vmm_page(device)?;
        let _ctx = self.bind(device)?;
        // SAFETY: the caller guarantees the range is exactly one earlier map on this
        // device and no queued work uses it.
        self.drv
            .check("cuMemUnmap", unsafe { self.drv.cuMemUnmap(ptr.0, size) })
    }

    fn as_any(&self) -> &dyn Any {
        self
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

fn stream_ptr(handle: StreamHandle) -> CUstream {
    ptr::with_exposed_provenance_mut(raw_stream(handle) as usize)
}

fn event_ptr(handle: EventHandle) -> CUevent {
    ptr::with_exposed_provenance_mut(handle.0 as usize)
}

fn host_addr(ptr: NonNull<u8>) -> CUdeviceptr {
    ptr.as_ptr().expose_provenance() as CUdeviceptr
}

pub(super) fn check_size(size: usize) -> Result<()> {
    if size == 0 {
        Err(Error::InvalidSize {
            requested: 0,
            reason: "size must be greater than zero",
        })
    } else {
        Ok(())
    }
}
