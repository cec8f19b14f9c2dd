//! Counters: the small path's in per-thread slots of a static array, found by the
//! thread pointer (hashed; the slot records its owner's thread pointer, and a thread
//! whose slot is another live thread's uses one shared slot with atomic adds). Only the
//! owner writes its slot, with plain loads and stores: no locked instruction, no TLS
//! lookup. A slot outlives its thread, so its counts stay in the totals; a new thread
//! with the same thread pointer (glibc reuses thread descriptors) carries on in it,
//! which is right since two live threads never share one. The large path's counters
//! are exact per node under its lock ([`crate::large::LargeStats`]). Printed at exit
//! when `HETMEM_STATS` asks.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::large;

const SLOTS: usize = 1024;

#[repr(align(64))]
struct Slot {
    owner: AtomicUsize,
    allocs: AtomicU64,
    frees: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const SLOT: Slot = Slot {
    owner: AtomicUsize::new(0),
    allocs: AtomicU64::new(0),
    frees: AtomicU64::new(0),
    bytes_in: AtomicU64::new(0),
    bytes_out: AtomicU64::new(0),
};
/// Per-thread slots (`.bss`: pages no thread uses stay untouched), and the shared one.
static SMALL: [Slot; SLOTS + 1] = [SLOT; SLOTS + 1];

/// The calling thread's thread pointer: unique among live threads.
#[inline(always)]
pub(crate) fn thread_pointer() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        let tp: usize;
        // SAFETY: reads the word at %fs:0, which glibc's TCB header sets to the TCB's
        // own address on every thread; no memory of ours is written.
        unsafe {
            std::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags))
        };
        tp
    }
    #[cfg(target_arch = "aarch64")]
    {
        let tp: usize;
        // SAFETY: reads the thread pointer register.
        unsafe {
            std::arch::asm!("mrs {}, tpidr_el0", out(reg) tp, options(nostack, nomem, preserves_flags))
        };
        tp
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        // SAFETY: pthread_self has no preconditions.
        unsafe { libc::pthread_self() as usize }
    }
}

/// This thread's slot, and whether it is this thread's alone.
#[inline(always)]
fn slot() -> (&'static Slot, bool) {
    let tp = thread_pointer();
    let i = (tp >> 6).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (usize::BITS - 10);
    let s = &SMALL[i % SLOTS];
    let owner = s.owner.load(Ordering::Relaxed);
    if owner == tp {
        return (s, true);
    }
    if owner == 0
        && s.owner
            .compare_exchange(0, tp, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        return (s, true);
    }
    (&SMALL[SLOTS], false)
}

#[inline(always)]
fn add(c: &AtomicU64, v: u64, own: bool) {
    if own {
        // Only this thread writes its slot: no read-modify-write needed.
        c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
    } else {
        c.fetch_add(v, Ordering::Relaxed);
    }
}

/// Counts a small allocation of `bytes` (its usable size).
#[inline(always)]
pub(crate) fn small_alloc(bytes: usize) {
    let (s, own) = slot();
    add(&s.allocs, 1, own);
    add(&s.bytes_in, bytes as u64, own);
}

/// Counts a small free of `bytes`.
#[inline(always)]
pub(crate) fn small_free(bytes: usize) {
    let (s, own) = slot();
    add(&s.frees, 1, own);
    add(&s.bytes_out, bytes as u64, own);
}

/// Totals of the small path: (allocations, frees, bytes live now).
pub fn small_totals() -> (u64, u64, i64) {
    let (mut a, mut f, mut i, mut o) = (0u64, 0u64, 0u64, 0u64);
    for s in &SMALL {
        a += s.allocs.load(Ordering::Relaxed);
        f += s.frees.load(Ordering::Relaxed);
        i += s.bytes_in.load(Ordering::Relaxed);
        o += s.bytes_out.load(Ordering::Relaxed);
    }
    (a, f, i as i64 - o as i64)
}

/// In a forked child the counters go on from the parent's values (they describe the
/// memory the child inherited).
fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < U.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[u])
    }
}

/// The counters as one JSON object.
pub fn json(setup: &str) -> String {
    let l = large::stats();
    let (a, f, live) = small_totals();
    let mut nodes = String::new();
    for (i, n) in l.nodes.iter().enumerate() {
        if n.calls == 0 && n.frees == 0 {
            continue;
        }
        if !nodes.is_empty() {
            nodes.push(',');
        }
        let name = if i == large::NODES {
            "\"any\"".to_owned()
        } else {
            format!("\"{i}\"")
        };
        nodes.push_str(&format!(
            "{name}:{{\"current\":{},\"peak\":{},\"calls\":{},\"frees\":{}}}",
            n.current, n.peak, n.calls, n.frees
        ));
    }
    format!(
        "{{\"version\":1,\"pid\":{},{setup},\"small\":{{\"calls\":{a},\"frees\":{f},\"current\":{live}}},\
         \"large\":{{\"current\":{},\"peak\":{},\"mapped\":{},\"cached\":{},\"cache_hits\":{},\"fresh\":{},\
         \"realloc_in_place\":{},\"realloc_moved\":{},\"realloc_copied\":{},\"placement_failures\":{},\
         \"fallbacks\":{},\"bad_frees\":{},\"nodes\":{{{nodes}}}}}}}",
        std::process::id(),
        l.current,
        l.peak,
        l.mapped,
        l.cached,
        l.cache_hits,
        l.fresh,
        l.realloc_in_place,
        l.realloc_moved,
        l.realloc_copied,
        l.placement_failures,
        l.fallbacks,
        l.bad_frees
    )
}

/// The counters as a few lines for people.
pub fn text(setup: &str) -> String {
    let l = large::stats();
    let (a, f, live) = small_totals();
    let mut s = format!(
        "hetmem-preload: pid {} ({setup})\n  small: {a} allocations, {f} frees, {} live\n  \
         large: {} live, peak {}, {} fresh maps, {} cache hits, realloc {} in place / {} moved / {} copied\n",
        std::process::id(),
        human(live.max(0) as u64),
        human(l.current),
        human(l.peak),
        l.fresh,
        l.cache_hits,
        l.realloc_in_place,
        l.realloc_moved,
        l.realloc_copied,
    );
    for (i, n) in l.nodes.iter().enumerate() {
        if n.calls == 0 && n.frees == 0 {
            continue;
        }
        let name = if i == large::NODES {
            "first touch / interleaved".to_owned()
        } else {
            format!("node {i}")
        };
        s.push_str(&format!(
            "  large on {name}: {} calls, {} frees, {} live, peak {}\n",
            n.calls,
            n.frees,
            human(n.current),
            human(n.peak)
        ));
    }
    if l.placement_failures + l.fallbacks + l.bad_frees > 0 {
        s.push_str(&format!(
            "  placement refused {}, served by the small path {}, bad frees {}\n",
            l.placement_failures, l.fallbacks, l.bad_frees
        ));
    }
    s
}
