//! Unit tests of the CUDA backend; the `gpu_*` ones need a CUDA driver and GPU
//! (`cargo test --lib cuda -- --ignored`), the rest run anywhere. The backend against
//! the fake driver is tested in `tests/cuda_fake/`.

use std::ptr::NonNull;

use hetmem_sys::cuda::types::{
    CUmemAccessDesc, CUmemAccess_flags, CUmemAllocationHandleType, CUmemAllocationProp,
    CUmemAllocationType, CUmemLocationType,
};
use hetmem_sys::cuda::{CudaDriver, Status};

use super::vmm::{self, access_desc, allocation_prop, check_vmm_addr};
use super::*;
use crate::backend::driver::normalize_pci_bus_id;
use crate::backend::{check_vmm_size, Backend, DevicePtr, HostKind, MemRef, PhysHandle};
use crate::placement::{Advice, Location, MemKind};

fn culib_present() -> bool {
    CudaDriver::get().is_ok()
}

#[test]
fn new_without_driver_is_unavailable_not_a_panic() {
    match CudaBackend::new() {
        Err(Error::BackendUnavailable { backend, reason }) => {
            assert_eq!(backend, BackendKind::Cuda);
            assert!(!reason.is_empty());
        }
        Ok(b) => {
            assert!(culib_present(), "Ok without libcuda");
            assert!(!b.devices().is_empty());
        }
        Err(e) => panic!("expected BackendUnavailable, got {e:?}"),
    }
    if !culib_present() {
        // Twice: the second attempt must not trip over state from the first.
        assert!(matches!(
            CudaBackend::new(),
            Err(Error::BackendUnavailable { .. })
        ));
    }
}

#[test]
fn rollback_failure_is_a_distinct_driver_error() {
    let cause = Error::Driver {
        backend: BackendKind::Cuda,
        call: "cuMemHostRegister",
        code: 2,
        message: "out of memory".into(),
    };
    let undo = Error::Driver {
        backend: BackendKind::Cuda,
        call: "cuMemHostUnregister",
        code: 1,
        message: "invalid argument".into(),
    };
    let p = NonNull::<u8>::dangling();
    match RollbackError::CUDA.error(&cause, &undo, p, 3 << 30, 1 << 30) {
        Error::RegistrationLeaked {
            backend,
            call,
            code,
            message,
        } => {
            assert_eq!(backend, BackendKind::Cuda);
            assert_eq!(call, REGISTER_ROLLBACK_CALL);
            assert_eq!(call, "cuMemHostRegister(rollback)");
            assert_eq!(code, 1);
            assert!(
                message.contains("rollback failed; region leaked"),
                "{message}"
            );
            assert!(message.contains("out of memory"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn vmm_allocation_prop_is_pinned_device_memory() {
    let prop = allocation_prop(3);
    assert_eq!(
        prop.type_,
        CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED
    );
    assert_eq!(
        prop.requestedHandleTypes,
        CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE
    );
    assert_eq!(
        prop.location.type_,
        CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE
    );
    assert_eq!(prop.location.id, 3);
    assert!(prop.win32HandleMetaData.is_null());
    assert_eq!(prop.allocFlags.compressionType, 0);
    assert_eq!(prop.allocFlags.gpuDirectRDMACapable, 0);
    assert_eq!(prop.allocFlags.usage, 0);
    assert_eq!(prop.allocFlags.reserved, [0; 4]);
    // The C layout of CUDA 12's CUmemAllocationProp: 4 + 4 + 8 + 8 + 8 bytes.
    assert_eq!(std::mem::size_of::<CUmemAllocationProp>(), 32);
}

#[test]
fn vmm_access_is_read_write_for_the_device() {
    let desc = access_desc(1);
    assert_eq!(
        desc.location.type_,
        CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE
    );
    assert_eq!(desc.location.id, 1);
    assert_eq!(
        desc.flags,
        CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    );
    assert_eq!(std::mem::size_of::<CUmemAccessDesc>(), 12);
}

#[test]
fn vmm_sizes_and_addresses_must_be_whole_pages() {
    let page = 2 << 20;
    assert!(check_vmm_size("x", page, page).is_ok());
    assert!(check_vmm_size("x", 3 * page, page).is_ok());
    for bad in [0, 1, page - 1, page + 4096] {
        assert!(
            matches!(
                check_vmm_size("x", bad, page),
                Err(Error::InvalidArgument(_))
            ),
            "{bad}"
        );
    }
    assert!(check_vmm_addr(DevicePtr(0x7f00_0000_0000), page).is_ok());
    assert!(matches!(
        check_vmm_addr(DevicePtr(0x7f00_0000_1000), page),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        vmm::UNSUPPORTED,
        Error::Unsupported {
            backend: BackendKind::Cuda,
            ..
        }
    ));
}

/// The driver's own pinned allocation: usable at once, copied through, refused for
/// bad arguments, freed on drop.
#[test]
#[ignore = "needs a CUDA driver and GPU: cargo test --lib cuda -- --ignored"]
fn gpu_driver_pinned() {
    let b = CudaBackend::new().expect("a CUDA driver and device");
    assert!(matches!(
        DriverPinned::new(&b, 0, 0),
        Err(Error::InvalidSize { .. })
    ));
    assert!(matches!(
        DriverPinned::new(&b, b.devices().len(), 4096),
        Err(Error::UnknownDevice { .. })
    ));
    let n = 1 << 20;
    let pinned = DriverPinned::new(&b, 0, n).unwrap();
    assert_eq!((pinned.len(), pinned.device()), (n, 0));
    assert!(!pinned.is_empty());
    let mut back = vec![0u8; n];
    let dev = b.alloc_device(0, n).unwrap();
    // SAFETY: `pinned` owns n bytes that nothing else uses; `back` and the device
    // buffer are live for n bytes and the copies are synchronous.
    unsafe {
        let p = std::slice::from_raw_parts_mut(pinned.ptr().as_ptr(), n);
        for (i, x) in p.iter_mut().enumerate() {
            *x = (i * 5 + 1) as u8;
        }
        let d = MemRef::Device {
            device: 0,
            ptr: dev,
        };
        let src = MemRef::Host {
            ptr: pinned.ptr(),
            kind: HostKind::Pinned,
        };
        let dst = MemRef::Host {
            ptr: NonNull::new(back.as_mut_ptr()).unwrap(),
            kind: HostKind::Pageable,
        };
        b.copy(d, src, n, None).unwrap();
        b.copy(dst, d, n, None).unwrap();
        b.free_device(0, dev, n).unwrap();
        assert_eq!(p, &back[..]);
    }
    drop(pinned);
}

#[test]
#[ignore = "needs a CUDA driver and GPU: cargo test --lib cuda -- --ignored"]
fn driver_error_carries_call_and_code() {
    // cuGetErrorString needs a driver that `new` accepted.
    let backend = CudaBackend::new().expect("a CUDA driver and device");
    match backend.drv.error("cuMemAlloc", Status::OUT_OF_MEMORY) {
        Error::Driver {
            backend,
            call,
            code,
            message,
        } => {
            assert_eq!(backend, BackendKind::Cuda);
            assert_eq!(call, "cuMemAlloc");
            assert_eq!(code, 2);
            assert!(!message.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

/// End to end on a real GPU, through the trait alone.
#[test]
#[ignore = "needs a CUDA driver and GPU: cargo test --lib cuda -- --ignored"]
fn gpu_round_trip() {
    let b = CudaBackend::new().expect("a CUDA driver and device");
    for d in b.devices() {
        if let Some(id) = &d.pci_bus_id {
            assert_eq!(normalize_pci_bus_id(id).as_ref(), Some(id));
        }
    }
    let n = 1 << 20;
    let src: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
    let mut back = vec![0u8; n];
    let dev = b.alloc_device(0, n).unwrap();
    let info = b.mem_info(0).unwrap();
    assert!(info.free <= info.total);
    let host = |p: *const u8| MemRef::Host {
        ptr: NonNull::new(p as *mut u8).unwrap(),
        kind: HostKind::Pageable,
    };
    let d = MemRef::Device {
        device: 0,
        ptr: dev,
    };
    // SAFETY: buffers are live for n bytes and outlive the synchronous/synced copies.
    unsafe {
        b.copy(d, host(src.as_ptr()), n, None).unwrap();
        let s = b.create_stream(0).unwrap();
        let e = b.create_event(0).unwrap();
        b.copy(host(back.as_mut_ptr()), d, n, Some(s)).unwrap();
        b.record_event(e, s).unwrap();
        b.synchronize_event(e).unwrap();
        assert!(b.event_done(e).unwrap());
        b.register_host(NonNull::new(back.as_mut_ptr()).unwrap(), n)
            .unwrap();
        b.unregister_host(NonNull::new(back.as_mut_ptr()).unwrap(), n)
            .unwrap();
        if b.devices()[0].managed_memory {
            let m = b.alloc_managed(0, n).unwrap();
            b.advise(m, n, Advice::SetPreferredLocation(Location::Device(0)))
                .unwrap();
            b.prefetch(m, n, Location::Host, s).unwrap();
            b.synchronize_stream(s).unwrap();
            b.free_managed(0, m, n).unwrap();
        }
        b.destroy_event(e).unwrap();
        b.destroy_stream(s).unwrap();
        b.free_device(0, dev, n).unwrap();
    }
    assert_eq!(src, back);
    let too_big = b.devices()[0].total_memory * 2;
    assert!(matches!(
        b.alloc_device(0, too_big),
        Err(Error::OutOfMemory {
            kind: MemKind::Device(0),
            ..
        })
    ));
}

/// Virtual memory management on a real GPU: physical allocations mapped side by side,
/// made accessible with one call, written, read back, unmapped, released.
#[test]
#[ignore = "needs a CUDA driver and GPU: cargo test --lib cuda -- --ignored"]
fn gpu_vmm_round_trip() {
    let b = CudaBackend::new().expect("a CUDA driver and device");
    let Some(page) = b.vmm_granularity(0) else {
        // A device (or vGPU) without VMM: every call must say Unsupported.
        assert!(matches!(
            b.reserve_address(0, 2 << 20),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            b.create_physical(0, 2 << 20),
            Err(Error::Unsupported { .. })
        ));
        return;
    };
    assert!(page.is_power_of_two(), "granularity {page}");
    assert_eq!(b.vmm_granularity(b.devices().len()), None);
    assert!(matches!(
        b.reserve_address(0, page + 1),
        Err(Error::InvalidArgument(_))
    ));

    let pages = 3;
    let base = b.reserve_address(0, pages * page).unwrap();
    assert!(base.0.is_multiple_of(page as u64));
    let handles: Vec<PhysHandle> = (0..pages)
        .map(|_| b.create_physical(0, page).unwrap())
        .collect();
    let src: Vec<u8> = (0..page).map(|i| (i * 13 + 1) as u8).collect();
    let mut back = vec![0u8; page];
    let host = |p: *const u8| MemRef::Host {
        ptr: NonNull::new(p as *mut u8).unwrap(),
        kind: HostKind::Pageable,
    };
    // SAFETY: every page lies in our reservation with nothing mapped, each handle is
    // fresh and one page long; copies are synchronous and the buffers outlive them;
    // pages are unmapped before release and the range is empty before it is freed.
    unsafe {
        for (i, &h) in handles.iter().enumerate() {
            b.map(0, base.offset(i * page), page, h).unwrap();
        }
        // One access call for the three mappings: device 0 and, in the same call,
        // every device with a peer link to it (one descriptor each).
        let peers: Vec<usize> = (0..b.devices().len())
            .filter(|&d| d == 0 || b.can_access_peer(d, 0).unwrap())
            .collect();
        b.set_access(0, base, pages * page, &peers).unwrap();
        let last = MemRef::Device {
            device: 0,
            ptr: base.offset((pages - 1) * page),
        };
        b.copy(last, host(src.as_ptr()), page, None).unwrap();
        b.copy(host(back.as_mut_ptr()), last, page, None).unwrap();
        // Give the middle page back and map a new one in its place.
        b.unmap(0, base.offset(page), page).unwrap();
        b.release_physical(0, handles[1]).unwrap();
        let again = b.create_physical(0, page).unwrap();
        b.map(0, base.offset(page), page, again).unwrap();
        b.unmap(0, base.offset(page), page).unwrap();
        b.release_physical(0, again).unwrap();
        for i in [0, pages - 1] {
            b.unmap(0, base.offset(i * page), page).unwrap();
            b.release_physical(0, handles[i]).unwrap();
        }
        b.free_address(0, base, pages * page).unwrap();
    }
    assert_eq!(src, back);

    let too_big = (b.devices()[0].total_memory * 2).next_multiple_of(page);
    assert!(matches!(
        b.create_physical(0, too_big),
        Err(Error::OutOfMemory {
            kind: MemKind::Device(0),
            requested,
            ..
        }) if requested == too_big
    ));
}

/// A copy with no stream reads what work queued on the legacy stream wrote, as
/// `cuMemcpy` does: a 256 MiB host-to-device copy queued on stream 0 (milliseconds
/// on a GPU), then a synchronous read of the end of the destination on the other
/// copy engine. Unordered, the read would likely see the old bytes.
#[test]
#[ignore = "needs a CUDA driver and GPU: cargo test --lib cuda -- --ignored"]
fn gpu_sync_copy_follows_the_legacy_stream() {
    let b = CudaBackend::new().expect("a CUDA driver and device");
    let n = 256 << 20;
    let tail = 1 << 20;
    let pinned = DriverPinned::new(&b, 0, n).unwrap();
    let dev = b.alloc_device(0, n).unwrap();
    let mut back = vec![0u8; tail];
    // SAFETY: the legacy stream of device 0; `pinned`, `dev` and `back` are live for
    // the sizes given until the synchronisations below.
    unsafe {
        let legacy = b.import_stream(0, 0).unwrap();
        let d = |off: usize| MemRef::Device {
            device: 0,
            ptr: dev.offset(off),
        };
        let src = MemRef::Host {
            ptr: pinned.ptr(),
            kind: HostKind::Pinned,
        };
        let out = MemRef::Host {
            ptr: NonNull::new(back.as_mut_ptr()).unwrap(),
            kind: HostKind::Pageable,
        };
        for round in 1..=3u8 {
            std::ptr::write_bytes(pinned.ptr().as_ptr(), round, n);
            b.copy(d(0), src, n, Some(legacy)).unwrap();
            b.copy(out, d(n - tail), tail, None).unwrap();
            assert!(
                back.iter().all(|&x| x == round),
                "round {round}: the synchronous copy read {} before the legacy \
                 stream's copy landed",
                back[0]
            );
        }
        b.synchronize_stream(legacy).unwrap();
        b.forget_stream(legacy).unwrap();
        b.free_device(0, dev, n).unwrap();
    }
}

/// The device pool and the per-thread stream (2) on two threads: a block freed on
/// the first thread's stream, with a copy into it queued behind 256 MiB of other
/// copies (milliseconds), goes to the second thread's stream only behind it. The
/// second thread's copy into the block lands last; unordered it would likely land
/// first and be overwritten.
#[test]
#[ignore = "needs a CUDA driver and GPU: cargo test --lib cuda -- --ignored"]
fn gpu_per_thread_stream_hand_over_between_threads() {
    use crate::placement::{NumaPolicy, Placement};
    use crate::pool::{Budget, PoolConfig};
    let mgr = crate::Manager::builder()
        .backend(BackendKind::Cuda)
        .build()
        .expect("a CUDA driver and device");
    let head = 2 << 20;
    let cfg = PoolConfig {
        budget: Budget::Bytes(head),
        expandable_segments: false,
        ..PoolConfig::default()
    };
    let pool = mgr.device_pool(0, cfg).unwrap();
    // SAFETY: every thread has a per-thread stream on device 0.
    let s = unsafe { crate::Stream::wrap(&mgr, 0, crate::backend::PER_THREAD_STREAM) }.unwrap();
    let big = 256 << 20;
    let host = Placement::Pinned(NumaPolicy::Default);
    let busy_src = mgr.alloc(host.clone(), big).unwrap();
    let mut busy_dst = mgr.alloc(Placement::Device(0), big).unwrap();
    let mut first = mgr.alloc(host.clone(), head).unwrap();
    first.as_mut_slice().unwrap().fill(1);
    let mut blk = pool.alloc(head, &s).unwrap();
    let addr = blk.ptr();
    mgr.copy(&mut busy_dst, 0, &busy_src, 0, big, Some(&s))
        .unwrap();
    mgr.copy(&mut blk, 0, &first, 0, head, Some(&s)).unwrap();
    drop(blk);
    let blk = std::thread::scope(|t| {
        t.spawn(|| {
            let mut second = mgr.alloc(host.clone(), head).unwrap();
            second.as_mut_slice().unwrap().fill(2);
            let mut blk = pool.alloc(head, &s).unwrap();
            assert_eq!(blk.ptr(), addr, "the budget leaves one block");
            mgr.copy(&mut blk, 0, &second, 0, head, Some(&s)).unwrap();
            s.synchronize().unwrap();
            blk
        })
        .join()
        .unwrap()
    });
    s.synchronize().unwrap();
    let mut out = vec![0u8; head];
    blk.read(0, &mut out).unwrap();
    assert!(
        out.iter().all(|&x| x == 2),
        "the first thread's copy landed after the second thread's: {}",
        out[0]
    );
}
