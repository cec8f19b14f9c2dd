//! Streams the caller lends (used, never destroyed) and the special streams: the legacy
//! stream's implicit order and the per-thread streams.

use super::*;

// --------------------------------------------------------------- foreign streams

#[test]
fn foreign_streams_are_used_and_never_destroyed() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let streams = f.stat("streams");
    let create: CuStreamCreateFn = raw(c"cuStreamCreate");
    let destroy: CuStreamFn = raw(c"cuStreamDestroy_v2");
    let len = 4096;
    let p0 = d.alloc_device(0, len).unwrap();
    let p1 = d.alloc_device(1, len).unwrap();
    let mut data = vec![5u8; len];
    let mut out = vec![0u8; len];
    let _ctx = bind_primary(0); // the caller's own stream is made in device 0's context
    let mut raw_stream = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; device 0's context is current on this thread.
    let made = unsafe { create(&mut raw_stream, 0) };
    assert_eq!(made, 0, "a blocking stream");
    let raw_value = raw_stream as u64;
    // SAFETY: a live stream of device 0 from the same driver, forgotten before it is
    // destroyed; copies are synchronised before the buffers drop.
    unsafe {
        let s = d.import_stream(0, raw_value).unwrap();
        assert_eq!(s.0, raw_value);
        d.copy(dev(0, p0), host(&mut data), len, Some(s)).unwrap();
        d.copy(host(&mut out), dev(0, p0), len, Some(s)).unwrap();
        assert!(out.iter().all(|&x| x == 0), "queued on the caller's stream");
        d.synchronize_stream(s).unwrap();
        assert_eq!(out, data);
        // Claimed for device 1 although the driver made it in device 0's context: the
        // backend cannot tell, the driver refuses an event of device 1 on it.
        let e1 = d.create_event(1).unwrap();
        assert!(
            d.import_stream(1, raw_value).is_err(),
            "one stream, one device"
        );
        d.forget_stream(s).unwrap();
        let wrong = d.import_stream(1, raw_value).unwrap();
        assert_driver(
            KIND,
            d.record_event(e1, wrong).unwrap_err(),
            "cuEventRecord",
            code::INVALID_HANDLE,
        );
        d.forget_stream(wrong).unwrap();

        // The legacy default stream of device 1: a queue like any stream's.
        let legacy = d.import_stream(1, 0).unwrap();
        out.fill(0);
        d.copy(dev(1, p1), host(&mut data), len, Some(legacy))
            .unwrap();
        d.copy(host(&mut out), dev(1, p1), len, Some(legacy))
            .unwrap();
        assert!(out.iter().all(|&x| x == 0), "queued on the legacy stream");
        d.synchronize_stream(legacy).unwrap();
        assert_eq!(out, data, "run in order");
        d.record_event(e1, legacy).unwrap();
        d.synchronize_event(e1).unwrap();
        d.synchronize_stream(legacy).unwrap();
        d.forget_stream(legacy).unwrap();
        d.destroy_event(e1).unwrap();
        assert_eq!(
            f.stat("streams"),
            streams + 1,
            "the caller's stream is still alive"
        );
        assert_eq!(destroy(raw_stream), 0);
        d.free_device(0, p0, len).unwrap();
        d.free_device(1, p1, len).unwrap();
    }
}

// ------------------------------------------------------------- special streams

/// A stream of device 0 made by "the caller": blocking (flags 0) or non-blocking.
fn caller_stream(b: &dyn Backend, blocking: bool) -> (*mut c_void, hetmem::backend::StreamHandle) {
    let create: CuStreamCreateFn = raw(c"cuStreamCreate");
    // The backend holds the context from here on: releasing the test's own reference
    // below must not reset it (and destroy the stream).
    b.synchronize_device(0).unwrap();
    let _ctx = bind_primary(0);
    let mut s = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; device 0's context is current.
    assert_eq!(unsafe { create(&mut s, u32::from(!blocking)) }, 0);
    // SAFETY: a live stream of device 0 from this driver, forgotten before it is
    // destroyed (`drop_caller_stream`).
    let h = unsafe { b.import_stream(0, s as u64) }.unwrap();
    (s, h)
}

fn drop_caller_stream(b: &dyn Backend, (s, h): (*mut c_void, hetmem::backend::StreamHandle)) {
    let destroy: CuStreamFn = raw(c"cuStreamDestroy_v2");
    let _ctx = bind_primary(0);
    // SAFETY: imported once above; the caller's stream is destroyed after.
    unsafe {
        b.synchronize_stream(h).unwrap();
        b.forget_stream(h).unwrap();
        assert_eq!(destroy(s), 0);
    }
}

/// The fake's model of the legacy stream: its work waits for the work queued before on
/// blocking streams (the caller's flag-0 streams, the per-thread streams), and blocking
/// streams' later work waits for it; non-blocking streams (hetmem's) are not ordered
/// with it either way.
#[test]
fn the_legacy_stream_orders_blocking_streams_and_not_non_blocking_ones() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = 4096;
    let waits = f.stat("implicit_waits");
    // SAFETY: special values of device 0.
    let (legacy, per_thread) = unsafe {
        (
            d.import_stream(0, 0).unwrap(),
            d.import_stream(0, hetmem::backend::PER_THREAD_STREAM)
                .unwrap(),
        )
    };
    let blocking = caller_stream(d, true);
    let non_blocking = d.create_stream(0).unwrap();
    for (name, s, ordered) in [
        ("a blocking stream", blocking.1, true),
        ("the per-thread stream", per_thread, true),
        ("a non-blocking stream", non_blocking, false),
    ] {
        let p = d.alloc_device(0, len).unwrap();
        let mut data = vec![7u8; len];
        let mut out = vec![0u8; len];
        let mut back = vec![9u8; len];
        let mut out2 = vec![0u8; len];
        // SAFETY: the buffers outlive the copies, synchronised below; p is live.
        unsafe {
            // Queued on `s`, then read on the legacy stream.
            d.copy(dev(0, p), host(&mut data), len, Some(s)).unwrap();
            d.copy(host(&mut out), dev(0, p), len, Some(legacy))
                .unwrap();
            d.synchronize_stream(legacy).unwrap();
            assert_eq!(
                out == data,
                ordered,
                "{name}: the legacy stream waited for it: {}",
                out == data
            );
            d.synchronize_stream(s).unwrap();
            // Written on the legacy stream, then read on `s`.
            d.copy(dev(0, p), host(&mut back), len, Some(legacy))
                .unwrap();
            d.copy(host(&mut out2), dev(0, p), len, Some(s)).unwrap();
            d.synchronize_stream(s).unwrap();
            assert_eq!(
                out2 == back,
                ordered,
                "{name}: it waited for the legacy stream: {}",
                out2 == back
            );
            d.synchronize_stream(legacy).unwrap();
            d.free_device(0, p, len).unwrap();
        }
    }
    assert!(f.stat("implicit_waits") >= waits + 4);
    // SAFETY: imported or made above, not used after.
    unsafe {
        d.forget_stream(legacy).unwrap();
        d.forget_stream(per_thread).unwrap();
        d.destroy_stream(non_blocking).unwrap();
    }
    drop_caller_stream(d, blocking);
}

/// A copy with no stream is ordered as cuMemcpy is: after the work queued before it on
/// the legacy stream and, through it, on blocking streams (a kernel's output written on
/// stream 0 is what it reads); not after non-blocking streams' work, which the caller
/// orders (hetmem's buffers do it with fences).
#[test]
fn a_copy_without_a_stream_follows_the_legacy_stream() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = 4096;
    // SAFETY: the legacy stream of device 0.
    let legacy = unsafe { d.import_stream(0, 0) }.unwrap();
    let blocking = caller_stream(d, true);
    let non_blocking = d.create_stream(0).unwrap();
    for (name, s, ordered) in [
        ("the legacy stream", legacy, true),
        ("a blocking stream", blocking.1, true),
        ("a non-blocking stream", non_blocking, false),
    ] {
        let p = d.alloc_device(0, len).unwrap();
        let mut data = vec![3u8; len];
        let mut out = vec![0u8; len];
        // SAFETY: the buffers outlive the copies, synchronised below; p is live.
        unsafe {
            d.copy(dev(0, p), host(&mut data), len, Some(s)).unwrap();
            d.copy(host(&mut out), dev(0, p), len, None).unwrap();
            assert_eq!(
                out == data,
                ordered,
                "{name}: the synchronous copy read what was queued there: {}",
                out == data
            );
            d.synchronize_stream(s).unwrap();
            d.free_device(0, p, len).unwrap();
        }
    }
    assert_eq!(f.stat("legacy_pending"), 0);
    // SAFETY: imported or made above, not used after.
    unsafe {
        d.forget_stream(legacy).unwrap();
        d.destroy_stream(non_blocking).unwrap();
    }
    drop_caller_stream(d, blocking);
}

/// The same, but the block is freed on a third thread, which cannot name the first
/// thread's per-thread stream: it is handed on after the whole device (cuCtxSynchronize).
#[test]
fn a_per_thread_block_freed_on_another_thread_waits_for_the_device() {
    let (f, _g, _b) = setup();
    let mgr = cuda_manager();
    let cfg = PoolConfig {
        budget: Budget::Bytes(PAGE),
        ..PoolConfig::default()
    };
    let pool = mgr.device_pool(0, cfg).unwrap();
    // SAFETY: every thread has a per-thread stream on device 0.
    let s = unsafe { hetmem::Stream::wrap(&mgr, 0, hetmem::backend::PER_THREAD_STREAM) }.unwrap();
    let mut mine = mgr
        .alloc(Placement::Host(NumaPolicy::Default), PAGE)
        .unwrap();
    mine.as_mut_slice().unwrap().fill(1);
    let mut blk = pool.alloc(PAGE, &s).unwrap();
    let addr = blk.ptr();
    mgr.copy(&mut blk, 0, &mine, 0, PAGE, Some(&s)).unwrap();
    std::thread::scope(|t| {
        t.spawn(move || drop(blk));
    });
    assert!(
        f.stat("per_thread_pending") > 0,
        "the copy is still queued on this thread's stream"
    );
    let syncs = f.stat("ctx_synchronizes");
    std::thread::scope(|t| {
        t.spawn(|| {
            let blk = pool.alloc(PAGE, &s).unwrap();
            assert_eq!(blk.ptr(), addr, "the budget leaves one block");
            assert_eq!(
                f.stat("per_thread_pending"),
                0,
                "the first thread's copy ran before the block was handed on"
            );
        });
    });
    assert_eq!(f.stat("ctx_synchronizes"), syncs + 1);
}

/// The driver calls a pool and copies make on the driver itself (counted by the fake):
/// events are recorded again, not made per copy; a pool growing by ten 16 MiB blocks
/// makes at most one physical allocation (one map) per growth, gives each run of them
/// access with one call, and serving the same sizes again calls the driver for no
/// memory at all.
#[test]
fn the_pool_and_copies_call_the_driver_rarely() {
    let (f, _g, _b) = setup();
    let mgr = cuda_manager();
    let calls = |name: &str| f.stat(&format!("calls:{name}"));
    let s = mgr.create_stream(0).unwrap();
    let src = mgr.alloc(Placement::Device(0), MIB).unwrap();
    let mut dst = mgr.alloc(Placement::Device(0), MIB).unwrap();
    let events = calls("cuEventCreate");
    for _ in 0..200 {
        mgr.copy(&mut dst, 0, &src, 0, MIB, Some(&s)).unwrap();
    }
    s.synchronize().unwrap();
    assert!(
        calls("cuEventCreate") - events <= 4,
        "{} events made for 200 copies",
        calls("cuEventCreate") - events
    );
    let p = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let before: Vec<i64> = ["cuMemCreate", "cuMemMap", "cuMemSetAccess"]
        .iter()
        .map(|c| calls(c))
        .collect();
    let blocks: Vec<_> = (0..10).map(|_| p.alloc(16 * MIB, &s).unwrap()).collect();
    let grown: Vec<i64> = ["cuMemCreate", "cuMemMap", "cuMemSetAccess"]
        .iter()
        .zip(&before)
        .map(|(c, b)| calls(c) - b)
        .collect();
    assert!(
        grown[0] <= 10 && grown[1] == grown[0],
        "creates, maps: {grown:?}"
    );
    assert!(
        grown[2] <= grown[0],
        "one set-access per run at most: {grown:?}"
    );
    drop(blocks);
    let steady: Vec<i64> = ["cuMemCreate", "cuMemMap", "cuMemSetAccess", "cuMemUnmap"]
        .iter()
        .map(|c| calls(c))
        .collect();
    for _ in 0..5 {
        let again: Vec<_> = (0..10).map(|_| p.alloc(16 * MIB, &s).unwrap()).collect();
        drop(again);
    }
    let after: Vec<i64> = ["cuMemCreate", "cuMemMap", "cuMemSetAccess", "cuMemUnmap"]
        .iter()
        .map(|c| calls(c))
        .collect();
    assert_eq!(
        after, steady,
        "no driver call for memory the pool already has"
    );
}
