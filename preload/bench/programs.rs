//! The real programs run under the shim, shared by `tests/programs.rs` (small inputs)
//! and `examples/shim_bench.rs` (larger ones): python3 on an allocation-heavy script,
//! gcc compiling one of mimalloc's C files, git on this repository, sort of a large
//! file, sqlite3 where installed, and the multi-threaded allocator stress of
//! `bench/allocbench.c` (larson, xmalloc-test, cache-scratch, mixed sizes).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One program to run.
pub struct Prog {
    /// Its name in reports.
    pub name: String,
    /// The executable and arguments.
    pub argv: Vec<String>,
    /// A file for its standard input.
    pub stdin: Option<PathBuf>,
    /// Its working directory.
    pub cwd: PathBuf,
}

fn which(p: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(p))
        .find(|f| f.is_file())
}

/// The real python3 binary (not a pyenv shim script, which would run several
/// processes).
fn python() -> Option<String> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()?;
    let p = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!p.is_empty()).then_some(p)
}

/// Compiles `bench/allocbench.c` into `dir`.
pub fn allocbench(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/allocbench.c");
    let exe = dir.join("allocbench");
    let o = Command::new("cc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("cc (CI installs gcc)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    exe
}

/// Sets the programs up in `dir`; `heavy` for the benchmark's sizes.
pub fn prepare(dir: &Path, heavy: bool) -> Vec<Prog> {
    std::fs::create_dir_all(dir).expect("scratch directory");
    let mut out = Vec::new();
    let k = if heavy { 4 } else { 1 };
    let prog = |name: &str, argv: Vec<String>| Prog {
        name: name.to_owned(),
        argv,
        stdin: None,
        cwd: dir.to_path_buf(),
    };
    if let Some(py) = python() {
        let script = dir.join("alloc_heavy.py");
        std::fs::write(
            &script,
            format!(
                r#"import hashlib, json, random
random.seed(1)
N = {n}
d = {{str(i): [random.random() for _ in range(8)] for i in range(N)}}
s = json.dumps(d)
d2 = json.loads(s)
blobs = [bytearray(3 << 20) for _ in range({blobs})]
for b in blobs:
    b[-1] = 1
grow = bytearray()
for i in range({blobs}):
    grow += bytes(1 << 20)
words = sorted(("w%d" % ((i * 7919) % N)) * (1 + i % 5) for i in range(N * 3))
print(hashlib.sha256(s.encode()).hexdigest(), len(d2), len(words), sum(len(b) for b in blobs), len(grow))
"#,
                n = 20_000 * k,
                blobs = 8 * k
            ),
        )
        .expect("write the script");
        out.push(prog(
            "python3",
            vec![py, script.to_string_lossy().into_owned()],
        ));
    }
    if let Some(inc) = option_env!("HETMEM_MIMALLOC_INCLUDE") {
        let src = Path::new(inc).join("../src");
        let file = if heavy { "alloc.c" } else { "arena.c" };
        if src.join(file).is_file() {
            out.push(prog(
                "gcc",
                vec![
                    "gcc".into(),
                    "-O2".into(),
                    "-S".into(),
                    "-o".into(),
                    "-".into(),
                    format!("-I{inc}"),
                    src.join(file).to_string_lossy().into_owned(),
                ],
            ));
        }
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if which("git").is_some() && repo.join(".git").exists() {
        out.push(prog(
            "git",
            vec![
                "git".into(),
                "-C".into(),
                repo.to_string_lossy().into_owned(),
                "-c".into(),
                "core.pager=cat".into(),
                "log".into(),
                "--stat".into(),
                "-p".into(),
                "--no-color".into(),
                format!("-n{}", 60 * k),
                "HEAD".into(),
            ],
        ));
    }
    let lines = dir.join(format!("lines-{k}.txt"));
    if !lines.is_file() {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&lines).expect("lines"));
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..300_000 * k {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            writeln!(
                f,
                "{:016x} {} {}",
                x,
                i % 977,
                "abcdefghij".repeat((x % 6) as usize)
            )
            .expect("write");
        }
    }
    if which("sort").is_some() {
        out.push(prog(
            "sort",
            vec!["sort".into(), lines.to_string_lossy().into_owned()],
        ));
    }
    if which("sqlite3").is_some() {
        let sql = dir.join(format!("bench-{k}.sql"));
        std::fs::write(
            &sql,
            format!(
                "CREATE TABLE t(a INTEGER, b TEXT, c BLOB);\n\
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})\n\
                 INSERT INTO t SELECT i, printf('%08d-%s', (i * 7919) % 100003, hex(i)), zeroblob(i % 300) FROM n;\n\
                 CREATE INDEX tb ON t(b);\n\
                 SELECT count(*), sum(length(c)), min(b), max(b) FROM t;\n\
                 SELECT a % 13, count(*), group_concat(substr(b, 1, 3), '') IS NOT NULL FROM t GROUP BY a % 13 ORDER BY 1;\n",
                rows = 100_000 * k
            ),
        )
        .expect("sql");
        let mut p = prog("sqlite3", vec!["sqlite3".into(), ":memory:".into()]);
        p.stdin = Some(sql);
        out.push(p);
    }
    let ab = allocbench(dir).to_string_lossy().into_owned();
    for (b, scale) in [
        ("larson", 3),
        ("xmalloc", 3),
        ("cscratch", 100),
        ("mixed", 1),
    ] {
        out.push(prog(
            &format!("allocbench {b}"),
            vec![
                ab.clone(),
                b.into(),
                "2".into(),
                (scale * k * if heavy { 3 } else { 1 }).to_string(),
            ],
        ));
    }
    out
}
