//! The device pool: reuse, stream order, budgets and OOM, trim, statistics, threads,
//! and a property test against a simple model. Runs on the simulator, with expandable
//! segments (virtual memory management) and with plain segments.

use crate::common::fake_hip;

use std::time::Duration;

use hetmem::backend::PER_THREAD_STREAM;
use hetmem::pool::{Budget, DevicePool, PoolBlock, PoolConfig};
use hetmem::{BackendKind, Error, Manager, MemKind, SimConfig, Stream};
use proptest::prelude::*;

const MIB: usize = 1 << 20;

fn sim() -> Manager {
    Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(SimConfig::with_devices(2, 1 << 30))
        .build()
        .unwrap()
}

fn pool(mgr: &Manager, expandable: bool, budget: Budget) -> DevicePool {
    let cfg = PoolConfig {
        budget,
        expandable_segments: expandable,
        ..PoolConfig::default()
    };
    mgr.device_pool(0, cfg).unwrap()
}

fn both(f: impl Fn(bool)) {
    f(true);
    f(false);
}

/// Writes `tag` at both ends of the block (as much of it as fits).
fn stamp(b: &PoolBlock, tag: u64) {
    let n = b.len().min(8);
    let t = tag.to_le_bytes();
    b.write(0, &t[..n]).unwrap();
    b.write(b.len() - n, &t[..n]).unwrap();
}

fn check_stamp(b: &PoolBlock, tag: u64) {
    let n = b.len().min(8);
    let (mut x, mut y) = ([0u8; 8], [0u8; 8]);
    b.read(0, &mut x[..n]).unwrap();
    b.read(b.len() - n, &mut y[..n]).unwrap();
    let mut t = [0u8; 8];
    t[..n].copy_from_slice(&tag.to_le_bytes()[..n]);
    assert_eq!(
        (u64::from_le_bytes(x), u64::from_le_bytes(y)),
        (u64::from_le_bytes(t), u64::from_le_bytes(t)),
        "block {:?} of {} bytes",
        b.ptr(),
        b.len()
    );
}

#[test]
fn cached_blocks_come_back_without_driver_calls() {
    both(|exp| {
        let mgr = sim();
        let p = pool(&mgr, exp, Budget::Device);
        assert_eq!(p.expandable(), exp);
        let s = mgr.create_stream(0).unwrap();
        for size in [1usize, 700, 64 << 10, 3 * MIB + 5, 45 * MIB] {
            let a = p.alloc(size, &s).unwrap();
            let addr = a.ptr();
            assert_eq!(addr.0 % 512, 0, "blocks are 512-byte aligned");
            drop(a);
            let calls = |st: hetmem::pool::PoolStats| (st.num_device_alloc, st.num_pages_moved);
            let before = calls(p.stats());
            let b = p.alloc(size, &s).unwrap();
            assert_eq!(b.ptr(), addr, "same stream, same size: the cached block");
            assert_eq!(
                calls(p.stats()),
                before,
                "no driver call for a cached block"
            );
        }
        let st = p.stats();
        assert_eq!(st.allocation.all.current, 0);
        assert_eq!(st.allocated_bytes.all.current, 0);
        assert!(st.reserved_bytes.all.current > 0, "memory stays cached");
    });
}

#[test]
fn bytes_survive_across_pages_and_splits() {
    both(|exp| {
        let mgr = sim();
        let p = pool(&mgr, exp, Budget::Device);
        let s = mgr.create_stream(0).unwrap();
        // Sizes that straddle 2 MiB pages and split each other's free blocks.
        let blocks: Vec<PoolBlock> = [5 * MIB + 3, 512, 3 * MIB, 1000, 9 * MIB, 7]
            .iter()
            .map(|&n| p.alloc(n, &s).unwrap())
            .collect();
        for (i, b) in blocks.iter().enumerate() {
            let data: Vec<u8> = (0..b.len()).map(|j| (j * 31 + i * 7) as u8).collect();
            b.write(0, &data).unwrap();
        }
        for (i, b) in blocks.iter().enumerate() {
            let mut out = vec![0u8; b.len()];
            b.read(0, &mut out).unwrap();
            assert!(
                out.iter()
                    .enumerate()
                    .all(|(j, v)| *v == (j * 31 + i * 7) as u8),
                "block {i}"
            );
        }
        let b = &blocks[0];
        assert!(matches!(
            b.write(b.len() - 3, &[0; 4]),
            Err(Error::OutOfBounds { .. })
        ));
    });
}

#[test]
fn another_stream_waits_for_the_stream_that_freed_the_block() {
    let mgr = sim();
    // Plain segments and a budget of one segment: the second stream can only get the
    // block the first one freed.
    let p = pool(&mgr, false, Budget::Bytes(20 * MIB));
    let (a, b) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
    let sim = mgr.sim().unwrap();
    let blk = p.alloc(20 * MIB, &a).unwrap();
    let addr = blk.ptr();
    let k = sim
        .launch_kernel(a.handle(), Duration::from_millis(5))
        .unwrap();
    drop(blk); // freed on `a` while its kernel still runs (in virtual time)
    let blk = p.alloc(20 * MIB, &b).unwrap();
    assert_eq!(blk.ptr(), addr, "the only memory there is");
    let k2 = sim
        .launch_kernel(b.handle(), Duration::from_micros(1))
        .unwrap();
    assert!(
        k2.start_ns >= k.end_ns,
        "b's work starts after a's kernel ({} < {})",
        k2.start_ns,
        k.end_ns
    );
    assert_eq!(
        sim.host_time_ns(),
        sim.stats().driver.total().1,
        "handed over with an event, not a host wait: the host spent its time in driver calls"
    );
}

/// The per-thread default stream, wrapped once and used from every thread.
fn per_thread_stream(mgr: &Manager) -> Stream {
    // SAFETY: every thread has a per-thread default stream on every device.
    unsafe { Stream::wrap(mgr, 0, PER_THREAD_STREAM) }.unwrap()
}

#[test]
fn a_block_freed_on_one_threads_per_thread_stream_reaches_another_thread_behind_an_event() {
    let mgr = sim();
    // One segment: the second thread can only get the block the first one freed.
    let p = pool(&mgr, false, Budget::Bytes(20 * MIB));
    let s = per_thread_stream(&mgr);
    let sim = mgr.sim().unwrap();
    let blk = p.alloc(20 * MIB, &s).unwrap();
    let addr = blk.ptr();
    // On this thread's per-thread stream.
    let k = sim
        .launch_kernel(s.handle(), Duration::from_millis(5))
        .unwrap();
    drop(blk);
    std::thread::scope(|t| {
        t.spawn(|| {
            let before = sim.stream_time_ns(s.handle()).unwrap();
            assert!(before < k.end_ns, "this thread's stream is another stream");
            let blk = p.alloc(20 * MIB, &s).unwrap();
            assert_eq!(blk.ptr(), addr, "the only memory there is");
            let at = sim.stream_time_ns(s.handle()).unwrap();
            assert!(
                at >= k.end_ns,
                "handed to this thread's stream at {at} ns, while the other thread's \
                 kernel used it until {} ns",
                k.end_ns
            );
            assert!(
                sim.host_time_ns() < k.end_ns,
                "behind an event, not a host wait"
            );
        });
    });
    // Back on the first thread: its own stream takes the block back at once.
    let blk = p.alloc(20 * MIB, &s).unwrap();
    assert_eq!(blk.ptr(), addr);
}

#[test]
fn a_per_thread_block_freed_on_another_thread_is_handed_on_after_the_device() {
    let mgr = sim();
    let p = pool(&mgr, false, Budget::Bytes(20 * MIB));
    let s = per_thread_stream(&mgr);
    let sim = mgr.sim().unwrap();
    let blk = p.alloc(20 * MIB, &s).unwrap();
    let addr = blk.ptr();
    let k = sim
        .launch_kernel(s.handle(), Duration::from_millis(5))
        .unwrap();
    std::thread::scope(|t| {
        // Freed here, where the allocating thread's stream cannot be named: no event
        // can be recorded after its kernel.
        t.spawn(move || drop(blk));
    });
    std::thread::scope(|t| {
        t.spawn(|| {
            let blk = p.alloc(20 * MIB, &s).unwrap();
            assert_eq!(blk.ptr(), addr, "the only memory there is");
            assert!(
                sim.host_time_ns() >= k.end_ns,
                "the device was waited for before the block was handed on ({} < {})",
                sim.host_time_ns(),
                k.end_ns
            );
        });
    });
}

#[test]
fn fresh_memory_never_waits_for_another_streams_work() {
    both(|exp| {
        let mgr = sim();
        let p = pool(&mgr, exp, Budget::Device);
        let (x, y) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
        let sim = mgr.sim().unwrap();
        let xb = p.alloc(4 * MIB, &x).unwrap();
        // Y frees the block next to memory nobody has used yet, while its kernel runs.
        let yb = p.alloc(8 * MIB, &y).unwrap();
        let k = sim
            .launch_kernel(y.handle(), Duration::from_millis(50))
            .unwrap();
        drop(yb);
        // X needs memory: untouched memory is there, so it must not queue behind Y.
        let xb2 = p.alloc(6 * MIB, &x).unwrap();
        // (Kernels share the one compute engine; the stream's own clock shows a wait.)
        let ready = sim.stream_time_ns(x.handle()).unwrap();
        assert!(
            ready < k.end_ns,
            "expandable {exp}: X was made to wait for Y's kernel (ready at {ready} ns, \
             Y's kernel ends at {} ns)",
            k.end_ns
        );
        drop((xb, xb2));
    });
}

/// Near the budget, memory that fits is found: a freed block beside untouched memory
/// (the two do not merge while a stream owns the block) does not turn a request the
/// budget can hold into an `OutOfMemory` (the retry merges them and looks again).
#[test]
fn a_request_within_the_budget_is_served_beside_a_freed_block() {
    both(|exp| {
        let mgr = sim();
        let s = mgr.create_stream(0).unwrap();
        let p = pool(&mgr, exp, Budget::Bytes(20 * MIB));
        drop(p.alloc(3 * MIB, &s).unwrap());
        let whole = p.alloc(20 * MIB, &s);
        assert!(whole.is_ok(), "expandable {exp}: {:?}", whole.err());
        drop(whole);
        assert!(
            p.stats().num_alloc_retries <= 1,
            "at most one retry, counted once"
        );
        assert!(p.reserved() <= 20 * MIB);
        let p = pool(&mgr, exp, Budget::Bytes(40 * MIB));
        let live = p.alloc(16 * MIB, &s).unwrap();
        drop(p.alloc(3 * MIB, &s).unwrap());
        let rest = p.alloc(24 * MIB, &s);
        assert!(rest.is_ok(), "expandable {exp}: {:?}", rest.err());
        drop((live, rest));
    });
}

#[test]
fn record_stream_orders_reuse_after_the_other_stream() {
    let mgr = sim();
    let p = pool(&mgr, true, Budget::Device);
    let (a, b) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
    let sim = mgr.sim().unwrap();
    let blk = p.alloc(MIB, &a).unwrap();
    let blk_addr = blk.ptr();
    blk.record_stream(&b).unwrap();
    let k = sim
        .launch_kernel(b.handle(), Duration::from_millis(3))
        .unwrap(); // b uses it
    drop(blk);
    let again = p.alloc(MIB, &a).unwrap();
    assert_eq!(
        again.ptr(),
        blk_addr,
        "the same block, reused on its stream"
    );
    // The stream's own clock, not a kernel's start: the simulated device runs kernels
    // one at a time, so a kernel on `a` would start after b's anyway.
    assert!(
        sim.stream_time_ns(a.handle()).unwrap() >= k.end_ns,
        "a waited for b's use before reusing the block"
    );
    drop(again);
    // Without record_stream, the block comes back at once: the test can fail.
    let blk = p.alloc(MIB, &a).unwrap();
    let k = sim
        .launch_kernel(b.handle(), Duration::from_millis(3))
        .unwrap();
    drop(blk);
    let _again = p.alloc(MIB, &a).unwrap();
    assert!(sim.stream_time_ns(a.handle()).unwrap() < k.end_ns);
}

#[test]
fn budget_and_out_of_memory_carry_the_numbers() {
    both(|exp| {
        let mgr = sim();
        let p = pool(&mgr, exp, Budget::Bytes(64 * MIB));
        let s = mgr.create_stream(0).unwrap();
        let a = p.alloc(48 * MIB, &s).unwrap();
        match p.alloc(32 * MIB, &s) {
            Err(Error::OutOfMemory {
                kind: MemKind::Device(0),
                requested,
                free,
                reserved,
                largest_free_block,
            }) => {
                assert_eq!(requested, 32 * MIB);
                let reserved = reserved.expect("pool OOM says what it holds");
                assert!(
                    (48 * MIB..=64 * MIB).contains(&reserved),
                    "reserved {reserved}"
                );
                assert_eq!(free, 64 * MIB - reserved);
                assert!(largest_free_block.expect("pool OOM says its largest block") < 32 * MIB);
            }
            other => panic!("expandable={exp}: expected OutOfMemory, got {other:?}"),
        }
        assert_eq!(p.stats().num_ooms, 1);
        drop(a);
        // The cached 48 MiB goes back to the device so that 32 + 16 fit.
        let b = p.alloc(32 * MIB, &s).unwrap();
        let c = p.alloc(16 * MIB, &s).unwrap();
        assert!(p.reserved() <= 64 * MIB);
        drop((b, c));
        let err = p.alloc(65 * MIB, &s).unwrap_err();
        assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
        assert!(err.to_string().contains("reserved by the pool"), "{err}");
    });
}

/// Mid-size requests share 20 MiB segments where the budget has room for one; under a
/// tighter budget each gets a segment of its own size instead of failing.
#[test]
fn mid_size_requests_fit_a_budget_smaller_than_a_shared_segment() {
    both(|exp| {
        let mgr = sim();
        let p = pool(&mgr, exp, Budget::Bytes(10 * MIB));
        let s = mgr.create_stream(0).unwrap();
        let a = p.alloc(3 * MIB, &s).unwrap();
        let b = p.alloc(3 * MIB, &s).unwrap();
        assert!(
            p.reserved() <= 10 * MIB,
            "expandable={exp}: {}",
            p.reserved()
        );
        drop((a, b));
    });
}

#[test]
fn trim_gives_everything_back() {
    both(|exp| {
        let mgr = sim();
        let p = pool(&mgr, exp, Budget::Device);
        let s = mgr.create_stream(0).unwrap();
        let keep = p.alloc(MIB, &s).unwrap();
        let blocks: Vec<_> = (0..20)
            .map(|i| p.alloc((i + 1) * 700_000, &s).unwrap())
            .collect();
        let free_before = mgr.backend().mem_info(0).unwrap().free;
        drop(blocks);
        let released = p.trim().unwrap();
        assert!(released > 0);
        let st = p.stats();
        assert_eq!(st.reserved_bytes.all.current as usize, p.reserved());
        // What is left is what `keep` needs: one or two pages, or its segment.
        assert!(
            p.reserved() <= 20 * MIB,
            "reserved {} after trim",
            p.reserved()
        );
        assert_eq!(
            mgr.backend().mem_info(0).unwrap().free,
            free_before + released
        );
        stamp(&keep, 9);
        check_stamp(&keep, 9);
    });
}

#[test]
fn stats_use_pytorch_names() {
    let mgr = sim();
    let p = pool(&mgr, true, Budget::Device);
    let s = mgr.create_stream(0).unwrap();
    let small = p.alloc(1000, &s).unwrap();
    let large = p.alloc(3 * MIB, &s).unwrap();
    let m = p.stats().to_map();
    assert_eq!(m["allocated_bytes.all.current"], 1024 + 3 * MIB as u64);
    assert_eq!(m["allocated_bytes.small_pool.current"], 1024);
    assert_eq!(m["allocated_bytes.large_pool.current"], 3 * MIB as u64);
    assert_eq!(m["requested_bytes.all.current"], 1000 + 3 * MIB as u64);
    assert_eq!(m["allocation.all.current"], 2);
    assert!(m["reserved_bytes.all.current"] >= m["allocated_bytes.all.current"]);
    for k in [
        "num_alloc_retries",
        "num_ooms",
        "active_bytes.all.peak",
        "segment.all.current",
    ] {
        assert!(m.contains_key(k), "{k}");
    }
    // Keys that would not mean what PyTorch's mean are left out.
    assert!(!m.keys().any(|k| k.starts_with("inactive_split")), "{m:?}");
    drop((small, large));
    let st = p.stats();
    assert_eq!(st.allocated_bytes.all.current, 0);
    assert_eq!(st.allocated_bytes.all.peak, 1024 + 3 * MIB as u64);
    p.reset_peak();
    assert_eq!(p.stats().allocated_bytes.all.peak, 0);
}

#[test]
fn bad_requests_are_refused() {
    let mgr = sim();
    let p = pool(&mgr, true, Budget::Device);
    let s = mgr.create_stream(0).unwrap();
    assert!(matches!(p.alloc(0, &s), Err(Error::InvalidSize { .. })));
    assert!(matches!(
        p.alloc(usize::MAX, &s),
        Err(Error::InvalidSize { .. })
    ));
    let other_dev = mgr.create_stream(1).unwrap();
    assert!(matches!(
        p.alloc(10, &other_dev),
        Err(Error::InvalidArgument(_))
    ));
    let other_mgr = sim();
    let foreign = other_mgr.create_stream(0).unwrap();
    assert!(matches!(
        p.alloc(10, &foreign),
        Err(Error::ForeignHandle { .. })
    ));
    assert!(mgr
        .device_pool(
            0,
            PoolConfig {
                budget: Budget::Fraction(1.5),
                ..PoolConfig::default()
            }
        )
        .is_err());
    assert!(mgr
        .device_pool(
            0,
            PoolConfig {
                budget: Budget::Bytes(0),
                ..PoolConfig::default()
            }
        )
        .is_err());
    assert!(matches!(
        mgr.device_pool(7, PoolConfig::default()),
        Err(Error::UnknownDevice { .. })
    ));
}

#[test]
fn threads_allocate_and_free_at_once() {
    both(|exp| {
        let mgr = sim();
        let p = pool(&mgr, exp, Budget::Bytes(512 * MIB));
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let (p, mgr) = (p.clone(), &mgr);
                sc.spawn(move || {
                    let s = mgr.create_stream(0).unwrap();
                    let mut live: Vec<(PoolBlock, u64)> = Vec::new();
                    for i in 0..400u64 {
                        if live.len() > 12 || (i % 3 == 2 && !live.is_empty()) {
                            let (b, tag) = live.swap_remove((i as usize * 7) % live.len());
                            check_stamp(&b, tag);
                        } else {
                            let size = 16 + ((i * 7919 + t * 104_729) % (3 * MIB as u64)) as usize;
                            let b = p.alloc(size, &s).unwrap();
                            let tag = t << 32 | i;
                            stamp(&b, tag);
                            live.push((b, tag));
                        }
                    }
                    for (b, tag) in live {
                        check_stamp(&b, tag);
                    }
                });
            }
        });
        let st = p.stats();
        assert_eq!(st.allocation.all.current, 0);
        assert_eq!(st.allocated_bytes.all.current, 0);
    });
}

#[derive(Debug, Clone)]
enum Op {
    Alloc { size: usize, stream: usize },
    Free(usize),
    Trim,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (1usize..(6 * MIB), 0usize..2).prop_map(|(size, stream)| Op::Alloc { size, stream }),
        4 => any::<usize>().prop_map(Op::Free),
        1 => Just(Op::Trim),
    ]
}

/// Runs `ops` (sizes times `scale`) against pool `p` on `mgr` (a 1 GiB simulated device)
/// and checks it against a model, the set of live blocks: no two live blocks overlap,
/// all are 512-byte aligned, their bytes are never disturbed by other blocks, allocated
/// bytes equal the live blocks' rounded sizes, reserved never passes `budget` nor falls
/// below what is allocated, the device lends the pool exactly what it counts, an
/// out-of-memory comes only with less than `slack` bytes of room left, and after the
/// last free and a trim nothing stays.
fn check_against_model(
    mgr: &Manager,
    p: &DevicePool,
    ops: Vec<Op>,
    scale: usize,
    budget: usize,
    slack: usize,
) -> Result<(), TestCaseError> {
    let streams = [mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap()];
    let mut live: Vec<(PoolBlock, u64)> = Vec::new();
    let mut tag = 0u64;
    for op in ops {
        match op {
            Op::Alloc { size, stream } => match p.alloc(size * scale, &streams[stream]) {
                Ok(b) => {
                    tag += 1;
                    stamp(&b, tag);
                    live.push((b, tag));
                }
                Err(Error::OutOfMemory { requested, .. }) => {
                    // Only when what is live leaves no room for it.
                    let used: usize = live
                        .iter()
                        .map(|(b, _)| b.len().next_multiple_of(512))
                        .sum();
                    prop_assert!(
                        used + requested > budget - slack,
                        "OOM for {requested} with only {used} live under {budget}"
                    );
                }
                Err(e) => return Err(TestCaseError::fail(format!("alloc: {e}"))),
            },
            Op::Free(i) if !live.is_empty() => {
                let (b, t) = live.swap_remove(i % live.len());
                check_stamp(&b, t);
            }
            Op::Free(_) => {}
            Op::Trim => {
                p.trim().unwrap();
            }
        }
        let mut spans: Vec<(u64, u64)> = live
            .iter()
            .map(|(b, _)| (b.ptr().0, b.ptr().0 + b.len() as u64))
            .collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            prop_assert!(w[0].1 <= w[1].0, "live blocks overlap: {w:?}");
        }
        prop_assert!(spans.iter().all(|s| s.0 % 512 == 0));
        let st = p.stats();
        let rounded: u64 = live
            .iter()
            .map(|(b, _)| b.len().next_multiple_of(512) as u64)
            .sum();
        prop_assert_eq!(st.allocated_bytes.all.current, rounded);
        prop_assert_eq!(st.allocation.all.current, live.len() as u64);
        prop_assert!(st.reserved_bytes.all.current as usize <= budget);
        prop_assert!(st.reserved_bytes.all.current >= rounded);
        // The driver counts agree with what is held (segments, without expandable
        // segments), and the device's memory in use is exactly what the pool reserves
        // (no chunk held outside the count).
        if !p.expandable() {
            let held = st.num_device_alloc - st.num_device_free;
            prop_assert_eq!(held, st.segment.all.current, "{:?}", st);
        }
        let used = (1u64 << 30) - mgr.backend().mem_info(0).unwrap().free as u64;
        prop_assert_eq!(used, st.reserved_bytes.all.current);
    }
    for (b, t) in live.drain(..) {
        check_stamp(&b, t);
    }
    p.trim().unwrap();
    prop_assert_eq!(p.reserved(), 0);
    let free_now = mgr.backend().mem_info(0).unwrap().free;
    prop_assert_eq!(free_now, 1 << 30, "every byte went back to the device");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A tight budget (96 MiB of a 1 GiB device): page chunks that move where needed, or
    /// plain segments.
    #[test]
    fn pool_matches_a_model(ops in proptest::collection::vec(op(), 1..120), exp in any::<bool>()) {
        let mgr = sim();
        let budget = 96 * MIB;
        let p = pool(&mgr, exp, Budget::Bytes(budget));
        check_against_model(&mgr, &p, ops, 1, budget, 2 * 20 * MIB)?;
    }

    /// The whole device and large chunks made ahead of need (a quarter of what is held,
    /// up to half ahead of the allocated peak), requests up to 96 MiB: chunks made,
    /// moved when wholly free and idle, and the last resort when the device runs out.
    #[test]
    fn large_chunks_match_a_model(ops in proptest::collection::vec(op(), 1..80)) {
        let mgr = sim();
        let cfg = PoolConfig {
            min_chunk: 64 * MIB,
            chunk_fraction: 0.25,
            grow_ahead: 0.5,
            reserve_slack: 0.0,
            ..PoolConfig::default()
        };
        let p = mgr.device_pool(0, cfg).unwrap();
        // Free memory inside chunks that are partly in use cannot move: a request can
        // fail with up to a chunk's worth of such holes per chunk in use.
        check_against_model(&mgr, &p, ops, 16, 1 << 30, 1 << 29)?;
    }
}

#[test]
fn async_copies_into_and_out_of_blocks_keep_bytes() {
    use hetmem::{NumaPolicy, Placement};
    both(|exp| {
        let mgr = sim();
        let p = pool(&mgr, exp, Budget::Device);
        let (s, other) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
        let n = 5 * MIB + 123;
        let data: Vec<u8> = (0..n).map(|i| (i * 13 + 7) as u8).collect();
        let mut blk = p.alloc(n, &s).unwrap();
        {
            let mut src = mgr
                .alloc(Placement::Pinned(NumaPolicy::Default), n)
                .unwrap();
            src.as_mut_slice().unwrap().copy_from_slice(&data);
            mgr.copy(&mut blk, 0, &src, 0, n, Some(&s)).unwrap();
            // `src` dropped with the copy queued: its drop waits for the copy.
        }
        // Device to device on another stream (recorded on both blocks), then back out.
        let mut blk2 = p.alloc(n, &s).unwrap();
        let ev = s.record().unwrap();
        other.wait(&ev).unwrap();
        mgr.copy(&mut blk2, 0, &blk, 0, n, Some(&other)).unwrap();
        let mut out = mgr
            .alloc(Placement::Pinned(NumaPolicy::Default), n)
            .unwrap();
        mgr.copy(&mut out, 0, &blk2, 0, n, Some(&other)).unwrap();
        assert!(
            out.as_slice().unwrap() == &data[..],
            "bytes after host -> block -> block -> host"
        );
        // Partial copies respect offsets and bounds.
        let mut small = mgr
            .alloc(Placement::Host(NumaPolicy::Default), 100)
            .unwrap();
        mgr.copy(&mut small, 0, &blk2, 1000, 100, Some(&s)).unwrap();
        assert!(small.as_slice().unwrap() == &data[1000..1100]);
        assert!(matches!(
            mgr.copy(&mut small, 0, &blk2, n - 50, 100, Some(&s)),
            Err(Error::OutOfBounds { .. })
        ));
        // A block copied onto itself does not compile: `Manager::copy` borrows `dst` as
        // `&mut` (`Manager::copy_within` is the buffer's overlapping copy).
        // Freed with copies behind them, then trimmed: unmapping waits for the copies.
        drop((blk, blk2));
        p.trim().unwrap();
        assert_eq!(p.stats().allocation.all.current, 0);
        // Another manager's buffer or stream is refused.
        let other_mgr = sim();
        let theirs = other_mgr
            .alloc(Placement::Host(NumaPolicy::Default), 16)
            .unwrap();
        let mut blk = p.alloc(16, &s).unwrap();
        assert!(matches!(
            mgr.copy(&mut blk, 0, &theirs, 0, 16, Some(&s)),
            Err(Error::ForeignHandle { .. })
        ));
        let their_stream = other_mgr.create_stream(0).unwrap();
        let mine = mgr.alloc(Placement::Host(NumaPolicy::Default), 16).unwrap();
        assert!(matches!(
            mgr.copy(&mut blk, 0, &mine, 0, 16, Some(&their_stream)),
            Err(Error::ForeignHandle { .. })
        ));
    });
}

/// On the fake HIP runtime copies really are asynchronous (they run when their stream
/// is synchronised or waited for), so this fails if a pool block or a buffer is freed,
/// reused or read before the copies that use it are done.
#[test]
fn plain_segments_on_an_asynchronous_runtime() {
    use hetmem::{NumaPolicy, Placement};
    let fake = fake_hip::FakeHip::with_devices(1, 256 << 20).unwrap();
    let mgr = Manager::builder()
        .backend(BackendKind::Rocm)
        .rocm_library(fake.path())
        .build()
        .unwrap();
    let p = mgr.device_pool(0, PoolConfig::default()).unwrap();
    assert!(!p.expandable(), "the fake has no virtual memory management");
    let s = mgr.create_stream(0).unwrap();
    let n = 3 * MIB;
    for round in 0..4u8 {
        let data = vec![round + 1; n];
        let mut blk = p.alloc(n, &s).unwrap();
        {
            // Pageable on purpose: unmapping it is no HIP call, so nothing in the runtime
            // runs the queued copy first. Only the buffer's drop waiting for its fence
            // keeps the copy from reading freed memory.
            let mut src = mgr.alloc(Placement::Host(NumaPolicy::Default), n).unwrap();
            src.as_mut_slice().unwrap().copy_from_slice(&data);
            mgr.copy(&mut blk, 0, &src, 0, n, Some(&s)).unwrap();
            assert!(fake.stat("queued_ops") > 0, "the copy is still queued");
        } // the queued copy still reads `src`: its drop must wait
        let mut out = mgr
            .alloc(Placement::Pinned(NumaPolicy::Default), n)
            .unwrap();
        mgr.copy(&mut out, 0, &blk, 0, n, Some(&s)).unwrap();
        // `as_slice` waits for the copy into `out`.
        assert!(
            out.as_slice().unwrap().iter().all(|b| *b == round + 1),
            "round {round}"
        );
        drop(blk); // reused next round on the same stream, in order
    }
    p.trim().unwrap();
    assert_eq!(p.reserved(), 0);
}

fn sim_of(capacity: usize) -> Manager {
    Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(SimConfig::with_devices(1, capacity))
        .build()
        .unwrap()
}

/// Making room to grow never waits for kernels: a free page whose stream still has a
/// kernel queued stays mapped (reserved runs ahead a little) instead of the host
/// stalling until the kernel ends; and the policy's high-water mark is its own, so
/// resetting the stats' peak does not make it unmap (and stall) more.
#[test]
fn growing_never_waits_for_kernels_nor_follows_reset_peak() {
    for reset in [false, true] {
        let m = sim_of(1 << 30);
        let p = m.device_pool(0, PoolConfig::default()).unwrap();
        let s = m.create_stream(0).unwrap();
        let sim = m.sim().unwrap();
        drop(p.alloc(40 * MIB, &s).unwrap());
        p.trim().unwrap();
        let a = p.alloc(8 * MIB, &s).unwrap();
        let pin = p.alloc(2 * MIB, &s).unwrap();
        drop(a);
        if reset {
            p.reset_peak();
        }
        let k = sim
            .launch_kernel(s.handle(), Duration::from_millis(5))
            .unwrap();
        let syncs = p.stats().num_sync_all_streams;
        let c = p.alloc(10 * MIB, &s).unwrap();
        assert!(
            sim.host_time_ns() < k.end_ns,
            "reset {reset}: the host waited for the kernel ({} >= {})",
            sim.host_time_ns(),
            k.end_ns
        );
        assert_eq!(p.stats().num_sync_all_streams, syncs);
        drop((pin, c));
    }
    // Once the stream is idle, growth past the band moves the free chunk instead of
    // making a new one for all of it.
    let m = sim_of(1 << 30);
    let p = m.device_pool(0, PoolConfig::default()).unwrap();
    let s = m.create_stream(0).unwrap();
    let x1 = p.alloc(4 * MIB, &s).unwrap();
    let x2 = p.alloc(4 * MIB, &s).unwrap();
    drop(x1);
    let before = p.stats();
    let y = p.alloc(6 * MIB, &s).unwrap();
    let after = p.stats();
    // Moved: x1's 4 MiB chunk unmapped where it was free and mapped again where y needs
    // it, with no driver free; only the 2 MiB it lacks were made.
    assert_eq!(
        (
            after.num_pages_moved - before.num_pages_moved,
            after.num_device_alloc - before.num_device_alloc,
            after.num_device_free - before.num_device_free
        ),
        (1, 1, 0),
        "{after:?}"
    );
    assert_eq!(
        p.reserved(),
        10 * MIB,
        "x2, and y in the moved chunk and a new one"
    );
    drop((x2, y));
}

/// A driver that refuses a later page of a mapping (another user of the device took
/// the memory) gets the pool's cache back and a second try, as at the first page.
#[test]
fn a_refusal_at_any_page_gives_the_cache_back_and_retries() {
    let m = sim_of(64 * MIB);
    let cfg = PoolConfig {
        release_on_grow: false,
        ..PoolConfig::default()
    };
    let p = m.device_pool(0, cfg).unwrap();
    let s = m.create_stream(0).unwrap();
    let a1 = p.alloc(4 * MIB, &s).unwrap();
    let pin1 = p.alloc(2 * MIB, &s).unwrap();
    let a2 = p.alloc(4 * MIB, &s).unwrap();
    let pin2 = p.alloc(2 * MIB, &s).unwrap();
    drop((a1, a2)); // 8 MiB cached, mapped, in two 4 MiB holes
    let other = m
        .alloc(
            hetmem::Placement::Device(0),
            64 * MIB - p.reserved() - 2 * MIB,
        )
        .unwrap();
    // 6 MiB fits no hole: three new pages, of which the driver has room for one.
    let r = p.alloc(6 * MIB, &s).unwrap();
    assert_eq!(p.stats().num_alloc_retries, 1);
    drop((r, pin1, pin2, other));
}

/// Chunks unmapped to make room, then not needed because the allocation fails anyway,
/// stay counted: the pool's reserved bytes are what the device has lent it, and a trim
/// gives every one of them back.
#[test]
fn pages_unmapped_for_a_failed_growth_are_counted_as_frees() {
    let m = sim_of(1 << 30);
    let p = m
        .device_pool(
            0,
            PoolConfig {
                budget: Budget::Bytes(8 * MIB),
                ..PoolConfig::default()
            },
        )
        .unwrap();
    let s = m.create_stream(0).unwrap();
    let x1 = p.alloc(4 * MIB, &s).unwrap();
    let x2 = p.alloc(4 * MIB, &s).unwrap();
    drop(x1);
    assert!(matches!(
        p.alloc(6 * MIB, &s),
        Err(Error::OutOfMemory { .. })
    ));
    let st = p.stats();
    assert_eq!(st.reserved_bytes.all.current as usize, p.reserved());
    assert!(p.reserved() <= 8 * MIB, "{st:?}");
    let used = (1 << 30) - m.backend().mem_info(0).unwrap().free;
    assert_eq!(
        used,
        p.reserved(),
        "the device lends the pool exactly what it counts"
    );
    drop(x2);
    p.trim().unwrap();
    let st = p.stats();
    assert_eq!(p.reserved(), 0);
    assert_eq!(st.num_device_alloc, st.num_device_free, "{st:?}");
}

// ---- graph capture -------------------------------------------------------------------

/// The simulator of `mgr` (which models graph capture strictly: illegal calls fail and
/// are counted in `capture_violations`).
fn simulator(mgr: &Manager) -> &hetmem::backend::sim::SimBackend {
    mgr.sim().expect("a sim manager")
}

/// What a capture of stream `a` would trip over, set up before it begins: a block
/// freed on `a` (an idle-stream reclaim records on and queries `a`), and a block of
/// `b`'s also used on `a` (its free orders `b` after `a` with an event on `a`).
fn capture_hazards(pool: &DevicePool, a: &hetmem::Stream, b: &hetmem::Stream) -> PoolBlock {
    drop(pool.alloc(3 * MIB, a).unwrap());
    drop(pool.alloc(5 * MIB, b).unwrap());
    let shared = pool.alloc(6 * MIB, b).unwrap();
    shared.record_stream(a).unwrap();
    shared
}

/// Allocation and free on a capturing stream, and on another stream meanwhile, with
/// the hazards above: no call the driver refuses during a capture (no event recorded
/// on the capturing stream and queried, no stream joined into the capture, no
/// synchronisation, no unmapping), whether or not the pool was told of the capture
/// (told: a private pool). Fails with any of the capture checks taken out.
#[test]
fn a_capture_makes_no_illegal_call() {
    for told in [true, false] {
        for exp in [true, false] {
            let mgr = sim();
            let sim = simulator(&mgr);
            let pool = pool(&mgr, exp, Budget::Bytes(256 * MIB));
            let (a, b) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
            let shared = capture_hazards(&pool, &a, &b);
            let id = hetmem::pool::PrivatePoolId(1, 0);
            if told {
                let h = a.handle();
                pool.begin_allocate_to_pool(id, move |s| s.handle() == h)
                    .unwrap();
            }
            sim.begin_capture(a.handle()).unwrap();
            let before = sim.stats();
            let mut held = Vec::new();
            for (i, size) in [MIB, 7 * MIB, 512, 3 * MIB, 40 * MIB, 7 * MIB]
                .into_iter()
                .enumerate()
            {
                held.push(pool.alloc(size, &a).unwrap());
                // The other stream allocates and frees meanwhile (slow paths too).
                drop(pool.alloc(size + 4096 * i, &b).unwrap());
                if i % 2 == 1 {
                    drop(held.remove(0));
                }
            }
            drop(shared); // used on the capturing stream
            drop(held);
            // A growth past the budget fails (no release, no unmap under a capture).
            assert!(matches!(
                pool.alloc(300 * MIB, &a),
                Err(Error::OutOfMemory { .. })
            ));
            let s = sim.stats();
            assert_eq!(
                (s.capture_violations, s.capture_joins),
                (before.capture_violations, before.capture_joins),
                "told {told}, expandable {exp}"
            );
            if told {
                assert!(matches!(pool.trim(), Err(Error::StreamCapturing { .. })));
            }
            sim.end_capture(a.handle())
                .unwrap_or_else(|e| panic!("told {told}, expandable {exp}: {e}"));
            if told {
                pool.end_allocate_to_pool(id).unwrap();
                pool.release_pool(id).unwrap();
            }
            // After the capture the deferred free goes ahead and everything is given
            // back.
            drop(pool.alloc(2 * MIB, &b).unwrap());
            pool.trim().unwrap();
            assert_eq!(pool.stats().allocation.all.current, 0);
            assert_eq!(pool.reserved(), 0, "told {told}, expandable {exp}");
            assert_eq!(sim.stats().capture_violations, 0);
        }
    }
}

/// A block freed during a capture belongs to the graph's private pool: no allocation
/// outside that pool gets it (on any stream, after trim too), a second capture into the
/// same pool does, and once the pool is released (by both graphs) the common pool
/// does.
#[test]
fn a_block_freed_in_a_capture_is_reused_only_by_its_pool_until_released() {
    both(|exp| {
        let mgr = sim();
        let sim = simulator(&mgr);
        let pool = pool(&mgr, exp, Budget::Device);
        let (a, b) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
        let id = hetmem::pool::PrivatePoolId(7, 0);
        let capture = |f: &dyn Fn() -> u64| {
            let h = a.handle();
            pool.begin_allocate_to_pool(id, move |s| s.handle() == h)
                .unwrap();
            sim.begin_capture(a.handle()).unwrap();
            let addr = f();
            sim.end_capture(a.handle()).unwrap();
            pool.end_allocate_to_pool(id).unwrap();
            addr
        };
        let freed = capture(&|| {
            let blk = pool.alloc(8 * MIB, &a).unwrap();
            let addr = blk.ptr().0;
            drop(blk);
            // Reused within the capture, by the pool itself, on its stream.
            let again = pool.alloc(8 * MIB, &a).unwrap();
            assert_eq!(again.ptr().0, addr);
            addr
        });
        let st = pool.private_pool(id).unwrap();
        assert_eq!((st.uses, st.allocating, st.allocated_bytes), (1, false, 0));
        assert_eq!(st.free_bytes, 8 * MIB);
        // Outside the pool: never that block, on either stream, also after a trim.
        pool.trim().unwrap();
        assert!(
            pool.reserved() >= 8 * MIB,
            "a trim keeps the graph's memory"
        );
        let mut outside = Vec::new();
        for _ in 0..3 {
            for s in [&a, &b] {
                let blk = pool.alloc(8 * MIB, s).unwrap();
                assert_ne!(blk.ptr().0, freed, "expandable {exp}");
                outside.push(blk);
            }
        }
        drop(outside);
        assert_eq!(pool.private_pool(id).unwrap().free_bytes, 8 * MIB);
        // A second graph sharing the pool gets it.
        let again = capture(&|| pool.alloc(8 * MIB, &a).unwrap().ptr().0);
        assert_eq!(again, freed);
        assert_eq!(pool.private_pool(id).unwrap().uses, 2);
        pool.release_pool(id).unwrap();
        let blk = pool.alloc(8 * MIB, &a).unwrap();
        assert_ne!(blk.ptr().0, freed, "one graph still uses the pool");
        drop(blk);
        pool.release_pool(id).unwrap();
        assert!(pool.private_pool(id).is_none());
        assert!(matches!(
            pool.release_pool(id),
            Err(Error::InvalidArgument(_))
        ));
        // Released: the common pool reuses it, on the stream that freed it (after the
        // blocks parked there before, which come first).
        let blks: Vec<PoolBlock> = (0..6).map(|_| pool.alloc(8 * MIB, &a).unwrap()).collect();
        assert!(blks.iter().any(|b| b.ptr().0 == freed), "expandable {exp}");
        drop(blks);
        pool.trim().unwrap();
        assert_eq!(pool.reserved(), 0);
        assert_eq!(sim.stats().capture_violations, 0);
    });
}

/// A pool's block still allocated when the pool is released goes to the common pool
/// when it is freed; a released pool waits for the device first (replays may run on
/// any stream), and while another capture is under way it waits for that one's end.
#[test]
fn release_waits_for_the_device_and_for_captures() {
    let mgr = sim();
    let sim = simulator(&mgr);
    let pool = pool(&mgr, true, Budget::Device);
    let (a, c, replay) = (
        mgr.create_stream(0).unwrap(),
        mgr.create_stream(0).unwrap(),
        mgr.create_stream(0).unwrap(),
    );
    let (g1, g2) = (
        hetmem::pool::PrivatePoolId(1, 0),
        hetmem::pool::PrivatePoolId(2, 0),
    );
    let h = a.handle();
    pool.begin_allocate_to_pool(g1, move |s| s.handle() == h)
        .unwrap();
    sim.begin_capture(a.handle()).unwrap();
    let out = pool.alloc(4 * MIB, &a).unwrap(); // the graph's output, kept
    let tmp = pool.alloc(4 * MIB, &a).unwrap();
    let tmp_addr = tmp.ptr().0;
    drop(tmp);
    sim.end_capture(a.handle()).unwrap();
    pool.end_allocate_to_pool(g1).unwrap();
    // A replay on a stream the pool never saw, still running at release.
    let k = sim
        .launch_kernel(replay.handle(), Duration::from_millis(5))
        .unwrap();
    // Another graph is being captured: the release waits for it.
    let h = c.handle();
    pool.begin_allocate_to_pool(g2, move |s| s.handle() == h)
        .unwrap();
    sim.begin_capture(c.handle()).unwrap();
    pool.release_pool(g1).unwrap();
    assert_eq!(
        sim.stats().capture_violations,
        0,
        "no device sync in a capture"
    );
    assert!(sim.host_time_ns() < k.end_ns);
    let blk = pool.alloc(4 * MIB, &c).unwrap();
    assert_ne!(blk.ptr().0, tmp_addr);
    drop(blk);
    sim.end_capture(c.handle()).unwrap();
    pool.end_allocate_to_pool(g2).unwrap();
    // Now it joins the common pool, after the replay.
    assert!(
        sim.host_time_ns() >= k.end_ns,
        "the device was synchronised"
    );
    let blk = pool.alloc(4 * MIB, &a).unwrap();
    assert_eq!(blk.ptr().0, tmp_addr);
    let out_addr = out.ptr().0;
    drop(out);
    drop(blk);
    let again = pool.alloc(4 * MIB, &a).unwrap();
    assert!(
        again.ptr().0 == out_addr || again.ptr().0 == tmp_addr,
        "the output's block went to the common pool"
    );
    drop(again);
    pool.release_pool(g2).unwrap();
    assert_eq!(sim.stats().capture_violations, 0);
}

/// Events are kept and recorded again, not made and destroyed per copy: a thousand
/// asynchronous copies on a stream make a handful of events (without the stream's cache,
/// a thousand).
#[test]
fn async_copies_reuse_their_events() {
    use hetmem::backend::sim::DriverCall;
    let mgr = sim();
    let sim = mgr.sim().unwrap();
    let a = mgr.create_stream(0).unwrap();
    let src = mgr.alloc(hetmem::Placement::Device(0), MIB).unwrap();
    let mut dst = mgr.alloc(hetmem::Placement::Device(0), MIB).unwrap();
    let before = sim.stats().driver;
    for _ in 0..1000 {
        mgr.copy(&mut dst, 0, &src, 0, MIB, Some(&a)).unwrap();
    }
    drop(dst);
    let d = sim.stats().driver.since(&before);
    assert!(d.calls(DriverCall::EventRecord) >= 1000, "{d:?}");
    assert!(
        d.calls(DriverCall::EventCreate) <= 8,
        "{} events made for {} records",
        d.calls(DriverCall::EventCreate),
        d.calls(DriverCall::EventRecord)
    );
}

/// `Manager::copy` takes every kind of memory at either end: host pool blocks (pinned
/// and pageable, with and without a stream), device pool blocks (on a stream only) and
/// buffers.
#[test]
fn one_copy_moves_bytes_between_every_kind_of_memory() {
    use hetmem::pool::HostPoolConfig;
    use hetmem::{NumaPolicy, Placement};
    let mgr = sim();
    let p = pool(&mgr, true, Budget::Device);
    let hosts = mgr.host_pool(HostPoolConfig::default()).unwrap();
    let s = mgr.create_stream(0).unwrap();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut pinned = hosts.alloc_pinned(&NumaPolicy::Default, 4096).unwrap();
    pinned.as_mut_slice().unwrap().copy_from_slice(&data);
    // Host block -> device block -> buffer -> pageable host block, on the stream.
    let mut blk = p.alloc(4096, &s).unwrap();
    mgr.copy(&mut blk, 0, &pinned, 0, 4096, Some(&s)).unwrap();
    let mut dev = mgr.alloc(Placement::Device(0), 4096).unwrap();
    mgr.copy(&mut dev, 0, &blk, 0, 4096, Some(&s)).unwrap();
    let mut pageable = hosts.alloc_host(&NumaPolicy::Default, 4096).unwrap();
    mgr.copy(&mut pageable, 0, &dev, 0, 4096, Some(&s)).unwrap();
    s.synchronize().unwrap();
    assert!(pageable.as_slice().unwrap() == &data[..]);
    // Without a stream: host blocks and buffers copy at once; a device block refuses.
    let mut back = hosts.alloc_pinned(&NumaPolicy::Default, 4096).unwrap();
    mgr.copy(&mut back, 0, &dev, 0, 4096, None).unwrap();
    assert!(back.as_slice().unwrap() == &data[..]);
    assert!(matches!(
        mgr.copy(&mut dev, 0, &blk, 0, 4096, None),
        Err(Error::InvalidArgument(_))
    ));
}
