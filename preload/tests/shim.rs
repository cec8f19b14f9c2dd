//! Placement proof (NUMA node of every page read back with `move_pages`, huge pages
//! from `/proc/PID/smaps`), bad configuration (one line, then the program runs as if the
//! shim were absent), the counters at exit and the event record.

mod common;

use std::process::Command;

use common::{build, command, run_ok, scratch, shim};

fn place(env: &[(&str, &str)]) -> (String, String, bool) {
    let exe = build("place.c", &[]);
    let mut c = command(&exe, if env.is_empty() { 0 } else { 1 });
    c.arg("64");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run place");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|w| w.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {out}"))
}

fn thp_possible() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| !s.contains("[never]"))
}

#[test]
fn bind_places_every_page_on_the_node_with_huge_pages() {
    let (out, err, ok) = place(&[("HETMEM_PRELOAD_POLICY", "bind:0")]);
    assert!(ok && err.is_empty(), "{out} {err}");
    let pages: usize = field(&out, "pages").parse().unwrap();
    assert_eq!(
        field(&out, "nodes"),
        format!("0:{pages},other:0"),
        "every page on node 0: {out}"
    );
    let huge: u64 = field(&out, "huge_kb").parse().unwrap();
    if thp_possible() {
        assert!(huge >= 32 << 10, "at least half in huge pages: {out}");
    }
    let (plain, _, ok) = place(&[]);
    assert!(ok);
    eprintln!("with the shim: {out}without: {plain}");
}

#[test]
fn bad_configuration_is_one_line_and_no_shim() {
    let (plain, _, _) = place(&[]);
    let plain_pages = field(&plain, "pages").to_owned();
    for (k, v) in [
        ("HETMEM_PRELOAD_POLICY", "bind:99"),
        ("HETMEM_PRELOAD_POLICY", "preferred:4096"),
        ("HETMEM_PRELOAD_POLICY", "everywhere"),
        ("HETMEM_PRELOAD_THRESHOLD", "2Q"),
        ("HETMEM_PRELOAD_SMALL", "tcmalloc"),
        ("HETMEM_PRELOAD_POLICY", "near-gpu:3"),
    ] {
        let (out, err, ok) = place(&[(k, v), ("HETMEM_STATS", "1")]);
        assert!(ok, "{k}={v}: {out} {err}");
        assert_eq!(err.lines().count(), 1, "{k}={v}: one line: {err}");
        assert!(
            err.starts_with(&format!("hetmem-preload: {k}={v}")) && err.contains("running without"),
            "{err}"
        );
        assert_eq!(field(&out, "pages"), plain_pages);
        // As if absent: glibc's own mmap, not advised (no stats either).
        assert!(!err.contains("large"), "{err}");
    }
}

#[test]
fn stats_at_exit_count_per_node() {
    let path = scratch().join("stats-%p.json");
    let (out, err, ok) = place(&[
        ("HETMEM_STATS", path.to_str().unwrap()),
        ("HETMEM_PRELOAD_POLICY", "bind:0"),
    ]);
    assert!(ok && err.is_empty(), "{out} {err}");
    // The file name carries the pid: take the newest.
    let newest = std::fs::read_dir(scratch())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("stats-"))
        .max_by_key(|e| e.metadata().unwrap().modified().unwrap())
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(newest.path()).unwrap()).unwrap();
    assert_eq!(v["policy"], "bind:0");
    let node0 = &v["large"]["nodes"]["0"];
    assert_eq!(node0["calls"], 1, "{v}");
    assert_eq!(node0["frees"], 1, "{v}");
    assert_eq!(node0["peak"], 64 << 20, "{v}");
    assert_eq!(node0["current"], 0, "{v}");
    assert!(v["small"]["calls"].as_u64().unwrap() >= 2, "{v}");
    // To stderr: a few lines.
    let (_, err, ok) = place(&[("HETMEM_STATS", "1")]);
    assert!(
        ok && err.contains("large: 0 B live, peak 64.0 MiB"),
        "{err}"
    );
}

#[test]
fn the_record_reads_back() {
    let exe = build("edge.c", &[]);
    let mut large_only = 0;
    for (all, stacks) in [(false, false), (true, true)] {
        let file = scratch().join(format!("rec-test-{all}.bin"));
        let mut c = Command::new(&exe);
        c.arg("realloc")
            .env("LD_PRELOAD", shim())
            .env("HETMEM_RECORD", &file)
            .env("HETMEM_RECORD_ALL", if all { "1" } else { "0" })
            .env("HETMEM_RECORD_STACKS", if stacks { "16" } else { "0" })
            .env("HETMEM_RECORD_SAMPLE", "1");
        run_ok("edge realloc, recorded", c);
        let f = std::fs::File::open(&file).unwrap();
        let (h, s) = hetmem::record::summarize(std::io::BufReader::new(f)).unwrap();
        assert_eq!(h.version, hetmem::record::VERSION);
        assert_eq!(h.threshold, 2 << 20);
        assert!(s.complete && s.dropped == 0, "{s:?}");
        assert!(s.allocs >= 3 && s.frees >= 3 && s.reallocs >= 3, "{s:?}");
        assert!(s.large_peak >= 64 << 20, "{s:?}");
        if all {
            assert!(s.allocs > large_only, "small ones too: {s:?}");
            assert!(s.stacks > 10, "{s:?}");
        } else {
            assert_eq!(s.stacks, 0);
            large_only = s.allocs;
        }
    }
}

#[test]
fn processes_a_program_starts_write_their_own_files() {
    let dir = scratch().join("tree");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rec = dir.join("rec.bin");
    let stats = dir.join("stats.json");
    let exe = build("place.c", &[]);
    // The program runs itself twice: three processes under the shim.
    let out = Command::new(&exe)
        .arg("spawn")
        .env("LD_PRELOAD", shim())
        .env("HETMEM_RECORD", &rec)
        .env("HETMEM_STATS", &stats)
        .env_remove("HETMEM_RECORD_OWNER")
        .env_remove("HETMEM_STATS_OWNER")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let recs = names.iter().filter(|n| n.starts_with("rec.bin")).count();
    let stats_files = names.iter().filter(|n| n.starts_with("stats.json")).count();
    assert_eq!((recs, stats_files), (3, 3), "{names:?}");
    for n in names.iter().filter(|n| n.starts_with("rec.bin")) {
        let f = std::fs::File::open(dir.join(n)).unwrap();
        let (_, s) = hetmem::record::summarize(std::io::BufReader::new(f)).unwrap();
        assert!(s.complete, "{n}: {s:?}");
    }
}
