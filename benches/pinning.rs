//! Pinning 1 GiB through the host pool: cold (map, bind, pre-fault, register) and warm
//! (a cached block handed out again), with one thread and with N, side by side.
//!
//! ```text
//! cargo bench --bench pinning                       # sim here
//! HETMEM_BACKEND=host cargo bench --bench pinning   # registration is mlock
//! HETMEM_BACKEND=cuda cargo bench --bench pinning   # cuMemHostRegister on a GPU host
//! HETMEM_PIN_BYTES=4G cargo bench --bench pinning   # another size (K, M, G suffixes)
//! HETMEM_PIN_GIB=0.25 cargo bench --bench pinning   # sizes of the driver comparison
//! ```
//!
//! Ends with one table: median ms per 1 GiB for each case, and "populate" (the same
//! region, pageable: map + mbind + pre-fault only), so that cold − populate is the
//! registration. What the numbers mean depends on the backend: on `sim` registration
//! is a map insert, so cold ≈ populate; on `host` it is `mlock` of pages already
//! present; only `cuda` measures the driver's pinning, the figure DESIGN.md compares
//! (cudaHostRegister 102 ms vs cudaHostAlloc 587 ms per GiB on the H200 host).
//!
//! Then the issue's comparison (target: hetmem ≥ 5× faster), for each size in
//! `HETMEM_PIN_GIB` (GiB, comma-separated, fractions allowed; default `1,4`): what a
//! user pays to hold N bytes of pinned memory ready for DMA. On one side
//! `DriverPinned::new` (`cuMemAllocHost`: the driver allocates, zeroes and locks the
//! pages in one call); on the other a cold `HostPool` allocation of N bytes (map, bind,
//! parallel pre-fault, `cuMemHostRegister`), with 1 thread and with N. These are timed
//! with `Instant` over 3 repetitions, interleaved, not sampled by criterion: a 4 GiB
//! `cuMemAllocHost` takes seconds. Frees (and the pool's trim) are outside the timing.
//! The driver side needs `HETMEM_BACKEND=cuda`; on other backends only hetmem's side
//! is timed. Under `cargo test --benches` (criterion's test mode) it runs once at no
//! more than 64 MiB.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use hetmem::backend::cuda::{CudaBackend, DriverPinned};
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

/// The sizes of the driver comparison, from `HETMEM_PIN_GIB` (default 1 and 4 GiB),
/// rounded up to whole 4 KiB pages.
fn compare_sizes() -> Vec<usize> {
    let spec = std::env::var("HETMEM_PIN_GIB").unwrap_or_else(|_| "1,4".into());
    spec.split(',')
        .map(|g| {
            let gib: f64 = g
                .trim()
                .parse()
                .expect("HETMEM_PIN_GIB: comma-separated GiB, e.g. 1,4 or 0.25");
            assert!(gib > 0.0, "HETMEM_PIN_GIB: sizes must be positive");
            ((gib * (1u64 << 30) as f64) as usize).next_multiple_of(4096)
        })
        .collect()
}

/// Median and minimum of `ms`, which is not empty.
fn median_min(ms: &mut [f64]) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[0])
}

fn human(size: usize) -> String {
    if size >= 1 << 30 && size.is_multiple_of(1 << 30) {
        format!("{} GiB", size >> 30)
    } else {
        format!("{} MiB", size >> 20)
    }
}

/// Time to usable pinned memory: `cuMemAllocHost` against hetmem's cold pool
/// allocation, 1 thread and `n`. Returns the table's lines.
fn driver_comparison(
    mgr: &Manager,
    pool_with: &dyn Fn(usize) -> HostPool,
    policy: &NumaPolicy,
    n: usize,
    test_mode: bool,
) -> Vec<String> {
    let cuda = mgr.backend().as_any().downcast_ref::<CudaBackend>();
    let (reps, cap) = if test_mode {
        (1, 64 << 20)
    } else {
        (3, usize::MAX)
    };
    let mut sizes: Vec<usize> = compare_sizes().into_iter().map(|s| s.min(cap)).collect();
    sizes.dedup();
    let placement = Placement::Pinned(policy.clone());
    let pools = [pool_with(1), pool_with(n)];
    let hetmem = |pool: &HostPool, size: usize| -> f64 {
        let t = Instant::now();
        let block = black_box(pool.alloc(&placement, size).expect("pinned pool alloc"));
        let ms = t.elapsed().as_secs_f64() * 1e3;
        drop(block);
        pool.trim();
        ms
    };
    let driver = |cuda: &CudaBackend, size: usize| -> f64 {
        let t = Instant::now();
        let pinned = black_box(DriverPinned::new(cuda, 0, size).expect("cuMemAllocHost"));
        let ms = t.elapsed().as_secs_f64() * 1e3;
        drop(pinned);
        ms
    };
    // Untimed warm-up: thread start-up, the driver's first host allocation.
    for pool in &pools {
        hetmem(pool, 16 << 20);
    }
    if let Some(cuda) = cuda {
        driver(cuda, 16 << 20);
    }

    let mut lines = vec![
        format!(
            "time to usable pinned memory, backend {}, policy {policy:?}: median of {reps} \
             (min) ms; ratio = cuMemAllocHost / hetmem (target >= 5x){}",
            mgr.backend_kind().name(),
            if test_mode { " [test mode]" } else { "" }
        ),
        format!(
            "{:>9} {:>20} {:>20} {:>20} {:>10} {:>10}",
            "size",
            "cuMemAllocHost",
            "hetmem cold 1t",
            format!("hetmem cold {n}t"),
            "ratio 1t",
            format!("ratio {n}t")
        ),
    ];
    for size in sizes {
        let (mut d, mut h1, mut hn) = (Vec::new(), Vec::new(), Vec::new());
        // Interleaved, so that drift in the system hits every column alike.
        for _ in 0..reps {
            if let Some(cuda) = cuda {
                d.push(driver(cuda, size));
            }
            h1.push(hetmem(&pools[0], size));
            hn.push(hetmem(&pools[1], size));
        }
        let cell = |ms: &mut Vec<f64>| -> (String, Option<f64>) {
            if ms.is_empty() {
                return ("-".into(), None);
            }
            let (med, min) = median_min(ms);
            (format!("{med:.1} ({min:.1})"), Some(med))
        };
        let (ds, dm) = cell(&mut d);
        let (h1s, h1m) = cell(&mut h1);
        let (hns, hnm) = cell(&mut hn);
        let ratio = |h: Option<f64>| match (dm, h) {
            (Some(d), Some(h)) if h > 0.0 => format!("{:.1}x", d / h),
            _ => "-".into(),
        };
        lines.push(format!(
            "{:>9} {:>20} {:>20} {:>20} {:>10} {:>10}",
            human(size),
            ds,
            h1s,
            hns,
            ratio(h1m),
            ratio(hnm)
        ));
    }
    if cuda.is_none() {
        lines.push(format!(
            "(the cuMemAllocHost baseline needs the CUDA backend: HETMEM_BACKEND=cuda on a \
             GPU host; backend {} times hetmem's side only)",
            mgr.backend_kind().name()
        ));
    }
    lines
}

fn main() {
    let mgr = Manager::new().expect("open a backend (HETMEM_BACKEND to force one)");
    // Criterion's own reading of its arguments: it benchmarks only with `--bench` and
    // without `--test` (`cargo bench`); `cargo test --benches` passes neither.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let listing = has("--list");
    let test_mode = !has("--bench") || has("--test");
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
    let comparison = if listing {
        Vec::new()
    } else {
        driver_comparison(&mgr, &pool_with, &policy, n, test_mode)
    };

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
    if !comparison.is_empty() {
        println!();
        for line in comparison {
            println!("{line}");
        }
    }
}
