//! The fuzzer's seeds, each a bounded run that must find nothing new: no crash, hang,
//! wrong byte, caught panic, wrong status, undocumented code or broken contract
//! beyond issue 15's known defects (which other changes fix; their findings are
//! printed). Single-threaded runs replay exactly; the threaded ones replay each
//! thread's choices.
//!
//! No test harness: the environment (`hetmem_fuzz::set_environment`) is set before
//! any thread starts, and the runs go one after another in this process.

use hetmem_fuzz::{run, set_environment, Config, Kind, Legs, Summary};

/// (seed, threads, operations per thread, legs).
const SEEDS: &[(u64, usize, u64, Legs)] = &[
    (1, 1, 6000, Legs::Capi),
    // Found the fuzzer's own overflow of `off + n` with n = SIZE_MAX (a debug build).
    (2, 1, 6000, Legs::Capi),
    (3, 1, 2000, Legs::Tier),
    (11, 4, 2000, Legs::Both),
    (12, 6, 1000, Legs::Both),
];

fn check(s: &Summary) -> Vec<String> {
    let mut bad = Vec::new();
    for k in [Kind::Crash, Kind::Hang, Kind::WrongBytes, Kind::Panic] {
        if s.count(k) > 0 {
            bad.push(format!("{} {}", s.count(k), k.name()));
        }
    }
    for f in s.new_findings() {
        bad.push(format!(
            "{} x{} in {} [{}]: {}",
            f.kind.name(),
            f.count,
            f.call,
            f.key,
            f.example
        ));
    }
    if s.calls == 0 || s.bytes_checked == 0 {
        bad.push(format!(
            "the run did nothing: {} calls, {} bytes checked",
            s.calls, s.bytes_checked
        ));
    }
    bad
}

fn main() {
    set_environment();
    let mut failed = Vec::new();
    for &(seed, threads, ops, legs) in SEEDS {
        let mut cfg = Config::ops(seed, threads, ops);
        cfg.legs = legs;
        cfg.quiet = true;
        let s = run(&cfg);
        println!(
            "seed {seed}, {threads} threads, {}: {} calls ({} bad inputs), {} bytes checked, {} findings",
            legs.name(),
            s.calls,
            s.bad_inputs,
            s.bytes_checked,
            s.findings.len()
        );
        for f in s.findings.iter().filter(|f| f.known.is_some()) {
            println!(
                "  known ({}): {} x{} in {}",
                f.known.unwrap_or(""),
                f.kind.name(),
                f.count,
                f.call
            );
        }
        for b in check(&s) {
            println!("  FAIL: {b}");
            failed.push(format!("seed {seed}: {b}"));
        }
    }
    if !failed.is_empty() {
        eprintln!("{} failures:\n{}", failed.len(), failed.join("\n"));
        std::process::exit(1);
    }
    println!("{} seeds: nothing new found", SEEDS.len());
}
