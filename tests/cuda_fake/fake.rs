//! The fake driver itself: its header matches `cuda.h`, it is as strict as the driver,
//! and what the pool asks of it.

use super::*;

// ------------------------------------------------------------------ the fake itself

/// The fake's definitions against CUDA's own cuda.h (check mode): every signature,
/// constant and struct layout. Needs a CUDA 12.x include directory.
#[test]
#[ignore = "needs CUDA 12.x cuda.h: FAKE_CUDA_INCLUDE=<dir with cuda.h> cargo test --test cuda_fake -- --ignored"]
fn fake_matches_cuda_h() {
    let dir =
        std::env::var("FAKE_CUDA_INCLUDE").unwrap_or_else(|_| "/usr/local/cuda/include".to_owned());
    assert!(
        std::path::Path::new(&dir).join("cuda.h").is_file(),
        "no cuda.h in {dir}"
    );
    let out = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args([
            "-DFAKE_CUDA_REAL_HEADERS",
            "-fsyntax-only",
            "-Wall",
            "-Werror",
        ])
        .arg(format!("-I{dir}"))
        .arg(fake_cuda::fake_cuda_source())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Strictness the backend never provokes, checked on the fake directly.
#[test]
fn fake_is_strict() {
    let (f, _g, _backend) = setup();
    let set: CuCtxSetFn = raw(c"cuCtxSetCurrent");
    let alloc: CuMemAllocFn = raw(c"cuMemAlloc_v2");
    let free: CuMemFreeFn = raw(c"cuMemFree_v2");
    let _ctx = bind_primary(0);
    let mut p = 0u64;
    // SAFETY: valid out-pointers and values; the fake validates before it acts.
    unsafe {
        assert_eq!(alloc(&mut p, 0), code::INVALID_VALUE, "size 0");
        assert_eq!(alloc(&mut p, 4096), 0);
        assert_eq!(
            free(p + 1),
            code::INVALID_VALUE,
            "not an allocation's start"
        );
        assert_eq!(free(p), 0);
        let mut bogus = 0u8;
        assert_eq!(
            set((&mut bogus as *mut u8).cast()),
            code::INVALID_CONTEXT,
            "not a context"
        );
    }
    // Overlapping ends; managed memory with an attach flag other than GLOBAL / HOST.
    let copy_raw: CuMemcpyFn = raw(c"cuMemcpyAsync");
    let managed: CuMemAllocManagedFn = raw(c"cuMemAllocManaged");
    // SAFETY: valid out-pointers; the overlapping copy is refused before it runs.
    unsafe {
        assert_eq!(alloc(&mut p, 8192), 0);
        assert_eq!(
            copy_raw(p + 100, p, 4096, std::ptr::null_mut()),
            code::INVALID_VALUE,
            "source and destination overlap"
        );
        assert_eq!(free(p), 0);
        assert_eq!(
            managed(&mut p, 4096, 4),
            code::INVALID_VALUE,
            "CU_MEM_ATTACH_SINGLE"
        );
        assert_eq!(managed(&mut p, 0, 1), code::INVALID_VALUE, "size 0");
    }
    // A host range that runs out of one registration into the next, or from pageable
    // memory into a registration, is refused (byte ranges, one region per registration).
    let copy: CuMemcpyFn = raw(c"cuMemcpyAsync");
    let register: CuRegisterFn = raw(c"cuMemHostRegister_v2");
    let unregister: CuUnregisterFn = raw(c"cuMemHostUnregister");
    let mut host_buf = vec![0u8; 3 * 4096];
    let mut other = vec![0u8; 2 * 4096];
    let h = host_buf.as_mut_ptr() as u64;
    let o = other.as_mut_ptr() as u64;
    let legacy = std::ptr::null_mut();
    // SAFETY: both buffers outlive their registrations; the copies are on the legacy
    // stream (at once, inside the buffers) or refused before anything is touched.
    unsafe {
        // Bytes 0..4096 pageable, then two registrations of 4096 bytes.
        assert_eq!(register((h + 4096) as *mut c_void, 4096, 1), 0);
        assert_eq!(register((h + 8192) as *mut c_void, 4096, 1), 0);
        assert_eq!(copy(o, h + 4096, 4096, legacy), 0, "inside one");
        assert_eq!(copy(o, h, 4096, legacy), 0, "pageable only");
        assert_eq!(
            copy(o, h + 6144, 4096, legacy),
            code::INVALID_VALUE,
            "across two registrations"
        );
        assert_eq!(
            copy(o, h + 2048, 4096, legacy),
            code::INVALID_VALUE,
            "from pageable memory into a registration"
        );
        assert_eq!(unregister((h + 4096) as *mut c_void), 0);
        assert_eq!(unregister((h + 8192) as *mut c_void), 0);
    }
    assert_eq!(f.stat("allocations"), 0);
}

/// A stream made per request and dropped after it: each request's block is handed to
/// the next request's stream (after an event), so the old stream owns nothing; the pool
/// lets go of such streams instead of keeping every one alive (and its driver stream
/// with it) until a trim.
#[test]
fn the_pool_lets_go_of_streams_it_no_longer_needs() {
    let (f, _g, _b) = setup();
    let mgr = cuda_manager();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let base = f.stat("streams");
    for _ in 0..100 {
        let s = mgr.create_stream(0).unwrap();
        drop(pool.alloc(4 * MIB, &s).unwrap());
    }
    assert!(
        f.stat("streams") <= base + 40,
        "{} driver streams alive after 100 per-request streams (base {base})",
        f.stat("streams")
    );
}

/// A copy cut at registration edges whose second piece the driver refuses has queued
/// its first: the copy is still fenced (a staging slot is not refilled under it), and a
/// synchronous one still waits for it before returning the error.
#[test]
fn a_copy_refused_partway_is_still_fenced() {
    let (f, _g, b) = setup();
    let mgr = cuda_manager();
    // 4 MiB slots registered in two 2 MiB pieces: a slot's copy is two cuMemcpyAsync.
    let cfg = HostPoolConfig {
        threads: 2,
        parallel_threshold: 4 * MIB,
        min_register_chunk: 2 * MIB,
        ..HostPoolConfig::default()
    };
    let host = mgr.host_pool(cfg).unwrap();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let stream = mgr.create_stream(0).unwrap();
    let mut ring =
        hetmem::pool::StagingRing::new(&host, &NumaPolicy::Default, 2, 4 * MIB, 1).unwrap();
    let dst: Vec<_> = (0..3)
        .map(|_| pool.alloc(4 * MIB, &stream).unwrap())
        .collect();
    f.fail_after("cuMemcpyAsync", code::UNKNOWN, 1, 1);
    let err = ring.upload(&vec![0xAA; 4 * MIB], &dst[0], 0, &stream);
    assert!(err.is_err(), "the second piece was refused");
    ring.upload(&vec![0xBB; 4 * MIB], &dst[1], 0, &stream)
        .unwrap(); // slot 1
    ring.upload(&vec![0xCC; 4 * MIB], &dst[2], 0, &stream)
        .unwrap(); // slot 0 again: only once A's first piece is done
    stream.synchronize().unwrap();
    let mut first = [0u8; 16];
    dst[0].read(0, &mut first).unwrap();
    assert_eq!(
        first, [0xAA; 16],
        "slot 0 was refilled under A's queued piece"
    );

    // Synchronous: the error comes back only after the queued piece is done.
    let d: &dyn Backend = &b;
    let mut buf = vec![7u8; 2 * MIB];
    let base = buf.as_mut_ptr();
    // SAFETY: `buf` outlives its two registrations (undone below).
    unsafe {
        d.register_host(NonNull::new(base).unwrap(), MIB).unwrap();
        d.register_host(NonNull::new(base.add(MIB)).unwrap(), MIB)
            .unwrap();
        let dp = d.alloc_device(0, 2 * MIB).unwrap();
        let src = MemRef::Host {
            ptr: NonNull::new(base).unwrap(),
            kind: HostKind::Pinned,
        };
        f.fail_after("cuMemcpyAsync", code::UNKNOWN, 1, 1);
        assert!(d.copy(dev(0, dp), src, 2 * MIB, None).is_err());
        assert_eq!(f.stat("queued_ops"), 0, "nothing of it left queued");
        d.free_device(0, dp, 2 * MIB).unwrap();
        d.unregister_host(NonNull::new(base).unwrap(), MIB).unwrap();
        d.unregister_host(NonNull::new(base.add(MIB)).unwrap(), MIB)
            .unwrap();
    }
    drop(buf);
}

/// A moved page that cuMemMap refuses goes back to the others and then to the driver,
/// counted: after a trim the pool's driver allocations and frees balance, as the
/// driver's own count of pages does.
#[test]
fn a_refused_move_is_counted_as_a_free() {
    let (f, _g, _b) = setup();
    let mgr = cuda_manager();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    assert!(pool.expandable());
    let s = mgr.create_stream(0).unwrap();
    let x1 = pool.alloc(4 * MIB, &s).unwrap();
    let x2 = pool.alloc(4 * MIB, &s).unwrap();
    drop(x1);
    // Growing by three pages moves one of x1's; the driver refuses that map once.
    f.fail_next("cuMemMap", code::OUT_OF_MEMORY, 1);
    let y = pool.alloc(6 * MIB, &s).unwrap();
    drop((x2, y));
    pool.trim().unwrap();
    assert_eq!(pool.reserved(), 0);
    assert_eq!(f.stat("vmm_handles"), 0, "the driver has every page back");
    let st = pool.stats();
    assert_eq!(st.num_device_alloc, st.num_device_free, "{st:?}");
}
