//! The event recorder: hooks put fixed-size slots into bounded queues (a few shards,
//! picked by thread, each a multi-producer ring with per-slot sequence numbers); one
//! background thread (a raw pthread, signals blocked) drains them every millisecond,
//! encodes the compact format of [`hetmem::record`] and writes whole chunks to the
//! file. Memory is bounded by `HETMEM_RECORD_BUFFER` (mapped once, not malloc'd). A
//! producer that finds its shard full yields a little for the writer, then drops the
//! event and counts it (the record says how many). Nothing here blocks for long or
//! allocates through the hooks; the thread id is cached in a `const` thread-local
//! without a destructor, reset in a forked child. A forked child records nothing (the
//! file is the parent's). At exit the remaining events are written with an end event.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use hetmem::record::{self, ChunkEncoder, Event, EventKind, Header, Placement};

use crate::config::{Config, Small};
use crate::lock::Lock;

const SHARDS: usize = 8;
/// Words of data per slot (after the sequence word).
const WORDS: usize = 7;
/// Slot kinds (word 4, low byte).
const S_ALLOC: u64 = 1;
const S_FREE: u64 = 2;
const S_REALLOC: u64 = 3;
const S_GPU_ALLOC: u64 = hetmem::record::gpu::ALLOC as u64;
const S_GPU_FREE: u64 = hetmem::record::gpu::FREE as u64;
const S_STACK: u64 = 4;

#[repr(C, align(64))]
struct Slot {
    seq: AtomicU64,
    w: [UnsafeCell<u64>; WORDS],
}

/// A word on a cache line of its own (producers write `tail`, the writer `head`).
#[repr(align(128))]
struct Line(AtomicU64);

struct Ring {
    tail: Line,
    head: Line,
    dropped: AtomicU64,
    count: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const RING: Ring = Ring {
    tail: Line(AtomicU64::new(0)),
    head: Line(AtomicU64::new(0)),
    dropped: AtomicU64::new(0),
    count: AtomicU64::new(0),
};
static RINGS: [Ring; SHARDS] = [RING; SHARDS];
/// The slots: SHARDS × CAP, mapped at start.
static SLOTS: AtomicUsize = AtomicUsize::new(0);
static CAP: AtomicUsize = AtomicUsize::new(0);
static ON: AtomicBool = AtomicBool::new(false);
static WRITER_ALIVE: AtomicBool = AtomicBool::new(false);
static START_MONO: AtomicU64 = AtomicU64::new(0);
static SMALL_PLACEMENT: AtomicU64 = AtomicU64::new(0);
static NODE: AtomicU64 = AtomicU64::new(u64::MAX);
static STACK_DEPTH: AtomicUsize = AtomicUsize::new(0);
static STACK_EVERY: AtomicU64 = AtomicU64::new(100);
/// Set while the writer sleeps; a producer whose shard is half full wakes it.
static SLEEPING: AtomicU32 = AtomicU32::new(0);
/// Set while a producer waits for room; the writer wakes them after a drain.
static WAITING: AtomicU32 = AtomicU32::new(0);
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);
/// Timestamps are the TSC (x86_64 with an invariant TSC), converted to ns by the writer
/// against the monotonic clock; else the monotonic clock itself.
static USE_TSC: AtomicBool = AtomicBool::new(false);
static TSC0: AtomicU64 = AtomicU64::new(0);

/// The writer's side: the file and the encoder, taken by one drainer at a time.
struct Out {
    fd: i32,
    enc: ChunkEncoder,
    written: u64,
    reported_dropped: u64,
}
static OUT: Lock<Option<Out>> = Lock::new(None);

thread_local! {
    // Both `const` and without destructors (`Cell<u32>`/`Cell<bool>` need no drop):
    // no TLS destructor is ever registered.
    static ME: Cell<u64> = const { Cell::new(0) };
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live local the vDSO writes.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A timestamp for an event: TSC ticks or monotonic ns (see [`USE_TSC`]).
#[inline(always)]
fn stamp() -> u64 {
    #[cfg(target_arch = "x86_64")]
    if USE_TSC.load(Ordering::Relaxed) {
        // SAFETY: rdtsc has no preconditions.
        return unsafe { core::arch::x86_64::_rdtsc() };
    }
    now_ns()
}

/// Reads TSC and the monotonic clock together: (tsc, ns).
fn tsc_pair() -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions.
        let a = unsafe { core::arch::x86_64::_rdtsc() };
        let ns = now_ns();
        // SAFETY: as above.
        let b = unsafe { core::arch::x86_64::_rdtsc() };
        (a / 2 + b / 2, ns)
    }
    #[cfg(not(target_arch = "x86_64"))]
    (0, now_ns())
}

fn invariant_tsc() -> bool {
    cfg!(target_arch = "x86_64")
        && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
            c.lines()
                .find(|l| l.starts_with("flags"))
                .is_some_and(|l| l.contains(" constant_tsc") && l.contains(" nonstop_tsc"))
        })
}

/// This thread's kernel id and shard, from one `const` thread-local word without
/// destructor (tid in the low 32 bits, shard + 1 above; 0 until the first event).
#[inline(always)]
fn me() -> (u32, usize) {
    ME.with(|c| {
        let v = c.get();
        if v != 0 {
            return (v as u32, (v >> 32) as usize - 1);
        }
        // SAFETY: gettid has no arguments.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
        let shard = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
        c.set(u64::from(tid) | ((shard as u64 + 1) << 32));
        (tid, shard)
    })
}

/// Opens the file, maps the queues and starts the writer.
pub fn init(path: &str, cfg: &Config) -> Result<(), String> {
    let path = crate::file_for(path, "HETMEM_RECORD_OWNER");
    let cpath = std::ffi::CString::new(path).map_err(|_| "a NUL in the path".to_owned())?;
    // SAFETY: a NUL-terminated path; flags and mode are plain values.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    let slot_bytes = std::mem::size_of::<Slot>();
    let cap = (cfg.record_buffer / slot_bytes / SHARDS)
        .next_power_of_two()
        .max(256);
    let bytes = cap * SHARDS * slot_bytes;
    // SAFETY: a fresh anonymous mapping; zero pages are valid empty slots (seq 0).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        return Err("cannot map the event queue".into());
    }
    let mut wall = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut wall) };
    let (tsc0, start) = tsc_pair();
    TSC0.store(tsc0, Ordering::Relaxed);
    USE_TSC.store(invariant_tsc(), Ordering::Relaxed);
    let mut flags = 0;
    if cfg.record_all {
        flags |= record::FLAG_ALL;
    }
    if cfg.stack_depth > 0 {
        flags |= record::FLAG_STACKS;
    }
    let header = Header {
        version: record::VERSION,
        flags,
        pid: std::process::id(),
        page_size: 4096,
        start_unix_ns: wall.tv_sec as u64 * 1_000_000_000 + wall.tv_nsec as u64,
        start_mono_ns: start,
        threshold: cfg.threshold as u64,
    }
    .encode();
    write_all(fd, &header);
    START_MONO.store(start, Ordering::Relaxed);
    SLOTS.store(p as usize, Ordering::Relaxed);
    CAP.store(cap, Ordering::Relaxed);
    SMALL_PLACEMENT.store(
        if cfg.small == Small::Mimalloc {
            Placement::SmallFast as u64
        } else {
            Placement::SmallGlibc as u64
        },
        Ordering::Relaxed,
    );
    let node = match cfg.policy {
        crate::config::Policy::Bind(n) | crate::config::Policy::Preferred(n) => u64::from(n),
        _ => u64::MAX,
    };
    NODE.store(node, Ordering::Relaxed);
    STACK_DEPTH.store(cfg.stack_depth, Ordering::Relaxed);
    STACK_EVERY.store(cfg.stack_sample, Ordering::Relaxed);
    OUT.with(|o| {
        *o = Some(Out {
            fd,
            enc: ChunkEncoder::new(),
            written: 0,
            reported_dropped: 0,
        })
    });
    ON.store(true, Ordering::Release);
    let mut th: libc::pthread_t = 0;
    // SAFETY: a new thread running `writer`, which takes no argument; default
    // attributes.
    let rc =
        unsafe { libc::pthread_create(&mut th, std::ptr::null(), writer, std::ptr::null_mut()) };
    if rc == 0 {
        WRITER_ALIVE.store(true, Ordering::Release);
        // SAFETY: `th` is the thread just created; nobody joins it.
        unsafe { libc::pthread_detach(th) };
    }
    Ok(())
}

fn write_all(fd: i32, mut b: &[u8]) {
    while !b.is_empty() {
        // SAFETY: writes from a live slice.
        let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        b = &b[n as usize..];
    }
}

extern "C" fn writer(_: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: a full signal mask for this thread only: the program's handlers run on
    // its own threads.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let _ = std::panic::catch_unwind(|| {
        while ON.load(Ordering::Acquire) {
            if drain(false) >= 4096 {
                continue;
            }
            // Little queued: sleep up to a millisecond, or until a producer whose shard
            // is half full wakes us.
            SLEEPING.store(1, Ordering::SeqCst);
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 1_000_000,
            };
            // SAFETY: FUTEX_WAIT on our own word with a timeout; returns at once if it
            // is no longer 1.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    SLEEPING.as_ptr(),
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    1u32,
                    &ts as *const libc::timespec,
                )
            };
            SLEEPING.store(0, Ordering::Relaxed);
        }
    });
    WRITER_ALIVE.store(false, Ordering::Release);
    std::ptr::null_mut()
}

/// # Safety
/// `i < SHARDS * CAP` and the slots are mapped.
unsafe fn slot(i: usize) -> &'static Slot {
    // SAFETY: the caller's bound; the mapping lives for the process.
    unsafe { &*(SLOTS.load(Ordering::Relaxed) as *const Slot).add(i) }
}

fn wake_writer() {
    // A plain load first: the swap is a locked instruction on a line the writer uses.
    if SLEEPING.load(Ordering::Relaxed) == 1 && SLEEPING.swap(0, Ordering::SeqCst) == 1 {
        // SAFETY: FUTEX_WAKE on our own word.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                SLEEPING.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1u32,
            )
        };
    }
}

/// Reserves `k` consecutive slots in shard `s`: the first position.
fn reserve(s: usize, k: u64) -> Option<u64> {
    let r = &RINGS[s];
    let cap = CAP.load(Ordering::Relaxed) as u64;
    let mut spins = 0u32;
    loop {
        let t = r.tail.0.load(Ordering::Relaxed);
        let used = t + k - r.head.0.load(Ordering::Acquire);
        if used > cap {
            wake_writer();
            if spins < 200 && WRITER_ALIVE.load(Ordering::Relaxed) && ON.load(Ordering::Relaxed) {
                // Wait (at most a millisecond each time, 200 times) for the writer to
                // make room.
                spins += 1;
                WAITING.store(1, Ordering::SeqCst);
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 1_000_000,
                };
                // SAFETY: FUTEX_WAIT on our own word with a timeout.
                unsafe {
                    libc::syscall(
                        libc::SYS_futex,
                        WAITING.as_ptr(),
                        libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                        1u32,
                        &ts as *const libc::timespec,
                    )
                };
                continue;
            }
            r.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if r.tail
            .0
            .compare_exchange_weak(t, t + k, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            if used > cap / 2 {
                wake_writer();
            }
            return Some(t);
        }
    }
}

fn publish(shard: usize, pos: u64, words: [u64; WORDS]) {
    let cap = CAP.load(Ordering::Relaxed);
    let i = shard * cap + (pos as usize & (cap - 1));
    // SAFETY: `i` is within the mapping; the slot at `pos` is this thread's alone
    // until its sequence is published.
    let s = unsafe { slot(i) };
    for (c, w) in s.w.iter().zip(words) {
        // SAFETY: as above: no other thread reads or writes the slot now.
        unsafe { *c.get() = w };
    }
    s.seq.store(pos + 1, Ordering::Release);
}

fn meta(kind: u64, placement: u64, tid: u32) -> u64 {
    kind | placement << 8 | u64::from(tid) << 32
}

fn push(kind: u64, large: bool, a: u64, b: u64, c: u64) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let placement = if large {
        Placement::Host as u64
    } else {
        SMALL_PLACEMENT.load(Ordering::Relaxed)
    };
    let (tid, s) = me();
    let depth = STACK_DEPTH.load(Ordering::Relaxed);
    if depth > 0
        && kind != S_FREE
        && RINGS[s]
            .count
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(STACK_EVERY.load(Ordering::Relaxed).max(1))
    {
        return push_with_stack(kind, placement, large, [a, b, c], tid, s, depth);
    }
    if let Some(pos) = reserve(s, 1) {
        let t = stamp();
        let node = if large {
            NODE.load(Ordering::Relaxed)
        } else {
            u64::MAX
        };
        publish(s, pos, [t, meta(kind, placement, tid), a, b, c, node, 0]);
    }
}

/// An event and the sampled call stack that follows it in the queue.
#[cold]
#[inline(never)]
fn push_with_stack(
    kind: u64,
    placement: u64,
    large: bool,
    [a, b, c]: [u64; 3],
    tid: u32,
    s: usize,
    depth: usize,
) {
    // The unwinder may allocate (first use, registered frames): a nested hook on this
    // thread records nothing meanwhile.
    if BUSY.with(|x| x.replace(true)) {
        return;
    }
    let mut frames = [0u64; 32];
    let n = capture(&mut frames[..depth.min(32)]);
    BUSY.with(|x| x.set(false));
    let extra = n.div_ceil(WORDS - 1) as u64;
    if let Some(pos) = reserve(s, 1 + extra) {
        let t = stamp();
        let node = if large {
            NODE.load(Ordering::Relaxed)
        } else {
            u64::MAX
        };
        publish(
            s,
            pos,
            [t, meta(kind, placement, tid), a, b, c, node, extra],
        );
        for j in 0..extra as usize {
            let mut w = [0u64; WORDS];
            let part = &frames[j * (WORDS - 1)..((j + 1) * (WORDS - 1)).min(n)];
            w[0] = meta(S_STACK, 0, tid) | (part.len() as u64) << 16;
            w[1..1 + part.len()].copy_from_slice(part);
            publish(s, pos + 1 + j as u64, w);
        }
    }
}

extern "C" {
    fn _Unwind_Backtrace(
        f: extern "C" fn(*mut libc::c_void, *mut libc::c_void) -> libc::c_int,
        arg: *mut libc::c_void,
    ) -> libc::c_int;
    fn _Unwind_GetIP(ctx: *mut libc::c_void) -> usize;
}

struct Frames<'a> {
    out: &'a mut [u64],
    n: usize,
    skip: usize,
}

extern "C" fn frame(ctx: *mut libc::c_void, arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Frames` that `capture` passed, alive for the walk.
    let f = unsafe { &mut *(arg as *mut Frames) };
    if f.skip > 0 {
        f.skip -= 1;
        return 0;
    }
    if f.n >= f.out.len() {
        return 5; // _URC_END_OF_STACK: stop.
    }
    // SAFETY: `ctx` is the unwinder's context for this frame.
    let ip = unsafe { _Unwind_GetIP(ctx) };
    if let Some(o) = f.out.get_mut(f.n) {
        *o = ip as u64;
    }
    f.n += 1;
    0
}

/// The caller's return addresses, innermost first (the shim's own frames skipped).
fn capture(out: &mut [u64]) -> usize {
    let mut f = Frames { out, n: 0, skip: 4 };
    // SAFETY: walks this thread's stack, calling `frame` with `f`, which outlives it.
    unsafe { _Unwind_Backtrace(frame, &mut f as *mut Frames as *mut libc::c_void) };
    f.n
}

/// Records an allocation.
#[inline]
pub fn alloc(addr: usize, size: usize, large: bool) {
    push(S_ALLOC, large, addr as u64, size as u64, 0);
}

/// Records a free (`size` 0: not known).
#[inline]
pub fn free(addr: usize, size: usize, large: bool) {
    push(S_FREE, large, addr as u64, size as u64, 0);
}

/// Records a GPU allocation or free (the GPU side, issue 18): `mem` a
/// [`hetmem::record::gpu::MemKind`] code, `dev` -1 for host memory.
pub fn gpu(alloc: bool, addr: u64, size: u64, mem: u8, dev: i32, stream: u64) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let (tid, s) = me();
    if let Some(pos) = reserve(s, 1) {
        let kind = if alloc { S_GPU_ALLOC } else { S_GPU_FREE };
        let m = meta(kind, Placement::Device as u64, tid);
        let c = u64::from(mem) | u64::from(dev as u32) << 8;
        publish(s, pos, [stamp(), m, addr, size, c, stream, 0]);
    }
}

/// Records a large realloc.
pub fn realloc(old: usize, new: usize, size: usize) {
    push(S_REALLOC, true, old as u64, new as u64, size as u64);
}

/// Whether the slot at position `h` of shard `s` is published; waits a little for it
/// when `last`.
fn ready(s: usize, cap: usize, h: u64, last: bool) -> Option<&'static Slot> {
    // SAFETY: within the mapping.
    let sl = unsafe { slot(s * cap + (h as usize & (cap - 1))) };
    for _ in 0..if last { 100_000 } else { 1 } {
        if sl.seq.load(Ordering::Acquire) == h + 1 {
            return Some(sl);
        }
        std::hint::spin_loop();
    }
    None
}

fn words(sl: &Slot) -> [u64; WORDS] {
    // SAFETY: called only on a published slot: its producer wrote it before the Release
    // store of its sequence, which `ready` saw.
    std::array::from_fn(|i| unsafe { *sl.w[i].get() })
}

/// Moves what the queues hold into the file. `last`: at exit, wait (boundedly) for
/// slots other threads reserved but have not published yet, and write the end event.
fn drain(last: bool) -> u64 {
    let cap = CAP.load(Ordering::Relaxed);
    if cap == 0 {
        return 0;
    }
    OUT.with(|o| {
        let Some(out) = o.as_mut() else { return 0 };
        let before = out.written;
        let start = START_MONO.load(Ordering::Relaxed);
        let tsc = USE_TSC.load(Ordering::Relaxed);
        let (tsc1, mono1) = tsc_pair();
        let tsc0 = TSC0.load(Ordering::Relaxed);
        // ns since start of a stamp: TSC ticks scaled by the slope measured from the
        // start to now, or monotonic ns.
        let to_ns = |t: u64| -> u64 {
            if tsc {
                let ticks = u128::from(t.saturating_sub(tsc0));
                let span = u128::from(tsc1.saturating_sub(tsc0)).max(1);
                (ticks * u128::from(mono1.saturating_sub(start)) / span) as u64
            } else {
                t.saturating_sub(start)
            }
        };
        let mut dropped = 0u64;
        for (s, r) in RINGS.iter().enumerate() {
            let mut h = r.head.0.load(Ordering::Relaxed);
            let tail = r.tail.0.load(Ordering::Acquire);
            'slots: while h < tail {
                let Some(sl) = ready(s, cap, h, last) else {
                    break;
                };
                let w = words(sl);
                let extra = w[6].min(8);
                let mut frames = Vec::new();
                for j in 1..=extra {
                    let Some(st) = ready(s, cap, h + j, last) else {
                        break 'slots;
                    };
                    let sw = words(st);
                    let n = ((sw[0] >> 16) & 0xffff) as usize;
                    frames.extend_from_slice(&sw[1..1 + n.min(WORDS - 1)]);
                }
                h += 1 + extra;
                if h % 1024 < 1 + extra {
                    // Give room back now and then, not for every event (the line
                    // would bounce to the producers each time).
                    r.head.0.store(h, Ordering::Release);
                }
                let (time_ns, m) = (to_ns(w[0]), w[1]);
                let thread = (m >> 32) as u32;
                let placement = Placement::from_code(((m >> 8) & 0xff) as u8);
                let node = u32::try_from(w[5]).ok();
                let kind = match m & 0xff {
                    // GPU events (the GPU side, issue 18): address, size, memory kind
                    // and device in w[4], stream in w[5].
                    k @ (S_GPU_ALLOC | S_GPU_FREE) => EventKind::Unknown {
                        kind: k as u8,
                        body: hetmem::record::gpu::body(&hetmem::record::gpu::GpuEvent {
                            alloc: k == S_GPU_ALLOC,
                            addr: w[2],
                            size: w[3],
                            mem: hetmem::record::gpu::MemKind::from_code(w[4] as u8),
                            device: (w[4] >> 8) as u32 as i32,
                            stream: w[5],
                        }),
                    },
                    S_ALLOC => EventKind::Alloc {
                        addr: w[2],
                        size: w[3],
                        placement,
                        node,
                    },
                    S_FREE => EventKind::Free {
                        addr: w[2],
                        size: w[3],
                        placement,
                    },
                    _ => EventKind::Realloc {
                        old: w[2],
                        new: w[3],
                        size: w[4],
                        placement,
                        node,
                    },
                };
                out.enc.push(&Event {
                    time_ns,
                    thread,
                    kind,
                });
                out.written += 1;
                if !frames.is_empty() {
                    out.enc.push(&Event {
                        time_ns,
                        thread,
                        kind: EventKind::Stack { frames },
                    });
                    out.written += 1;
                }
                if out.enc.bytes() > 1 << 20 {
                    flush(out);
                }
            }
            r.head.0.store(h, Ordering::Release);
            dropped += r.dropped.load(Ordering::Relaxed);
        }
        let t = now_ns().saturating_sub(START_MONO.load(Ordering::Relaxed));
        if dropped > out.reported_dropped {
            out.enc.push(&Event {
                time_ns: t,
                thread: 0,
                kind: EventKind::Dropped {
                    count: dropped - out.reported_dropped,
                },
            });
            out.reported_dropped = dropped;
        }
        if last {
            let events = out.written;
            out.enc.push(&Event {
                time_ns: t,
                thread: 0,
                kind: EventKind::End { events, dropped },
            });
        }
        flush(out);
        if WAITING.swap(0, Ordering::SeqCst) == 1 {
            // SAFETY: FUTEX_WAKE on our own word, every waiter.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    WAITING.as_ptr(),
                    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                    i32::MAX,
                )
            };
        }
        out.written - before
    })
}

fn flush(out: &mut Out) {
    if !out.enc.is_empty() {
        write_all(out.fd, out.enc.finish());
        out.enc.clear();
    }
}

/// At exit: stop recording, write what is queued and the end event.
pub fn finish() {
    if !ON.swap(false, Ordering::AcqRel) {
        return;
    }
    wake_writer();
    drain(true);
    OUT.with(|o| {
        if let Some(out) = o.take() {
            // SAFETY: our own descriptor.
            unsafe { libc::close(out.fd) };
        }
    });
}

/// `fork` handlers: the writer's lock is held across the fork.
pub fn fork_prepare() {
    OUT.lock();
}
/// See [`fork_prepare`].
pub fn fork_parent() {
    OUT.unlock();
}
/// In the child: nothing more is recorded (the file is the parent's).
pub fn fork_child() {
    ON.store(false, Ordering::Relaxed);
    WRITER_ALIVE.store(false, Ordering::Relaxed);
    OUT.reset_in_child();
    ME.with(|t| t.set(0));
}
