//! The GPU side of the shim against the fake CUDA driver (tests/fake_cuda/fake_cuda.c
//! with the entry points of preload/tests/fake_cudart/fake_cuda_ext.c) and a fake
//! libcudart that, like the real one, dlopens the driver and takes every entry point
//! through cuGetProcAddress_v2: C programs (tests/c/gpu.c) allocate through the
//! runtime, the driver by symbol, dlsym and cuGetProcAddress (both versions, with and
//! without the per-thread flag), in each mode, with bad inputs, a fork and threads.
//! Counters come back as the JSON line of `HETMEM_GPU_STATS`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{scratch, shim};
use serde_json::Value;

struct Built {
    dir: PathBuf,
    /// Linked with -lcuda (the driver by symbol) and -lcudart.
    linked: PathBuf,
    /// Linked with -lcudart only: the driver is loaded by the runtime, RTLD_LOCAL.
    rt: PathBuf,
    /// Linked with -lamdhip64 (the fake HIP runtime).
    hip: PathBuf,
}

fn cc(args: &[&str], what: &str) {
    let o = Command::new("cc")
        .args(args)
        .output()
        .expect("cc (CI installs gcc)");
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn built() -> &'static Built {
    static B: OnceLock<Built> = OnceLock::new();
    B.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
        let dir = scratch().join("fake-gpu");
        std::fs::create_dir_all(&dir).unwrap();
        let s = |p: &str| src.join(p).to_string_lossy().into_owned();
        let o = |p: &str| dir.join(p).to_string_lossy().into_owned();
        let flags = [
            "-O1", "-g", "-Wall", "-Wextra", "-shared", "-fPIC", "-pthread",
        ];
        let mut a: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        a.extend([
            "-Wl,-Bsymbolic".into(),
            "-Wl,-soname,libcuda.so.1".into(),
            s("fake_cudart/fake_cuda_ext.c"),
            "-o".into(),
            o("libcuda.so.1"),
        ]);
        cc(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            "fake libcuda",
        );
        let mut a: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        a.extend([
            "-Wl,-soname,libcudart.so.12".into(),
            s("fake_cudart/fake_cudart.c"),
            "-o".into(),
            o("libcudart.so.12"),
            "-ldl".into(),
        ]);
        cc(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            "fake libcudart",
        );
        let mut a: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        a.extend([
            "-Wl,-Bsymbolic".into(),
            "-Wl,-soname,libamdhip64.so.6".into(),
            s("fake_cudart/fake_hip_ext.c"),
            "-o".into(),
            o("libamdhip64.so.6"),
        ]);
        cc(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            "fake libamdhip64",
        );
        for (link, to) in [
            ("libcuda.so", "libcuda.so.1"),
            ("libcudart.so", "libcudart.so.12"),
            ("libamdhip64.so", "libamdhip64.so.6"),
        ] {
            let l = dir.join(link);
            let _ = std::fs::remove_file(&l);
            std::os::unix::fs::symlink(to, &l).unwrap();
        }
        let prog = s("c/gpu.c");
        let rpath = format!("-Wl,-rpath,{}", dir.display());
        let ldir = format!("-L{}", dir.display());
        let common = ["-O1", "-g", "-Wall", "-Wextra", "-Werror", "-pthread"];
        let linked = dir.join("gpu_linked");
        let mut a: Vec<&str> = common.to_vec();
        let lo = linked.to_string_lossy().into_owned();
        a.extend([
            "-DLINKED", &prog, "-o", &lo, &ldir, &rpath, "-lcudart", "-lcuda", "-ldl",
        ]);
        cc(&a, "gpu.c (linked)");
        let rt = dir.join("gpu_rt");
        let ro = rt.to_string_lossy().into_owned();
        let mut a: Vec<&str> = common.to_vec();
        a.extend([&prog, "-o", &ro, &ldir, &rpath, "-lcudart", "-ldl"]);
        cc(&a, "gpu.c (runtime only)");
        let hip = dir.join("hip");
        let ho = hip.to_string_lossy().into_owned();
        let hsrc = s("c/hip.c");
        let mut a: Vec<&str> = common.to_vec();
        a.extend([&hsrc, "-o", &ho, &ldir, &rpath, "-lamdhip64", "-ldl"]);
        cc(&a, "hip.c");
        Built {
            dir,
            linked,
            rt,
            hip,
        }
    })
}

/// Runs `exe scenario path` with the shim (unless `shim` is false) and `env`.
fn run(exe: &Path, args: &[&str], with_shim: bool, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(exe);
    c.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("HETMEM_") || k.starts_with("FAKE_CUDA") || k == "LD_PRELOAD" {
            c.env_remove(k);
        }
    }
    c.env("LD_LIBRARY_PATH", &built().dir);
    if with_shim {
        c.env("LD_PRELOAD", shim());
    }
    c.envs(env.iter().copied());
    c.output().expect("run")
}

fn text(o: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs under the shim with the counters on; stdout and the counters.
fn stats(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> (String, Value) {
    // Unique per call: tests run the same scenarios in parallel.
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let file = scratch().join(format!(
        "gpu-stats-{}-{}-{}.json",
        args.join("-"),
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&file);
    let f = file.to_string_lossy().into_owned();
    let mut env = env.to_vec();
    env.push(("HETMEM_GPU_STATS", &f));
    let o = run(exe, args, true, &env);
    assert!(o.status.success() && o.stderr.is_empty(), "{}", text(&o));
    let json = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{f}: {e}\n{}", text(&o)));
    let _ = std::fs::remove_file(&file);
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}")),
    )
}

fn n(v: &Value, path: &[&str]) -> u64 {
    let mut x = v;
    for p in path {
        x = match p.parse::<usize>() {
            Ok(i) if x.is_array() => &x[i],
            _ => &x[*p],
        };
    }
    x.as_u64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

fn kind(v: &Value, k: &str) -> (u64, u64, u64) {
    (
        n(v, &["kinds", k, "allocs"]),
        n(v, &["kinds", k, "frees"]),
        n(v, &["kinds", k, "bytes"]),
    )
}

const PATHS: &[&str] = &["symbol", "dlsym", "proc", "proc1", "proc-ptsz"];

#[test]
fn observe_counts_driver_calls_by_symbol_dlsym_and_proc_address() {
    let b = built();
    for path in PATHS {
        let (out, s) = stats(&b.linked, &["driver", path], &[]);
        assert!(out.contains("driver ok"), "{path}: {out}");
        assert_eq!(kind(&s, "device"), (2, 2, 4 << 20), "{path}: {s}");
        assert_eq!(kind(&s, "pinned"), (2, 2, 2 << 20), "{path}: {s}");
        assert_eq!(kind(&s, "registered"), (1, 1, 1 << 20), "{path}: {s}");
        assert_eq!(kind(&s, "physical"), (1, 1, 2 << 20), "{path}: {s}");
        assert_eq!(n(&s, &["live"]), 0, "{path}: {s}");
        assert_eq!(n(&s, &["devices", "0", "held"]), 0, "{path}: {s}");
        assert_eq!(n(&s, &["unknown_frees"]), 0, "{path}: {s}");
        if path.starts_with("proc") {
            // The runtime's 14 wrapped lookups, and the program's own 12.
            assert_eq!(n(&s, &["handed_proc"]), 26, "{path}: {s}");
        }
    }
}

#[test]
fn observe_counts_runtime_calls_once() {
    let b = built();
    for (exe, env) in [
        (&b.rt, &[][..]),
        (&b.linked, &[][..]),
        (
            &b.rt,
            &[("FAKE_CUDART_PTSZ", "1"), ("FAKE_CUDART_GPA", "v1")][..],
        ),
    ] {
        let (out, s) = stats(exe, &["runtime"], env);
        assert!(out.contains("runtime ok"), "{out}");
        // cudaMalloc, cudaMallocAsync, cudaMallocFromPoolAsync: counted by the runtime
        // wrappers, not again by the driver wrappers the runtime reaches.
        assert_eq!(kind(&s, "device"), (3, 3, 7 << 20), "{env:?}: {s}");
        assert_eq!(kind(&s, "managed"), (1, 1, 1 << 20), "{s}");
        assert_eq!(kind(&s, "pinned"), (2, 2, 2 << 20), "{s}");
        assert_eq!(kind(&s, "registered"), (1, 1, 1 << 20), "{s}");
        assert_eq!(n(&s, &["devices", "0", "peak"]), 7 << 20, "{s}");
        assert_eq!(n(&s, &["live"]), 0, "{s}");
        // The runtime's lookups went through the wrapped cuGetProcAddress.
        assert_eq!(n(&s, &["handed_proc"]), 14, "{s}");
    }
}

#[test]
fn proc_address_hands_back_exactly_the_variant_returned() {
    let b = built();
    let plain = run(&b.rt, &["lookups"], false, &[]);
    let (out, _) = stats(&b.rt, &["lookups"], &[]);
    let plain = String::from_utf8_lossy(&plain.stdout).into_owned();
    // The CUDA 3.0 cuMemAlloc (32-bit) is not wrapped: the real one, which writes 4 bytes.
    assert!(out.contains("old cuMemAlloc status=0 from=driver"), "{out}");
    assert!(out.contains("old slot=0xc0de canary=0x5a5a5a5a"), "{out}");
    assert!(out.contains("new cuMemAlloc status=0 from=shim"), "{out}");
    assert!(out.contains("ptsz from=shim"), "{out}");
    assert!(out.contains("itself from=shim"), "{out}");
    assert!(out.contains("not wrapped from=driver same=1"), "{out}");
    // Codes and symbolStatus are the driver's; only the origins differ.
    let strip = |s: &str| s.replace("from=shim", "from=driver");
    assert_eq!(strip(&out), plain);
}

#[test]
fn limit_is_what_the_program_sees() {
    let b = built();
    for limit in ["0:64M", "0.25", "25%", "64M"] {
        let (out, s) = stats(&b.rt, &["limit"], &[("HETMEM_DEVICE_LIMIT", limit)]);
        let want = "start total=67108864 free=67108864\n\
                    malloc 48M = 0\n\
                    held 48M total=67108864 free=16777216\n\
                    malloc 32M = 2\n\
                    driver 32M = 2\n\
                    driver 16M = 0\n\
                    driver full total=67108864 free=0\n\
                    cuMemCreate 2M = 2\n\
                    free driver = 0\n\
                    cuMemCreate 2M again = 0\n\
                    cuMemRelease = 0\n\
                    free 48M = 0\n\
                    end total=67108864 free=67108864\n";
        assert_eq!(out, want, "{limit}");
        assert_eq!(n(&s, &["refused"]), 3, "{s}");
        assert_eq!(n(&s, &["devices", "0", "limit"]), 64 << 20, "{s}");
        assert_eq!(n(&s, &["devices", "0", "held"]), 0, "{s}");
    }
    // Device 1 limited, device 0 not.
    let (out, _) = stats(&b.rt, &["limit"], &[("HETMEM_DEVICE_LIMIT", "1:1M")]);
    assert!(
        out.starts_with("start total=268435456 free=268435456\n"),
        "{out}"
    );
}

#[test]
fn bad_configuration_is_one_line_and_pass_through() {
    let b = built();
    for (k, v) in [
        ("HETMEM_DEVICE_LIMIT", "lots"),
        ("HETMEM_GPU_MODE", "fast"),
        ("HETMEM_GPU_MODE", "oversubscribe"),
    ] {
        let o = run(&b.rt, &["limit"], true, &[(k, v)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("hetmem-preload: HETMEM_"), "{err}");
        assert!(err.contains("GPU calls pass through"), "{err}");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.starts_with("start total=268435456"), "{out}");
    }
}

#[test]
fn bad_input_gets_the_codes_of_the_real_calls() {
    let b = built();
    let plain = run(&b.linked, &["bad", "symbol"], false, &[]);
    let plain = String::from_utf8_lossy(&plain.stdout).into_owned();
    assert!(plain.contains("cudaFree twice = 1"), "{plain}");
    for path in ["symbol", "dlsym", "proc"] {
        for env in [&[][..], &[("HETMEM_DEVICE_LIMIT", "0:64M")][..]] {
            let (out, s) = stats(&b.linked, &["bad", path], env);
            assert_eq!(out, plain, "{path} {env:?}");
            assert_eq!(n(&s, &["live"]), 0, "{s}");
            assert_eq!(n(&s, &["devices", "0", "held"]), 0, "{s}");
        }
    }
}

#[test]
fn threads_and_fork() {
    let b = built();
    let (out, s) = stats(&b.rt, &["threads"], &[("HETMEM_DEVICE_LIMIT", "0:1G")]);
    assert!(out.contains("threads ok"), "{out}");
    assert_eq!(kind(&s, "device").0, 8 * 200 * 2, "{s}");
    assert_eq!(kind(&s, "device").1, 8 * 200 * 2, "{s}");
    assert_eq!(n(&s, &["devices", "0", "held"]), 0, "{s}");
    let (out, s) = stats(&b.rt, &["fork"], &[]);
    assert!(out.contains("fork ok"), "{out}");
    assert_eq!(kind(&s, "device"), (1, 1, 1 << 20), "{s}");
}

#[test]
fn capturing_streams_go_to_the_driver_untouched() {
    let b = built();
    let plain = run(&b.rt, &["capture"], false, &[]);
    let (out, s) = stats(&b.rt, &["capture"], &[("HETMEM_DEVICE_LIMIT", "0:64M")]);
    assert_eq!(out, String::from_utf8_lossy(&plain.stdout));
    assert_eq!(n(&s, &["captured"]), 1, "{s}");
    assert_eq!(kind(&s, "device").0, 0, "{s}");
}

#[test]
fn a_program_without_cuda_loads_no_driver() {
    let b = built();
    // gpu_rt links the fake libcudart (which loads the driver only when called); the
    // shim loads nothing.
    let (out, s) = stats(&b.rt, &["nocuda"], &[("HETMEM_DEVICE_LIMIT", "0:1G")]);
    assert_eq!(out, "driver mapped=0\n");
    assert_eq!(n(&s, &["live"]), 0, "{s}");
}

#[test]
fn dlsym_rtld_next_from_the_program_is_unchanged() {
    let b = built();
    let plain = run(&b.linked, &["next"], false, &[]);
    let (out, _) = stats(&b.linked, &["next"], &[]);
    assert_eq!(out, String::from_utf8_lossy(&plain.stdout));
    assert!(out.contains("next cuMemAlloc_v2 found=1 same=1"), "{out}");
}

#[test]
fn oversubscribe_runs_past_the_limit_on_managed_memory() {
    let b = built();
    let env = [
        ("HETMEM_DEVICE_LIMIT", "0:64M"),
        ("HETMEM_GPU_MODE", "oversubscribe"),
    ];
    let (out, s) = stats(&b.rt, &["oversubscribe"], &env);
    assert_eq!(
        out,
        "malloc 48M = 0\nmalloc 48M past the limit = 0\ndriver 48M past the limit = 0\n\
         async 48M past the limit = 0\ndriver async 48M past the limit = 0\nasync frees = 0\n\
         free = 0\n"
    );
    assert_eq!(kind(&s, "device"), (1, 1, 48 << 20), "{s}");
    // Async frees of oversubscribed (managed) memory are made cuMemFree/cudaFree.
    assert_eq!(kind(&s, "oversubscribed"), (4, 4, 192 << 20), "{s}");
    assert_eq!(n(&s, &["devices", "0", "peak"]), 48 << 20, "{s}");
    // The runtime's copy into it was its first use: prefetched to the device.
    assert_eq!(n(&s, &["prefetches"]), 1, "{s}");
    // Without managed memory: out of memory, as under the limit alone.
    let mut env = env.to_vec();
    env.push(("FAKE_CUDA_MANAGED", "0"));
    let o = run(&b.rt, &["oversubscribe"], true, &env);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("malloc 48M past the limit = 2\ndriver 48M past the limit = 2\n"),
        "{out}"
    );
    // Under the limit alone, the same program fails cleanly.
    let o = run(&b.rt, &["oversubscribe"], true, &env[..1]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("malloc 48M past the limit = 2\n"), "{out}");
}

#[test]
fn pin_on_copy_registers_large_blocks_once_and_unregisters_them_at_free() {
    let b = built();
    let (out, s) = stats(&b.rt, &["pin"], &[("HETMEM_GPU_PIN_ON_COPY", "4M")]);
    assert_eq!(
        out,
        "register after realloc = 0\nunregister after realloc = 0\n\
         register after free = 0\nunregister = 0\nfree = 0\n"
    );
    // The source block pinned at its first copy (hits on the next two), the
    // destination of the copy back at its own; both unregistered when freed.
    assert_eq!(n(&s, &["pin_misses"]), 2, "{s}");
    assert_eq!(n(&s, &["pin_hits"]), 2, "{s}");
    assert_eq!(kind(&s, "pinned_on_copy"), (2, 2, 32 << 20), "{s}");
    // Off by default; under the cap nothing is pinned.
    let (out, s) = stats(&b.rt, &["pin"], &[]);
    assert_eq!(n(&s, &["pin_misses"]), 0, "{s}");
    assert!(out.contains("register after realloc = 0"), "{out}");
    let (_, s) = stats(
        &b.rt,
        &["pin"],
        &[
            ("HETMEM_GPU_PIN_ON_COPY", "4M"),
            ("HETMEM_GPU_PIN_CACHE", "8M"),
        ],
    );
    assert_eq!(n(&s, &["pin_misses"]), 0, "{s}");
}

#[test]
fn hip_by_symbol_dlsym_and_get_proc_address() {
    let b = built();
    for path in ["symbol", "dlsym", "proc"] {
        let (out, s) = stats(
            &b.hip,
            &["limit", path],
            &[("HETMEM_DEVICE_LIMIT", "0:64M")],
        );
        let tail = "info = 0\ntotal=67108864 free=67108864\n\
                    malloc 48M = 0\nasync 32M = 2\n\
                    info = 0\ntotal=67108864 free=16777216\n\
                    host 1M = 0\nhost free = 0\nfree = 0\n\
                    info = 0\ntotal=67108864 free=67108864\n";
        assert!(out.ends_with(tail), "{path}: {out}");
        assert!(!out.contains("from=runtime"), "{path}: {out}");
        if path == "proc" {
            assert!(out.contains("unknown = 500\nunknown status=1\n"), "{out}");
            assert_eq!(n(&s, &["handed_proc"]), 7, "{s}");
        }
        assert_eq!(kind(&s, "device"), (1, 1, 48 << 20), "{path}: {s}");
        assert_eq!(kind(&s, "pinned"), (1, 1, 1 << 20), "{path}: {s}");
        assert_eq!(n(&s, &["refused"]), 1, "{s}");
        let (out, s) = stats(&b.hip, &["observe", path], &[]);
        assert!(out.contains("async 32M = 0\n"), "{out}");
        assert_eq!(kind(&s, "device"), (2, 2, 80 << 20), "{path}: {s}");
    }
    let plain = run(&b.hip, &["bad", "symbol"], false, &[]);
    let plain = String::from_utf8_lossy(&plain.stdout).into_owned();
    for path in ["symbol", "proc"] {
        let (out, _) = stats(&b.hip, &["bad", path], &[("HETMEM_DEVICE_LIMIT", "0:64M")]);
        let out: String = out
            .lines()
            .filter(|l| !l.contains("from=") && !l.starts_with("unknown"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(out, plain, "{path}");
    }
}

#[test]
fn pool_mode_serves_device_and_pinned_memory_and_answers_for_its_pointers() {
    let b = built();
    let plain = run(&b.rt, &["pool"], false, &[]);
    let plain = String::from_utf8_lossy(&plain.stdout).into_owned();
    let file = scratch().join(format!("gpu-pool-{}.json", std::process::id()));
    let f = file.to_string_lossy().into_owned();
    let o = run(
        &b.rt,
        &["pool"],
        true,
        &[("HETMEM_GPU_MODE", "pool"), ("HETMEM_GPU_STATS", &f)],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    // The same answers as the driver gives for its own allocations (the range and the
    // attributes are the block's, not the pool's segment), except IPC: refused, said once.
    assert_eq!(out, plain.replace("ipc = 0", "ipc = 1"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cuIpcGetMemHandle of memory served by hetmem's pool: refused"),
        "{err}"
    );
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let _ = std::fs::remove_file(&file);
    assert_eq!(n(&s, &["pool_served"]), 3, "{s}");
    assert_eq!(n(&s, &["pool_pinned"]), 1, "{s}");
    assert_eq!(kind(&s, "device"), (3, 3, 5 << 20), "{s}");
    assert_eq!(n(&s, &["devices", "0", "held"]), 0, "{s}");
    // Without VMM the pool's segments are the driver's cuMemAlloc memory: a second free
    // of a block at a segment's start must not reach the driver (which would free the
    // segment), but answer as the driver answers a double free.
    let o = run(
        &b.rt,
        &["pool"],
        true,
        &[("HETMEM_GPU_MODE", "pool"), ("FAKE_CUDA_VMM", "0")],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(out, plain.replace("ipc = 0", "ipc = 1"));
}

#[test]
fn pool_mode_keeps_limits_codes_threads_fork_and_capture() {
    let b = built();
    let limit = [("HETMEM_DEVICE_LIMIT", "0:64M")];
    let pool = [
        ("HETMEM_DEVICE_LIMIT", "0:64M"),
        ("HETMEM_GPU_MODE", "pool"),
    ];
    for sc in ["limit", "bad", "threads", "fork", "capture"] {
        let (observed, _) = stats(&b.rt, &[sc], &limit);
        let (pooled, s) = stats(&b.rt, &[sc], &pool);
        assert_eq!(pooled, observed, "{sc}");
        assert_eq!(n(&s, &["devices", "0", "held"]), 0, "{sc}: {s}");
        match sc {
            // Every allocation of the threads from the pool, by runtime and driver.
            "threads" => assert_eq!(n(&s, &["pool_served"]), 3200, "{s}"),
            // The parent's from the pool; the child's (a forked child) from the driver.
            "fork" => assert_eq!(n(&s, &["pool_served"]), 1, "{s}"),
            // Allocations on a capturing stream go to the driver untouched.
            "capture" => assert_eq!(n(&s, &["pool_served"]), 0, "{s}"),
            _ => {}
        }
    }
}

#[test]
fn observe_records_gpu_events_with_device_and_stream() {
    use hetmem::record::gpu::{decode, MemKind};
    use hetmem::record::{EventKind, Reader};
    let b = built();
    let rec = scratch().join(format!("gpu-rec-{}.bin", std::process::id()));
    let r = rec.to_string_lossy().into_owned();
    let (out, _) = stats(&b.rt, &["runtime"], &[("HETMEM_RECORD", &r)]);
    assert!(out.contains("runtime ok"), "{out}");
    let file = std::fs::File::open(&rec).unwrap();
    let mut gpu = Vec::new();
    for e in Reader::new(std::io::BufReader::new(file)).unwrap() {
        if let EventKind::Unknown { kind, body } = e.unwrap().kind {
            gpu.push(decode(kind, &body).expect("a GPU event"));
        }
    }
    let _ = std::fs::remove_file(&rec);
    let dev: Vec<_> = gpu.iter().filter(|e| e.mem == MemKind::Device).collect();
    assert_eq!(dev.iter().filter(|e| e.alloc).count(), 3, "{gpu:?}");
    assert_eq!(dev.iter().filter(|e| !e.alloc).count(), 3, "{gpu:?}");
    assert!(dev.iter().all(|e| e.device == 0), "{gpu:?}");
    // cudaMallocAsync and cudaMallocFromPoolAsync on the program's stream, cudaMalloc on 0.
    let on_streams = dev.iter().filter(|e| e.alloc && e.stream != 0).count();
    assert_eq!(on_streams, 2, "{gpu:?}");
    assert_eq!(
        dev.iter().filter(|e| e.alloc).map(|e| e.size).sum::<u64>(),
        7 << 20
    );
    let pinned = gpu.iter().filter(|e| e.mem == MemKind::Pinned).count();
    assert_eq!(pinned, 4, "{gpu:?}");
    assert!(gpu
        .iter()
        .filter(|e| e.mem == MemKind::Pinned)
        .all(|e| e.device == -1));
}

#[test]
fn limits_are_per_device() {
    let b = built();
    for mode in ["observe", "pool"] {
        let (out, s) = stats(
            &b.rt,
            &["devices"],
            &[
                ("HETMEM_DEVICE_LIMIT", "0:64M,1:32M"),
                ("HETMEM_GPU_MODE", mode),
            ],
        );
        assert_eq!(
            out,
            "set 1 = 0\n\
             device 1 total=33554432 free=33554432\n\
             device 1 malloc 48M = 2\n\
             device 1 malloc 16M = 0\n\
             device 1 driver 32M = 2\n\
             set 0 = 0\n\
             device 0 total=67108864 free=67108864\n\
             device 0 malloc 48M = 0\n\
             free on device 0 of device 1's = 0\n\
             free = 0\n\
             set 1 again = 0\n\
             device 1 total=33554432 free=33554432\n",
            "{mode}"
        );
        assert_eq!(n(&s, &["devices", "1", "peak"]), 16 << 20, "{s}");
        assert_eq!(n(&s, &["devices", "0", "peak"]), 48 << 20, "{s}");
        assert_eq!(n(&s, &["refused"]), 2, "{s}");
    }
}

#[test]
fn a_limit_shared_by_processes() {
    let b = built();
    let name = format!("test-{}", std::process::id());
    let (out, _) = stats(
        &b.rt,
        &["shared"],
        &[
            ("HETMEM_DEVICE_LIMIT", "0:64M"),
            ("HETMEM_DEVICE_LIMIT_SHARED", &name),
        ],
    );
    let _ = std::fs::remove_file(format!("/dev/shm/hetmem-limit-{name}"));
    assert_eq!(
        out,
        "parent 48M = 0\n\
         parent holds 48M: child 32M = 2\n\
         parent holds 48M: child 8M = 0\n\
         parent holds 48M: child total=67108864 free=8388608\n\
         parent free = 0\n\
         parent holds nothing: child 32M = 0\n\
         parent holds nothing: child 8M = 0\n\
         parent holds nothing: child total=67108864 free=25165824\n"
    );
    // Without the shared name each process has the whole limit.
    let (out, _) = stats(&b.rt, &["shared"], &[("HETMEM_DEVICE_LIMIT", "0:64M")]);
    assert!(out.contains("parent holds 48M: child 32M = 0\n"), "{out}");
}
