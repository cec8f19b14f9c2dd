//! Fork after pinning: pins `--gib` GiB through the host pool (as an offload does),
//! forks, and reports what the fork cost and what the child got.
//!
//! ```text
//! cargo run --release --example fork_check -- --gib 1 --json
//! HETMEM_BACKEND=cuda ./fork_check --gib 8 --json                  # on a GPU host
//! HETMEM_BACKEND=cuda ./fork_check --gib 8 --json --no-dontfork    # the comparison
//! ```
//!
//! The NVIDIA driver pins with `FOLL_LONGTERM`, so without `MADV_DONTFORK` the kernel
//! copies every pinned page into the child at `fork()`: the fork takes long, the
//! child's RSS holds the whole region privately, and the machine's available memory
//! drops by as much. With it (hetmem's default) the region is not in the child at all.
//! `--no-dontfork` sets `HETMEM_DONTFORK=0` before hetmem starts. On the simulator (no
//! long-term pinning) the child shares the pages copy-on-write instead: its RSS counts
//! them as shared and little memory goes.
//!
//! The child waits, alive, while the parent reads `/proc/<child>/status` (VmRSS,
//! RssAnon) and `/proc/<child>/smaps_rollup` (Private_Dirty, Shared_Dirty) and
//! `/proc/meminfo` (MemAvailable); before that it calls hetmem once and sends back the
//! error, which should be `Error::Forked`. Last line with `--json`: one object with
//! `backend`, `gib`, `dontfork`, `pin_ms`, `fork_ms`, `child_vmrss_kib`,
//! `child_rss_anon_kib`, `child_private_dirty_kib`, `child_shared_dirty_kib`,
//! `mem_available_drop_kib`, `child_error`, `child_error_forked`, `child_exit`,
//! `parent_ok_after`.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Instant;

use hetmem::pool::HostPoolConfig;
use hetmem::{BackendKind, Error, Manager, NumaPolicy, Placement};
use serde_json::json;

fn usage() -> ! {
    eprintln!(
        "usage: fork_check [--gib G] [--backend cuda|rocm|sim|host] [--no-dontfork] [--json]"
    );
    std::process::exit(2)
}

fn fail(what: &str, e: &dyn std::fmt::Display) -> ! {
    eprintln!("fork_check: {what}: {e}");
    std::process::exit(1)
}

/// `field` (kB) of a `/proc` file of `Key: value kB` lines, in KiB.
fn kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn proc_kib(path: &str, field: &str) -> Option<u64> {
    kib(&std::fs::read_to_string(path).ok()?, field)
}

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2() writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        fail("pipe", &std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (r.into(), w.into())
}

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("HETMEM_LOG"))
        .with_writer(std::io::stderr)
        .try_init();
    let (mut gib, mut backend, mut dontfork, mut json_out) = (8.0f64, None, true, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--gib" => gib = val().parse().unwrap_or_else(|_| usage()),
            "--backend" => backend = Some(val().parse::<BackendKind>().unwrap_or_else(|_| usage())),
            "--no-dontfork" => dontfork = false,
            "--json" => json_out = true,
            _ => usage(),
        }
    }
    if !dontfork {
        // Read once, when hetmem first pins; nothing has yet, and no thread runs.
        std::env::set_var("HETMEM_DONTFORK", "0");
    }
    let mut b = Manager::builder();
    if let Some(k) = backend {
        b = b.backend(k);
    }
    let mgr = b.build().unwrap_or_else(|e| fail("manager", &e));
    let host = mgr
        .host_pool(HostPoolConfig::default())
        .unwrap_or_else(|e| fail("host pool", &e));
    let len = (gib * (1u64 << 30) as f64) as usize;
    let t = Instant::now();
    let mut block = host
        .alloc_pinned(&NumaPolicy::NearDevice(0), len)
        .unwrap_or_else(|e| fail("pinning", &e));
    let pin_ms = t.elapsed().as_secs_f64() * 1e3;
    block
        .as_mut_slice()
        .unwrap_or_else(|e| fail("fill", &e))
        .fill(0x5A);

    let avail_before = proc_kib("/proc/meminfo", "MemAvailable");
    let (mut err_r, mut err_w) = pipe();
    let (mut go_r, go_w) = pipe();
    std::io::stdout().flush().ok();
    let t = Instant::now();
    // SAFETY: the process has one thread here (the pool's threads were joined), so the
    // child may run anything; it leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    let fork_ms = t.elapsed().as_secs_f64() * 1e3;
    if pid < 0 {
        fail("fork", &std::io::Error::last_os_error());
    }
    if pid == 0 {
        // The child: one hetmem call, its error to the parent, then wait to be measured.
        drop(err_r);
        drop(go_w);
        let e = match mgr.alloc(Placement::Device(0), 1 << 20) {
            Ok(_) => "Ok (expected Error::Forked)".to_string(),
            Err(e @ Error::Forked { .. }) => format!("Forked: {e}"),
            Err(e) => format!("other: {e}"),
        };
        let _ = err_w.write_all(e.as_bytes());
        drop(err_w);
        let _ = go_r.read(&mut [0u8; 1]); // EOF when the parent is done
                                          // SAFETY: ends the child at once: no destructors of the parent's objects.
        unsafe { libc::_exit(0) };
    }
    drop(err_w);
    drop(go_r);
    let mut child_error = String::new();
    let _ = err_r.read_to_string(&mut child_error);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let avail_child = proc_kib("/proc/meminfo", "MemAvailable");
    drop(go_w);
    let mut wstatus = 0;
    // SAFETY: waits for our own child; `wstatus` is a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut wstatus, 0) };
    let child_exit = if libc::WIFEXITED(wstatus) {
        libc::WEXITSTATUS(wstatus)
    } else {
        -libc::WTERMSIG(wstatus)
    };

    // The parent carries on: its pinned bytes are intact and hetmem still works.
    let parent_ok_after = block
        .as_slice()
        .map(|s| s.iter().step_by(4096).all(|b| *b == 0x5A))
        .unwrap_or(false)
        && mgr
            .alloc(Placement::Pinned(NumaPolicy::Default), 1 << 20)
            .is_ok();
    drop(block);
    host.trim();

    let out = json!({
        "backend": mgr.backend_kind().name(),
        "gib": gib,
        "dontfork": dontfork,
        "pin_ms": pin_ms,
        "fork_ms": fork_ms,
        "child_vmrss_kib": kib(&status, "VmRSS"),
        "child_rss_anon_kib": kib(&status, "RssAnon"),
        "child_private_dirty_kib": kib(&rollup, "Private_Dirty"),
        "child_shared_dirty_kib": kib(&rollup, "Shared_Dirty"),
        "mem_available_drop_kib": avail_before.zip(avail_child).map(|(a, b)| a as i64 - b as i64),
        "child_error": child_error,
        "child_error_forked": child_error.starts_with("Forked"),
        "child_exit": child_exit,
        "parent_ok_after": parent_ok_after,
    });
    if json_out {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    }
    if !(out["child_error_forked"].as_bool() == Some(true) && child_exit == 0 && parent_ok_after) {
        std::process::exit(1);
    }
}
