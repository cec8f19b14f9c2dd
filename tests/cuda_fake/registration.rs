//! Host registration: device memory refused, copies cut at registration edges,
//! registrations in chunks and smaller pieces, rolled back on failure, out of pinned memory.

use super::*;

// ------------------------------------------------------------------ driver errors

// ------------------------------------------------------------------ registration

/// Device memory is not host memory to pin: the driver refuses it.
#[test]
fn device_memory_is_not_registered_as_host_memory() {
    let (_f, _g, b) = setup();
    let d: &dyn Backend = &b;
    // SAFETY: the backend passes the pointer to the driver, which refuses it before
    // touching it; the allocation is freed once.
    unsafe {
        let dp = d.alloc_device(0, 4096).unwrap();
        let err = d
            .register_host(NonNull::new(dp.0 as usize as *mut u8).unwrap(), 4096)
            .unwrap_err();
        assert_driver(KIND, err, "cuMemHostRegister", code::INVALID_VALUE);
        d.free_device(0, dp, 4096).unwrap();
    }
}

/// A driver resolves a pinned host pointer to the one registration holding it, so a
/// copy running from one registration into the next is refused; the backend cuts it
/// at the edge (the host pool registers large regions in pieces, in parallel).
#[test]
fn copies_across_registration_edges_are_cut_there() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let piece = MIB;
    let mut buf = vec![0u8; 3 * piece];
    let base = buf.as_mut_ptr();
    let src: Vec<u8> = (0..3 * piece).map(|i| (i * 7 + i / 4099) as u8).collect();
    // SAFETY: `buf` outlives its registrations (undone below); each piece lies in it.
    unsafe {
        for i in 0..3 {
            let p = NonNull::new(base.add(i * piece)).unwrap();
            d.register_host(p, piece).unwrap();
        }
        buf.copy_from_slice(&src);
        let pinned = |off: usize| MemRef::Host {
            ptr: NonNull::new(base.add(off)).unwrap(),
            kind: HostKind::Pinned,
        };
        let dp = d.alloc_device(0, 3 * piece).unwrap();
        let copy_calls = || f.stat("copies") + f.stat("async_copies");
        let calls = copy_calls();
        // All three pieces, host to device, then back from the middle of the first
        // into the middle of the last.
        d.copy(dev(0, dp), pinned(0), 3 * piece, None).unwrap();
        assert_eq!(copy_calls() - calls, 3, "one copy per registration");
        assert_eq!(peek(d, 0, dp, 3 * piece), src);
        buf.fill(0);
        let s = d.create_stream(0).unwrap();
        let half = piece / 2;
        d.copy(pinned(half), dev(0, dp), 2 * piece, Some(s))
            .unwrap();
        d.synchronize_stream(s).unwrap();
        d.destroy_stream(s).unwrap();
        assert_eq!(&buf[half..half + 2 * piece], &src[..2 * piece]);
        // Pageable memory just before a registration is a piece of its own too.
        d.unregister_host(NonNull::new(base).unwrap(), piece)
            .unwrap();
        let mut back = vec![0u8; 2 * piece];
        let pageable = MemRef::Host {
            ptr: NonNull::new(base.add(half)).unwrap(),
            kind: HostKind::Pageable,
        };
        d.copy(host(&mut back), pageable, 0, None).unwrap();
        d.copy(dev(0, dp), pageable, 2 * piece, None).unwrap();
        assert_eq!(
            peek(d, 0, dp, 2 * piece),
            buf[half..half + 2 * piece].to_vec()
        );
        for i in 1..3 {
            d.unregister_host(NonNull::new(base.add(i * piece)).unwrap(), piece)
                .unwrap();
        }
        d.free_device(0, dp, 3 * piece).unwrap();
    }
}

#[test]
fn large_registrations_are_chunked_and_rolled_back() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = 150 * GIB;
    // Address space only; failing here is a failure, not a pass.
    let res = Reservation::new(len).expect("reserve 150 GiB of address space");
    // The fake's per-call limit: one 150 GiB registration fails as on a real driver.
    let max = f.stat("max_register_bytes") as usize;
    assert!((64 * GIB..150 * GIB).contains(&max), "{max}");
    // SAFETY: the range is mapped and stays mapped until `res` drops, after every
    // registration in it is undone.
    unsafe {
        let register: CuRegisterFn = raw(c"cuMemHostRegister_v2");
        let _ctx = bind_primary(0); // for the raw call
        assert_eq!(
            register(res.ptr.as_ptr().cast(), len, 1),
            code::OUT_OF_MEMORY,
            "one registration past the driver's limit"
        );

        let calls = f.stat("register_calls");
        d.register_host(res.ptr, len).unwrap();
        assert_eq!(f.stat("registrations"), 3, "64 + 64 + 22 GiB");
        assert_eq!(f.stat("registered_bytes"), len as i64);
        assert_eq!(f.stat("register_calls"), calls + 3);
        d.unregister_host(res.ptr, len).unwrap();
        assert_eq!(f.stat("registrations"), 0);

        // A failure in the second chunk undoes the first.
        let in_second = NonNull::new(res.ptr.as_ptr().add(64 * GIB + 4096)).unwrap();
        d.register_host(in_second, 4096).unwrap();
        assert_driver(
            KIND,
            d.register_host(res.ptr, len).unwrap_err(),
            "cuMemHostRegister",
            code::HOST_MEMORY_ALREADY_REGISTERED,
        );
        assert_eq!(f.stat("registrations"), 1, "only the blocking one is left");

        // If undoing the first chunk fails too, the error says so, distinctly.
        f.fail_next("cuMemHostUnregister", code::UNKNOWN, 1);
        // The code is the failed cuMemHostUnregister's.
        let err = d.register_host(res.ptr, len).unwrap_err();
        let message = assert_leaked(KIND, err, REGISTER_ROLLBACK_CALL, 999);
        assert!(
            message.contains("rollback failed; region leaked"),
            "{message}"
        );
        assert!(
            message.contains("already mapped"),
            "names the cause: {message}"
        );
        assert_eq!(
            f.stat("registrations"),
            2,
            "the leaked first chunk and the blocker"
        );
        let unregister: CuUnregisterFn = raw(c"cuMemHostUnregister");
        assert_eq!(unregister(res.ptr.as_ptr().cast()), 0);
        d.unregister_host(in_second, 4096).unwrap();
    }
    assert_eq!(f.stat("registrations"), 0);
}

/// Puts the fake's registration limit back when dropped (the fake is shared).
struct RegisterLimit<'a> {
    fake: &'a FakeCuda,
    bytes: u64,
    code: i32,
}

impl<'a> RegisterLimit<'a> {
    fn set(fake: &'a FakeCuda, bytes: usize, code: i32) -> Self {
        let old = RegisterLimit {
            fake,
            bytes: fake.stat("max_register_bytes") as u64,
            code: fake.stat("max_register_error") as i32,
        };
        fake.set_register_limit(bytes as u64, code);
        old
    }
}

impl Drop for RegisterLimit<'_> {
    fn drop(&mut self) {
        self.fake.set_register_limit(self.bytes, self.code);
    }
}

/// Some hosts refuse one cuMemHostRegister above about 96-128 GiB with
/// CUDA_ERROR_INVALID_VALUE: the backend registers such a range in halves until the
/// host takes them, copies are cut at the new edges, and unregistering undoes exactly
/// those pieces. Out of memory is never retried in pieces; a refusal that persists
/// below 1 GiB, or a piece that cannot register at all, fails with everything rolled
/// back.
#[test]
fn registrations_refused_as_invalid_are_split_and_rolled_back() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = 150 * GIB;
    let res = Reservation::new(len).expect("reserve 150 GiB of address space");
    let _limit = RegisterLimit::set(f, 20 * GIB, code::INVALID_VALUE);
    let copy_calls = || f.stat("copies") + f.stat("async_copies");
    // SAFETY: the range is mapped (PROT_NONE but for the window made readable below)
    // and stays mapped until `res` drops, after every registration in it is undone.
    unsafe {
        let calls = f.stat("register_calls");
        d.register_host(res.ptr, len).unwrap();
        assert_eq!(
            f.stat("register_calls") - calls,
            2 + 10,
            "64 and 32 GiB refused, then 9 x 16 GiB + 6 GiB"
        );
        assert_eq!(f.stat("registrations"), 10);
        assert_eq!(f.stat("registered_bytes"), len as i64);

        // A copy over the edge at 16 GiB goes in two pieces.
        let window = res.ptr.as_ptr().add(16 * GIB - MIB);
        assert_eq!(
            libc::mprotect(window.cast(), 2 * MIB, libc::PROT_READ | libc::PROT_WRITE),
            0
        );
        window.write_bytes(0x5a, 2 * MIB);
        let p = d.alloc_device(0, 2 * MIB).unwrap();
        let calls = copy_calls();
        let src = MemRef::Host {
            ptr: NonNull::new(window).unwrap(),
            kind: HostKind::Pinned,
        };
        d.copy(dev(0, p), src, 2 * MIB, None).unwrap();
        assert_eq!(
            copy_calls() - calls,
            2,
            "cut at the edge between two pieces"
        );
        assert_eq!(peek(d, 0, p, 2 * MIB), vec![0x5a; 2 * MIB]);
        d.free_device(0, p, 2 * MIB).unwrap();

        d.unregister_host(res.ptr, len).unwrap();
        assert_eq!(f.stat("registrations"), 0, "every piece undone");

        // Out of memory: one call, no pieces.
        f.set_register_limit((20 * GIB) as u64, code::OUT_OF_MEMORY);
        let calls = f.stat("register_calls");
        assert!(matches!(
            d.register_host(res.ptr, len),
            Err(Error::OutOfMemory { kind: MemKind::Pinned, requested, .. }) if requested == len
        ));
        assert_eq!(f.stat("register_calls") - calls, 1);
        assert_eq!(f.stat("registrations"), 0);

        // Refused down to the floor: 64, 32, ..., 1 GiB, then the first refusal.
        f.set_register_limit((GIB / 2) as u64, code::INVALID_VALUE);
        let calls = f.stat("register_calls");
        assert_driver(
            KIND,
            d.register_host(res.ptr, len).unwrap_err(),
            "cuMemHostRegister",
            code::INVALID_VALUE,
        );
        assert_eq!(f.stat("register_calls") - calls, 7);
        assert_eq!(f.stat("registrations"), 0);

        // A piece that overlaps a registration is not split: the six pieces before it
        // are rolled back.
        f.set_register_limit((20 * GIB) as u64, code::INVALID_VALUE);
        let blocker = NonNull::new(res.ptr.as_ptr().add(100 * GIB)).unwrap();
        d.register_host(blocker, 4096).unwrap();
        let calls = f.stat("register_calls");
        assert_driver(
            KIND,
            d.register_host(res.ptr, len).unwrap_err(),
            "cuMemHostRegister",
            code::HOST_MEMORY_ALREADY_REGISTERED,
        );
        assert_eq!(
            f.stat("register_calls") - calls,
            2 + 7,
            "refused twice, 6 pieces, the overlap"
        );
        assert_eq!(f.stat("registrations"), 1, "only the blocker is left");
        d.unregister_host(blocker, 4096).unwrap();
    }
    assert_eq!(f.stat("registrations"), 0);
}

/// The driver could not pin the memory (CUDA_ERROR_OUT_OF_MEMORY from
/// cuMemHostRegister): that is running out of pinned memory, as on the host backend,
/// not an opaque driver error, so the host pool gives its cache back and retries.
#[test]
fn pinning_refused_for_memory_is_out_of_memory() {
    let f = fake();
    let _g = FakeCuda::serial();
    let mgr = cuda_manager();
    f.fail_next("cuMemHostRegister_v2", code::OUT_OF_MEMORY, 1);
    match mgr.alloc(Placement::Pinned(NumaPolicy::Default), 3 * MIB) {
        Err(Error::OutOfMemory {
            kind: tier,
            requested,
            ..
        }) => assert_eq!((tier, requested), (MemKind::Pinned, 3 * MIB)),
        other => panic!("expected OutOfMemory for pinned memory, got {other:?}"),
    }
    assert_eq!(f.stat("registrations"), 0);

    let pool = mgr.host_pool(HostPoolConfig::default()).unwrap();
    drop(pool.alloc_pinned(&NumaPolicy::Default, 4 * MIB).unwrap());
    assert_eq!(
        f.stat("registrations"),
        1,
        "the freed block stays cached, pinned"
    );
    f.fail_next("cuMemHostRegister_v2", code::OUT_OF_MEMORY, 1);
    let big = pool
        .alloc_pinned(&NumaPolicy::Default, 8 * MIB)
        .expect("the pool gives its cache back and retries");
    assert!(big.is_pinned());
    assert_eq!(
        f.stat("registrations"),
        1,
        "the cached block was unregistered"
    );
    drop(big);
    drop(pool);
    drop(mgr);
    assert_eq!(f.stat("registrations"), 0);
}
