//! [`OwnedMemory`]: memory of any kind that frees itself on drop, after the copies
//! that still use it, and pinned host memory registered in parallel pieces.

use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use super::copy::{check_range, CopyEnd, Fences};
use super::sync::{OwnedStream, SharedBackend};
use crate::backend::registered::is_rollback_failure;
use crate::backend::{DevicePtr, HostKind, MemRef};
use crate::error::{Error, Result};
use crate::host_mem::HostRegion;
use crate::placement::{Advice, Location};

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
    /// Left by asynchronous copies; drop waits for them.
    fences: Fences,
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

    /// Registers `region` with the backend, after advising it `MADV_DONTFORK`
    /// ([`HostRegion::exclude_from_fork`]) so that a fork never copies it. Registration
    /// is undone only right before the region is unmapped (drop, or a failure here), so
    /// the advice is never taken back.
    pub(crate) fn pinned(backend: &SharedBackend, region: HostRegion) -> Result<Self> {
        let mut region = region;
        // Before registering: a fork between the two then never sees pinned pages.
        region.exclude_from_fork();
        // SAFETY: the region is mapped and owned by the value returned, which
        // unregisters it before unmapping it (see Drop); on failure it is unmapped only
        // if the backend says nothing of it stayed registered.
        if let Err(e) = unsafe { backend.register_host(region.ptr(), region.len()) } {
            if is_rollback_failure(&e) {
                // Part of it is still registered with the driver: leak it.
                region.leak();
            }
            return Err(e);
        }
        Ok(Self::wrap(
            backend,
            region.len(),
            MemoryKind::Pinned(region),
        ))
    }

    /// Registers `region` with the backend in pieces of at most `chunk` bytes (clamped
    /// to whole pages and to [`HOST_REGISTER_CHUNK`](crate::backend::registered::HOST_REGISTER_CHUNK)),
    /// each its own registration, from up to `threads` threads at once. Pinning is
    /// per-page work in the driver (or kernel, for `mlock`), so large regions pin
    /// faster in parallel. The pieces are remembered in the region and unregistered
    /// one by one on drop. If any piece fails, the pieces already registered are
    /// unregistered again before the error is returned; if that fails too, the region
    /// is leaked (a driver still holds part of it).
    pub(crate) fn pinned_chunked(
        backend: &SharedBackend,
        region: HostRegion,
        chunk: usize,
        threads: usize,
    ) -> Result<Self> {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        let page = crate::host_mem::page_size();
        let chunk = chunk
            .clamp(page, crate::backend::registered::HOST_REGISTER_CHUNK)
            .next_multiple_of(page)
            .min(crate::backend::registered::HOST_REGISTER_CHUNK);
        let len = region.len();
        if len <= chunk {
            return Self::pinned(backend, region);
        }
        let mut region = region;
        // As in `pinned`: out of forked children before any piece is pinned.
        region.exclude_from_fork();
        let pieces: Vec<(usize, usize)> = (0..len)
            .step_by(chunk)
            .map(|off| (off, chunk.min(len - off)))
            .collect();
        let registered: Vec<AtomicBool> = pieces.iter().map(|_| AtomicBool::new(false)).collect();
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let failure: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
        // `HostRegion` is Sync (a pointer and lengths); the pointer itself is not.
        let shared_region = &region;
        let partly_registered = AtomicBool::new(false);
        let work = || {
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(off, n)) = pieces.get(i) else {
                    return;
                };
                // SAFETY: `off < len`, so the piece starts inside the region, which is
                // mapped and owned by the value returned (or rolled back below), and
                // pieces do not overlap; `register_host` gets `n <= len - off` bytes.
                let res = unsafe { backend.register_host(shared_region.ptr().add(off), n) };
                match res {
                    Ok(()) => registered[i].store(true, Ordering::Release),
                    Err(e) => {
                        // Any piece the backend could not roll back leaves pages
                        // registered: remember it even if another error is reported.
                        if is_rollback_failure(&e) {
                            partly_registered.store(true, Ordering::Release);
                        }
                        stop.store(true, Ordering::Relaxed);
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        return;
                    }
                }
            }
        };
        let threads = threads.clamp(1, pieces.len());
        // The calling thread works too, so a thread that cannot be spawned (a thread or
        // pids limit) only means fewer helpers; and a panic anywhere in here is caught,
        // so the pieces already registered are rolled back below instead of the region
        // being unmapped under the driver's registrations while unwinding.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::thread::scope(|s| {
                for _ in 1..threads {
                    if std::thread::Builder::new().spawn_scoped(s, work).is_err() {
                        break;
                    }
                }
                work();
            })
        }));
        if ran.is_err() {
            stop.store(true, Ordering::Relaxed);
            failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(Error::InvalidArgument(
                    "a panic while registering host memory in pieces".into(),
                ));
        }
        let failure = failure.into_inner().unwrap_or_else(|p| p.into_inner());
        let Some(err) = failure else {
            region.set_register_chunk(chunk);
            return Ok(Self::wrap(backend, len, MemoryKind::Pinned(region)));
        };
        // Roll back: unregister every piece that did register.
        let mut leak = partly_registered.load(Ordering::Acquire);
        for (i, &(off, n)) in pieces.iter().enumerate() {
            if !registered[i].load(Ordering::Acquire) {
                continue;
            }
            // SAFETY: this piece was registered above with this start and length, and
            // nothing has used the memory since.
            if let Err(undo) = unsafe { backend.unregister_host(region.ptr().add(off), n) } {
                tracing::error!(target: "hetmem", error = %undo, offset = off,
                    "rolling back a chunked host registration failed; the region leaks");
                leak = true;
            }
        }
        if leak {
            region.leak();
        }
        Err(err)
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
            fences: Fences::default(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
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

    /// The NUMA node of each sampled page (see [`HostRegion::page_nodes`]), for host
    /// and pinned memory.
    pub(crate) fn page_nodes(&self) -> Result<Vec<i32>> {
        self.backend.check_fork()?;
        match &self.kind {
            MemoryKind::Host(r) | MemoryKind::Pinned(r) => r.page_nodes(),
            _ => Err(Error::InvalidArgument(
                "page placement is known for host and pinned memory only".into(),
            )),
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
        self.backend.check_fork()?;
        self.fences.wait()
    }

    /// Whether a copy may still use this memory without a fence to wait for: it must
    /// then never be reused or freed (drop leaks it).
    pub(crate) fn must_leak(&self) -> bool {
        self.fences.must_leak()
    }

    /// Copies `data` to `offset`, synchronously, after the copies pending on this memory.
    pub(crate) fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        check_range(offset, data.len(), self.len)?;
        let Some(host) = NonNull::new(data.as_ptr().cast_mut()) else {
            return Ok(());
        };
        self.wait_fences()?;
        let src = MemRef::Host {
            ptr: host,
            kind: HostKind::Pageable,
        };
        // SAFETY: the range is inside this live allocation (checked), `data` is valid for
        // its length and only read, the copy is synchronous.
        unsafe {
            self.backend
                .copy(self.mem_ref(offset), src, data.len(), None)
        }
    }

    /// Copies `out.len()` bytes from `offset`, synchronously, after pending copies.
    pub(crate) fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        check_range(offset, out.len(), self.len)?;
        let Some(host) = NonNull::new(out.as_mut_ptr()) else {
            return Ok(());
        };
        self.wait_fences()?;
        let dst = MemRef::Host {
            ptr: host,
            kind: HostKind::Pageable,
        };
        // SAFETY: as in `write_at`; `out` is exclusively borrowed for the copy.
        unsafe {
            self.backend
                .copy(dst, self.mem_ref(offset), out.len(), None)
        }
    }

    /// Queues a migration of managed memory.
    pub(crate) fn prefetch(&self, to: Location, stream: &OwnedStream) -> Result<()> {
        let MemoryKind::Managed { ptr, .. } = &self.kind else {
            return Err(Error::InvalidArgument(
                "prefetch needs a managed buffer".into(),
            ));
        };
        if !std::sync::Arc::ptr_eq(&self.backend, stream.backend()) {
            return Err(Error::ForeignHandle { what: "stream" });
        }
        // SAFETY: the whole managed allocation is live while `self` is; the stream is live.
        // A migration does not change the bytes, so the memory may be freed after it is
        // queued: the driver orders the free after it.
        unsafe { self.backend.prefetch(*ptr, self.len, to, stream.handle()) }
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
        // In a forked child a pinned region is not even mapped.
        self.backend.check_fork()?;
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
        self.backend.check_fork()?;
        let ptr = self.host_ptr().ok_or_else(|| {
            Error::InvalidArgument("device memory cannot be written by the CPU directly".into())
        })?;
        self.wait_fences()?;
        // SAFETY: as in `host_slice`, and `&mut self` rules out any other reference.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), self.len) })
    }
}

impl CopyEnd for OwnedMemory {
    fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    fn end(&self, offset: usize, len: usize) -> Result<MemRef> {
        check_range(offset, len, self.len)?;
        Ok(self.mem_ref(offset))
    }

    fn fences(&self) -> &Fences {
        &self.fences
    }
}

impl Drop for OwnedMemory {
    fn drop(&mut self) {
        if self.backend.check_fork().is_err() {
            // A forked child: the memory is the parent's. A region advised
            // MADV_DONTFORK is not mapped here and its drop leaves it alone; an
            // inherited one (pageable) is only the child's copy, unmapped by its drop.
            return;
        }
        let waited = if self.fences.must_leak() {
            Err(Error::Unfenced { what: "buffer" })
        } else {
            self.wait_fences()
        };
        if let Err(e) = waited {
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
                let res = if r.register_chunk() == 0 {
                    // SAFETY: registered in `pinned` with this pointer and length; the
                    // copies that used it are done.
                    unsafe { self.backend.unregister_host(r.ptr(), r.len()) }
                } else {
                    // Registered piece by piece in `pinned_chunked`: undo each piece.
                    let (len, chunk) = (r.len(), r.register_chunk());
                    let mut first = Ok(());
                    for off in (0..len).step_by(chunk) {
                        // SAFETY: this piece was registered in `pinned_chunked` with this
                        // start and length; the copies that used it are done.
                        let piece = unsafe {
                            self.backend
                                .unregister_host(r.ptr().add(off), chunk.min(len - off))
                        };
                        if first.is_ok() {
                            first = piece;
                        }
                    }
                    first
                };
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
