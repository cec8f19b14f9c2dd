//! What the tests of the driver backends against their fakes share: `it/rocm_fake.rs` (the
//! ROCm backend over tests/fake_hip/fake_hip.c) and `cuda_fake/` (the CUDA backend over
//! tests/fake_cuda/fake_cuda.c).
//!
//! Helpers that build memory references, match errors, read device memory back and
//! reserve address space; and the list of the scenarios both backends go through step
//! by step alike ([`driver_scenarios!`], the scenarios themselves in
//! `driver_scenarios.rs`), which each of the two test modules instantiates with its own
//! fake. A scenario takes a [`FakeDriver`]: the backend under test on a
//! fresh machine of two devices with managed memory, the fake's counters and failure
//! injection, and the driver's names for the calls that differ; what the two drivers do
//! differently (CUDA's internal copy streams, HIP's blocking stream destruction) stays
//! in the tests of that backend.
//!
//! With `#[macro_use] mod common;` at the test crate's root, a module instantiates them
//! with `driver_scenarios!(open);`.

use std::fmt::Debug;
use std::ptr::NonNull;

use hetmem::backend::{
    Backend, BackendKind, DevicePtr, EventHandle, HostKind, MemRef, StreamHandle,
};
use hetmem::{Error, Location, Manager, MemKind};

const MIB: usize = 1 << 20;

/// The status codes both drivers give the same number (CUDA's `CUresult`, HIP's
/// `hipError_t`).
pub const INVALID_VALUE: i32 = 1;
pub const OUT_OF_MEMORY: i32 = 2;
pub const INVALID_HANDLE: i32 = 400;
pub const NOT_READY: i32 = 600;
pub const UNKNOWN: i32 = 999;
pub const ALREADY_REGISTERED: i32 = 712;
pub const NOT_REGISTERED: i32 = 713;

/// A driver call a scenario names, by what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// Device allocation (`cuMemAlloc`, `hipMalloc`).
    Alloc,
    /// Device free (`cuMemFree`, `hipFree`).
    Free,
    /// What a copy without a stream is made with (CUDA: `cuMemcpyAsync` on the internal
    /// stream; HIP: `hipMemcpy`).
    SyncCopy,
    /// Host registration.
    Register,
    /// Host unregistration.
    Unregister,
    /// Stream creation.
    StreamCreate,
    /// Stream destruction.
    StreamDestroy,
    /// Event query.
    EventQuery,
    /// Advice on managed memory.
    Advise,
}

/// A backend on a fake driver, for the shared scenarios: a fresh machine of two devices
/// of equal memory, managed memory on, nothing allocated. The fake's counters are read
/// as differences where a driver keeps objects of its own (CUDA's copy streams).
pub trait FakeDriver {
    /// The backend under test.
    fn backend(&self) -> &dyn Backend;
    /// A counter of the fake (`fakeCudaStat`, `fakeHipStat`).
    fn stat(&self, name: &str) -> i64;
    /// Makes the next `times` calls of `call` (its exported name) fail with `code`.
    fn fail_next(&self, call: &str, code: i32, times: i32);
    /// The driver's name of `call`, as `Error::Driver` reports it.
    fn call(&self, call: Call) -> &'static str;
    /// The symbol the fake exports for `call`, for [`fail_next`](Self::fail_next)
    /// (CUDA's `_v2` names).
    fn symbol(&self, call: Call) -> &'static str {
        self.call(call)
    }
    /// The name the fake gives device `i`.
    fn device_name(&self, i: usize) -> String;
    /// The PCI bus ids of the two devices in sysfs form (the fakes report upper case).
    fn pci_bus_ids(&self) -> [&'static str; 2];
    /// Checks what recording an event of device 1 on a stream of device 0 gave: CUDA's
    /// backend refuses it itself, HIP's runtime refuses it.
    fn check_cross_device_record(&self, r: Result<(), Error>);
    /// Where the fake saw the last prefetch (`"prefetch"`) or advice (`"advice"`) aimed.
    fn last_location(&self, of: &str) -> Location;
    /// How many times the fake synchronised a whole device.
    fn device_synchronizes(&self) -> i64;
    /// A `Manager` on this backend and fake.
    fn manager(&self) -> Manager;
}

/// The scenarios both driver backends go through, one `#[test]` each, named as the
/// functions of `driver_scenarios.rs`: `driver_scenarios!(open)`, where `open()` gives a
/// [`FakeDriver`].
#[allow(unused_macros)] // binaries other than `it` and `cuda_fake` do not instantiate it
macro_rules! driver_scenarios {
    ($open:path) => {
        driver_scenarios!(@tests $open;
            enumerates_devices,
            alloc_and_free_account_on_the_right_device,
            out_of_memory_carries_the_numbers,
            copies_keep_the_bytes,
            async_copies_wait_for_their_stream,
            streams_and_events,
            events_order_streams,
            host_registration,
            destroyed_handles_are_reused,
            handle_churn_across_threads,
            driver_errors_name_the_call_and_message,
            managed_memory_prefetch_and_advice,
            the_per_thread_stream_is_a_queue_per_thread,
            the_pool_orders_a_block_between_two_threads_per_thread_streams,
        );
    };
    (@tests $open:path; $($name:ident,)*) => {
        $(
            #[test]
            fn $name() {
                crate::common::driver_scenarios::$name(&$open());
            }
        )*
    };
}

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
    tier: MemKind,
    requested: usize,
    free: usize,
) {
    match r {
        Err(Error::OutOfMemory {
            kind: t,
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
            Err(Error::UnknownHandle { what: "stream", .. })
        ));
        assert!(matches!(
            d.event_done(event),
            Err(Error::UnknownHandle { what: "event", .. })
        ));
    }
    assert!(matches!(
        d.create_stream(7),
        Err(Error::UnknownDevice { device: 7, .. })
    ));
}
