//! Unit tests of the simulator: the clock, addresses, capture and driver costs.

use super::clock::Timeline;
use super::config::parse_bytes;
use super::memory::{place, take_run, ADDR_RUN, DEVICE_ALIGN, MAX_RUN};
use super::*;
use crate::backend::{Backend, DevicePtr, HostKind, MemRef, LEGACY_STREAM, PER_THREAD_STREAM};

/// A simulator whose driver calls cost nothing: for tests of the copy and kernel
/// clock alone.
fn clock_only(cfg: SimConfig) -> SimBackend {
    SimBackend::new(SimConfig {
        driver: DriverCosts::zero(),
        ..cfg
    })
    .unwrap()
}

/// Handle 2 is the calling thread's own stream: the same handle on two threads names
/// two streams with two clocks.
#[test]
fn the_per_thread_stream_is_the_calling_threads() {
    let sim = clock_only(SimConfig::with_devices(1, 1 << 30));
    // SAFETY: 2 is the per-thread stream, which every thread has.
    let s = unsafe { sim.import_stream(0, PER_THREAD_STREAM).unwrap() };
    assert!(s.0 >= SPECIAL_STREAMS, "a token, not the raw value");
    let k = sim.launch_kernel(s, Duration::from_millis(5)).unwrap();
    assert_eq!(sim.stream_time_ns(s).unwrap(), k.end_ns);
    let e = sim.create_event(0).unwrap();
    std::thread::scope(|t| {
        t.spawn(|| {
            assert_eq!(
                sim.stream_time_ns(s).unwrap(),
                0,
                "another thread's per-thread stream has nothing queued"
            );
            // SAFETY: live handles of this backend.
            unsafe { sim.record_event(e, s).unwrap() };
            assert_eq!(sim.event_time_ns(e).unwrap(), Some(0));
            // Synchronising it waits for this thread's stream only.
            // SAFETY: as above.
            unsafe { sim.synchronize_stream(s).unwrap() };
            assert!(sim.host_time_ns() < k.end_ns);
        });
    });
    // SAFETY: as above.
    unsafe { sim.record_event(e, s).unwrap() };
    assert_eq!(sim.event_time_ns(e).unwrap(), Some(k.end_ns));
    // No sim handle is ever one of the drivers' special values.
    let made = sim.create_stream(0).unwrap();
    assert!(made.0 >= SPECIAL_STREAMS);
    sim.synchronize_device(0).unwrap();
    assert_eq!(
        sim.host_time_ns(),
        k.end_ns,
        "the device waits for every thread"
    );
}

/// The legacy stream (0 and 1) follows the blocking (per-thread) streams and they
/// follow it; non-blocking streams take no part; a copy with no stream is ordered
/// as `cuMemcpy`, after the legacy stream and the blocking streams.
#[test]
fn the_legacy_stream_orders_blocking_streams_only() {
    let sim = clock_only(SimConfig::with_devices(1, 1 << 30));
    // SAFETY: special values every device has.
    let (legacy, legacy1, per_thread) = unsafe {
        (
            sim.import_stream(0, 0).unwrap(),
            sim.import_stream(0, LEGACY_STREAM).unwrap(),
            sim.import_stream(0, PER_THREAD_STREAM).unwrap(),
        )
    };
    assert_eq!(legacy, legacy1, "0 and 1 are one stream");
    let other = sim.create_stream(0).unwrap();
    let e = sim.create_event(0).unwrap();
    let ms = Duration::from_millis(1);
    let k = sim.launch_kernel(per_thread, ms).unwrap();
    let n = sim.launch_kernel(other, 4 * ms).unwrap();
    assert!(n.end_ns > k.end_ns);
    // SAFETY: live handles of this backend.
    unsafe { sim.record_event(e, legacy).unwrap() };
    assert_eq!(
        sim.event_time_ns(e).unwrap(),
        Some(k.end_ns),
        "after the blocking stream's kernel, not the non-blocking one's"
    );
    let l = sim.launch_kernel(legacy, ms).unwrap();
    assert!(l.start_ns >= k.end_ns);
    // SAFETY: as above.
    unsafe { sim.record_event(e, per_thread).unwrap() };
    assert_eq!(
        sim.event_time_ns(e).unwrap(),
        Some(l.end_ns),
        "the blocking stream follows the legacy one"
    );
    // SAFETY: as above.
    unsafe { sim.record_event(e, other).unwrap() };
    assert_eq!(sim.event_time_ns(e).unwrap(), Some(n.end_ns));
    // A synchronous copy starts after the legacy stream's kernel.
    let dev = sim.alloc_device(0, 4096).unwrap();
    let mut host = vec![0u8; 4096];
    let h = MemRef::Host {
        ptr: NonNull::new(host.as_mut_ptr()).unwrap(),
        kind: HostKind::Pageable,
    };
    let d = MemRef::Device {
        device: 0,
        ptr: dev,
    };
    // SAFETY: live buffers of 4096 bytes.
    unsafe { sim.copy(h, d, 4096, None).unwrap() };
    assert!(
        sim.host_time_ns() > l.end_ns,
        "the copy ran after the legacy stream's kernel"
    );
}

#[test]
fn parses_sizes() {
    assert_eq!(parse_bytes("123"), Some(123));
    assert_eq!(parse_bytes("64K"), Some(64 << 10));
    assert_eq!(parse_bytes(" 2g "), Some(2 << 30));
    assert_eq!(parse_bytes("1T"), Some(1 << 40));
    assert_eq!(parse_bytes("x"), None);
    assert_eq!(parse_bytes(""), None);
    assert_eq!(parse_bytes("99999999999999999999T"), None);
}

#[test]
fn copy_time_follows_bandwidth_and_engines_overlap() {
    let sim = clock_only(SimConfig::with_devices(1, 1 << 30));
    let lat = sim.config().copy_latency.as_nanos() as u64;
    let mut host = vec![7u8; 1 << 20];
    let hp = NonNull::new(host.as_mut_ptr()).unwrap();
    // SAFETY: `host` outlives the registration, which is undone below.
    unsafe { sim.register_host(hp, host.len()).unwrap() };
    let dev = sim.alloc_device(0, 1 << 20).unwrap();
    let (a, b) = (sim.create_stream(0).unwrap(), sim.create_stream(0).unwrap());
    let h = MemRef::Host {
        ptr: hp,
        kind: HostKind::Pinned,
    };
    let d = MemRef::Device {
        device: 0,
        ptr: dev,
    };
    // SAFETY: live handles and buffers of 1 MiB each.
    unsafe {
        sim.copy(d, h, 1 << 20, Some(a)).unwrap();
        sim.copy(h, d, 1 << 20, Some(b)).unwrap();
    }
    let one = lat + ((1u64 << 20) as f64 / 55.3).ceil() as u64;
    // Two directions use two engines: both end after one copy's time.
    assert_eq!(sim.stream_time_ns(a).unwrap(), one);
    assert_eq!(sim.stream_time_ns(b).unwrap(), one);
    // A second H2D on another stream queues behind the first on the engine.
    // SAFETY: as above.
    unsafe { sim.copy(d, h, 1 << 20, Some(b)).unwrap() };
    assert_eq!(sim.stream_time_ns(b).unwrap(), 2 * one);
    assert_eq!(
        sim.host_time_ns(),
        0,
        "pinned async copies do not block the host"
    );
    // SAFETY: registered above; no work is pending in the virtual sense that matters.
    unsafe {
        sim.synchronize_stream(b).unwrap();
        sim.unregister_host(hp, host.len()).unwrap();
    }
    assert_eq!(sim.host_time_ns(), 2 * one);
    // Pageable now: slower, and blocks the host.
    // SAFETY: as above.
    unsafe { sim.copy(d, h, 1 << 20, Some(a)).unwrap() };
    let pageable = lat + ((1u64 << 20) as f64 / 8.0).ceil() as u64;
    assert_eq!(sim.host_time_ns(), 2 * one + pageable);
    assert_eq!(sim.stats().h2d_bytes, 3 << 20);
}

/// Back-to-back work leaves one span, however long the host runs ahead; gaps are
/// still found and filled, and filling one joins its neighbours.
#[test]
fn timelines_stay_short_and_keep_their_gaps() {
    let mut t = Timeline::default();
    for i in 0..10_000 {
        assert_eq!(t.place(0, 10, 0), (i * 10, i * 10 + 10));
    }
    assert_eq!(t.busy, vec![(0, 100_000)]);
    assert_eq!(t.place(200_000, 10, 0), (200_000, 200_010));
    assert_eq!(t.place(100_000, 50, 0), (100_000, 100_050), "fills the gap");
    assert_eq!(t.busy.len(), 2, "joined to the span before it");
    assert_eq!(
        t.place(0, 99_950, 0),
        (100_050, 200_000),
        "exactly fills the rest"
    );
    assert_eq!(t.busy, vec![(0, 200_010)]);
    assert_eq!(t.place(300_000, 10, 300_000), (300_000, 300_010));
    assert_eq!(
        t.busy,
        vec![(300_000, 300_010)],
        "the floor forgets the past"
    );
}

#[test]
fn engines_fill_gaps_left_by_waiting_work() {
    let sim = clock_only(SimConfig::with_devices(1, 1 << 30));
    let mut host = vec![1u8; 1 << 20];
    let h = MemRef::Host {
        ptr: NonNull::new(host.as_mut_ptr()).unwrap(),
        kind: HostKind::Pinned,
    };
    // SAFETY: `host` outlives the registration, undone at the end.
    unsafe {
        sim.register_host(NonNull::new(host.as_mut_ptr()).unwrap(), 1 << 20)
            .unwrap()
    };
    let dev = sim.alloc_device(0, 1 << 20).unwrap();
    let d = MemRef::Device {
        device: 0,
        ptr: dev,
    };
    let (a, b) = (sim.create_stream(0).unwrap(), sim.create_stream(0).unwrap());
    // a: a 10 ms kernel, then a copy that must wait for it.
    sim.launch_kernel(a, Duration::from_millis(10)).unwrap();
    // SAFETY: live handles and 1 MiB buffers.
    unsafe { sim.copy(d, h, 1 << 20, Some(a)).unwrap() };
    assert!(sim.stream_time_ns(a).unwrap() > 10_000_000);
    // b is idle: its copy runs now, in the gap before a's copy, not after it.
    // SAFETY: as above.
    unsafe { sim.copy(d, h, 1 << 20, Some(b)).unwrap() };
    let one = sim.copy_ns(1 << 20, 55.3);
    assert_eq!(sim.stream_time_ns(b).unwrap(), one);
    // A prefetch to the device occupies the same engine: it waits for b's copy.
    let m = sim.alloc_managed(0, 1 << 20).unwrap();
    // SAFETY: live managed allocation and stream.
    unsafe { sim.prefetch(m, 1 << 20, Location::Device(0), b).unwrap() };
    assert_eq!(sim.stream_time_ns(b).unwrap(), 2 * one);
    // SAFETY: registered above; the managed buffer is ours.
    unsafe {
        sim.unregister_host(NonNull::new(host.as_mut_ptr()).unwrap(), 1 << 20)
            .unwrap();
        sim.free_managed(0, m, 1 << 20).unwrap();
    }
}

#[test]
fn clock_and_addresses_never_overflow() {
    let sim = SimBackend::new(SimConfig::default()).unwrap();
    let s = sim.create_stream(0).unwrap();
    let k1 = sim.launch_kernel(s, Duration::MAX).unwrap();
    let k2 = sim.launch_kernel(s, Duration::MAX).unwrap();
    assert_eq!((k1.end_ns, k2.end_ns), (u64::MAX, u64::MAX));
    let slow = SimConfig {
        h2d_gbps: 1e-15,
        ..SimConfig::default()
    };
    assert!(SimBackend::new(slow).is_err());
    let many = SimConfig::with_devices(MAX_DEVICES + 1, 1 << 20);
    assert!(SimBackend::new(many).is_err());
    let huge = SimConfig::with_devices(1, MAX_CAPACITY + 1);
    assert!(SimBackend::new(huge).is_err());
    // The last device of the largest machine still gets usable addresses.
    let big = SimBackend::new(SimConfig::with_devices(MAX_DEVICES, 1 << 20)).unwrap();
    let p = big.alloc_device(MAX_DEVICES - 1, 4096).unwrap();
    // SAFETY: allocated just above; the first free is refused (wrong device).
    unsafe {
        assert!(big.free_device(0, p, 4096).is_err());
        big.free_device(MAX_DEVICES - 1, p, 4096).unwrap();
    }
    // A run is used up and the next one taken; too large a request is refused.
    let q = big.alloc_device(0, 4096).unwrap();
    assert!(take_run(MAX_RUN + 1).is_none());
    assert!(place(&mut big.lock(), 0, MAX_RUN as usize, DEVICE_ALIGN).is_none());
    let mut st = big.lock();
    st.addr[0].next = st.addr[0].end - 1024;
    drop(st);
    let r = big.alloc_device(0, 4096).unwrap();
    assert!(
        r.0 >= q.0 + ADDR_RUN - 1024 && r.0.is_multiple_of(ADDR_RUN),
        "{r:?} after {q:?}"
    );
    // SAFETY: both allocated just above.
    unsafe {
        big.free_device(0, q, 4096).unwrap();
        big.free_device(0, r, 4096).unwrap();
    }
}

#[test]
fn stale_and_foreign_device_pointers_are_errors() {
    let sim = SimBackend::new(SimConfig::with_devices(2, 1 << 20)).unwrap();
    let p = sim.alloc_device(0, 4096).unwrap();
    // SAFETY: every call here is on handles the test controls; the backend validates them.
    unsafe {
        assert!(sim.free_device(1, p, 4096).is_err(), "wrong device");
        assert!(sim.free_device(0, p, 100).is_err(), "wrong size");
        sim.free_device(0, p, 4096).unwrap();
        assert!(sim.free_device(0, p, 4096).is_err(), "double free");
    }
    let mut buf = [0u8; 16];
    let h = MemRef::Host {
        ptr: NonNull::new(buf.as_mut_ptr()).unwrap(),
        kind: HostKind::Pageable,
    };
    // SAFETY: the device side is stale; the backend must refuse before copying.
    let r = unsafe { sim.copy(h, MemRef::Device { device: 0, ptr: p }, 16, None) };
    assert!(r.is_err());
}

/// Two simulators in one process (two managers) never share a device address, so a
/// pointer of one is refused by the other, whose memory is left alone: as strict as
/// a GPU driver, where another context's pointer is not a live allocation.
#[test]
fn simulators_and_their_devices_never_share_an_address() {
    let (a, b) = (
        SimBackend::new(SimConfig::with_devices(2, 1 << 20)).unwrap(),
        SimBackend::new(SimConfig::with_devices(2, 1 << 20)).unwrap(),
    );
    let pa: Vec<DevicePtr> = (0..2).map(|d| a.alloc_device(d, 4096).unwrap()).collect();
    let pb: Vec<DevicePtr> = (0..2).map(|d| b.alloc_device(d, 4096).unwrap()).collect();
    let ra = a.reserve_address(0, VMM_GRANULARITY).unwrap();
    let rb = b.reserve_address(0, VMM_GRANULARITY).unwrap();
    let mut all: Vec<u64> = pa
        .iter()
        .chain(&pb)
        .chain([&ra, &rb])
        .map(|p| p.0)
        .collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len(),
        6,
        "addresses shared: {pa:?} {pb:?} {ra:?} {rb:?}"
    );
    let mut bytes = [7u8; 16];
    let host = MemRef::Host {
        ptr: NonNull::new(bytes.as_mut_ptr()).unwrap(),
        kind: HostKind::Pageable,
    };
    // SAFETY: every device pointer is checked by the backend before it is used; the
    // host range is this test's 16 bytes.
    unsafe {
        a.copy(
            MemRef::Device {
                device: 0,
                ptr: pa[0],
            },
            host,
            16,
            None,
        )
        .unwrap();
        for (d, &ptr) in pb.iter().enumerate() {
            let theirs = MemRef::Device { device: d, ptr };
            assert!(
                a.copy(theirs, host, 16, None).is_err(),
                "a writes b's memory"
            );
            assert!(
                a.copy(host, theirs, 16, None).is_err(),
                "a reads b's memory"
            );
            assert!(a.free_device(d, ptr, 4096).is_err(), "a frees b's memory");
        }
        assert!(a.free_address(0, rb, VMM_GRANULARITY).is_err());
        let mut back = [0u8; 16];
        let out = MemRef::Host {
            ptr: NonNull::new(back.as_mut_ptr()).unwrap(),
            kind: HostKind::Pageable,
        };
        a.copy(
            out,
            MemRef::Device {
                device: 0,
                ptr: pa[0],
            },
            16,
            None,
        )
        .unwrap();
        assert_eq!(back, [7u8; 16], "a's bytes are untouched");
        for d in 0..2 {
            a.free_device(d, pa[d], 4096).unwrap();
            b.free_device(d, pb[d], 4096).unwrap();
        }
        a.free_address(0, ra, VMM_GRANULARITY).unwrap();
        b.free_address(0, rb, VMM_GRANULARITY).unwrap();
    }
}

#[test]
fn kernels_and_events_order_streams() {
    let sim = clock_only(SimConfig::default());
    let (a, b) = (sim.create_stream(0).unwrap(), sim.create_stream(0).unwrap());
    let k = sim.launch_kernel(a, Duration::from_micros(100)).unwrap();
    assert_eq!(
        k,
        Span {
            start_ns: 0,
            end_ns: 100_000
        }
    );
    let e = sim.create_event(0).unwrap();
    // SAFETY: live handles.
    unsafe {
        sim.record_event(e, a).unwrap();
        assert!(!sim.event_done(e).unwrap());
        sim.stream_wait_event(b, e).unwrap();
    }
    // The compute engine is busy until 100 µs, and b waited for a anyway.
    let k2 = sim.launch_kernel(b, Duration::from_micros(10)).unwrap();
    assert_eq!(k2.start_ns, 100_000);
    // SAFETY: live handle.
    unsafe { sim.synchronize_event(e).unwrap() };
    assert_eq!(sim.host_time_ns(), 100_000);
    // SAFETY: live handle.
    assert!(unsafe { sim.event_done(e).unwrap() });
}

/// Driver calls block the host for their cost and are counted; freeing waits for
/// the device; mapped memory is unusable until access is set; an unmap under a
/// queued copy is refused, and allowed once the copy is done.
#[test]
fn driver_calls_cost_host_time_and_vmm_is_as_strict_as_the_driver() {
    let sim = SimBackend::new(SimConfig::with_devices(2, 1 << 30)).unwrap();
    let costs = sim.config().driver.clone();
    let p = sim.alloc_device(0, 4096).unwrap();
    assert_eq!(sim.host_time_ns(), costs.ns(DriverCall::MemAlloc, 4096));
    let s = sim.create_stream(0).unwrap();
    let k = sim.launch_kernel(s, Duration::from_millis(5)).unwrap();
    let before = sim.host_time_ns();
    // SAFETY: allocated above; the sim waits for the kernel (the contract's part).
    unsafe { sim.free_device(0, p, 4096).unwrap() };
    assert_eq!(
        sim.host_time_ns(),
        k.end_ns.max(before) + costs.ns(DriverCall::MemFree, 4096),
        "cuMemFree waits for the device, then costs its time"
    );

    let page = VMM_GRANULARITY;
    let base = sim.reserve_address(0, 4 * page).unwrap();
    let (a, b) = (
        sim.create_physical(0, page).unwrap(),
        sim.create_physical(0, page).unwrap(),
    );
    let mut buf = vec![3u8; page];
    let h = MemRef::Host {
        ptr: NonNull::new(buf.as_mut_ptr()).unwrap(),
        kind: HostKind::Pageable,
    };
    let d = |off: usize| MemRef::Device {
        device: 0,
        ptr: base.offset(off),
    };
    let t0 = sim.host_time_ns();
    // SAFETY: the pages lie in our reservation, the handles are fresh; every misuse
    // below is refused by the sim before it touches memory.
    unsafe {
        sim.map(0, base, page, a).unwrap();
        sim.map(0, base.offset(page), page, b).unwrap();
        assert!(
            sim.copy(d(0), h, 64, None).is_err(),
            "no access set: a device access would fault"
        );
        assert!(
            sim.set_access(0, base, page + page / 2, &[0]).is_err(),
            "half a mapping"
        );
        assert!(
            sim.set_access(0, base, 2 * page, &[1]).is_err(),
            "owner left out"
        );
        sim.set_access(0, base, 2 * page, &[0, 1]).unwrap();
        sim.copy(d(page - 32), h, 64, None).unwrap();
    }
    let st = sim.stats().driver;
    assert_eq!(
        (st.calls(DriverCall::Map), st.calls(DriverCall::SetAccess)),
        (2, 1),
        "one set-access for two mappings"
    );
    assert!(sim.host_time_ns() - t0 >= 2 * costs.ns(DriverCall::Map, page));
    // A queued copy into page b: its unmap is refused until the copy is done.
    let s2 = sim.create_stream(0).unwrap();
    let reg = NonNull::new(buf.as_mut_ptr()).unwrap();
    // SAFETY: `buf` outlives its registration; the copy lies in mapped pages.
    unsafe {
        sim.register_host(reg, page).unwrap();
        let pinned = MemRef::Host {
            ptr: reg,
            kind: HostKind::Pinned,
        };
        sim.launch_kernel(s2, Duration::from_millis(1)).unwrap();
        sim.copy(d(page), pinned, page, Some(s2)).unwrap();
        let e = sim.unmap(0, base.offset(page), page).unwrap_err();
        assert!(e.to_string().contains("still used"), "{e}");
        sim.unmap(0, base, page).unwrap();
        sim.synchronize_stream(s2).unwrap();
        sim.unmap(0, base.offset(page), page).unwrap();
        sim.unregister_host(reg, page).unwrap();
        sim.release_physical(0, a).unwrap();
        sim.release_physical(0, b).unwrap();
        sim.free_address(0, base, 4 * page).unwrap();
    }
    let st = sim.stats().driver;
    for (call, n) in [
        (DriverCall::Create, 2),
        (DriverCall::Release, 2),
        (DriverCall::Unmap, 2),
        (DriverCall::Reserve, 1),
        (DriverCall::AddressFree, 1),
        (DriverCall::MemAlloc, 1),
        (DriverCall::MemFree, 1),
    ] {
        assert_eq!(st.calls(call), n, "{call}");
    }
    let (_, ns) = st.total();
    assert!(
        ns <= sim.host_time_ns(),
        "every charged ns is on the host's clock"
    );
}
