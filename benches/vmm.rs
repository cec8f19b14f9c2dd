//! What each virtual-memory driver call costs, per call, at 2 and 20 MiB: create,
//! map, set-access (one mapping, and one call for a run of them), unmap, release, and
//! reserving address space; then the same calls while another stream has work queued
//! (copies between two device buffers), to see whether they wait for it.
//!
//! ```text
//! cargo bench --bench vmm                        # sim here: the modelled costs
//! HETMEM_BACKEND=cuda cargo bench --bench vmm    # on a GPU host: the driver's
//! ```
//!
//! The simulator's defaults (`hetmem::backend::sim::DriverCosts`) came from published
//! figures for other GPUs; this is what replaces them with the H200's. On the simulator
//! the wall times are those of its bookkeeping and `modelled_us` is what it charges.
//! The last line is one JSON object: for each size and condition, each call's median,
//! 90th percentile and count in microseconds.

use std::collections::BTreeMap;
use std::time::Instant;

use hetmem::backend::{Backend, DevicePtr, PhysHandle};
use hetmem::{Manager, Placement};
use serde_json::json;

const SIZES: [usize; 2] = [2 << 20, 20 << 20];
/// Mappings per size and condition.
const N: usize = 24;

#[derive(Default)]
struct Times(BTreeMap<&'static str, Vec<f64>>);

impl Times {
    fn time<T>(&mut self, call: &'static str, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.0
            .entry(call)
            .or_default()
            .push(t.elapsed().as_secs_f64() * 1e6);
        r
    }

    fn summary(&mut self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (call, v) in &mut self.0 {
            v.sort_by(f64::total_cmp);
            let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
            m.insert(
                call.to_string(),
                json!({"median_us": round(at(0.5)), "p90_us": round(at(0.9)), "n": v.len()}),
            );
        }
        m.into()
    }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// One round of the calls at `size`: reserve, N × (create, map, set-access), one
/// set-access over all N, N × unmap and release, free the range.
fn round_of(b: &dyn Backend, size: usize, t: &mut Times) -> Result<(), String> {
    let e = |e: hetmem::Error| e.to_string();
    let base: DevicePtr = t
        .time("reserve", || b.reserve_address(0, N * size))
        .map_err(e)?;
    let mut handles: Vec<PhysHandle> = Vec::with_capacity(N);
    for i in 0..N {
        let h = t.time("create", || b.create_physical(0, size)).map_err(e)?;
        handles.push(h);
        let at = base.offset(i * size);
        // SAFETY: `at..at+size` lies in the reservation just made, with nothing mapped
        // there; `h` is fresh, of `size` bytes, mapped nowhere else.
        t.time("map", || unsafe { b.map(0, at, size, h) })
            .map_err(e)?;
        // SAFETY: exactly the mapping made above.
        t.time("set_access", || unsafe { b.set_access(0, at, size, &[0]) })
            .map_err(e)?;
    }
    // SAFETY: the whole range is mapped, mapping by mapping, above.
    t.time("set_access_run", || unsafe {
        b.set_access(0, base, N * size, &[0])
    })
    .map_err(e)?;
    for (i, h) in handles.into_iter().enumerate() {
        let at = base.offset(i * size);
        // SAFETY: one whole mapping from above; nothing was queued that uses it.
        t.time("unmap", || unsafe { b.unmap(0, at, size) })
            .map_err(e)?;
        // SAFETY: created above and unmapped just now.
        t.time("release", || unsafe { b.release_physical(0, h) })
            .map_err(e)?;
    }
    // SAFETY: reserved above; every mapping in it was unmapped.
    t.time("address_free", || unsafe {
        b.free_address(0, base, N * size)
    })
    .map_err(e)?;
    Ok(())
}

fn main() {
    let mgr = Manager::new().expect("open a backend (HETMEM_BACKEND to force one)");
    let b = mgr.backend();
    let kind = mgr.backend_kind().name();
    if b.vmm_granularity(0).is_none() {
        println!("{}", json!({"backend": kind, "vmm": false}));
        return;
    }
    let driver = || mgr.sim().map(|s| s.stats().driver);
    let mut out = serde_json::Map::new();
    // Work for another stream: copies between two device buffers, queued before each
    // busy round (about 40 ms of copies on an H200, longer than the round).
    let len = 256 << 20;
    let src = mgr.alloc(Placement::Device(0), len);
    let busy_stream = mgr.create_stream(0).expect("stream");
    for busy in [false, true] {
        for &size in &SIZES {
            let mut t = Times::default();
            let before = driver();
            for _ in 0..3 {
                if busy {
                    if let Ok(src) = &src {
                        let mut dst = mgr
                            .alloc(Placement::Device(0), len)
                            .unwrap_or_else(|_| panic!("a third {len}-byte buffer"));
                        for _ in 0..40 {
                            mgr.copy(&mut dst, 0, src, 0, len, Some(&busy_stream))
                                .expect("copy");
                        }
                        dst_keep(dst, &busy_stream).expect("record");
                    }
                }
                if let Err(e) = round_of(b, size, &mut t) {
                    eprintln!("vmm: {e}");
                    std::process::exit(1);
                }
            }
            let mut s = t.summary();
            if let (Some(a), Some(z)) = (before, driver()) {
                let d = z.since(&a);
                let modelled: serde_json::Map<_, _> = d
                    .by_kind()
                    .map(|(k, n, ns)| {
                        (
                            k.name().to_string(),
                            json!(round(ns as f64 / n as f64 / 1e3)),
                        )
                    })
                    .collect();
                s["modelled_us"] = modelled.into();
            }
            let key = format!("{}MiB{}", size >> 20, if busy { "_busy" } else { "" });
            println!("{key:<10} {}", s);
            out.insert(key, s);
        }
    }
    busy_stream.synchronize().expect("sync");
    println!(
        "{}",
        json!({"backend": kind, "vmm": true, "mappings_per_round": N, "calls": out})
    );
}

/// Keeps `dst` alive until `stream` has run the copies into it (a buffer dropped
/// under queued copies waits for them, which would stall the round being timed).
fn dst_keep(dst: hetmem::Buffer, stream: &hetmem::Stream) -> hetmem::Result<()> {
    let ev = stream.record()?;
    std::thread::spawn(move || {
        let _ = ev.synchronize();
        drop(dst);
    });
    Ok(())
}
