//! Every C call driven into its failures: NULL, dead, forged and wrong-kind handles,
//! sizes over `SSIZE_MAX`, negative and unknown devices, streams and pointers of
//! another manager or device, the host backend's missing devices. Each call's code is
//! checked here where it is certain, and, in these unit tests, against the header's
//! list for the call by [`codes::check`](super::codes) (a code the list lacks aborts the
//! test run), so a path that returns an unlisted code fails here.

use std::ffi::{c_int, c_void};
use std::ptr::{null, null_mut};

use super::event::*;
use super::memory::*;
use super::stats::*;
use super::tier::*;
use super::torch::*;
use super::*;
use crate::backend::sim::SimConfig;
use crate::backend::BackendKind;
use crate::Manager;

/// A manager handle on a simulator with two devices.
fn sim2() -> *mut HetmemManager {
    let mgr = Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(SimConfig::with_devices(2, 256 << 20))
        .build()
        .unwrap();
    register::<memory::FfiManager, HetmemManager>(memory::FfiManager::new(mgr))
}

fn host() -> *mut HetmemManager {
    let mut m = null_mut();
    // SAFETY: a C string and a valid out-pointer.
    let rc = unsafe { hetmem_manager_create(c"host".as_ptr(), &mut m) };
    assert_eq!(rc, HETMEM_OK);
    m
}

fn forged<T>() -> *mut T {
    std::ptr::without_provenance_mut(0x4865_0008)
}

#[track_caller]
fn is(rc: c_int, want: c_int) {
    assert_eq!(
        status_name(rc),
        status_name(want),
        "{}",
        last_error_message().to_string_lossy()
    );
}

#[test]
fn memory_streams_and_events_fail_with_their_listed_codes() {
    let (m, o, h) = (sim2(), sim2(), host());
    let n = 1usize << 16;
    let over = isize::MAX as usize + 1;
    let (mut dev, mut dev1, mut pinned, mut managed, mut theirs) =
        (null_mut(), null_mut(), null_mut(), null_mut(), null_mut());
    let (mut s0, mut s1, mut their_s) = (null_mut(), null_mut(), null_mut());
    let mut e0 = null_mut();
    let mut back = vec![0u8; n];
    let mut count = 0;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: every pointer passed is NULL, a value the call checks, or valid for what
    // the call reads or writes through it (`back` holds `n` bytes).
    unsafe {
        is(hetmem_alloc(m, HETMEM_DEVICE, 0, n, &mut dev), HETMEM_OK);
        is(hetmem_alloc(m, HETMEM_DEVICE, 1, n, &mut dev1), HETMEM_OK);
        is(
            hetmem_alloc(m, HETMEM_PINNED, -1, n, &mut pinned),
            HETMEM_OK,
        );
        is(
            hetmem_alloc(m, HETMEM_MANAGED, 0, n, &mut managed),
            HETMEM_OK,
        );
        is(hetmem_alloc(o, HETMEM_DEVICE, 0, n, &mut theirs), HETMEM_OK);
        is(hetmem_stream_create(m, 0, &mut s0), HETMEM_OK);
        is(hetmem_stream_create(m, 1, &mut s1), HETMEM_OK);
        is(hetmem_stream_create(o, 0, &mut their_s), HETMEM_OK);
        is(hetmem_event_create(m, 0, &mut e0), HETMEM_OK);

        // Managers.
        is(
            hetmem_manager_create(c"\xff".as_ptr(), &mut null_mut()),
            HETMEM_ERR_INVALID_ARGUMENT,
        );
        assert!(hetmem_manager_backend(forged()).is_null());
        is(
            hetmem_device_count(forged(), &mut count),
            HETMEM_ERR_INVALID_HANDLE,
        );
        is(
            hetmem_device_count(s0.cast(), &mut count),
            HETMEM_ERR_INVALID_HANDLE,
        );
        is(
            hetmem_mem_info(m, 2, &mut free, &mut total),
            HETMEM_ERR_UNKNOWN_DEVICE,
        );
        is(
            hetmem_mem_info(m, 0, &mut free, null_mut()),
            HETMEM_ERR_NULL_POINTER,
        );

        // The host backend has no device: every device call says so.
        is(
            hetmem_mem_info(h, 0, &mut free, &mut total),
            HETMEM_ERR_UNKNOWN_DEVICE,
        );
        is(
            hetmem_stream_create(h, 0, &mut null_mut()),
            HETMEM_ERR_UNKNOWN_DEVICE,
        );
        is(
            hetmem_stream_wrap(h, 0, 0, &mut null_mut()),
            HETMEM_ERR_UNKNOWN_DEVICE,
        );
        is(
            hetmem_event_create(h, 0, &mut null_mut()),
            HETMEM_ERR_UNKNOWN_DEVICE,
        );
        let mut p = null_mut();
        is(
            hetmem_alloc(h, HETMEM_DEVICE, 0, 64, &mut p),
            HETMEM_ERR_UNKNOWN_DEVICE,
        );
        is(
            hetmem_alloc(h, HETMEM_MANAGED, -1, 64, &mut p),
            HETMEM_ERR_UNKNOWN_DEVICE,
        );
        let rc = hetmem_alloc(h, HETMEM_PINNED, -1, 64, &mut p);
        if rc == HETMEM_OK {
            is(hetmem_free(h, p), HETMEM_OK);
        }

        // Sizes over SSIZE_MAX and SIZE_MAX.
        for size in [over, usize::MAX] {
            is(
                hetmem_copy(m, dev, pinned, size, null_mut()),
                HETMEM_ERR_OUT_OF_BOUNDS,
            );
            is(
                hetmem_copy(m, dev, pinned, size, s0),
                HETMEM_ERR_OUT_OF_BOUNDS,
            );
            is(
                hetmem_copy(m, pinned, pinned, size, s0),
                HETMEM_ERR_OUT_OF_BOUNDS,
            );
            // A caller's range that long runs into the manager's buffers.
            let rc = hetmem_copy_to_host(m, back.as_mut_ptr().cast(), dev, size);
            assert!(rc < 0);
            let rc = hetmem_copy_from_host(m, dev, back.as_ptr().cast(), size);
            assert!(rc < 0);
            is(
                hetmem_prefetch(m, managed, size, 0, null_mut()),
                HETMEM_ERR_OUT_OF_BOUNDS,
            );
            is(
                hetmem_advise(m, managed, size, HETMEM_ADVISE_SET_READ_MOSTLY, 0),
                HETMEM_ERR_OUT_OF_BOUNDS,
            );
            is(
                hetmem_alloc(m, HETMEM_DEVICE, 0, size, &mut p),
                HETMEM_ERR_INVALID_SIZE,
            );
        }

        // Streams of another device or manager, on every call that takes one.
        is(
            hetmem_copy(m, dev, pinned, 64, s1),
            HETMEM_ERR_INVALID_ARGUMENT,
        );
        is(
            hetmem_copy(m, dev, dev, 64, s1),
            HETMEM_ERR_INVALID_ARGUMENT,
        );
        is(hetmem_copy(m, dev1, dev, 64, s1), HETMEM_OK);
        is(
            hetmem_copy(m, dev, pinned, 64, their_s),
            HETMEM_ERR_FOREIGN_HANDLE,
        );
        // A migration may be queued on any device's stream, as the drivers allow.
        is(hetmem_prefetch(m, managed, n, 0, s1), HETMEM_OK);
        is(
            hetmem_prefetch(m, managed, n, 0, their_s),
            HETMEM_ERR_FOREIGN_HANDLE,
        );
        is(
            hetmem_prefetch(m, managed, n, -2, null_mut()),
            HETMEM_ERR_INVALID_ARGUMENT,
        );
        is(
            hetmem_prefetch(m, managed, n, 5, null_mut()),
            HETMEM_ERR_UNKNOWN_DEVICE,
        );
        is(
            hetmem_prefetch(m, managed, n, 0, forged()),
            HETMEM_ERR_INVALID_HANDLE,
        );
        is(hetmem_event_record(e0, s1), HETMEM_ERR_INVALID_ARGUMENT);
        is(hetmem_event_record(e0, their_s), HETMEM_ERR_FOREIGN_HANDLE);
        is(
            hetmem_stream_wait_event(their_s, e0),
            HETMEM_ERR_FOREIGN_HANDLE,
        );
        is(hetmem_stream_wait_event(s1, e0), HETMEM_OK);
        let mut raw = 0usize;
        is(hetmem_stream_raw(s0, &mut raw), HETMEM_OK);
        is(
            hetmem_stream_wrap(m, 1, raw, &mut null_mut()),
            HETMEM_ERR_INVALID_ARGUMENT,
        );
        is(
            hetmem_stream_wrap(m, -1, 0, &mut null_mut()),
            HETMEM_ERR_INVALID_ARGUMENT,
        );
        is(
            hetmem_stream_wrap(m, 2, 0, &mut null_mut()),
            HETMEM_ERR_UNKNOWN_DEVICE,
        );

        // Pointers of another manager.
        is(hetmem_free(m, theirs), HETMEM_ERR_FOREIGN_POINTER);
        is(
            hetmem_copy(m, dev, theirs, 64, null_mut()),
            HETMEM_ERR_FOREIGN_POINTER,
        );
        is(
            hetmem_prefetch(m, theirs, 64, 0, null_mut()),
            HETMEM_ERR_FOREIGN_POINTER,
        );
        is(
            hetmem_advise(m, theirs, 64, HETMEM_ADVISE_SET_READ_MOSTLY, 0),
            HETMEM_ERR_FOREIGN_POINTER,
        );

        // Advice.
        is(
            hetmem_advise(m, managed, n, 77, 0),
            HETMEM_ERR_INVALID_ARGUMENT,
        );
        is(
            hetmem_advise(m, managed, n, HETMEM_ADVISE_SET_PREFERRED_LOCATION, 9),
            HETMEM_ERR_UNKNOWN_DEVICE,
        );
        is(
            hetmem_advise(m, managed, n, HETMEM_ADVISE_UNSET_ACCESSED_BY, -1),
            HETMEM_ERR_INVALID_ARGUMENT,
        );
        is(
            hetmem_advise(m, null_mut(), n, HETMEM_ADVISE_SET_READ_MOSTLY, 0),
            HETMEM_ERR_NULL_POINTER,
        );
        is(
            hetmem_advise(m, dev, n, HETMEM_ADVISE_SET_READ_MOSTLY, 0),
            HETMEM_ERR_INVALID_ARGUMENT,
        );

        // Dead and wrong-kind handles.
        let mut done = 0;
        is(
            hetmem_event_query(s0.cast(), &mut done),
            HETMEM_ERR_INVALID_HANDLE,
        );
        is(
            hetmem_stream_synchronize(e0.cast()),
            HETMEM_ERR_INVALID_HANDLE,
        );
        is(hetmem_event_destroy(m.cast()), HETMEM_ERR_INVALID_HANDLE);
        is(
            hetmem_stats_json(m, s0.cast(), null_mut(), 0, null_mut()),
            HETMEM_ERR_INVALID_HANDLE,
        );
        is(
            hetmem_stats_json(m, null_mut(), null_mut(), 0, null_mut()),
            HETMEM_ERR_BUFFER_TOO_SMALL,
        );

        for s in [s0, s1, their_s] {
            is(hetmem_stream_destroy(s), HETMEM_OK);
        }
        is(hetmem_event_destroy(e0), HETMEM_OK);
        for mgr in [m, o, h] {
            is(hetmem_manager_destroy(mgr), HETMEM_OK);
        }
    }
}

#[test]
fn store_guard_and_torch_calls_fail_with_their_listed_codes() {
    let mut id = 0u32;
    let mut size = 0usize;
    let mut state = 0;
    let mut count = 0usize;
    // SAFETY: every pointer passed is NULL or a value the call checks before use.
    unsafe {
        for store in [null_mut(), forged::<HetmemStore>()] {
            let want = if store.is_null() {
                HETMEM_ERR_NULL_POINTER
            } else {
                HETMEM_ERR_INVALID_HANDLE
            };
            is(hetmem_store_destroy(store), want);
            is(
                hetmem_store_register(store, c"x".as_ptr(), [1u8].as_ptr().cast(), 1, &mut id),
                want,
            );
            is(
                hetmem_store_register_safetensors(store, c"x".as_ptr(), null_mut(), 0, &mut count),
                want,
            );
            is(hetmem_store_lookup(store, c"x".as_ptr(), &mut id), want);
            is(hetmem_store_param_size(store, 0, &mut size), want);
            is(hetmem_store_set_sequence(store, null(), 0), want);
            is(hetmem_store_will_need(store, 0, null_mut()), want);
            is(hetmem_store_dont_need(store, 0, null_mut()), want);
            is(hetmem_store_keep_resident(store, 0, 1), want);
            is(hetmem_store_priority(store, 0, 1), want);
            is(
                hetmem_store_residency(store, 0, &mut state, null_mut()),
                want,
            );
            let mut g = null_mut();
            is(
                hetmem_store_acquire(store, 0, null_mut(), &mut g, null_mut()),
                want,
            );
            is(
                hetmem_store_acquire_timeout(store, 0, null_mut(), 1, &mut g, null_mut()),
                want,
            );
            is(
                hetmem_store_read(store, 0, [0u8; 1].as_mut_ptr().cast(), 1),
                want,
            );
            is(
                hetmem_store_create(store.cast(), null(), &mut null_mut()),
                want,
            );
        }
        is(
            hetmem_store_config_init(null_mut(), 1, 1),
            HETMEM_ERR_NULL_POINTER,
        );
        for g in [null_mut(), forged::<HetmemGuard>()] {
            let want = if g.is_null() {
                HETMEM_ERR_NULL_POINTER
            } else {
                HETMEM_ERR_INVALID_HANDLE
            };
            is(hetmem_guard_mark_dirty(g), want);
            is(hetmem_guard_release(g), want);
        }
        // The PyTorch entry points that fail before the allocator is built.
        is(
            hetmem_torch_end_allocate_to_pool(-1, 1, 2),
            HETMEM_ERR_INVALID_ARGUMENT,
        );
        is(
            hetmem_torch_release_pool(-1, 1, 2),
            HETMEM_ERR_INVALID_ARGUMENT,
        );
        let mut needed = 0usize;
        is(
            hetmem_torch_stats_json(null_mut(), 0, &mut needed),
            HETMEM_ERR_BUFFER_TOO_SMALL,
        );
        let bogus: *mut c_void = std::ptr::without_provenance_mut(0xdead_0000);
        hetmem_torch_free(bogus, 4, 0, null_mut());
        assert!(!last_error_message().is_empty());
    }
}
