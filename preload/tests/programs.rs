//! Real programs nobody here wrote give the same output (and exit status) under the
//! shim, in every mode, as without it: python3, gcc, git, sort, sqlite3 (where
//! installed) and the allocator stress programs. Small inputs: the timed comparison is
//! `examples/shim_bench.rs`.

mod common;
#[path = "../bench/programs.rs"]
mod programs;

use std::process::Stdio;

use common::{scratch, shim};

#[test]
fn same_output_with_and_without_the_shim() {
    let dir = scratch().join("programs");
    let progs = programs::prepare(&dir, false);
    let names: Vec<&str> = progs.iter().map(|p| p.name.as_str()).collect();
    eprintln!("programs: {names:?}");
    for must in ["python3", "git", "sort", "allocbench larson"] {
        assert!(names.contains(&must), "{must} is missing: {names:?}");
    }
    let modes: &[(&str, &[(&str, &str)])] = &[
        ("no shim", &[]),
        ("default", &[]),
        ("mimalloc", &[("HETMEM_PRELOAD_SMALL", "mimalloc")]),
        (
            "record every allocation",
            &[("HETMEM_RECORD_ALL", "1"), ("HETMEM_RECORD", "RECORD")],
        ),
        (
            "bind:0, 256k threshold",
            &[
                ("HETMEM_PRELOAD_POLICY", "bind:0"),
                ("HETMEM_PRELOAD_THRESHOLD", "256k"),
            ],
        ),
    ];
    for p in &progs {
        let mut reference = None;
        for (m, (mode, env)) in modes.iter().enumerate() {
            let mut c = std::process::Command::new(&p.argv[0]);
            c.args(&p.argv[1..]).current_dir(&p.cwd);
            c.env_remove("LD_PRELOAD").env("LC_ALL", "C");
            c.stdin(match &p.stdin {
                Some(f) => Stdio::from(std::fs::File::open(f).unwrap()),
                None => Stdio::null(),
            });
            if m > 0 {
                c.env("LD_PRELOAD", shim());
                for (k, v) in *env {
                    let v = v.replace("RECORD", &dir.join("rec-%p.bin").to_string_lossy());
                    c.env(k, v);
                }
            }
            let out = c.output().unwrap();
            let got = (out.status.code(), out.stdout.clone());
            assert!(
                out.status.success(),
                "{} ({mode}): {}\n{}",
                p.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            if m > 0 {
                assert!(
                    !String::from_utf8_lossy(&out.stderr).contains("hetmem-preload"),
                    "{} ({mode}): {}",
                    p.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            match &reference {
                None => reference = Some(got),
                Some(r) => assert!(
                    *r == got,
                    "{} ({mode}): output differs from the run without the shim ({} vs {} bytes)",
                    p.name,
                    r.1.len(),
                    got.1.len()
                ),
            }
        }
    }
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("rec-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
