//! The main job: stream a model larger than the device budget through the tier store,
//! pass after pass, and show how close it gets to the optimum and to the link.
//!
//! ```text
//! cargo run --release --example stream_layers                       # sim, 1 GiB model, 512 MiB budget
//! cargo run --release --example stream_layers -- --policy lru       # the same under LRU
//! cargo run --release --example stream_layers -- --model m.safetensors --budget-mib 4096 --json
//! HETMEM_BACKEND=cuda ./stream_layers --layers 32 --layer-mib 256 --budget-mib 4096 --json
//! ```
//!
//! It writes a synthetic safetensors model (`--layers` tensors of `--layer-mib`, or with
//! `--shape llama` a Llama-style decoder of `--layers` layers of about `--layer-mib`
//! each: an embedding, four attention and three MLP matrices and two norms per layer,
//! a head) unless `--model` names one, registers every tensor with a [`TierStore`]
//! (`--planner belady|static`) under a device budget smaller than the model, and runs
//! `--passes` passes: each acquires the tensors in forward order (a given file's own
//! order) on a compute stream, runs the tensor's kernel there, and releases it. On the
//! simulator the kernel is a declared time, in proportion to the tensor's bytes
//! (`--kernel-us` for a `--layer-mib` layer, default 20 µs: roughly a 128-token fp16
//! product with a 64 MiB layer on an H200) and times are virtual; the real backends
//! have no matrix product in hetmem yet, so there a pass is copies only and times are
//! wall-clock.
//!
//! Per pass it prints the bytes loaded for that pass, the optimum for the budget
//! (Belady's MIN with one layer fewer than fit, the layer being computed holding the
//! last; for unequal tensors only the bound model − budget), the effective rate
//! (bytes / pass time) against the pinned host-to-device rate measured at the start of
//! the same run, the overlap efficiency (max(copy time, compute time) / pass time, 1.0 =
//! perfect overlap) and the residency of every tensor (`D` on the device, `l` loading,
//! `h` pinned host, `.` cold). `--json` makes the last line one JSON object with the
//! steady-state (passes after the first) figures.

use std::time::{Duration, Instant};

use hetmem::tier::source::{write_safetensors, SafetensorsFile};
use hetmem::tier::{device_footprint, Planner, Residency, SequenceHint, TierConfig, TierStore};
use hetmem::tier::{lru_misses_per_pass, min_misses_each_pass, ParamId};
use hetmem::{BackendKind, Manager, NumaPolicy, Placement, Stream};
use serde_json::json;

const MIB: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PolicyArg {
    Sequence,
    Learn,
    Lru,
}

struct Args {
    backend: Option<BackendKind>,
    model: Option<String>,
    layers: usize,
    layer_mib: usize,
    budget_mib: usize,
    passes: usize,
    kernel_us: u64,
    policy: PolicyArg,
    checksums: bool,
    spare: usize,
    host_budget_mib: Option<usize>,
    shape: Shape,
    planner: Planner,
    json: bool,
}

/// The synthetic model's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `--layers` tensors of `--layer-mib` each.
    Uniform,
    /// A Llama-style decoder: an embedding, per layer four attention projections of
    /// hidden² (q, k, v, o), three MLP projections of hidden × 2.6875·hidden and two
    /// norms of hidden, then a final norm and the head, in forward order. The hidden
    /// size is chosen so that a decoder layer is about `--layer-mib` (386 gives Llama-7B's
    /// 4096), the vocabulary is 32000.
    Llama,
}

fn usage() -> ! {
    eprintln!(
        "usage: stream_layers [--backend sim|cuda|rocm] [--model FILE.safetensors] \
         [--layers N] [--layer-mib M] [--budget-mib B] [--passes P] [--kernel-us K] \
         [--policy sequence|learn|lru] [--spare S] [--host-budget-mib H] [--shape uniform|llama] \
         [--planner belady|static] [--checksums] [--json]"
    );
    std::process::exit(2)
}

fn parse() -> Args {
    let mut a = Args {
        backend: None,
        model: None,
        layers: 16,
        layer_mib: 64,
        budget_mib: 512,
        passes: 6,
        kernel_us: 20,
        policy: PolicyArg::Sequence,
        checksums: false,
        spare: 1,
        host_budget_mib: None,
        shape: Shape::Uniform,
        planner: Planner::Belady,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--backend" => a.backend = Some(val().parse().unwrap_or_else(|_| usage())),
            "--model" => a.model = Some(val()),
            "--layers" => a.layers = val().parse().unwrap_or_else(|_| usage()),
            "--layer-mib" => a.layer_mib = val().parse().unwrap_or_else(|_| usage()),
            "--budget-mib" => a.budget_mib = val().parse().unwrap_or_else(|_| usage()),
            "--passes" => a.passes = val().parse().unwrap_or_else(|_| usage()),
            "--kernel-us" => a.kernel_us = val().parse().unwrap_or_else(|_| usage()),
            "--policy" => {
                a.policy = match val().as_str() {
                    "sequence" => PolicyArg::Sequence,
                    "learn" => PolicyArg::Learn,
                    "lru" => PolicyArg::Lru,
                    _ => usage(),
                }
            }
            "--checksums" => a.checksums = true,
            "--spare" => a.spare = val().parse().unwrap_or_else(|_| usage()),
            "--host-budget-mib" => {
                a.host_budget_mib = Some(val().parse().unwrap_or_else(|_| usage()))
            }
            "--shape" => {
                a.shape = match val().as_str() {
                    "uniform" => Shape::Uniform,
                    "llama" => Shape::Llama,
                    _ => usage(),
                }
            }
            "--planner" => {
                a.planner = match val().as_str() {
                    "belady" => Planner::Belady,
                    "static" => Planner::Static,
                    _ => usage(),
                }
            }
            "--json" => a.json = true,
            _ => usage(),
        }
    }
    if a.layers == 0 || a.layer_mib == 0 || a.passes < 2 || a.spare == 0 {
        usage();
    }
    a
}

fn fail(e: &dyn std::fmt::Display) -> ! {
    eprintln!("stream_layers: {e}");
    std::process::exit(1)
}

/// A clock for the work queued on a stream: virtual on the simulator, the wall
/// elsewhere (after waiting for the stream).
struct Clock<'a> {
    mgr: &'a Manager,
    start: Instant,
}

impl Clock<'_> {
    fn now_ns(&self, s: &Stream) -> u64 {
        s.synchronize().unwrap_or_else(|e| fail(&e));
        match self.mgr.sim() {
            Some(sim) => sim.stream_time_ns(s.handle()).unwrap_or_else(|e| fail(&e)),
            None => self.start.elapsed().as_nanos() as u64,
        }
    }
}

/// Pinned host → device rate for copies of `chunk` bytes, back to back.
fn link_gbps(mgr: &Manager, clock: &Clock<'_>, chunk: usize) -> f64 {
    let run = || -> hetmem::Result<f64> {
        let src = mgr.alloc(Placement::Pinned(NumaPolicy::NearDevice(0)), chunk)?;
        let mut dst = mgr.alloc(Placement::Device(0), chunk)?;
        let s = mgr.create_stream(0)?;
        mgr.copy(&mut dst, 0, &src, 0, chunk, Some(&s))?; // warm-up
        let reps = ((1usize << 30) / chunk).clamp(4, 64);
        let t0 = clock.now_ns(&s);
        for _ in 0..reps {
            mgr.copy(&mut dst, 0, &src, 0, chunk, Some(&s))?;
        }
        let t1 = clock.now_ns(&s);
        Ok((reps * chunk) as f64 / (t1 - t0).max(1) as f64)
    };
    run().unwrap_or_else(|e| fail(&format!("measuring the link: {e}")))
}

fn picture(store: &TierStore, ids: &[ParamId]) -> String {
    ids.iter()
        .map(|id| match store.residency(*id) {
            Ok(Residency::Device { .. }) => 'D',
            Ok(Residency::Loading { .. }) => 'l',
            Ok(Residency::Host) => 'h',
            Ok(Residency::Cold) => '.',
            Err(_) => '?',
        })
        .collect()
}

/// The synthetic model's tensors (name, bytes), in the order a forward pass uses them.
fn synthetic(shape: Shape, layers: usize, layer_bytes: usize) -> Vec<(String, usize)> {
    match shape {
        Shape::Uniform => (0..layers)
            .map(|i| (format!("model.layers.{i}.weight"), layer_bytes))
            .collect(),
        Shape::Llama => {
            // fp16: a layer is (4 + 3 * 2.6875) * hidden^2 * 2 bytes = 24.125 * hidden^2.
            let h = ((layer_bytes as f64 / 24.125).sqrt() as usize / 64).max(1) * 64;
            let ffn = (h * 43).div_ceil(16).next_multiple_of(64);
            let mut t = vec![("model.embed_tokens.weight".to_string(), 32000 * h * 2)];
            for i in 0..layers {
                let l = format!("model.layers.{i}");
                t.push((format!("{l}.input_layernorm.weight"), h * 2));
                for p in ["q", "k", "v", "o"] {
                    t.push((format!("{l}.self_attn.{p}_proj.weight"), h * h * 2));
                }
                t.push((format!("{l}.post_attention_layernorm.weight"), h * 2));
                for p in ["gate", "up", "down"] {
                    t.push((format!("{l}.mlp.{p}_proj.weight"), h * ffn * 2));
                }
            }
            t.push(("model.norm.weight".to_string(), h * 2));
            t.push(("lm_head.weight".to_string(), 32000 * h * 2));
            t
        }
    }
}

fn main() {
    let args = parse();
    // HETMEM_LOG=debug (an EnvFilter) shows the library's tracing on stderr.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("HETMEM_LOG"))
        .with_writer(std::io::stderr)
        .try_init();
    let mut b = Manager::builder();
    if let Some(k) = args.backend {
        b = b.backend(k);
    }
    let mgr = b.build().unwrap_or_else(|e| fail(&e));
    let clock = Clock {
        mgr: &mgr,
        start: Instant::now(),
    };

    // The model: a file given, or a synthetic one written here (removed at the end).
    // The tensors in the order a pass uses them: a synthetic model's forward order, a
    // given file's own order.
    let (path, made, forward) = match &args.model {
        Some(p) => (std::path::PathBuf::from(p), false, None),
        None => {
            let p = std::env::temp_dir().join(format!(
                "hetmem-stream-layers-{}.safetensors",
                std::process::id()
            ));
            let tensors = synthetic(args.shape, args.layers, args.layer_mib * MIB);
            // Distinct bytes per tensor and per 8-byte word, written a word at a time.
            let data: Vec<Vec<u8>> = tensors
                .iter()
                .enumerate()
                .map(|(i, (_, len))| {
                    let mut d = vec![0u8; *len];
                    for (j, w) in d.chunks_mut(8).enumerate() {
                        let v = ((i as u64) << 48 | j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        w.copy_from_slice(&v.to_le_bytes()[..w.len()]);
                    }
                    d
                })
                .collect();
            let shapes: Vec<[usize; 1]> = tensors.iter().map(|(_, len)| [len / 2]).collect();
            let specs: Vec<_> = tensors
                .iter()
                .zip(&data)
                .zip(&shapes)
                .map(|(((n, _), d), sh)| (n.as_str(), "F16", &sh[..], d.as_slice()))
                .collect();
            write_safetensors(&p, &specs).unwrap_or_else(|e| fail(&e));
            let names: Vec<String> = tensors.into_iter().map(|(n, _)| n).collect();
            (p, true, Some(names))
        }
    };
    let file = SafetensorsFile::open(&path).unwrap_or_else(|e| fail(&e));
    let names: Vec<String> =
        forward.unwrap_or_else(|| file.tensors().iter().map(|t| t.name.clone()).collect());
    let sizes: Vec<usize> = names
        .iter()
        .map(|n| file.info(n).unwrap_or_else(|e| fail(&e)).len)
        .collect();
    let model_bytes: usize = sizes.iter().sum();
    let layer = *sizes
        .iter()
        .max()
        .unwrap_or_else(|| fail(&"the model has no tensors"));
    let equal = sizes.iter().all(|s| *s == layer);

    let link = link_gbps(&mgr, &clock, layer.min(256 * MIB));

    let budget = args.budget_mib * MIB;
    // By default the whole model fits the pinned tier (one host copy plus the ring);
    // less leaves the rest to stream from the mapped file through the staging ring.
    let host_budget = args
        .host_budget_mib
        .map_or(model_bytes + 64 * MIB, |h| h * MIB);
    let mut cfg = TierConfig::new(budget, host_budget);
    cfg.checksums = args.checksums;
    cfg.spare_slots = args.spare;
    cfg.planner = args.planner;
    let ids_in_order: Vec<ParamId> = (0..sizes.len() as ParamId).collect();
    cfg.sequence = match args.policy {
        PolicyArg::Sequence => SequenceHint::Given(ids_in_order.clone()),
        PolicyArg::Learn => SequenceHint::Learn,
        PolicyArg::Lru => SequenceHint::Lru,
    };
    let store = TierStore::new(&mgr, cfg).unwrap_or_else(|e| fail(&e));
    // Registered in pass order, so ids are 0, 1, ... in that order.
    let ids: Vec<ParamId> = names
        .iter()
        .map(|n| {
            file.source(n)
                .and_then(|src| store.register(n, src))
                .unwrap_or_else(|e| fail(&e))
        })
        .collect();
    debug_assert_eq!(ids, ids_in_order);
    drop(file); // the store holds the mapping while parameters are still cold
    let compute = mgr.create_stream(0).unwrap_or_else(|e| fail(&e));
    let sim = mgr.sim();
    let kernel = sim.map(|_| Duration::from_micros(args.kernel_us));
    // A tensor's kernel takes time in proportion to its bytes: a `--layer-mib` layer
    // takes `--kernel-us` (a matrix product reads each weight once).
    let kernels: Vec<Duration> = sizes
        .iter()
        .map(|&n| {
            kernel.map_or(Duration::ZERO, |k| {
                Duration::from_nanos(
                    (k.as_nanos() as f64 * n as f64 / (args.layer_mib * MIB) as f64) as u64,
                )
            })
        })
        .collect();

    // The optimum for equal layers: MIN over the loop with one slot fewer than fit, pass
    // by pass over the same passes (its steady passes differ by a layer now and then).
    // With more spare slots, the plan's own target: MIN with that many fewer.
    // C counts layers as the store does: above 1 MiB each takes whole 2 MiB pages.
    let fit = budget / device_footprint(layer);
    let optimum: Option<Vec<f64>> = equal.then(|| {
        min_misses_each_pass(&ids_in_order, fit.saturating_sub(args.spare), args.passes)
            .into_iter()
            .map(|m| (m * layer) as f64)
            .collect()
    });
    let optimum_steady = optimum
        .as_ref()
        .map(|o| o[1..].iter().sum::<f64>() / (args.passes - 1) as f64);
    // For unequal tensors no simple optimum is known; what was resident at the start of
    // a pass is at most the budget, so each pass loads at least the rest.
    let bound = model_bytes.saturating_sub(budget) as f64;
    let lru = equal.then(|| lru_misses_per_pass(&ids_in_order, fit, 10) * layer as f64);

    if !args.json {
        println!(
            "backend {}, model {} tensors, {:.0} MiB ({}), device budget {} MiB ({:.0}% of the \
             model, {fit} layers), policy {:?}",
            mgr.backend_kind().name(),
            sizes.len(),
            model_bytes as f64 / MIB as f64,
            if made { "synthetic" } else { "file" },
            args.budget_mib,
            budget as f64 * 100.0 / model_bytes as f64,
            args.policy,
        );
        if equal && device_footprint(layer) != layer.next_multiple_of(512) {
            println!(
                "each layer takes {:.1} MiB of the budget (whole 2 MiB pool pages): the \
                 optimum below is for {fit} layers",
                device_footprint(layer) as f64 / MIB as f64
            );
        }
        match kernel {
            Some(k) => println!(
                "kernel per layer: {} us (declared, virtual time)",
                k.as_micros()
            ),
            None => println!(
                "kernel per layer: none (no matrix product on this backend); wall-clock times"
            ),
        }
        println!("pinned host-to-device link: {link:.1} GB/s");
        if let (Some(o), Some(l)) = (optimum_steady, lru) {
            println!(
                "optimum per steady pass (MIN with {} slots): {:.0} MiB; LRU would move {:.0} MiB",
                fit.saturating_sub(args.spare),
                o / MIB as f64,
                l / MIB as f64
            );
        }
        println!("pass  moved MiB  optimum MiB  time ms   GB/s  of link  overlap  residency");
    }

    let served = |s: hetmem::tier::TierStats| s.bytes_loaded - s.bytes_ahead;
    let mut steady = (0u64, 0u64, 0.0f64, 0.0f64); // bytes, ns, copy ns, compute ns
                                                   // The simulator's driver calls over the steady passes (the first one warms up).
    let mut driver0 = None;
    for pass in 0..args.passes {
        if pass == 1 {
            driver0 = sim.map(|s| s.stats().driver);
        }
        let b0 = served(store.stats());
        let t0 = clock.now_ns(&compute);
        for (&id, &len) in ids.iter().zip(&sizes) {
            let g = store.acquire(id, &compute).unwrap_or_else(|e| fail(&e));
            if let Some(sim) = sim {
                sim.launch_kernel(compute.handle(), kernels[id as usize])
                    .unwrap_or_else(|e| fail(&e));
            }
            debug_assert_eq!(g.len(), len);
            drop(g);
        }
        let t1 = clock.now_ns(&compute);
        let moved = served(store.stats()) - b0;
        let ns = (t1 - t0).max(1);
        // Copy time at the measured link rate; compute time as declared.
        let copy_ns = moved as f64 / link;
        let compute_ns: f64 = kernels.iter().map(|k| k.as_nanos() as f64).sum();
        let overlap = copy_ns.max(compute_ns) / ns as f64;
        let gbps = moved as f64 / ns as f64;
        if pass > 0 {
            steady.0 += moved;
            steady.1 += ns;
            steady.2 += copy_ns;
            steady.3 += compute_ns;
        }
        if !args.json {
            println!(
                "{pass:>4}  {:>9.0}  {:>11}  {:>7.2}  {gbps:>5.1}  {:>6.1}%  {overlap:>7.3}  {}",
                moved as f64 / MIB as f64,
                optimum.as_ref().map_or_else(
                    || format!(">={:.0}", bound / MIB as f64),
                    |o| format!("{:.0}", o[pass] / MIB as f64)
                ),
                ns as f64 / 1e6,
                gbps * 100.0 / link,
                picture(&store, &ids),
            );
        }
    }
    let n = (args.passes - 1) as f64;
    let driver = match (driver0, sim) {
        (Some(d0), Some(s)) => Some(s.stats().driver.since(&d0)),
        _ => None,
    };
    let st = store.stats();
    let moved = steady.0 as f64 / n;
    let gbps = steady.0 as f64 / steady.1 as f64;
    let overlap = steady.2.max(steady.3) / steady.1 as f64;
    if made {
        let _ = std::fs::remove_file(&path);
    }
    if args.json {
        let report = json!({
            "backend": mgr.backend_kind().name(),
            "device": mgr.devices().first().map(|d| d.info.name.clone()),
            "policy": format!("{:?}", args.policy).to_lowercase(),
            "shape": if made { format!("{:?}", args.shape).to_lowercase() } else { "file".into() },
            "tensors": sizes.len(),
            "layers": sizes.len(),
            "model_bytes": model_bytes,
            "budget_bytes": budget,
            "layers_that_fit": fit,
            "passes": args.passes,
            "kernel_us": kernel.map(|k| k.as_micros() as u64),
            "spare_slots": args.spare,
            "planner": format!("{:?}", args.planner).to_lowercase(),
            "bytes_moved_per_pass": moved,
            "optimal_bytes_per_pass": optimum_steady,
            "lower_bound_bytes_per_pass": bound,
            "lru_bytes_per_pass": lru,
            "overlap_efficiency": overlap,
            "effective_gbps": gbps,
            "link_gbps": link,
            "fraction_of_link": gbps / link,
            "pass_ms": steady.1 as f64 / n / 1e6,
            "checksum_mismatches": st.checksum_mismatches,
            "host_peak_bytes": st.host_peak_bytes,
            "device_peak_bytes": st.device_peak_bytes,
            "hits": st.hits,
            "misses": st.misses,
            "prefetches": st.prefetches,
            "unplanned_evictions": st.unplanned_evictions,
            "pool_syncs": store.pool_stats().num_sync_all_streams,
            "driver_calls_per_pass": driver.map(|d| d.memory_calls() as f64 / n),
            "driver_ms_per_pass": driver.map(|d| d.memory_ns() as f64 / n / 1e6),
        });
        println!("{report}");
    } else {
        println!(
            "steady state: {:.0} MiB per pass (optimum {}), {gbps:.1} GB/s = {:.1}% of the \
             link, overlap {overlap:.3}; host peak {:.0} MiB (model {:.0} MiB), device peak \
             {:.0} MiB, checksum mismatches {}",
            moved / MIB as f64,
            optimum_steady.map_or_else(
                || format!(
                    "unknown for unequal tensors, at least {:.0} MiB",
                    bound / MIB as f64
                ),
                |o| format!("{:.0} MiB", o / MIB as f64)
            ),
            gbps * 100.0 / link,
            st.host_peak_bytes as f64 / MIB as f64,
            model_bytes as f64 / MIB as f64,
            st.device_peak_bytes as f64 / MIB as f64,
            st.checksum_mismatches,
        );
    }
}
