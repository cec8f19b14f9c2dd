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

    /// Wraps a stream the caller made outside hetmem (a `CUstream` / `cudaStream_t` or
    /// `hipStream_t` value), or with `raw` 0 the default stream of `device` (CUDA's
    /// legacy default stream, HIP's null stream, a per-device stream of the simulator).
    /// hetmem queues work on it and records events on it but never destroys it: the
    /// last clone only lets go of it. The simulator accepts 0 and its own live streams
    /// ([`Stream::handle`] of a stream it made); the host backend has no streams.
    ///
    /// # Safety
    /// `raw` is 0 or a live stream of `device` made by the driver `mgr`'s backend talks
    /// to (in the current process, on the device's primary context for CUDA), and it
    /// stays live for as long as this stream, its clones, or pool blocks and events that
    /// used it are alive (a device pool keeps a stream it has cached memory for until
    /// [`DevicePool::trim`](crate::pool::DevicePool::trim)). A stale or foreign handle
    /// is undefined behaviour in a real driver.
    ///
    /// # Errors
    /// [`Error::UnknownDevice`]; [`Error::Unsupported`] on the host backend;
    /// [`Error::InvalidArgument`] for a stream already wrapped for another device, or
    /// (sim) one that is not a live stream of `device`.
    pub unsafe fn wrap(mgr: &crate::Manager, device: usize, raw: u64) -> Result<Self> {
        crate::backend::check_device(mgr.backend(), device)?;
        // SAFETY: the caller's contract is OwnedStream::import's.
        let inner = unsafe { OwnedStream::import(mgr.shared_backend(), device, raw)? };
        Ok(Stream {
            inner: Arc::new(inner),
        })
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
    /// and for the simulator's kernels. For a wrapped default stream (raw 0) it is the
    /// backend's own token for that device's default stream, not 0.
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
