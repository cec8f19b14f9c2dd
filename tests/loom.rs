//! loom models of the lock-free byte counter (`hetmem::testing::ByteCounter`).
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom`. A binary of its
//! own because it builds only with `--cfg loom`, which swaps the crate's atomics for
//! loom's (empty otherwise).
#![cfg(loom)]

use hetmem::testing::ByteCounter;
use loom::sync::Arc;
use loom::thread;

/// Two threads race to reserve more than the limit allows together: exactly the
/// reservations that fit succeed, in every interleaving, and the books balance.
#[test]
fn limit_holds_under_races() {
    loom::model(|| {
        let c = Arc::new(ByteCounter::with_limit(100));
        let hs: Vec<_> = [60usize, 70]
            .into_iter()
            .map(|n| {
                let c = c.clone();
                thread::spawn(move || c.try_reserve(n).is_ok().then_some(n))
            })
            .collect();
        let got: Vec<usize> = hs.into_iter().filter_map(|h| h.join().unwrap()).collect();
        assert_eq!(got.len(), 1, "60 + 70 > 100: exactly one fits");
        assert_eq!(c.current(), got[0]);
        assert!(c.current() <= c.limit());
        assert_eq!(c.peak(), got[0]);
    });
}

/// A release racing a reservation: the reservation succeeds only if the room it needs
/// was there, and the peak is the largest use that ever existed.
#[test]
fn peak_is_the_maximum_use() {
    loom::model(|| {
        let c = Arc::new(ByteCounter::with_limit(100));
        c.try_reserve(80).unwrap();
        let c1 = c.clone();
        let releaser = thread::spawn(move || c1.release(80));
        let c2 = c.clone();
        let reserver = thread::spawn(move || c2.try_reserve(50).is_ok());
        releaser.join().unwrap();
        let reserved = reserver.join().unwrap();
        let expect_now = if reserved { 50 } else { 0 };
        assert_eq!(c.current(), expect_now);
        assert_eq!(c.count(), reserved as u64);
        assert_eq!(
            c.peak(),
            80,
            "50 after the release never exceeds the 80 before it"
        );
    });
}

/// Three reservers and a release: use never exceeds the limit at any point a thread
/// can observe, and the final count matches the successes.
#[test]
fn concurrent_reserve_release_balance() {
    loom::model(|| {
        let c = Arc::new(ByteCounter::with_limit(10));
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let c = c.clone();
                thread::spawn(move || {
                    let ok = c.try_reserve(6).is_ok();
                    assert!(c.current() <= 10);
                    if ok {
                        c.release(6);
                    }
                    ok
                })
            })
            .collect();
        let oks = hs
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert!(
            oks >= 1,
            "at least one of two 6-byte reservations fits in 10"
        );
        assert_eq!(c.current(), 0);
        assert_eq!(c.count(), 0);
        assert!(
            c.peak() == 6,
            "two 6s can never be held at once under a limit of 10"
        );
    });
}

/// A peak reset racing a reservation: afterwards the peak is never below current use.
#[test]
fn reset_peak_never_drops_below_current() {
    loom::model(|| {
        let c = Arc::new(ByteCounter::with_limit(100));
        c.try_reserve(30).unwrap();
        c.release(30);
        let c1 = c.clone();
        let reserver = thread::spawn(move || c1.try_reserve(50).unwrap());
        c.reset_peak();
        reserver.join().unwrap();
        assert_eq!(c.current(), 50);
        assert_eq!(
            c.peak(),
            50,
            "the reset may not hide the reservation that raced it"
        );
    });
}

/// A simulated device of 64 MiB and a plain-segment pool over it with a 40 MiB budget.
fn sim_pool() -> (hetmem::Manager, hetmem::pool::DevicePool) {
    use hetmem::pool::{Budget, PoolConfig};
    use hetmem::{BackendKind, Manager, SimConfig};
    let mgr = Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(SimConfig::with_devices(1, 64 << 20))
        .build()
        .unwrap();
    let cfg = PoolConfig {
        budget: Budget::Bytes(40 << 20),
        expandable_segments: false,
        ..PoolConfig::default()
    };
    let pool = mgr.device_pool(0, cfg).unwrap();
    (mgr, pool)
}

/// The device pool's core under loom: two threads allocate, write, check and free
/// through one pool (its state is behind a loom mutex). Blocks never overlap, each
/// keeps its bytes, and the books balance in every interleaving.
#[test]
fn pool_threads_never_share_a_block() {
    loom::model(|| {
        let (mgr, pool) = sim_pool();
        let stream = mgr.create_stream(0).unwrap();
        let hs: Vec<_> = (0..2u8)
            .map(|t| {
                let (pool, stream) = (pool.clone(), stream.clone());
                thread::spawn(move || {
                    let b = pool.alloc(1 << 20, &stream).unwrap();
                    b.write(0, &[t; 64]).unwrap();
                    let mut back = [0u8; 64];
                    b.read(0, &mut back).unwrap();
                    assert_eq!(back, [t; 64], "another thread wrote into this block");
                    b.ptr()
                })
            })
            .collect();
        let ptrs: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        let st = pool.stats();
        assert_eq!(st.allocation.all.current, 0);
        assert_eq!(st.allocated_bytes.all.current, 0);
        assert_eq!(st.allocation.all.allocated, 2);
        // One 2 MiB small-pool segment serves both, whichever order they ran in.
        assert_eq!(st.reserved_bytes.all.current, 2 << 20);
        // Both blocks came from that segment (the same address when one thread freed
        // before the other allocated).
        assert!(ptrs[0].0.abs_diff(ptrs[1].0) < 2 << 20, "{ptrs:x?}");
    });
}

/// Two threads on two streams hold their blocks at once: the blocks are disjoint
/// whatever the interleaving, and once both are freed the books balance.
#[test]
fn pool_blocks_held_at_once_are_disjoint() {
    loom::model(|| {
        let (mgr, pool) = sim_pool();
        let hs: Vec<_> = (0..2u8)
            .map(|t| {
                let pool = pool.clone();
                let stream = mgr.create_stream(0).unwrap();
                thread::spawn(move || {
                    let b = pool.alloc(3 << 19, &stream).unwrap();
                    b.write(0, &[t; 64]).unwrap();
                    (b, stream)
                })
            })
            .collect();
        let held: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        let (a, b) = (&held[0].0, &held[1].0);
        let (ra, rb) = (
            a.ptr().0..a.ptr().0 + a.len() as u64,
            b.ptr().0..b.ptr().0 + b.len() as u64,
        );
        assert!(
            ra.end <= rb.start || rb.end <= ra.start,
            "{ra:x?} and {rb:x?} overlap"
        );
        for (t, (blk, _)) in held.iter().enumerate() {
            let mut back = [0u8; 64];
            blk.read(0, &mut back).unwrap();
            assert_eq!(back, [t as u8; 64], "block {t} lost its bytes");
        }
        assert_eq!(pool.stats().allocation.all.current, 2);
        drop(held);
        let st = pool.stats();
        assert_eq!(st.allocation.all.current, 0);
        assert_eq!(st.allocated_bytes.all.current, 0);
    });
}

/// A private pool under loom: while one thread allocates and frees for a graph's pool
/// (its stream picked by the filter) and ends the routing, another allocates and frees
/// on its own stream. Whatever the interleaving, neither thread ever gets an address
/// the other got (the graph's freed block stays the graph's; the other stream's freed
/// block is not nobody's for the graph to take), and once the pool is released the
/// books balance.
#[test]
fn a_private_pool_never_shares_a_block_with_the_common_pool() {
    use hetmem::pool::PrivatePoolId;
    loom::model(|| {
        let (mgr, pool) = sim_pool();
        let (graph, other) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
        let id = PrivatePoolId(1, 0);
        let h = graph.handle();
        pool.begin_allocate_to_pool(id, move |s| s.handle() == h)
            .unwrap();
        let g = {
            let pool = pool.clone();
            thread::spawn(move || {
                let a = pool.alloc(1 << 20, &graph).unwrap().ptr();
                let b = pool.alloc(1 << 20, &graph).unwrap().ptr();
                pool.end_allocate_to_pool(id).unwrap();
                [a, b]
            })
        };
        let o = {
            let pool = pool.clone();
            thread::spawn(move || {
                let a = pool.alloc(1 << 20, &other).unwrap().ptr();
                let b = pool.alloc(1 << 20, &other).unwrap().ptr();
                [a, b]
            })
        };
        let (g, o) = (g.join().unwrap(), o.join().unwrap());
        assert!(g.iter().all(|p| !o.contains(p)), "{g:x?} and {o:x?}");
        let st = pool.private_pool(id).unwrap();
        assert_eq!((st.uses, st.allocating, st.allocated_bytes), (1, false, 0));
        assert_eq!(st.free_bytes, 1 << 20);
        pool.release_pool(id).unwrap();
        assert!(pool.private_pool(id).is_none());
        assert_eq!(pool.stats().allocation.all.current, 0);
    });
}

/// `NumaAlloc`'s cache of freed blocks: two threads each free a block into a one-slot
/// cache and take one back. No block is handed to both, none is lost: what was taken
/// and what is left are exactly what was put.
#[test]
fn block_cache_hands_each_block_out_once() {
    use hetmem::testing::{BlockCache, UNIT};
    loom::model(|| {
        let cache = Arc::new(BlockCache::<1>::new());
        let hs: Vec<_> = (1..=2usize)
            .map(|t| {
                let cache = Arc::clone(&cache);
                thread::spawn(move || {
                    let kept = cache.put(t * UNIT, 4);
                    (kept, cache.take(4, UNIT))
                })
            })
            .collect();
        let mut put = Vec::new();
        let mut taken = Vec::new();
        for (t, h) in (1..=2usize).zip(hs) {
            let (kept, got) = h.join().unwrap();
            if kept {
                put.push(t * UNIT);
            }
            taken.extend(got);
        }
        let mut left = Vec::new();
        cache.drain(|a, pages| {
            assert_eq!(pages, 4);
            left.push(a);
        });
        let mut out: Vec<usize> = taken.iter().chain(&left).copied().collect();
        out.sort_unstable();
        put.sort_unstable();
        assert_eq!(out, put, "taken {taken:?}, left {left:?}");
    });
}
