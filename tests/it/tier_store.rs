//! The tiered parameter store on the simulator: bytes moved against Belady's optimum,
//! copy/compute overlap in virtual time, sequence learning, hints, write-back,
//! checksums, errors, and a multi-threaded stress run.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hetmem::tier::source::{write_safetensors, SafetensorsFile};
use hetmem::tier::{lru_misses_per_pass, min_misses_per_pass, ParamId};
use hetmem::tier::{Planner, Residency, SequenceHint, TierConfig, TierStore};
use hetmem::{BackendKind, Error, Manager, SimConfig, Stream};
use proptest::prelude::*;

const MIB: usize = 1 << 20;
const LAYERS: usize = 8;
const LAYER: usize = 4 * MIB;
/// Ring (4 × 4 MiB) plus every layer pinned.
const HOST_BUDGET: usize = 16 * MIB + LAYERS * LAYER;

fn sim() -> Manager {
    Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(SimConfig::default())
        .build()
        .unwrap()
}

fn layer_bytes(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
}

/// A store with `LAYERS` equal layers, their ids `0..LAYERS`.
fn model(mgr: &Manager, capacity: usize, sequence: SequenceHint, checksums: bool) -> TierStore {
    let mut cfg = TierConfig::new(capacity * LAYER, HOST_BUDGET);
    cfg.sequence = sequence;
    cfg.checksums = checksums;
    let store = TierStore::new(mgr, cfg).unwrap();
    for i in 0..LAYERS {
        let id = store
            .register(&format!("layer.{i}"), layer_bytes(i, LAYER).into())
            .unwrap();
        assert_eq!(id as usize, i);
    }
    store
}

fn order() -> Vec<ParamId> {
    (0..LAYERS as ParamId).collect()
}

/// One pass: acquire each layer on `compute`, run its kernel there, release. Returns
/// the bytes loaded for the steps of the pass (loads queued during the pass for later
/// steps count in the pass they serve).
fn pass(mgr: &Manager, store: &TierStore, compute: &Stream, kernel: Duration) -> u64 {
    pass_of(mgr, store, compute, kernel, &order())
}

fn pass_of(
    mgr: &Manager,
    store: &TierStore,
    compute: &Stream,
    kernel: Duration,
    ids: &[ParamId],
) -> u64 {
    let served = |s: hetmem::tier::TierStats| s.bytes_loaded - s.bytes_ahead;
    let before = served(store.stats());
    for &id in ids {
        let g = store.acquire(id, compute).unwrap();
        mgr.sim()
            .unwrap()
            .launch_kernel(compute.handle(), kernel)
            .unwrap();
        drop(g);
    }
    served(store.stats()) - before
}

const PASSES: usize = 12;

/// Bytes per pass for each capacity (in 4 MiB layers) of the 8-layer model.
fn steady_bytes(capacity: usize, sequence: SequenceHint) -> Vec<u64> {
    let mgr = sim();
    let store = model(&mgr, capacity, sequence, false);
    let compute = mgr.create_stream(0).unwrap();
    (0..PASSES)
        .map(|_| pass(&mgr, &store, &compute, Duration::from_micros(100)))
        .collect()
}

/// Budgets from 10% to 90% of a 20-layer model: with the sequence given, every pass
/// (the first included) loads exactly what Belady's MIN with one slot fewer than the
/// budget misses; LRU loads the whole model every pass.
#[test]
fn given_sequence_moves_the_belady_optimum_and_lru_moves_everything() {
    const N: usize = 20;
    const SIZE: usize = 256 << 10;
    let ids: Vec<ParamId> = (0..N as ParamId).collect();
    let run = |capacity: usize, sequence: SequenceHint| -> Vec<u64> {
        let mgr = sim();
        let mut cfg = TierConfig::new(capacity * SIZE, 16 * MIB + N * SIZE);
        cfg.sequence = sequence;
        let store = TierStore::new(&mgr, cfg).unwrap();
        for i in 0..N {
            store
                .register(&format!("layer.{i}"), layer_bytes(i, SIZE).into())
                .unwrap();
        }
        let compute = mgr.create_stream(0).unwrap();
        (0..PASSES)
            .map(|_| pass_of(&mgr, &store, &compute, Duration::from_micros(20), &ids))
            .collect()
    };
    for capacity in 2..=18 {
        let store = run(capacity, SequenceHint::Given(ids.clone()));
        let store_steady: u64 = store[1..].iter().sum();
        // Steady layers missed in all: the mean times the passes, an integer.
        let min_layers =
            (min_misses_per_pass(&ids, capacity - 1, PASSES) * (PASSES - 1) as f64).round() as u64;
        eprintln!(
            "budget {capacity}/{N} layers ({}%): layers loaded per pass {:?}; steady mean {:.2}, \
             MIN(C-1) {:.2}, MIN(C) {:.2}, fixed set + 2 slots {}",
            capacity * 100 / N,
            store.iter().map(|b| *b as usize / SIZE).collect::<Vec<_>>(),
            store_steady as f64 / SIZE as f64 / (PASSES - 1) as f64,
            min_misses_per_pass(&ids, capacity - 1, PASSES),
            min_misses_per_pass(&ids, capacity, PASSES),
            N - (capacity - 2),
        );
        assert_eq!(
            store_steady,
            min_layers * SIZE as u64,
            "budget {capacity}: steady bytes against MIN(C-1)"
        );
        // With two slots both plans load everything; with more, MIN(C-1) moves less.
        let fixed = ((N - (capacity - 2)) * SIZE * (PASSES - 1)) as u64;
        assert!(
            store_steady < fixed || (capacity == 2 && store_steady == fixed),
            "budget {capacity}: MIN(C-1) should beat a fixed set with two rotating slots"
        );

        let lru = run(capacity, SequenceHint::Lru);
        assert_eq!(lru_misses_per_pass(&ids, capacity, PASSES), N as f64);
        for (p, b) in lru.iter().enumerate() {
            assert_eq!(*b as usize, N * SIZE, "LRU, budget {capacity}, pass {p}");
        }
    }
}

#[test]
fn loads_overlap_compute() {
    let mgr = sim();
    let sim = mgr.sim().unwrap();
    let cfg = sim.config().clone();
    let copy_ns = cfg.copy_latency.as_nanos() as f64 + LAYER as f64 / cfg.h2d_gbps;
    let mut worst = f64::INFINITY;
    // Copy-bound (2 us: a layer's product on an H200 is far shorter than its copy),
    // compute-bound (160 us) and in between (80 us) reach >= 0.95 at every budget.
    // Known shortfall, reported and not asserted: with kernels about half a copy (40 us)
    // MIN(C-1) leaves runs of hits during which only the one spare slot can load, so
    // budgets of 50% to 87% reach 0.93, 0.81, 0.79 and 0.88 (printed below).
    for kernel_us in [2u64, 40, 80, 160] {
        for capacity in 2..LAYERS {
            let mgr = sim_mgr();
            let store = model(&mgr, capacity, SequenceHint::Given(order()), false);
            let compute = mgr.create_stream(0).unwrap();
            let kernel = Duration::from_micros(kernel_us);
            let sim = mgr.sim().unwrap();
            // Two passes to reach the steady state, then measure three.
            pass(&mgr, &store, &compute, kernel);
            pass(&mgr, &store, &compute, kernel);
            let t0 = sim.stream_time_ns(compute.handle()).unwrap();
            let mut served = 0;
            for _ in 0..3 {
                served += pass(&mgr, &store, &compute, kernel);
            }
            let t1 = sim.stream_time_ns(compute.handle()).unwrap();
            let loads = (served / LAYER as u64) as f64;
            let copy = loads * copy_ns;
            let work = 3.0 * LAYERS as f64 * kernel.as_nanos() as f64;
            let elapsed = (t1 - t0) as f64;
            let eff = copy.max(work) / elapsed;
            eprintln!(
                "kernel {kernel_us} us, capacity {capacity} ({}%): copy {:.0} us, compute {:.0} us, \
                 elapsed {:.0} us, overlap efficiency {eff:.3}",
                capacity * 100 / LAYERS,
                copy / 1e3,
                work / 1e3,
                elapsed / 1e3
            );
            if kernel_us != 40 {
                worst = worst.min(eff);
            }
        }
    }
    assert!(worst >= 0.95, "worst overlap efficiency {worst:.3}");
}

fn sim_mgr() -> Manager {
    sim()
}

#[test]
fn learn_finds_the_sequence_and_then_matches_the_given_one() {
    for capacity in [3, 5] {
        let given = steady_bytes(capacity, SequenceHint::Given(order()));
        let mgr = sim();
        let store = model(&mgr, capacity, SequenceHint::Learn, true);
        let compute = mgr.create_stream(0).unwrap();
        let learnt: Vec<u64> = (0..PASSES)
            .map(|_| pass(&mgr, &store, &compute, Duration::from_micros(100)))
            .collect();
        assert_eq!(store.sequence(), Some(order()));
        assert_eq!(store.stats().sequences_learnt, 1);
        eprintln!("capacity {capacity}: given {given:?}\n             learnt {learnt:?}");
        assert_learnt_moves_as_given(&learnt, &given);
        assert_eq!(store.stats().checksum_mismatches, 0);

        // A different order drops the sequence and learns the new one.
        let reversed: Vec<ParamId> = order().into_iter().rev().collect();
        for _ in 0..2 {
            for &id in &reversed {
                drop(store.acquire(id, &compute).unwrap());
            }
        }
        assert_eq!(store.stats().sequences_dropped, 1);
        // Learning restarts at the first deviating acquire (layer 7).
        assert_eq!(store.sequence(), Some(reversed));
    }
}

/// A weight used first and last in a pass (a tied embedding): the first guess stops
/// at its second use; the next acquire extends it, and the store then loads what the
/// given sequence loads, never dropping it.
#[test]
fn learn_extends_a_sequence_whose_first_id_comes_again_in_the_pass() {
    let mut tied = order();
    tied.push(0);
    let run = |hint: SequenceHint| -> (Vec<u64>, TierStore) {
        let mgr = sim();
        let store = model(&mgr, 4, hint, true);
        let compute = mgr.create_stream(0).unwrap();
        let bytes = (0..PASSES)
            .map(|_| pass_of(&mgr, &store, &compute, Duration::from_micros(100), &tied))
            .collect();
        (bytes, store)
    };
    let (given, _) = run(SequenceHint::Given(tied.clone()));
    let (learnt, store) = run(SequenceHint::Learn);
    assert_eq!(store.sequence(), Some(tied.clone()));
    let stats = store.stats();
    assert_eq!((stats.sequences_learnt, stats.sequences_dropped), (2, 0));
    assert_eq!(stats.checksum_mismatches, 0);
    assert_learnt_moves_as_given(&learnt, &given);
}

/// Bytes per pass with a learnt sequence against the same sequence given. The first
/// pass runs under LRU while the order is recorded. MIN's eviction pattern repeats
/// every few passes, and learning starts it from another state (what LRU left), so the
/// two runs are out of phase: their totals from the third pass on differ by at most
/// the one layer of a pass boundary.
fn assert_learnt_moves_as_given(learnt: &[u64], given: &[u64]) {
    let (l, g) = (
        learnt[2..].iter().sum::<u64>(),
        given[2..].iter().sum::<u64>(),
    );
    assert!(
        l.abs_diff(g) <= LAYER as u64,
        "learnt {learnt:?} given {given:?}"
    );
}

/// One pass of a 3-layer budget in which steps 0..=2 are held at once, so that step 3
/// fails for want of room `tries` times before the guards go and the pass finishes.
fn pass_with_failed_step_3(store: &TierStore, compute: &Stream, tries: usize) {
    let held: Vec<_> = (0..3)
        .map(|id| store.acquire(id, compute).unwrap())
        .collect();
    for _ in 0..tries {
        assert!(matches!(
            store.acquire(3, compute),
            Err(Error::OutOfMemory { .. })
        ));
    }
    drop(held);
    for id in 3..LAYERS as ParamId {
        drop(store.acquire(id, compute).unwrap());
    }
}

/// An acquire that fails for want of room (the caller holds the rest) neither drops a
/// learnt sequence nor counts as a step: the retry, once room is made, follows it, and
/// the passes after load what they loaded before.
#[test]
fn a_failed_acquire_does_not_derail_the_learnt_sequence() {
    let mgr = sim();
    let store = model(&mgr, 3, SequenceHint::Learn, true);
    let compute = mgr.create_stream(0).unwrap();
    let kernel = Duration::from_micros(100);
    let before: Vec<u64> = (0..4)
        .map(|_| pass(&mgr, &store, &compute, kernel))
        .collect();
    assert_eq!(store.sequence(), Some(order()));
    for round in 0..3 {
        pass_with_failed_step_3(&store, &compute, round + 1);
        assert_eq!(store.stats().sequences_dropped, 0, "round {round}");
        assert_eq!(store.sequence(), Some(order()));
    }
    let after: Vec<u64> = (0..4)
        .map(|_| pass(&mgr, &store, &compute, kernel))
        .collect();
    assert_eq!(store.stats().sequences_dropped, 0);
    assert_eq!(store.stats().sequences_learnt, 1);
    assert_eq!(
        after[1..].iter().sum::<u64>(),
        before[1..].iter().sum::<u64>(),
        "before {before:?} after {after:?}"
    );
}

/// A store of `n` parameters of 64 KiB with room for `room` of them on the device,
/// learning the sequence.
fn learning_store(mgr: &Manager, n: usize, room: usize) -> TierStore {
    const SIZE: usize = 64 * 1024;
    let mut cfg = TierConfig::new(room * SIZE, 16 * MIB + n * SIZE);
    cfg.sequence = SequenceHint::Learn;
    let store = TierStore::new(mgr, cfg).unwrap();
    for i in 0..n {
        store
            .register(&format!("p{i}"), vec![i as u8; SIZE].into())
            .unwrap();
    }
    store
}

/// A loop of many distinct layers is learnt from its first pass, and a first pass that
/// acquires one layer twice still ends in the loop's own sequence (not one that grows
/// by a pass at every pass).
#[test]
fn long_loops_are_learnt_and_a_glitch_does_not_grow_the_sequence() {
    let mgr = sim();
    let store = learning_store(&mgr, 40, 4);
    let s = mgr.create_stream(0).unwrap();
    for _ in 0..4 {
        for id in 0..40 {
            drop(store.acquire(id, &s).unwrap());
        }
    }
    assert_eq!(store.sequence(), Some((0..40).collect()));
    assert_eq!(store.stats().sequences_learnt, 1);

    let store = learning_store(&mgr, 20, 4);
    let mut ids: Vec<ParamId> = (0..20).collect();
    ids.push(19);
    for _ in 0..12 {
        ids.extend(0..20);
    }
    for id in ids {
        drop(store.acquire(id, &s).unwrap());
    }
    assert_eq!(store.sequence().map(|q| q.len()), Some(20));
}

/// `acquire_timeout(id, timeout)` on a stream of its own, in a thread of its own.
fn acquire_in_a_thread(
    mgr: &Manager,
    store: &Arc<TierStore>,
    id: ParamId,
    timeout: Duration,
) -> std::thread::JoinHandle<Result<(), Error>> {
    let (store, mgr) = (Arc::clone(store), mgr.clone());
    std::thread::spawn(move || {
        let s = mgr.create_stream(0).unwrap();
        store.acquire_timeout(id, &s, timeout).map(drop)
    })
}

/// An `acquire_timeout` that fails after other threads' acquires came in takes back
/// only its own record: the sequence learnt is the acquires that succeeded.
#[test]
fn a_timed_out_acquire_takes_back_only_its_own_record() {
    let mgr = sim();
    let store = Arc::new(learning_store(&mgr, 4, 2));
    let s = mgr.create_stream(0).unwrap();
    let g0 = store.acquire(0, &s).unwrap();
    let g1 = store.acquire(1, &s).unwrap();
    let waiter = acquire_in_a_thread(&mgr, &store, 2, Duration::from_millis(500));
    std::thread::sleep(Duration::from_millis(100));
    // Layer 1 used again while the other thread waits (a hit: no room needed).
    let g1b = store.acquire(1, &s).unwrap();
    assert!(waiter.join().unwrap().is_err(), "timed out");
    drop((g0, g1, g1b));
    for id in [2, 3, 0] {
        drop(store.acquire(id, &s).unwrap());
    }
    assert_eq!(store.sequence(), Some(vec![0, 1, 1, 2, 3]));
}

/// A sequence given while an acquire waits for room is kept when that acquire times
/// out: the failed acquire does not rewind the new sequence to where the old one was.
#[test]
fn a_sequence_given_while_an_acquire_waits_is_kept() {
    let mgr = sim();
    let store = Arc::new(learning_store(&mgr, 4, 2));
    let s = mgr.create_stream(0).unwrap();
    let held = (store.acquire(0, &s).unwrap(), store.acquire(1, &s).unwrap());
    let waiter = acquire_in_a_thread(&mgr, &store, 2, Duration::from_millis(300));
    std::thread::sleep(Duration::from_millis(100));
    store.set_sequence(Some(vec![3, 2, 1, 0])).unwrap();
    assert!(waiter.join().unwrap().is_err(), "timed out");
    drop(held);
    for id in [3, 2, 1, 0] {
        drop(store.acquire(id, &s).unwrap());
    }
    assert_eq!(store.stats().sequences_dropped, 0);
    assert_eq!(store.sequence(), Some(vec![3, 2, 1, 0]));
}

/// Learning before the sequence is known: a failed acquire is recorded once.
#[test]
fn a_failed_acquire_while_learning_is_recorded_once() {
    let mgr = sim();
    let store = model(&mgr, 3, SequenceHint::Learn, false);
    let compute = mgr.create_stream(0).unwrap();
    pass_with_failed_step_3(&store, &compute, 3);
    drop(store.acquire(0, &compute).unwrap());
    assert_eq!(store.sequence(), Some(order()), "3 once, not three times");
}

#[test]
fn acquired_and_kept_parameters_stay_and_dont_need_evicts() {
    let mgr = sim();
    let store = model(&mgr, 3, SequenceHint::Lru, true);
    let s = mgr.create_stream(0).unwrap();
    let held = store.acquire(0, &s).unwrap();
    store.keep_resident(1, true).unwrap();
    drop(store.acquire(1, &s).unwrap());
    // Cycle everything else through the one remaining slot, several times.
    for _ in 0..3 {
        for id in 2..LAYERS as ParamId {
            drop(store.acquire(id, &s).unwrap());
            assert!(matches!(
                store.residency(0).unwrap(),
                Residency::Device { refs: 1 } | Residency::Loading { refs: 1 }
            ));
            assert!(matches!(
                store.residency(1).unwrap(),
                Residency::Device { refs: 0 } | Residency::Loading { refs: 0 }
            ));
        }
    }
    // With 0 and 1 pinned in place and a third slot busy, a second guard elsewhere
    // fails cleanly rather than evicting an acquired parameter.
    let g2 = store.acquire(2, &s).unwrap();
    let err = store.acquire(3, &s).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
    drop(g2);
    // dont_need: not while acquired; at once otherwise, even when kept.
    assert!(!store.dont_need(0).unwrap());
    drop(held);
    assert!(store.dont_need(0).unwrap());
    assert_eq!(store.residency(0).unwrap(), Residency::Host);
    assert!(store.dont_need(1).unwrap());
    assert_eq!(store.residency(1).unwrap(), Residency::Host);
    assert_eq!(store.residency(7).unwrap(), Residency::Host);
    assert!(store.will_need(7).unwrap());
    assert!(matches!(
        store.residency(7).unwrap(),
        Residency::Device { .. } | Residency::Loading { .. }
    ));
    // Priority: with 2 resident and 7 resident, a low priority on 7 makes it the victim
    // although 2 was used less recently.
    store.priority(7, -1).unwrap();
    drop(store.acquire(3, &s).unwrap()); // fits: 2, 7, 3 resident
    drop(store.acquire(4, &s).unwrap()); // evicts 7 (lowest priority), not 2 (LRU)
    assert_eq!(store.residency(7).unwrap(), Residency::Host);
    assert!(matches!(
        store.residency(2).unwrap(),
        Residency::Device { .. } | Residency::Loading { .. }
    ));
    assert_eq!(store.stats().checksum_mismatches, 0);
}

#[test]
fn dirty_parameters_are_written_back() {
    let mgr = sim();
    // Host budget: the ring only, so parameters stay cold (host sources) and the
    // write-back has to replace the source.
    let mut cfg = TierConfig::new(2 * LAYER, 16 * MIB + LAYER);
    cfg.checksums = true;
    let store = TierStore::new(&mgr, cfg).unwrap();
    let ids: Vec<ParamId> = (0..4)
        .map(|i| {
            store
                .register(&format!("p{i}"), layer_bytes(i, LAYER).into())
                .unwrap()
        })
        .collect();
    let s = mgr.create_stream(0).unwrap();
    for &id in &ids {
        let mut g = store.acquire(id, &s).unwrap();
        s.synchronize().unwrap();
        g.block()
            .unwrap()
            .write(100, &[0xA0 + id as u8; 64])
            .unwrap();
        g.mark_dirty();
    }
    // All four were dirtied through a two-slot device: at least two written back by
    // eviction; force the rest out.
    for &id in &ids {
        store.dont_need(id).unwrap();
    }
    assert_eq!(store.stats().writebacks, 4);
    for &id in &ids {
        let g = store.acquire(id, &s).unwrap();
        s.synchronize().unwrap();
        let mut back = vec![0u8; LAYER];
        g.block().unwrap().read(0, &mut back).unwrap();
        let mut want = layer_bytes(id as usize, LAYER);
        want[100..164].fill(0xA0 + id as u8);
        assert!(back == want, "parameter {id} lost its write");
    }
    let st = store.stats();
    assert_eq!(st.checksum_mismatches, 0);
    assert_eq!(st.writebacks, 4, "clean parameters are not written back");
    assert!(st.host_peak_bytes <= 16 * MIB + LAYER, "{st:?}");
}

/// Two streams share a parameter: a write on one is not overtaken by a later reader on
/// the other, and does not overtake an earlier reader there (virtual time shows where
/// each stream may start).
#[test]
fn writes_and_reads_on_two_streams_stay_in_order() {
    let mgr = sim();
    let sim = mgr.sim().unwrap();
    let store = model(&mgr, 4, SequenceHint::Lru, false);
    let (a, b) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
    let ms = Duration::from_millis;
    // Loaded and read on `b`: its kernel runs until `read_end`.
    let g = store.acquire(0, &b).unwrap();
    let read_end = sim.launch_kernel(b.handle(), ms(5)).unwrap().end_ns;
    drop(g);
    // A write on `a` waits for that read.
    let mut g = store.acquire(0, &a).unwrap();
    g.mark_dirty();
    let ready = sim.stream_time_ns(a.handle()).unwrap();
    assert!(
        ready >= read_end,
        "the write starts at {ready} ns, before the read ends at {read_end}"
    );
    let write_end = sim.launch_kernel(a.handle(), ms(5)).unwrap().end_ns;
    drop(g);
    // A later read on `b` (a hit: no load to wait for) waits for the write.
    let g = store.acquire(0, &b).unwrap();
    let ready = sim.stream_time_ns(b.handle()).unwrap();
    assert!(
        ready >= write_end,
        "the read starts at {ready} ns, before the write ends at {write_end}"
    );
    drop(g);
    // Reads do not wait for reads: a clean parameter on `a` is ready at once.
    let g = store.acquire(1, &b).unwrap();
    let busy_until = sim.launch_kernel(b.handle(), ms(5)).unwrap().end_ns;
    drop(g);
    let g = store.acquire(1, &a).unwrap();
    let ready = sim.stream_time_ns(a.handle()).unwrap();
    assert!(
        ready < busy_until,
        "a read waited for another stream's read"
    );
    drop(g);
}

/// A write-back whose copy fails (injected in the simulator) loses nothing: the
/// eviction fails, the parameter stays on the device and dirty, its host copy as it
/// was; the next eviction writes it back, and a reload has the write.
#[test]
fn a_failed_write_back_keeps_the_write() {
    let mgr = sim();
    let sim = mgr.sim().unwrap();
    let store = model(&mgr, 1, SequenceHint::Lru, true);
    let s = mgr.create_stream(0).unwrap();
    let mut g = store.acquire(0, &s).unwrap();
    s.synchronize().unwrap();
    g.block().unwrap().write(0, &[0x5A; 256]).unwrap();
    g.mark_dirty();
    drop(g);
    // Loading 1 evicts 0, whose write-back fails.
    sim.fail_next_d2h_copies(1);
    assert!(matches!(store.acquire(1, &s), Err(Error::Driver { .. })));
    assert!(matches!(
        store.residency(0).unwrap(),
        Residency::Device { refs: 0 }
    ));
    assert_eq!(store.stats().writebacks, 0);
    let mut want = layer_bytes(0, LAYER);
    want[..256].fill(0x5A);
    assert!(
        store.read(0).unwrap() == want,
        "the device copy has the write"
    );
    // Now it goes through.
    drop(store.acquire(1, &s).unwrap());
    assert_eq!(store.stats().writebacks, 1);
    assert!(
        store.read(0).unwrap() == want,
        "the host copy has the write"
    );
    drop(store.acquire(0, &s).unwrap());
    assert!(store.read(0).unwrap() == want, "and so does the reload");
    assert_eq!(store.stats().checksum_mismatches, 0);
}

/// Checksums on: a load that arrives wrong (a faulty link, injected in the simulator)
/// is made again; wrong twice, the acquire fails with `Error::Checksum` and nothing
/// wrong is handed out or left resident. The next try loads it.
#[test]
fn a_load_that_arrives_wrong_is_made_again_and_twice_wrong_is_refused() {
    let mgr = sim();
    let store = model(&mgr, 3, SequenceHint::Lru, true);
    let s = mgr.create_stream(0).unwrap();
    let sim = mgr.sim().unwrap();
    sim.corrupt_next_h2d_copies(1);
    drop(store.acquire(0, &s).unwrap());
    assert_eq!(store.read(0).unwrap(), layer_bytes(0, LAYER));
    assert_eq!(store.stats().checksum_mismatches, 1);

    sim.corrupt_next_h2d_copies(2);
    match store.acquire(1, &s) {
        Err(Error::Checksum {
            param: 1,
            copy: "device",
            expected,
            found,
            ..
        }) => assert_ne!(expected, found),
        other => panic!("expected a checksum error, got {:?}", other.err()),
    }
    assert!(
        !matches!(store.residency(1).unwrap(), Residency::Device { .. }),
        "{:?}",
        store.residency(1)
    );
    assert_eq!(store.stats().checksum_mismatches, 3);
    let g = store.acquire(1, &s).unwrap();
    drop(g);
    assert_eq!(store.read(1).unwrap(), layer_bytes(1, LAYER));
    assert_eq!(store.stats().checksum_mismatches, 3);
}

/// A safetensors file of `n` tensors `w0..` of 1 MiB, its path and the tensors' bytes.
fn model_file(tag: &str, n: usize) -> (std::path::PathBuf, Vec<Vec<u8>>, SafetensorsFile) {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "tier-store-{tag}-{}.safetensors",
        std::process::id()
    ));
    let data: Vec<Vec<u8>> = (0..n).map(|i| layer_bytes(i, MIB)).collect();
    let names: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
    let shape = [MIB];
    let specs: Vec<(&str, &str, &[usize], &[u8])> = names
        .iter()
        .zip(&data)
        .map(|(n, d)| (n.as_str(), "U8", &shape[..], d.as_slice()))
        .collect();
    write_safetensors(&path, &specs).unwrap();
    let file = SafetensorsFile::open(&path).unwrap();
    (path, data, file)
}

/// [`model_file`] registered with a store that checks every load (2 MiB of device
/// room, room to pin every tensor).
fn checked_mapped_model(
    mgr: &Manager,
    tag: &str,
    n: usize,
) -> (std::path::PathBuf, Vec<Vec<u8>>, TierStore, Vec<ParamId>) {
    let (path, data, file) = model_file(tag, n);
    let mut cfg = TierConfig::new(2 * MIB, 16 * MIB + n * MIB);
    cfg.checksums = true;
    let store = TierStore::new(mgr, cfg).unwrap();
    let ids = store.register_safetensors(&file).unwrap();
    (path, data, store, ids)
}

/// Writes `byte` at offset `at` of tensor `name`'s data in the safetensors file `path`
/// (found from its header's data_offsets), in place: a mapping of the file sees it.
fn rewrite_tensor_byte(path: &Path, name: &str, at: usize, byte: u8) {
    use std::io::{Seek, SeekFrom, Write};
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    let key = header.find(&format!("\"{name}\"")).unwrap();
    let offsets = key + header[key..].find("\"data_offsets\":[").unwrap() + 16;
    let end = offsets + header[offsets..].find(',').unwrap();
    let start = 8 + header_len + header[offsets..end].parse::<usize>().unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start((start + at) as u64)).unwrap();
    f.write_all(&[byte]).unwrap();
    f.sync_all().unwrap();
}

/// Checksums on: a mapped model file rewritten under the store is refused at its load
/// (the host copy is wrong: loading again would not help), and the rest still load.
#[test]
fn a_mapped_file_changed_under_the_store_is_refused() {
    let mgr = sim();
    let (path, data, store, ids) = checked_mapped_model(&mgr, "changed", 3);
    rewrite_tensor_byte(&path, "w1", 10, !data[1][10]);
    let s = mgr.create_stream(0).unwrap();
    let w1 = store.id("w1").unwrap();
    match store.acquire(w1, &s) {
        Err(e @ Error::Checksum { copy: "host", .. }) => {
            assert!(e.to_string().contains("w1"), "{e}")
        }
        other => panic!(
            "expected a checksum error on the host copy, got {:?}",
            other.err()
        ),
    }
    for &id in &ids {
        if id != w1 {
            drop(store.acquire(id, &s).unwrap());
        }
    }
    assert_eq!(store.stats().checksum_mismatches, 1);
    std::fs::remove_file(&path).ok();
}

/// A load refused because the mapped file changed leaves the parameter's host copy as
/// it was (still the mapping, not a pinned copy of the wrong bytes): once the file is
/// right again, the parameter loads.
#[test]
fn a_refused_load_keeps_the_mapped_source() {
    let mgr = sim();
    let (path, data, store, _) = checked_mapped_model(&mgr, "restored", 2);
    let w1 = store.id("w1").unwrap();
    let mapped_before = store.stats().mapped_bytes;
    let s = mgr.create_stream(0).unwrap();
    rewrite_tensor_byte(&path, "w1", 10, !data[1][10]);
    assert!(matches!(
        store.acquire(w1, &s),
        Err(Error::Checksum { copy: "host", .. })
    ));
    let st = store.stats();
    assert_eq!(st.mapped_bytes, mapped_before, "{st:?}");
    assert_eq!(st.host_bytes, 16 * MIB, "no pinned copy was made: {st:?}");
    rewrite_tensor_byte(&path, "w1", 10, data[1][10]);
    let again = store.acquire(w1, &s).map(drop);
    std::fs::remove_file(&path).ok();
    assert!(again.is_ok(), "{:?}", again.err());
    assert_eq!(store.read(w1).unwrap(), data[1]);
}

/// Under a sequence the plan makes the load; two wrong transfers refuse the acquire
/// there too (no second round on demand).
#[test]
fn twice_wrong_is_refused_under_a_sequence_too() {
    let mgr = sim();
    let store = model(&mgr, 3, SequenceHint::Given(order()), true);
    let s = mgr.create_stream(0).unwrap();
    mgr.sim().unwrap().corrupt_next_h2d_copies(2);
    assert!(matches!(
        store.acquire(0, &s),
        Err(Error::Checksum { copy: "device", .. })
    ));
    assert_eq!(store.stats().checksum_mismatches, 2);
    drop(store.acquire(0, &s).unwrap());
    assert_eq!(store.read(0).unwrap(), layer_bytes(0, LAYER));
}

#[test]
fn checksums_find_nothing_on_a_healthy_run_and_mapped_sources_load() {
    let mgr = sim();
    let (path, data, file) = model_file("healthy", 6);
    // Room to pin three of six: the rest stay mapped and load through the ring.
    let mut cfg = TierConfig::new(2 * MIB, 16 * MIB + 3 * MIB);
    cfg.checksums = true;
    let store = TierStore::new(&mgr, cfg).unwrap();
    let ids = store.register_safetensors(&file).unwrap();
    assert_eq!(store.stats().mapped_bytes, 6 * MIB);
    let s = mgr.create_stream(0).unwrap();
    for _ in 0..4 {
        for &id in &ids {
            let g = store.acquire(id, &s).unwrap();
            drop(g);
        }
    }
    for &id in &ids {
        let name = store.name(id).unwrap();
        let i: usize = name[1..].parse().unwrap();
        assert!(store.read(id).unwrap() == data[i]);
    }
    let st = store.stats();
    assert_eq!(st.checksum_mismatches, 0);
    assert_eq!(
        st.mapped_bytes,
        3 * MIB,
        "three pinned, three still mapped: {st:?}"
    );
    assert_eq!(st.host_bytes, 16 * MIB + 3 * MIB);
    assert!(st.staged_loads > 0);
    std::fs::remove_file(&path).ok();
}

#[test]
fn errors_are_clear() {
    let mgr = sim();
    let store = TierStore::new(&mgr, TierConfig::new(2 * MIB, 32 * MIB)).unwrap();
    let s = mgr.create_stream(0).unwrap();
    // A stream the store cannot use is refused before anything is loaded or counted.
    {
        store.register("w", vec![1u8; 4096].into()).unwrap();
        let other = sim();
        let foreign = other.create_stream(0).unwrap();
        assert!(matches!(
            store.acquire(0, &foreign).unwrap_err(),
            Error::ForeignHandle { .. }
        ));
        let two = Manager::builder()
            .backend(BackendKind::Sim)
            .sim_config(SimConfig::with_devices(2, 1 << 30))
            .build()
            .unwrap();
        let on_one = TierStore::new(&two, TierConfig::new(2 * MIB, 32 * MIB)).unwrap();
        on_one.register("w", vec![1u8; 4096].into()).unwrap();
        let wrong = two.create_stream(1).unwrap();
        assert!(matches!(
            on_one.acquire(0, &wrong).unwrap_err(),
            Error::InvalidArgument(_)
        ));
        for st in [store.stats(), on_one.stats()] {
            assert_eq!((st.loads, st.misses, st.hits), (0, 0, 0), "{st:?}");
        }
        assert_eq!(store.residency(0).unwrap(), Residency::Cold);
    }
    let store = TierStore::new(&mgr, TierConfig::new(2 * MIB, 32 * MIB)).unwrap();
    assert!(matches!(
        store.acquire(0, &s).unwrap_err(),
        Error::InvalidArgument(_)
    ));
    for r in [
        store.prefetch(3).map(|_| ()),
        store.dont_need(3).map(|_| ()),
        store.keep_resident(3, true),
        store.priority(3, 1),
        store.residency(3).map(|_| ()),
    ] {
        assert!(matches!(r.unwrap_err(), Error::InvalidArgument(_)));
    }
    let err = store
        .register("huge", vec![0u8; 3 * MIB].into())
        .unwrap_err();
    assert!(
        matches!(err, Error::OutOfMemory { requested, free, .. } if requested == 4 * MIB && free == 2 * MIB),
        "{err}"
    );
    // Over 1 MiB a parameter takes whole 2 MiB pages: the error says what it needs.
    let err = store
        .register("page_and_a_half", vec![0u8; 2 * MIB + 1].into())
        .unwrap_err();
    assert!(
        matches!(err, Error::OutOfMemory { requested, .. } if requested == 4 * MIB),
        "{err}"
    );
    store.register("ok", vec![1u8; MIB].into()).unwrap();
    assert!(matches!(
        store.register("ok", vec![1u8; MIB].into()).unwrap_err(),
        Error::InvalidArgument(_)
    ));
    // A corrupt file never reaches the store: opening it fails with Config.
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "tier-store-corrupt-{}.safetensors",
        std::process::id()
    ));
    write_safetensors(&path, &[("w", "U8", &[16], &[7u8; 16])]).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 4);
    std::fs::write(&path, &bytes).unwrap();
    let err = SafetensorsFile::open(&path)
        .and_then(|f| store.register_safetensors(&f))
        .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert_eq!(store.len(), 1);
    std::fs::remove_file(&path).ok();
    // A host budget smaller than the ring.
    assert!(matches!(
        TierStore::new(&mgr, TierConfig::new(2 * MIB, MIB)).unwrap_err(),
        Error::InvalidArgument(_)
    ));
    // A device budget the device cannot hold; its whole memory is fine.
    let total = mgr.devices()[0].info.total_memory;
    let err = TierStore::new(&mgr, TierConfig::new(total + 1, 32 * MIB)).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains(&total.to_string())),
        "{err}"
    );
    TierStore::new(&mgr, TierConfig::new(total, 32 * MIB)).unwrap();
}

#[test]
fn stress_four_threads() {
    // LRU, and a given sequence the random acquires keep leaving (the plan restarts,
    // the demand path takes over, and the plan resumes), and one the threads follow.
    stress(SequenceHint::Lru, false, Planner::Belady);
    // A host budget of the ring and four pinned copies: most loads go through the
    // staging ring, and write-backs replace cold sources.
    stress_in(
        SequenceHint::Lru,
        false,
        Planner::Belady,
        4 * MIB + 4 * 64 * 1024,
    );
    stress(
        SequenceHint::Given((0..16).collect()),
        false,
        Planner::Belady,
    );
    stress(
        SequenceHint::Given((0..16).collect()),
        true,
        Planner::Belady,
    );
    // The static planner's fixed set under the same traffic (dont-need evicts its
    // members too; the plan restarts and reloads them).
    stress(
        SequenceHint::Given((0..16).collect()),
        false,
        Planner::Static,
    );
    stress(
        SequenceHint::Given((0..16).collect()),
        true,
        Planner::Static,
    );
}

fn stress(sequence: SequenceHint, in_order: bool, planner: Planner) {
    stress_in(sequence, in_order, planner, 16 * MIB + 16 * 2 * 64 * 1024);
}

/// Four threads, 2,500 operations each: acquire and write (own parameters, counters
/// checked on every acquire), acquire and read, will-need, dont-need, priority, and
/// (threads 0 and 1, one own parameter each, so that the kept ones and four guards
/// always fit) keep-resident on and off; with `in_order`, the shared reads walk the
/// sequence instead of picking at random.
fn stress_in(sequence: SequenceHint, in_order: bool, planner: Planner, host_budget: usize) {
    const PARAMS: usize = 16;
    const SIZE: usize = 64 * 1024;
    const OPS: usize = 2500;
    let mgr = sim();
    let mut cfg = TierConfig::new(6 * SIZE, host_budget);
    cfg.checksums = true;
    cfg.sequence = sequence;
    cfg.planner = planner;
    cfg.staging_slot_size = MIB;
    cfg.staging_slots = 4;
    let store = TierStore::new(&mgr, cfg).unwrap();
    for i in 0..PARAMS {
        store
            .register(&format!("p{i}"), vec![0u8; SIZE].into())
            .unwrap();
    }
    let store = Arc::new(store);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let store = Arc::clone(&store);
            let mgr = mgr.clone();
            std::thread::spawn(move || {
                let s = mgr.create_stream(0).unwrap();
                // Thread t owns params 4t..4t+4 (writes counters there) and reads all.
                let own: Vec<ParamId> = (0..4).map(|k| (4 * t + k) as ParamId).collect();
                let mut counters = [0u64; 4];
                let mut next: ParamId = 0;
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                let mut rnd = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                for _ in 0..OPS {
                    match rnd() % 10 {
                        0..=3 => {
                            let k = (rnd() % 4) as usize;
                            let mut g = store.acquire(own[k], &s).unwrap();
                            s.synchronize().unwrap();
                            let mut cur = [0u8; 8];
                            g.block().unwrap().read(0, &mut cur).unwrap();
                            assert_eq!(u64::from_le_bytes(cur), counters[k], "lost write");
                            counters[k] += 1;
                            g.block()
                                .unwrap()
                                .write(0, &counters[k].to_le_bytes())
                                .unwrap();
                            g.mark_dirty();
                        }
                        4..=6 => {
                            let id = if in_order {
                                next = (next + 1) % PARAMS as ParamId;
                                next
                            } else {
                                (rnd() % PARAMS as u64) as ParamId
                            };
                            let g = store.acquire(id, &s).unwrap();
                            assert_eq!(g.len(), SIZE);
                        }
                        7 => {
                            store.will_need((rnd() % PARAMS as u64) as ParamId).unwrap();
                        }
                        8 => {
                            store.dont_need((rnd() % PARAMS as u64) as ParamId).unwrap();
                        }
                        9 if t < 2 && rnd() % 2 == 0 => {
                            store.keep_resident(own[0], rnd() % 2 == 0).unwrap();
                        }
                        _ => {
                            let id = (rnd() % PARAMS as u64) as ParamId;
                            store.priority(id, (rnd() % 3) as i32).unwrap();
                        }
                    }
                }
                (own, counters)
            })
        })
        .collect();
    for h in threads {
        let (own, counters) = h.join().unwrap();
        for (k, id) in own.iter().enumerate() {
            let bytes = store.read(*id).unwrap();
            let v = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            assert_eq!(v, counters[k], "parameter {id}");
        }
    }
    let st = store.stats();
    eprintln!("{st:?}");
    assert_eq!(st.checksum_mismatches, 0);
    assert!(st.device_peak_bytes <= 6 * SIZE);
    assert!(st.writebacks > 0 && st.evictions > 0);
    assert!(st.host_peak_bytes <= host_budget, "{st:?}");
    if host_budget < 16 * MIB {
        assert!(st.staged_loads > 0, "{st:?}");
    }
}

/// Four threads share a budget of two parameters, each holding one guard at a time:
/// `acquire_timeout` waits for other threads' releases instead of failing. `acquire`
/// never waits, so two threads that each hold one parameter and want another get an
/// error, not a deadlock; `acquire_timeout` gives the same error once its time is up.
#[test]
fn acquire_timeout_waits_for_guards_of_other_threads() {
    const SIZE: usize = 64 * 1024;
    let mgr = sim();
    let store =
        Arc::new(TierStore::new(&mgr, TierConfig::new(2 * SIZE, 16 * MIB + 8 * SIZE)).unwrap());
    for i in 0..8 {
        store
            .register(&format!("p{i}"), vec![i as u8; SIZE].into())
            .unwrap();
    }
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let store = Arc::clone(&store);
            let mgr = mgr.clone();
            std::thread::spawn(move || {
                let s = mgr.create_stream(0).unwrap();
                for k in 0..200u32 {
                    let id = (t * 2 + k) % 8;
                    let g = store
                        .acquire_timeout(id, &s, Duration::from_secs(30))
                        .unwrap();
                    let mut b = [0u8; 1];
                    s.synchronize().unwrap();
                    g.block().unwrap().read(SIZE - 1, &mut b).unwrap();
                    assert_eq!(b[0], id as u8);
                    std::thread::yield_now();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(store.stats().device_peak_bytes <= 2 * SIZE);

    // Each of two threads holds one parameter and asks for another.
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let both: Vec<_> = (0..2u32)
        .map(|t| {
            let (store, mgr, barrier) = (Arc::clone(&store), mgr.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let s = mgr.create_stream(0).unwrap();
                let held = store.acquire(t, &s).unwrap();
                barrier.wait();
                let now = store.acquire(2 + t, &s).map(drop);
                let later = store
                    .acquire_timeout(2 + t, &s, Duration::from_millis(50))
                    .map(drop);
                barrier.wait();
                drop(held);
                (now, later)
            })
        })
        .collect();
    for h in both {
        let (now, later) = h.join().unwrap();
        assert!(matches!(now, Err(Error::OutOfMemory { .. })), "{now:?}");
        assert!(matches!(later, Err(Error::OutOfMemory { .. })), "{later:?}");
    }
}

/// A given sequence may name ids not registered yet: the plan skips them. A large
/// parameter outside the sequence does not shrink the plan's cache. An acquire off the
/// sequence costs its own load and at most one more.
#[test]
fn the_plan_copes_with_unknown_ids_outsiders_and_detours() {
    const SIZE: usize = 64 * 1024;
    let run = |extra_big: bool, detour: bool, sequence: Vec<ParamId>| -> Vec<u64> {
        let mgr = sim();
        let mut cfg = TierConfig::new(5 * SIZE, 16 * MIB + 16 * SIZE);
        cfg.sequence = SequenceHint::Given(sequence);
        let store = TierStore::new(&mgr, cfg).unwrap();
        for i in 0..8 {
            store
                .register(&format!("p{i}"), layer_bytes(i, SIZE).into())
                .unwrap();
        }
        if extra_big {
            store
                .register("lm_head", vec![0u8; 4 * SIZE].into())
                .unwrap();
        } else if detour {
            store.register("outsider", vec![0u8; SIZE].into()).unwrap();
        }
        let s = mgr.create_stream(0).unwrap();
        let served = |st: hetmem::tier::TierStats| (st.bytes_loaded - st.bytes_ahead) / SIZE as u64;
        (0..8)
            .map(|_| {
                let before = served(store.stats());
                for id in 0..8 {
                    drop(store.acquire(id, &s).unwrap());
                    if detour && id == 3 {
                        drop(store.acquire(8, &s).unwrap());
                    }
                }
                served(store.stats()) - before
            })
            .collect()
    };
    let plain = run(false, false, (0..8).collect());
    let order: Vec<ParamId> = (0..8).collect();
    let min: Vec<u64> = hetmem::tier::min_misses_each_pass(&order, 4, 8)
        .into_iter()
        .map(|m| m as u64)
        .collect();
    assert_eq!(plain, min, "8 layers, budget 5: MIN(4)");
    let unknown = run(false, false, (0..8).chain([40, 41]).collect());
    // Skipped steps let the plan look a little further ahead, which can only save a
    // load (a zombie still resident comes back without a copy).
    assert!(
        unknown.iter().sum::<u64>() <= plain.iter().sum::<u64>()
            && unknown.iter().zip(&plain).all(|(u, p)| u.abs_diff(*p) <= 1),
        "unregistered ids are skipped: {unknown:?} against {plain:?}"
    );
    assert_eq!(
        run(true, false, (0..8).collect())[2..],
        plain[2..],
        "the spare is sized by the sequence"
    );
    for (p, (d, b)) in run(false, true, (0..8).collect())
        .iter()
        .zip(&plain)
        .enumerate()
        .skip(2)
    {
        assert!(
            *d <= b + 2,
            "pass {p}: {d} loads with a detour, {b} without"
        );
    }
}

/// `passes` passes of `order` over 7 parameters of 64 KiB with room for `capacity`,
/// checksums on: the layers loaded for each pass, and the stats after.
fn seven_layers(
    order: &[ParamId],
    capacity: usize,
    planner: Planner,
    passes: usize,
) -> (Vec<usize>, hetmem::tier::TierStats) {
    let (loads, _, store, _) = small_store_passes(order, 7, capacity, planner, passes, &|_| {});
    (
        loads.into_iter().map(|l| l as usize).collect(),
        store.stats(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any repeated order (ids may recur within a pass, as tied weights do): the plan
    /// never loads more than Belady's MIN with one slot fewer than the budget, nor less
    /// than MIN with the whole budget (no schedule can). It can load less than MIN(C-1)
    /// when a layer MIN evicted is still on the device when it is needed again (it
    /// comes back without a copy), which a loop of distinct layers longer than the
    /// budget never allows: there it is MIN(C-1), pass by pass.
    #[test]
    fn any_sequence_moves_at_most_min_with_one_slot_fewer(
        order in proptest::collection::vec(0u32..7, 3..14),
        capacity in 2usize..6,
    ) {
        const PASSES: usize = 6;
        let (per_pass, _) = seven_layers(&order, capacity, Planner::Belady, PASSES);
        let min_c1 = hetmem::tier::min_misses_each_pass(&order, capacity - 1, PASSES);
        let min_c = hetmem::tier::min_misses_each_pass(&order, capacity, PASSES);
        let total = |v: &[usize]| v.iter().sum::<usize>();
        prop_assert!(
            total(&min_c) <= total(&per_pass) && total(&per_pass) <= total(&min_c1),
            "order {:?}, capacity {}: store {:?}, MIN(C) {:?}, MIN(C-1) {:?}",
            order, capacity, per_pass, min_c, min_c1
        );
        let mut distinct = order.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() == order.len() && order.len() > capacity {
            prop_assert_eq!(&per_pass, &min_c1, "order {:?}, capacity {}", order, capacity);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The static planner on any repeated order: never fewer loads than MIN with the
    /// whole budget (no schedule can), never over the budget, the right bytes on every
    /// load; on a loop of distinct layers longer than the budget, exactly the layers
    /// outside its fixed set of `C - 1`, every pass after the first.
    #[test]
    fn static_planner_on_any_sequence(
        order in proptest::collection::vec(0u32..7, 3..14),
        capacity in 2usize..6,
    ) {
        const PASSES: usize = 5;
        let (per_pass, st) = seven_layers(&order, capacity, Planner::Static, PASSES);
        let min_c = hetmem::tier::min_misses_each_pass(&order, capacity, PASSES);
        prop_assert!(
            min_c.iter().sum::<usize>() <= per_pass.iter().sum::<usize>(),
            "order {:?}, capacity {}: store {:?}, MIN(C) {:?}", order, capacity, per_pass, min_c
        );
        prop_assert!(st.device_peak_bytes <= capacity * (64 << 10), "{:?}", st);
        prop_assert_eq!(st.checksum_mismatches, 0);
        prop_assert_eq!(st.unplanned_evictions, 0);
        let mut distinct = order.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() == order.len() && order.len() > capacity {
            for (p, n) in per_pass.iter().enumerate().skip(1) {
                prop_assert_eq!(*n, order.len() - (capacity - 1), "pass {} of {:?}", p, order);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Both planners with mixed sizes, any repeated order, any budget that holds two of
    /// the largest: every acquire succeeds, the budget holds, every load checks out and
    /// every parameter reads back as registered.
    #[test]
    fn mixed_sizes_any_order_any_budget(
        sizes in proptest::collection::vec(prop_oneof![Just(64usize << 10), Just(200 << 10), Just(2 << 20), Just(5 << 20)], 3..9),
        picks in proptest::collection::vec(0usize..100, 3..16),
        extra in 0usize..100,
        fixed in any::<bool>(),
        spare in 1usize..3,
    ) {
        let n = sizes.len();
        let order: Vec<ParamId> = picks.iter().map(|p| (*p % n) as ParamId).collect();
        let device = |s: usize| if s > MIB { s.next_multiple_of(2 * MIB) } else { s.next_multiple_of(512) };
        let largest = sizes.iter().map(|s| device(*s)).max().unwrap();
        let total: usize = sizes.iter().map(|s| device(*s)).sum();
        let budget = 2 * largest + (total.saturating_sub(2 * largest)) * extra / 100;
        let mgr = sim();
        let mut cfg = TierConfig::new(budget, 16 * MIB + 2 * total);
        cfg.sequence = SequenceHint::Given(order.clone());
        cfg.planner = if fixed { Planner::Static } else { Planner::Belady };
        cfg.spare_slots = spare;
        cfg.checksums = true;
        let store = TierStore::new(&mgr, cfg).unwrap();
        for (i, s) in sizes.iter().enumerate() {
            store.register(&format!("p{i}"), layer_bytes(i, *s).into()).unwrap();
        }
        let compute = mgr.create_stream(0).unwrap();
        for _ in 0..4 {
            pass_of(&mgr, &store, &compute, Duration::from_micros(5), &order);
        }
        compute.synchronize().unwrap();
        let st = store.stats();
        prop_assert!(st.device_peak_bytes <= budget, "{:?}", st);
        prop_assert_eq!(st.checksum_mismatches, 0);
        for (i, s) in sizes.iter().enumerate() {
            prop_assert!(store.read(i as ParamId).unwrap() == layer_bytes(i, *s), "p{}", i);
        }
    }
}

/// A transformer's parameters are not all one size. Scaled-down Llama shapes (an
/// embedding and a head of 31 MiB; four layers of four 4 MiB attention weights, three
/// MLP weights of 10.75 MiB and two 1 KiB norms) through half the model's size: every
/// eviction is the plan's own (none forced by a pool that cannot place a load in the
/// room the store counted), the pool stays within the budget, guards report the
/// parameters' own sizes, and every load checks out.
#[test]
fn mixed_sizes_stay_on_the_plan() {
    let mgr = sim();
    let mlp = 11008 * 4096 * 2 / 8;
    let mut sizes = vec![31 * MIB];
    for _ in 0..4 {
        sizes.extend([4 * MIB; 4]);
        sizes.extend([mlp; 3]);
        sizes.extend([1024; 2]);
    }
    sizes.push(31 * MIB);
    let total: usize = sizes.iter().sum();
    let budget = total / 2;
    let mut cfg = TierConfig::new(budget, total + 64 * MIB);
    cfg.sequence = SequenceHint::Given((0..sizes.len() as ParamId).collect());
    cfg.checksums = true;
    let store = TierStore::new(&mgr, cfg).unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        store
            .register(&format!("p{i}"), layer_bytes(i, n).into())
            .unwrap();
    }
    let s = mgr.create_stream(0).unwrap();
    for pass in 0..4 {
        for (id, &n) in sizes.iter().enumerate() {
            let g = store.acquire(id as ParamId, &s).unwrap();
            assert_eq!(g.len(), n, "a guard reports its parameter's size");
            assert!(g.block().unwrap().len() >= n);
            mgr.sim()
                .unwrap()
                .launch_kernel(s.handle(), Duration::from_micros(5))
                .unwrap();
        }
        let st = store.stats();
        assert_eq!(st.unplanned_evictions, 0, "pass {pass}: {st:?}");
        assert!(st.device_peak_bytes <= budget, "{st:?}");
    }
    s.synchronize().unwrap();
    let st = store.stats();
    assert_eq!(st.checksum_mismatches, 0);
    assert!(st.evictions > 0, "the budget made it evict: {st:?}");
    let pool = store.pool_stats();
    assert!(
        pool.reserved_bytes.all.peak as usize <= budget + (4 << 20),
        "the pool stays within the budget and its page rounding: {pool:?}"
    );
}

/// A store of `N` equal layers of `size` with the sequence given, the static planner
/// and `spare` spare slots; returns the steady bytes per pass and the steady virtual
/// time per pass, over `passes` passes after two to settle.
fn static_run(
    n: usize,
    size: usize,
    capacity: usize,
    spare: usize,
    kernel: Duration,
    planner: Planner,
) -> (u64, u64) {
    let mgr = sim();
    let ids: Vec<ParamId> = (0..n as ParamId).collect();
    let mut cfg = TierConfig::new(capacity * size, 16 * MIB + n * size);
    cfg.sequence = SequenceHint::Given(ids.clone());
    cfg.spare_slots = spare;
    cfg.planner = planner;
    let store = TierStore::new(&mgr, cfg).unwrap();
    for i in 0..n {
        store
            .register(&format!("layer.{i}"), layer_bytes(i, size).into())
            .unwrap();
    }
    let compute = mgr.create_stream(0).unwrap();
    let sim = mgr.sim().unwrap();
    for _ in 0..2 {
        pass_of(&mgr, &store, &compute, kernel, &ids);
    }
    let passes = 4;
    let t0 = sim.stream_time_ns(compute.handle()).unwrap();
    let bytes: u64 = (0..passes)
        .map(|_| pass_of(&mgr, &store, &compute, kernel, &ids))
        .sum();
    let t1 = sim.stream_time_ns(compute.handle()).unwrap();
    assert_eq!(store.stats().unplanned_evictions, 0);
    (bytes / passes, (t1 - t0) / passes)
}

/// The static planner keeps `C - spare` equal layers for good: with one spare it moves
/// `N - C + 1` layers every pass, the fewest any plan can (at most `C - 1` stay from
/// pass to pass), and never more than MIN(C-1). A plan that moves that little takes at
/// least `misses × (copy + kernel)` per pass (or the kernels' own time): each layer kept
/// holds its room for a whole pass, so all misses share the one room left, in turn
/// (load, then kernel). The static planner meets that bound; at kernels about half a
/// copy it is 0.7–0.9 of max(copy, compute), which is why `loads_overlap_compute` leaves
/// 40 us out. With two spares the misses alternate between two rooms and the pass
/// reaches max(copy, compute), for one layer more per pass.
#[test]
fn static_planner_moves_min_bytes_and_overlaps_with_two_spares() {
    const N: usize = 16;
    const SIZE: usize = 2 * MIB;
    let ids: Vec<ParamId> = (0..N as ParamId).collect();
    let cfg = sim().sim().unwrap().config().clone();
    let copy_ns = cfg.copy_latency.as_nanos() as f64 + SIZE as f64 / cfg.h2d_gbps;
    let kernel = Duration::from_nanos((copy_ns * 0.6) as u64);
    let c = kernel.as_nanos() as f64;
    for capacity in [4usize, 8, 12] {
        let (bytes, t) = static_run(N, SIZE, capacity, 1, kernel, Planner::Static);
        let misses = N - (capacity - 1);
        assert_eq!(
            bytes,
            (misses * SIZE) as u64,
            "capacity {capacity}: one spare"
        );
        // MIN(C-1) holds the layer being computed inside its C-1 slots so that the
        // next can load meanwhile; the fixed set streams through the spare instead,
        // one load at a time, and never moves more (at times less: N - C + 1 is the
        // least any plan that keeps layers from pass to pass can move).
        let min = min_misses_per_pass(&ids, capacity - 1, 12);
        assert!(
            misses as f64 <= min + 1e-9,
            "capacity {capacity}: {misses} against MIN(C-1) {min}"
        );
        let bound = (misses as f64 * (copy_ns + c)).max(N as f64 * c);
        let t = t as f64;
        assert!(
            t >= bound * 0.999 && t <= bound * 1.02,
            "capacity {capacity}: pass {t:.0} ns against the bound {bound:.0} ns"
        );

        let (bytes2, t2) = static_run(N, SIZE, capacity, 2, kernel, Planner::Static);
        let misses2 = N - (capacity - 2);
        assert_eq!(
            bytes2,
            (misses2 * SIZE) as u64,
            "capacity {capacity}: two spares"
        );
        let ideal = (misses2 as f64 * copy_ns).max(N as f64 * c);
        let eff = ideal / t2 as f64;
        let (_, tb) = static_run(N, SIZE, capacity, 2, kernel, Planner::Belady);
        eprintln!(
            "capacity {capacity}/{N}: one spare {:.0} us (bound {:.0}); two spares {:.0} us, \
             overlap {eff:.3}; Belady with two spares {:.0} us",
            t / 1e3,
            bound / 1e3,
            t2 as f64 / 1e3,
            tb as f64 / 1e3
        );
        assert!(
            eff >= 0.95,
            "capacity {capacity}: two spares overlap {eff:.3}"
        );
        assert!(
            t2 <= tb,
            "capacity {capacity}: static {t2} ns, Belady {tb} ns"
        );
    }
}

/// Llama-like mixed sizes at half the model: the static planner keeps the large
/// embedding and head and streams the layers through room for the largest of them;
/// Belady keeps them too where that loads less and runs MIN over the rest. Both stay on
/// their plans (no unplanned eviction) and within the budget, and load the right bytes;
/// static moves the fewest.
#[test]
fn static_planner_moves_fewer_bytes_with_mixed_sizes() {
    let mlp = 11008 * 4096 * 2 / 8;
    let mut sizes = vec![31 * MIB];
    for _ in 0..4 {
        sizes.extend([4 * MIB; 4]);
        sizes.extend([mlp; 3]);
        sizes.extend([1024; 2]);
    }
    sizes.push(31 * MIB);
    let total: usize = sizes.iter().sum();
    let budget = total / 2;
    let run = |planner: Planner| {
        let mgr = sim();
        let mut cfg = TierConfig::new(budget, total + 64 * MIB);
        cfg.sequence = SequenceHint::Given((0..sizes.len() as ParamId).collect());
        cfg.checksums = true;
        cfg.planner = planner;
        let store = TierStore::new(&mgr, cfg).unwrap();
        for (i, &n) in sizes.iter().enumerate() {
            store
                .register(&format!("p{i}"), layer_bytes(i, n).into())
                .unwrap();
        }
        let s = mgr.create_stream(0).unwrap();
        let ids: Vec<ParamId> = (0..sizes.len() as ParamId).collect();
        // MIN's passes differ from one to the next (a cycle many passes long): ten
        // steady passes.
        let mut steady = 0;
        for p in 0..12 {
            let b = pass_of(&mgr, &store, &s, Duration::from_micros(5), &ids);
            if std::env::var_os("HETMEM_TEST_VERBOSE").is_some() {
                eprintln!("{planner:?} pass {p}: {:.1} MiB", b as f64 / MIB as f64);
            }
            if p >= 2 {
                steady += b;
            }
        }
        s.synchronize().unwrap();
        let st = store.stats();
        assert_eq!(st.checksum_mismatches, 0, "{planner:?}");
        assert_eq!(st.unplanned_evictions, 0, "{planner:?}: {st:?}");
        assert!(st.device_peak_bytes <= budget, "{planner:?}: {st:?}");
        (steady / 10, store.residency(0).unwrap())
    };
    let (belady, _) = run(Planner::Belady);
    let (fixed, embed) = run(Planner::Static);
    eprintln!(
        "mixed sizes, budget {} MiB of {} MiB: Belady {:.1} MiB per pass, static {:.1} MiB",
        budget / MIB,
        total / MIB,
        belady as f64 / MIB as f64,
        fixed as f64 / MIB as f64
    );
    assert!(
        matches!(embed, Residency::Device { .. } | Residency::Loading { .. }),
        "the embedding stays: {embed:?}"
    );
    // Static keeps the fewest bytes moving. Belady keeps the two 31 MiB tensors for good
    // where that loads less, and sizes its room for the rest, so it comes within 8%
    // (157.8 against 150.0 MiB here; with room for the largest tensor it moved about
    // 180, 1.2 times static).
    assert!(
        fixed <= belady && (belady as f64) <= 1.08 * fixed as f64,
        "static {fixed} B against Belady {belady} B per pass"
    );
    assert!(
        fixed as usize >= total - budget,
        "nothing beats the budget's bound"
    );
}

/// `passes` passes of `order` over `n` parameters of 64 KiB with room for `cap`, the
/// given planner and checksums on, after `setup`: the layers loaded and the demand
/// misses of each pass, and the store.
fn small_store_passes(
    order: &[ParamId],
    n: usize,
    cap: usize,
    planner: Planner,
    passes: usize,
    setup: &dyn Fn(&TierStore),
) -> (Vec<u64>, Vec<u64>, TierStore, Manager) {
    const SIZE: usize = 64 << 10;
    let mgr = sim();
    let mut cfg = TierConfig::new(cap * SIZE, 16 * MIB + (n + 8) * SIZE);
    cfg.planner = planner;
    cfg.sequence = SequenceHint::Given(order.to_vec());
    cfg.checksums = true;
    let store = TierStore::new(&mgr, cfg).unwrap();
    for i in 0..n {
        store
            .register(&format!("p{i}"), layer_bytes(i, SIZE).into())
            .unwrap();
    }
    setup(&store);
    let s = mgr.create_stream(0).unwrap();
    let (mut loads, mut misses) = (Vec::new(), Vec::new());
    for _ in 0..passes {
        let before = store.stats();
        loads.push(pass_of(&mgr, &store, &s, Duration::from_micros(5), order) / SIZE as u64);
        misses.push(store.stats().misses - before.misses);
    }
    s.synchronize().unwrap();
    assert_eq!(store.stats().checksum_mismatches, 0);
    (loads, misses, store, mgr)
}

/// The static planner, five passes.
fn static_passes(
    order: &[ParamId],
    n: usize,
    cap: usize,
    setup: &dyn Fn(&TierStore),
) -> (Vec<u64>, Vec<u64>, TierStore, Manager) {
    small_store_passes(order, n, cap, Planner::Static, 5, setup)
}

/// The static planner weighs what it is told: a layer used three times a pass stays
/// before layers used once (so it moves no more than MIN(C-1) there), priorities order
/// the fixed set, and a kept parameter that is not loaded and not in the sequence takes
/// no room from the plan (it did: every acquire became a demand load).
#[test]
fn static_planner_weighs_uses_priorities_and_keeps() {
    let recurring: Vec<ParamId> = vec![1, 2, 0, 3, 4, 0, 5, 6, 0];
    for cap in [3usize, 4, 5] {
        let (loads, _, _, _) = static_passes(&recurring, 7, cap, &|_| {});
        let min = hetmem::tier::min_misses_each_pass(&recurring, cap - 1, 5);
        // Kept: the recurring layer and `cap - 2` others; the four left stream once each.
        assert!(
            loads[1..].iter().all(|l| *l == (7 - (cap - 1)) as u64),
            "cap {cap}: static {loads:?}"
        );
        assert!(
            loads[1..].iter().sum::<u64>() <= min[1..].iter().sum::<usize>() as u64,
            "cap {cap}: static {loads:?}, MIN(C-1) {min:?}"
        );
    }

    let order: Vec<ParamId> = (0..8).collect();
    let (_, _, store, _) = static_passes(&order, 8, 4, &|s| {
        s.priority(3, 100).unwrap();
        s.priority(1, -100).unwrap();
    });
    assert!(
        matches!(store.residency(3).unwrap(), Residency::Device { .. }),
        "the highest priority stays"
    );
    assert!(
        !matches!(store.residency(1).unwrap(), Residency::Device { .. }),
        "the lowest priority streams"
    );

    let (plain, plain_misses, _, _) = static_passes(&order, 8, 4, &|_| {});
    let (kept, kept_misses, _, _) = static_passes(&order, 8, 4, &|s| {
        let k = s
            .register("kept.elsewhere", layer_bytes(99, 2 * (64 << 10)).into())
            .unwrap();
        s.keep_resident(k, true).unwrap();
    });
    assert_eq!(
        kept, plain,
        "a kept parameter never loaded takes no plan room"
    );
    assert_eq!(kept_misses[1..], plain_misses[1..]);
    assert!(
        plain_misses[1..].iter().all(|m| *m == 0),
        "{plain_misses:?}"
    );
}

/// A block that moved from one parameter to the next (spare reuse) and is then given
/// back to the pool waits only for its own parameter's uses: not for later work on a
/// stream that only its earlier occupant used. (The store recorded every acquiring
/// stream on the pool block; the freed block then waited for all of their work, and
/// the pool kept every such stream alive.)
#[test]
fn a_freed_block_waits_only_for_its_own_uses() {
    const L: usize = 4 * MIB;
    let mgr = sim();
    let sim = mgr.sim().unwrap();
    let store = TierStore::new(&mgr, TierConfig::new(L, 16 * MIB + 3 * L)).unwrap();
    for i in 0..3 {
        store
            .register(&format!("l{i}"), layer_bytes(i, L).into())
            .unwrap();
    }
    let (a, b) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
    let ms = Duration::from_millis;
    let g = store.acquire(0, &a).unwrap();
    sim.launch_kernel(a.handle(), ms(1)).unwrap();
    drop(g);
    let g = store.acquire(1, &b).unwrap(); // into 0's block
    sim.launch_kernel(b.handle(), ms(1)).unwrap();
    drop(g);
    let unrelated = sim.launch_kernel(a.handle(), ms(100)).unwrap();
    assert!(store.dont_need(1).unwrap());
    let g = store.acquire(2, &b).unwrap();
    let ready = sim.stream_time_ns(b.handle()).unwrap();
    assert!(
        ready < unrelated.end_ns,
        "parameter 2 ready at {ready} ns, behind unrelated work ending at {} ns",
        unrelated.end_ns
    );
    drop(g);
    assert_eq!(store.read(2).unwrap(), layer_bytes(2, L));
}

/// An acquire or prefetch that cannot make room (what is left is held or kept) fails
/// without evicting anything on the way.
#[test]
fn a_load_that_cannot_fit_evicts_nothing() {
    const L: usize = MIB;
    let mgr = sim();
    let store = TierStore::new(&mgr, TierConfig::new(3 * L, 16 * MIB + 5 * L)).unwrap();
    for i in 0..3 {
        store
            .register(&format!("l{i}"), layer_bytes(i, L).into())
            .unwrap();
    }
    let big = store.register("big", layer_bytes(9, 2 * L).into()).unwrap();
    let s = mgr.create_stream(0).unwrap();
    store.keep_resident(0, true).unwrap();
    drop(store.acquire(0, &s).unwrap());
    let held = store.acquire(1, &s).unwrap();
    drop(store.acquire(2, &s).unwrap());
    let evictions = store.stats().evictions;
    assert!(matches!(
        store.acquire(big, &s).unwrap_err(),
        Error::OutOfMemory { .. }
    ));
    assert!(!store.prefetch(big).unwrap());
    assert_eq!(
        store.stats().evictions,
        evictions,
        "nothing evicted in vain"
    );
    assert!(matches!(
        store.residency(2).unwrap(),
        Residency::Device { .. } | Residency::Loading { .. }
    ));
    drop(held);
}

/// An acquire on a capturing stream serves resident parameters only (a load still in
/// flight is waited for on the host), refuses others with `StreamCapturing` without
/// loading, and never pulls the store's copy stream into the capture: no event of the
/// capture is recorded for a use, no load waits for one. Without the capture path the
/// capturing stream would wait for load events recorded outside the capture (the
/// driver refuses that and invalidates the capture), and a load evicting a parameter
/// used in the capture would wait for its captured use event, joining the copy stream.
#[test]
fn an_acquire_in_a_capture_serves_resident_parameters_only() {
    let mgr = sim();
    let sim = mgr.sim().unwrap();
    let store = model(&mgr, 2, SequenceHint::Lru, false);
    let (capture, other) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
    // Layer 0 resident and loaded; layer 1's load queued (still in flight).
    let g = store.acquire(0, &other).unwrap();
    let addr0 = g.ptr();
    drop(g);
    other.synchronize().unwrap();
    assert!(store.prefetch(1).unwrap());
    assert!(matches!(
        store.residency(1).unwrap(),
        Residency::Loading { .. }
    ));
    let (hits, misses) = (store.stats().hits, store.stats().misses);
    let before = sim.stats();
    sim.begin_capture(capture.handle()).unwrap();
    let g0 = store.acquire(0, &capture).unwrap();
    assert_eq!(g0.ptr(), addr0, "the address the graph bakes in");
    let g1 = store.acquire(1, &capture).unwrap();
    assert!(
        matches!(store.residency(1).unwrap(), Residency::Device { .. }),
        "the load in flight was waited for on the host"
    );
    drop(g0); // dropped in the capture: nothing recorded
              // Layer 5 is cold: refused, nothing loaded, nothing evicted.
    match store.acquire(5, &capture) {
        Err(Error::StreamCapturing { what }) => {
            assert!(what.contains("parameter 5 (layer.5)"), "{what}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store.residency(5).unwrap(),
        Residency::Host | Residency::Cold
    ));
    assert!(!store.copy_stream().is_capturing().unwrap());
    // Work on another stream meanwhile still loads (evicting layer 0, whose use was
    // captured: the copy stream must not wait for that).
    drop(g1);
    let g5 = store.acquire(5, &other).unwrap();
    drop(g5);
    assert!(!store.copy_stream().is_capturing().unwrap());
    let s = sim.stats();
    assert_eq!(
        (s.capture_violations, s.capture_joins),
        (before.capture_violations, before.capture_joins)
    );
    sim.end_capture(capture.handle()).unwrap();
    let st = store.stats();
    assert_eq!((st.hits, st.misses), (hits + 2, misses + 1));
    // After the capture, the same stream loads as usual.
    drop(store.acquire(6, &capture).unwrap());
}

/// Issue 15: a file's tensors register all or none, and a tensor of zero elements (legal
/// in safetensors) is an empty parameter: no memory, always on the device, acquired to
/// a guard of length 0 with a null pointer, a step of the sequence like the others.
/// (It was refused with `InvalidSize`, and left the tensors before it registered.)
#[test]
fn a_file_registers_all_or_nothing_and_empty_tensors_are_empty_parameters() {
    let mgr = sim();
    let sim = mgr.sim().unwrap();
    let mut cfg = TierConfig::new(4 * MIB, 32 * MIB);
    cfg.checksums = true;
    let store = TierStore::new(&mgr, cfg).unwrap();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = |name: &str| {
        dir.join(format!(
            "tier-store-{}-{name}.safetensors",
            std::process::id()
        ))
    };
    let a = layer_bytes(1, 3 * MIB);
    let b = layer_bytes(2, 1000);

    // Refused files leave nothing behind: a name taken, a tensor larger than the budget.
    store.register("taken", vec![1u8; 64].into()).unwrap();
    let huge = vec![0u8; 5 * MIB];
    for (name, tensors) in [
        (
            "taken",
            vec![
                ("fresh", "U8", vec![16], vec![1u8; 16]),
                ("taken", "U8", vec![4], vec![0u8; 4]),
            ],
        ),
        (
            "huge",
            vec![
                ("fresh", "U8", vec![16], vec![1u8; 16]),
                ("big", "U8", vec![huge.len()], huge.clone()),
            ],
        ),
    ] {
        let specs: Vec<_> = tensors
            .iter()
            .map(|(n, d, s, b)| (*n, *d, s.as_slice(), b.as_slice()))
            .collect();
        write_safetensors(path(name), &specs).unwrap();
        let file = SafetensorsFile::open(path(name)).unwrap();
        let err = store.register_safetensors(&file).unwrap_err();
        match (name, &err) {
            ("taken", Error::InvalidArgument(m)) => assert!(m.contains("`taken`"), "{m}"),
            (
                "huge",
                Error::OutOfMemory {
                    requested, free, ..
                },
            ) => {
                assert_eq!((*requested, *free), (6 * MIB, 4 * MIB), "{err}")
            }
            _ => panic!("{name}: {err}"),
        }
        assert_eq!(store.len(), 1, "{name}: a tensor stayed registered");
        assert_eq!(store.id("fresh"), None);
        std::fs::remove_file(path(name)).ok();
    }

    write_safetensors(
        path("empty"),
        &[
            ("a", "U8", &[a.len()], &a),
            ("empty", "F32", &[0, 8], &[]),
            ("b", "U8", &[b.len()], &b),
        ],
    )
    .unwrap();
    let file = SafetensorsFile::open(path("empty")).unwrap();
    let ids = store.register_safetensors(&file).unwrap();
    assert_eq!(ids, vec![1, 2, 3], "in file order (the writer's)");
    let id = |name| store.id(name).unwrap();
    let (ia, ie, ib) = (id("a"), id("empty"), id("b"));
    assert_eq!(store.residency(ie).unwrap(), Residency::Device { refs: 0 });
    assert_eq!(store.read(ie).unwrap(), Vec::<u8>::new());
    assert!(store.prefetch(ie).unwrap(), "on the device already");
    assert!(!store.dont_need(ie).unwrap(), "nothing to drop");

    let s = mgr.create_stream(0).unwrap();
    let before = store.stats();
    let mut g = store.acquire(ie, &s).unwrap();
    assert!(g.is_empty());
    assert_eq!(g.len(), 0);
    assert_eq!(g.ptr(), hetmem::DevicePtr(0));
    assert!(g.block().is_none());
    g.mark_dirty(); // nothing to write back
    assert_eq!(store.residency(ie).unwrap(), Residency::Device { refs: 1 });
    let g2 = store.acquire(ie, &s).unwrap();
    assert_eq!(store.residency(ie).unwrap(), Residency::Device { refs: 2 });
    drop((g, g2));
    assert_eq!(store.residency(ie).unwrap(), Residency::Device { refs: 0 });
    let after = store.stats();
    assert_eq!(
        (after.loads, after.hits, after.device_bytes),
        (before.loads, before.hits + 2, before.device_bytes),
        "an empty parameter is never loaded and takes no memory"
    );
    // Served on a capturing stream too: there is nothing to load.
    sim.begin_capture(s.handle()).unwrap();
    drop(store.acquire(ie, &s).unwrap());
    sim.end_capture(s.handle()).unwrap();

    // In a sequence, the empty step is a step: the plan follows it, loads the others
    // ahead, and the bytes arrive.
    store.set_sequence(Some(vec![ia, ie, ib])).unwrap();
    for _ in 0..3 {
        for id in [ia, ie, ib] {
            drop(store.acquire(id, &s).unwrap());
        }
    }
    assert_eq!(store.read(ia).unwrap(), a);
    assert_eq!(store.read(ib).unwrap(), b);
    let st = store.stats();
    assert_eq!(st.checksum_mismatches, 0);
    assert!(
        st.prefetches > 0,
        "the plan ran ahead along the sequence: {st:?}"
    );
    std::fs::remove_file(path("empty")).ok();
}

/// Issue 15: a staging ring no memory can hold is refused before anything is pinned
/// (`SIZE_MAX` slots under a `SIZE_MAX` host budget pinned slot after slot until the
/// OOM killer came), and a slot over `isize::MAX` is `InvalidSize` whatever the budget.
#[test]
fn impossible_staging_rings_are_refused_with_their_numbers() {
    let mgr = sim();
    let ring = |slots: usize, slot_size: usize, host_budget: usize| {
        let mut cfg = TierConfig::new(2 * MIB, host_budget);
        cfg.staging_slots = slots;
        cfg.staging_slot_size = slot_size;
        TierStore::new(&mgr, cfg).unwrap_err()
    };
    for budget in [32 * MIB, usize::MAX] {
        let err = ring(4, isize::MAX as usize + 1, budget);
        assert!(
            matches!(err, Error::InvalidSize { requested, .. } if requested == isize::MAX as usize + 1),
            "{err}"
        );
        assert!(matches!(
            ring(4, 0, budget),
            Error::InvalidSize { requested: 0, .. }
        ));
    }
    let err = ring(usize::MAX, usize::MAX, usize::MAX);
    assert!(matches!(err, Error::InvalidSize { .. }), "{err}");
    let Error::InvalidSize { requested, .. } = ring(usize::MAX, 4 * MIB, usize::MAX) else {
        panic!("not InvalidSize");
    };
    assert_eq!(requested, usize::MAX);
    let available = hetmem::host_mem::available_memory();
    let slots = available / (4 * MIB) + 2;
    let err = ring(slots, 4 * MIB, usize::MAX);
    assert!(
        matches!(err, Error::OutOfMemory { kind: hetmem::MemKind::Pinned, requested, free, .. }
            if requested == slots * 4 * MIB && free < requested),
        "{err}"
    );
}

/// Issue 15 (exhaustion): a device budget of three pages, a host budget that holds
/// the staging ring only (every load is staged), eight streams acquiring at once: every
/// refusal is `OutOfMemory` with its numbers, and once the guards are gone every
/// parameter loads with its bytes. Then the device itself runs out under the store
/// (another allocation takes its memory): refused with the driver's numbers, and the
/// store works again once that memory is freed.
#[test]
fn exhaustion_is_an_error_with_numbers_and_the_store_recovers() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    const N: usize = 12;
    const SIZE: usize = 2 * MIB;
    let mgr = Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(SimConfig::with_devices(1, 64 * MIB))
        .build()
        .unwrap();
    let store = TierStore::new(&mgr, TierConfig::new(3 * SIZE, 16 * MIB)).unwrap();
    for i in 0..N {
        store
            .register(&format!("p.{i}"), layer_bytes(i, SIZE).into())
            .unwrap();
    }
    let (served, refused) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|t| {
        for k in 0..8usize {
            let (store, mgr, served, refused) = (&store, &mgr, &served, &refused);
            t.spawn(move || {
                let s = mgr.create_stream(0).unwrap();
                let mut held = Vec::new();
                for j in 0..40usize {
                    let id = ((k * 5 + j * 7) % N) as ParamId;
                    match store.acquire(id, &s) {
                        Ok(g) => {
                            assert_eq!(g.len(), SIZE);
                            served.fetch_add(1, Ordering::Relaxed);
                            // Hold one guard across the next acquire: the budget of three
                            // pages runs out when eight threads do.
                            held.push(g);
                            if held.len() > 1 {
                                held.remove(0);
                            }
                        }
                        Err(Error::OutOfMemory {
                            kind: hetmem::MemKind::Device(0),
                            requested,
                            free,
                            ..
                        }) => {
                            assert_eq!(requested, SIZE);
                            assert!(free < requested, "refused with {free} bytes free");
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("thread {k}, acquire {j} of p.{id}: {e}"),
                    }
                }
            });
        }
    });
    let (served, refused) = (served.into_inner(), refused.into_inner());
    assert!(
        served > 0 && refused > 0,
        "{served} served, {refused} refused"
    );
    let st = store.stats();
    assert!(st.device_peak_bytes <= 3 * SIZE, "{st:?}");
    assert_eq!(st.host_peak_bytes, 16 * MIB, "the ring only: {st:?}");
    let s = mgr.create_stream(0).unwrap();
    for i in 0..N as ParamId {
        drop(store.acquire(i, &s).unwrap());
        assert!(
            store.read(i).unwrap() == layer_bytes(i as usize, SIZE),
            "p.{i} differs"
        );
    }

    // The device runs out under a new store's budget: another user takes its memory.
    use hetmem::Backend;
    let store = TierStore::new(&mgr, TierConfig::new(3 * SIZE, 16 * MIB)).unwrap();
    for i in 0..N {
        store
            .register(&format!("p.{i}"), layer_bytes(i, SIZE).into())
            .unwrap();
    }
    let free = mgr.sim().unwrap().mem_info(0).unwrap().free;
    let hog = mgr.alloc(hetmem::Placement::Device(0), free).unwrap();
    for i in 0..N as ParamId {
        match store.acquire(i, &s) {
            Err(Error::OutOfMemory {
                kind: hetmem::MemKind::Device(0),
                requested,
                free,
                ..
            }) => assert!(requested >= SIZE && free < requested, "{requested} {free}"),
            other => panic!("p.{i} with the device taken: {other:?}"),
        }
    }
    drop(hog);
    for i in 0..N as ParamId {
        drop(store.acquire(i, &s).unwrap());
        assert!(store.read(i).unwrap() == layer_bytes(i as usize, SIZE));
    }
    println!("three pages, eight streams: {served} acquires served, {refused} refused");
}
