//! Raw allocation cost per placement: one `Manager::alloc` plus its drop, straight to
//! the backend (no pool), for each placement and a small and a large size.
//!
//! ```text
//! cargo bench --bench alloc                      # auto backend (sim here)
//! HETMEM_BACKEND=cuda cargo bench --bench alloc  # on a GPU host
//! ```
//!
//! After criterion's own report it prints one table: our median per case beside the
//! figure measured on the H200 host in DESIGN.md for the same operation, where there is
//! one. Numbers from different machines only say whether we are in the same range.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use hetmem::{Manager, NumaPolicy, Placement};

const KIB4: usize = 4 << 10;
const MIB64: usize = 64 << 20;
const GIB1: usize = 1 << 30;

/// (group, size, DESIGN.md reference for alloc+free on the H200 host, µs)
fn cases(mgr: &Manager) -> Vec<(&'static str, Placement, usize, Option<f64>)> {
    let mut v = vec![
        ("host", Placement::Host(NumaPolicy::Default), KIB4, None),
        ("host", Placement::Host(NumaPolicy::Default), MIB64, None),
        ("pinned", Placement::Pinned(NumaPolicy::Default), KIB4, None),
        (
            "pinned",
            Placement::Pinned(NumaPolicy::Default),
            MIB64,
            None,
        ),
    ];
    if !mgr.devices().is_empty() {
        // cuMemAlloc + cuMemFree from Rust: 47+38 µs (4 KiB), 88+81 (64 MiB), 107+596 (1 GiB).
        v.push(("device", Placement::Device(0), KIB4, Some(85.0)));
        v.push(("device", Placement::Device(0), MIB64, Some(169.0)));
        v.push(("device", Placement::Device(0), GIB1, Some(703.0)));
        if mgr.devices()[0].info.managed_memory {
            v.push(("managed", Placement::Managed { device: 0 }, KIB4, None));
            v.push(("managed", Placement::Managed { device: 0 }, MIB64, None));
        }
    }
    v
}

fn size_name(size: usize) -> String {
    match size {
        s if s >= GIB1 => format!("{}GiB", s / GIB1),
        s if s >= 1 << 20 => format!("{}MiB", s >> 20),
        s => format!("{}KiB", s >> 10),
    }
}

fn main() {
    let mgr = Manager::new().expect("open a backend (HETMEM_BACKEND to force one)");
    let backend = mgr.backend_kind().name();
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let cases = cases(&mgr);
    for (group, placement, size, _) in &cases {
        let mut g = c.benchmark_group(format!("alloc_free/{backend}/{group}"));
        g.bench_with_input(
            BenchmarkId::from_parameter(size_name(*size)),
            size,
            |b, &size| {
                b.iter(|| {
                    drop(black_box(
                        mgr.alloc(placement.clone(), size).expect("alloc"),
                    ))
                })
            },
        );
        g.finish();
    }
    c.final_summary();

    // Side-by-side table from criterion's saved estimates.
    let dir = criterion_dir();
    println!("\nraw alloc+free, backend {backend} (median; DESIGN.md = cuMemAlloc+cuMemFree on the H200 host)");
    println!(
        "{:<10} {:>7} {:>12} {:>12}",
        "placement", "size", "hetmem µs", "DESIGN µs"
    );
    for (group, _, size, reference) in &cases {
        let path = dir
            .join(format!("alloc_free_{backend}_{group}"))
            .join(size_name(*size))
            .join("new/estimates.json");
        let ours = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["median"]["point_estimate"].as_f64())
            .map_or("-".to_string(), |ns| format!("{:.2}", ns / 1e3));
        let r = reference.map_or("-".to_string(), |r| format!("{r:.0}"));
        println!("{group:<10} {:>7} {ours:>12} {r:>12}", size_name(*size));
    }
}

fn criterion_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("criterion")
}
