//! Streams and events: in-order queues of device work, and markers in them that other
//! streams and the host can wait for.
//!
//! Made by [`Manager::create_stream`](crate::Manager::create_stream); used by the manager's
//! copies and by the pools, which order the reuse of freed memory by stream.

use std::sync::Arc;

use crate::backend::owned::{OwnedEvent, OwnedStream, SharedBackend};
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

    /// Whether this stream was made by the given backend instance.
    pub(crate) fn belongs_to(&self, backend: &SharedBackend) -> bool {
        Arc::ptr_eq(self.inner.backend(), backend)
    }

    /// The device it runs on.
    pub fn device(&self) -> usize {
        self.inner.device()
    }

    /// The backend's handle (a `CUstream` / `hipStream_t` value on GPUs), for interop
    /// and for the simulator's kernels.
    pub fn handle(&self) -> StreamHandle {
        self.inner.handle()
    }

    /// Blocks until everything queued so far is done.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
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
#[derive(Debug)]
pub struct Event {
    inner: OwnedEvent,
}

impl Event {
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
