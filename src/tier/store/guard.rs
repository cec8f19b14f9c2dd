//! Acquiring a parameter ([`TierStore::acquire`]) and the [`ParamGuard`] that holds it:
//! the step of the sequence it runs, the load it waits for, the acquire on a capturing
//! stream, and the end of the use its drop records.

use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use super::evict::{load, Need};
use super::run::run_plan;
use super::state::*;
use super::{ParamGuard, TierStore};
use crate::backend::DevicePtr;
use crate::error::{Error, Result};
use crate::placement::MemKind;
use crate::pool::PoolBlock;
use crate::stream::Stream;
use crate::tier::policy::ParamId;

/// The message of an acquire refused on a capturing stream.
fn not_resident_in_capture(id: ParamId, name: &str) -> Error {
    Error::StreamCapturing {
        what: format!(
            "acquiring parameter {id} ({name}), which is not on the device, on a capturing \
             stream: its load would be recorded into the graph and pull the store's copy \
             stream into the capture. Acquire it before the capture begins, and keep it \
             resident while the graph lives"
        ),
    }
}

impl TierStore {
    /// Makes parameter `id` usable on the device for work queued on `stream` from now
    /// on: loads it if needed (evicting others), makes `stream` wait for the load
    /// (the host does not wait, except on the cold staging path), and then prefetches
    /// the next parameters of the sequence within the budget.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown id or a stream of another device;
    /// [`Error::ForeignHandle`] for a stream of another manager (both before anything
    /// is loaded); [`Error::OutOfMemory`] when there is no room: every device-resident
    /// parameter is acquired or kept resident (nothing is evicted then). Where other
    /// threads' guards will make room, [`TierStore::acquire_timeout`] waits.
    /// [`Error::Checksum`] when checksums are on and the load's bytes are wrong (see
    /// [`TierConfig::checksums`](crate::TierConfig::checksums)). Errors of the copy, the staging ring or the pool pass
    /// through. A failed acquire is not a step of the sequence: retrying it is not a
    /// deviation. On a stream capturing a graph, resident parameters only
    /// ([`Error::StreamCapturing`] for others: see the module docs, "Graph capture").
    pub fn acquire(&self, id: ParamId, stream: &Stream) -> Result<ParamGuard> {
        self.acquire_until(id, stream, None)
    }

    /// [`TierStore::acquire`], but when there is no room it waits up to `timeout` for
    /// guards to be released (by other threads: this thread's own guards cannot be
    /// released while it waits) or hints to free some.
    ///
    /// # Errors
    /// As [`TierStore::acquire`]; [`Error::OutOfMemory`] once `timeout` has passed.
    pub fn acquire_timeout(
        &self,
        id: ParamId,
        stream: &Stream,
        timeout: Duration,
    ) -> Result<ParamGuard> {
        self.acquire_until(id, stream, Some(Instant::now() + timeout))
    }

    fn acquire_until(
        &self,
        id: ParamId,
        stream: &Stream,
        deadline: Option<Instant>,
    ) -> Result<ParamGuard> {
        let sh = &self.shared;
        sh.live()?;
        let setup = &sh.setup;
        // Before anything changes: a stream this store cannot order work on.
        if !stream.belongs_to(setup.copy.inner.backend()) {
            return Err(Error::ForeignHandle { what: "stream" });
        }
        if stream.device() != setup.device {
            return Err(Error::InvalidArgument(format!(
                "a stream of device {} used with the store of device {}",
                stream.device(),
                setup.device
            )));
        }
        if stream.is_capturing()? {
            return self.acquire_in_capture(id, stream);
        }
        let mut st = sh.lock();
        param(&st, id)?;
        let token = learn_from_acquire(setup, &mut st, id);
        st.acquires += 1;
        let nth = st.acquires;
        // Where the sequence stood: an acquire that fails has not run its step, so that
        // a retry is not taken for a step off the sequence (or recorded twice).
        let (pos, step, served, on_track) = (
            st.cursor.pos(),
            st.progress.step,
            st.progress.served,
            st.progress.on_track,
        );
        // An empty parameter is always where it is needed.
        let hit = st.params[id as usize].dev.is_some() || st.params[id as usize].size == 0;
        let next = st.cursor.next_use(id);
        st.progress.on_track = next == Some(1);
        if let Some(d) = next {
            if d != 1 {
                // Not the step the plan expects: start it again from here.
                st.progress.plan = None;
            }
            st.progress.step += d as u64;
            st.progress.served = false;
        }
        st.cursor.touch(id);
        let (mut st, made) = self.make_resident(st, id, stream, deadline);
        if let Err(e) = made {
            let st = &mut *st;
            // Unless other threads' acquires moved the sequence on while this one waited
            // (then it stays where they left it).
            if st.acquires == nth {
                st.cursor.rewind(pos);
                (st.progress.step, st.progress.served, st.progress.on_track) =
                    (step, served, on_track);
            }
            // Resumes from what is resident when the retry comes.
            st.progress.plan = None;
            if let Some(t) = token {
                st.learner.unobserve(t);
            }
            return Err(e);
        }
        if hit {
            st.stats.hits += 1;
        } else {
            st.stats.misses += 1;
        }
        crate::profile::emit(|| prof_acquire(&st, id, hit));
        // The loads queued ahead for the steps run now have been used (only once the
        // acquire stands: a failed one has not run its step).
        let now = st.progress.step;
        st.progress.ahead.retain(|(m, _)| *m > now);
        let p = &mut st.params[id as usize];
        // Made resident above, unless empty (then there is no block).
        debug_assert!(p.dev.is_some() || p.size == 0);
        // No record_stream with the pool: the guard's drop records the use's end, and
        // every path that gives the block back waits the copy stream on those events
        // first (`release_block`). Recording would keep every caller's stream alive in
        // the pool and make a freed block wait for all later work on them.
        let block = p.dev.as_ref().map(|dev| Arc::clone(&dev.block));
        p.refs += 1;
        let size = p.size;
        st.progress.served = true;
        let guard = ParamGuard {
            shared: Arc::clone(sh),
            id,
            block,
            size,
            // A per-thread default stream: the acquiring thread's, which the guard's
            // drop records the end of the use on (or, dropped on another thread that
            // cannot name it, waits for the device).
            stream: stream.this_thread().into_owned(),
            dirty: false,
        };
        if let Err(e) = run_plan(setup, &mut st, setup.prefetch_depth) {
            tracing::warn!(target: "hetmem", error = %e, "prefetch failed");
        }
        Ok(guard)
    }

    /// An acquire on a stream that is capturing a graph: a resident parameter only, its
    /// load and last write waited for on the host (their events were recorded outside
    /// the capture, which the stream may not wait for), no step of the sequence, no
    /// prefetch.
    fn acquire_in_capture(&self, id: ParamId, stream: &Stream) -> Result<ParamGuard> {
        let sh = &self.shared;
        let mut st = sh.lock();
        let p = param(&st, id)?;
        let block = match p.dev.as_ref() {
            Some(dev) => {
                if !dev.ready.is_done()? {
                    dev.ready.synchronize()?;
                }
                if let Some(w) = &p.written {
                    if !w.is_done()? {
                        w.synchronize()?;
                    }
                }
                Some(Arc::clone(&dev.block))
            }
            // Nothing to load: served like a resident one.
            None if p.size == 0 => None,
            None => return Err(not_resident_in_capture(id, &p.name)),
        };
        let size = p.size;
        st.params[id as usize].refs += 1;
        st.stats.hits += 1;
        tracing::debug!(target: "hetmem", id, "acquired on a capturing stream");
        Ok(ParamGuard {
            shared: Arc::clone(sh),
            id,
            block,
            size,
            stream: stream.clone(),
            dirty: false,
        })
    }

    /// For an acquire: loads `id` (the plan's load, or a demand load), waiting until
    /// `deadline` for room, and makes `stream` wait for the load.
    fn make_resident<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        id: ParamId,
        stream: &Stream,
        deadline: Option<Instant>,
    ) -> (MutexGuard<'a, State>, Result<()>) {
        let sh = &self.shared;
        let setup = &sh.setup;
        // Under a sequence the plan loads the step's parameter (normally long before);
        // otherwise, or when the plan cannot make room, a demand load.
        match run_plan(setup, &mut st, 0) {
            // An empty parameter has nothing to load or wait for.
            _ if st.params[id as usize].size == 0 => return (st, Ok(())),
            // Loading it again on demand would hand the same verdict over twice the copies.
            Err(e @ Error::Checksum { param, .. }) if param == id => return (st, Err(e)),
            Err(e) => tracing::warn!(target: "hetmem", id, error = %e, "the plan's load failed"),
            Ok(_) => {}
        }
        while st.params[id as usize].dev.is_none() {
            match load(setup, &mut st, id, Need::Demand) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => return (st, Err(e)),
            }
            // No room: everything resident is acquired or kept.
            let wait = deadline.and_then(|d| d.checked_duration_since(Instant::now()));
            match wait {
                Some(left) if !left.is_zero() => {
                    st = sh
                        .released
                        .wait_timeout(st, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                _ => {
                    let free = setup.device_budget.saturating_sub(st.used);
                    let size = st.params[id as usize].size;
                    return (
                        st,
                        Err(Error::oom(MemKind::Device(setup.device), size, free)),
                    );
                }
            }
        }
        let p = &st.params[id as usize];
        let ready = &p.dev.as_ref().expect("loaded").ready;
        let mut waited = stream.wait(ready);
        if let (Ok(()), Some(w)) = (&waited, &p.written) {
            waited = stream.wait(w);
        }
        (st, waited)
    }
}

impl ParamGuard {
    /// The parameter.
    pub fn id(&self) -> ParamId {
        self.id
    }

    /// The device address; null (0) for an empty parameter, which has no memory.
    pub fn ptr(&self) -> DevicePtr {
        self.block().map_or(DevicePtr(0), |b| b.ptr())
    }

    /// The parameter's size in bytes.
    pub fn len(&self) -> usize {
        self.size
    }

    /// Whether the parameter is empty (a zero-element tensor of a file: see
    /// [`TierStore::register_safetensors`]).
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The device block (for synchronous reads and writes in tests and set-up); `None`
    /// for an empty parameter. It may be longer than the parameter: large ones take
    /// whole pages.
    pub fn block(&self) -> Option<&PoolBlock> {
        self.block.as_deref()
    }

    /// The stream the guard was acquired for (for a wrapped per-thread default stream,
    /// the acquiring thread's, usable on that thread only).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Says the device copy will be written by work queued on the guard's stream after
    /// this call: it is copied back to the host before it is dropped, and acquires made
    /// after this guard is dropped (on any stream) wait for the write.
    ///
    /// The guard's stream is ordered after the uses of the parameter that have ended
    /// (guards dropped, on any stream), so the write does not overtake them. Uses that
    /// are still going on (live guards on other streams) are the caller's to order. On
    /// a capturing stream the host waits for those uses instead (the stream may not
    /// wait for events recorded outside the capture).
    pub fn mark_dirty(&mut self) {
        // An empty parameter has no bytes to write; a forked child must not touch the
        // driver or the store's lock (a thread of the parent may have held it).
        if self.dirty || self.size == 0 || self.shared.live().is_err() {
            return;
        }
        self.dirty = true;
        let st = self.shared.lock();
        if self.stream.is_capturing().unwrap_or(false) {
            for e in &st.params[self.id as usize].uses {
                if let Err(err) = e.synchronize() {
                    tracing::error!(target: "hetmem", id = self.id, error = %err,
                        "cannot wait for an earlier use before a captured write");
                }
            }
            return;
        }
        for e in &st.params[self.id as usize].uses {
            if let Err(err) = self.stream.wait(e) {
                // Wait on the host instead: the write must not start before the read.
                tracing::error!(target: "hetmem", id = self.id, error = %err,
                    "cannot order a write after earlier uses on the device; waiting");
                if let Err(err) = e.synchronize() {
                    tracing::error!(target: "hetmem", id = self.id, error = %err,
                        "cannot wait for an earlier use either");
                }
            }
        }
    }

    /// [`Error::Forked`] in a forked child (see [`TierStore::check_fork`]).
    pub(crate) fn check_fork(&self) -> Result<()> {
        self.shared.live()
    }

    /// Ends the use (the same as dropping the guard).
    pub fn release(self) {}
}

impl Drop for ParamGuard {
    fn drop(&mut self) {
        if self.shared.live().is_err() {
            // A forked child: no driver call, no lock; the block and stream leak.
            return;
        }
        if self.size == 0 {
            // An empty parameter: no memory whose reuse must wait for the use.
            let mut st = self.shared.lock();
            let p = &mut st.params[self.id as usize];
            p.refs = p.refs.saturating_sub(1);
            drop(st);
            self.shared.released.notify_all();
            return;
        }
        // (An error: the usual path, which synchronises where it cannot record.)
        if self.stream.is_capturing().unwrap_or(false) {
            // The use is work of the graph, which runs at replays, not now: no event
            // to record (a captured one could be neither queried nor waited for).
            self.block = None;
            let mut st = self.shared.lock();
            let p = &mut st.params[self.id as usize];
            p.refs = p.refs.saturating_sub(1);
            p.dirty |= self.dirty;
            drop(st);
            self.shared.released.notify_all();
            return;
        }
        // A write's end is kept apart too: later acquires wait for it.
        let written = if self.dirty {
            self.stream.record().ok()
        } else {
            None
        };
        let done = match self.stream.record() {
            Ok(e) => Some(e),
            Err(e) => {
                // No event: wait for the work instead, so the memory is never reused
                // under it.
                tracing::error!(target: "hetmem", id = self.id, error = %e,
                    "cannot record the end of a parameter's use; synchronising");
                if let Err(e) = self.stream.synchronize() {
                    tracing::error!(target: "hetmem", id = self.id, error = %e,
                        "cannot synchronise the stream either");
                }
                None
            }
        };
        // Let go of the block first, so that the run_plan below can reuse it.
        self.block = None;
        let mut st = self.shared.lock();
        let p = &mut st.params[self.id as usize];
        p.refs = p.refs.saturating_sub(1);
        p.dirty |= self.dirty;
        if self.dirty {
            if written.is_none() && done.is_some() {
                // No event for the write's end: wait for it here, so that no later
                // reader can overtake it.
                if let Err(e) = self.stream.synchronize() {
                    tracing::error!(target: "hetmem", id = self.id, error = %e,
                        "cannot wait for a write's end");
                }
            }
            // Without an event the stream was synchronised: nothing to wait for.
            p.written = written.filter(|_| done.is_some());
        }
        if let Some(e) = done {
            if p.uses.len() >= 4 {
                p.uses.retain(|e| !e.is_done().unwrap_or(false));
            }
            p.uses.push(e);
        }
        st.last_released = Some(self.id);
        // The end of this use may free the memory the next load of the plan waits for.
        if let Err(e) = run_plan(
            &self.shared.setup,
            &mut st,
            self.shared.setup.prefetch_depth,
        ) {
            tracing::warn!(target: "hetmem", error = %e, "prefetch failed");
        }
        drop(st);
        self.shared.released.notify_all();
    }
}

/// The profiler's acquire event: a miss, a hit whose load is done, or one still in
/// flight (a late prefetch).
fn prof_acquire(st: &State, id: ParamId, hit: bool) -> crate::record::EventKind {
    use crate::record::acquire;
    let p = &st.params[id as usize];
    let outcome = if !hit {
        acquire::MISS
    } else if p
        .dev
        .as_ref()
        .is_some_and(|d| !d.ready.is_done().unwrap_or(true))
    {
        acquire::LATE
    } else {
        acquire::HIT
    };
    crate::record::EventKind::Acquire {
        id: u64::from(id),
        bytes: p.size as u64,
        outcome,
    }
}
