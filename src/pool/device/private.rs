//! Private pools, for graph capture (see the module docs of the pool, "Graph
//! capture"): routing allocations to them between begin and end, the frees and releases
//! that wait until no capture is under way (`settle`), and what each one holds.

use super::blocks::COMMON;
use super::{DevicePool, PoolState, PrivatePoolId, PrivatePoolStats, Shared};
use crate::error::{Error, Result};
use crate::stream::Stream;

/// Decides whether an allocation on a stream goes to a private pool: true for yes; an
/// error fails the allocation.
pub(super) type StreamFilter = Box<dyn Fn(&Stream) -> Result<bool> + Send + Sync>;

/// Allocations routed to a private pool between begin and end.
pub(super) struct Route {
    pub(super) id: PrivatePoolId,
    pub(super) tag: u32,
    pub(super) filter: StreamFilter,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("id", &self.id)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

/// A private pool: the tag its blocks carry, and its begins not yet released.
#[derive(Debug)]
pub(super) struct Private {
    pub(super) tag: u32,
    pub(super) uses: usize,
}

impl DevicePool {
    /// From now on, allocations on the streams that `filter` picks come from private
    /// pool `id` (made on first use), until [`DevicePool::end_allocate_to_pool`]: for
    /// CUDA graph capture (PyTorch's `beginAllocateToPool`). Blocks of a private pool,
    /// freed, serve only later allocations of the same pool, on their stream, until
    /// the pool is released: the graph replays into their addresses. The pool may
    /// also take cached memory no stream owns (it becomes the pool's) and map new
    /// memory; it never takes another stream's memory, synchronises, queries events or
    /// unmaps while any pool is being allocated to (see the module docs).
    ///
    /// Each begin counts a use of the pool (graphs may share one: begin again with the
    /// same id); [`DevicePool::release_pool`] undoes one. `filter` runs on every
    /// allocation of the pool's device while any pool is being allocated to (newest
    /// begin first), under the pool's lock: it must not call into this pool. Begin
    /// before the capture starts (as PyTorch does), so that no allocation of the
    /// capture reaches the common pool.
    ///
    /// ```
    /// use hetmem::{BackendKind, Manager};
    /// use hetmem::pool::{PoolConfig, PrivatePoolId};
    /// let mgr = Manager::builder().backend(BackendKind::Sim).build()?;
    /// let sim = mgr.sim().unwrap();
    /// let pool = mgr.device_pool(0, PoolConfig::default())?;
    /// let (capture, other) = (mgr.create_stream(0)?, mgr.create_stream(0)?);
    /// let graph = PrivatePoolId(1, 0);
    /// let handle = capture.handle();
    /// pool.begin_allocate_to_pool(graph, move |s| s.handle() == handle)?;
    /// sim.begin_capture(capture.handle())?;
    /// let scratch = pool.alloc(1 << 20, &capture)?;        // the graph's
    /// let addr = scratch.ptr();
    /// drop(scratch);                                       // still the graph's
    /// sim.end_capture(capture.handle())?;
    /// pool.end_allocate_to_pool(graph)?;
    /// let b = pool.alloc(1 << 20, &other)?;                 // never the graph's memory
    /// assert_ne!(b.ptr(), addr);
    /// pool.release_pool(graph)?;                           // the graph is gone
    /// assert!(pool.private_pool(graph).is_none());
    /// # Ok::<(), hetmem::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when allocations already go to `id`.
    pub fn begin_allocate_to_pool(
        &self,
        id: PrivatePoolId,
        filter: impl Fn(&Stream) -> bool + Send + Sync + 'static,
    ) -> Result<()> {
        self.begin_allocate_to_pool_with(id, Box::new(move |s| Ok(filter(s))))
    }

    /// [`DevicePool::begin_allocate_to_pool`] with a filter that may fail (the C ABI's:
    /// an allocation whose filter fails fails).
    pub(crate) fn begin_allocate_to_pool_with(
        &self,
        id: PrivatePoolId,
        filter: StreamFilter,
    ) -> Result<()> {
        self.shared.epoch.check()?;
        let mut st = self.shared.lock();
        if st.routes.iter().any(|r| r.id == id) {
            drop(st);
            // The filter (the caller's context) is let go of outside the lock.
            drop(filter);
            return Err(Error::InvalidArgument(format!(
                "allocations already go to private pool {id:?}"
            )));
        }
        let tag = match st.private.get_mut(&id) {
            Some(p) => {
                p.uses += 1;
                p.tag
            }
            None => {
                let tag = st.next_tag;
                st.next_tag += 1;
                st.private.insert(id, Private { tag, uses: 1 });
                tag
            }
        };
        st.routes.push(Route { id, tag, filter });
        tracing::debug!(target: "hetmem", device = self.shared.device, ?id, tag, "allocating to a private pool");
        Ok(())
    }

    /// Ends the routing that [`DevicePool::begin_allocate_to_pool`] began (PyTorch's
    /// `endAllocateToPool`, after the capture ended). The pool's memory stays its own
    /// until released. Once no pool is being allocated to, frees that waited for the
    /// end of a capture go ahead, and released pools join the common pool.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when allocations do not go to `id`. Errors of the
    /// deferred work (ordering frees, synchronising for a release).
    pub fn end_allocate_to_pool(&self, id: PrivatePoolId) -> Result<()> {
        let sh = &self.shared;
        sh.epoch.check()?;
        let mut st = sh.lock();
        let Some(i) = st.routes.iter().position(|r| r.id == id) else {
            return Err(Error::InvalidArgument(format!(
                "allocations do not go to private pool {id:?}"
            )));
        };
        let route = st.routes.remove(i);
        if st.routes.is_empty() {
            sh.settle(&mut st)?;
        }
        drop(st);
        // The filter (the caller's context) is let go of outside the lock.
        drop(route);
        Ok(())
    }

    /// Undoes one begin of private pool `id` (PyTorch's `releasePool`, when a graph
    /// that used it is reset or destroyed). When none is left, the pool's blocks go to
    /// the common pool: its free ones at once, its allocated ones when freed. Before
    /// that the device is synchronised, since replays of its graphs may still run on
    /// any stream (every stream the pool knows, where the backend cannot synchronise a
    /// device); while a capture is under way that waits until none is.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a pool that does not exist or is still being
    /// allocated to. Errors of synchronising the device.
    pub fn release_pool(&self, id: PrivatePoolId) -> Result<()> {
        let sh = &self.shared;
        sh.epoch.check()?;
        let mut st = sh.lock();
        if st.routes.iter().any(|r| r.id == id) {
            return Err(Error::InvalidArgument(format!(
                "private pool {id:?} is still being allocated to: end it first"
            )));
        }
        let Some(p) = st.private.get_mut(&id) else {
            return Err(Error::InvalidArgument(format!(
                "no private pool {id:?} on device {}",
                sh.device
            )));
        };
        p.uses -= 1;
        if p.uses > 0 {
            return Ok(());
        }
        let tag = p.tag;
        st.private.remove(&id);
        st.releasing.push(tag);
        tracing::debug!(target: "hetmem", device = sh.device, ?id, tag, "private pool released");
        if st.routes.is_empty() {
            sh.settle(&mut st)?;
        }
        Ok(())
    }

    /// What private pool `id` holds, or `None` when there is no such pool (never made,
    /// or released). Scans every block: for tests and reports, not hot paths.
    pub fn private_pool(&self, id: PrivatePoolId) -> Option<PrivatePoolStats> {
        let st = self.shared.lock();
        let p = st.private.get(&id)?;
        Some(st.private_stats(id, p))
    }

    /// Every private pool not yet released, by id, with what it holds (as
    /// [`DevicePool::private_pool`]).
    pub fn private_pools(&self) -> Vec<(PrivatePoolId, PrivatePoolStats)> {
        let st = self.shared.lock();
        let mut v: Vec<_> = st
            .private
            .iter()
            .map(|(id, p)| (*id, st.private_stats(*id, p)))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }
}

impl Shared {
    /// An allocation while allocations are routed to private pools (a capture may be
    /// under way): its pool by the routes' filters; parked blocks are the common pool's.
    /// Out of line: the hot path is the unrouted one.
    #[cold]
    #[inline(never)]
    pub(super) fn alloc_routed(
        &self,
        st: &mut PoolState,
        size: usize,
        rounded: usize,
        stream: &Stream,
    ) -> Result<u64> {
        let pool = st.route(stream)?;
        if pool == COMMON {
            if let Some(addr) = st.blocks.unpark(stream.inner.id(), rounded, size) {
                st.count_alloc(rounded, size);
                return Ok(addr);
            }
        }
        self.alloc_slow(st, size, rounded, stream, pool)
    }

    /// Once no capture is under way: the frees that waited for one's end go ahead,
    /// and released private pools join the common pool (after the device is
    /// synchronised: replays of their graphs may still run).
    pub(super) fn settle(&self, st: &mut PoolState) -> Result<()> {
        if !st.deferred.is_empty() {
            for addr in std::mem::take(&mut st.deferred) {
                let Some(b) = st.blocks.get(addr).copied() else {
                    continue;
                };
                if st.touches_capture(addr, b.stream) {
                    // A capture the pool was not told of: later.
                    st.deferred.push(addr);
                } else if st.order_uses(addr, b.stream) {
                    st.blocks.park(addr);
                    st.streams.freed_on(b.stream);
                }
            }
        }
        if st.releasing.is_empty() || st.streams.any_capturing() {
            return Ok(());
        }
        match self.backend.synchronize_device(self.device) {
            Ok(()) => {}
            Err(Error::Unsupported { .. }) => {
                // The streams the pool knows, at least.
                let ids: Vec<u64> = st.streams.ids().collect();
                for id in ids {
                    st.streams.synchronize(id)?;
                }
            }
            Err(e) => return Err(e),
        }
        for tag in std::mem::take(&mut st.releasing) {
            let bytes = st.blocks.release_pool(tag);
            tracing::debug!(target: "hetmem", device = self.device, tag, bytes,
                "a released private pool's memory joins the common pool");
        }
        Ok(())
    }
}

impl PoolState {
    pub(super) fn private_stats(&self, id: PrivatePoolId, p: &Private) -> PrivatePoolStats {
        let (allocated_bytes, free_bytes) = self.blocks.pool_bytes(p.tag);
        PrivatePoolStats {
            uses: p.uses,
            allocating: self.routes.iter().any(|r| r.id == id),
            allocated_bytes,
            free_bytes,
        }
    }

    /// The private pool an allocation on `stream` goes to: the newest route whose
    /// filter picks it, else the common pool.
    pub(super) fn route(&self, stream: &Stream) -> Result<u32> {
        for r in self.routes.iter().rev() {
            if (r.filter)(stream)? {
                return Ok(r.tag);
            }
        }
        Ok(COMMON)
    }

    /// Whether the block at `addr`, of stream `own`, or a stream it was used on is
    /// capturing a graph (driver calls: for blocks used on several streams only).
    pub(super) fn touches_capture(&self, addr: u64, own: u64) -> bool {
        self.streams.capturing(own)
            || self
                .uses
                .get(&addr)
                .is_some_and(|u| u.iter().any(|o| self.streams.capturing(*o)))
    }
}
