//! What the fuzzer found, as minimal reproducers, and its seeds as short runs.
//!
//! Each reproducer is the smallest call sequence that showed a fault (the fuzzer's
//! finding in its comment); the seeds run the fuzzer itself for a bounded number of
//! operations (the CI step and `scripts/fuzz-long.sh` run it for longer).

use std::ffi::c_void;

use hetmem::ffi::event::*;
use hetmem::ffi::memory::*;
use hetmem::ffi::tier::*;
use hetmem::ffi::*;

/// What an out-pointer holds before a call that must clear it on failure.
const POISON: usize = 0x5EED;

fn poison<T>() -> *mut T {
    std::ptr::without_provenance_mut(POISON)
}

fn sim() -> *mut HetmemManager {
    let mut m = std::ptr::null_mut();
    // SAFETY: a C string and a valid out-pointer.
    let rc = unsafe { hetmem_manager_create(c"sim".as_ptr(), &mut m) };
    assert_eq!(rc, HETMEM_OK);
    m
}

/// Finding: "contract in hetmem_alloc / hetmem_stream_create / hetmem_stream_wrap /
/// hetmem_store_create / hetmem_store_acquire(_timeout) [*out not NULL after a
/// failure]": a call that failed on its handle (or on `cfg` NULL) left `*out` as it
/// was, where the header says "Out-handles and out-addresses are set to NULL when a
/// call fails".
#[test]
fn a_call_that_fails_on_its_handle_clears_its_out_pointers() {
    let dead = sim();
    // SAFETY: a live handle.
    assert_eq!(unsafe { hetmem_manager_destroy(dead) }, HETMEM_OK);
    let forged: *mut HetmemManager = std::ptr::without_provenance_mut(0x1234_5671);
    for m in [dead, forged, std::ptr::null_mut()] {
        let mut p: *mut c_void = poison();
        // SAFETY: the handle is only looked up; `p` is valid.
        let rc = unsafe { hetmem_alloc(m, HETMEM_HOST, -1, 64, &mut p) };
        assert_ne!(rc, HETMEM_OK);
        assert!(p.is_null(), "hetmem_alloc({m:?}) left *out {p:?}");

        let mut s: *mut HetmemStream = poison();
        // SAFETY: as above.
        let rc = unsafe { hetmem_stream_create(m, 0, &mut s) };
        assert_ne!(rc, HETMEM_OK);
        assert!(s.is_null(), "hetmem_stream_create({m:?}) left *out {s:?}");

        let mut s: *mut HetmemStream = poison();
        // SAFETY: as above.
        let rc = unsafe { hetmem_stream_wrap(m, 0, 0, &mut s) };
        assert_ne!(rc, HETMEM_OK);
        assert!(s.is_null(), "hetmem_stream_wrap({m:?}) left *out {s:?}");

        let mut cfg = std::mem::MaybeUninit::<HetmemStoreConfig>::uninit();
        // SAFETY: `cfg` is valid for a write.
        let rc = unsafe { hetmem_store_config_init(cfg.as_mut_ptr(), 1 << 20, 32 << 20) };
        assert_eq!(rc, HETMEM_OK);
        let mut st: *mut HetmemStore = poison();
        // SAFETY: as above; `cfg` is initialised.
        let rc = unsafe { hetmem_store_create(m, cfg.as_ptr(), &mut st) };
        assert_ne!(rc, HETMEM_OK);
        assert!(st.is_null(), "hetmem_store_create({m:?}) left *out {st:?}");
    }
    // Events (new since): the same.
    for m in [dead, forged, std::ptr::null_mut()] {
        let mut ev: *mut HetmemEvent = poison();
        // SAFETY: the handle is only looked up; `ev` is valid.
        let rc = unsafe { hetmem_event_create(m, 0, &mut ev) };
        assert_ne!(rc, HETMEM_OK);
        assert!(ev.is_null(), "hetmem_event_create({m:?}) left *out {ev:?}");
    }
    // A live manager, cfg NULL.
    let m = sim();
    let mut st: *mut HetmemStore = poison();
    // SAFETY: a live manager; `st` is valid.
    let rc = unsafe { hetmem_store_create(m, std::ptr::null(), &mut st) };
    assert_eq!(rc, HETMEM_ERR_NULL_POINTER);
    assert!(
        st.is_null(),
        "hetmem_store_create(cfg NULL) left *out {st:?}"
    );
    // Acquires on a store that is not live.
    let store: *mut HetmemStore = std::ptr::without_provenance_mut(0x1234_5679);
    let mut g: *mut HetmemGuard = poison();
    let mut d: *mut c_void = poison();
    // SAFETY: the handle is only looked up; out-pointers are valid.
    let rc = unsafe { hetmem_store_acquire(store, 0, std::ptr::null_mut(), &mut g, &mut d) };
    assert_eq!(rc, HETMEM_ERR_INVALID_HANDLE);
    assert!(
        g.is_null() && d.is_null(),
        "hetmem_store_acquire left {g:?}, {d:?}"
    );
    let mut g: *mut HetmemGuard = poison();
    let mut d: *mut c_void = poison();
    // SAFETY: as above.
    let rc =
        unsafe { hetmem_store_acquire_timeout(store, 0, std::ptr::null_mut(), 1, &mut g, &mut d) };
    assert_eq!(rc, HETMEM_ERR_INVALID_HANDLE);
    assert!(
        g.is_null() && d.is_null(),
        "hetmem_store_acquire_timeout left {g:?}, {d:?}"
    );
    // SAFETY: a live handle.
    assert_eq!(unsafe { hetmem_manager_destroy(m) }, HETMEM_OK);
}

/// Finding: "contract in hetmem_store_register_safetensors [count after a failure]":
/// with `path` NULL (or a bad store handle, or a path not UTF-8) the call failed before
/// it set `*count`, where the header says "on any other failure nothing is registered
/// and *count is 0" (BUFFER_TOO_SMALL aside).
#[test]
fn a_failed_file_registration_sets_count_to_zero() {
    let m = sim();
    let mut cfg = std::mem::MaybeUninit::<HetmemStoreConfig>::uninit();
    // SAFETY: `cfg` is valid for a write.
    let rc = unsafe { hetmem_store_config_init(cfg.as_mut_ptr(), 1 << 20, 32 << 20) };
    assert_eq!(rc, HETMEM_OK);
    let mut store: *mut HetmemStore = std::ptr::null_mut();
    // SAFETY: a live manager, an initialised configuration, a valid out-pointer.
    let rc = unsafe { hetmem_store_create(m, cfg.as_ptr(), &mut store) };
    assert_eq!(rc, HETMEM_OK);
    let forged: *mut HetmemStore = std::ptr::without_provenance_mut(0x1234_5679);
    let cases: [(*mut HetmemStore, *const std::ffi::c_char, i32); 3] = [
        (store, std::ptr::null(), HETMEM_ERR_NULL_POINTER),
        (
            store,
            c"\xff.safetensors".as_ptr(),
            HETMEM_ERR_INVALID_ARGUMENT,
        ),
        (
            forged,
            c"/nonexistent.safetensors".as_ptr(),
            HETMEM_ERR_INVALID_HANDLE,
        ),
    ];
    for (s, path, code) in cases {
        let mut ids = [u32::MAX; 4];
        let mut count = POISON;
        // SAFETY: the store is looked up; `path` NULL or a C string; `ids` holds 4;
        // `count` is valid.
        let rc =
            unsafe { hetmem_store_register_safetensors(s, path, ids.as_mut_ptr(), 4, &mut count) };
        assert_eq!(rc, code);
        assert_eq!(
            count,
            0,
            "*count after {}",
            hetmem_fuzz::header::Docs::load().name(code)
        );
    }
    // SAFETY: live handles.
    unsafe {
        assert_eq!(hetmem_store_destroy(store), HETMEM_OK);
        assert_eq!(hetmem_manager_destroy(m), HETMEM_OK);
    }
}
