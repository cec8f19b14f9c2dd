//! Streams a mapped file to the device through the pinned staging ring, beside a plain
//! pinned host-to-device copy of the same size in the same run, and reports both rates.
//!
//! ```text
//! cargo run --release --example stream_file -- --gib 4            # makes a 4 GiB file
//! cargo run --release --example stream_file -- --file model.bin --json
//! HETMEM_BACKEND=cuda ./stream_file --gib 8 --json                 # on a GPU host
//! ```
//!
//! Wall-clock rates are what a program sees. On the simulator the link is virtual, so
//! it also reports the virtual rate (what the copy engine would sustain) next to it.

use std::io::Write;
use std::time::Instant;

use hetmem::pool::{HostPoolConfig, PoolConfig, StagingRing};
use hetmem::{Manager, NumaPolicy, Placement};
use serde_json::json;

fn main() {
    // HETMEM_LOG=debug (an EnvFilter) shows the library's tracing on stderr.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("HETMEM_LOG"))
        .with_writer(std::io::stderr)
        .try_init();
    let mut args = std::env::args().skip(1);
    let (mut gib, mut file, mut json_out, mut slot_mib, mut slots, mut threads) = (
        2.0f64,
        None::<String>,
        false,
        16usize,
        None::<usize>,
        None::<usize>,
    );
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--gib" => gib = val().parse().unwrap_or_else(|_| usage()),
            "--file" => file = Some(val()),
            "--slot-mib" => slot_mib = val().parse().unwrap_or_else(|_| usage()),
            "--slots" => slots = Some(val().parse().unwrap_or_else(|_| usage())),
            "--threads" => threads = Some(val().parse().unwrap_or_else(|_| usage())),
            "--json" => json_out = true,
            _ => usage(),
        }
    }
    // One memcpy stream fills about 10 GB/s from a mapped file: the link needs several,
    // each with two slots (one filling while the other drains).
    let threads = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(4, |n| n.get().clamp(2, 8)));
    let slots = slots.unwrap_or(2 * threads);
    let fail = |e: &dyn std::fmt::Display| -> ! {
        eprintln!("stream_file: {e}");
        std::process::exit(1)
    };

    // The source: a given file, or one made here (removed at the end).
    let (path, made) = match file {
        Some(p) => (std::path::PathBuf::from(p), false),
        None => {
            let p = std::env::temp_dir().join(format!("hetmem-stream-{}.bin", std::process::id()));
            let len = (gib * (1u64 << 30) as f64) as usize;
            let mut f = std::fs::File::create(&p).unwrap_or_else(|e| fail(&e));
            let chunk: Vec<u8> = (0..(8usize << 20)).map(|i| (i * 31) as u8).collect();
            let mut left = len;
            while left > 0 {
                let n = left.min(chunk.len());
                f.write_all(&chunk[..n]).unwrap_or_else(|e| fail(&e));
                left -= n;
            }
            (p, true)
        }
    };
    let f = std::fs::File::open(&path).unwrap_or_else(|e| fail(&e));
    // SAFETY: the file is only read, and nothing else in this program writes it.
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap_or_else(|e| fail(&e));
    let _ = map.advise(memmap2::Advice::Sequential);
    let len = map.len();

    let mgr = Manager::new().unwrap_or_else(|e| fail(&e));
    let host = mgr
        .host_pool(HostPoolConfig::default())
        .unwrap_or_else(|e| fail(&e));
    let pool = mgr
        .device_pool(0, PoolConfig::default())
        .unwrap_or_else(|e| fail(&e));
    let stream = mgr.create_stream(0).unwrap_or_else(|e| fail(&e));
    let mut dst = pool.alloc(len, &stream).unwrap_or_else(|e| fail(&e));
    let near = NumaPolicy::NearDevice(0);
    let vt = |s: &hetmem::Stream| {
        mgr.sim()
            .map(|sim| sim.stream_time_ns(s.handle()).unwrap_or(0))
    };

    // Baseline: the same number of bytes from one pinned buffer (1 GiB at most, repeated).
    let block = len.min(1 << 30);
    let mut pinned = mgr
        .alloc(Placement::Pinned(near.clone()), block)
        .unwrap_or_else(|e| fail(&e));
    pinned.as_mut_slice().unwrap_or_else(|e| fail(&e)).fill(1);
    let (v0, t) = (vt(&stream), Instant::now());
    let mut off = 0;
    while off < len {
        let n = block.min(len - off);
        mgr.copy(&mut dst, off, &pinned, 0, n, Some(&stream))
            .unwrap_or_else(|e| fail(&e));
        off += n;
    }
    stream.synchronize().unwrap_or_else(|e| fail(&e));
    let pinned_s = t.elapsed().as_secs_f64();
    let pinned_v = vt(&stream).zip(v0).map(|(a, b)| a - b);

    // The ring, from the mapped file (first touch of the file's pages included).
    let mut ring =
        StagingRing::new(&host, &near, slots, slot_mib << 20, threads).unwrap_or_else(|e| fail(&e));
    let (v0, t) = (vt(&stream), Instant::now());
    let rep = ring
        .upload(&map, &dst, 0, &stream)
        .unwrap_or_else(|e| fail(&e));
    stream.synchronize().unwrap_or_else(|e| fail(&e));
    let ring_s = t.elapsed().as_secs_f64();
    let ring_v = vt(&stream).zip(v0).map(|(a, b)| a - b);

    // Spot check: the first and last slot's worth arrived.
    let check = |at: usize| {
        let n = (1usize << 20).min(len - at);
        let mut out = mgr
            .alloc(Placement::Host(NumaPolicy::Default), n)
            .unwrap_or_else(|e| fail(&e));
        mgr.copy(&mut out, 0, &dst, at, n, Some(&stream))
            .unwrap_or_else(|e| fail(&e));
        out.as_slice().unwrap_or_else(|e| fail(&e)) == &map[at..at + n]
    };
    let intact = check(0) && check(len - (1usize << 20).min(len));
    let gbps = |s: f64| len as f64 / s / 1e9;
    let vgbps = |ns: Option<u64>| ns.filter(|n| *n > 0).map(|n| len as f64 / n as f64);
    let report = json!({
        "backend": mgr.backend_kind().name(),
        "bytes": len,
        "pinned_h2d_gbps": gbps(pinned_s),
        "ring_gbps": gbps(ring_s),
        "ring_over_pinned": gbps(ring_s) / gbps(pinned_s),
        "virtual_pinned_gbps": vgbps(pinned_v),
        "virtual_ring_gbps": vgbps(ring_v),
        "ring_fill_s": rep.fill.as_secs_f64(),
        "ring_wait_s": rep.waited.as_secs_f64(),
        "slots": slots, "slot_mib": slot_mib, "threads": threads,
        "intact": intact,
    });
    drop(map);
    if made {
        let _ = std::fs::remove_file(&path);
    }
    if json_out {
        println!("{report}");
    } else {
        println!(
            "{} bytes from {} on {}",
            len,
            path.display(),
            report["backend"]
        );
        println!("pinned H2D      {:.1} GB/s", gbps(pinned_s));
        println!(
            "staging ring    {:.1} GB/s ({:.2} of pinned)",
            gbps(ring_s),
            gbps(ring_s) / gbps(pinned_s)
        );
        if let (Some(p), Some(r)) = (vgbps(pinned_v), vgbps(ring_v)) {
            println!(
                "virtual link    pinned {p:.1} GB/s, ring {r:.1} GB/s ({:.2})",
                r / p
            );
        }
        println!(
            "ring: {:.2} s filling slots, {:.2} s waiting for slots",
            rep.fill.as_secs_f64(),
            rep.waited.as_secs_f64()
        );
        println!("bytes intact    {intact}");
    }
    if !intact {
        std::process::exit(1);
    }
}

fn usage() -> ! {
    eprintln!("usage: stream_file [--gib N | --file PATH] [--slot-mib N] [--slots N] [--threads N] [--json]");
    std::process::exit(2)
}
