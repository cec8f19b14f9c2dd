//! `libhetmem_preload.so`: hetmem's placement, huge pages and accounting for programs
//! that cannot be changed.
//!
//! ```sh
//! LD_PRELOAD=target/release/libhetmem_preload.so HETMEM_PRELOAD_POLICY=bind:0 HETMEM_STATS=1 some-program
//! ```
//!
//! It defines `malloc`, `free`, `calloc`, `realloc`, `reallocarray`, `posix_memalign`,
//! `aligned_alloc`, `memalign`, `valloc`, `pvalloc` and `malloc_usable_size` (C++
//! `new`/`delete` reach them). Requests under the threshold go to the small path,
//! glibc's `__libc_*` entry points (or mimalloc, built in, when
//! `HETMEM_PRELOAD_SMALL=mimalloc`); requests at or above it to the large path
//! ([`large`]): one reserved arena, NUMA policy, huge pages, a cache of freed blocks.
//! Ownership at `free` is the arena's range check. Configuration: [`config`]; counters:
//! [`stats`]; the event record: [`recorder`] (format: [`hetmem::record`]).
//!
//! Until the start-up constructor has run (and for good, where the configuration is bad,
//! the program is setuid, or `HETMEM_PRELOAD=0`), every call goes to glibc unchanged.
//! Nothing here unwinds into C: the hot paths cannot panic (no indexing, no unwrap), and
//! the start-up, exit and large paths run under `catch_unwind`.

// The unit tests leave the start-up and exit hooks (not registered under test) unused.
#![cfg_attr(test, allow(dead_code))]

pub mod config;
pub mod glibc;
pub mod gpu;
pub mod large;
mod lock;
pub mod recorder;
pub mod stats;

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use libc::{c_int, c_void, size_t};
use libmimalloc_sys as mi;

#[cfg(not(test))]
#[global_allocator]
static ALLOC: glibc::LibcAlloc = glibc::LibcAlloc;

/// Requests of at least this many bytes take the large path (`usize::MAX` until start-up
/// is done: everything is glibc's).
static THRESHOLD: AtomicUsize = AtomicUsize::new(usize::MAX);
/// The small path: 0 glibc, 1 mimalloc.
static MODE: AtomicU8 = AtomicU8::new(0);
/// What each call also does: [`F_COUNT`], [`F_REC_SMALL`], [`F_REC_LARGE`].
static FLAGS: AtomicU8 = AtomicU8::new(0);

const F_COUNT: u8 = 1;
const F_REC_SMALL: u8 = 2;
const F_REC_LARGE: u8 = 4;

const MIMALLOC: u8 = 1;
/// `mi_option_arena_eager_commit` in mimalloc v2's `mi_option_e` (not named by
/// libmimalloc-sys).
const MI_OPTION_ARENA_EAGER_COMMIT: mi::mi_option_t = 4;
/// `mi_option_disallow_os_alloc` in the same enum.
const MI_OPTION_DISALLOW_OS_ALLOC: mi::mi_option_t = 17;
/// Address space given to mimalloc as its only arena in mimalloc mode.
const MI_ARENA: usize = 64 << 30;

/// mimalloc's arena: a block is mimalloc's exactly when it lies here (0, 0 outside
/// mimalloc mode), so `free` tells glibc's from mimalloc's by a range check.
static MI_BASE: AtomicUsize = AtomicUsize::new(0);
static MI_LEN: AtomicUsize = AtomicUsize::new(0);

/// `sizeof(void*)`: the smallest alignment `posix_memalign` takes.
const PTR: usize = std::mem::size_of::<usize>();

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

fn errno() -> c_int {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() }
}

/// The file a process writes for `path` (`HETMEM_RECORD`, `HETMEM_STATS`): `%p` is the
/// pid; without `%p`, the first process of a tree (the one that finds no `owner`
/// variable, and sets it for the processes it starts) writes `path`, and every process
/// it starts, directly or not, `path.PID`, so that a program that runs others (make, a
/// shell script, python's subprocess) never has them overwrite its file.
pub(crate) fn file_for(path: &str, owner: &str) -> String {
    let pid = std::process::id().to_string();
    if path.contains("%p") {
        return path.replace("%p", &pid);
    }
    match std::env::var(owner) {
        Ok(o) if o != pid => format!("{path}.{pid}"),
        Ok(_) => path.to_owned(),
        Err(_) => {
            // Start-up runs before the program's own threads: setenv is safe here.
            std::env::set_var(owner, &pid);
            path.to_owned()
        }
    }
}

/// Writes one line on stderr without allocating through the hooks.
fn say(line: &str) {
    let msg = format!("hetmem-preload: {line}\n");
    // SAFETY: writes `msg`'s bytes to fd 2; a short or failed write is ignored.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

// ---- the small path -------------------------------------------------------------------

#[inline(always)]
fn small_malloc(size: usize) -> *mut c_void {
    if MODE.load(Ordering::Relaxed) == MIMALLOC {
        // SAFETY: mi_malloc takes any size.
        let p = unsafe { mi::mi_malloc(size) };
        if p.is_null() {
            // mimalloc's arena is full (or the size absurd): glibc decides.
            let p = glibc::malloc(size);
            note_small_alloc(p, size, false);
            return p;
        }
        note_small_alloc(p, size, true);
        p
    } else {
        let p = glibc::malloc(size);
        note_small_alloc(p, size, false);
        p
    }
}

#[inline(always)]
fn small_calloc(n: usize, size: usize) -> *mut c_void {
    if MODE.load(Ordering::Relaxed) == MIMALLOC {
        // SAFETY: mi_calloc checks the product itself.
        let p = unsafe { mi::mi_calloc(n, size) };
        if p.is_null() {
            let p = glibc::calloc(n, size);
            note_small_alloc(p, n.wrapping_mul(size), false);
            return p;
        }
        note_small_alloc(p, n.wrapping_mul(size), true);
        p
    } else {
        let p = glibc::calloc(n, size);
        note_small_alloc(p, n.wrapping_mul(size), false);
        p
    }
}

/// `align` is a power of two. Alignments above 64 KiB go to glibc whatever the small
/// path: mimalloc v2 serves them from huge segments at offsets its page map (which
/// `free` asks) does not know.
#[inline]
fn small_aligned(align: usize, size: usize) -> *mut c_void {
    if MODE.load(Ordering::Relaxed) == MIMALLOC && align <= 64 << 10 {
        // SAFETY: mi_malloc_aligned takes any power-of-two alignment.
        let p = unsafe { mi::mi_malloc_aligned(size, align) };
        if p.is_null() {
            let p = glibc::memalign(align, size);
            note_small_alloc(p, size, false);
            return p;
        }
        note_small_alloc(p, size, true);
        p
    } else {
        let p = glibc::memalign(align, size);
        note_small_alloc(p, size, false);
        p
    }
}

/// Whether a small block is mimalloc's (else glibc's): it lies in mimalloc's arena.
#[inline(always)]
fn is_mi(p: *mut c_void) -> bool {
    let len = MI_LEN.load(Ordering::Acquire);
    (p as usize).wrapping_sub(MI_BASE.load(Ordering::Relaxed)) < len
}

/// # Safety
/// `p` is a live small block (glibc's or mimalloc's).
#[inline(always)]
unsafe fn small_usable(p: *mut c_void) -> usize {
    if is_mi(p) {
        // SAFETY: a live mimalloc block.
        unsafe { mi::mi_usable_size(p) }
    } else {
        // SAFETY: a live glibc block.
        unsafe { glibc::usable_size(p) }
    }
}

/// # Safety
/// `p` is a live small block (not null), given back.
#[inline(always)]
unsafe fn small_free(p: *mut c_void) {
    let f = FLAGS.load(Ordering::Relaxed);
    if is_mi(p) {
        if f != 0 {
            // mimalloc blocks are counted by calls only: asking their size costs as
            // much as a free.
            note_small_free(p, 0, f);
        }
        // SAFETY: a live mimalloc block.
        unsafe { mi::mi_free(p) }
    } else {
        if f != 0 {
            // SAFETY: a live glibc block.
            note_small_free(p, unsafe { glibc::chunk_bytes(p) }, f);
        }
        // SAFETY: a live glibc block.
        unsafe { glibc::free(p) }
    }
}

/// Counts and records a small allocation; `mi`: it is mimalloc's.
#[inline(always)]
fn note_small_alloc(p: *mut c_void, size: usize, mi: bool) {
    let f = FLAGS.load(Ordering::Relaxed);
    if f == 0 || p.is_null() {
        return;
    }
    if f & F_COUNT != 0 {
        let bytes = if mi {
            0 // calls only (see `small_free`)
        } else {
            // SAFETY: `p` is the live glibc block just made.
            unsafe { glibc::chunk_bytes(p) }
        };
        stats::small_alloc(bytes);
    }
    if f & F_REC_SMALL != 0 {
        recorder::alloc(p as usize, size, false);
    }
}

#[inline(always)]
fn note_small_free(p: *mut c_void, bytes: usize, f: u8) {
    if f & F_COUNT != 0 {
        stats::small_free(bytes);
    }
    if f & F_REC_SMALL != 0 {
        recorder::free(p as usize, 0, false);
    }
}

// ---- the large path -------------------------------------------------------------------

/// A large block, or the small path's where the arena cannot serve it; null + ENOMEM
/// where neither can.
#[cold]
#[inline(never)]
fn large_alloc(size: usize, align: usize, zero: bool) -> *mut c_void {
    let r = std::panic::catch_unwind(|| large::alloc(size, align, zero))
        .ok()
        .flatten();
    if let Some(p) = r {
        if FLAGS.load(Ordering::Relaxed) & F_REC_LARGE != 0 {
            recorder::alloc(p as usize, size, true);
        }
        return p;
    }
    if size > isize::MAX as usize {
        set_errno(libc::ENOMEM);
        return std::ptr::null_mut();
    }
    // glibc, whatever the small path: its mappings are accounted (mimalloc's
    // MAP_NORESERVE would "succeed" at any size and fault later).
    let p = match (align, zero) {
        (0, true) => glibc::calloc(1, size),
        (0, false) => glibc::malloc(size),
        (a, _) => {
            let p = glibc::memalign(a, size);
            if zero && !p.is_null() {
                // SAFETY: a fresh block of `size` bytes.
                unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, size) };
            }
            p
        }
    };
    note_small_alloc(p, size, false);
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p
}

#[cold]
#[inline(never)]
fn large_free(p: *mut c_void) {
    gpu::runtime::host_block_freed(p);
    let size = std::panic::catch_unwind(|| large::free(p)).ok().flatten();
    if let Some(size) = size {
        if FLAGS.load(Ordering::Relaxed) & F_REC_LARGE != 0 {
            recorder::free(p as usize, size, true);
        }
    }
}

fn large_sizes(p: *mut c_void) -> Option<(usize, usize)> {
    std::panic::catch_unwind(|| large::sizes(p)).ok().flatten()
}

// ---- the interposed entry points -------------------------------------------------------

/// `malloc(3)`.
///
/// # Safety
/// As the C function: none beyond those of the allocator as a whole.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn malloc(size: size_t) -> *mut c_void {
    if size < THRESHOLD.load(Ordering::Relaxed) {
        return small_malloc(size);
    }
    large_alloc(size, 0, false)
}

/// `free(3)`.
///
/// # Safety
/// `p` is null or a live block of this allocator (or of glibc's, allocated before the
/// shim started), not freed before.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    if large::owns(p) {
        return large_free(p);
    }
    // SAFETY: the caller's block, and not the arena's: a small one.
    unsafe { small_free(p) }
}

/// `calloc(3)`: null + ENOMEM when `n * size` overflows.
///
/// # Safety
/// As `malloc`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn calloc(n: size_t, size: size_t) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return std::ptr::null_mut();
    };
    if total < THRESHOLD.load(Ordering::Relaxed) {
        return small_calloc(n, size);
    }
    large_alloc(total, 0, true)
}

/// `realloc(3)`, glibc's semantics: a null `p` is `malloc`, a zero size frees and
/// returns null; failure leaves the block as it was and returns null + ENOMEM.
///
/// # Safety
/// As `free` for `p`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: size_t) -> *mut c_void {
    if p.is_null() {
        // SAFETY: malloc has no preconditions.
        return unsafe { malloc(size) };
    }
    if size == 0 {
        // SAFETY: the caller's live block.
        unsafe { free(p) };
        return std::ptr::null_mut();
    }
    let t = THRESHOLD.load(Ordering::Relaxed);
    if large::owns(p) {
        // SAFETY: a large block of ours.
        return unsafe { realloc_large(p, size, t) };
    }
    if size >= t {
        // SAFETY: a live small block.
        return unsafe { realloc_up(p, size) };
    }
    let f = FLAGS.load(Ordering::Relaxed);
    if f == 0 {
        return if is_mi(p) {
            // SAFETY: a live mimalloc block.
            unsafe { mi::mi_realloc(p, size) }
        } else {
            // SAFETY: a live glibc block.
            unsafe { glibc::realloc(p, size) }
        };
    }
    let mi = is_mi(p);
    let old = if mi {
        0 // calls only (see `small_free`)
    } else {
        // SAFETY: a live glibc block.
        unsafe { glibc::chunk_bytes(p) }
    };
    let q = if mi {
        // SAFETY: a live mimalloc block.
        unsafe { mi::mi_realloc(p, size) }
    } else {
        // SAFETY: a live glibc block.
        unsafe { glibc::realloc(p, size) }
    };
    if !q.is_null() {
        if f & F_COUNT != 0 {
            stats::small_free(old);
        }
        if f & F_REC_SMALL != 0 {
            recorder::free(p as usize, 0, false);
        }
        note_small_alloc(q, size, mi);
    }
    q
}

/// A small block growing past the threshold: a large block, the bytes copied.
///
/// # Safety
/// `p` is a live small block.
#[cold]
#[inline(never)]
unsafe fn realloc_up(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: the caller's live small block.
    let old = unsafe { small_usable(p) };
    let r = std::panic::catch_unwind(|| large::alloc(size, 0, false))
        .ok()
        .flatten();
    let Some(q) = r else {
        // The arena cannot: stay on the small path.
        return if is_mi(p) {
            // SAFETY: a live mimalloc block.
            unsafe { mi::mi_realloc(p, size) }
        } else {
            // SAFETY: a live glibc block.
            unsafe { glibc::realloc(p, size) }
        };
    };
    if FLAGS.load(Ordering::Relaxed) & F_REC_LARGE != 0 {
        recorder::alloc(q as usize, size, true);
    }
    // SAFETY: two distinct live blocks, `old.min(size)` bytes readable in `p` and
    // writable in `q`.
    unsafe {
        std::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), old.min(size));
        small_free(p);
    }
    q
}

/// `realloc` of a large block.
///
/// # Safety
/// `p` lies in the arena.
#[cold]
#[inline(never)]
unsafe fn realloc_large(p: *mut c_void, size: usize, t: usize) -> *mut c_void {
    let Some((_, old)) = large_sizes(p) else {
        // Not a live block: as glibc would refuse it, refuse it (without aborting).
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    };
    let rec = FLAGS.load(Ordering::Relaxed) & F_REC_LARGE != 0;
    // A block pinned on a copy is unregistered before it may move (the next copy pins it
    // again).
    gpu::runtime::host_block_freed(p);
    if size >= t {
        if let Some(q) = std::panic::catch_unwind(|| large::realloc(p, size))
            .ok()
            .flatten()
        {
            if rec {
                recorder::realloc(p as usize, q as usize, size);
            }
            return q;
        }
    }
    // Across the threshold (or no room in the arena): a new block, the bytes copied.
    let q = if size >= t {
        large_alloc(size, 0, false)
    } else {
        small_malloc(size)
    };
    if q.is_null() {
        set_errno(libc::ENOMEM);
        return q;
    }
    // SAFETY: `p` holds `old` bytes, `q` at least `size`; distinct blocks.
    unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), old.min(size)) };
    large_free(p);
    q
}

/// `reallocarray(3)`: null + ENOMEM when `n * size` overflows.
///
/// # Safety
/// As `realloc`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: size_t, size: size_t) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: the caller's contract is realloc's.
        Some(total) => unsafe { realloc(p, total) },
        None => {
            set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
}

/// An aligned block; `align` is a power of two.
fn aligned(align: usize, size: usize) -> *mut c_void {
    if size >= THRESHOLD.load(Ordering::Relaxed) {
        return large_alloc(size, align, false);
    }
    if align <= 16 {
        return small_malloc(size);
    }
    let p = small_aligned(align, size);
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p
}

/// `posix_memalign(3)`: EINVAL unless `align` is a power of two and a multiple of
/// `sizeof(void *)`, ENOMEM when out of memory; `errno` is left alone.
///
/// # Safety
/// `out` is writable.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn posix_memalign(
    out: *mut *mut c_void,
    align: size_t,
    size: size_t,
) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(PTR) {
        return libc::EINVAL;
    }
    let saved = errno();
    let p = aligned(align, size);
    set_errno(saved);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller's out-pointer.
    unsafe { *out = p };
    0
}

/// `aligned_alloc(3)`: null + EINVAL unless `align` is a power of two (C17, glibc 2.38).
///
/// # Safety
/// None beyond `malloc`'s.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn aligned_alloc(align: size_t, size: size_t) -> *mut c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    aligned(align, size)
}

/// `memalign(3)`, glibc's semantics: an alignment that is not a power of two is rounded
/// up to one; one above `SIZE_MAX / 2 + 1` is EINVAL.
///
/// # Safety
/// None beyond `malloc`'s.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memalign(align: size_t, size: size_t) -> *mut c_void {
    let Some(a) = align.max(1).checked_next_power_of_two() else {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    };
    aligned(a, size)
}

fn page() -> usize {
    // SAFETY: sysconf has no memory preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// `valloc(3)`: page-aligned.
///
/// # Safety
/// None beyond `malloc`'s.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn valloc(size: size_t) -> *mut c_void {
    aligned(page(), size)
}

/// `pvalloc(3)`: page-aligned, the size rounded up to whole pages (0: one page).
///
/// # Safety
/// None beyond `malloc`'s.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn pvalloc(size: size_t) -> *mut c_void {
    let pg = page();
    let Some(rounded) = size.max(1).checked_add(pg - 1).map(|n| n & !(pg - 1)) else {
        set_errno(libc::ENOMEM);
        return std::ptr::null_mut();
    };
    aligned(pg, rounded)
}

/// `malloc_usable_size(3)`: at least the size asked for.
///
/// # Safety
/// `p` is null or a live block.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> size_t {
    if p.is_null() {
        return 0;
    }
    if large::owns(p) {
        return large_sizes(p).map_or(0, |(len, _)| len);
    }
    // SAFETY: a live small block.
    unsafe { small_usable(p) }
}

// ---- start-up and exit -----------------------------------------------------------------

/// The configuration in words, for the stats.
static SETUP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
static STATS_TO: std::sync::OnceLock<Option<Option<String>>> = std::sync::OnceLock::new();

extern "C" fn fork_prepare() {
    recorder::fork_prepare();
    large::fork_prepare();
}
extern "C" fn fork_parent() {
    large::fork_parent();
    recorder::fork_parent();
}
extern "C" fn fork_child() {
    large::fork_child();
    recorder::fork_child();
}

fn start() {
    // SAFETY: getauxval has no memory preconditions.
    if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
        return; // setuid/setgid/capabilities: left alone.
    }
    glibc::resolve_usable_size();
    let cfg = match config::parse(&|k| std::env::var(k).ok(), &|| {
        hetmem::Topology::detect().map_err(|e| e.to_string())
    }) {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(line) => return say(&format!("{line}; running without hetmem")),
    };
    if let Err(e) = large::init(&cfg) {
        return say(&format!("{e}; running without hetmem"));
    }
    let mut flags = if cfg.count { F_COUNT } else { 0 };
    if let Some(path) = &cfg.record {
        if let Err(e) = recorder::init(path, &cfg) {
            say(&format!("HETMEM_RECORD={path}: {e}; not recording"));
        } else {
            flags |= F_REC_LARGE;
            if cfg.record_all {
                flags |= F_REC_SMALL;
            }
        }
    }
    // SAFETY: registers three handlers with no preconditions.
    unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
    let policy = match &cfg.policy {
        config::Policy::Default => "default".to_owned(),
        config::Policy::Bind(n) => format!("bind:{n}"),
        config::Policy::Preferred(n) => format!("preferred:{n}"),
        config::Policy::Interleave(v) if v.is_empty() => "interleave".to_owned(),
        config::Policy::Interleave(v) => format!("interleave:{v:?}"),
    };
    let _ = SETUP.set(format!(
        "\"threshold\":{},\"policy\":\"{policy}\",\"small_path\":\"{}\",\"huge_pages\":{}",
        cfg.threshold,
        if cfg.small == config::Small::Mimalloc {
            "mimalloc"
        } else {
            "glibc"
        },
        cfg.huge
    ));
    let _ = STATS_TO.set(
        cfg.stats
            .clone()
            .map(|to| to.map(|path| file_for(&path, "HETMEM_STATS_OWNER"))),
    );
    if cfg.small == config::Small::Mimalloc {
        if let Err(e) = mimalloc_arena() {
            say(&format!(
                "HETMEM_PRELOAD_SMALL=mimalloc: {e}; glibc serves small requests"
            ));
        } else if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
            // Commit arena memory as it is used, not ahead (mimalloc's own default
            // commits eagerly where the system overcommits, which shows as RSS: git's
            // peak 24 MiB instead of 18.6).
            // SAFETY: sets one of mimalloc's options (4: arena_eager_commit in v2's
            // mi_option_e) before its first allocation.
            unsafe { mi::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
        }
        if MI_LEN.load(Ordering::Relaxed) != 0 {
            MODE.store(MIMALLOC, Ordering::Relaxed);
        }
    }
    FLAGS.store(flags, Ordering::Relaxed);
    THRESHOLD.store(cfg.threshold, Ordering::Release);
}

/// Reserves mimalloc's arena (address space only) and makes it mimalloc's only source
/// of memory, so that ownership is a range check.
fn mimalloc_arena() -> Result<(), String> {
    const ALIGN: usize = 64 << 20; // mimalloc v2 segments: 32 MiB, aligned
    let total = MI_ARENA + ALIGN;
    // SAFETY: a fresh anonymous reservation.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err("cannot reserve address space for mimalloc".into());
    }
    let start = p as usize;
    let base = (start + ALIGN - 1) & !(ALIGN - 1);
    // SAFETY: both trims are parts of the reservation just made, outside
    // `base..base+MI_ARENA`.
    unsafe {
        if base > start {
            libc::munmap(p, base - start);
        }
        if start + total > base + MI_ARENA {
            libc::munmap(
                (base + MI_ARENA) as *mut c_void,
                start + total - base - MI_ARENA,
            );
        }
    }
    // SAFETY: sets an option and hands mimalloc a reserved range of ours, which it
    // commits (mprotect) as it uses it; before any mimalloc allocation of ours.
    let ok = unsafe {
        mi::mi_option_set(MI_OPTION_DISALLOW_OS_ALLOC, 1);
        let mut id: mi::mi_arena_id_t = std::mem::zeroed();
        mi::mi_manage_os_memory_ex(
            base as *const c_void,
            MI_ARENA,
            false,
            false,
            true,
            -1,
            false,
            &mut id,
        )
    };
    if !ok {
        // SAFETY: sets an option back.
        unsafe { mi::mi_option_set(MI_OPTION_DISALLOW_OS_ALLOC, 0) };
        return Err("mimalloc refused its arena".into());
    }
    MI_BASE.store(base, Ordering::Relaxed);
    MI_LEN.store(MI_ARENA, Ordering::Release);
    Ok(())
}

fn finish() {
    recorder::finish();
    let Some(Some(to)) = STATS_TO.get() else {
        return;
    };
    let setup = SETUP.get().map_or("", |s| s.as_str());
    match to {
        None => {
            let t = stats::text(setup);
            // SAFETY: writes `t`'s bytes to fd 2.
            unsafe { libc::write(2, t.as_ptr().cast(), t.len()) };
        }
        Some(path) => {
            if let Err(e) = std::fs::write(path, stats::json(setup) + "\n") {
                say(&format!("HETMEM_STATS={path}: {e}"));
            }
        }
    }
}

extern "C" fn hetmem_preload_init() {
    let _ = std::panic::catch_unwind(start);
}

extern "C" fn hetmem_preload_fini() {
    let _ = std::panic::catch_unwind(finish);
}

#[cfg(not(test))]
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = hetmem_preload_init;

#[cfg(not(test))]
#[used]
#[link_section = ".fini_array"]
static FINI: extern "C" fn() = hetmem_preload_fini;
