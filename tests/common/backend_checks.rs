//! What the tests of the driver backends against their fakes share: `rocm_fake.rs` (the
//! ROCm backend over tests/fake_hip/fake_hip.c) and `cuda_fake.rs` (the CUDA backend over
//! tests/fake_cuda/fake_cuda.c).
//!
//! Helpers that build memory references, match errors, read device memory back and
//! reserve address space; and the scenarios both backends go through step by step alike.
//! A scenario takes the backend as `&dyn Backend` and, where it counts on the fake, the
//! fake's `stat` as a closure (`&|name| fake.stat(name)`); what differs between the
//! backends (a call's name and code, the backend's own streams) is a parameter, or stays
//! in the test that calls the scenario.
//!
//! Include it at the test crate's root: `#[path = "common/backend_checks.rs"] mod
//! backend_checks;`.
#![allow(dead_code)]

use std::fmt::Debug;
use std::ptr::NonNull;

use hetmem::backend::{
    Backend, BackendKind, DevicePtr, EventHandle, HostKind, MemRef, StreamHandle,
};
use hetmem::{Error, Tier};

const MIB: usize = 1 << 20;

/// Pageable host memory: the whole of `buf`.
pub fn host(buf: &mut [u8]) -> MemRef {
    MemRef::Host {
        ptr: NonNull::new(buf.as_mut_ptr()).unwrap(),
        kind: HostKind::Pageable,
    }
}

/// Memory at `ptr` on `device`.
pub fn dev(device: usize, ptr: DevicePtr) -> MemRef {
    MemRef::Device { device, ptr }
}

/// Checks that `err` is a driver error of backend `kind` from `want_call` with
/// `want_code` and a message, and returns the message.
pub fn assert_driver(kind: BackendKind, err: Error, want_call: &str, want_code: i32) -> String {
    match err {
        Error::Driver {
            backend,
            call,
            code,
            message,
        } => {
            assert_eq!(backend, kind);
            assert_eq!(call, want_call, "{message}");
            assert_eq!(code, want_code, "{message}");
            assert!(!message.is_empty());
            message
        }
        other => panic!("expected a driver error from {want_call}, got {other:?}"),
    }
}

/// Checks that `err` is a registration whose rollback failed (part of the range stays
/// registered), from backend `kind`'s `want_call` with code `want_code`; returns its
/// message.
pub fn assert_leaked(kind: BackendKind, err: Error, want_call: &str, want_code: i32) -> String {
    match err {
        Error::RegistrationLeaked {
            backend,
            call,
            code,
            message,
        } => {
            assert_eq!(backend, kind);
            assert_eq!(call, want_call, "{message}");
            assert_eq!(code, want_code, "{message}");
            message
        }
        other => panic!("expected a leaked registration from {want_call}, got {other:?}"),
    }
}

/// Checks that opening the backend failed as unavailable, for backend `kind`, and
/// returns why.
pub fn unavailable_reason<B: Debug>(kind: BackendKind, r: Result<B, Error>) -> String {
    match r {
        Err(Error::BackendUnavailable { backend, reason }) => {
            assert_eq!(backend, kind);
            reason
        }
        other => panic!("expected BackendUnavailable, got {other:?}"),
    }
}

/// Checks that `r` ran out of memory on `tier`, asking for `requested` bytes with `free`
/// bytes free.
pub fn assert_out_of_memory<T: Debug>(
    r: Result<T, Error>,
    tier: Tier,
    requested: usize,
    free: usize,
) {
    match r {
        Err(Error::OutOfMemory {
            tier: t,
            requested: n,
            free: f,
            ..
        }) => assert_eq!((t, n, f), (tier, requested, free)),
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
}

/// Reads `len` bytes of device memory through a synchronous copy (no stream), which
/// does not wait for the backend's own streams: hetmem's streams are non-blocking.
pub fn peek(d: &dyn Backend, device: usize, ptr: DevicePtr, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // SAFETY: `ptr` is a live allocation of at least `len` bytes on `device`; `out` is
    // a fresh buffer; the copy is synchronous.
    unsafe { d.copy(host(&mut out), dev(device, ptr), len, None).unwrap() };
    out
}

/// Address space without memory behind it (PROT_NONE + MAP_NORESERVE: no commit charge
/// even under strict overcommit); the fakes never touch registered memory.
pub struct Reservation {
    pub ptr: NonNull<u8>,
    pub len: usize,
}

impl Reservation {
    pub fn new(len: usize) -> Option<Reservation> {
        // SAFETY: an anonymous PROT_NONE mapping with no address hint affects nothing
        // else in the process.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        NonNull::new(p.cast()).map(|ptr| Reservation { ptr, len })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` with this length and is unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Handles the backend no longer knows (`stream` and `event` destroyed) are refused
/// before they reach the driver, and so is a device it does not have.
pub fn assert_refused_by_the_backend(d: &dyn Backend, stream: StreamHandle, event: EventHandle) {
    // SAFETY: the backend checks its own map first, so stale handles are not passed on.
    unsafe {
        assert!(matches!(
            d.destroy_stream(stream),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            d.event_done(event),
            Err(Error::InvalidArgument(_))
        ));
    }
    assert!(matches!(
        d.create_stream(7),
        Err(Error::UnknownDevice { device: 7, .. })
    ));
}

/// On a machine of two devices with `capacity` bytes each, where nothing is allocated:
/// device memory is charged to the device it is allocated on and given back when freed;
/// it is not cleared (both fakes fill it with 0xA5). A double free reaches the driver,
/// which refuses it: `free_call` fails with `invalid_value`.
pub fn alloc_and_free_account_on_the_right_device(
    d: &dyn Backend,
    stat: &dyn Fn(&str) -> i64,
    capacity: usize,
    free_call: &str,
    invalid_value: i32,
) {
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
    assert_driver(d.kind(), err, free_call, invalid_value);

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
/// unregistering gives it back. Registering it again is refused by the driver with
/// `register`'s call and code, unregistering it again with `unregister`'s; an empty
/// range is refused by the backend.
pub fn register_and_unregister_host(
    d: &dyn Backend,
    stat: &dyn Fn(&str) -> i64,
    register: (&str, i32),
    unregister: (&str, i32),
) {
    let kind = d.kind();
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
pub fn destroyed_handles_are_reused(d: &dyn Backend, stat: &dyn Fn(&str) -> i64) {
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
            Err(Error::InvalidArgument(_))
        ));
    }
}

/// `threads` threads each create and destroy a stream and an event `rounds` times, on
/// the two devices in turn, while the driver reuses handle values: the backend's handle
/// maps must never lose a live entry (they would if an entry were removed after the
/// driver had already handed its value out again). The caller checks the fake's counts.
pub fn churn_streams_and_events(d: &dyn Backend, threads: usize, rounds: usize) {
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
}
