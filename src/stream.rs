//! Streams and events: in-order queues of device work, and markers in them that other
//! streams and the host can wait for.
//!
//! Made by [`Manager::create_stream`](crate::Manager::create_stream); used by the manager's
//! copies and by the pools, which order the reuse of freed memory by stream.

use std::sync::Arc;

use crate::backend::owned::{OwnedEvent, OwnedStream, SharedBackend, ThisThread};
use crate::backend::{EventHandle, StreamHandle};
use crate::error::{Error, Result};

/// An in-order queue of work on one device. Cheap to clone: clones are the same stream,
/// destroyed when the last clone (or a pool still caching memory freed on it) lets go.
#[derive(Debug, Clone)]
pub struct Stream {
    pub(crate) inner: Arc<OwnedStream>,
}

impl Stream {
    pub(crate) fn new(backend: &SharedBackend, device: usize) -> Result<Self> {
        Ok(Stream {
            inner: Arc::new(OwnedStream::new(backend, device)?),
        })
    }

    /// The stream the calling thread's work goes to: this one, or, for a wrapped
    /// per-thread default stream, the calling thread's (a stream of its own to pools
    /// and fences; see [`Stream::wrap`]).
    pub(crate) fn this_thread(&self) -> std::borrow::Cow<'_, Stream> {
        match self.inner.this_thread() {
            ThisThread::Same(_) => std::borrow::Cow::Borrowed(self),
            ThisThread::View(v) => std::borrow::Cow::Owned(Stream { inner: v }),
        }
    }

    /// Whether anything besides this stream and its clones uses it: a pool block or
    /// fence that keeps it, or one of its per-thread views.
    pub(crate) fn in_use_elsewhere(&self) -> bool {
        Arc::strong_count(&self.inner) > 1 || self.inner.views_in_use()
    }

    /// Whether hetmem made this stream (and destroys it when the last clone goes),
    /// rather than wrapping one of the caller's ([`Stream::wrap`]).
    pub fn is_owned(&self) -> bool {
        self.inner.is_owned()
    }

    /// Whether this stream was made by the given backend instance.
    pub(crate) fn belongs_to(&self, backend: &SharedBackend) -> bool {
        Arc::ptr_eq(self.inner.backend(), backend)
    }

    /// The device it runs on.
    pub fn device(&self) -> usize {
        self.inner.device()
    }

    /// The backend's handle (a `CUstream` / `hipStream_t` value on GPUs), for interop
    /// and for the simulator's kernels. For a wrapped special stream (raw 0, 1 or 2) it
    /// is the backend's own token for it, not the raw value; for the per-thread stream
    /// it means the calling thread's, whichever thread uses it.
    pub fn handle(&self) -> StreamHandle {
        self.inner.handle()
    }

    /// The value the caller knows this stream by: the raw value it was wrapped from
    /// ([`Stream::wrap`]: 0 for a default stream), else the driver's handle.
    pub(crate) fn raw(&self) -> u64 {
        self.inner.raw()
    }

    /// Blocks until everything queued so far is done.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }

    /// Whether a graph capture (CUDA stream capture) is recording this stream's work
    /// now: one driver call. While it is, synchronising the stream, or querying an
    /// event recorded on it, fails and invalidates the capture; hetmem's pools and
    /// tier store ask before such calls. A capture invalidated by an illegal call
    /// still counts until it is ended.
    pub fn is_capturing(&self) -> Result<bool> {
        self.inner.is_capturing()
    }

    /// Records an event at the current tail of the stream.
    pub fn record(&self) -> Result<Event> {
        Ok(Event {
            inner: self.inner.record()?,
        })
    }

    /// Makes work queued on this stream from now on wait for `event`.
    pub fn wait(&self, event: &Event) -> Result<()> {
        if !Arc::ptr_eq(self.inner.backend(), event.inner.backend()) {
            return Err(Error::ForeignHandle { what: "event" });
        }
        self.inner.wait(&event.inner)
    }
}

/// A point in a stream that other streams and the host can wait for.
///
/// [`Stream::record`] makes one recorded at once; [`Manager::create_event`] makes one not
/// yet recorded, which [`Event::record`] records (and records again: it is reusable).
///
/// [`Manager::create_event`]: crate::Manager::create_event
#[derive(Debug)]
pub struct Event {
    inner: OwnedEvent,
}

impl Event {
    /// A new event of `device`, not yet recorded (it counts as passed until it is).
    pub(crate) fn new(backend: &SharedBackend, device: usize) -> Result<Self> {
        Ok(Event {
            inner: OwnedEvent::new(backend, device)?,
        })
    }

    /// Records the event at the current tail of `stream`: from now on it stands for the
    /// work queued there so far (waits queued before this call keep the earlier point).
    ///
    /// # Errors
    /// [`Error::ForeignHandle`] for a stream of another manager; [`Error::InvalidArgument`]
    /// for a stream of another device than the event's (the drivers refuse it).
    pub fn record(&self, stream: &Stream) -> Result<()> {
        if !Arc::ptr_eq(stream.inner.backend(), self.inner.backend()) {
            return Err(Error::ForeignHandle { what: "event" });
        }
        if stream.device() != self.device() {
            return Err(Error::InvalidArgument(format!(
                "an event of device {} cannot be recorded on a stream of device {}",
                self.device(),
                stream.device()
            )));
        }
        self.inner.record_on(&stream.inner)
    }

    /// The device of the stream it was recorded on.
    pub fn device(&self) -> usize {
        self.inner.device()
    }

    /// The backend's handle.
    pub fn handle(&self) -> EventHandle {
        self.inner.handle()
    }

    /// Blocks until the work before the event is done.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }

    /// Whether the work before the event is done, without blocking.
    pub fn is_done(&self) -> Result<bool> {
        self.inner.is_done()
    }
}
