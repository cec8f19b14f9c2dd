//! Copies between any two pieces of memory this layer owns, and the fences that keep
//! that memory alive until the copies using it are done.
//!
//! Owners ([`OwnedMemory`](super::OwnedMemory), [`VmmRegion`](super::VmmRegion))
//! implement [`CopyEnd`]: they say what an offset range is in the backend's terms
//! (after checking bounds and, for virtual memory, that it is mapped), and they carry
//! [`Fences`] that every asynchronous copy leaves behind and that their drop (or
//! unmapping) waits for. [`copy`] is then the one place that queues a copy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::sync::{OwnedEvent, OwnedStream, SharedBackend};
use crate::backend::{check_copy_stream, lock, MemRef};
use crate::error::{Error, Result};

/// The newest fence per stream that asynchronous copies left on a piece of memory.
#[derive(Debug, Default)]
pub(crate) struct Fences {
    /// By [`OwnedStream::id`]: a later copy on a stream supersedes an earlier one, and
    /// passed fences are pruned, so this stays as short as the streams in use.
    list: Mutex<Vec<(u64, Arc<OwnedEvent>)>>,
    /// Set when a copy may still use the memory but no fence could be left for it: the
    /// owner then leaks the memory rather than free it under the copy.
    leak: AtomicBool,
}

impl Fences {
    /// Blocks until every copy that left a fence here is done.
    ///
    /// The fences stay in the list while they are waited for, so a second caller
    /// (another thread reading the same buffer) waits for them too instead of finding
    /// an empty list; they are removed only once passed.
    pub(crate) fn wait(&self) -> Result<()> {
        if self.must_leak() {
            return Err(Error::Unfenced { what: "memory" });
        }
        let pending: Vec<Arc<OwnedEvent>> =
            lock(&self.list).iter().map(|(_, f)| f.clone()).collect();
        if pending.is_empty() {
            return Ok(());
        }
        for f in &pending {
            f.synchronize()?;
        }
        lock(&self.list).retain(|(_, f)| !pending.iter().any(|p| Arc::ptr_eq(p, f)));
        Ok(())
    }

    fn add(&self, stream: u64, fence: &Arc<OwnedEvent>) {
        let mut list = lock(&self.list);
        // Passed fences need no keeping; the query is cheap and keeps the list short for
        // memory that lives long and sees many streams.
        if list.len() >= 4 {
            list.retain(|(_, f)| !f.is_done().unwrap_or(false));
        }
        match list.iter_mut().find(|(s, _)| *s == stream) {
            Some(slot) => slot.1 = fence.clone(),
            None => list.push((stream, fence.clone())),
        }
    }

    /// Whether every copy that left a fence here is done, without waiting.
    pub(crate) fn all_done(&self) -> bool {
        lock(&self.list)
            .iter()
            .all(|(_, f)| f.is_done().unwrap_or(false))
    }

    /// Whether the memory must be leaked: a copy may use it and was never fenced.
    pub(crate) fn must_leak(&self) -> bool {
        self.leak.load(Ordering::Acquire)
    }

    pub(crate) fn mark_leak(&self) {
        self.leak.store(true, Ordering::Release);
    }
}

/// Memory a copy can read or write.
pub(crate) trait CopyEnd {
    /// The backend the memory belongs to.
    fn backend(&self) -> &SharedBackend;
    /// `offset..offset+len` as the backend addresses it; fails unless the range lies in
    /// the memory (and is mapped, for virtual memory).
    fn end(&self, offset: usize, len: usize) -> Result<MemRef>;
    /// The fences copies leave on this memory.
    fn fences(&self) -> &Fences;
}

/// A window `base..base+len` of another [`CopyEnd`] (a pool block inside its segment).
pub(crate) struct SubEnd<'a> {
    pub(crate) inner: &'a dyn CopyEnd,
    pub(crate) base: usize,
    pub(crate) len: usize,
}

impl CopyEnd for SubEnd<'_> {
    fn backend(&self) -> &SharedBackend {
        self.inner.backend()
    }

    fn end(&self, offset: usize, len: usize) -> Result<MemRef> {
        check_range(offset, len, self.len)?;
        self.inner.end(self.base + offset, len)
    }

    fn fences(&self) -> &Fences {
        self.inner.fences()
    }
}

/// Checks a copy of `len` bytes from `src[src_offset..]` to `dst[dst_offset..]` before
/// anything moves, and says what the two ranges are in the backend's terms: both ends
/// of one backend, both ranges inside their memory, and a stream that can queue the
/// copy: of the same backend (one manager's) and of a device the copy involves
/// ([`check_copy_stream`]). Every copy path runs it, whatever it then does (queued,
/// synchronous, within one buffer, zero bytes), so that what a copy accepts does not
/// depend on the path it takes.
pub(crate) fn check(
    dst: &dyn CopyEnd,
    dst_offset: usize,
    src: &dyn CopyEnd,
    src_offset: usize,
    len: usize,
    stream: Option<&OwnedStream>,
) -> Result<(MemRef, MemRef)> {
    let backend = dst.backend();
    if !Arc::ptr_eq(backend, src.backend()) {
        return Err(Error::ForeignHandle { what: "buffer" });
    }
    let d = dst.end(dst_offset, len)?;
    let s = src.end(src_offset, len)?;
    if let Some(st) = stream {
        if !Arc::ptr_eq(backend, st.backend()) {
            return Err(Error::ForeignHandle { what: "stream" });
        }
        check_copy_stream(&d, &s, st.device())?;
    }
    Ok((d, s))
}

/// Copies `len` bytes from `src[src_offset..]` to `dst[dst_offset..]`: synchronously
/// after every earlier copy that used either side, or queued on `stream` (ordered only
/// after the stream's earlier work, as in CUDA; other streams are ordered with events).
/// On a stream that is capturing a graph a copy between device memory is recorded into
/// the graph and left unfenced (see the body), and one with a host end is refused.
pub(crate) fn copy(
    dst: &dyn CopyEnd,
    dst_offset: usize,
    src: &dyn CopyEnd,
    src_offset: usize,
    len: usize,
    stream: Option<&OwnedStream>,
) -> Result<()> {
    let (d, s) = check(dst, dst_offset, src, src_offset, len, stream)?;
    let backend = dst.backend();
    if len == 0 {
        return Ok(());
    }
    if overlap(&d, &s, len) {
        return Err(Error::InvalidArgument(
            "source and destination ranges overlap".into(),
        ));
    }
    let Some(st) = stream else {
        dst.fences().wait()?;
        src.fences().wait()?;
        // SAFETY: both ranges were checked to lie in live memory (borrowed for the call)
        // and not to overlap; the copy is synchronous, so nothing outlives the borrow.
        return unsafe { backend.copy(d, s, len, None) };
    };
    // A per-thread default stream is the calling thread's here: its fence must not
    // replace another thread's (see `Fences::add`).
    let view = st.this_thread();
    let st: &OwnedStream = &view;
    if st.is_capturing()? {
        // A graph capture records the copy; it runs at each replay, not now. A fence
        // recorded here would be a captured event, which no one may query or wait for
        // (and an owner that waited for it would fail, or pull its stream into the
        // capture): none is left, so nothing keeps the memory alive for the replays.
        // Host memory freed under a replay would be written by the device: refused.
        if matches!(d, MemRef::Host { .. }) || matches!(s, MemRef::Host { .. }) {
            return Err(Error::StreamCapturing {
                what: "a copy to or from host memory on a capturing stream (replays would \
                       use the host memory after hetmem let go of it): copy before or \
                       after the capture"
                    .into(),
            });
        }
        // No fence: the copy runs at each replay, not now. SAFETY: both ranges lie in
        // live device memory (checked above), do not overlap, no host memory is touched,
        // and memory a graph outlives is its private pool's to keep.
        return unsafe { backend.copy(d, s, len, Some(st.handle())) };
    }
    // The fence exists before the copy is queued, so that only recording it can fail
    // once the copy is in flight.
    let fence = Arc::new(st.event()?);
    // SAFETY: as above for the ranges; the fence recorded below makes both owners wait
    // for this copy before they free or unmap the memory, and if it cannot be recorded
    // the stream is synchronised or both owners leak, so the memory outlives the copy.
    let queued = unsafe { backend.copy(d, s, len, Some(st.handle())) };
    // Fenced even when the copy failed: a copy cut into pieces (at registration edges)
    // may have queued some before one was refused, and they still use the memory.
    match fence.record_on(st) {
        Ok(()) => {
            dst.fences().add(st.id(), &fence);
            src.fences().add(st.id(), &fence);
            queued
        }
        Err(e) => {
            if st.synchronize().is_err() {
                dst.fences().mark_leak();
                src.fences().mark_leak();
            }
            queued.and(Err(e))
        }
    }
}

/// Whether two ranges of `len` bytes share a byte.
fn overlap(a: &MemRef, b: &MemRef, len: usize) -> bool {
    let span = |m: &MemRef| match *m {
        MemRef::Host { ptr, .. } => (None, ptr.as_ptr() as u64),
        MemRef::Device { device, ptr } => (Some(device), ptr.0),
    };
    let ((da, pa), (db, pb)) = (span(a), span(b));
    da == db && pa < pb + len as u64 && pb < pa + len as u64
}

pub(crate) fn check_range(offset: usize, len: usize, size: usize) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfBounds { offset, len, size }),
    }
}
