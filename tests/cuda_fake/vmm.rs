//! Virtual memory management: reserve, create, map, set access, unmap, release; faults
//! under queued copies and without access; devices without VMM.

use super::*;

// ------------------------------------------------------------------------- VMM

#[test]
fn vmm_reserve_create_map_access_unmap_release() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let pages = 3;
    assert!(matches!(
        d.reserve_address(0, PAGE + 1),
        Err(Error::InvalidArgument(_))
    ));
    let base = d.reserve_address(0, pages * PAGE).unwrap();
    assert_eq!(base.0 % PAGE as u64, 0);
    assert_eq!(f.stat("vmm_reserved_bytes"), (pages * PAGE) as i64);
    let handles: Vec<PhysHandle> = (0..pages)
        .map(|_| d.create_physical(0, PAGE).unwrap())
        .collect();
    assert_eq!(f.stat("used:0"), (pages * PAGE) as i64);
    assert_eq!(d.mem_info(0).unwrap().free, DEVICE_MEM - pages * PAGE);
    let src: Vec<u8> = (0..2 * PAGE).map(|i| (i * 13 + 1) as u8).collect();
    let mut back = vec![0u8; 2 * PAGE];
    let hostp = |p: *const u8| MemRef::Host {
        ptr: NonNull::new(p as *mut u8).unwrap(),
        kind: HostKind::Pageable,
    };
    // The deliberate misuses below are refused by the fake before it touches memory.
    // SAFETY: every page lies in our reservation; handles are fresh, one page each;
    // copies are synchronous; pages are unmapped before release and the range is empty
    // before it is freed.
    unsafe {
        for (i, &h) in handles.iter().enumerate() {
            d.map(0, base.offset(i * PAGE), PAGE, h).unwrap();
        }
        assert_eq!(f.stat("vmm_mappings"), pages as i64);
        assert_eq!(
            f.stat("vmm_accessible_bytes"),
            0,
            "mapped, not yet accessible"
        );
        // Access past the mapped range is refused; one call covers all three.
        assert_driver(
            KIND,
            d.set_access(0, base, (pages + 1) * PAGE, &[0]).unwrap_err(),
            "cuMemSetAccess",
            code::INVALID_VALUE,
        );
        d.set_access(0, base, pages * PAGE, &[0]).unwrap();
        assert_eq!(f.stat("vmm_accessible_bytes"), (pages * PAGE) as i64);
        // A copy across two mappings.
        let mid = dev(0, base.offset(PAGE / 2));
        d.copy(mid, hostp(src.as_ptr()), 2 * PAGE, None).unwrap();
        d.copy(hostp(back.as_mut_ptr()), mid, 2 * PAGE, None)
            .unwrap();
        assert_eq!(src, back);
        // Mapping over a mapped page is refused, and leaves the handle as it was.
        let spare = d.create_physical(0, PAGE).unwrap();
        assert_driver(
            KIND,
            d.map(0, base, PAGE, spare).unwrap_err(),
            "cuMemMap",
            code::INVALID_VALUE,
        );
        // A failed set-access leaves the mapping in place, inaccessible.
        d.unmap(0, base.offset(PAGE), PAGE).unwrap();
        d.map(0, base.offset(PAGE), PAGE, spare).unwrap();
        f.fail_next("cuMemSetAccess", code::UNKNOWN, 1);
        assert_driver(
            KIND,
            d.set_access(0, base.offset(PAGE), PAGE, &[0]).unwrap_err(),
            "cuMemSetAccess",
            999,
        );
        d.unmap(0, base.offset(PAGE), PAGE).unwrap();
        assert_eq!(f.stat("vmm_mappings"), (pages - 1) as i64);
        // A copy into the hole: the address is reserved but not mapped.
        assert_driver(
            KIND,
            d.copy(mid, hostp(src.as_ptr()), 2 * PAGE, None)
                .unwrap_err(),
            "cuMemcpyAsync",
            code::INVALID_VALUE,
        );
        // Freeing the reservation while pages are mapped is refused.
        assert_driver(
            KIND,
            d.free_address(0, base, pages * PAGE).unwrap_err(),
            "cuMemAddressFree",
            code::INVALID_VALUE,
        );
        // The released middle handle's memory goes back at once (it is unmapped); the
        // spare one is reused for the hole.
        let used = f.stat("used:0");
        d.release_physical(0, handles[1]).unwrap();
        assert_eq!(f.stat("used:0"), used - PAGE as i64);
        assert_driver(
            KIND,
            d.release_physical(0, handles[1]).unwrap_err(),
            "cuMemRelease",
            code::INVALID_VALUE,
        );
        d.map(0, base.offset(PAGE), PAGE, spare).unwrap();
        d.set_access(0, base.offset(PAGE), PAGE, &[0]).unwrap();
        // Releasing a mapped handle keeps its memory until the unmap (CUDA semantics).
        let used = f.stat("used:0");
        d.release_physical(0, spare).unwrap();
        assert_eq!(f.stat("used:0"), used, "still mapped");
        d.unmap(0, base.offset(PAGE), PAGE).unwrap();
        assert_eq!(f.stat("used:0"), used - PAGE as i64, "freed at the unmap");
        for i in [0, pages - 1] {
            d.unmap(0, base.offset(i * PAGE), PAGE).unwrap();
            d.release_physical(0, handles[i]).unwrap();
        }
        assert_driver(
            KIND,
            d.unmap(0, base, PAGE).unwrap_err(),
            "cuMemUnmap",
            code::INVALID_VALUE,
        );
        d.free_address(0, base, pages * PAGE).unwrap();
    }
    assert_eq!(f.stat("vmm_reservations"), 0);
    assert_eq!(f.stat("vmm_physical_bytes"), 0);
    assert_eq!(f.stat("used:0"), 0);
    let too_big = 2 * DEVICE_MEM;
    assert!(matches!(
        d.create_physical(0, too_big),
        Err(Error::OutOfMemory {
            kind: MemKind::Device(0),
            requested,
            ..
        }) if requested == too_big
    ));
}

/// A copy still queued when its VMM page is unmapped faults on the "device": the
/// context's sticky error comes back from the synchronisation and every later call.
#[test]
fn vmm_unmap_under_a_queued_copy_faults() {
    if !child("vmm::vmm_unmap_under_a_queued_copy_faults", &[]) {
        return;
    }
    let f = fake();
    let b = CudaBackend::new().unwrap();
    let d: &dyn Backend = &b;
    let base = d.reserve_address(0, PAGE).unwrap();
    let h = d.create_physical(0, PAGE).unwrap();
    let mut data = vec![1u8; 4096];
    let s = d.create_stream(0).unwrap();
    // SAFETY: deliberately breaks the unmap contract (queued work still uses the page);
    // the fake checks the mapping before it copies, so nothing is touched.
    unsafe {
        d.map(0, base, PAGE, h).unwrap();
        d.set_access(0, base, PAGE, &[0]).unwrap();
        d.copy(dev(0, base), host(&mut data), 4096, Some(s))
            .unwrap();
        d.unmap(0, base, PAGE).unwrap();
        assert_driver(
            KIND,
            d.synchronize_stream(s).unwrap_err(),
            "cuStreamSynchronize",
            code::ILLEGAL_ADDRESS,
        );
        assert_eq!(f.stat("faults"), 1);
        assert_driver(
            KIND,
            d.alloc_device(0, 4096).unwrap_err(),
            "cuMemAlloc",
            code::ILLEGAL_ADDRESS,
        );
        // Device 1's context is unaffected.
        let p = d.alloc_device(1, 4096).unwrap();
        d.free_device(1, p, 4096).unwrap();
    }
}

/// One `set_access` gives two devices access to pool memory in one cuMemSetAccess (one
/// descriptor each, recorded per device by the fake); device 1's copy engine then reads
/// device 0's VMM memory. Devices the backend does not have are refused before the
/// driver is asked.
#[test]
fn set_access_grants_several_devices_in_one_call() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = 2 * PAGE;
    let data: Vec<u8> = (0..len).map(|i| (i * 11 + i / 4096) as u8).collect();
    let base = d.reserve_address(0, len).unwrap();
    let handles: Vec<PhysHandle> = (0..2)
        .map(|_| d.create_physical(0, PAGE).unwrap())
        .collect();
    let on1 = d.alloc_device(1, len).unwrap();
    let s1 = d.create_stream(1).unwrap();
    // SAFETY: pages in our reservation, fresh handles; copies synchronised before the
    // buffers go; everything undone in order below.
    unsafe {
        for (i, &h) in handles.iter().enumerate() {
            d.map(0, base.offset(i * PAGE), PAGE, h).unwrap();
        }
        let calls = f.stat("set_access_calls");
        d.set_access(0, base, len, &[0, 1]).unwrap();
        assert_eq!(f.stat("set_access_calls"), calls + 1, "one call for both");
        assert_eq!(
            f.stat("last_set_access_count"),
            2,
            "one descriptor per device"
        );
        assert_eq!(f.stat("vmm_accessible_bytes:0"), len as i64);
        assert_eq!(f.stat("vmm_accessible_bytes:1"), len as i64);
        let src = MemRef::Host {
            ptr: NonNull::new(data.as_ptr() as *mut u8).unwrap(),
            kind: HostKind::Pageable,
        };
        d.copy(dev(0, base), src, len, None).unwrap();
        // Device 0's pool memory to device 1, on device 1's stream.
        d.copy(dev(1, on1), dev(0, base), len, Some(s1)).unwrap();
        d.synchronize_stream(s1).unwrap();
        assert_eq!(peek(d, 1, on1, len), data);
        assert_eq!(f.stat("sticky:1"), 0);

        let calls = f.stat("set_access_calls");
        match d.set_access(0, base, len, &[0, 2]).unwrap_err() {
            Error::UnknownDevice {
                device: 2,
                count: 2,
                backend: BackendKind::Cuda,
            } => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            d.set_access(0, base, len, &[1]),
            Err(Error::InvalidArgument(m)) if m.contains("must include device 0")
        ));
        assert_eq!(
            f.stat("set_access_calls"),
            calls,
            "refused before the driver"
        );

        d.destroy_stream(s1).unwrap();
        d.free_device(1, on1, len).unwrap();
        for (i, &h) in handles.iter().enumerate() {
            d.unmap(0, base.offset(i * PAGE), PAGE).unwrap();
            d.release_physical(0, h).unwrap();
        }
        d.free_address(0, base, len).unwrap();
    }
    assert_eq!(f.stat("vmm_physical_bytes"), 0);
}

/// The control for the test above: VMM memory that only its owner may access, read by
/// device 1's copy engine, faults on device 1 as on a GPU (sticky illegal address).
#[test]
fn a_copy_by_a_device_without_access_faults() {
    if !child("vmm::a_copy_by_a_device_without_access_faults", &[]) {
        return;
    }
    let f = fake();
    let b = CudaBackend::new().unwrap();
    let d: &dyn Backend = &b;
    let base = d.reserve_address(0, PAGE).unwrap();
    let h = d.create_physical(0, PAGE).unwrap();
    let on1 = d.alloc_device(1, PAGE).unwrap();
    let s1 = d.create_stream(1).unwrap();
    // SAFETY: a page of our reservation; the fake checks access before it copies, so
    // nothing is touched by the refused copy.
    unsafe {
        d.map(0, base, PAGE, h).unwrap();
        d.set_access(0, base, PAGE, &[0]).unwrap();
        assert_eq!(f.stat("vmm_accessible_bytes:1"), 0);
        d.copy(dev(1, on1), dev(0, base), PAGE, Some(s1)).unwrap();
        assert_driver(
            KIND,
            d.synchronize_stream(s1).unwrap_err(),
            "cuStreamSynchronize",
            code::ILLEGAL_ADDRESS,
        );
    }
    assert_eq!(f.stat("faults"), 1);
    assert_eq!(f.stat("sticky:0"), 0, "device 0 did not run it");
}

/// Without a peer link between the devices, `set_access` refuses to give device 1
/// access to device 0's memory, saying which and why, before the driver is asked (which
/// would refuse too).
#[test]
fn set_access_refuses_a_device_without_peer_access() {
    if !child(
        "vmm::set_access_refuses_a_device_without_peer_access",
        &[("FAKE_CUDA_P2P", "0")],
    ) {
        return;
    }
    let f = fake();
    let b = CudaBackend::new().unwrap();
    let d: &dyn Backend = &b;
    let base = d.reserve_address(0, PAGE).unwrap();
    let h = d.create_physical(0, PAGE).unwrap();
    // SAFETY: a page of our reservation with a fresh handle; undone below.
    unsafe {
        d.map(0, base, PAGE, h).unwrap();
        match d.set_access(0, base, PAGE, &[0, 1]).unwrap_err() {
            Error::InvalidArgument(m) => assert!(
                m.contains("device 1") && m.contains("device 0") && m.contains("peer"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(f.stat("set_access_calls"), 0);
        d.set_access(0, base, PAGE, &[0]).unwrap();
        // The fake refuses it as well when asked directly.
        type SetAccessFn = unsafe extern "C" fn(u64, usize, *const [i32; 3], usize) -> c_int;
        let set_access: SetAccessFn = raw(c"cuMemSetAccess");
        let descs = [[1, 0, 3], [1, 1, 3]]; // {DEVICE, id}, READWRITE
        assert_eq!(
            set_access(base.0, PAGE, descs.as_ptr(), 2),
            code::INVALID_DEVICE
        );
        assert_eq!(f.stat("vmm_accessible_bytes:1"), 0);
        d.unmap(0, base, PAGE).unwrap();
        d.release_physical(0, h).unwrap();
        d.free_address(0, base, PAGE).unwrap();
    }
}

#[test]
fn vmm_unsupported_device() {
    if !child("vmm::vmm_unsupported_device", &[("FAKE_CUDA_VMM", "0")]) {
        return;
    }
    fake();
    let b = CudaBackend::new().unwrap();
    assert_eq!(b.vmm_granularity(0), None);
    assert!(matches!(
        b.reserve_address(0, PAGE),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        b.create_physical(0, PAGE),
        Err(Error::Unsupported { .. })
    ));
    // The pool falls back to plain segments.
    let mgr = cuda_manager();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    assert!(!pool.expandable());
    let s = mgr.create_stream(0).unwrap();
    let blk = pool.alloc(MIB, &s).unwrap();
    blk.write(0, &[1, 2, 3]).unwrap();
    let mut out = [0u8; 3];
    blk.read(0, &mut out).unwrap();
    assert_eq!(out, [1, 2, 3]);
}
