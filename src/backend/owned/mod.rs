//! Owning wrappers over backend handles: the one place that upholds the contracts of
//! the `unsafe` [`Backend`] methods, so that the layers above need no `unsafe`.
//!
//! - [`OwnedStream`] and [`OwnedEvent`] destroy their handle on drop.
//! - [`OwnedMemory`] frees its memory on drop, and first waits for the fences left by
//!   asynchronous copies that still use it, so a buffer dropped while a copy is in
//!   flight cannot be freed under the DMA engine.
//!
//! Nothing here panics in `Drop`: failures are logged through `tracing`. In a `fork()`ed
//! child (see `backend::fork`) drops make no driver call and log nothing: what the value
//! owns belongs to the parent's driver state, and is leaked.

mod vmm;

pub(crate) use vmm::{PhysChunk, VmmRegion};

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustc_hash::FxHashMap;

use crate::backend::copy::{self, check_range, CopyEnd, Fences};
use crate::backend::host::HostRegion;
use crate::backend::{
    lock, thread_key, Backend, DevicePtr, EventHandle, HostKind, MemRef, StreamHandle,
    PER_THREAD_STREAM,
};
use crate::error::{Error, Result};
use crate::placement::{Advice, Location};

/// A shared backend.
pub(crate) type SharedBackend = Arc<dyn Backend>;

/// A stream that is destroyed on drop, or (imported from the caller) forgotten once
/// nothing uses the import any more.
///
/// The per-thread default stream ([`PER_THREAD_STREAM`]) is one handle but a different
/// stream on each thread: every driver call with it acts on the calling thread's. What
/// hetmem keys by stream (a pool's blocks, the fences of copies) must keep the threads
/// apart, so the stream imported from it hands out a *view* per thread
/// ([`OwnedStream::this_thread`]): the same handle, an id of its own, and the thread it
/// stands for. A view does its driver calls on that thread only; from another one, what
/// would reach the wrong thread's stream is refused ([`Error::InvalidArgument`]), and
/// [`OwnedStream::synchronize`] waits for the whole device instead.
#[derive(Debug)]
pub(crate) struct OwnedStream {
    backend: SharedBackend,
    handle: StreamHandle,
    device: usize,
    /// Events of the stream's device kept for reuse (fences, hand-overs).
    events: Arc<EventCache>,
    /// Made by us (destroyed on drop) or imported (never destroyed).
    owned: bool,
    /// For an imported stream: forgets the import when the last holder (the stream and
    /// its per-thread views) lets go.
    import: Option<Arc<Import>>,
    /// For a per-thread view: the thread ([`thread_key`]) whose per-thread default
    /// stream it stands for.
    thread: Option<u64>,
    /// For the per-thread default stream: its view for each thread that used it.
    views: Option<Mutex<FxHashMap<u64, Arc<OwnedStream>>>>,
    /// Unique for the life of the process, unlike the driver's handle, which a driver
    /// may hand out again once this stream is destroyed.
    id: u64,
    /// The value the caller knows the stream by: the raw value it was imported from
    /// (0 for a default stream), else the driver's own.
    raw: u64,
}

/// An import of a caller's stream, forgotten on drop.
#[derive(Debug)]
struct Import {
    backend: SharedBackend,
    handle: StreamHandle,
}

impl Drop for Import {
    fn drop(&mut self) {
        // SAFETY: the handle came from import_stream on this backend, is forgotten once
        // (here, when the last stream or view holding the import lets go) and never
        // used again.
        if let Err(e) = unsafe { self.backend.forget_stream(self.handle) } {
            tracing::warn!(target: "hetmem", error = %e, "forgetting an imported stream failed");
        }
    }
}

static NEXT_STREAM_ID: AtomicU64 = AtomicU64::new(1);

fn next_stream_id() -> u64 {
    NEXT_STREAM_ID.fetch_add(1, Ordering::Relaxed)
}

/// The stream to act on for the calling thread ([`OwnedStream::this_thread`]): the
/// stream itself, or its view for this thread.
#[derive(Debug)]
pub(crate) enum ThisThread<'a> {
    /// Not a per-thread stream: the same on every thread.
    Same(&'a OwnedStream),
    /// The calling thread's view of a per-thread stream.
    View(Arc<OwnedStream>),
}

impl std::ops::Deref for ThisThread<'_> {
    type Target = OwnedStream;
    fn deref(&self) -> &OwnedStream {
        match self {
            ThisThread::Same(s) => s,
            ThisThread::View(v) => v,
        }
    }
}

/// Per-thread views nothing else holds are pruned when their number reaches this, and
/// each power of two above it: a program that starts a thread per request would
/// otherwise keep a view for every thread it ever ran.
const VIEWS_PRUNE_AT: usize = 64;

impl OwnedStream {
    pub(crate) fn new(backend: &SharedBackend, device: usize) -> Result<Self> {
        let handle = backend.create_stream(device)?;
        Ok(OwnedStream {
            backend: backend.clone(),
            handle,
            device,
            events: EventCache::new(backend, device),
            owned: true,
            import: None,
            thread: None,
            views: None,
            id: next_stream_id(),
            raw: crate::backend::raw_stream(handle),
        })
    }

    /// Imports a stream the caller made ([`Backend::import_stream`]); it is forgotten,
    /// never destroyed, once this stream and its views are dropped. [`PER_THREAD_STREAM`]
    /// gives a stream with a view per thread ([`OwnedStream::this_thread`]).
    ///
    /// # Safety
    /// As [`Backend::import_stream`]: `raw` is 0 or a live stream of `device` from the
    /// backend's driver, and stays live as long as the value returned.
    pub(crate) unsafe fn import(backend: &SharedBackend, device: usize, raw: u64) -> Result<Self> {
        // SAFETY: the caller's contract is import_stream's.
        let handle = unsafe { backend.import_stream(device, raw)? };
        Ok(OwnedStream {
            backend: backend.clone(),
            handle,
            device,
            events: EventCache::new(backend, device),
            owned: false,
            import: Some(Arc::new(Import {
                backend: backend.clone(),
                handle,
            })),
            thread: None,
            views: (raw == PER_THREAD_STREAM).then(|| Mutex::new(FxHashMap::default())),
            id: next_stream_id(),
            raw,
        })
    }

    /// Whether drop destroys the stream (false for imported streams).
    pub(crate) fn is_owned(&self) -> bool {
        self.owned
    }

    /// A process-unique id (driver handles can be reused after destruction).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The stream the calling thread's work goes to: this stream, or, for the
    /// per-thread default stream, this thread's view of it (made at its first use).
    pub(crate) fn this_thread(&self) -> ThisThread<'_> {
        let Some(views) = &self.views else {
            return ThisThread::Same(self);
        };
        let thread = thread_key();
        let mut views = lock(views);
        if let Some(v) = views.get(&thread) {
            return ThisThread::View(v.clone());
        }
        if views.len() >= VIEWS_PRUNE_AT && views.len().is_power_of_two() {
            // Views nothing else holds (no pool block, no fence keeps them) can go: a
            // thread that comes back gets a new one, a new stream to the pools.
            views.retain(|_, v| Arc::strong_count(v) > 1);
        }
        let view = Arc::new(OwnedStream {
            backend: self.backend.clone(),
            handle: self.handle,
            device: self.device,
            events: self.events.clone(),
            owned: false,
            import: self.import.clone(),
            thread: Some(thread),
            views: None,
            id: next_stream_id(),
            raw: self.raw,
        });
        views.insert(thread, view.clone());
        ThisThread::View(view)
    }

    /// Whether any of this stream's per-thread views is held outside the stream
    /// (by a pool that keeps memory freed on it, a fence).
    pub(crate) fn views_in_use(&self) -> bool {
        self.views
            .as_ref()
            .is_some_and(|v| lock(v).values().any(|v| Arc::strong_count(v) > 1))
    }

    /// For a per-thread view: the thread ([`thread_key`]) whose stream it is.
    pub(crate) fn thread(&self) -> Option<u64> {
        self.thread
    }

    /// Whether driver calls with this stream's handle from the calling thread reach this
    /// stream: always, except for a per-thread view on another thread than its own.
    pub(crate) fn reachable(&self) -> bool {
        self.thread.is_none_or(|t| t == thread_key())
    }

    fn check_reachable(&self, what: &str) -> Result<()> {
        if self.reachable() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "cannot {what} another thread's per-thread default stream (device {})",
                self.device
            )))
        }
    }

    pub(crate) fn handle(&self) -> StreamHandle {
        self.handle
    }

    /// The value the caller knows the stream by (the raw value it was imported from).
    pub(crate) fn raw(&self) -> u64 {
        self.raw
    }

    pub(crate) fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    pub(crate) fn device(&self) -> usize {
        self.device
    }

    /// Waits for the work queued on the stream so far. For another thread's per-thread
    /// stream, which no call from here can name, it waits for the whole device.
    pub(crate) fn synchronize(&self) -> Result<()> {
        if !self.reachable() {
            tracing::debug!(target: "hetmem", device = self.device,
                "synchronising the device for another thread's per-thread stream");
            return self.backend.synchronize_device(self.device);
        }
        // SAFETY: the handle is live while `self` is, and came from this backend.
        unsafe { self.backend.synchronize_stream(self.handle) }
    }

    /// Whether a graph capture is recording this stream's work ([`Backend::is_capturing`]:
    /// a driver call).
    pub(crate) fn is_capturing(&self) -> Result<bool> {
        // SAFETY: the handle is live while `self` is, and came from this backend.
        unsafe { self.backend.is_capturing(self.handle) }
    }

    /// Records an event at the stream's tail (one kept from earlier use when there is
    /// one: no driver call to make it).
    pub(crate) fn record(&self) -> Result<OwnedEvent> {
        self.check_reachable("record an event on")?;
        let ev = self.event()?;
        // SAFETY: both handles are live while their owners are, and from this backend.
        unsafe { self.backend.record_event(ev.handle, self.handle)? };
        Ok(ev)
    }

    /// An event of this stream's device, not yet recorded: kept from earlier use when
    /// there is one, and kept again when dropped.
    pub(crate) fn event(&self) -> Result<OwnedEvent> {
        // Before the cache's lock, which a thread of the parent may have held at a fork.
        self.backend.check_fork()?;
        let handle = match self.events.take() {
            Some(h) => h,
            None => self.backend.create_event(self.device)?,
        };
        Ok(OwnedEvent {
            backend: self.backend.clone(),
            handle,
            device: self.device,
            home: self.events.clone(),
        })
    }

    /// Makes later work on this stream wait for `event`.
    pub(crate) fn wait(&self, event: &OwnedEvent) -> Result<()> {
        same_backend(&self.backend, &event.backend)?;
        self.check_reachable("make wait")?;
        // SAFETY: both handles are live and from this backend (checked above).
        unsafe { self.backend.stream_wait_event(self.handle, event.handle) }
    }
}

impl Drop for OwnedStream {
    fn drop(&mut self) {
        if self.backend.check_fork().is_err() {
            return;
        }
        if !self.owned {
            // An import is forgotten by its `Import`, once the last view lets go too.
            return;
        }
        // SAFETY: the handle is live and is never used again after this.
        if let Err(e) = unsafe { self.backend.destroy_stream(self.handle) } {
            tracing::warn!(target: "hetmem", error = %e, "destroying a stream failed");
        }
    }
}

/// Events kept for reuse: making and destroying one per copy or hand-over would be two
/// driver calls each time. A dropped [`OwnedEvent`] comes back here; recording it again
/// is safe, since a wait already queued on it keeps the record that was current when it
/// was queued, and nobody else holds it.
#[derive(Debug)]
pub(crate) struct EventCache {
    backend: SharedBackend,
    device: usize,
    free: std::sync::Mutex<Vec<EventHandle>>,
}

/// Events one cache keeps at most.
const EVENT_CACHE: usize = 64;

impl EventCache {
    fn new(backend: &SharedBackend, device: usize) -> Arc<Self> {
        Arc::new(EventCache {
            backend: backend.clone(),
            device,
            free: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn take(&self) -> Option<EventHandle> {
        crate::backend::lock(&self.free).pop()
    }

    /// Keeps `handle` unless the cache is full; returns it back if not kept.
    fn put(&self, handle: EventHandle) -> Option<EventHandle> {
        let mut free = crate::backend::lock(&self.free);
        if free.len() < EVENT_CACHE {
            free.push(handle);
            None
        } else {
            Some(handle)
        }
    }
}

impl Drop for EventCache {
    fn drop(&mut self) {
        if self.backend.check_fork().is_err() {
            return;
        }
        let free = std::mem::take(self.free.get_mut().unwrap_or_else(|e| e.into_inner()));
        for h in free {
            // SAFETY: kept handles are live events of this backend that nobody holds.
            if let Err(e) = unsafe { self.backend.destroy_event(h) } {
                tracing::warn!(target: "hetmem", error = %e, device = self.device, "destroying a kept event failed");
            }
        }
    }
}

/// An event of a stream's cache: kept there for reuse when dropped (destroyed when the
/// cache is full).
#[derive(Debug)]
pub(crate) struct OwnedEvent {
    backend: SharedBackend,
    handle: EventHandle,
    device: usize,
    home: Arc<EventCache>,
}

impl OwnedEvent {
    /// A new event of `device`, not yet recorded, with a home of its own (destroyed
    /// when dropped): for an event a caller records and reuses itself.
    pub(crate) fn new(backend: &SharedBackend, device: usize) -> Result<Self> {
        backend.check_fork()?;
        let handle = backend.create_event(device)?;
        Ok(OwnedEvent {
            backend: backend.clone(),
            handle,
            device,
            home: EventCache::new(backend, device),
        })
    }

    pub(crate) fn handle(&self) -> EventHandle {
        self.handle
    }

    pub(crate) fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    pub(crate) fn device(&self) -> usize {
        self.device
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        // SAFETY: the handle is live while `self` is, and came from this backend.
        unsafe { self.backend.synchronize_event(self.handle) }
    }

    /// Records this event at the current tail of `stream`.
    pub(crate) fn record_on(&self, stream: &OwnedStream) -> Result<()> {
        same_backend(&self.backend, &stream.backend)?;
        stream.check_reachable("record an event on")?;
        // SAFETY: both handles are live while their owners are, from this backend.
        unsafe { self.backend.record_event(self.handle, stream.handle) }
    }

    pub(crate) fn is_done(&self) -> Result<bool> {
        // SAFETY: the handle is live while `self` is, and came from this backend.
        unsafe { self.backend.event_done(self.handle) }
    }
}

impl Drop for OwnedEvent {
    fn drop(&mut self) {
        if self.backend.check_fork().is_err() {
            // A forked child: neither the cache's lock nor the driver.
            return;
        }
        let Some(handle) = self.home.put(self.handle) else {
            return;
        };
        // SAFETY: the handle is live and is never used again after this.
        if let Err(e) = unsafe { self.backend.destroy_event(handle) } {
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
    /// to whole pages and to [`HOST_REGISTER_CHUNK`](crate::backend::HOST_REGISTER_CHUNK)),
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
        let page = crate::backend::host::page_size();
        let chunk = chunk
            .clamp(page, crate::backend::HOST_REGISTER_CHUNK)
            .next_multiple_of(page)
            .min(crate::backend::HOST_REGISTER_CHUNK);
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

    /// Copies `len` bytes between two buffers (see [`copy::copy`]).
    pub(crate) fn copy(
        dst: &OwnedMemory,
        dst_offset: usize,
        src: &OwnedMemory,
        src_offset: usize,
        len: usize,
        stream: Option<&OwnedStream>,
    ) -> Result<()> {
        copy::copy(dst, dst_offset, src, src_offset, len, stream)
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
            Err(Error::InvalidArgument(
                "a copy that may still use this buffer was never fenced".into(),
            ))
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

/// Whether a registration error says part of the range stayed registered (the
/// backend's rollback failed), so the memory must never be unmapped.
fn is_rollback_failure(e: &Error) -> bool {
    matches!(e, Error::RegistrationLeaked { .. })
}
