//! Contexts: bound on fresh threads, released on drop, opened only for the devices used,
//! and a device that refuses them leaves the others usable.

use super::*;

// ---------------------------------------------------------------------- contexts

/// Every call made from a thread that has never touched CUDA binds the right context
/// first; the fake refuses any that does not (the control below shows it would).
#[test]
fn contexts_are_bound_on_fresh_threads() {
    let (f, _g, b) = setup();
    let refused = f.stat("no_context_errors");
    // Control: a raw allocation from a fresh thread has no context.
    std::thread::spawn(|| {
        let alloc: CuMemAllocFn = raw(c"cuMemAlloc_v2");
        let mut p = 0u64;
        // SAFETY: a valid out-pointer; the fake refuses before writing it.
        assert_eq!(unsafe { alloc(&mut p, 4096) }, code::INVALID_CONTEXT);
    })
    .join()
    .unwrap();
    assert_eq!(f.stat("no_context_errors"), refused + 1);

    let sets = f.stat("ctx_set_current");
    let d: &dyn Backend = &b;
    let e = d.create_event(1).unwrap();
    let s = d.create_stream(1).unwrap();
    let len = 8192;
    let p = d.alloc_device(1, len).unwrap();
    // Each thread does one kind of call as its very first driver call.
    let first_calls: Vec<Box<dyn Fn() + Send + Sync + '_>> = vec![
        Box::new(|| assert_eq!(d.mem_info(1).unwrap().total, DEVICE_MEM)),
        Box::new(|| {
            let q = d.alloc_device(0, 4096).unwrap();
            // SAFETY: just allocated, freed once.
            unsafe { d.free_device(0, q, 4096).unwrap() };
        }),
        Box::new(|| {
            let mut buf = vec![1u8; len];
            // SAFETY: live buffers; the synchronous copy completes before return.
            unsafe { d.copy(dev(1, p), host(&mut buf), len, None).unwrap() };
        }),
        Box::new(|| {
            let mut buf = vec![0u8; len];
            // SAFETY: live handles and ranges, synchronised before the buffer drops.
            unsafe {
                d.copy(host(&mut buf), dev(1, p), len, Some(s)).unwrap();
                d.record_event(e, s).unwrap();
                d.synchronize_event(e).unwrap();
            }
        }),
        Box::new(|| {
            // SAFETY: live handle.
            unsafe { d.synchronize_stream(s).unwrap() };
        }),
        Box::new(|| {
            // SAFETY: live handles.
            unsafe { d.stream_wait_event(s, e).unwrap() };
        }),
        Box::new(|| {
            let mut buf = vec![0u8; 4096];
            let ptr = NonNull::new(buf.as_mut_ptr()).unwrap();
            // SAFETY: the buffer outlives its registration.
            unsafe {
                d.register_host(ptr, 4096).unwrap();
                d.unregister_host(ptr, 4096).unwrap();
            }
        }),
        Box::new(|| {
            let x = d.create_stream(0).unwrap();
            // SAFETY: just created, destroyed once.
            unsafe { d.destroy_stream(x).unwrap() };
        }),
        Box::new(|| {
            let m = d.alloc_managed(1, 4096).unwrap();
            // SAFETY: just allocated, freed once.
            unsafe { d.free_managed(1, m, 4096).unwrap() };
        }),
    ];
    std::thread::scope(|scope| {
        for call in &first_calls {
            scope.spawn(call);
        }
    });
    assert_eq!(
        f.stat("no_context_errors"),
        refused + 1,
        "no call lacked a context"
    );
    assert!(
        f.stat("ctx_set_current") >= sets + 9,
        "each thread bound one"
    );
    // SAFETY: live handles and allocation, released once.
    unsafe {
        d.synchronize_stream(s).unwrap();
        d.destroy_stream(s).unwrap();
        d.destroy_event(e).unwrap();
        d.free_device(1, p, len).unwrap();
    }
    // The backend leaves the caller's binding as it found it: none stays none, ...
    std::thread::scope(|scope| {
        scope.spawn(|| {
            assert!(current_ctx().is_null());
            d.mem_info(1).unwrap();
            assert!(current_ctx().is_null(), "no context left behind");
        });
    });
    // ... another device's context is put back (the CUDA runtime takes its current
    // device from it: PyTorch on device 1 stays on device 1), ...
    let primary = bind_primary(1);
    let theirs = current_ctx();
    assert_eq!(theirs, primary.ctx);
    d.mem_info(0).unwrap();
    assert_eq!(current_ctx(), theirs, "the caller's context is restored");
    // ... and a caller already in the right context costs no switch at all.
    let before = f.stat("ctx_set_current");
    d.mem_info(1).unwrap();
    d.mem_info(1).unwrap();
    assert_eq!(f.stat("ctx_set_current"), before);
}

/// Dropping the last backend releases the primary contexts, which resets them: what
/// was left in them is freed by the driver.
#[test]
fn dropping_the_backend_releases_and_resets_the_contexts() {
    let (f, _g, b) = setup();
    let resets = f.stat("ctx_resets");
    let leaked = b.alloc_device(0, MIB).unwrap();
    let _ = leaked;
    let leaked_stream = b.create_stream(1).unwrap();
    let _ = leaked_stream;
    assert_eq!(f.stat("used:0"), MIB as i64);
    let refs = (f.stat("ctx_refcount:0"), f.stat("ctx_refcount:1"));
    drop(b);
    assert_eq!(
        (f.stat("ctx_refcount:0"), f.stat("ctx_refcount:1")),
        (refs.0 - 1, refs.1 - 1)
    );
    if refs == (1, 1) {
        assert_eq!(f.stat("ctx_resets"), resets + 2, "both devices' contexts");
        assert_eq!(f.stat("used:0"), 0, "reset frees the context's memory");
        assert_eq!(f.stat("streams"), 0);
        // Nothing was current on this thread before the drop, nor is after.
        assert!(current_ctx().is_null());
    }
    // A new backend starts clean.
    let b = CudaBackend::new().unwrap();
    assert_eq!(b.mem_info(0).unwrap().free, DEVICE_MEM);
}

/// One device refuses contexts (another process holds it in EXCLUSIVE_PROCESS mode):
/// the backend still opens and lists it, the other device works, and every call on the
/// refusing one returns the driver's code with the device named, trying again each
/// time. Run with device 1 refusing, then device 0 (host-side calls then use device 1).
#[test]
fn a_device_that_refuses_contexts_leaves_the_others_usable() {
    const TEST: &str = "contexts::a_device_that_refuses_contexts_leaves_the_others_usable";
    let Ok(bad) = std::env::var("FAKE_CUDA_RETAIN_FAIL_DEVICE") else {
        for bad in ["1", "0"] {
            run_alone(
                TEST,
                &[(CHILD_ENV, TEST), ("FAKE_CUDA_RETAIN_FAIL_DEVICE", bad)],
            );
        }
        return;
    };
    let bad: usize = bad.parse().unwrap();
    let good = 1 - bad;
    let f = fake();
    let b = CudaBackend::new().expect("one refusing device leaves the backend available");
    let d: &dyn Backend = &b;
    // Listed in full: none of this needs a context.
    assert_eq!(d.devices().len(), 2);
    let info = &d.devices()[bad];
    assert_eq!(info.name, format!("Fake NVIDIA H100 {bad}"));
    assert_eq!(info.total_memory, DEVICE_MEM);
    assert_eq!(
        info.pci_bus_id.as_deref(),
        Some(format!("0000:{:02x}:00.0", 0x1a + bad).as_str())
    );
    assert_eq!(f.stat("retained_contexts"), 0, "nothing opened by new");

    let refused = |err: Error| {
        let message = assert_driver(
            KIND,
            err,
            "cuDevicePrimaryCtxRetain",
            code::DEVICE_UNAVAILABLE,
        );
        assert!(
            message.contains(&format!("CUDA device {bad} (Fake NVIDIA H100 {bad})"))
                && message.contains("busy or unavailable"),
            "{message}"
        );
    };
    // Host-side work first: it opens the device that works.
    let mut buf = vec![0u8; 2 * MIB];
    let pinned = NonNull::new(buf.as_mut_ptr()).unwrap();
    // SAFETY: `buf` outlives its registration, undone below.
    unsafe { d.register_host(pinned, buf.len()).unwrap() };
    assert_eq!(f.stat(&format!("ctx_refcount:{good}")), 1);
    let data: Vec<u8> = (0..MIB).map(|i| (i * 3) as u8).collect();
    let p = d.alloc_device(good, MIB).unwrap();
    // SAFETY: live memory of MIB bytes each; synchronous copies; freed once.
    unsafe {
        d.copy(
            dev(good, p),
            MemRef::Host {
                ptr: NonNull::new(data.as_ptr() as *mut u8).unwrap(),
                kind: HostKind::Pageable,
            },
            MIB,
            None,
        )
        .unwrap();
        assert_eq!(peek(d, good, p, MIB), data);
    }
    assert_eq!(d.vmm_granularity(good), Some(PAGE));
    for attempt in 0..2 {
        let retains = f.stat("ctx_retains");
        refused(d.alloc_device(bad, MIB).unwrap_err());
        refused(d.mem_info(bad).unwrap_err());
        refused(d.create_stream(bad).unwrap_err());
        refused(d.reserve_address(bad, PAGE).unwrap_err());
        // SAFETY: `p` is live memory of `good`; the copy is refused before it is queued.
        refused(unsafe { d.copy(dev(bad, DevicePtr(p.0)), dev(good, p), 4096, None) }.unwrap_err());
        assert_eq!(d.vmm_granularity(bad), None, "attempt {attempt}");
        assert_eq!(f.stat("ctx_retains"), retains, "every attempt refused");
        assert_eq!(f.stat(&format!("ctx_refcount:{bad}")), 0);
    }
    // A Manager on the same machine: the working device's pool and buffers work.
    let mgr = cuda_manager();
    let pool = mgr.device_pool(good, PoolConfig::default()).unwrap();
    let s = mgr.create_stream(good).unwrap();
    let blk = pool.alloc(3 * MIB, &s).unwrap();
    blk.write(0, &data[..4]).unwrap();
    let mut out = [0u8; 4];
    blk.read(0, &mut out).unwrap();
    assert_eq!(out[..], data[..4]);
    assert!(matches!(
        mgr.alloc(Placement::Device(bad), MIB),
        Err(Error::Driver {
            code: code::DEVICE_UNAVAILABLE,
            ..
        })
    ));
    drop((blk, s, pool, mgr));
    // SAFETY: registered above; freed once; nothing queued uses them.
    unsafe {
        d.unregister_host(pinned, buf.len()).unwrap();
        d.free_device(good, p, MIB).unwrap();
    }
    drop(b);
    assert_eq!(f.stat("retained_contexts"), 0);
}

/// A process that uses one GPU of two (a `torchrun` rank: its thread has its GPU's
/// context current, as the CUDA runtime leaves it) makes no context on the other:
/// device memory, streams, the pool, pinned host memory and synchronous copies all stay
/// on its device (host-side calls take the current context's device, not device 0).
#[test]
fn only_the_devices_used_are_opened() {
    let f = fake();
    let _g = FakeCuda::serial();
    let before = (f.stat("ctx_refcount:0"), f.stat("ctx_refcount:1"));
    let rank = bind_primary(1); // torch.cuda.set_device(1), as the runtime does it
    let mgr = cuda_manager();
    assert_eq!(mgr.devices().len(), 2, "both listed");
    let mut pinned = mgr
        .alloc(Placement::Pinned(NumaPolicy::Default), 3 * MIB)
        .unwrap();
    mgr.write(&mut pinned, 0, &layer_bytes(1, 3 * MIB)).unwrap();
    let mut on_dev = mgr.alloc(Placement::Device(1), 3 * MIB).unwrap();
    let s = mgr.create_stream(1).unwrap();
    mgr.copy(&mut on_dev, 0, &pinned, 0, 3 * MIB, Some(&s))
        .unwrap();
    let pool = mgr.device_pool(1, PoolConfig::default()).unwrap();
    let blk = pool.alloc(5 * MIB, &s).unwrap();
    blk.write(0, &[7; 64]).unwrap();
    let host_pool = mgr.host_pool(HostPoolConfig::default()).unwrap();
    drop(
        host_pool
            .alloc_pinned(&NumaPolicy::Default, 4 * MIB)
            .unwrap(),
    );
    s.synchronize().unwrap();
    assert_eq!(
        f.stat("ctx_refcount:0"),
        before.0,
        "device 0 never opened: no context made on it"
    );
    assert_eq!(
        f.stat("ctx_refcount:1"),
        before.1 + 2,
        "the rank's and the backend's"
    );
    assert_eq!(current_ctx(), rank.ctx, "still the rank's device");
    drop((blk, pool, host_pool, s, on_dev, pinned, mgr));
    assert_eq!(f.stat("ctx_refcount:1"), before.1 + 1);
    assert_eq!(current_ctx(), rank.ctx);
    drop(rank);
    assert_eq!(f.stat("registrations"), 0);
}

/// The caller's current context is left as it was, by every call and by dropping the
/// backend, also when it is one of the backend's own primary contexts (PyTorch's,
/// which it retains itself): unbinding it would move PyTorch off its device and fail
/// its next call.
#[test]
fn dropping_the_backend_leaves_the_callers_context_current() {
    let f = fake();
    let _g = FakeCuda::serial();
    let alloc: CuMemAllocFn = raw(c"cuMemAlloc_v2");
    let free: CuMemFreeFn = raw(c"cuMemFree_v2");
    for theirs in [0, 1] {
        let primary = bind_primary(theirs);
        let b = CudaBackend::new().unwrap();
        let d: &dyn Backend = &b;
        let mut buf = vec![1u8; 2 * MIB];
        let hp = NonNull::new(buf.as_mut_ptr()).unwrap();
        // SAFETY: live buffers and handles, synchronous copies, each freed once.
        unsafe {
            for device in [0, 1] {
                let p = d.alloc_device(device, 2 * MIB).unwrap();
                d.copy(dev(device, p), host(&mut buf), 2 * MIB, None)
                    .unwrap();
                let s = d.create_stream(device).unwrap();
                d.copy(host(&mut buf), dev(device, p), 2 * MIB, Some(s))
                    .unwrap();
                d.synchronize_stream(s).unwrap();
                d.destroy_stream(s).unwrap();
                d.free_device(device, p, 2 * MIB).unwrap();
                assert_eq!(current_ctx(), primary.ctx, "after calls on device {device}");
            }
            d.register_host(hp, 2 * MIB).unwrap();
            d.unregister_host(hp, 2 * MIB).unwrap();
        }
        assert_eq!(current_ctx(), primary.ctx);
        drop(b);
        assert_eq!(
            current_ctx(),
            primary.ctx,
            "device {theirs}'s context is still current after the drop"
        );
        // And alive: the caller's own reference kept it.
        let mut p = 0u64;
        // SAFETY: a valid out-pointer; the allocation is freed at once.
        unsafe {
            assert_eq!(alloc(&mut p, 4096), 0, "the caller's context works");
            assert_eq!(free(p), 0);
        }
        assert_eq!(
            f.stat(&format!("ctx_refcount:{theirs}")),
            1,
            "only the caller's"
        );
        drop(primary);
    }
}
