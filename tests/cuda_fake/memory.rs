//! Managed memory without support, and `DriverPinned` (the driver's own pinned memory).

use super::*;

// --------------------------------------------------------------- managed memory

#[test]
fn managed_memory_unsupported() {
    if !child(
        "memory::managed_memory_unsupported",
        &[("FAKE_CUDA_MANAGED", "0")],
    ) {
        return;
    }
    fake();
    let b = CudaBackend::new().unwrap();
    assert!(!b.devices()[0].managed_memory);
    assert!(matches!(
        b.alloc_managed(0, MIB),
        Err(Error::Unsupported {
            backend: BackendKind::Cuda,
            ..
        })
    ));
    let s = b.create_stream(0).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: the backend refuses before the driver sees the (non-managed) pointer.
    let r = unsafe {
        b.prefetch(
            NonNull::new(buf.as_mut_ptr()).unwrap(),
            4096,
            Location::Device(0),
            s,
        )
    };
    assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
}

// ----------------------------------------------------------------- driver pinned

#[test]
fn driver_pinned_memory() {
    let (f, _g, b) = setup();
    assert!(matches!(
        DriverPinned::new(&b, 0, 0),
        Err(Error::InvalidSize { .. })
    ));
    assert!(matches!(
        DriverPinned::new(&b, 2, 4096),
        Err(Error::UnknownDevice { .. })
    ));
    let n = MIB;
    let pinned = DriverPinned::new(&b, 1, n).unwrap();
    assert_eq!(f.stat("host_allocations"), 1);
    assert_eq!((pinned.len(), pinned.device()), (n, 1));
    let mut back = vec![0u8; n];
    let dp = b.alloc_device(1, n).unwrap();
    // SAFETY: `pinned` owns n bytes that nothing else uses; `back` and the device buffer
    // are live for n bytes and the copies are synchronous.
    unsafe {
        let p = std::slice::from_raw_parts_mut(pinned.ptr().as_ptr(), n);
        for (i, x) in p.iter_mut().enumerate() {
            *x = (i * 5 + 1) as u8;
        }
        let src = MemRef::Host {
            ptr: pinned.ptr(),
            kind: HostKind::Pinned,
        };
        b.copy(dev(1, dp), src, n, None).unwrap();
        b.copy(host(&mut back), dev(1, dp), n, None).unwrap();
        b.free_device(1, dp, n).unwrap();
        assert_eq!(p, &back[..]);
        // Already pinned by the driver: registering it again is refused.
        assert_driver(
            KIND,
            b.register_host(pinned.ptr(), n).unwrap_err(),
            "cuMemHostRegister",
            code::HOST_MEMORY_ALREADY_REGISTERED,
        );
    }
    // Dropped on another thread, which binds the context to free it.
    std::thread::scope(|scope| {
        scope.spawn(move || drop(pinned));
    });
    assert_eq!(f.stat("host_allocations"), 0);
}
