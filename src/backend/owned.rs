//! Owning wrappers over backend handles: the one place that upholds the contracts of
//! the `unsafe` [`Backend`] methods, so that the layers above need no `unsafe`.
//!
//! - [`OwnedStream`] and [`OwnedEvent`] destroy their handle on drop.
//! - [`OwnedMemory`] frees its memory on drop, and first waits for the fences left by
//!   asynchronous copies that still use it, so a buffer dropped while a copy is in
//!   flight cannot be freed under the DMA engine.
//!
//! Nothing here panics in `Drop`: failures are logged through `tracing`.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::backend::host::HostRegion;
use crate::backend::{Backend, DevicePtr, EventHandle, HostKind, MemRef, StreamHandle};
use crate::error::{Error, Result};
use crate::placement::{Advice, Location};

/// A shared backend.
pub(crate) type SharedBackend = Arc<dyn Backend>;

/// A stream that is destroyed on drop.
#[derive(Debug)]
pub(crate) struct OwnedStream {
    backend: SharedBackend,
    handle: StreamHandle,
    device: usize,
}

impl OwnedStream {
    pub(crate) fn new(backend: &SharedBackend, device: usize) -> Result<Self> {
        let handle = backend.create_stream(device)?;
        Ok(OwnedStream {
            backend: backend.clone(),
            handle,
            device,
        })
    }

    pub(crate) fn handle(&self) -> StreamHandle {
        self.handle
    }

    pub(crate) fn device(&self) -> usize {
        self.device
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        // SAFETY: the handle is live while `self` is, and came from this backend.
        unsafe { self.backend.synchronize_stream(self.handle) }
    }

    /// Records a new event at the stream's tail.
    pub(crate) fn record(&self) -> Result<OwnedEvent> {
        let ev = OwnedEvent::new(&self.backend, self.device)?;
        // SAFETY: both handles are live while their owners are, and from this backend.
        unsafe { self.backend.record_event(ev.handle, self.handle)? };
        Ok(ev)
    }

    /// Makes later work on this stream wait for `event`.
    pub(crate) fn wait(&self, event: &OwnedEvent) -> Result<()> {
        same_backend(&self.backend, &event.backend)?;
        // SAFETY: both handles are live and from this backend (checked above).
        unsafe { self.backend.stream_wait_event(self.handle, event.handle) }
    }
}

impl Drop for OwnedStream {
    fn drop(&mut self) {
        // SAFETY: the handle is live and is never used again after this.
        if let Err(e) = unsafe { self.backend.destroy_stream(self.handle) } {
            tracing::warn!(target: "hetmem", error = %e, "destroying a stream failed");
        }
    }
}

/// An event that is destroyed on drop.
#[derive(Debug)]
pub(crate) struct OwnedEvent {
    backend: SharedBackend,
    handle: EventHandle,
    device: usize,
}

impl OwnedEvent {
    fn new(backend: &SharedBackend, device: usize) -> Result<Self> {
        let handle = backend.create_event(device)?;
        Ok(OwnedEvent {
            backend: backend.clone(),
            handle,
            device,
        })
    }

    pub(crate) fn handle(&self) -> EventHandle {
        self.handle
    }

    pub(crate) fn device(&self) -> usize {
        self.device
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        // SAFETY: the handle is live while `self` is, and came from this backend.
        unsafe { self.backend.synchronize_event(self.handle) }
    }

    pub(crate) fn is_done(&self) -> Result<bool> {
        // SAFETY: the handle is live while `self` is, and came from this backend.
        unsafe { self.backend.event_done(self.handle) }
    }
}

impl Drop for OwnedEvent {
    fn drop(&mut self) {
        // SAFETY: the handle is live and is never used again after this.
        if let Err(e) = unsafe { self.backend.destroy_event(self.handle) } {
            tracing::warn!(target: "hetmem", error = %e, "destroying an event failed");
        }
    }
}

fn same_backend(a: &SharedBackend, b: &SharedBackend) -> Result<()> {
    if Arc::ptr_eq(a, b) {
        Ok(())
    } else {
        Err(Error::ForeignHandle { what: "event" })
    }
}

/// The kinds of memory a buffer can own.
#[derive(Debug)]
pub(crate) enum MemoryKind {
    /// Pageable host memory.
    Host(HostRegion),
    /// Host memory registered with the backend (unregistered before it is unmapped).
    Pinned(HostRegion),
    /// Device memory.
    Device {
        /// Ordinal.
        device: usize,
        /// Address.
        ptr: DevicePtr,
    },
    /// Managed memory.
    Managed {
        /// Ordinal.
        device: usize,
        /// Address (valid on host and device).
        ptr: NonNull<u8>,
    },
}

/// Memory of one buffer, freed on drop after the copies that use it are done.
#[derive(Debug)]
pub(crate) struct OwnedMemory {
    backend: SharedBackend,
    kind: MemoryKind,
    len: usize,
    /// The newest fence per stream that an asynchronous copy left on this memory; a
    /// later copy on the same stream supersedes an earlier one, so this stays as short
    /// as the number of streams in use.
    fences: Mutex<Vec<(StreamHandle, Arc<OwnedEvent>)>>,
}

// SAFETY: the memory is owned by this value and only reached through it; the raw
// pointers it holds are not tied to any thread.
unsafe impl Send for OwnedMemory {}
// SAFETY: shared access only reads the pointer values or goes through the backend,
// which is Sync; the fence list is behind a mutex.
unsafe impl Sync for OwnedMemory {}

impl OwnedMemory {
    pub(crate) fn host(backend: &SharedBackend, region: HostRegion) -> Self {
        Self::wrap(backend, region.len(), MemoryKind::Host(region))
    }

    /// Registers `region` with the backend.
    pub(crate) fn pinned(backend: &SharedBackend, region: HostRegion) -> Result<Self> {
        // SAFETY: the region is mapped and owned by the value returned, which
        // unregisters it before unmapping it (see Drop).
        unsafe { backend.register_host(region.ptr(), region.len())? };
        Ok(Self::wrap(
            backend,
            region.len(),
            MemoryKind::Pinned(region),
        ))
    }

    pub(crate) fn device(backend: &SharedBackend, device: usize, len: usize) -> Result<Self> {
        let ptr = backend.alloc_device(device, len)?;
        Ok(Self::wrap(backend, len, MemoryKind::Device { device, ptr }))
    }

    pub(crate) fn managed(backend: &SharedBackend, device: usize, len: usize) -> Result<Self> {
        let ptr = backend.alloc_managed(device, len)?;
        Ok(Self::wrap(
            backend,
            len,
            MemoryKind::Managed { device, ptr },
        ))
    }

    fn wrap(backend: &SharedBackend, len: usize, kind: MemoryKind) -> Self {
        OwnedMemory {
            backend: backend.clone(),
            kind,
            len,
            fences: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn kind(&self) -> &MemoryKind {
        &self.kind
    }

    /// The host address, for memory the CPU can reach.
    pub(crate) fn host_ptr(&self) -> Option<NonNull<u8>> {
        match &self.kind {
            MemoryKind::Host(r) | MemoryKind::Pinned(r) => Some(r.ptr()),
            MemoryKind::Managed { ptr, .. } => Some(*ptr),
            MemoryKind::Device { .. } => None,
        }
    }

    /// The device address, for device memory.
    pub(crate) fn device_ptr(&self) -> Option<DevicePtr> {
        match &self.kind {
            MemoryKind::Device { ptr, .. } => Some(*ptr),
            MemoryKind::Managed { ptr, .. } => Some(DevicePtr(ptr.as_ptr() as u64)),
            _ => None,
        }
    }

    fn mem_ref(&self, offset: usize) -> MemRef {
        let host = |p: NonNull<u8>, kind| MemRef::Host {
            // SAFETY: callers check offset <= len, so the pointer stays inside the region.
            ptr: unsafe { p.add(offset) },
            kind,
        };
        match &self.kind {
            MemoryKind::Host(r) => host(r.ptr(), HostKind::Pageable),
            MemoryKind::Pinned(r) => host(r.ptr(), HostKind::Pinned),
            MemoryKind::Managed { ptr, .. } => host(*ptr, HostKind::Managed),
            MemoryKind::Device { device, ptr } => MemRef::Device {
                device: *device,
                ptr: ptr.offset(offset),
            },
        }
    }

    /// Blocks until every asynchronous copy that used this memory is done.
    pub(crate) fn wait_fences(&self) -> Result<()> {
        let fences = std::mem::take(&mut *lock(&self.fences));
        let mut first_err = None;
        for (_, f) in &fences {
            if let Err(e) = f.synchronize() {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => {
                // Keep the fences so that drop still waits for them.
                lock(&self.fences).extend(fences);
                Err(e)
            }
        }
    }

    fn add_fence(&self, stream: StreamHandle, fence: &Arc<OwnedEvent>) {
        let mut fences = lock(&self.fences);
        match fences.iter_mut().find(|(s, _)| *s == stream) {
            Some(slot) => slot.1 = fence.clone(),
            None => fences.push((stream, fence.clone())),
        }
    }

    /// Copies `len` bytes: synchronously after all earlier copies that used either
    /// side, or queued on `stream`.
    ///
    /// With a stream the copy is ordered only after the stream's earlier work, as in
    /// CUDA: ordering against other streams is the caller's, with events.
    pub(crate) fn copy(
        dst: &OwnedMemory,
        dst_offset: usize,
        src: &OwnedMemory,
        src_offset: usize,
        len: usize,
        stream: Option<&OwnedStream>,
    ) -> Result<()> {
        check_range(dst_offset, len, dst.len)?;
        check_range(src_offset, len, src.len)?;
        if !Arc::ptr_eq(&dst.backend, &src.backend) {
            return Err(Error::ForeignHandle { what: "buffer" });
        }
        if std::ptr::eq(dst, src) {
            return Err(Error::InvalidArgument(
                "source and destination are the same buffer".into(),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let (d, s) = (dst.mem_ref(dst_offset), src.mem_ref(src_offset));
        match stream {
            None => {
                dst.wait_fences()?;
                src.wait_fences()?;
                // SAFETY: both ranges are bounds-checked and live (borrowed for the
                // call); they are distinct buffers so they do not overlap; the copy is
                // synchronous so nothing outlives the borrow.
                unsafe { dst.backend.copy(d, s, len, None) }
            }
            Some(st) => {
                if !Arc::ptr_eq(&dst.backend, &st.backend) {
                    return Err(Error::ForeignHandle { what: "stream" });
                }
                // SAFETY: as above for the ranges; the fence recorded below makes both
                // buffers wait for this copy before they are freed (Drop), so the memory
                // outlives the copy.
                unsafe { dst.backend.copy(d, s, len, Some(st.handle))? };
                let fence = Arc::new(st.record()?);
                dst.add_fence(st.handle, &fence);
                src.add_fence(st.handle, &fence);
                Ok(())
            }
        }
    }

    /// Queues a migration of managed memory.
    pub(crate) fn prefetch(&self, to: Location, stream: &OwnedStream) -> Result<()> {
        let MemoryKind::Managed { ptr, .. } = &self.kind else {
            return Err(Error::InvalidArgument(
                "prefetch needs a managed buffer".into(),
            ));
        };
        if !Arc::ptr_eq(&self.backend, &stream.backend) {
            return Err(Error::ForeignHandle { what: "stream" });
        }
        // SAFETY: the whole managed allocation is live while `self` is; the stream is live.
        // A migration does not change the bytes, so the memory may be freed after it is
        // queued: the driver orders the free after it.
        unsafe { self.backend.prefetch(*ptr, self.len, to, stream.handle) }
    }

    /// Advises the driver about managed memory.
    pub(crate) fn advise(&self, advice: Advice) -> Result<()> {
        let MemoryKind::Managed { ptr, .. } = &self.kind else {
            return Err(Error::InvalidArgument(
                "advise needs a managed buffer".into(),
            ));
        };
        // SAFETY: the whole managed allocation is live while `self` is.
        unsafe { self.backend.advise(*ptr, self.len, advice) }
    }

    /// The bytes, for memory the CPU can reach, after pending copies are done.
    pub(crate) fn host_slice(&self) -> Result<&[u8]> {
        let ptr = self.host_ptr().ok_or_else(|| {
            Error::InvalidArgument("device memory cannot be read by the CPU directly".into())
        })?;
        self.wait_fences()?;
        // SAFETY: the region is live and `len` bytes long while `self` is borrowed; no
        // copy writes into it from here on because writes take `&mut` (the Buffer API)
        // and the pending ones were waited for above.
        Ok(unsafe { std::slice::from_raw_parts(ptr.as_ptr(), self.len) })
    }

    /// The bytes, mutable, for memory the CPU can reach, after pending copies are done.
    pub(crate) fn host_slice_mut(&mut self) -> Result<&mut [u8]> {
        let ptr = self.host_ptr().ok_or_else(|| {
            Error::InvalidArgument("device memory cannot be written by the CPU directly".into())
        })?;
        self.wait_fences()?;
        // SAFETY: as in `host_slice`, and `&mut self` rules out any other reference.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), self.len) })
    }
}

impl Drop for OwnedMemory {
    fn drop(&mut self) {
        if let Err(e) = self.wait_fences() {
            // Freeing memory a copy may still use is worse than leaking it.
            tracing::error!(target: "hetmem", error = %e, len = self.len,
                "waiting for copies before free failed; leaking the buffer");
            if let MemoryKind::Host(r) | MemoryKind::Pinned(r) = &mut self.kind {
                r.leak();
            }
            return;
        }
        let res = match &mut self.kind {
            MemoryKind::Host(_) => Ok(()),
            MemoryKind::Pinned(r) => {
                // SAFETY: registered in `pinned` with this pointer and length; the copies
                // that used it are done.
                let res = unsafe { self.backend.unregister_host(r.ptr(), r.len()) };
                if res.is_err() {
                    // Unmapping pages the driver still has locked would leave it holding
                    // dangling pages; leak them instead.
                    r.leak();
                }
                res
            }
            // SAFETY: allocated by this backend with this device and length; the copies
            // that used it are done; never freed twice (this is the only free).
            MemoryKind::Device { device, ptr } => unsafe {
                self.backend.free_device(*device, *ptr, self.len)
            },
            // SAFETY: as for device memory.
            MemoryKind::Managed { device, ptr } => unsafe {
                self.backend.free_managed(*device, *ptr, self.len)
            },
        };
        if let Err(e) = res {
            tracing::error!(target: "hetmem", error = %e, len = self.len, "freeing a buffer failed");
        }
    }
}

fn check_range(offset: usize, len: usize, size: usize) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfBounds { offset, len, size }),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
