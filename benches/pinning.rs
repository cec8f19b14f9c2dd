//! Pinning 1 GiB through the host pool: cold (map, bind, pre-fault, register) and warm
//! (a cached block handed out again), with one thread and with N, side by side.
//!
//! ```text
//! cargo bench --bench pinning                       # sim here
//! HETMEM_BACKEND=host cargo bench --bench pinning   # registration is mlock
//! HETMEM_BACKEND=cuda cargo bench --bench pinning   # cuMemHostRegister on a GPU host
//! HETMEM_PIN_BYTES=4G cargo bench --bench pinning   # another size (K, M, G suffixes)
//! ```
//!
//! Ends with one table: median ms per 1 GiB for each case, and "populate" (the same
//! region, pageable: map + mbind + pre-fault only), so that cold − populate is the
//! registration. What the numbers mean depends on the backend: on `sim` registration
//! is a map insert, so cold ≈ populate; on `host` it is `mlock` of pages already
//! present; only `cuda` measures the driver's pinning, the figure DESIGN.md compares
//! (cudaHostRegister 102 ms vs cudaHostAlloc 587 ms per GiB on the H200 host). The
//! other side of the issue's 5× target, `cuMemAllocHost` of the same size, is not
//! measured here yet: it will be added beside these rows.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use hetmem::pool::{HostPool, HostPoolConfig};
use hetmem::{Manager, NumaPolicy, Placement};

fn bytes() -> usize {
    let Ok(s) = std::env::var("HETMEM_PIN_BYTES") else {
        return 1 << 30;
    };
    let s = s.trim();
    let (num, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: usize = num.parse().expect("HETMEM_PIN_BYTES: a byte count");
    n << shift
}

fn main() {
    let mgr = Manager::new().expect("open a backend (HETMEM_BACKEND to force one)");
    let backend = mgr.backend_kind().name();
    let size = bytes();
    let n = HostPoolConfig::default().threads.max(2);
    let pool_with = |threads: usize| -> HostPool {
        mgr.host_pool(HostPoolConfig {
            threads,
            // Parallel from any size, so that a smaller HETMEM_PIN_BYTES still compares.
            parallel_threshold: 1,
            ..HostPoolConfig::default()
        })
        .expect("host pool")
    };
    let policy = NumaPolicy::NearDevice(0);
    let policy = if mgr.devices().is_empty() {
        NumaPolicy::Bind(0)
    } else {
        policy
    };
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(3));
    let cases = [("populate", false), ("cold", true), ("warm", true)];
    for threads in [1, n] {
        let pool = pool_with(threads);
        for (case, pinned) in cases {
            let placement = if pinned {
                Placement::Pinned(policy.clone())
            } else {
                Placement::Host(policy.clone())
            };
            let mut g = c.benchmark_group(format!("pin_{case}/{backend}"));
            g.bench_with_input(
                BenchmarkId::from_parameter(format!("{threads}t")),
                &threads,
                |b, _| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            if case == "warm" {
                                // Make sure a block is cached; only the reuse is timed.
                                drop(pool.alloc(&placement, size).expect("alloc"));
                            }
                            let t = Instant::now();
                            let block = black_box(pool.alloc(&placement, size).expect("alloc"));
                            total += t.elapsed();
                            drop(block);
                            if case != "warm" {
                                // Unregister and unmap outside the timing.
                                pool.trim();
                            }
                        }
                        total
                    })
                },
            );
            g.finish();
        }
        pool.trim();
    }
    c.final_summary();

    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("criterion");
    let median_ms = |case: &str, threads: usize| -> Option<f64> {
        let p = dir
            .join(format!("pin_{case}_{backend}"))
            .join(format!("{threads}t"))
            .join("new/estimates.json");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
        v["median"]["point_estimate"].as_f64().map(|ns| ns / 1e6)
    };
    let gib = size as f64 / (1u64 << 30) as f64;
    println!(
        "\npinning {} MiB through HostPool, backend {backend}, policy {policy:?}, median \
         (populate, cold: ms per GiB; warm: µs per allocation)",
        size >> 20
    );
    println!(
        "{:>8} {:>12} {:>12} {:>12} {:>12}",
        "threads", "populate ms", "cold ms", "warm µs", "cold/warm"
    );
    for threads in [1, n] {
        let [p, c, w] = ["populate", "cold", "warm"].map(|k| median_ms(k, threads));
        let per_gib = |x: Option<f64>| x.map_or("-".into(), |v| format!("{:.1}", v / gib));
        let us = |x: Option<f64>| x.map_or("-".into(), |v| format!("{:.2}", v * 1e3));
        let ratio = match (c, w) {
            (Some(c), Some(w)) if w > 0.0 => format!("{:.0}x", c / w),
            _ => "-".into(),
        };
        println!(
            "{:>8} {:>12} {:>12} {:>12} {:>12}",
            threads,
            per_gib(p),
            per_gib(c),
            us(w),
            ratio
        );
    }
}
