//! Alloc+free pairs through the device pool (a cached size: the steady state of an
//! inference loop) beside the same pair straight to the backend, in one run.
//!
//! ```text
//! cargo bench --bench pool                       # sim here
//! HETMEM_BACKEND=cuda cargo bench --bench pool   # on a GPU host
//! ```
//!
//! Ends with one table: median ns per pair for the pool and for the raw backend, and
//! their ratio. The raw backend on sim is a map insert and an anonymous mapping, far
//! cheaper than cuMemAlloc+cuMemFree (85 µs for 4 KiB on the H200 host, DESIGN.md).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use hetmem::pool::PoolConfig;
use hetmem::{Manager, Placement};

const SIZES: [usize; 4] = [512, 64 << 10, 2 << 20, 64 << 20];

fn name(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{}MiB", size >> 20)
    } else if size >= 1 << 10 {
        format!("{}KiB", size >> 10)
    } else {
        format!("{size}B")
    }
}

fn main() {
    let mgr = Manager::new().expect("open a backend (HETMEM_BACKEND to force one)");
    let backend = mgr.backend_kind().name();
    let pool = mgr.device_pool(0, PoolConfig::default()).expect("pool");
    let stream = mgr.create_stream(0).expect("stream");
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for &size in &SIZES {
        let mut g = c.benchmark_group(format!("pool_alloc_free/{backend}"));
        // Warm the cache: the first allocation of a size maps memory.
        drop(pool.alloc(size, &stream).expect("alloc"));
        g.bench_with_input(
            BenchmarkId::from_parameter(name(size)),
            &size,
            |b, &size| b.iter(|| drop(black_box(pool.alloc(size, &stream).expect("alloc")))),
        );
        g.finish();
        let mut g = c.benchmark_group(format!("raw_alloc_free/{backend}"));
        g.bench_with_input(
            BenchmarkId::from_parameter(name(size)),
            &size,
            |b, &size| {
                b.iter(|| {
                    drop(black_box(
                        mgr.alloc(Placement::Device(0), size).expect("alloc"),
                    ))
                })
            },
        );
        g.finish();
    }
    c.final_summary();

    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("criterion");
    let median = |group: &str, size: usize| -> Option<f64> {
        let p = dir
            .join(format!("{group}_{backend}"))
            .join(name(size))
            .join("new/estimates.json");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
        v["median"]["point_estimate"].as_f64()
    };
    println!("\nalloc+free pair, backend {backend}, median ns");
    println!(
        "{:>8} {:>12} {:>12} {:>10}",
        "size", "pool", "raw", "raw/pool"
    );
    for &size in &SIZES {
        let (p, r) = (
            median("pool_alloc_free", size),
            median("raw_alloc_free", size),
        );
        let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.0}"));
        let ratio = match (p, r) {
            (Some(p), Some(r)) if p > 0.0 => format!("{:.0}x", r / p),
            _ => "-".into(),
        };
        println!("{:>8} {:>12} {:>12} {:>10}", name(size), f(p), f(r), ratio);
    }
}
