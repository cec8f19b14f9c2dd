//! What the manager makes from its backend for the layers below it: pools, streams and
//! events, streams wrapped from the caller's raw handles ([`Stream::wrap`]), and tier
//! stores ([`TierStore::new`]).
//!
//! `Stream::wrap` and `TierStore::new` take a [`Manager`], so they are defined here,
//! above the modules of their types: `stream` and `tier` then depend only on the
//! layers below them (see `tests/it/layers.rs`).

use std::sync::Arc;

use super::Manager;
use crate::backend::check_device;
use crate::backend::owned::OwnedStream;
use crate::error::{Error, Result};
use crate::placement::Placement;
use crate::pool::{DevicePool, HostPool, HostPoolConfig, PoolConfig};
use crate::stream::{Event, Stream};
use crate::tier::{TierConfig, TierStore};

impl Manager {
    /// A new caching pool over `device`'s memory (see [`DevicePool`]).
    pub fn device_pool(&self, device: usize, cfg: PoolConfig) -> Result<DevicePool> {
        self.live()?;
        DevicePool::new(&self.inner.backend, device, cfg)
    }

    /// A new caching pool of host memory, pageable and pinned (see [`HostPool`]). Its
    /// allocations resolve `NumaPolicy::NearDevice` and check nodes and room as
    /// [`Manager::alloc`] does.
    pub fn host_pool(&self, cfg: HostPoolConfig) -> Result<HostPool> {
        self.live()?;
        let mgr = self.clone();
        let placer: crate::pool::host::Placer = Arc::new(move |placement, size| {
            let (Placement::Host(policy) | Placement::Pinned(policy)) = placement else {
                return Err(Error::InvalidArgument(format!(
                    "{placement:?} is not host memory"
                )));
            };
            let policy = mgr.resolve_policy(policy)?;
            if let Some(size) = size {
                mgr.check_host_room(placement, &policy, size)?;
            }
            Ok(policy)
        });
        HostPool::new(&self.inner.backend, cfg, placer)
    }

    /// Creates a stream on `device`.
    pub fn create_stream(&self, device: usize) -> Result<Stream> {
        self.live()?;
        check_device(self.backend(), device)?;
        Stream::new(&self.inner.backend, device)
    }

    /// Creates an event on `device`, not yet recorded ([`Event::record`] records it on a
    /// stream of that device; [`Stream::wait`] makes a stream wait for it).
    pub fn create_event(&self, device: usize) -> Result<Event> {
        self.live()?;
        check_device(self.backend(), device)?;
        Event::new(&self.inner.backend, device)
    }
}

impl Stream {
    /// Wraps a stream the caller made outside hetmem (a `CUstream` / `cudaStream_t` or
    /// `hipStream_t` value), or with `raw` 0 the default stream of `device` (CUDA's
    /// legacy default stream, HIP's null stream, a per-device stream of the simulator).
    /// hetmem queues work on it and records events on it but never destroys it: the
    /// last clone only lets go of it. The simulator accepts 0, 1, 2 and its own live
    /// streams ([`Stream::handle`] of a stream it made); the host backend has no streams.
    ///
    /// # Special streams
    ///
    /// - 0 (and on CUDA 1, `CU_STREAM_LEGACY`): the legacy default stream, one for all
    ///   threads. The driver orders it against *blocking* streams (work on it waits for
    ///   theirs, theirs waits for it); hetmem's own streams are non-blocking, so it does
    ///   not order them, and hetmem never relies on that implicit ordering: memory
    ///   handed between this stream and any other goes behind an event.
    /// - [`PER_THREAD_STREAM`](crate::backend::PER_THREAD_STREAM) (2,
    ///   `CU_STREAM_PER_THREAD`, `hipStreamPerThread`): the per-thread default stream,
    ///   with the driver's meaning on every thread that uses the wrapped stream: work
    ///   queued through it from a thread goes to *that thread's* per-thread stream, not
    ///   the wrapping thread's. hetmem treats the threads' streams as the different
    ///   streams they are: a device pool keeps a block freed on one thread's stream
    ///   from another thread's until that one has waited for it (an event recorded on
    ///   the first thread when the block was freed; failing that, a device-wide
    ///   synchronisation), and copies leave fences per thread. A [`PoolBlock`] freed on
    ///   another thread than the one that allocated it, or a pool trimmed there, cannot
    ///   name the allocating thread's stream and waits for the whole device instead.
    ///
    /// [`PoolBlock`]: crate::pool::PoolBlock
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
    pub unsafe fn wrap(mgr: &Manager, device: usize, raw: u64) -> Result<Self> {
        check_device(mgr.backend(), device)?;
        // SAFETY: the caller's contract is OwnedStream::import's.
        let inner = unsafe { OwnedStream::import(mgr.shared_backend(), device, raw)? };
        Ok(Stream {
            inner: Arc::new(inner),
        })
    }
}

impl TierStore {
    /// A store over `mgr`'s device `cfg.device`, with its own device pool, host pool,
    /// copy stream and staging ring.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero device budget or one larger than the
    /// device's memory, zero spare slots, a host budget smaller than the staging ring,
    /// fewer than two staging slots or zero filler threads; [`Error::InvalidSize`] for
    /// a staging slot of zero bytes or over `isize::MAX`, or slots that together
    /// overflow the address space; [`Error::OutOfMemory`] (tier pinned) for a ring
    /// larger than the host memory available, refused before anything is pinned (see
    /// [`StagingRing::new`](crate::pool::StagingRing::new)), or when pinning it fails; [`Error::UnknownDevice`]; the
    /// pools' and streams' errors.
    pub fn new(mgr: &Manager, cfg: TierConfig) -> Result<TierStore> {
        let device_memory = mgr.devices().get(cfg.device).map(|d| d.info.total_memory);
        let ring_bytes = TierStore::check_config(&cfg, device_memory)?;
        let pool = mgr.device_pool(cfg.device, TierStore::pool_config(&cfg))?;
        let host = mgr.host_pool(TierStore::host_pool_config(&cfg))?;
        let copy = mgr.create_stream(cfg.device)?;
        TierStore::from_parts(cfg, ring_bytes, pool, host, copy)
    }
}
