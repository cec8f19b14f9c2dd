//! Wall time and peak RSS of real programs and allocator stress under the shim, side by
//! side in one run with no shim and with peer allocators preloaded the same way
//! (jemalloc, tcmalloc, mimalloc: Debian's `libjemalloc2`, `libtcmalloc-minimal4`,
//! `libmimalloc2.0`, where installed).
//!
//! ```sh
//! cargo build --release -p hetmem-preload
//! cargo run --release -p hetmem-preload --example shim_bench -- --runs 5 --json
//! ```
//!
//! Configurations: `glibc` (no shim), `hetmem` (defaults: glibc small path, large
//! blocks served, counters on), `hetmem-fast` (`HETMEM_PRELOAD_SMALL=mimalloc`),
//! `hetmem-record` (every allocation recorded), and the peers. Each program runs
//! `--runs` times per configuration, interleaved (configurations rotate each round);
//! the fastest wall time and CPU time (on a shared machine other work only adds time)
//! and the median peak RSS (`wait4`'s `ru_maxrss`, taken by the small launcher
//! `bench/measure.c`: the largest of the process and the children it waited for) are
//! reported as ratios to glibc, with
//! their geometric means. Every run's output must equal the glibc run's (else it
//! fails). `--light` uses the tests' small inputs; `--only NAME` runs programs whose
//! name contains NAME. The last line with `--json` is one JSON object.

#[path = "../bench/programs.rs"]
mod programs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

struct Config {
    name: &'static str,
    preload: Option<PathBuf>,
    env: Vec<(&'static str, String)>,
}

struct Sample {
    wall: f64,
    cpu: f64,
    rss_kb: u64,
}

fn shim() -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    for d in [dir.to_path_buf(), dir.join("deps")] {
        if d.join("libhetmem_preload.so").is_file() {
            return d.join("libhetmem_preload.so");
        }
    }
    panic!("build the shim first: cargo build --release -p hetmem-preload");
}

fn peer(name: &str) -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
    ]
    .iter()
    .map(|d| Path::new(d).join(name))
    .find(|p| p.is_file())
}

/// A hash of a file's bytes (outputs are compared by it, not kept in memory).
fn digest(path: &Path) -> u64 {
    use std::hash::Hasher;
    use std::io::Read;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut f = std::fs::File::open(path).expect("output");
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).expect("read output");
        if n == 0 {
            return h.finish();
        }
        h.write(&buf[..n]);
    }
}

fn run(measure: &Path, p: &programs::Prog, c: &Config, out: &Path) -> (Sample, u64) {
    let stat = out.with_extension("stat");
    let mut cmd = Command::new(measure);
    cmd.arg(&stat)
        .arg(c.preload.as_deref().unwrap_or(Path::new("-")))
        .args(&p.argv)
        .current_dir(&p.cwd);
    cmd.env_remove("LD_PRELOAD").env("LC_ALL", "C");
    for (k, _) in std::env::vars() {
        if k.starts_with("HETMEM_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in &c.env {
        cmd.env(k, v);
    }
    cmd.stdin(match &p.stdin {
        Some(f) => Stdio::from(std::fs::File::open(f).expect("stdin file")),
        None => Stdio::null(),
    });
    cmd.stdout(Stdio::from(std::fs::File::create(out).expect("out file")));
    cmd.stderr(Stdio::null());
    let st = cmd.status().expect("measure");
    assert!(st.success(), "measure: {st}");
    let text = std::fs::read_to_string(&stat).expect("stat file");
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        v.len() == 5 && v[0] == 0.0,
        "{} under {}: {text}",
        p.name,
        c.name
    );
    (
        Sample {
            wall: v[1],
            cpu: v[2] + v[3],
            rss_kb: v[4] as u64,
        },
        digest(out),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The fastest of the runs: on a shared machine other work only ever adds time.
fn best(v: Vec<f64>) -> f64 {
    v.into_iter().fold(f64::INFINITY, f64::min)
}

fn geomean(v: &[f64]) -> f64 {
    (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let light = args.iter().any(|a| a == "--light");
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let runs: usize = value("--runs").and_then(|v| v.parse().ok()).unwrap_or(3);
    let only = value("--only");
    let dir = std::env::temp_dir().join(format!("hetmem-shim-bench-{}", std::process::id()));
    let mut progs = programs::prepare(&dir, !light);
    if let Some(o) = &only {
        progs.retain(|p| p.name.contains(o.as_str()));
    }
    let lib = shim();
    let rec = dir.join("record.bin").to_string_lossy().into_owned();
    let mut configs = vec![
        Config {
            name: "glibc",
            preload: None,
            env: vec![],
        },
        Config {
            name: "hetmem",
            preload: Some(lib.clone()),
            env: vec![],
        },
        Config {
            name: "hetmem-fast",
            preload: Some(lib.clone()),
            env: vec![("HETMEM_PRELOAD_SMALL", "mimalloc".into())],
        },
        Config {
            name: "hetmem-record",
            preload: Some(lib.clone()),
            env: vec![
                ("HETMEM_RECORD", rec.clone()),
                ("HETMEM_RECORD_ALL", "1".into()),
            ],
        },
    ];
    for (name, file) in [
        ("jemalloc", "libjemalloc.so.2"),
        ("tcmalloc", "libtcmalloc_minimal.so.4"),
        ("mimalloc", "libmimalloc.so.2"),
    ] {
        if let Some(p) = peer(file) {
            configs.push(Config {
                name,
                preload: Some(p),
                env: vec![],
            });
        }
    }
    let mut samples: BTreeMap<(String, &str), Vec<Sample>> = BTreeMap::new();
    let mut reference: BTreeMap<String, u64> = BTreeMap::new();
    let measure = dir.join("measure");
    let o = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&measure)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/measure.c"))
        .output()
        .expect("cc");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut mismatches = Vec::new();
    let out = dir.join("stdout");
    for round in 0..runs {
        for p in &progs {
            for k in 0..configs.len() {
                let c = &configs[(k + round) % configs.len()];
                let (s, bytes) = run(&measure, p, c, &out);
                let _ = std::fs::remove_file(&rec);
                if c.name == "glibc" {
                    reference.entry(p.name.clone()).or_insert(bytes);
                }
                if let Some(r) = reference.get(&p.name) {
                    if *r != bytes {
                        mismatches.push(format!("{} under {}", p.name, c.name));
                    }
                }
                samples.entry((p.name.clone(), c.name)).or_default().push(s);
            }
        }
        eprintln!("round {} of {runs} done", round + 1);
    }
    // The glibc reference of a program is set in the first round only after its glibc
    // run; runs before it in that round are compared here.
    let mut table = BTreeMap::<&str, (Vec<f64>, Vec<f64>, Vec<f64>)>::new();
    let mut per_prog = Vec::new();
    println!(
        "{:<22} {:<14} {:>8} {:>8} {:>8} {:>10} {:>7}",
        "program", "config", "wall s", "x glibc", "cpu x", "peak RSS", "x glibc"
    );
    for p in &progs {
        let base = &samples[&(p.name.clone(), "glibc")];
        let bw = best(base.iter().map(|s| s.wall).collect());
        let bc = best(base.iter().map(|s| s.cpu).collect());
        let br = median(base.iter().map(|s| s.rss_kb as f64).collect());
        let mut cfgs = Vec::new();
        for c in &configs {
            let v = &samples[&(p.name.clone(), c.name)];
            let w = best(v.iter().map(|s| s.wall).collect());
            let cpu = best(v.iter().map(|s| s.cpu).collect());
            let r = median(v.iter().map(|s| s.rss_kb as f64).collect());
            let (wx, cx, rx) = (w / bw, cpu / bc.max(1e-3), r / br);
            println!(
                "{:<22} {:<14} {:>8.3} {:>8.3} {:>8.3} {:>7.0} KiB {:>7.3}",
                p.name, c.name, w, wx, cx, r, rx
            );
            let e = table.entry(c.name).or_default();
            e.0.push(wx);
            e.1.push(rx);
            e.2.push(cx);
            cfgs.push(format!(
                "\"{}\":{{\"wall_s\":{w:.4},\"cpu_s\":{cpu:.4},\"rss_kb\":{r:.0},\"wall_x\":{wx:.4},\"cpu_x\":{cx:.4},\"rss_x\":{rx:.4}}}",
                c.name
            ));
        }
        per_prog.push(format!("\"{}\":{{{}}}", p.name, cfgs.join(",")));
    }
    println!();
    let mut summary = Vec::new();
    let mut sums = BTreeMap::new();
    for c in &configs {
        let (w, r, cpu) = &table[c.name];
        let max = w.iter().cloned().fold(0.0, f64::max);
        let (gw, gr, gc) = (geomean(w), geomean(r), geomean(cpu));
        println!(
            "{:<14} geomean wall {gw:.3}x  cpu {gc:.3}x  peak RSS {gr:.3}x  slowest {max:.3}x",
            c.name
        );
        sums.insert(c.name, (gw, gr, max));
        summary.push(format!(
            "\"{}\":{{\"geomean_wall_x\":{gw:.4},\"geomean_cpu_x\":{gc:.4},\"geomean_rss_x\":{gr:.4},\"max_wall_x\":{max:.4}}}",
            c.name
        ));
    }
    let (hw, hr, hmax) = sums["hetmem"];
    let best_peer = ["jemalloc", "tcmalloc", "mimalloc"]
        .iter()
        .filter_map(|n| sums.get(n).map(|s| (*n, *s)))
        .min_by(|a, b| a.1 .0.total_cmp(&b.1 .0));
    let (fw, fr, _) = sums["hetmem-fast"];
    let (rw, _, _) = sums["hetmem-record"];
    println!("\ntargets:");
    println!("  defaults: geomean wall {hw:.3} (<= 1.03), peak RSS {hr:.3} (<= 1.05), slowest {hmax:.3} (<= 1.10)");
    if let Some((n, (pw, pr, _))) = best_peer {
        println!(
            "  fast small path: wall {fw:.3} vs best peer {n} {pw:.3}; peak RSS {fr:.3} vs {pr:.3}"
        );
    }
    println!("  recording every allocation: geomean wall {rw:.3} (<= 1.15)");
    if !mismatches.is_empty() {
        println!("OUTPUT MISMATCHES: {mismatches:?}");
    }
    if json {
        println!(
            "{{\"runs\":{runs},\"light\":{light},\"outputs_identical\":{},\"mismatches\":{:?},\"programs\":{{{}}},\"summary\":{{{}}},\"best_peer\":{:?}}}",
            mismatches.is_empty(),
            mismatches,
            per_prog.join(","),
            summary.join(","),
            best_peer.map(|b| b.0).unwrap_or("none")
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !mismatches.is_empty() {
        std::process::exit(1);
    }
}
