//! A fuzzer for hetmem: randomised call sequences from several threads over the whole
//! C ABI (`include/hetmem.h`) and over the tier store's Rust API, with valid and
//! invalid arguments mixed, checked against a shadow model.
//!
//! - `capi`, the C ABI leg: managers (several simulated ones and a host-only one at
//!   once), buffers of every placement, copies, streams, prefetch and advice, stats, the tier store
//!   through `hetmem_store_*`, and PyTorch's allocator entry points. Dead, forged, NULL
//!   and wrong-kind handles; NULL, dead, forged and interior addresses and those of
//!   another manager; sizes of 0, past the end, `SIZE_MAX`; streams of another manager
//!   or device; double frees and releases; use after destroy. The model knows what
//!   every buffer and parameter holds (given the writes and copies that succeeded) and
//!   checks every byte read back; every status against the codes the arguments call for
//!   and the codes the header documents for that call ([`header`]); out-handles set to
//!   NULL on failure; the last error message.
//! - `tier`, the tier store leg: tier stores with budgets far below their parameters,
//!   checksums on, threads that acquire, write through the guard, mark dirty, release, and give every
//!   hint; each acquire's bytes are compared with the model, and every byte at the end.
//!
//! The engine is a seeded random driver ([`Config::seed`]): one generator per thread,
//! so a single-threaded run replays exactly; a watchdog reports a thread that makes no
//! progress (a hang). [`run`] returns a [`Summary`]; `hetmem-fuzz --json` prints it.

mod capi;
pub mod header;
pub mod report;
pub mod rng;
mod tier;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use report::{Finding, Kind, Report, Summary};

/// Which legs a run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Legs {
    /// The C ABI leg only.
    Capi,
    /// The tier store leg only.
    Tier,
    /// Both, the threads split between them.
    Both,
}

impl Legs {
    /// Its name on the command line and in the summary.
    pub fn name(self) -> &'static str {
        match self {
            Legs::Capi => "capi",
            Legs::Tier => "tier",
            Legs::Both => "both",
        }
    }
}

impl std::str::FromStr for Legs {
    type Err = String;
    fn from_str(s: &str) -> Result<Legs, String> {
        match s {
            "capi" => Ok(Legs::Capi),
            "tier" => Ok(Legs::Tier),
            "both" | "all" => Ok(Legs::Both),
            _ => Err(format!("legs: capi, tier or both, not {s:?}")),
        }
    }
}

/// How a run goes.
#[derive(Debug, Clone)]
pub struct Config {
    /// The seed: thread `t` draws from `Rng::new(seed, t)`.
    pub seed: u64,
    /// Worker threads (with [`Legs::Both`], at least one per leg).
    pub threads: usize,
    /// Which legs.
    pub legs: Legs,
    /// Operations per thread (each one or a few calls); `None`: until `duration`.
    pub ops: Option<u64>,
    /// Wall-clock time; `None`: until `ops`.
    pub duration: Option<Duration>,
    /// A thread that makes no progress for this long is a hang.
    pub hang_after: Duration,
    /// Print nothing while running (findings are in the summary).
    pub quiet: bool,
}

impl Config {
    /// `ops` operations per thread on `threads` threads, both legs.
    pub fn ops(seed: u64, threads: usize, ops: u64) -> Config {
        Config {
            seed,
            threads,
            legs: Legs::Both,
            ops: Some(ops),
            duration: None,
            hang_after: Duration::from_secs(120),
            quiet: false,
        }
    }
}

/// Sets the environment the fuzzer expects: the simulator with two devices of 1 GiB
/// for every manager (and PyTorch's entry points), and no HIP runtime (a machine with
/// ROCm's library installed but no GPU would otherwise load it for "rocm", and its
/// failed initialisation leaks, which LeakSanitizer reports). Call it before any thread
/// starts (the environment is not safe to change beside other threads).
pub fn set_environment() {
    std::env::set_var("HETMEM_BACKEND", "sim");
    std::env::set_var("HETMEM_SIM_DEVICES", "2");
    std::env::set_var("HETMEM_SIM_MEMORY", "1G");
    std::env::set_var("HETMEM_HIP_LIBRARY", "/nonexistent/libamdhip64.so");
}

/// What each worker is doing, for the watchdog.
pub(crate) struct Progress {
    /// Milliseconds since the start at the last completed operation, per thread.
    ticks: Vec<AtomicU64>,
    /// The operation each thread is in.
    doing: Vec<Mutex<String>>,
    start: Instant,
}

impl Progress {
    fn new(n: usize) -> Progress {
        Progress {
            ticks: (0..n).map(|_| AtomicU64::new(0)).collect(),
            doing: (0..n).map(|_| Mutex::new(String::new())).collect(),
            start: Instant::now(),
        }
    }

    /// Thread `t` starts `op`.
    pub(crate) fn enter(&self, t: usize, op: &str) {
        let mut d = self.doing[t].lock().unwrap_or_else(|e| e.into_inner());
        d.clear();
        d.push_str(op);
    }

    /// Thread `t` finished an operation.
    pub(crate) fn tick(&self, t: usize) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.ticks[t].store(ms, Ordering::Relaxed);
    }
}

/// When a worker stops.
pub(crate) struct Stop {
    flag: AtomicBool,
    ops: Option<u64>,
    deadline: Option<Instant>,
}

impl Stop {
    /// Whether a worker that has done `done` operations stops now.
    pub(crate) fn now(&self, done: u64) -> bool {
        self.flag.load(Ordering::Relaxed)
            || self.ops.is_some_and(|n| done >= n)
            || self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// Runs the fuzzer as `cfg` says and returns what it found. A hang is reported and
/// the stuck threads are left behind (a process that ends with them is the caller's
/// business: `hetmem-fuzz` exits).
pub fn run(cfg: &Config) -> Summary {
    let start = Instant::now();
    let report = Arc::new(Report::default());
    report.quiet.store(cfg.quiet, Ordering::Relaxed);
    let threads = cfg.threads.max(1);
    let (capi_threads, tier_threads) = match cfg.legs {
        Legs::Capi => (threads, 0),
        Legs::Tier => (0, threads),
        Legs::Both => {
            let t = threads.max(2);
            (t - t / 3, t / 3)
        }
    };
    let total = capi_threads + tier_threads;
    let progress = Arc::new(Progress::new(total));
    let stop = Arc::new(Stop {
        flag: AtomicBool::new(false),
        ops: cfg.ops,
        deadline: cfg.duration.map(|d| start + d),
    });
    let capi_world = (capi_threads > 0).then(|| capi::World::new(cfg, report.clone()));
    let tier_world = (tier_threads > 0).then(|| tier::World::new(cfg, report.clone()));
    let mut handles = Vec::new();
    for t in 0..total {
        let progress = progress.clone();
        let stop = stop.clone();
        let seed = cfg.seed;
        let h = if t < capi_threads {
            let w = capi_world.clone().expect("the C ABI world");
            std::thread::Builder::new()
                .name(format!("capi-{t}"))
                .spawn(move || capi::worker(&w, t, seed, &stop, &progress))
        } else {
            let w = tier_world.clone().expect("the tier world");
            std::thread::Builder::new()
                .name(format!("tier-{t}"))
                .spawn(move || tier::worker(&w, t, seed, &stop, &progress))
        };
        handles.push(h.expect("spawning a fuzz thread"));
    }
    // Watchdog: every thread must finish an operation within `hang_after`, and all must
    // end within `hang_after` of the stop.
    let mut hung = false;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
        let now = progress.start.elapsed().as_millis() as u64;
        let limit = cfg.hang_after.as_millis() as u64;
        let stuck: Vec<usize> = (0..total)
            .filter(|&t| !handles[t].is_finished())
            .filter(|&t| now.saturating_sub(progress.ticks[t].load(Ordering::Relaxed)) > limit)
            .collect();
        if !stuck.is_empty() {
            let what: Vec<String> = stuck
                .iter()
                .map(|&t| {
                    let d = progress.doing[t].lock().unwrap_or_else(|e| e.into_inner());
                    format!("thread {t}: {d}")
                })
                .collect();
            report.find(Kind::Hang, "watchdog", &what.join("; "), None, || {
                format!(
                    "no progress for {:?} (seed {}, {} threads): {}",
                    cfg.hang_after,
                    cfg.seed,
                    total,
                    what.join("; ")
                )
            });
            stop.flag.store(true, Ordering::Relaxed);
            hung = true;
            break;
        }
    }
    if !hung {
        for (t, h) in handles.into_iter().enumerate() {
            if let Err(p) = h.join() {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                report.find(Kind::Crash, "worker", &format!("thread {t}"), None, || {
                    format!("fuzz thread {t} panicked: {msg}")
                });
            }
        }
        // Teardown on this thread: everything still live is checked and let go of.
        if let Some(w) = &capi_world {
            capi::teardown(w, cfg.seed);
        }
        if let Some(w) = &tier_world {
            tier::teardown(w);
        }
    }
    Summary {
        seed: cfg.seed,
        threads: total,
        legs: cfg.legs.name().to_owned(),
        seconds: start.elapsed().as_secs_f64(),
        calls: report.calls.load(Ordering::Relaxed),
        bad_inputs: report.bad_inputs.load(Ordering::Relaxed),
        ok: report.ok.load(Ordering::Relaxed),
        bytes_checked: report.bytes_checked.load(Ordering::Relaxed),
        findings: report.findings(),
        per_call: report.per_call(),
        extra: report.extra(),
    }
}
