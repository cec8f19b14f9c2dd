//! Simulated streams and events: the legacy and per-thread default streams' implicit
//! ordering, and graph capture with the CUDA driver's error codes.

use super::State;
use crate::backend::{per_thread_device, thread_key, BackendKind, EventHandle, StreamHandle};
use crate::error::{Error, Result};

#[derive(Debug)]
pub(super) struct StreamState {
    pub(super) device: usize,
    pub(super) tail_ns: u64,
    pub(super) kind: StreamKind,
    /// The capture recording this stream's work, if any.
    pub(super) capture: Option<u64>,
}

/// How a stream takes part in the legacy default stream's implicit ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamKind {
    /// A stream made by [`Backend::create_stream`]: non-blocking, as hetmem makes them
    /// on the drivers (no implicit ordering).
    NonBlocking,
    /// A device's default stream (raw handle 0 or 1): its work waits for the blocking
    /// streams' work queued before, and theirs for its.
    Legacy,
    /// One thread's per-thread default stream (raw handle 2): a blocking stream.
    PerThread,
}

#[derive(Debug)]
pub(super) struct EventState {
    pub(super) device: usize,
    /// `None` until recorded; an unrecorded event counts as passed, as in CUDA.
    pub(super) time_ns: Option<u64>,
    /// The capture it was last recorded in, if its last recording was captured.
    pub(super) captured: Option<u64>,
}

/// A capture under way ([`SimBackend::begin_capture`]).
#[derive(Debug)]
pub(super) struct Capture {
    /// The stream it began on (and must end on).
    pub(super) origin: u64,
    /// An illegal call was made: ending it fails.
    pub(super) invalidated: bool,
}

/// The stream a handle names for the calling thread: an imported per-thread default
/// stream is the calling thread's own (made at its first use), any other handle itself.
pub(super) fn resolve_stream(st: &mut State, s: StreamHandle) -> StreamHandle {
    let Some(device) = per_thread_device(s) else {
        return s;
    };
    let key = (device, thread_key());
    if let Some(&h) = st.per_thread.get(&key) {
        return StreamHandle(h);
    }
    let h = new_stream(st, device, StreamKind::PerThread);
    st.per_thread.insert(key, h);
    StreamHandle(h)
}

pub(super) fn new_stream(st: &mut State, device: usize, kind: StreamKind) -> u64 {
    let h = st.next_handle;
    st.next_handle += 1;
    let tail_ns = st.host_ns;
    st.streams.insert(
        h,
        StreamState {
            device,
            tail_ns,
            kind,
            capture: None,
        },
    );
    h
}

/// The latest end of the work queued so far on `device`'s legacy default stream and
/// blocking (per-thread) streams: what work on the legacy stream, and a synchronous
/// copy (as `cuMemcpy`), starts after.
pub(super) fn legacy_barrier(st: &State, device: usize) -> u64 {
    st.streams
        .values()
        .filter(|s| s.device == device && s.kind != StreamKind::NonBlocking)
        .map(|s| s.tail_ns)
        .max()
        .unwrap_or(0)
}

/// When work queued now on (resolved) stream `s` may start, by its own order and the
/// legacy stream's implicit one: legacy work after every blocking stream's, blocking
/// streams' work after the legacy stream's.
pub(super) fn ready_ns(st: &State, s: StreamHandle) -> Result<u64> {
    let state = stream_ref(st, s)?;
    Ok(match state.kind {
        StreamKind::NonBlocking => state.tail_ns,
        StreamKind::Legacy => legacy_barrier(st, state.device),
        StreamKind::PerThread => st
            .default_streams
            .get(&state.device)
            .and_then(|l| st.streams.get(l))
            .map_or(state.tail_ns, |l| state.tail_ns.max(l.tail_ns)),
    })
}

pub(super) fn stream_ref(st: &State, s: StreamHandle) -> Result<&StreamState> {
    st.streams.get(&s.0).ok_or(Error::UnknownHandle {
        what: "sim stream",
        handle: s.0,
    })
}

pub(super) fn stream_mut(st: &mut State, s: StreamHandle) -> Result<&mut StreamState> {
    st.streams.get_mut(&s.0).ok_or(Error::UnknownHandle {
        what: "sim stream",
        handle: s.0,
    })
}

pub(super) fn event_ref(st: &State, e: EventHandle) -> Result<&EventState> {
    st.events.get(&e.0).ok_or(Error::UnknownHandle {
        what: "sim event",
        handle: e.0,
    })
}

/// `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED`: not permitted while a stream is capturing.
pub const CAPTURE_UNSUPPORTED: i32 = 900;
/// `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED`: an earlier illegal call invalidated it.
pub const CAPTURE_INVALIDATED: i32 = 901;
/// `CUDA_ERROR_STREAM_CAPTURE_MERGE`: a wait would merge two captures.
pub const CAPTURE_MERGE: i32 = 902;
/// `CUDA_ERROR_STREAM_CAPTURE_UNMATCHED`: the capture did not begin on this stream.
pub const CAPTURE_UNMATCHED: i32 = 903;
/// `CUDA_ERROR_STREAM_CAPTURE_ISOLATION`: a wait would cross the capture's boundary
/// (a capturing stream waiting for an event recorded outside the capture).
pub const CAPTURE_ISOLATION: i32 = 905;
/// `CUDA_ERROR_CAPTURED_EVENT`: not permitted on an event last recorded in a capture.
pub const CAPTURED_EVENT: i32 = 907;

/// Refuses an illegal call: invalidates `captures` and counts it.
pub(super) fn capture_violation(
    st: &mut State,
    captures: &[u64],
    call: &'static str,
    code: i32,
    what: &str,
) -> Error {
    for c in captures {
        if let Some(c) = st.captures.get_mut(c) {
            c.invalidated = true;
        }
    }
    st.stats.capture_violations += 1;
    Error::Driver {
        backend: BackendKind::Sim,
        call,
        code,
        message: format!("{what} (the capture is invalidated)"),
    }
}

/// Refuses a call that synchronises the device implicitly while any capture is under
/// way (CUDA's global capture mode forbids them from every thread).
pub(super) fn refuse_during_capture(st: &mut State, call: &'static str) -> Result<()> {
    if st.captures.is_empty() {
        return Ok(());
    }
    let all: Vec<u64> = st.captures.keys().copied().collect();
    Err(capture_violation(
        st,
        &all,
        call,
        CAPTURE_UNSUPPORTED,
        "a call that synchronises the device, made while a stream is capturing",
    ))
}

/// Moves the host's clock to when every stream of `device` has finished its queued work.
pub(super) fn wait_device(st: &mut State, device: usize) {
    let tail = st
        .streams
        .values()
        .filter(|s| s.device == device)
        .map(|s| s.tail_ns)
        .max()
        .unwrap_or(0);
    st.host_ns = st.host_ns.max(tail);
}
