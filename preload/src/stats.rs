//! Counters: the small path's in sharded atomics (a shard per thread, nearly: picked by
//! the thread's descriptor address, so threads do not share cache lines), the large
//! path's exact per node under its lock ([`crate::large::LargeStats`]); printed at exit
//! when `HETMEM_STATS` asks.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::large;

const SHARDS: usize = 32;

#[repr(align(128))]
struct Shard {
    allocs: AtomicU64,
    frees: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const SHARD: Shard = Shard {
    allocs: AtomicU64::new(0),
    frees: AtomicU64::new(0),
    bytes_in: AtomicU64::new(0),
    bytes_out: AtomicU64::new(0),
};
static SMALL: [Shard; SHARDS] = [SHARD; SHARDS];

/// This thread's shard.
#[inline(always)]
fn shard() -> &'static Shard {
    // SAFETY: pthread_self has no preconditions (it reads the thread pointer).
    let t = unsafe { libc::pthread_self() } as usize;
    let i = (t >> 12).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (usize::BITS - 5);
    &SMALL[i % SHARDS]
}

/// Counts a small allocation of `bytes` (its usable size).
#[inline(always)]
pub fn small_alloc(bytes: usize) {
    let s = shard();
    s.allocs.fetch_add(1, Ordering::Relaxed);
    s.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// Counts a small free of `bytes`.
#[inline(always)]
pub fn small_free(bytes: usize) {
    let s = shard();
    s.frees.fetch_add(1, Ordering::Relaxed);
    s.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
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
