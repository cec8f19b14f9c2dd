//! The scenarios both driver backends go through against their fakes, step by step
//! alike; listed, as tests, by `driver_scenarios!` in `backend_checks.rs`. Each takes a
//! [`FakeDriver`]: a backend on a fresh machine of two devices with managed memory.

use std::ptr::NonNull;

use super::backend_checks::{
    assert_driver, assert_out_of_memory, assert_refused_by_the_backend, dev, host, peek, Call,
    FakeDriver, ALREADY_REGISTERED, INVALID_HANDLE, INVALID_VALUE, NOT_READY, NOT_REGISTERED,
    OUT_OF_MEMORY, UNKNOWN,
};
use hetmem::pool::{Budget, PoolConfig};
use hetmem::{Advice, Error, Location, MemKind, NumaPolicy, Placement};

const MIB: usize = 1 << 20;

/// On a machine of two devices with `capacity` bytes each, where nothing is allocated:
/// device memory is charged to the device it is allocated on and given back when freed;
/// it is not cleared (both fakes fill it with 0xA5). A double free reaches the driver,
/// which refuses it with an invalid value.
pub fn alloc_and_free_account_on_the_right_device(f: &dyn FakeDriver) {
    let (d, stat) = (f.backend(), |name: &str| f.stat(name));
    let capacity = d.devices()[0].total_memory;
    let p1 = d.alloc_device(1, 3 * MIB).unwrap();
    assert_eq!(stat("used:1"), 3 * MIB as i64);
    assert_eq!(stat("used:0"), 0);
    assert_eq!(d.mem_info(1).unwrap().free, capacity - 3 * MIB);
    assert_eq!(d.mem_info(0).unwrap().free, capacity);
    let p0 = d.alloc_device(0, MIB).unwrap();
    assert_eq!(stat("allocations"), 2);
    assert_ne!(p0, p1);
    assert!(peek(d, 0, p0, 64).iter().all(|&x| x == 0xA5), "not cleared");

    // SAFETY: both came from alloc_device with these sizes and are freed once.
    unsafe {
        d.free_device(1, p1, 3 * MIB).unwrap();
        d.free_device(0, p0, MIB).unwrap();
    }
    assert_eq!(stat("allocations"), 0);
    assert_eq!(stat("used:1"), 0);

    // The contract forbids a double free; the fake proves that the driver's error is
    // mapped rather than swallowed.
    // SAFETY: the fakes never dereference a pointer they do not know.
    let err = unsafe { d.free_device(1, p1, 3 * MIB) }.unwrap_err();
    assert_driver(d.kind(), err, f.call(Call::Free), INVALID_VALUE);

    assert!(matches!(
        d.alloc_device(0, 0),
        Err(Error::InvalidSize { requested: 0, .. })
    ));
    assert!(matches!(
        d.alloc_device(2, MIB),
        Err(Error::UnknownDevice {
            device: 2,
            count: 2,
            ..
        })
    ));
}

/// Registering host memory pins it, portable to every device (flag 1 in both APIs), and
/// unregistering gives it back. Registering it again is refused by the driver (already
/// registered), unregistering it again too (not registered); an empty range is refused
/// by the backend.
pub fn host_registration(f: &dyn FakeDriver) {
    let (d, stat) = (f.backend(), |name: &str| f.stat(name));
    let kind = d.kind();
    let register = (f.call(Call::Register), ALREADY_REGISTERED);
    let unregister = (f.call(Call::Unregister), NOT_REGISTERED);
    let mut buf = vec![0u8; 2 * MIB];
    let p = NonNull::new(buf.as_mut_ptr()).unwrap();
    // SAFETY: `buf` is owned here and outlives the registration.
    unsafe {
        d.register_host(p, buf.len()).unwrap();
        assert_eq!(stat("registrations"), 1);
        assert_eq!(stat("last_register_flags"), 1, "portable");
        let again = d.register_host(p, buf.len()).unwrap_err();
        assert_driver(kind, again, register.0, register.1);
        d.unregister_host(p, buf.len()).unwrap();
        assert_eq!(stat("registrations"), 0);
        let again = d.unregister_host(p, buf.len()).unwrap_err();
        assert_driver(kind, again, unregister.0, unregister.1);
        assert!(matches!(
            d.register_host(p, 0),
            Err(Error::InvalidSize { .. })
        ));
    }
}

/// The fakes hand a destroyed stream's and event's handle values out again, as drivers
/// may: created again for device 1, they must be device 1's to the backend, and stale
/// once destroyed again.
pub fn destroyed_handles_are_reused(f: &dyn FakeDriver) {
    let (d, stat) = (f.backend(), |name: &str| f.stat(name));
    let s0 = d.create_stream(0).unwrap();
    let e0 = d.create_event(0).unwrap();
    let reused = stat("reused_handles");
    // SAFETY: live handles from this backend, destroyed once.
    unsafe {
        d.destroy_stream(s0).unwrap();
        d.destroy_event(e0).unwrap();
    }
    let s1 = d.create_stream(1).unwrap();
    let e1 = d.create_event(1).unwrap();
    assert_eq!(s1, s0, "a destroyed stream's handle value is reused");
    assert_eq!(e1, e0, "a destroyed event's handle value is reused");
    assert_eq!(stat("reused_handles"), reused + 2);

    let len = 4096;
    let p1 = d.alloc_device(1, len).unwrap();
    let p0 = d.alloc_device(0, len).unwrap();
    let mut buf = vec![3u8; len];
    // SAFETY: live, disjoint ranges synchronised before they are dropped; live handles.
    unsafe {
        d.copy(dev(1, p1), host(&mut buf), len, Some(s1)).unwrap();
        d.record_event(e1, s1).unwrap();
        d.synchronize_event(e1).unwrap();
        // The backend knows the value as device 1's stream now, not device 0's.
        assert!(matches!(
            d.copy(dev(0, p0), host(&mut buf), len, Some(s1)),
            Err(Error::InvalidArgument(_))
        ));
        d.free_device(0, p0, len).unwrap();
        d.destroy_event(e1).unwrap();
        d.destroy_stream(s1).unwrap();
        d.free_device(1, p1, len).unwrap();
        // Stale now, and known to be.
        assert!(matches!(
            d.destroy_stream(s1),
            Err(Error::UnknownHandle { what: "stream", .. })
        ));
    }
}

/// `threads` threads each create and destroy a stream and an event `rounds` times, on
/// the two devices in turn, while the driver reuses handle values: the backend's handle
/// maps must never lose a live entry (they would if an entry were removed after the
/// driver had already handed its value out again), and none is left behind.
pub fn handle_churn_across_threads(f: &dyn FakeDriver) {
    let (threads, rounds) = (4, 300);
    let d = f.backend();
    let (reused, streams) = (f.stat("reused_handles"), f.stat("streams"));
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                for i in 0..rounds {
                    let device = (t + i) % 2;
                    let s = d.create_stream(device).unwrap();
                    let e = d.create_event(device).unwrap();
                    // SAFETY: live handles from this backend, each destroyed once.
                    unsafe {
                        d.record_event(e, s).unwrap();
                        d.synchronize_stream(s).unwrap();
                        assert!(d.event_done(e).unwrap());
                        d.destroy_event(e).unwrap();
                        d.destroy_stream(s).unwrap();
                    }
                }
            });
        }
    });
    assert_eq!(f.stat("streams"), streams);
    assert_eq!(f.stat("events"), 0);
    assert!(f.stat("reused_handles") > reused);
}

/// The two devices as the fake configured them, in sysfs form, with their memory all
/// free; an ordinal past them is refused by the backend.
pub fn enumerates_devices(f: &dyn FakeDriver) {
    let d = f.backend();
    assert_eq!(d.devices().len(), 2);
    let mem = d.devices()[0].total_memory;
    assert!(mem > 0);
    for (i, info) in d.devices().iter().enumerate() {
        assert_eq!(info.ordinal, i);
        assert_eq!(info.name, f.device_name(i));
        assert_eq!(info.total_memory, mem);
        assert!(info.managed_memory);
    }
    let ids = f.pci_bus_ids();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(d.devices()[i].pci_bus_id.as_deref(), Some(*id));
    }
    let m = d.mem_info(1).unwrap();
    assert_eq!((m.free, m.total), (mem, mem));
    assert!(matches!(
        d.mem_info(2),
        Err(Error::UnknownDevice {
            device: 2,
            count: 2,
            backend
        }) if backend == d.kind()
    ));
}

/// Out of memory carries the tier, the size asked for and what the driver says is free;
/// one device's use leaves the other's alone; the driver's own out-of-memory answer is
/// mapped the same way whatever the sizes.
pub fn out_of_memory_carries_the_numbers(f: &dyn FakeDriver) {
    let d = f.backend();
    let mem = d.devices()[1].total_memory;
    let (keep_len, ask) = (mem / 4 * 3, mem / 2);
    let keep = d.alloc_device(1, keep_len).unwrap();
    assert_out_of_memory(
        d.alloc_device(1, ask),
        MemKind::Device(1),
        ask,
        mem - keep_len,
    );
    let msg = d.alloc_device(1, ask).unwrap_err().to_string();
    assert!(
        msg.contains("device 1") && msg.contains(&ask.to_string()),
        "{msg}"
    );
    // Device 0 is untouched by device 1's use.
    let other = d.alloc_device(0, mem).unwrap();
    assert_out_of_memory(d.alloc_managed(0, MIB), MemKind::Managed(0), MIB, 0);
    f.fail_next(f.symbol(Call::Alloc), OUT_OF_MEMORY, 1);
    assert_out_of_memory(
        d.alloc_device(1, MIB),
        MemKind::Device(1),
        MIB,
        mem - keep_len,
    );
    // SAFETY: live allocations from this backend, freed once.
    unsafe {
        d.free_device(1, keep, keep_len).unwrap();
        d.free_device(0, other, mem).unwrap();
    }
    assert_eq!(f.stat("allocations"), 0);
}

/// Bytes survive host to device, device to device across devices (on a stream) and
/// back; offsets into an allocation work, a range past its end is refused by the
/// driver, and a copy of nothing touches nothing.
pub fn copies_keep_the_bytes(f: &dyn FakeDriver) {
    let d = f.backend();
    let len = MIB + 123;
    let mut src: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    let mut back = vec![0u8; len];
    let a = d.alloc_device(0, len).unwrap();
    let c = d.alloc_device(1, len).unwrap();
    let s1 = d.create_stream(1).unwrap();
    // SAFETY: all ranges are `len` bytes of live memory, disjoint, kept alive until the
    // stream is synchronised; the stream is live.
    unsafe {
        d.copy(dev(0, a), host(&mut src), len, None).unwrap();
        d.copy(dev(1, c), dev(0, a), len, Some(s1)).unwrap();
        d.copy(host(&mut back), dev(1, c), len, Some(s1)).unwrap();
        assert!(back.iter().all(|&x| x == 0), "queued, not yet run");
        d.synchronize_stream(s1).unwrap();
    }
    assert_eq!(back, src);

    let mut part = vec![0u8; 100];
    // SAFETY: 100 bytes from offset 1000 lie inside the allocation.
    unsafe {
        d.copy(host(&mut part), dev(1, c.offset(1000)), 100, None)
            .unwrap();
    }
    assert_eq!(part[..], src[1000..1100]);
    // SAFETY: the fakes check bounds before touching memory, so this out-of-range copy
    // is refused without reading past the allocation.
    let err = unsafe { d.copy(host(&mut back), dev(1, c.offset(1)), len, None) }.unwrap_err();
    assert_driver(d.kind(), err, f.call(Call::SyncCopy), INVALID_VALUE);
    // SAFETY: zero bytes: nothing is touched.
    unsafe { d.copy(host(&mut back), dev(1, c), 0, None).unwrap() };
    // SAFETY: live handles and allocations from this backend, released once.
    unsafe {
        d.destroy_stream(s1).unwrap();
        d.free_device(0, a, len).unwrap();
        d.free_device(1, c, len).unwrap();
    }
    assert_eq!(f.stat("allocations"), 0);
}

/// Copies on a stream run only when the stream gets there: not before an event
/// recorded behind them is waited for, or the stream synchronised. An event never
/// recorded, or recorded on an idle stream, has passed. Leaves `s` and `e` for the
/// caller's own checks of destruction (the drivers differ there) as `(s, e, src, out)`.
pub fn async_copies_wait_for_their_stream(f: &dyn FakeDriver) {
    let d = f.backend();
    let len = 64 << 10;
    let mut a: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut bytes_b: Vec<u8> = (0..len).map(|i| (i % 13 + 100) as u8).collect();
    let mut out = vec![0u8; len];
    let src = d.alloc_device(0, len).unwrap();
    let dst = d.alloc_device(0, len).unwrap();
    let untouched = peek(d, 0, dst, len);
    assert_ne!(untouched, bytes_b);
    let s = d.create_stream(0).unwrap();
    let e = d.create_event(0).unwrap();
    // SAFETY: every range is `len` bytes of live memory, disjoint, and outlives the
    // synchronisation below; the handles are live and from this backend.
    unsafe {
        d.copy(dev(0, src), host(&mut a), len, None).unwrap();
        assert!(d.event_done(e).unwrap(), "never recorded");
        d.record_event(e, s).unwrap();
        assert!(d.event_done(e).unwrap(), "recorded on an idle stream");

        d.copy(host(&mut out), dev(0, src), len, Some(s)).unwrap();
        d.copy(dev(0, dst), host(&mut bytes_b), len, Some(s))
            .unwrap();
        d.record_event(e, s).unwrap();
        assert_eq!(f.stat("queued_ops"), 3, "two copies and a record");
        // Neither copy has happened: the host destination is as it was, and so is the
        // device one, read through the synchronous path.
        assert!(out.iter().all(|&x| x == 0), "device-to-host copy ran early");
        assert_eq!(peek(d, 0, dst, len), untouched, "host-to-device ran early");
        assert!(!d.event_done(e).unwrap(), "work before the event is queued");

        d.synchronize_event(e).unwrap();
        assert!(d.event_done(e).unwrap());
        assert_eq!(out, a);
        assert_eq!(peek(d, 0, dst, len), bytes_b);
        assert_eq!(f.stat("queued_ops"), 0);

        // Synchronising the stream runs its queue as well.
        out.fill(0);
        d.copy(host(&mut out), dev(0, dst), len, Some(s)).unwrap();
        assert!(out.iter().all(|&x| x == 0));
        d.synchronize_stream(s).unwrap();
        assert_eq!(out, bytes_b);

        d.destroy_event(e).unwrap();
        d.destroy_stream(s).unwrap();
        d.free_device(0, src, len).unwrap();
        d.free_device(0, dst, len).unwrap();
    }
}

/// Streams and events of two devices: recorded, waited for across devices, synchronised,
/// destroyed; an event is its device's ([`FakeDriver::check_cross_device_record`]), and
/// destroyed handles are refused by the backend.
pub fn streams_and_events(f: &dyn FakeDriver) {
    let d = f.backend();
    let streams = f.stat("streams");
    let s0 = d.create_stream(0).unwrap();
    let s1 = d.create_stream(1).unwrap();
    let e1 = d.create_event(1).unwrap();
    assert_eq!(f.stat("streams"), streams + 2);
    assert_eq!(f.stat("events"), 1);
    assert_eq!(f.stat("last_stream_flags"), 1, "non-blocking");
    assert_eq!(f.stat("last_event_flags"), 2, "timing disabled");
    // SAFETY: all handles are live and from this backend.
    unsafe {
        d.record_event(e1, s1).unwrap();
        d.stream_wait_event(s0, e1).unwrap();
        d.synchronize_event(e1).unwrap();
        assert!(d.event_done(e1).unwrap());
        d.synchronize_stream(s0).unwrap();
        f.check_cross_device_record(d.record_event(e1, s0));
        d.destroy_event(e1).unwrap();
        d.destroy_stream(s0).unwrap();
        d.destroy_stream(s1).unwrap();
    }
    assert_eq!(f.stat("streams"), streams);
    assert_eq!(f.stat("events"), 0);
    assert_refused_by_the_backend(d, s0, e1);
}

/// A producer on device 0 hands bytes to a consumer on device 1 through an event; a
/// copy queued on a stream of a device it does not touch is refused before the driver.
pub fn events_order_streams(f: &dyn FakeDriver) {
    let d = f.backend();
    let len = 256 << 10;
    let mut data: Vec<u8> = (0..len).map(|i| (i * 7 % 255) as u8).collect();
    let mut out = vec![0u8; len];
    let mid = d.alloc_device(1, len).unwrap();
    let stage = d.alloc_device(0, len).unwrap();
    let producer = d.create_stream(0).unwrap();
    let consumer = d.create_stream(1).unwrap();
    let e = d.create_event(0).unwrap();
    let idle = d.create_event(1).unwrap();
    let queued = f.stat("async_copies");
    // SAFETY: live, disjoint ranges that outlive the synchronisation; live handles.
    unsafe {
        // Device 1 memory filled from the host on device 0's stream is refused ...
        match d.copy(dev(1, mid), host(&mut data), len, Some(producer)) {
            Err(Error::InvalidArgument(msg)) => assert!(
                msg.contains("device 1") && msg.contains("stream of device 0"),
                "{msg}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(f.stat("async_copies"), queued, "refused before the driver");
        // ... so the producer stages through device 0; device to device, a stream of
        // either side will do.
        d.copy(dev(0, stage), host(&mut data), len, Some(producer))
            .unwrap();
        d.copy(dev(1, mid), dev(0, stage), len, Some(producer))
            .unwrap();
        d.record_event(e, producer).unwrap();
        assert!(!d.event_done(e).unwrap());
        // The consumer waits (on the device): nothing runs yet.
        d.stream_wait_event(consumer, e).unwrap();
        d.copy(host(&mut out), dev(1, mid), len, Some(consumer))
            .unwrap();
        d.record_event(idle, consumer).unwrap();
        // Only the consumer's event is waited for: its wait runs the producer first.
        d.synchronize_event(idle).unwrap();
        assert_eq!(out, data, "the consumer saw the producer's bytes");
        assert!(d.event_done(e).unwrap());

        d.destroy_event(idle).unwrap();
        d.destroy_event(e).unwrap();
        d.destroy_stream(consumer).unwrap();
        d.destroy_stream(producer).unwrap();
        d.free_device(0, stage, len).unwrap();
        d.free_device(1, mid, len).unwrap();
    }
    assert_eq!(f.stat("queued_ops"), 0);
}

/// A driver error names the call, its code and the driver's message; a failed event
/// query is an error, "not ready" means not done; a destroy the driver refused leaves the
/// handle usable.
pub fn driver_errors_name_the_call_and_message(f: &dyn FakeDriver) {
    let d = f.backend();
    let kind = d.kind();
    d.mem_info(0).unwrap(); // opens device 0 (CUDA): the failure below is the stream's
    let streams = f.stat("streams");
    f.fail_next(f.symbol(Call::StreamCreate), UNKNOWN, 1);
    let err = d.create_stream(0).unwrap_err();
    let message = assert_driver(kind, err, f.call(Call::StreamCreate), UNKNOWN);
    assert_eq!(message, "unknown error");
    assert_eq!(f.stat("streams"), streams);
    let query = f.call(Call::EventQuery);
    let e = d.create_event(0).unwrap();
    // SAFETY: a live event from this backend, destroyed once.
    unsafe {
        f.fail_next(f.symbol(Call::EventQuery), INVALID_HANDLE, 1);
        assert_driver(kind, d.event_done(e).unwrap_err(), query, INVALID_HANDLE);
        f.fail_next(f.symbol(Call::EventQuery), NOT_READY, 1);
        assert!(!d.event_done(e).unwrap(), "not ready means not done");
        assert!(d.event_done(e).unwrap());
        d.destroy_event(e).unwrap();
    }
    let s = d.create_stream(0).unwrap();
    f.fail_next(f.symbol(Call::StreamDestroy), UNKNOWN, 1);
    // SAFETY: a live stream from this backend, destroyed once successfully.
    unsafe {
        let err = d.destroy_stream(s).unwrap_err();
        assert_driver(kind, err, f.call(Call::StreamDestroy), UNKNOWN);
        d.destroy_stream(s).unwrap();
    }
}

/// Managed memory is host-accessible, prefetched to a device or the host, and advised
/// (the six advices have the same numbers in both APIs); a device the backend does not
/// have is refused before the driver, memory that is not managed by the driver.
pub fn managed_memory_prefetch_and_advice(f: &dyn FakeDriver) {
    let d = f.backend();
    let len = 2 * MIB;
    let m = d.alloc_managed(1, len).unwrap();
    assert_eq!(f.stat("managed_allocations"), 1);
    assert_eq!(f.stat("used:1"), len as i64);
    let s = d.create_stream(0).unwrap();
    // SAFETY: `m` is live managed memory of `len` bytes from this backend; `s` is live.
    unsafe {
        std::ptr::write_bytes(m.as_ptr(), 7, len);
        d.prefetch(m, len, Location::Device(1), s).unwrap();
        assert_eq!(f.last_location("prefetch"), Location::Device(1));
        d.prefetch(m, len, Location::Host, s).unwrap();
        assert_eq!(f.last_location("prefetch"), Location::Host);
        assert!(matches!(
            d.prefetch(m, len, Location::Device(2), s),
            Err(Error::UnknownDevice { device: 2, .. })
        ));
        let cases = [
            (Advice::SetReadMostly, 1, None),
            (Advice::UnsetReadMostly, 2, None),
            (
                Advice::SetPreferredLocation(Location::Host),
                3,
                Some(Location::Host),
            ),
            (
                Advice::SetPreferredLocation(Location::Device(1)),
                3,
                Some(Location::Device(1)),
            ),
            (Advice::UnsetPreferredLocation, 4, None),
            (Advice::SetAccessedBy(1), 5, Some(Location::Device(1))),
            (Advice::UnsetAccessedBy(0), 6, Some(Location::Device(0))),
        ];
        let advises = f.stat("advises");
        for (advice, value, location) in cases {
            d.advise(m, len, advice).unwrap();
            assert_eq!(f.stat("last_advice"), value, "{advice:?}");
            if let Some(location) = location {
                assert_eq!(f.last_location("advice"), location, "{advice:?}");
            }
        }
        assert_eq!(f.stat("advises"), advises + cases.len() as i64);
        assert!(matches!(
            d.advise(m, len, Advice::SetAccessedBy(5)),
            Err(Error::UnknownDevice { device: 5, .. })
        ));
        // Advice on memory that is not managed is refused by the driver.
        let plain = d.alloc_device(0, MIB).unwrap();
        let plain_ptr = NonNull::new(plain.0 as usize as *mut u8).unwrap();
        let err = d.advise(plain_ptr, MIB, Advice::SetReadMostly).unwrap_err();
        assert_driver(d.kind(), err, f.call(Call::Advise), INVALID_VALUE);
        d.free_device(0, plain, MIB).unwrap();
        assert_eq!(
            std::slice::from_raw_parts(m.as_ptr(), len),
            &vec![7u8; len][..]
        );
        d.destroy_stream(s).unwrap();
        d.free_managed(1, m, len).unwrap();
    }
    assert_eq!(f.stat("managed_allocations"), 0);
    assert_eq!(f.stat("used:1"), 0);
}

/// The per-thread stream (raw handle 2), imported once, is each calling thread's own
/// queue: two threads queueing on it have two independent orders, synchronising it on
/// one thread waits for that thread's work only, and synchronising the device waits for
/// every thread's.
pub fn the_per_thread_stream_is_a_queue_per_thread(f: &dyn FakeDriver) {
    let d = f.backend();
    let len = 4096;
    let p = d.alloc_device(0, len).unwrap();
    let q = d.alloc_device(0, len).unwrap();
    let queues = f.stat("per_thread_streams");
    // SAFETY: every thread has a per-thread stream on device 0.
    let s = unsafe { d.import_stream(0, hetmem::backend::PER_THREAD_STREAM) }.unwrap();
    let mut mine = vec![1u8; len];
    // SAFETY: `mine` outlives the copy (synchronised below); p is live.
    unsafe { d.copy(dev(0, p), host(&mut mine), len, Some(s)).unwrap() };
    std::thread::scope(|t| {
        t.spawn(|| {
            let mut theirs = vec![2u8; len];
            let mut out = vec![0u8; len];
            // SAFETY: the buffers outlive the copies, synchronised here.
            unsafe {
                d.copy(dev(0, q), host(&mut theirs), len, Some(s)).unwrap();
                d.copy(host(&mut out), dev(0, q), len, Some(s)).unwrap();
                d.synchronize_stream(s).unwrap();
            }
            assert_eq!(out, theirs);
        });
    });
    assert_eq!(f.stat("per_thread_streams"), queues + 2, "one per thread");
    assert_eq!(
        f.stat("per_thread_pending"),
        1,
        "the other thread's synchronisation left this thread's copy queued"
    );
    let syncs = f.device_synchronizes();
    d.synchronize_device(0).unwrap();
    assert_eq!(
        f.stat("per_thread_pending"),
        0,
        "the device: every thread's"
    );
    assert_eq!(f.device_synchronizes(), syncs + 1);
    let mut out = vec![0u8; len];
    // SAFETY: as above.
    unsafe {
        d.copy(host(&mut out), dev(0, p), len, Some(s)).unwrap();
        d.synchronize_stream(s).unwrap();
        d.forget_stream(s).unwrap();
        d.free_device(0, p, len).unwrap();
        d.free_device(0, q, len).unwrap();
    }
    assert_eq!(out, mine);
}

/// The device pool over the per-thread stream used from two threads: a block freed by
/// one thread's stream with a copy still queued reaches the other thread's stream only
/// behind that copy. Without that, the first thread's copy would land after the
/// second's and overwrite it.
pub fn the_pool_orders_a_block_between_two_threads_per_thread_streams(f: &dyn FakeDriver) {
    let mgr = f.manager();
    let len = 2 * MIB;
    let cfg = PoolConfig {
        budget: Budget::Bytes(len),
        ..PoolConfig::default()
    };
    let pool = mgr.device_pool(0, cfg).unwrap();
    // SAFETY: every thread has a per-thread stream on device 0.
    let s = unsafe { hetmem::Stream::wrap(&mgr, 0, hetmem::backend::PER_THREAD_STREAM) }.unwrap();
    let pageable = || {
        mgr.alloc(Placement::Host(NumaPolicy::Default), len)
            .unwrap()
    };
    let mut mine = pageable();
    mine.as_mut_slice().unwrap().fill(1);
    let mut blk = pool.alloc(len, &s).unwrap();
    let addr = blk.ptr();
    mgr.copy(&mut blk, 0, &mine, 0, len, Some(&s)).unwrap();
    drop(blk);
    assert!(f.stat("per_thread_pending") > 0, "the copy is still queued");
    let blk = std::thread::scope(|t| {
        t.spawn(|| {
            let mut theirs = pageable();
            theirs.as_mut_slice().unwrap().fill(2);
            let mut blk = pool.alloc(len, &s).unwrap();
            assert_eq!(blk.ptr(), addr, "the budget leaves one block");
            mgr.copy(&mut blk, 0, &theirs, 0, len, Some(&s)).unwrap();
            s.synchronize().unwrap();
            blk
        })
        .join()
        .unwrap()
    });
    // Whatever this thread still had queued runs now, then the block is read.
    s.synchronize().unwrap();
    let mut out = vec![0u8; len];
    blk.read(0, &mut out).unwrap();
    assert!(
        out.iter().all(|&x| x == 2),
        "the first thread's copy landed after the second's: {}",
        out[0]
    );
    assert_eq!(f.stat("per_thread_pending"), 0);
}
