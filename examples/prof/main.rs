//! `prof`: hetmem's profiling tools over event records (`HETMEM_PROFILE=file` for the
//! library, `HETMEM_RECORD=file` for the LD_PRELOAD shim; several files of one run are
//! merged by time).
//!
//! ```text
//! cargo run --release --example prof -- record [-o run.hrec] [--stacks N] [--no-shim] -- CMD ARGS...
//! cargo run --release --example prof -- report FILE... [--json] [--top N]
//! cargo run --release --example prof -- perfetto FILE... -o trace.json [--from S] [--to S] [--points N]
//! cargo run --release --example prof -- snapshot FILE... -o snapshot.pickle [--from S] [--to S] [--max-entries N]
//! cargo run --release --example prof -- plot FILE... -o memory.svg|memory.html [--from S] [--to S]
//! cargo run --release --example prof -- top [--interval-ms N] [--iterations N]
//! cargo run --release --example prof -- synth -o big.hrec [--events N]
//! ```

/// `println!` that ignores a closed stdout (`prof report | head`) instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

/// `print!` that ignores a closed stdout.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($t)*);
    }};
}

mod input;
mod perfetto;
mod plot;
mod report;
mod series;
mod snapshot;
mod synth;
mod top;

use std::path::PathBuf;
use std::time::Duration;

const USAGE: &str = "usage: prof record [-o FILE] [--stacks N] [--no-shim] -- CMD ARGS...
       prof report FILE... [--json] [--top N]
       prof perfetto FILE... -o trace.json [--from S] [--to S] [--points N] [--resolution-us U]
       prof snapshot FILE... -o snapshot.pickle [--from S] [--to S] [--max-entries N]
       prof plot FILE... -o memory.svg|memory.html [--from S] [--to S]
       prof top [--interval-ms N] [--iterations N]
       prof synth -o FILE [--events N]   (a synthetic record, for scale tests)";

struct Args {
    files: Vec<String>,
    out: Option<String>,
    from_ns: u64,
    to_ns: u64,
    json: bool,
    top: usize,
    points: u64,
    resolution_ns: u64,
    max_entries: usize,
    interval_ms: u64,
    iterations: Option<u64>,
    stacks: u32,
    no_shim: bool,
    events: u64,
    cmd: Vec<String>,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        files: Vec::new(),
        out: None,
        from_ns: 0,
        to_ns: u64::MAX,
        json: false,
        top: 10,
        points: 5000,
        resolution_ns: 0,
        max_entries: 100_000,
        interval_ms: 1000,
        iterations: None,
        stacks: 0,
        no_shim: false,
        events: 10_000_000,
        cmd: Vec::new(),
    };
    let secs = |v: Option<String>, k: &str| -> Result<u64, String> {
        let v = v.ok_or(format!("{k} needs a value"))?;
        let s: f64 = v
            .parse()
            .map_err(|_| format!("{k} {v}: not a number of seconds"))?;
        Ok((s * 1e9).max(0.0) as u64)
    };
    let num = |v: Option<String>, k: &str| -> Result<u64, String> {
        let v = v.ok_or(format!("{k} needs a value"))?;
        v.parse().map_err(|_| format!("{k} {v}: not a number"))
    };
    while let Some(x) = it.next() {
        match x.as_str() {
            "-o" | "--output" => a.out = Some(it.next().ok_or("-o needs a file")?),
            "--from" => a.from_ns = secs(it.next(), "--from")?,
            "--to" => a.to_ns = secs(it.next(), "--to")?,
            "--json" => a.json = true,
            "--top" => a.top = num(it.next(), "--top")? as usize,
            "--points" => a.points = num(it.next(), "--points")?,
            "--resolution-us" => a.resolution_ns = num(it.next(), "--resolution-us")? * 1000,
            "--max-entries" => a.max_entries = num(it.next(), "--max-entries")?.max(1) as usize,
            "--interval-ms" => a.interval_ms = num(it.next(), "--interval-ms")?,
            "--iterations" => a.iterations = Some(num(it.next(), "--iterations")?),
            "--stacks" => a.stacks = num(it.next(), "--stacks")? as u32,
            "--no-shim" => a.no_shim = true,
            "--events" => a.events = num(it.next(), "--events")?,
            "--" => {
                a.cmd = it.by_ref().collect();
            }
            "-h" | "--help" => return Err(USAGE.into()),
            f if f.starts_with('-') => return Err(format!("unknown option {f}\n{USAGE}")),
            f => a.files.push(f.to_owned()),
        }
    }
    if a.from_ns > a.to_ns {
        return Err("--from is after --to".into());
    }
    Ok(a)
}

/// The shim library next to this example's binary (target/<profile>/), or
/// `HETMEM_PRELOAD_LIB`.
fn shim_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HETMEM_PRELOAD_LIB") {
        return Some(p.into());
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?;
    let p = dir.join("libhetmem_preload.so");
    p.exists().then_some(p)
}

fn record(a: &Args) -> Result<i32, String> {
    let (prog, rest) = a
        .cmd
        .split_first()
        .ok_or(format!("record: no command after --\n{USAGE}"))?;
    let out = a.out.clone().unwrap_or_else(|| "hetmem.hrec".into());
    // Absolute: the program may change directory (launcher scripts do).
    let out = std::path::absolute(&out)
        .map_err(|e| format!("record: {out}: {e}"))?
        .display()
        .to_string();
    let shim_out = format!("{out}.shim");
    let mut cmd = std::process::Command::new(prog);
    cmd.args(rest)
        .env("HETMEM_PROFILE", &out)
        .env("HETMEM_STATS_PAGE", "1");
    if a.stacks > 0 {
        cmd.env("HETMEM_PROFILE_STACKS", a.stacks.to_string())
            .env("HETMEM_RECORD_STACKS", "8")
            .env("HETMEM_RECORD_SAMPLE", a.stacks.to_string());
    }
    let _ = std::fs::remove_file(&shim_out);
    let _ = std::fs::remove_file(&out);
    if !a.no_shim {
        let lib = shim_path().ok_or(
            "record: libhetmem_preload.so not found next to this binary; build it \
             (cargo build --release -p hetmem-preload), set HETMEM_PRELOAD_LIB, or pass --no-shim",
        )?;
        let mut pre = lib.display().to_string();
        if let Some(old) = std::env::var_os("LD_PRELOAD") {
            pre = format!("{pre}:{}", old.to_string_lossy());
        }
        cmd.env("LD_PRELOAD", pre).env("HETMEM_RECORD", &shim_out);
    }
    let status = cmd.status().map_err(|e| format!("record: {prog}: {e}"))?;
    let made: Vec<&str> = [out.as_str(), shim_out.as_str()]
        .into_iter()
        .filter(|p| std::path::Path::new(p).exists())
        .collect();
    eprintln!(
        "prof record: {prog} exited with {status}; records: {}",
        if made.is_empty() {
            "none (the program made no hetmem manager and the shim did not load)".into()
        } else {
            made.join(" ")
        }
    );
    Ok(status.code().unwrap_or(1))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let sub = args.next().unwrap_or_default();
    let a = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let need_files = |a: &Args| -> Result<(), String> {
        if a.files.is_empty() {
            Err(format!("{sub}: no record file\n{USAGE}"))
        } else {
            Ok(())
        }
    };
    let need_out = |a: &Args| {
        a.out
            .clone()
            .ok_or(format!("{sub}: -o FILE is needed\n{USAGE}"))
    };
    let res: Result<(), String> = (|| match sub.as_str() {
        "record" => {
            let code = record(&a)?;
            std::process::exit(code);
        }
        "report" => {
            need_files(&a)?;
            report::run(&a.files, a.json, a.top)
        }
        "perfetto" => {
            need_files(&a)?;
            let out = need_out(&a)?;
            let n = perfetto::run(
                &a.files,
                &out,
                &perfetto::Opts {
                    from_ns: a.from_ns,
                    to_ns: a.to_ns,
                    resolution_ns: a.resolution_ns,
                    points: a.points,
                },
            )?;
            eprintln!("prof perfetto: {n} trace events in {out} (open in ui.perfetto.dev)");
            Ok(())
        }
        "snapshot" => {
            need_files(&a)?;
            let out = need_out(&a)?;
            let what = snapshot::run(
                &a.files,
                &out,
                &snapshot::Opts {
                    from_ns: a.from_ns,
                    to_ns: a.to_ns,
                    max_entries: a.max_entries,
                },
            )?;
            eprintln!("prof snapshot: {out}: {what} (open in pytorch.org/memory_viz)");
            Ok(())
        }
        "plot" => {
            need_files(&a)?;
            let out = need_out(&a)?;
            plot::run(&a.files, &out, a.from_ns, a.to_ns)?;
            eprintln!("prof plot: {out}");
            Ok(())
        }
        "synth" => {
            let out = need_out(&a)?;
            synth::run(&out, a.events)
        }
        "top" => top::run(Duration::from_millis(a.interval_ms.max(50)), a.iterations),
        _ => Err(USAGE.into()),
    })();
    if let Err(e) = res {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
