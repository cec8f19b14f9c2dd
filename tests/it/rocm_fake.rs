//! The ROCm backend end to end against the fake HIP runtime (tests/fake_hip/fake_hip.c):
//! the run-time loader, device enumeration, memory, copies, streams, events,
//! registration, managed memory and error mapping, all through the `Backend` trait.

use crate::common::{backend_checks, fake_hip};

use std::path::Path;
use std::ptr::NonNull;

use backend_checks::{
    assert_driver, assert_leaked, dev, host, unavailable_reason, Call, FakeDriver, Reservation,
};
use fake_hip::{compile_c_snippet, fake_hip_library, FakeHip};
use hetmem::backend::rocm::{RocmBackend, REGISTER_CHUNK, REGISTER_ROLLBACK_CALL};
use hetmem::backend::{Backend, BackendKind};
use hetmem::{Error, Location, Manager};

const MIB: usize = 1 << 20;

/// The backend under test, for the shared checks.
const KIND: BackendKind = BackendKind::Rocm;

fn backend(fake: &FakeHip) -> RocmBackend {
    RocmBackend::with_library(fake.path()).expect("fake HIP loads")
}

/// A ROCm backend on a fake machine of its own, for the shared scenarios.
struct Rocm {
    // Dropped before the fake it was loaded from.
    b: RocmBackend,
    fake: FakeHip,
}

fn open() -> Rocm {
    let fake = FakeHip::with_devices(2, 16 * MIB as u64).unwrap();
    Rocm {
        b: backend(&fake),
        fake,
    }
}

impl FakeDriver for Rocm {
    fn backend(&self) -> &dyn Backend {
        &self.b
    }

    fn stat(&self, name: &str) -> i64 {
        self.fake.stat(name)
    }

    fn fail_next(&self, call: &str, code: i32, times: i32) {
        self.fake.fail_next(call, code, times)
    }

    fn call(&self, call: Call) -> &'static str {
        match call {
            Call::Alloc => "hipMalloc",
            Call::Free => "hipFree",
            Call::SyncCopy => "hipMemcpy",
            Call::Register => "hipHostRegister",
            Call::Unregister => "hipHostUnregister",
            Call::StreamCreate => "hipStreamCreateWithFlags",
            Call::StreamDestroy => "hipStreamDestroy",
            Call::EventQuery => "hipEventQuery",
            Call::Advise => "hipMemAdvise",
        }
    }

    fn device_name(&self, i: usize) -> String {
        format!("Fake AMD Instinct {i}")
    }

    fn pci_bus_ids(&self) -> [&'static str; 2] {
        ["0000:3b:00.0", "0000:3c:00.0"]
    }

    /// The runtime refuses it: the event is another device's.
    fn check_cross_device_record(&self, r: Result<(), Error>) {
        assert_driver(KIND, r.unwrap_err(), "hipEventRecord", 400);
    }

    /// The device the fake last saw, `hipCpuDeviceId` (-1) for the host.
    fn last_location(&self, of: &str) -> Location {
        match self.stat(&format!("last_{of}_device")) {
            -1 => Location::Host,
            d => Location::Device(d as usize),
        }
    }

    fn device_synchronizes(&self) -> i64 {
        self.stat("device_synchronizes")
    }

    fn manager(&self) -> Manager {
        Manager::builder()
            .backend(BackendKind::Rocm)
            .rocm_library(self.fake.path())
            .build()
            .unwrap()
    }
}

driver_scenarios!(open);

/// What the shared `enumerates_devices` does not see: the runtime's version, more
/// devices, and the concrete backend behind the trait.
#[test]
fn reports_the_runtime_version_and_more_devices() {
    let fake = FakeHip::with_devices(3, 64 * MIB as u64).unwrap();
    let b = backend(&fake);
    let d: &dyn Backend = &b;
    assert_eq!(d.kind(), BackendKind::Rocm);
    assert_eq!(d.devices().len(), 3);
    assert_eq!(d.devices()[2].pci_bus_id.as_deref(), Some("0000:3d:00.0"));
    assert_eq!(b.runtime_version(), 50221153);
    assert!(d.as_any().downcast_ref::<RocmBackend>().is_some());
}

/// A copy without a stream is one `hipMemcpy`, a copy on a stream one
/// `hipMemcpyAsync`.
#[test]
fn copies_are_hip_memcpy_and_hip_memcpy_async() {
    let f = open();
    let d = f.backend();
    let len = 4096;
    let mut buf = vec![5u8; len];
    let p = d.alloc_device(0, len).unwrap();
    let s = d.create_stream(0).unwrap();
    // SAFETY: live, disjoint ranges; the stream is synchronised before they go.
    unsafe {
        d.copy(dev(0, p), host(&mut buf), len, None).unwrap();
        d.copy(host(&mut buf), dev(0, p), len, Some(s)).unwrap();
        d.synchronize_stream(s).unwrap();
        d.destroy_stream(s).unwrap();
        d.free_device(0, p, len).unwrap();
    }
    assert_eq!((f.stat("copies"), f.stat("async_copies")), (1, 1));
}

/// Destroying a stream lets its queued work finish first (the fake's
/// `hipStreamDestroy` runs it).
#[test]
fn destroying_a_stream_lets_its_work_finish() {
    let f = open();
    let d = f.backend();
    let len = 64 << 10;
    let mut a: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut out = vec![0u8; len];
    let src = d.alloc_device(0, len).unwrap();
    let s = d.create_stream(0).unwrap();
    // SAFETY: live, disjoint ranges that outlive the destruction, which runs the copy.
    unsafe {
        d.copy(dev(0, src), host(&mut a), len, None).unwrap();
        d.copy(host(&mut out), dev(0, src), len, Some(s)).unwrap();
        assert!(out.iter().all(|&x| x == 0));
        d.destroy_stream(s).unwrap();
        assert_eq!(out, a);
        d.free_device(0, src, len).unwrap();
    }
}

#[test]
fn shared_fake_library_builds_and_loads() {
    let path = fake_hip_library().unwrap();
    assert!(
        path.ends_with("fake-hip/libfake_amdhip64.so"),
        "{}",
        path.display()
    );
    let b = RocmBackend::with_library(&path).unwrap();
    assert_eq!(b.kind(), BackendKind::Rocm);
    assert!(!b.devices().is_empty());
    assert_eq!(fake_hip_library().unwrap(), path, "built once, same path");
}

#[test]
fn large_registrations_are_chunked() {
    const GIB: usize = 1 << 30;
    let len = 150 * GIB;
    // PROT_NONE + MAP_NORESERVE takes address space only (1 TiB works on the CI
    // hosts); failing here is a failure, never a silent pass.
    let res = Reservation::new(len).expect("reserve 150 GiB of address space (PROT_NONE)");
    let fake = FakeHip::with_devices(1, 16 * MIB as u64).unwrap();
    let b = backend(&fake);
    let d: &dyn Backend = &b;
    // SAFETY: the range is mapped (PROT_NONE; the fake runtime never touches it) and
    // stays mapped until `res` drops, after unregistering.
    unsafe {
        d.register_host(res.ptr, len).unwrap();
        assert_eq!(fake.stat("registrations"), 3, "64 + 64 + 22 GiB");
        assert_eq!(fake.stat("registered_bytes"), len as i64);
        d.unregister_host(res.ptr, len).unwrap();
        assert_eq!(fake.stat("registrations"), 0);

        // A failure in the second chunk undoes the first.
        let in_second = NonNull::new(res.ptr.as_ptr().add(64 * GIB + 4096)).unwrap();
        d.register_host(in_second, 4096).unwrap();
        assert_driver(
            KIND,
            d.register_host(res.ptr, len).unwrap_err(),
            "hipHostRegister",
            712,
        );
        assert_eq!(
            fake.stat("registrations"),
            1,
            "only the blocking one is left"
        );

        // If undoing the first chunk fails too, part of the range stays registered: the
        // error says so, distinctly, so that the owner leaks the region instead of
        // unmapping registered memory.
        fake.fail_next("hipHostUnregister", 999, 1);
        // The code is the failed hipHostUnregister's.
        let err = d.register_host(res.ptr, len).unwrap_err();
        let message = assert_leaked(KIND, err, REGISTER_ROLLBACK_CALL, 999);
        assert_eq!(REGISTER_ROLLBACK_CALL, "hipHostRegister(rollback)");
        assert!(
            message.contains("rollback failed; region leaked"),
            "{message}"
        );
        assert!(message.contains("code 712"), "names the cause: {message}");
        assert_eq!(
            fake.stat("registrations"),
            2,
            "the first chunk leaked, and the blocking one"
        );
        d.unregister_host(res.ptr, REGISTER_CHUNK).unwrap();
        d.unregister_host(in_second, 4096).unwrap();
    }
    assert_eq!(fake.stat("registrations"), 0);
}

#[test]
fn managed_memory_unsupported_device() {
    let fake = FakeHip::new().unwrap();
    fake.configure(1, 16 * MIB as u64, false).unwrap();
    let b = backend(&fake);
    assert!(!b.devices()[0].managed_memory);
    assert!(matches!(
        b.alloc_managed(0, MIB),
        Err(Error::Unsupported {
            backend: BackendKind::Rocm,
            ..
        })
    ));
}

#[test]
fn concurrent_use_from_threads() {
    let fake = FakeHip::with_devices(2, 64 * MIB as u64).unwrap();
    let b = backend(&fake);
    std::thread::scope(|scope| {
        for t in 0..8usize {
            let d: &dyn Backend = &b;
            scope.spawn(move || {
                let device = t % 2;
                let s = d.create_stream(device).unwrap();
                for i in 0..20usize {
                    let len = 4096 + i * 512 + t;
                    let mut src: Vec<u8> = (0..len).map(|k| (k + t + i) as u8).collect();
                    let mut back = vec![0u8; len];
                    let p = d.alloc_device(device, len).unwrap();
                    // SAFETY: live buffers and allocation, disjoint, synchronised before
                    // they are dropped; the stream is live.
                    unsafe {
                        d.copy(dev(device, p), host(&mut src), len, Some(s))
                            .unwrap();
                        d.copy(host(&mut back), dev(device, p), len, Some(s))
                            .unwrap();
                        d.synchronize_stream(s).unwrap();
                        d.free_device(device, p, len).unwrap();
                    }
                    assert_eq!(back, src);
                }
                // SAFETY: a live stream from this backend, destroyed once.
                unsafe { d.destroy_stream(s).unwrap() };
            });
        }
    });
    assert_eq!(fake.stat("allocations"), 0);
    assert_eq!(fake.stat("streams"), 0);
    assert_eq!(fake.stat("used:0") + fake.stat("used:1"), 0);
}

#[test]
fn no_devices_is_unavailable() {
    let fake = FakeHip::new().unwrap();
    fake.configure(0, 0, true).unwrap();
    let reason = unavailable_reason(KIND, RocmBackend::with_library(fake.path()));
    assert!(reason.contains("no HIP device"), "{reason}");
}

#[test]
fn failing_hip_init_is_unavailable() {
    let fake = FakeHip::new().unwrap();
    fake.fail_next("hipInit", 3, 1);
    let reason = unavailable_reason(KIND, RocmBackend::with_library(fake.path()));
    assert!(
        reason.contains("hipInit") && reason.contains("initialization error"),
        "{reason}"
    );
}

#[test]
fn missing_library_is_unavailable_and_named() {
    let path = Path::new("/nonexistent/hetmem/libamdhip64.so");
    let reason = unavailable_reason(KIND, RocmBackend::with_library(path));
    assert!(
        reason.contains("/nonexistent/hetmem/libamdhip64.so"),
        "{reason}"
    );
}

#[test]
fn missing_symbol_is_unavailable_and_named() {
    let lib = compile_c_snippet(
        "hip_init_only",
        "int hipInit(unsigned int flags) { (void)flags; return 0; }\n",
    )
    .unwrap();
    let reason = unavailable_reason(KIND, RocmBackend::with_library(&lib));
    // Symbols resolve in declaration order: hipInit is there, hipGetDeviceCount is not.
    assert!(reason.contains("hipGetDeviceCount"), "{reason}");
    assert!(reason.contains("libhip_init_only.so"), "{reason}");
}

/// Where Debian's libamdhip64-dev installs ROCm's real runtime.
const REAL_HIP: &str = "/usr/lib/x86_64-linux-gnu/libamdhip64.so.5";

/// ROCm's real runtime resolves every symbol: without a GPU it answers
/// hipErrorNoDevice, with one it works.
///
/// The standard test harness cannot decide "ignored" at run time, so the test is
/// ignored unless built with `rocm-link`, the feature that already needs ROCm
/// installed (`HIP_PATH=/usr cargo test --features rocm-link --test it rocm_fake::`), or
/// run with `--ignored`. Wherever it runs, the runtime is required: a missing library
/// is a failure, never a pass.
#[test]
#[cfg_attr(
    not(feature = "rocm-link"),
    ignore = "needs ROCm's libamdhip64.so.5 (Debian: libamdhip64-dev); \
              run with --features rocm-link or --ignored"
)]
fn real_runtime_resolves_every_symbol() {
    let path = Path::new(REAL_HIP);
    assert!(
        path.exists(),
        "{REAL_HIP} is missing: install libamdhip64-dev (CI does)"
    );
    match RocmBackend::with_library(path) {
        Ok(b) => {
            assert!(!b.devices().is_empty());
            assert!(b.runtime_version() > 0);
        }
        Err(Error::BackendUnavailable { reason, .. }) => {
            // Every symbol resolved (else: "lacks symbol"), hipInit ran, and the
            // runtime then reported the machine's state.
            assert!(!reason.contains("lacks symbol"), "{reason}");
            assert!(
                reason.contains("no HIP device") || reason.contains("hipInit"),
                "{reason}"
            );
            eprintln!("real HIP runtime: {reason}");
        }
        Err(other) => panic!("{other:?}"),
    }
}
