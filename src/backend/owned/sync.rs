//! Streams and events that destroy their handle on drop, and the per-thread views of
//! the per-thread default stream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustc_hash::FxHashMap;

use crate::backend::{
    lock, raw_stream, thread_key, Backend, EventHandle, StreamHandle, PER_THREAD_STREAM,
};
use crate::error::{Error, Result};

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
            raw: raw_stream(handle),
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
