//! The tier store's host cost per step: one `acquire` + release of the next parameter
//! of a loop, with the sequence given (the streaming plan) and under LRU, for models of
//! 64 to 4096 parameters through a budget of a quarter of them, beside a pool
//! alloc+free pair of the same size, in one run.
//!
//! ```text
//! cargo bench --bench tier                       # sim here
//! HETMEM_BACKEND=cuda cargo bench --bench tier   # on a GPU host
//! ```
//!
//! Ends with one table: median ns per step, and per step over a pool alloc+free pair.
//! Parameters are 4 KiB so that the copies cost little: this is the bookkeeping.

use std::cell::Cell;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use hetmem::pool::PoolConfig;
use hetmem::tier::ParamId;
use hetmem::tier::{SequenceHint, TierConfig, TierStore};
use hetmem::{Manager, Stream};

const COUNTS: [usize; 3] = [64, 512, 4096];
const SIZE: usize = 4096;

fn store(mgr: &Manager, n: usize, sequence: SequenceHint) -> TierStore {
    let mut cfg = TierConfig::new(n / 4 * SIZE, (32 << 20) + n * 2 * SIZE);
    cfg.sequence = sequence;
    let store = TierStore::new(mgr, cfg).expect("store");
    for i in 0..n {
        store
            .register(&format!("p{i}"), vec![i as u8; SIZE].into())
            .expect("register");
    }
    store
}

/// One step of the loop: the next parameter, acquired and released.
fn step(store: &TierStore, stream: &Stream, next: &Cell<usize>, n: usize) {
    let id = next.get();
    next.set((id + 1) % n);
    drop(black_box(
        store.acquire(id as ParamId, stream).expect("acquire"),
    ));
}

fn main() {
    let mgr = Manager::new().expect("open a backend (HETMEM_BACKEND to force one)");
    let backend = mgr.backend_kind().name();
    let stream = mgr.create_stream(0).expect("stream");
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let pool = mgr.device_pool(0, PoolConfig::default()).expect("pool");
    drop(pool.alloc(SIZE, &stream).expect("alloc"));
    c.bench_function(&format!("tier_pool_pair/{backend}"), |b| {
        b.iter(|| drop(black_box(pool.alloc(SIZE, &stream).expect("alloc"))))
    });
    for (policy, hint) in [("sequence", true), ("lru", false)] {
        let mut g = c.benchmark_group(format!("tier_step_{policy}/{backend}"));
        for &n in &COUNTS {
            let order: Vec<ParamId> = (0..n as ParamId).collect();
            let seq = if hint {
                SequenceHint::Given(order)
            } else {
                SequenceHint::Lru
            };
            let s = store(&mgr, n, seq);
            let next = Cell::new(0);
            // Two passes first: the steady state.
            for _ in 0..2 * n {
                step(&s, &stream, &next, n);
            }
            g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
                b.iter(|| step(&s, &stream, &next, n))
            });
        }
        g.finish();
    }
    c.final_summary();

    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("criterion");
    let median = |path: PathBuf| -> Option<f64> {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.join("new/estimates.json")).ok()?)
                .ok()?;
        v["median"]["point_estimate"].as_f64()
    };
    let pair = median(dir.join(format!("tier_pool_pair_{backend}")));
    println!("\ntier store step (acquire + release), backend {backend}, median ns");
    println!(
        "{:>6} {:>10} {:>10} {:>16} {:>12}",
        "params", "sequence", "lru", "sequence/pool", "lru/pool"
    );
    for &n in &COUNTS {
        let s = median(dir.join(format!("tier_step_sequence_{backend}/{n}")));
        let l = median(dir.join(format!("tier_step_lru_{backend}/{n}")));
        let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.0}"));
        let r = |x: Option<f64>| match (x, pair) {
            (Some(x), Some(p)) if p > 0.0 => format!("{:.1}x", x / p),
            _ => "-".into(),
        };
        println!("{n:>6} {:>10} {:>10} {:>16} {:>12}", f(s), f(l), r(s), r(l));
    }
    println!(
        "pool alloc+free pair: {} ns",
        pair.map_or("-".into(), |p| format!("{p:.0}"))
    );
}
