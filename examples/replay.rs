//! Replays an allocator trace through hetmem's device pool and reports fragmentation
//! (peak reserved over peak allocated) and the cost of each allocation and free.
//!
//! ```text
//! cargo run --release --example replay -- --trace ../shared/traces/llama_generate.csv
//! cargo run --release --example replay -- --synthetic training --json
//! cargo run --release --example replay -- --trace T.csv --backend cuda --json
//! ```
//!
//! Traces are PyTorch allocator histories as CSV (`action,addr,size,stream,time_us`):
//! `alloc` and `free_completed` rows are replayed by address, other rows skipped.
//! `--synthetic NAME` makes one instead (`training`: activations that grow and shrink
//! with a varying batch, the hard case for caching allocators; `ddp`: the same as
//! data-parallel PyTorch runs it, with gradients made during backward and freed by
//! zero_grad, Adam state, checkpointing, and buckets and batches on two more streams;
//! `serving`: a KV cache
//! growing and shrinking with requests beside per-step temporaries; `random`: log-uniform
//! sizes and lifetimes), deterministic for a `--seed`; `--write-trace PATH` saves it.
//!
//! `reserved_over_allocated` is the pool's peak reserved bytes over the peak of the bytes
//! the trace asked for (before rounding), so it counts rounding against us. Times are per
//! call, measured with `Instant` around each call, minus the measured cost of reading
//! the clock twice.
//!
//! On the simulator every driver call the pool makes is charged its modelled cost
//! (`hetmem::backend::sim::DriverCosts`): `driver_calls` (by kind) and `driver_ms` cover
//! the whole trace, `steady_driver_calls` and `steady_driver_ms` its second half, and
//! `steady_alloc_growth` says how far the trace's allocated peak still rose in that half
//! (memory a pool cannot have without mapping it). PyTorch's driver time for the same
//! trace is modelled beside it, in the same run: from the trace's own `segment_alloc` /
//! `segment_free` rows where it has them (`cudaMalloc` / `cudaFree` costs of the same
//! model), else from this pool with plain segments (`--no-expandable`), which makes
//! segments as PyTorch's allocator does (`pytorch_driver_source` says which).
//! `--budget-x F` sets the pool's budget to F times the trace's peak allocated bytes.

use std::collections::HashMap;
use std::time::Instant;

use hetmem::backend::sim::{DriverCall, DriverCosts, DriverStats};
use hetmem::pool::{Budget, PoolConfig, PoolStats};
use hetmem::{BackendKind, Manager, Stream};
use serde_json::json;

#[derive(Debug, Clone, Copy)]
enum Op {
    Alloc { id: u64, size: usize, stream: u64 },
    Free { id: u64 },
}

/// The segments PyTorch's own allocator made and freed while the trace was recorded
/// (`segment_alloc` / `segment_free` rows), by size.
#[derive(Debug, Default, Clone)]
struct Segments {
    allocs: Vec<usize>,
    frees: Vec<usize>,
}

struct Args {
    trace: Option<String>,
    synthetic: Option<String>,
    seed: u64,
    backend: Option<BackendKind>,
    json: bool,
    budget: Option<usize>,
    budget_x: Option<f64>,
    expandable: bool,
    release_on_grow: bool,
    write_trace: Option<String>,
    slack: f64,
    min_chunk_mib: Option<usize>,
    chunk_fraction: Option<f64>,
    grow_ahead: Option<f64>,
    max_chunk_mib: Option<usize>,
}

fn usage() -> ! {
    eprintln!(
        "usage: replay (--trace PATH | --synthetic training|ddp|serving|random [--seed N]) \
         [--backend sim|cuda|rocm|host] [--budget-gib N | --budget-x F] [--no-expandable] \
         [--no-release-on-grow] [--slack F] [--min-chunk-mib N] [--max-chunk-mib N] \
         [--chunk-fraction F] [--grow-ahead F] \
         [--write-trace PATH] [--json]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        trace: None,
        synthetic: None,
        seed: 1,
        backend: None,
        json: false,
        budget: None,
        budget_x: None,
        expandable: true,
        release_on_grow: true,
        write_trace: None,
        slack: PoolConfig::default().reserve_slack,
        min_chunk_mib: None,
        chunk_fraction: None,
        grow_ahead: None,
        max_chunk_mib: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--trace" => a.trace = Some(val()),
            "--synthetic" => a.synthetic = Some(val()),
            "--seed" => a.seed = val().parse().unwrap_or_else(|_| usage()),
            "--backend" => a.backend = Some(val().parse().unwrap_or_else(|_| usage())),
            "--budget-gib" => {
                let g: f64 = val().parse().unwrap_or_else(|_| usage());
                a.budget = Some((g * (1u64 << 30) as f64) as usize);
            }
            "--budget-x" => {
                let f: f64 = val().parse().unwrap_or_else(|_| usage());
                if !(f.is_finite() && f > 0.0) {
                    usage();
                }
                a.budget_x = Some(f);
            }
            "--no-expandable" => a.expandable = false,
            "--no-release-on-grow" => a.release_on_grow = false,
            "--slack" => a.slack = val().parse().unwrap_or_else(|_| usage()),
            "--min-chunk-mib" => a.min_chunk_mib = Some(val().parse().unwrap_or_else(|_| usage())),
            "--grow-ahead" => a.grow_ahead = Some(val().parse().unwrap_or_else(|_| usage())),
            "--max-chunk-mib" => a.max_chunk_mib = Some(val().parse().unwrap_or_else(|_| usage())),
            "--chunk-fraction" => {
                a.chunk_fraction = Some(val().parse().unwrap_or_else(|_| usage()))
            }
            "--write-trace" => a.write_trace = Some(val()),
            "--json" => a.json = true,
            _ => usage(),
        }
    }
    if a.trace.is_some() == a.synthetic.is_some() || (a.budget.is_some() && a.budget_x.is_some()) {
        usage();
    }
    a
}

/// What a trace held that the replay could not take as it stood.
#[derive(Debug, Default, Clone, Copy)]
struct TraceGaps {
    /// `free_completed` of an address the trace never allocated (recording began while
    /// it was live, or a ring buffer dropped its alloc): skipped.
    unknown_frees: u64,
    /// `alloc` of an address still live (its free was not recorded): the old block is
    /// freed first.
    implicit_frees: u64,
}

/// The trace's alloc and free events. Traces recorded mid-run (or through a ring
/// buffer that dropped events) free addresses they never allocated and reuse addresses
/// whose free is missing; those are counted in the gaps, not fatal.
fn read_trace(path: &str) -> Result<(Vec<Op>, TraceGaps, Segments), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut ops = Vec::new();
    let mut gaps = TraceGaps::default();
    let mut segs = Segments::default();
    let mut live: HashMap<u64, u64> = HashMap::new(); // address -> id of the live alloc
    for (n, line) in text.lines().enumerate() {
        if n == 0 && line.starts_with("action") {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 4 {
            return Err(format!(
                "{path}:{}: expected action,addr,size,stream,...",
                n + 1
            ));
        }
        let num = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| format!("{path}:{}: bad number {s:?}", n + 1))
        };
        let addr = num(f[1])?;
        match f[0] {
            "alloc" => {
                let id = n as u64;
                if let Some(old) = live.insert(addr, id) {
                    gaps.implicit_frees += 1;
                    ops.push(Op::Free { id: old });
                }
                ops.push(Op::Alloc {
                    id,
                    size: num(f[2])? as usize,
                    stream: num(f[3])?,
                });
            }
            "free_completed" => match live.remove(&addr) {
                Some(id) => ops.push(Op::Free { id }),
                None => gaps.unknown_frees += 1,
            },
            "segment_alloc" => segs.allocs.push(num(f[2])? as usize),
            "segment_free" => segs.frees.push(num(f[2])? as usize),
            _ => {}
        }
    }
    Ok((ops, gaps, segs))
}

/// A tiny deterministic generator (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

struct Gen {
    ops: Vec<Op>,
    next: u64,
}
impl Gen {
    fn alloc(&mut self, size: usize) -> u64 {
        self.alloc_on(size, 0)
    }
    fn alloc_on(&mut self, size: usize, stream: u64) -> u64 {
        self.next += 1;
        self.ops.push(Op::Alloc {
            id: self.next,
            size,
            stream,
        });
        self.next
    }
    fn free(&mut self, id: u64) {
        self.ops.push(Op::Free { id });
    }
}

fn synthetic(name: &str, seed: u64) -> Vec<Op> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut g = Gen {
        ops: Vec::new(),
        next: 0,
    };
    match name {
        // A 24-layer transformer trained with a batch that changes every step: forward
        // keeps each layer's activations (sized by tokens) and frees temporaries; backward
        // frees them in reverse while gradients come and go; weights and their gradient
        // buffers persist.
        "training" => {
            let hidden = 2048usize;
            let layers = 24;
            let weights: Vec<u64> = (0..layers)
                .map(|_| g.alloc(12 * hidden * hidden * 2))
                .collect();
            let grads: Vec<u64> = (0..layers)
                .map(|_| g.alloc(12 * hidden * hidden * 2))
                .collect();
            for _step in 0..60 {
                let tokens = r.range(256, 8192) as usize;
                let act = tokens * hidden * 2;
                let mut saved = Vec::new();
                for _ in 0..layers {
                    let qkv = g.alloc(3 * act);
                    let scores = g.alloc(tokens.min(2048) * tokens.min(2048) * 2 * 16 / 8);
                    let mlp = g.alloc(4 * act);
                    g.free(scores);
                    saved.push((qkv, mlp, g.alloc(act)));
                }
                let loss = g.alloc(tokens * 4);
                for (qkv, mlp, out) in saved.into_iter().rev() {
                    let d_out = g.alloc(act);
                    let d_mlp = g.alloc(4 * act);
                    g.free(mlp);
                    g.free(d_mlp);
                    let d_qkv = g.alloc(3 * act);
                    g.free(qkv);
                    g.free(d_qkv);
                    g.free(out);
                    g.free(d_out);
                }
                g.free(loss);
            }
            for id in weights.into_iter().chain(grads) {
                g.free(id);
            }
        }
        // Data-parallel training as PyTorch runs it: fp16 weights with fp32 master copies
        // and Adam state made at the first step; every other step recomputes its
        // activations (checkpointing); gradients made as backward reaches each weight and
        // freed by zero_grad(set_to_none); 25 MB all-reduce buckets made and freed on a
        // communication stream (1) while backward goes on; the next batch copied in on a
        // side stream (2); the optimizer's per-weight fp32 temporaries.
        "ddp" => {
            let hidden = 2048usize;
            let layers = 16;
            let mut shapes = vec![32000 * hidden * 2];
            for _ in 0..layers {
                let h2 = hidden * hidden * 2;
                shapes.extend([3 * h2, h2, 4 * h2, 4 * h2, hidden * 2, hidden * 2]);
            }
            let weights: Vec<u64> = shapes.iter().map(|s| g.alloc(*s)).collect();
            let master: Vec<u64> = shapes.iter().map(|s| g.alloc(2 * s)).collect();
            let mut adam: Vec<u64> = Vec::new();
            let mut batch = g.alloc_on(8 * 4096 * 8, 2);
            for step in 0..40 {
                let tokens = r.range(256, 4096) as usize;
                let act = tokens * hidden * 2;
                let ckpt = step % 2 == 1;
                let mut saved = Vec::new();
                for _ in 0..layers {
                    let mut a: Vec<u64> = [1, 3, 1, 4, 4, 1]
                        .iter()
                        .map(|k| g.alloc(k * act))
                        .collect();
                    if ckpt {
                        let keep = a.pop().expect("six");
                        for x in a.drain(..) {
                            g.free(x);
                        }
                        a.push(keep);
                    }
                    saved.push(a);
                }
                let next = g.alloc_on(8 * 4096 * 8, 2);
                let logits = g.alloc(tokens * 32000 * 2);
                let dlogits = g.alloc(tokens * 32000 * 2);
                g.free(logits);
                let (mut grads, mut buckets, mut fill) = (Vec::new(), Vec::new(), 0usize);
                for l in (0..layers).rev() {
                    let redo: Vec<u64> = if ckpt {
                        [1, 3, 1, 4, 4].iter().map(|k| g.alloc(k * act)).collect()
                    } else {
                        Vec::new()
                    };
                    let d = g.alloc(4 * act);
                    for k in (0..6).rev() {
                        let size = shapes[1 + l * 6 + k];
                        grads.push(g.alloc(size));
                        fill += size;
                        if fill >= 25_000_000 {
                            buckets.push(g.alloc_on(fill, 1));
                            fill = 0;
                        }
                    }
                    g.free(d);
                    for x in saved.pop().into_iter().flatten().chain(redo) {
                        g.free(x);
                    }
                    if buckets.len() > 2 {
                        g.free(buckets.remove(0));
                    }
                }
                grads.push(g.alloc(shapes[0]));
                g.free(dlogits);
                for b in buckets {
                    g.free(b);
                }
                g.free(batch);
                batch = next;
                if adam.is_empty() {
                    adam = shapes
                        .iter()
                        .flat_map(|s| [2 * s, 2 * s])
                        .map(|s| g.alloc(s))
                        .collect();
                }
                for s in &shapes {
                    let tmp = g.alloc(2 * s);
                    g.free(tmp);
                }
                for x in grads {
                    g.free(x);
                }
            }
            g.free(batch);
            for id in weights.into_iter().chain(master).chain(adam) {
                g.free(id);
            }
        }
        // LLM serving: requests arrive and leave; each holds a KV cache that grows in
        // 16-token pages as it decodes; each step makes logits and temporaries.
        "serving" => {
            let page = 16 * 2 * 32 * 4096 * 2 / 8; // 16 tokens of K and V, 32 layers, fp16, 8-way split
            let mut reqs: Vec<Vec<u64>> = Vec::new();
            for _step in 0..3000 {
                if reqs.len() < 64 && r.range(0, 3) == 0 {
                    let prompt_pages = r.range(1, 64) as usize;
                    reqs.push((0..prompt_pages).map(|_| g.alloc(page)).collect());
                }
                let batch = reqs.len().max(1);
                let logits = g.alloc(batch * 32000 * 4);
                let tmp = g.alloc(batch * 4096 * 2 * r.range(1, 4) as usize);
                for req in reqs.iter_mut() {
                    if r.range(0, 15) == 0 {
                        req.push(g.alloc(page));
                    }
                }
                g.free(tmp);
                g.free(logits);
                if !reqs.is_empty() && r.range(0, 20) == 0 {
                    let i = r.range(0, reqs.len() as u64 - 1) as usize;
                    for id in reqs.swap_remove(i) {
                        g.free(id);
                    }
                }
            }
            for id in reqs.into_iter().flatten() {
                g.free(id);
            }
        }
        // Log-uniform sizes from 512 B to 256 MiB, random lifetimes.
        "random" => {
            let mut live: Vec<u64> = Vec::new();
            for _ in 0..40_000 {
                if !live.is_empty() && (live.len() > 400 || r.range(0, 1) == 0) {
                    let i = r.range(0, live.len() as u64 - 1) as usize;
                    g.free(live.swap_remove(i));
                } else {
                    let bits = r.range(9, 28);
                    let size = r.range(1 << (bits - 1), 1 << bits) as usize;
                    live.push(g.alloc(size));
                }
            }
            for id in live {
                g.free(id);
            }
        }
        _ => usage(),
    }
    g.ops
}

fn write_trace(path: &str, ops: &[Op]) -> std::io::Result<()> {
    let mut out = String::from("action,addr,size,stream,time_us\n");
    let mut sizes = HashMap::new();
    for (t, op) in ops.iter().enumerate() {
        match *op {
            Op::Alloc { id, size, stream } => {
                sizes.insert(id, size);
                out += &format!("alloc,{id},{size},{stream},{t}\n");
            }
            Op::Free { id } => out += &format!("free_completed,{id},{},0,{t}\n", sizes[&id]),
        }
    }
    std::fs::write(path, out)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// What one replay of the trace through one pool measured.
struct Run {
    backend: &'static str,
    expandable: bool,
    stats: PoolStats,
    alloc_ns: Vec<u64>,
    free_ns: Vec<u64>,
    wall_s: f64,
    /// Driver calls over the whole trace and over its second half (simulator only).
    driver: Option<(DriverStats, DriverStats)>,
    /// The first failure, if the replay stopped there.
    failed: Option<String>,
}

/// The trace's peak of live requested bytes, overall and over its first half.
fn trace_peaks(ops: &[Op]) -> (usize, usize) {
    let mut sizes = HashMap::new();
    let (mut cur, mut peak, mut first_half) = (0usize, 0usize, 0usize);
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Alloc { id, size, .. } => {
                sizes.insert(id, size);
                cur += size;
            }
            Op::Free { id } => cur -= sizes.remove(&id).unwrap_or(0),
        }
        peak = peak.max(cur);
        if i < ops.len() / 2 {
            first_half = peak;
        }
    }
    (peak, first_half)
}

fn replay(ops: &[Op], backend: Option<BackendKind>, cfg: PoolConfig, clock: u64) -> Run {
    let mut b = Manager::builder();
    if let Some(k) = backend {
        b = b.backend(k);
    }
    let mgr = b.build().unwrap_or_else(|e| {
        eprintln!("replay: {e}");
        std::process::exit(1)
    });
    let pool = mgr.device_pool(0, cfg).unwrap_or_else(|e| {
        eprintln!("replay: {e}");
        std::process::exit(1)
    });
    let driver_now = || mgr.sim().map(|s| s.stats().driver);
    let start = driver_now();
    let mut half = None;
    let mut streams: HashMap<u64, Stream> = HashMap::new();
    let mut live = HashMap::new();
    let mut alloc_ns = Vec::with_capacity(ops.len());
    let mut free_ns = Vec::with_capacity(ops.len());
    let mut failed = None;
    let wall = Instant::now();
    for (i, op) in ops.iter().enumerate() {
        if i == ops.len() / 2 {
            half = driver_now();
        }
        match *op {
            Op::Alloc { id, size, stream } => {
                let s = streams
                    .entry(stream)
                    .or_insert_with(|| mgr.create_stream(0).expect("stream"))
                    .clone();
                let t = Instant::now();
                let blk = pool.alloc(size, &s);
                alloc_ns.push((t.elapsed().as_nanos() as u64).saturating_sub(clock));
                match blk {
                    Ok(blk) => {
                        live.insert(id, blk);
                    }
                    Err(e) => {
                        failed = Some(format!("allocation {i} of {size} bytes failed: {e}"));
                        break;
                    }
                }
            }
            Op::Free { id } => {
                let blk = live.remove(&id).expect("trace frees what it allocated");
                let t = Instant::now();
                drop(blk);
                free_ns.push((t.elapsed().as_nanos() as u64).saturating_sub(clock));
            }
        }
    }
    let wall_s = wall.elapsed().as_secs_f64();
    let stats = pool.stats();
    let end = driver_now();
    drop(live);
    alloc_ns.sort_unstable();
    free_ns.sort_unstable();
    let driver = match (start, half, end) {
        (Some(s), Some(h), Some(e)) => Some((e.since(&s), e.since(&h))),
        _ => None,
    };
    Run {
        backend: mgr.backend_kind().name(),
        expandable: pool.expandable(),
        stats,
        alloc_ns,
        free_ns,
        wall_s,
        driver,
        failed,
    }
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e4).round() / 100.0
}

/// `{"create": n, ...}` for the kinds with calls.
fn calls_json(d: &DriverStats) -> serde_json::Value {
    d.by_kind()
        .map(|(k, n, _)| (k.name().to_string(), json!(n)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn main() {
    let args = parse_args();
    // HETMEM_LOG=debug (an EnvFilter) shows the library's tracing on stderr.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("HETMEM_LOG"))
        .with_writer(std::io::stderr)
        .try_init();
    let (name, (ops, gaps, segs)) = match (&args.trace, &args.synthetic) {
        (Some(path), _) => (
            path.clone(),
            read_trace(path).unwrap_or_else(|e| {
                eprintln!("replay: {e}");
                std::process::exit(1)
            }),
        ),
        (_, Some(s)) => (
            format!("synthetic:{s}:seed{}", args.seed),
            (
                synthetic(s, args.seed),
                TraceGaps::default(),
                Segments::default(),
            ),
        ),
        _ => usage(),
    };
    if gaps.unknown_frees + gaps.implicit_frees > 0 {
        eprintln!(
            "replay: {name}: skipped {} frees of addresses never allocated, freed {} \
             addresses allocated again before their recorded free",
            gaps.unknown_frees, gaps.implicit_frees
        );
    }
    if let Some(p) = &args.write_trace {
        write_trace(p, &ops).unwrap_or_else(|e| {
            eprintln!("replay: {p}: {e}");
            std::process::exit(1)
        });
    }
    let (trace_peak, first_half_peak) = trace_peaks(&ops);
    let budget = match (args.budget, args.budget_x) {
        (Some(b), _) => Some(b),
        (_, Some(f)) => Some((trace_peak as f64 * f) as usize),
        _ => None,
    };
    let cfg = PoolConfig {
        budget: budget.map_or(Budget::Device, Budget::Bytes),
        expandable_segments: args.expandable,
        release_on_grow: args.release_on_grow,
        reserve_slack: args.slack,
        min_chunk: args
            .min_chunk_mib
            .map_or(PoolConfig::default().min_chunk, |m| m << 20),
        chunk_fraction: args
            .chunk_fraction
            .unwrap_or(PoolConfig::default().chunk_fraction),
        grow_ahead: args.grow_ahead.unwrap_or(PoolConfig::default().grow_ahead),
        max_chunk: args.max_chunk_mib.map(|m| m << 20),
        ..PoolConfig::default()
    };

    // The cost of reading the clock twice, to take out of every sample.
    let clock = {
        let mut v: Vec<u64> = (0..10_000)
            .map(|_| {
                let t = Instant::now();
                t.elapsed().as_nanos() as u64
            })
            .collect();
        v.sort_unstable();
        v[v.len() / 2]
    };

    let run = replay(&ops, args.backend, cfg.clone(), clock);
    // PyTorch's driver time for the trace: its own segments where the trace has them,
    // else this pool with plain segments (PyTorch's segment sizes), on a fresh simulator.
    let model = DriverCosts::default();
    let (pytorch_ns, pytorch_source, plain) = if !segs.allocs.is_empty() {
        let ns = segs
            .allocs
            .iter()
            .map(|s| model.ns(DriverCall::MemAlloc, *s))
            .chain(segs.frees.iter().map(|s| model.ns(DriverCall::MemFree, *s)))
            .sum::<u64>();
        (Some(ns), "trace segment rows", None)
    } else if run.driver.is_some() && args.expandable {
        let plain_cfg = PoolConfig {
            expandable_segments: false,
            ..cfg.clone()
        };
        let p = replay(&ops, Some(BackendKind::Sim), plain_cfg, clock);
        let ns = p.driver.map(|(all, _)| all.memory_ns());
        (ns, "plain segments", Some(p))
    } else {
        (None, "none", None)
    };

    let st = &run.stats;
    let peak_alloc = st.requested_bytes.all.peak;
    let peak_reserved = st.reserved_bytes.all.peak;
    let ratio = if peak_alloc > 0 {
        peak_reserved as f64 / peak_alloc as f64
    } else {
        0.0
    };
    let (all, steady) = match &run.driver {
        Some((a, h)) => (Some(*a), Some(*h)),
        None => (None, None),
    };
    let report = json!({
        "trace": name,
        "backend": run.backend,
        "expandable_segments": run.expandable,
        "release_on_grow": args.release_on_grow,
        "budget": budget,
        "events": ops.len(),
        "trace_unknown_frees": gaps.unknown_frees,
        "trace_implicit_frees": gaps.implicit_frees,
        "trace_peak_allocated": trace_peak,
        "steady_alloc_growth": if first_half_peak > 0 {
            ((trace_peak as f64 / first_half_peak as f64 - 1.0) * 1e4).round() / 1e4
        } else { 0.0 },
        "failed": run.failed,
        "peak_allocated": peak_alloc,
        "peak_allocated_rounded": st.allocated_bytes.all.peak,
        "peak_reserved": peak_reserved,
        "reserved_over_allocated": (ratio * 10000.0).round() / 10000.0,
        "alloc_ns_median": percentile(&run.alloc_ns, 0.5),
        "alloc_ns_p99": percentile(&run.alloc_ns, 0.99),
        "free_ns_median": percentile(&run.free_ns, 0.5),
        "free_ns_p99": percentile(&run.free_ns, 0.99),
        "clock_overhead_ns": clock,
        "num_alloc_retries": st.num_alloc_retries,
        "num_ooms": st.num_ooms,
        "num_device_alloc": st.num_device_alloc,
        "num_device_free": st.num_device_free,
        "num_pages_moved": st.num_pages_moved,
        "num_sync_all_streams": st.num_sync_all_streams,
        "driver_calls": all.as_ref().map(calls_json),
        "driver_ms": all.as_ref().map(|d| ms(d.memory_ns())),
        "event_ms": all.as_ref().map(|d| ms(d.total().1 - d.memory_ns())),
        "steady_driver_calls": steady.as_ref().map(calls_json),
        "steady_driver_ms": steady.as_ref().map(|d| ms(d.memory_ns())),
        "pytorch_driver_ms": pytorch_ns.map(ms),
        "pytorch_driver_source": pytorch_source,
        "plain_reserved_over_allocated": plain.as_ref().map(|p| {
            let a = p.stats.requested_bytes.all.peak.max(1) as f64;
            (p.stats.reserved_bytes.all.peak as f64 / a * 1e4).round() / 1e4
        }),
        "plain_driver_calls": plain.as_ref().and_then(|p| p.driver.as_ref().map(|d| calls_json(&d.0))),
        "wall_s": (run.wall_s * 1000.0).round() / 1000.0,
    });
    if args.json {
        println!("{report}");
    } else {
        println!("trace              {name}");
        println!(
            "backend            {} (expandable segments: {})",
            report["backend"], report["expandable_segments"]
        );
        println!("events             {}", ops.len());
        println!(
            "peak allocated     {:.1} MiB",
            peak_alloc as f64 / 1048576.0
        );
        println!(
            "peak reserved      {:.1} MiB",
            peak_reserved as f64 / 1048576.0
        );
        println!("reserved/allocated {ratio:.4}");
        println!(
            "alloc ns           median {}  p99 {}",
            report["alloc_ns_median"], report["alloc_ns_p99"]
        );
        println!(
            "free ns            median {}  p99 {}",
            report["free_ns_median"], report["free_ns_p99"]
        );
        println!(
            "driver calls       {} (modelled {} ms; second half {}, {} ms; PyTorch {} ms from {})",
            report["driver_calls"],
            report["driver_ms"],
            report["steady_driver_calls"],
            report["steady_driver_ms"],
            report["pytorch_driver_ms"],
            pytorch_source
        );
    }
    if let Some(f) = &run.failed {
        eprintln!("replay: {f}");
        std::process::exit(1);
    }
}
