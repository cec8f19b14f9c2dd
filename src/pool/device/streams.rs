//! The streams a device pool hands memory between, and the events it does it with.
//!
//! A block freed on one stream goes to another only behind an event recorded on the
//! first (the second waits on the device, the host does not). The events come from the
//! recording stream's cache ([`OwnedStream::record`]), so a hand-over costs a record and
//! a wait, not an event made and destroyed each time.

use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::backend::owned::OwnedStream;
use crate::error::{Error, Result};

#[derive(Debug)]
pub(crate) struct Streams {
    streams: FxHashMap<u64, Arc<OwnedStream>>,
    /// The registry is pruned of unused streams when it reaches this many.
    prune_at: usize,
}

impl Streams {
    pub(crate) fn new() -> Self {
        Streams {
            streams: FxHashMap::default(),
            prune_at: 16,
        }
    }

    pub(crate) fn contains(&self, id: u64) -> bool {
        self.streams.contains_key(&id)
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.streams.keys().copied()
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Arc<OwnedStream>> {
        self.streams.values()
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
        self.streams.insert(stream.id(), stream.clone());
    }

    /// Drops the streams not in `in_use`: nothing needs ordering after them any more.
    pub(crate) fn forget_unused(&mut self, in_use: &FxHashSet<u64>) {
        self.streams.retain(|k, _| in_use.contains(k));
    }

    fn stream(&self, id: u64) -> Result<Arc<OwnedStream>> {
        self.streams.get(&id).cloned().ok_or_else(|| {
            // Streams that own or are recorded on a block are never forgotten.
            Error::InvalidArgument(format!("pool stream {id} is not registered"))
        })
    }

    /// Makes work queued on `to` from now on wait for the work queued so far on the
    /// stream `from` (no host wait).
    pub(crate) fn order(&mut self, to: &OwnedStream, from: u64) -> Result<()> {
        let ev = self.stream(from)?.record()?;
        to.wait(&ev)
    }

    /// [`Streams::order`] between two registered streams.
    pub(crate) fn order_ids(&mut self, to: u64, from: u64) -> Result<()> {
        let to = self.stream(to)?;
        self.order(&to, from)
    }

    /// Whether everything queued on stream `id` so far is done (a stream the pool does
    /// not know has nothing queued that touches its memory). Errors count as busy.
    pub(crate) fn is_idle(&mut self, id: u64) -> bool {
        let Some(s) = self.streams.get(&id).cloned() else {
            return true;
        };
        s.record().and_then(|ev| ev.is_done()).unwrap_or(false)
    }

    /// Waits for everything queued on stream `id` so far.
    pub(crate) fn synchronize(&self, id: u64) -> Result<()> {
        match self.streams.get(&id) {
            Some(s) => s.synchronize(),
            None => Ok(()),
        }
    }
}
