//! What the shim's tests share: the library cargo built, compilers, runs with and
//! without `LD_PRELOAD`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// `libhetmem_preload.so` of this build: cargo builds the package's cdylib into
/// `target/<profile>/deps` (and copies it up to `target/<profile>`) before the tests run.
pub fn shim() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let deps = exe.parent().expect("deps directory");
    for d in [deps, deps.parent().unwrap_or(deps)] {
        let p = d.join("libhetmem_preload.so");
        if p.is_file() {
            return p;
        }
    }
    panic!("libhetmem_preload.so is not next to {}", exe.display());
}

/// A scratch directory for this test binary.
pub fn scratch() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("preload");
    std::fs::create_dir_all(&d).expect("scratch directory");
    d
}

fn show(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Compiles `tests/c/<src>` into the scratch directory once per process; the binary.
pub fn build(src: &str, extra: &[&str]) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch();
    let name = src.replace('.', "_");
    let out = if extra.contains(&"-shared") {
        dir.join(format!("lib{}.so", src.trim_end_matches(".c")))
    } else {
        dir.join(&name)
    };
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(src);
    let fresh = out.metadata().and_then(|m| m.modified()).ok()
        >= source.metadata().and_then(|m| m.modified()).ok();
    if out.is_file() && fresh {
        return out;
    }
    let cpp = src.ends_with(".cpp");
    let compiler = if cpp { "c++" } else { "cc" };
    let o = Command::new(compiler)
        .args(["-O1", "-g", "-Wall", "-Wextra", "-Werror", "-pthread"])
        .arg(if cpp { "-std=c++17" } else { "-std=gnu11" })
        .args(extra)
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .args(if cpp { &[][..] } else { &["-ldl"][..] })
        .output()
        .unwrap_or_else(|e| panic!("{compiler}: {e} (CI installs gcc and g++)"));
    assert!(o.status.success(), "{}", show(compiler, &o));
    out
}

/// The ways a program is run: without the shim, and under it in each mode.
pub const MODES: &[(&str, &[(&str, &str)])] = &[
    ("no shim", &[]),
    ("default", &[]),
    ("mimalloc", &[("HETMEM_PRELOAD_SMALL", "mimalloc")]),
    (
        "record every allocation",
        &[
            ("HETMEM_RECORD", "%SCRATCH%/rec-%p.bin"),
            ("HETMEM_RECORD_ALL", "1"),
            ("HETMEM_RECORD_STACKS", "8"),
            ("HETMEM_RECORD_SAMPLE", "7"),
        ],
    ),
    (
        "64k threshold, bind:0, no cache",
        &[
            ("HETMEM_PRELOAD_THRESHOLD", "64k"),
            ("HETMEM_PRELOAD_POLICY", "bind:0"),
            ("HETMEM_PRELOAD_CACHE", "0"),
        ],
    ),
];

/// A command for `exe` in `mode` (index into [`MODES`]).
pub fn command(exe: &Path, mode: usize) -> Command {
    let mut c = Command::new(exe);
    for k in [
        "LD_PRELOAD",
        "HETMEM_PRELOAD_SMALL",
        "HETMEM_RECORD",
        "HETMEM_STATS",
        "HETMEM_PRELOAD_POLICY",
        "HETMEM_PRELOAD_THRESHOLD",
    ] {
        c.env_remove(k);
    }
    if mode > 0 {
        c.env("LD_PRELOAD", shim());
        let scratch = scratch();
        for (k, v) in MODES[mode].1 {
            c.env(k, v.replace("%SCRATCH%", &scratch.to_string_lossy()));
        }
    }
    c
}

/// Runs `c`, asserting exit 0 and an empty stderr; its stdout.
pub fn run_ok(what: &str, mut c: Command) -> String {
    let out = c.output().expect("run");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        show(what, &out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Once per process.
pub fn once<T: Send + Sync>(cell: &'static OnceLock<T>, f: impl FnOnce() -> T) -> &'static T {
    cell.get_or_init(f)
}
