//! `hetmem-fuzz`: runs the fuzzer once and prints its summary.
//!
//! ```text
//! hetmem-fuzz [--seed N] [--threads N] [--seconds S | --ops N] [--legs capi|tier|both]
//!             [--hang-after S] [--quiet] [--json]
//! ```
//!
//! The last line with `--json` is one JSON object: `seed`, `threads`, `seconds`,
//! `calls`, `bad_inputs`, `crashes`, `hangs`, `wrong_bytes`, `panics`, `wrong_status`,
//! `undocumented`, `contract`, `new_findings` and `findings` (each with its kind, call,
//! count, first example and, for a defect known and fixed elsewhere, which one). Exit status: 0
//! with no new finding, 1 with one, 2 for bad arguments, 3 for a hang (the stuck
//! threads cannot be stopped, so the process exits with them).

use std::process::ExitCode;
use std::time::Duration;

use hetmem_fuzz::{run, set_environment, Config, Legs};

fn usage() -> ExitCode {
    eprintln!(
        "usage: hetmem-fuzz [--seed N] [--threads N] [--seconds S | --ops N] \
         [--legs capi|tier|both] [--hang-after S] [--quiet] [--json]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    set_environment();
    let mut cfg = Config::ops(1, 4, 2000);
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match a.as_str() {
            "--seed" => match value().parse() {
                Ok(v) => cfg.seed = v,
                Err(_) => return usage(),
            },
            "--threads" => match value().parse() {
                Ok(v) => cfg.threads = v,
                Err(_) => return usage(),
            },
            "--seconds" => match value().parse::<f64>() {
                Ok(v) => {
                    cfg.duration = Some(Duration::from_secs_f64(v));
                    cfg.ops = None;
                }
                Err(_) => return usage(),
            },
            "--ops" => match value().parse() {
                Ok(v) => {
                    cfg.ops = Some(v);
                    cfg.duration = None;
                }
                Err(_) => return usage(),
            },
            "--legs" => match value().parse::<Legs>() {
                Ok(v) => cfg.legs = v,
                Err(e) => {
                    eprintln!("{e}");
                    return usage();
                }
            },
            "--hang-after" => match value().parse::<f64>() {
                Ok(v) => cfg.hang_after = Duration::from_secs_f64(v),
                Err(_) => return usage(),
            },
            "--quiet" => cfg.quiet = true,
            "--json" => json = true,
            _ => return usage(),
        }
    }
    let s = run(&cfg);
    let v = s.json();
    eprintln!(
        "hetmem-fuzz: seed {} threads {} legs {}: {} calls ({} bad inputs) in {:.1} s, {} bytes checked; \
         crashes {} hangs {} wrong bytes {} panics {} wrong status {} undocumented {} contract {}; \
         {} findings ({} new)",
        s.seed,
        s.threads,
        s.legs,
        s.calls,
        s.bad_inputs,
        s.seconds,
        s.bytes_checked,
        v["crashes"],
        v["hangs"],
        v["wrong_bytes"],
        v["panics"],
        v["wrong_status"],
        v["undocumented"],
        v["contract"],
        s.findings.len(),
        s.new_findings().len()
    );
    for f in &s.findings {
        eprintln!(
            "  {} x{} in {} [{}]{}: {}",
            f.kind.name(),
            f.count,
            f.call,
            f.key,
            f.known
                .map(|k| format!(" (known: {k})"))
                .unwrap_or_default(),
            f.example
        );
    }
    let never: Vec<&String> = s
        .per_call
        .iter()
        .filter(|(_, (ok, _))| *ok == 0)
        .map(|(k, _)| k)
        .collect();
    eprintln!("  calls by function (ok, failed): {:?}", s.per_call);
    if !never.is_empty() {
        eprintln!("  never succeeded: {never:?}");
    }
    if !s.extra.is_empty() {
        eprintln!("  figures: {:?}", s.extra);
    }
    if json {
        println!("{v}");
    }
    let hung = v["hangs"].as_u64().unwrap_or(0) > 0;
    if hung {
        // The stuck threads cannot be joined: leave with them.
        std::process::exit(3);
    }
    if s.new_findings().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
