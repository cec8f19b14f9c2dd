//! The streams a device pool hands memory between, and the events it does it with.
//!
//! A block freed on one stream goes to another only behind an event recorded on the
//! first (the second waits on the device, the host does not). The events come from the
//! recording stream's cache ([`OwnedStream::record`]), so a hand-over costs a record and
//! a wait, not an event made and destroyed each time.
//!
//! A per-thread default stream is a stream per thread: the pool knows each thread's as
//! its own stream (a view, [`OwnedStream::this_thread`]), and an event can be recorded
//! on it only from its thread. So every free of a block such a stream owns, made on
//! that thread, records one there (the stream's *fence*), and another thread hands its
//! blocks over behind the latest fence. A block freed from another thread leaves the
//! fence short of it; until the owning thread frees again, a hand-over, an idle check
//! or a synchronisation of that stream from elsewhere falls back to waiting for the
//! whole device on the host (or, for an idle check, says busy).
//!
//! None of that may touch a stream that is capturing a graph: an event recorded there
//! is a node of the graph, which the driver refuses to query and which pulls a stream
//! that waits for it into the capture; synchronising it fails and invalidates the
//! capture. [`Streams::capturing`] asks the driver (a call: never on the hot path), and
//! [`Streams::is_idle`] answers "busy" for such a stream without recording. (Another
//! thread's per-thread stream cannot be asked: no fence is recorded on a capturing
//! one, and while a capture may be under way none that would make the host wait for
//! the whole device is used.)

use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use super::blocks::{COMMON, NO_STREAM};
use super::{PoolState, Shared};
use crate::backend::owned::{OwnedEvent, OwnedStream};
use crate::error::{Error, Result};
use crate::stream::Stream;

#[derive(Debug)]
struct Entry {
    stream: Arc<OwnedStream>,
    /// For another thread's per-thread stream: an event recorded on it (on its thread)
    /// after every free of a block it owns; `None` before the first such free, or once
    /// a block it owns was freed on another thread.
    fence: Option<OwnedEvent>,
}

#[derive(Debug)]
pub(crate) struct Streams {
    streams: FxHashMap<u64, Entry>,
    /// The registry is pruned of unused streams when it reaches this many.
    prune_at: usize,
    /// Whether a per-thread stream was ever registered (frees need no look-up before).
    per_thread: bool,
}

impl Streams {
    pub(crate) fn new() -> Self {
        Streams {
            streams: FxHashMap::default(),
            prune_at: 16,
            per_thread: false,
        }
    }

    pub(crate) fn contains(&self, id: u64) -> bool {
        self.streams.contains_key(&id)
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.streams.keys().copied()
    }

    /// Keeps `stream` known (and alive) while blocks are owned by or recorded on it. A
    /// program that makes a stream per request would otherwise keep every one: the
    /// unused ones (`in_use` says which are not) are forgotten when their number
    /// doubles.
    pub(crate) fn register(
        &mut self,
        stream: &Arc<OwnedStream>,
        in_use: impl FnOnce() -> FxHashSet<u64>,
    ) {
        if self.streams.contains_key(&stream.id()) {
            return;
        }
        if self.streams.len() >= self.prune_at {
            self.forget_unused(&in_use());
            self.prune_at = (2 * self.streams.len()).max(16);
        }
        self.per_thread |= stream.thread().is_some();
        self.streams.insert(
            stream.id(),
            Entry {
                stream: stream.clone(),
                fence: None,
            },
        );
    }

    /// Drops the streams not in `in_use`: nothing needs ordering after them any more.
    pub(crate) fn forget_unused(&mut self, in_use: &FxHashSet<u64>) {
        self.streams.retain(|k, _| in_use.contains(k));
    }

    fn entry(&self, id: u64) -> Result<&Entry> {
        // Streams that own or are recorded on a block are never forgotten.
        self.streams.get(&id).ok_or(Error::UnknownHandle {
            what: "pool stream",
            handle: id,
        })
    }

    /// A block owned by stream `id` was freed: for a per-thread stream, records its
    /// fence (on its own thread) or, freed on another thread, notes that the fence no
    /// longer covers every block it owns.
    pub(crate) fn freed_on(&mut self, id: u64) {
        if !self.per_thread {
            return;
        }
        let Some(e) = self.streams.get_mut(&id) else {
            return;
        };
        if e.stream.thread().is_none() {
            return; // any thread can record on it when it is handed over
        }
        e.fence = if e.stream.reachable() && !e.stream.is_capturing().unwrap_or(true) {
            // Without a fence a later hand-over waits for the device: slower, not wrong.
            // (None either on a capturing stream: an event recorded there would be the
            // capture's, which nobody may query or wait for.)
            e.stream.record().ok()
        } else {
            tracing::debug!(target: "hetmem", device = e.stream.device(),
                "a block of a per-thread stream was freed on another thread");
            None
        };
    }

    /// Makes work queued on `to` (a stream of the calling thread) from now on wait for
    /// the work queued so far on the stream `from`, whose free blocks it takes (no host
    /// wait, unless `from` is another thread's per-thread stream with no fence).
    pub(crate) fn order(&mut self, to: &OwnedStream, from: u64) -> Result<()> {
        let e = self.entry(from)?;
        if e.stream.reachable() {
            let ev = e.stream.record()?;
            return to.wait(&ev);
        }
        match &e.fence {
            Some(fence) => to.wait(fence),
            None => e.stream.synchronize(),
        }
    }

    /// Makes work queued on stream `to` from now on wait for the work queued so far on
    /// stream `from`, which used a block `to` owns (the fence of a per-thread stream
    /// does not cover such a use: where either is another thread's per-thread stream,
    /// the host waits for `from`'s work, or for the device's).
    pub(crate) fn order_ids(&mut self, to: u64, from: u64) -> Result<()> {
        let to = self.entry(to)?.stream.clone();
        let from = self.entry(from)?.stream.clone();
        if to.reachable() && from.reachable() {
            let ev = from.record()?;
            return to.wait(&ev);
        }
        from.synchronize()
    }

    /// Whether everything queued on stream `id` so far is done (a stream the pool does
    /// not know has nothing queued that touches its memory). Errors count as busy, and
    /// so does another thread's per-thread stream with no fence, and a stream capturing a
    /// graph (asked first: nothing is recorded on it).
    pub(crate) fn is_idle(&mut self, id: u64) -> bool {
        let Some(e) = self.streams.get(&id) else {
            return true;
        };
        if !e.stream.reachable() {
            return e
                .fence
                .as_ref()
                .is_some_and(|f| f.is_done().unwrap_or(false));
        }
        if e.stream.is_capturing().unwrap_or(true) {
            return false;
        }
        e.stream
            .record()
            .and_then(|ev| ev.is_done())
            .unwrap_or(false)
    }

    /// Whether stream `id` is capturing a graph (a driver call). A stream the pool does
    /// not know is not, nor another thread's per-thread stream (which cannot be asked);
    /// an error counts as capturing, so that the caller leaves the stream alone.
    pub(crate) fn capturing(&self, id: u64) -> bool {
        self.streams
            .get(&id)
            .is_some_and(|e| e.stream.reachable() && e.stream.is_capturing().unwrap_or(true))
    }

    /// Whether any stream the pool knows (and can ask) is capturing: a driver call each.
    /// Calls that synchronise the device, explicitly or implicitly (unmapping,
    /// freeing), wait for none.
    pub(crate) fn any_capturing(&self) -> bool {
        self.streams
            .values()
            .any(|e| e.stream.reachable() && e.stream.is_capturing().unwrap_or(true))
    }

    /// Whether synchronising stream `id` waits for the whole device (another thread's
    /// per-thread stream with no fence): illegal while any stream of it captures.
    pub(crate) fn syncs_device(&self, id: u64) -> bool {
        self.streams
            .get(&id)
            .is_some_and(|e| !e.stream.reachable() && e.fence.is_none())
    }

    /// Waits for everything queued on stream `id` so far (that touches the pool's free
    /// memory, for another thread's per-thread stream: its fence, else the device).
    pub(crate) fn synchronize(&self, id: u64) -> Result<()> {
        match self.streams.get(&id) {
            Some(e) => Self::synchronize_entry(e),
            None => Ok(()),
        }
    }

    fn synchronize_entry(e: &Entry) -> Result<()> {
        match &e.fence {
            Some(fence) if !e.stream.reachable() => fence.synchronize(),
            _ => e.stream.synchronize(),
        }
    }

    /// Waits for every stream's work (before the pool's memory goes), logging failures.
    /// A capturing stream is skipped (its captured work runs at replays, and
    /// synchronising it would invalidate the capture), and so is the device while one
    /// captures.
    pub(crate) fn synchronize_all(&self) {
        let capturing = self.any_capturing();
        for e in self.streams.values() {
            let reachable = e.stream.reachable();
            if capturing && (!reachable || e.stream.is_capturing().unwrap_or(true)) {
                tracing::warn!(target: "hetmem",
                    "a pool dropped while a stream captures a graph: not waiting for it");
                continue;
            }
            if let Err(err) = Self::synchronize_entry(e) {
                tracing::warn!(target: "hetmem", error = %err, "synchronising a stream before dropping a pool failed");
            }
        }
    }
}

impl Shared {
    /// Takes `rounded` bytes from the free mapped block `addr` for `stream` and private
    /// pool `pool`, handing it over from its previous stream with an event.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn take(
        &self,
        st: &mut PoolState,
        addr: u64,
        rounded: usize,
        size: usize,
        stream: &Stream,
        pool: u32,
    ) -> Result<u64> {
        let key = stream.inner.id();
        let (owner, taken) = st.blocks.take_sized(addr, rounded, size, key, pool);
        if owner != key && owner != NO_STREAM {
            // Another stream's block: only ever the common pool's (find_others_fit).
            if let Err(e) = st.streams.order(&stream.inner, owner) {
                st.blocks.untake(addr, owner, COMMON);
                return Err(e);
            }
        }
        st.count_alloc(taken, size);
        Ok(addr)
    }
}

impl PoolState {
    /// Makes the block's stream `own` wait for the work queued so far on the other
    /// streams it was used on, and forgets them. False when that failed: the block
    /// cannot be proven free of their work, and is kept out of circulation (leaked).
    pub(super) fn order_uses(&mut self, addr: u64, own: u64) -> bool {
        let Some(others) = self.uses.remove(&addr) else {
            return true;
        };
        let ordered = others
            .iter()
            .try_for_each(|o| self.streams.order_ids(own, *o));
        if let Err(e) = ordered {
            tracing::error!(target: "hetmem", addr, error = %e,
                "ordering a multi-stream block failed; leaking it");
            return false;
        }
        true
    }

    pub(super) fn register_stream(&mut self, stream: &Stream) {
        if self.streams.contains(stream.inner.id()) {
            return;
        }
        let (blocks, uses) = (&self.blocks, &self.uses);
        self.streams.register(&stream.inner, || {
            blocks
                .owners()
                .chain(uses.values().flatten().copied())
                .collect()
        });
    }

    pub(super) fn streams_in_use(&self) -> FxHashSet<u64> {
        self.blocks
            .owners()
            .chain(self.uses.values().flatten().copied())
            .collect()
    }
}
