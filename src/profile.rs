//! The profiler's recorder: every event hetmem knows (allocations and frees per
//! placement, pool segments mapped and unmapped, out-of-memory with the largest free
//! block, budgets, tier-store loads, evictions, write-backs, acquires with their
//! prefetch outcome) written in the event format of [`crate::record`], and a small
//! shared-memory stats page per process for `prof top`.
//!
//! Turned on by `HETMEM_PROFILE=path` for any program that builds a
//! [`Manager`](crate::Manager) (Rust, the C ABI, Python; `%p` in the path is the process
//! id), or by [`start`]. `HETMEM_PROFILE_STACKS=N` samples the call site of every Nth
//! allocation of each thread (symbolised by the writer thread, not the caller);
//! `HETMEM_PROFILE_BUFFER=N` bounds the queue to `N` events (default 65,536, about 7 MiB);
//! `HETMEM_STATS_PAGE=1` publishes the stats page without recording.
//!
//! On the hot path an event costs a relaxed load when profiling is off; when it is on,
//! a read of the time-stamp counter (where Linux uses it as its clock source; else a
//! clock read), converted to the monotonic clock by the writer, and a `try_send` into
//! a bounded lock-free queue (std's array channel; the writer polls, so producers
//! never take its waker's lock). A full queue drops the event and counts it; the record says how many. One
//! background thread encodes chunks, writes them, and rewrites the stats page (a 4 KiB
//! file in `/dev/shm`, `hetmem-stats.<pid>`) five times a second.
//!
//! ```no_run
//! hetmem::profile::start(hetmem::profile::ProfileConfig::new("run.hrec"))?;
//! // ... allocate, stream ...
//! let s = hetmem::profile::finish()?;
//! assert_eq!(s.dropped, 0);
//! # Ok::<(), hetmem::Error>(())
//! ```

use std::cell::Cell;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::record::{self, ChunkEncoder, Event, EventKind, Header};

// The stats page's counters, and the time-stamp counter's conversion.
mod page;
mod tsc;
use page::Counters;
use tsc::Tsc;

/// Devices the stats page counts one by one (others add to the last).
pub const MAX_INDEX: usize = 8;
/// Bytes of the stats page.
pub const PAGE_BYTES: usize = 4096;
const DEFAULT_QUEUE: usize = 1 << 16;
/// How long the writer sleeps once it has drained the queue.
const NAP: Duration = Duration::from_millis(1);
const CHUNK_BYTES: usize = 256 << 10;
const FLUSH_EVERY: Duration = Duration::from_millis(50);
const PAGE_EVERY: Duration = Duration::from_millis(200);

/// What to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileConfig {
    /// The record file (`%p`: the process id); `None` publishes the stats page only.
    pub path: Option<PathBuf>,
    /// Sample the call site of every Nth allocation per thread (0: none).
    pub stack_every: u32,
    /// The most events queued for the writer; more are dropped and counted.
    pub queue_events: usize,
    /// Publish the stats page for `prof top`.
    pub stats_page: bool,
}

impl ProfileConfig {
    /// Record to `path`, with the stats page, no call stacks, the default queue.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ProfileConfig {
            path: Some(path.into()),
            stack_every: 0,
            queue_events: DEFAULT_QUEUE,
            stats_page: true,
        }
    }

    /// From `HETMEM_PROFILE`, `HETMEM_PROFILE_STACKS`, `HETMEM_PROFILE_BUFFER` and
    /// `HETMEM_STATS_PAGE`; `None` when none asks for anything.
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("HETMEM_PROFILE").filter(|p| !p.is_empty());
        let page = std::env::var("HETMEM_STATS_PAGE").is_ok_and(|v| v != "0" && !v.is_empty());
        if path.is_none() && !page {
            return None;
        }
        let num = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Some(ProfileConfig {
            path: path.map(PathBuf::from),
            stack_every: num("HETMEM_PROFILE_STACKS")
                .unwrap_or(0)
                .min(u32::MAX as u64) as u32,
            queue_events: num("HETMEM_PROFILE_BUFFER")
                .map_or(DEFAULT_QUEUE, |n| n.max(64) as usize),
            stats_page: true,
        })
    }
}

/// What a finished recording holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProfileSummary {
    /// Events written.
    pub events: u64,
    /// Events dropped (the queue was full).
    pub dropped: u64,
}

enum Msg {
    /// Nothing: sent once per slot at the start to fault the queue's pages in.
    Nop,
    Event(Event),
    /// A sampled call stack of `thread` at `time`, symbolised by the writer.
    Stack(u64, u32, Box<std::backtrace::Backtrace>),
    Open(Box<Session>),
    Close(SyncSender<ProfileSummary>),
    Flush(SyncSender<()>),
}

/// One recording: its file and what the writer keeps for it.
struct Session {
    out: Option<std::io::BufWriter<File>>,
    path: String,
    page: Option<(PathBuf, File)>,
    start_mono: u64,
}

struct Global {
    tx: SyncSender<Msg>,
    counters: Counters,
    dropped: AtomicU64,
    written: AtomicU64,
    /// The writer thread, woken from its nap by [`flush`] and [`finish`].
    writer: OnceLock<std::thread::Thread>,
}

/// Whether events are recorded (or counted for the stats page).
static ON: AtomicBool = AtomicBool::new(false);
/// Events are stamped with the CPU's time-stamp counter (the kernel's clock source, so
/// constant-rate and in step across CPUs), converted to the monotonic clock by the
/// writer: a counter read is about half a clock read here.
static USE_TSC: AtomicBool = AtomicBool::new(false);
static STACK_EVERY: AtomicU32 = AtomicU32::new(0);
/// The process that started the recording: a forked child records nothing.
static PID: AtomicU32 = AtomicU32::new(0);
static GLOBAL: OnceLock<Global> = OnceLock::new();
/// Serialises start and finish.
static CONTROL: Mutex<bool> = Mutex::new(false);

thread_local! {
    static TID: Cell<u32> = const { Cell::new(0) };
    static NTH: Cell<u32> = const { Cell::new(0) };
}

/// The monotonic clock in ns (the clock of the record's header, and of the shim's).
pub fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// An event's time: the time-stamp counter where [`USE_TSC`], else the monotonic clock.
#[inline(always)]
fn stamp() -> u64 {
    if USE_TSC.load(Ordering::Relaxed) {
        if let Some(t) = hetmem_sys::clock::tsc() {
            return t;
        }
    }
    now_ns()
}

fn tid() -> u32 {
    TID.with(|t| {
        let v = t.get();
        if v != 0 {
            return v;
        }
        let v = nix::unistd::gettid().as_raw() as u32;
        t.set(v);
        v
    })
}

/// The NUMA node a policy places on, where it names one.
pub fn node_of(policy: &crate::placement::NumaPolicy) -> Option<u32> {
    use crate::placement::NumaPolicy;
    match policy {
        NumaPolicy::Bind(n) | NumaPolicy::Preferred(n) => Some(*n),
        NumaPolicy::Interleave(ns) if ns.len() == 1 => Some(ns[0]),
        _ => None,
    }
}

/// Whether the recorder is on: callers build an event only then.
#[inline(always)]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Records the event `f` makes, if the recorder is on.
#[inline(always)]
pub fn emit(f: impl FnOnce() -> EventKind) {
    if enabled() {
        emit_now(f());
    }
}

#[inline(never)]
fn emit_now(kind: EventKind) {
    let Some(g) = GLOBAL.get() else { return };
    let stack = matches!(
        kind,
        EventKind::Alloc { .. } | EventKind::DeviceAlloc { .. }
    ) && sample_stack();
    let time_ns = stamp();
    let thread = tid();
    let e = Event {
        time_ns,
        thread,
        kind,
    };
    if let Err(TrySendError::Full(m)) = g.tx.try_send(Msg::Event(e)) {
        if !send_after_yield(&g.tx, m) {
            g.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    if stack {
        let bt = Box::new(std::backtrace::Backtrace::force_capture());
        if g.tx.try_send(Msg::Stack(time_ns, thread, bt)).is_err() {
            g.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A full queue: lets the writer run a little (twice), then gives up.
#[cold]
fn send_after_yield(tx: &SyncSender<Msg>, mut m: Msg) -> bool {
    for _ in 0..2 {
        std::thread::yield_now();
        match tx.try_send(m) {
            Ok(()) => return true,
            Err(TrySendError::Full(back)) => m = back,
            Err(TrySendError::Disconnected(_)) => return false,
        }
    }
    false
}

fn sample_stack() -> bool {
    let every = STACK_EVERY.load(Ordering::Relaxed);
    every != 0
        && NTH.with(|n| {
            let v = n.get() + 1;
            n.set(if v >= every { 0 } else { v });
            v >= every
        })
}

/// Stops recording in a forked child (the record and the page are the parent's).
/// Called from the fork handler the [`Manager`](crate::Manager) installs.
pub fn forked() {
    ON.store(false, Ordering::Relaxed);
}

fn global(queue: usize) -> Result<&'static Global> {
    if let Some(g) = GLOBAL.get() {
        return Ok(g);
    }
    let queue = queue.max(64);
    let (tx, rx) = mpsc::sync_channel::<Msg>(queue);
    // Touch every slot once now, so that the first events do not pay the page faults
    // of a queue of several MiB (the writer is not running yet).
    for _ in 0..queue {
        if tx.try_send(Msg::Nop).is_err() {
            break;
        }
    }
    while rx.try_recv().is_ok() {}
    let g = GLOBAL.get_or_init(|| Global {
        tx,
        counters: Counters::default(),
        dropped: AtomicU64::new(0),
        written: AtomicU64::new(0),
        writer: OnceLock::new(),
    });
    // Decided once, before any event is stamped.
    let tsc = (hetmem_sys::clock::tsc().is_some() && hetmem_sys::clock::tsc_is_clock_source())
        .then(Tsc::start);
    USE_TSC.store(tsc.is_some(), Ordering::Relaxed);
    let h = std::thread::Builder::new()
        .name("hetmem-profile".into())
        .spawn(move || writer(rx, tsc))
        .map_err(|e| Error::Config {
            path: "profile".into(),
            reason: format!("cannot start the writer thread: {e}"),
        })?;
    let _ = g.writer.set(h.thread().clone());
    Ok(g)
}

/// Wakes the writer from its nap (for a flush or the end of a recording).
fn wake(g: &Global) {
    if let Some(t) = g.writer.get() {
        t.unpark();
    }
}

/// Starts recording (one recording per process at a time).
///
/// Errors: [`Error::Config`] when a recording is on already, the file cannot be made,
/// or the writer thread cannot start.
pub fn start(cfg: ProfileConfig) -> Result<()> {
    let mut on = CONTROL.lock().unwrap_or_else(|e| e.into_inner());
    if *on {
        return Err(Error::Config {
            path: "profile".into(),
            reason: "a recording is on already".into(),
        });
    }
    let pid = std::process::id();
    let cfg_err = |path: &Path, e: std::io::Error| Error::Config {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let start_mono = now_ns();
    let (out, path) = match &cfg.path {
        Some(p) => {
            let p = PathBuf::from(p.to_string_lossy().replace("%p", &pid.to_string()));
            let mut f = File::create(&p).map_err(|e| cfg_err(&p, e))?;
            let wall = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let header = Header {
                version: record::VERSION,
                flags: record::FLAG_ALL
                    | if cfg.stack_every > 0 {
                        record::FLAG_STACKS
                    } else {
                        0
                    },
                pid,
                page_size: 4096,
                start_unix_ns: wall,
                start_mono_ns: start_mono,
                threshold: 0,
            };
            f.write_all(&header.encode()).map_err(|e| cfg_err(&p, e))?;
            (
                Some(std::io::BufWriter::with_capacity(1 << 20, f)),
                p.to_string_lossy().into_owned(),
            )
        }
        None => (None, String::new()),
    };
    let page = if cfg.stats_page {
        let p = stats_dir().join(format!("hetmem-stats.{pid}"));
        match File::create(&p) {
            Ok(f) => Some((p, f)),
            Err(e) => {
                tracing::warn!(target: "hetmem", path = %p.display(), error = %e,
                    "no stats page for prof top");
                None
            }
        }
    } else {
        None
    };
    // The queue's bound is the channel's: one channel per process, made at the first
    // start; later starts keep it.
    let g = global(cfg.queue_events)?;
    g.dropped.store(0, Ordering::Relaxed);
    g.written.store(0, Ordering::Relaxed);
    let session = Session {
        out,
        path,
        page,
        start_mono,
    };
    g.tx.send(Msg::Open(Box::new(session)))
        .map_err(|_| Error::Config {
            path: "profile".into(),
            reason: "the writer thread is gone".into(),
        })?;
    PID.store(pid, Ordering::Relaxed);
    STACK_EVERY.store(cfg.stack_every, Ordering::Relaxed);
    ON.store(true, Ordering::Release);
    *on = true;
    tracing::info!(target: "hetmem", path = ?cfg.path, "profiling on");
    Ok(())
}

/// Starts recording as the environment asks (`HETMEM_PROFILE`, module docs), once per
/// process; returns whether it did.
pub fn start_from_env() -> bool {
    static ONCE: OnceLock<bool> = OnceLock::new();
    *ONCE.get_or_init(|| match ProfileConfig::from_env() {
        Some(cfg) => match start(cfg) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(target: "hetmem", error = %e, "HETMEM_PROFILE: not recording");
                false
            }
        },
        None => false,
    })
}

/// Where stats pages are: `HETMEM_STATS_DIR`, else `/dev/shm` (else the temporary
/// directory).
pub fn stats_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HETMEM_STATS_DIR").filter(|d| !d.is_empty()) {
        return d.into();
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.into()
    } else {
        std::env::temp_dir()
    }
}

/// Writes what is queued so far to the file (waits up to a second).
pub fn flush() {
    let Some(g) = GLOBAL.get() else { return };
    let (tx, rx) = mpsc::sync_channel(1);
    if g.tx.send(Msg::Flush(tx)).is_ok() {
        wake(g);
        let _ = rx.recv_timeout(Duration::from_secs(1));
    }
}

/// Stops recording: writes what is queued and the end event, closes the file and
/// removes the stats page. Safe to call when nothing is recorded (returns zeros).
///
/// Errors: [`Error::Config`] when the writer did not answer within five seconds.
pub fn finish() -> Result<ProfileSummary> {
    let mut on = CONTROL.lock().unwrap_or_else(|e| e.into_inner());
    if !*on {
        return Ok(ProfileSummary::default());
    }
    ON.store(false, Ordering::Release);
    *on = false;
    let Some(g) = GLOBAL.get() else {
        return Ok(ProfileSummary::default());
    };
    let (tx, rx) = mpsc::sync_channel(1);
    let lost = || Error::Config {
        path: "profile".into(),
        reason: "the writer thread did not finish the record".into(),
    };
    g.tx.send(Msg::Close(tx)).map_err(|_| lost())?;
    wake(g);
    rx.recv_timeout(Duration::from_secs(5)).map_err(|_| lost())
}

/// The end of the process (an `atexit` handler the [`Manager`](crate::Manager)
/// installs): [`finish`], errors logged.
pub fn at_exit() {
    if PID.load(Ordering::Relaxed) != std::process::id() {
        return;
    }
    if let Err(e) = finish() {
        tracing::warn!(target: "hetmem", error = %e, "profile not finished at exit");
    }
}

/// The frames of a sampled stack worth showing, innermost first, at most eight: the
/// hetmem function the caller called, then the caller's, without the standard
/// library's or the runtime's.
fn site_text(bt: &std::backtrace::Backtrace) -> String {
    let text = bt.to_string();
    let mut frames = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some((n, name)) = line.split_once(": ") else {
            continue;
        };
        if n.parse::<u32>().is_err() {
            continue;
        }
        let skip = [
            "std::",
            "core::",
            "alloc::",
            "hetmem::profile",
            "<alloc::",
            "<core::",
            "<std::",
            "<&dyn ",
            "__libc",
            "_start",
            "__rust",
            "main",
        ];
        if skip.iter().any(|s| name.starts_with(s)) && name != "main" {
            continue;
        }
        // Without the hash suffix rustc adds.
        let name = match name.rfind("::h") {
            Some(i) if name.len() - i == 19 => &name[..i],
            _ => name,
        };
        frames.push(name.to_owned());
        if frames.len() == 32 {
            break;
        }
    }
    // From the outermost of hetmem's own frames (the API the caller used) outwards.
    let own = |f: &String| f.starts_with("hetmem::") || f.starts_with("<hetmem::");
    let first_user = frames.iter().position(|f| !own(f)).unwrap_or(0);
    let from = first_user.saturating_sub(1);
    frames[from..]
        .iter()
        .take(8)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n")
}

fn writer(rx: Receiver<Msg>, mut tsc: Option<Tsc>) {
    let g = GLOBAL.get().expect("made before the writer");
    let mut s: Option<Session> = None;
    let mut enc = ChunkEncoder::new();
    let mut last_flush = Instant::now();
    let mut last_page = Instant::now();
    let mut reported_dropped = 0u64;
    let mut idle;
    loop {
        idle = true;
        let mut emptied = false;
        if let Some(c) = &mut tsc {
            c.update();
        }
        let to_ns = |t: u64| tsc.as_ref().map_or(t, |c| c.ns(t));
        for _ in 0..4096 {
            match rx.try_recv() {
                Ok(m) => {
                    idle = false;
                    match m {
                        Msg::Nop => {}
                        Msg::Event(mut e) => {
                            // Counted here, off the producers' path (events dropped
                            // from a full queue are not in the page's figures).
                            g.counters.apply(&e.kind);
                            if let Some(sess) = &s {
                                e.time_ns = to_ns(e.time_ns).saturating_sub(sess.start_mono);
                                enc.push(&e);
                            }
                        }
                        Msg::Stack(t, thread, bt) => {
                            if let Some(sess) = &s {
                                let text = site_text(&bt);
                                enc.push(&Event {
                                    time_ns: to_ns(t).saturating_sub(sess.start_mono),
                                    thread,
                                    kind: EventKind::Site { text },
                                });
                            }
                        }
                        Msg::Open(sess) => {
                            enc.clear();
                            reported_dropped = 0;
                            s = Some(*sess);
                        }
                        Msg::Flush(ack) => {
                            if let Some(sess) = &mut s {
                                write_chunk(g, sess, &mut enc, &mut reported_dropped, false);
                            }
                            let _ = ack.send(());
                        }
                        Msg::Close(ack) => {
                            let mut sum = ProfileSummary::default();
                            if let Some(mut sess) = s.take() {
                                write_chunk(g, &mut sess, &mut enc, &mut reported_dropped, true);
                                sum = ProfileSummary {
                                    events: g.written.load(Ordering::Relaxed),
                                    dropped: g.dropped.load(Ordering::Relaxed),
                                };
                                if let Some((p, _)) = sess.page.take() {
                                    let _ = std::fs::remove_file(p);
                                }
                            }
                            let _ = ack.send(sum);
                        }
                    }
                    if enc.bytes() >= CHUNK_BYTES {
                        if let Some(sess) = &mut s {
                            write_chunk(g, sess, &mut enc, &mut reported_dropped, false);
                        }
                    }
                }
                Err(TryRecvError::Empty) => {
                    emptied = true;
                    break;
                }
                Err(TryRecvError::Disconnected) => return,
            }
        }
        if let Some(sess) = &mut s {
            if last_flush.elapsed() >= FLUSH_EVERY {
                write_chunk(g, sess, &mut enc, &mut reported_dropped, false);
                last_flush = Instant::now();
            }
            if last_page.elapsed() >= PAGE_EVERY {
                if let Some((_, f)) = &sess.page {
                    let text = g.counters.page(
                        std::process::id(),
                        g.written.load(Ordering::Relaxed),
                        g.dropped.load(Ordering::Relaxed),
                        &sess.path,
                    );
                    let mut buf = text.into_bytes();
                    buf.resize(PAGE_BYTES, 0);
                    use std::os::unix::fs::FileExt;
                    let _ = f.write_all_at(&buf[..PAGE_BYTES], 0);
                }
                last_page = Instant::now();
            }
        }
        // Drained: let the producers fill the queue alone for a while (draining as
        // they write would bounce its cache lines between the cores on every event).
        if emptied || idle {
            std::thread::park_timeout(NAP);
        }
    }
}

/// Writes the chunk (with a dropped event if more were lost, and the end event when
/// `end`), and flushes the file.
fn write_chunk(
    g: &Global,
    sess: &mut Session,
    enc: &mut ChunkEncoder,
    reported: &mut u64,
    end: bool,
) {
    let dropped = g.dropped.load(Ordering::Relaxed);
    let t = now_ns().saturating_sub(sess.start_mono);
    let thread = tid();
    if dropped > *reported {
        enc.push(&Event {
            time_ns: t,
            thread,
            kind: EventKind::Dropped {
                count: dropped - *reported,
            },
        });
        *reported = dropped;
    }
    if end {
        let events = g.written.load(Ordering::Relaxed) + u64::from(enc.len());
        enc.push(&Event {
            time_ns: t,
            thread,
            kind: EventKind::End { events, dropped },
        });
    }
    if enc.is_empty() {
        return;
    }
    g.written.fetch_add(u64::from(enc.len()), Ordering::Relaxed);
    if let Some(out) = &mut sess.out {
        let res = out.write_all(enc.finish()).and_then(|_| out.flush());
        if let Err(e) = res {
            tracing::warn!(target: "hetmem", error = %e, "profile record not written; recording stops");
            sess.out = None;
        }
    }
    enc.clear();
}
