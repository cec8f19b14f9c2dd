//! The CUDA backend end to end against the fake CUDA driver (tests/fake_cuda/fake_cuda.c),
//! through the `Backend` trait: loading, device enumeration, memory, copies, streams,
//! events, contexts on fresh threads, registration in chunks, managed memory, virtual
//! memory management, `DriverPinned`, foreign streams and error mapping; then a
//! `Manager` on the CUDA backend with the device pool and the tier store.
//!
//! cudarc binds the driver once per process, so every test here shares one fake machine
//! (2 devices of 256 MiB, managed memory, VMM): each test holds `FakeCuda::serial()`
//! and leaves the machine as it found it. Tests that need another machine (no devices,
//! no VMM, ...) re-run this binary for themselves in a child process with the fake's
//! environment variables ([`child`]).

#[path = "common/backend_checks.rs"]
mod backend_checks;
#[path = "common/fake_cuda.rs"]
mod fake_cuda;
#[path = "common/fake_hip.rs"]
mod fake_hip;

use std::ffi::{c_int, c_void, CStr};
use std::path::PathBuf;
use std::process::Command;
use std::ptr::NonNull;
use std::sync::{MutexGuard, OnceLock};

use backend_checks::{
    assert_driver, assert_leaked, assert_out_of_memory, dev, host, peek, unavailable_reason,
    Reservation,
};
use fake_cuda::{code, fake_cuda_library, FakeCuda};
use fake_hip::compile_c_snippet;
use hetmem::backend::cuda::{CudaBackend, DriverPinned, REGISTER_ROLLBACK_CALL};
use hetmem::backend::{Backend, BackendKind, DevicePtr, HostKind, MemRef, PhysHandle};
use hetmem::pool::host::HostPoolConfig;
use hetmem::pool::{Budget, PoolConfig};
use hetmem::tier::{SequenceHint, TierConfig, TierStore};
use hetmem::{Advice, Error, Location, Manager, NumaPolicy, Placement, Tier};

const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;
const DEVICE_MEM: usize = 256 * MIB;
const PAGE: usize = 2 * MIB;

/// The backend under test, for the shared checks.
const KIND: BackendKind = BackendKind::Cuda;

/// Set in a child process to the name of the one test it runs.
const CHILD_ENV: &str = "HETMEM_FAKE_CUDA_CHILD";

/// The shared fake, configured (in the parent process) before the first `cuInit`.
fn fake() -> &'static FakeCuda {
    static CONFIGURED: OnceLock<()> = OnceLock::new();
    let f = FakeCuda::preload();
    CONFIGURED.get_or_init(|| {
        if std::env::var_os(CHILD_ENV).is_none() {
            f.configure(2, DEVICE_MEM as u64, true, true)
                .expect("configure the fake before cuInit");
        }
    });
    f
}

/// The fake, this test's turn at it, and a backend on it.
fn setup() -> (&'static FakeCuda, MutexGuard<'static, ()>, CudaBackend) {
    let f = fake();
    let guard = FakeCuda::serial();
    let b = CudaBackend::new().expect("the fake driver loads");
    (f, guard, b)
}

/// A `Manager` on the CUDA backend (over the fake, which `fake()` has loaded).
fn cuda_manager() -> Manager {
    Manager::builder()
        .backend(BackendKind::Cuda)
        .build()
        .unwrap()
}

/// Runs the calling test alone in a child process with `env` (the fake's variables are
/// read at the child's first driver call), and returns false; in that child it returns
/// true, and the test's body runs there.
fn child(test: &str, env: &[(&str, &str)]) -> bool {
    if std::env::var(CHILD_ENV).as_deref() == Ok(test) {
        return true;
    }
    let mut env = env.to_vec();
    env.push((CHILD_ENV, test));
    run_alone(test, &env);
    false
}

/// Runs test `test` of this binary alone in a child process, with the fake this process
/// built and `env`, and checks that it ran and passed.
fn run_alone(test: &str, env: &[(&str, &str)]) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(fake_cuda::BUILT_ENV, fake_cuda_library().unwrap())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child {test} {env:?} failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "child {test} {env:?} ran no test:\n{text}"
    );
}

/// A driver entry point of the preloaded fake, called directly (what hetmem never
/// does): for checks of the fake itself and for streams "made by the caller".
fn raw<T: Copy>(name: &CStr) -> T {
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    let path = fake_cuda_library().unwrap();
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: the fake is loaded (preload), so this only takes another reference to it,
    // which is never dropped; the names are valid C strings.
    let p = unsafe {
        let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        assert!(!h.is_null(), "the fake is loaded");
        libc::dlsym(h, name.as_ptr())
    };
    assert!(!p.is_null(), "{name:?}");
    // SAFETY: T is the C signature of that symbol (callers match fake_cuda.c).
    unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) }
}

/// A device's primary context as a runtime user (PyTorch) holds it: retained by the
/// test itself and made current on the calling thread. Dropped, it releases that
/// reference and leaves the thread's current context alone, as the driver's release
/// does.
#[must_use = "the context is released when this drops"]
struct Primary {
    device: c_int,
    ctx: *mut c_void,
}

/// Retains `device`'s primary context and makes it current on this thread, as a
/// runtime user would before calling the driver itself: the backend restores whatever
/// was current.
fn bind_primary(device: c_int) -> Primary {
    type RetainFn = unsafe extern "C" fn(*mut *mut c_void, c_int) -> c_int;
    let retain: RetainFn = raw(c"cuDevicePrimaryCtxRetain");
    let set: CuCtxSetFn = raw(c"cuCtxSetCurrent");
    let mut ctx = std::ptr::null_mut();
    // SAFETY: a valid out-pointer and device; the reference is released by the guard.
    unsafe {
        assert_eq!(retain(&mut ctx, device), 0);
        assert_eq!(set(ctx), 0);
    }
    Primary { device, ctx }
}

impl Drop for Primary {
    fn drop(&mut self) {
        type ReleaseFn = unsafe extern "C" fn(c_int) -> c_int;
        let release: ReleaseFn = raw(c"cuDevicePrimaryCtxRelease_v2");
        // SAFETY: retained once in `bind_primary`, released once here.
        let rc = unsafe { release(self.device) };
        // Not a panic in drop; the tests that count references see a failure.
        if rc != 0 {
            eprintln!("releasing device {}'s primary context: {rc}", self.device);
        }
    }
}

/// The context current on this thread (null: none).
fn current_ctx() -> *mut c_void {
    let get: CuCtxGetFn = raw(c"cuCtxGetCurrent");
    let mut ctx = std::ptr::null_mut();
    // SAFETY: a valid out-pointer.
    assert_eq!(unsafe { get(&mut ctx) }, 0);
    ctx
}

type CuMemAllocFn = unsafe extern "C" fn(*mut u64, usize) -> c_int;
type CuMemFreeFn = unsafe extern "C" fn(u64) -> c_int;
type CuCountFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuStreamCreateFn = unsafe extern "C" fn(*mut *mut c_void, u32) -> c_int;
type CuStreamFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type CuCtxGetFn = unsafe extern "C" fn(*mut *mut c_void) -> c_int;
type CuCtxSetFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type CuRegisterFn = unsafe extern "C" fn(*mut c_void, usize, u32) -> c_int;
type CuUnregisterFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type CuAttrFn = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
type CuInitFn = unsafe extern "C" fn(u32) -> c_int;
type CuMemcpyFn = unsafe extern "C" fn(u64, u64, usize, *mut c_void) -> c_int;
type CuMemAllocManagedFn = unsafe extern "C" fn(*mut u64, usize, u32) -> c_int;

// ------------------------------------------------------------------------- loading

#[test]
fn preload_answers_the_backends_dlopen() {
    let (f, _g, b) = setup();
    assert!(
        f.path().ends_with("fake-cuda/libcuda.so.1"),
        "{}",
        f.path().display()
    );
    assert_eq!(fake_cuda_library().unwrap(), f.path(), "built once");
    assert!(f.answers_libcuda());
    assert_eq!(f.stat("initialized"), 1);
    // The driver the backend loaded is the fake: its devices are the fake's.
    assert_eq!(b.kind(), BackendKind::Cuda);
    assert_eq!(b.devices()[0].name, "Fake NVIDIA H100 0");
}

/// A directory on the loader path holding a stub `libcuda.so` as the CUDA toolkit ships
/// it (every entry point the fake exports, each answering CUDA_ERROR_STUB_LIBRARY), and,
/// if `driver`, the fake driver as `libcuda.so.1`, the name a driver installs.
fn stub_dir(role: &str, driver: bool) -> PathBuf {
    let fake_src = std::fs::read_to_string(fake_cuda::fake_cuda_source()).unwrap();
    let stub: String = fake_src
        .lines()
        .filter_map(|l| l.strip_prefix("EXPORT CUresult "))
        .filter_map(|l| l.split_once('(').map(|(name, _)| name))
        .map(|name| format!("int {name}(void) {{ return {}; }}\n", code::STUB_LIBRARY))
        .collect();
    assert!(stub.contains("int cuInit(void)") && stub.contains("cuMemHostRegister_v2"));
    let lib = compile_c_snippet(&format!("stub_cuda_{role}"), &stub).unwrap();
    let dir = lib
        .parent()
        .unwrap()
        .join(format!("stub-{role}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&lib, dir.join("libcuda.so")).unwrap();
    if driver {
        std::fs::copy(fake_cuda_library().unwrap(), dir.join("libcuda.so.1")).unwrap();
    }
    dir
}

/// The backend loads `libcuda.so.1` (the driver's name) before `libcuda.so`, so a CUDA
/// toolkit stub `libcuda.so` earlier on the loader path does not shadow the driver
/// (cudarc's own loader tries `libcuda.so` first and got the stub: "both" failed). A
/// stub alone is refused, named as such; and the preloaded fake wins over a stub too.
#[test]
fn libcuda_so_1_is_loaded_before_a_stub_libcuda_so() {
    let role = std::env::var("STUB_ROLE").unwrap_or_default();
    if role.is_empty() {
        for (role, driver) in [("both", true), ("stub", false), ("preloaded", false)] {
            let dir = stub_dir(role, driver);
            run_alone(
                "libcuda_so_1_is_loaded_before_a_stub_libcuda_so",
                &[
                    ("LD_LIBRARY_PATH", dir.to_str().unwrap()),
                    ("STUB_ROLE", role),
                ],
            );
            let _ = std::fs::remove_dir_all(dir);
        }
        return;
    }
    match role.as_str() {
        "both" => {
            // No preload: the loader path decides, and has both names.
            let b = CudaBackend::new().expect("the driver (libcuda.so.1), not the stub");
            assert_eq!(b.devices()[0].name, "Fake NVIDIA H100 0");
            let p = b.alloc_device(0, 4096).unwrap();
            // SAFETY: just allocated, freed once.
            unsafe { b.free_device(0, p, 4096).unwrap() };
        }
        "stub" => {
            let reason = unavailable_reason(KIND, CudaBackend::new());
            assert!(
                reason.contains("stub library") && reason.contains("libcuda.so"),
                "{reason}"
            );
        }
        "preloaded" => {
            let f = FakeCuda::preload();
            assert!(f.answers_libcuda());
            let b = CudaBackend::new().expect("the fake, not the stub");
            assert_eq!(b.devices()[0].name, "Fake NVIDIA H100 0");
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn calls_before_cu_init_are_refused_and_no_device_is_unavailable() {
    if !child(
        "calls_before_cu_init_are_refused_and_no_device_is_unavailable",
        &[("FAKE_CUDA_DEVICES", "0")],
    ) {
        return;
    }
    let f = fake();
    let reason = unavailable_reason(KIND, CudaBackend::new());
    assert!(reason.contains("no CUDA device"), "{reason}");
    assert_eq!(f.stat("initialized"), 0);
    let count: CuCountFn = raw(c"cuDeviceGetCount");
    let alloc: CuMemAllocFn = raw(c"cuMemAlloc_v2");
    let mut n = -1;
    let mut p = 0u64;
    // SAFETY: valid out-pointers; the fake refuses before touching them.
    unsafe {
        assert_eq!(count(&mut n), code::NOT_INITIALIZED);
        assert_eq!(alloc(&mut p, 4096), code::NOT_INITIALIZED);
    }
    // Twice: the second attempt must not trip over the first.
    assert!(unavailable_reason(KIND, CudaBackend::new()).contains("no CUDA device"));
}

#[test]
fn failing_cu_init_is_unavailable() {
    if !child(
        "failing_cu_init_is_unavailable",
        &[("FAKE_CUDA_INIT_ERROR", "999")],
    ) {
        return;
    }
    fake();
    let reason = unavailable_reason(KIND, CudaBackend::new());
    assert!(
        reason.contains("cuInit") && reason.contains("unknown error"),
        "{reason}"
    );
    let init: CuInitFn = raw(c"cuInit");
    // SAFETY: plain value.
    assert_eq!(unsafe { init(1) }, code::INVALID_VALUE, "flags must be 0");
}

/// A device without unified addressing is refused, and the contexts retained for the
/// devices opened before the failure are released again.
#[test]
fn device_without_unified_addressing_is_refused_and_cleaned_up() {
    if !child(
        "device_without_unified_addressing_is_refused_and_cleaned_up",
        &[("FAKE_CUDA_UNIFIED", "0")],
    ) {
        return;
    }
    let f = fake();
    let reason = unavailable_reason(KIND, CudaBackend::new());
    assert!(reason.contains("lacks unified addressing"), "{reason}");
    assert_eq!(f.stat("ctx_refcount:0"), 0);
    assert_eq!(f.stat("ctx_refcount:1"), 0);
}

// ----------------------------------------------------------------------- devices

#[test]
fn enumerates_devices() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    assert_eq!(d.devices().len(), 2);
    for (i, info) in d.devices().iter().enumerate() {
        assert_eq!(info.ordinal, i);
        assert_eq!(info.name, format!("Fake NVIDIA H100 {i}"));
        assert_eq!(info.total_memory, DEVICE_MEM);
        assert!(info.managed_memory);
        assert_eq!(d.vmm_granularity(i), Some(PAGE));
    }
    // The driver says "0000:1A:00.0"; the backend gives sysfs form.
    assert_eq!(d.devices()[0].pci_bus_id.as_deref(), Some("0000:1a:00.0"));
    assert_eq!(d.devices()[1].pci_bus_id.as_deref(), Some("0000:1b:00.0"));
    assert_eq!(d.vmm_granularity(2), None);
    let m = d.mem_info(1).unwrap();
    assert_eq!((m.free, m.total), (DEVICE_MEM, DEVICE_MEM));
    assert!(matches!(
        d.mem_info(2),
        Err(Error::UnknownDevice {
            device: 2,
            count: 2,
            backend: BackendKind::Cuda
        })
    ));
    // One retain per device per backend, at the device's first use (the granularity
    // queries above opened both), released on drop.
    let (r0, r1) = (f.stat("ctx_refcount:0"), f.stat("ctx_refcount:1"));
    assert!(r0 >= 1 && r1 >= 1);
    let streams = f.stat("streams");
    let second = CudaBackend::new().unwrap();
    assert_eq!(second.devices(), d.devices(), "listed without a context");
    assert_eq!(f.stat("ctx_refcount:0"), r0, "nothing retained yet");
    let p = second.alloc_device(0, 4096).unwrap();
    // SAFETY: just allocated, freed once.
    unsafe { second.free_device(0, p, 4096).unwrap() };
    let mut x = [0u8; 4096];
    let mut y = [0u8; 4096];
    // SAFETY: two live host buffers, disjoint, copied synchronously.
    unsafe { second.copy(host(&mut x), host(&mut y), 4096, None).unwrap() };
    assert_eq!(
        f.stat("streams"),
        streams + 1,
        "device 0's copy stream, made at first use"
    );
    assert_eq!(f.stat("ctx_refcount:0"), r0 + 1);
    assert_eq!(f.stat("ctx_refcount:1"), r1, "device 1 untouched");
    drop(second);
    assert_eq!(f.stat("ctx_refcount:0"), r0);
    assert_eq!(
        f.stat("streams"),
        streams,
        "the second backend's copy stream is gone"
    );
}

/// The driver is asked only for the attributes the fake models: an unmodelled one is
/// refused, so a new query in the backend shows up here.
#[test]
fn fake_refuses_unmodelled_attributes() {
    let (_f, _g, _b) = setup();
    let attr: CuAttrFn = raw(c"cuDeviceGetAttribute");
    let mut v = -1;
    // SAFETY: valid out-pointer.
    unsafe {
        assert_eq!(attr(&mut v, 41, 0), 0);
        assert_eq!(v, 1, "unified addressing");
        assert_eq!(
            attr(&mut v, 1, 0),
            code::INVALID_VALUE,
            "max threads: not modelled"
        );
        assert_eq!(attr(&mut v, 41, 2), code::INVALID_DEVICE);
    }
}

// ------------------------------------------------------------------------ memory

#[test]
fn alloc_and_free_account_on_the_right_device() {
    let (f, _g, b) = setup();
    backend_checks::alloc_and_free_account_on_the_right_device(
        &b,
        &|name| f.stat(name),
        DEVICE_MEM,
        "cuMemFree",
        code::INVALID_VALUE,
    );
}

#[test]
fn out_of_memory_carries_the_numbers() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let keep = d.alloc_device(1, 200 * MIB).unwrap();
    assert_out_of_memory(
        d.alloc_device(1, 100 * MIB),
        Tier::Device(1),
        100 * MIB,
        56 * MIB,
    );
    // Device 0 is untouched by device 1's use.
    let other = d.alloc_device(0, DEVICE_MEM).unwrap();
    assert_out_of_memory(d.alloc_managed(0, MIB), Tier::Managed(0), MIB, 0);
    // An out-of-memory answer from the driver is mapped whatever the sizes.
    f.fail_next("cuMemAlloc_v2", code::OUT_OF_MEMORY, 1);
    assert_out_of_memory(d.alloc_device(1, MIB), Tier::Device(1), MIB, 56 * MIB);
    // SAFETY: live allocations from this backend, freed once.
    unsafe {
        d.free_device(1, keep, 200 * MIB).unwrap();
        d.free_device(0, other, DEVICE_MEM).unwrap();
    }
    assert_eq!(f.stat("allocations"), 0);
}

// ------------------------------------------------------------------------ copies

#[test]
fn copies_keep_the_bytes() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = MIB + 123;
    let mut src: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    let mut back = vec![0u8; len];
    let (copies, queued, peers) = (
        f.stat("copies"),
        f.stat("async_copies"),
        f.stat("peer_copies"),
    );
    let streams = f.stat("streams");
    let a = d.alloc_device(0, len).unwrap();
    let c = d.alloc_device(1, len).unwrap();
    let s1 = d.create_stream(1).unwrap();
    assert_eq!(f.stat("last_stream_flags"), 1, "CU_STREAM_NON_BLOCKING");
    // SAFETY: all ranges are `len` bytes of live memory, disjoint, kept alive until the
    // stream is synchronised; the stream is live.
    unsafe {
        d.copy(dev(0, a), host(&mut src), len, None).unwrap();
        // Device 0 to device 1 on device 1's stream: a peer copy.
        d.copy(dev(1, c), dev(0, a), len, Some(s1)).unwrap();
        d.copy(host(&mut back), dev(1, c), len, Some(s1)).unwrap();
        assert!(back.iter().all(|&x| x == 0), "queued, not yet run");
        d.synchronize_stream(s1).unwrap();
    }
    assert_eq!(back, src);
    // The synchronous copy went through the internal stream too (queued, then synced).
    assert_eq!(f.stat("copies"), copies, "no copy on the legacy stream");
    assert_eq!(f.stat("async_copies"), queued + 3);
    assert_eq!(f.stat("peer_copies"), peers + 1);

    // Device to device on one device: a plain copy, on the device's stream.
    let a2 = d.alloc_device(0, len).unwrap();
    // SAFETY: live, disjoint, `len` bytes each; synchronous.
    unsafe { d.copy(dev(0, a2), dev(0, a), len, None).unwrap() };
    assert_eq!(peek(d, 0, a2, len), src);
    // SAFETY: allocated above, freed once.
    unsafe { d.free_device(0, a2, len).unwrap() };

    let mut part = vec![0u8; 100];
    // SAFETY: 100 bytes from offset 1000 lie inside the allocation.
    unsafe {
        d.copy(host(&mut part), dev(1, c.offset(1000)), 100, None)
            .unwrap()
    };
    assert_eq!(part[..], src[1000..1100]);
    // SAFETY: the fake checks bounds before touching memory, so this out-of-range copy
    // is refused without reading past the allocation.
    let err = unsafe { d.copy(host(&mut back), dev(1, c.offset(1)), len, None) }.unwrap_err();
    assert_driver(KIND, err, "cuMemcpyAsync", code::INVALID_VALUE);
    // A peer copy that runs past its source is refused too.
    // SAFETY: as above.
    let err = unsafe { d.copy(dev(0, a), dev(1, c.offset(8)), len, None) }.unwrap_err();
    assert_driver(KIND, err, "cuMemcpyPeerAsync", code::INVALID_VALUE);
    // SAFETY: zero bytes: nothing is touched.
    unsafe { d.copy(host(&mut back), dev(1, c), 0, None).unwrap() };
    // SAFETY: live handles and allocations from this backend, released once.
    unsafe {
        d.destroy_stream(s1).unwrap();
        d.free_device(0, a, len).unwrap();
        d.free_device(1, c, len).unwrap();
    }
    assert_eq!(f.stat("allocations"), 0);
    assert_eq!(
        f.stat("streams"),
        streams + 2,
        "only the two internal copy streams, made by the synchronous copies"
    );
}

#[test]
fn async_copies_wait_for_their_stream() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = 64 << 10;
    let mut a: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut bytes_b: Vec<u8> = (0..len).map(|i| (i % 13 + 100) as u8).collect();
    let mut out = vec![0u8; len];
    let src = d.alloc_device(0, len).unwrap();
    let dst = d.alloc_device(0, len).unwrap();
    let untouched = peek(d, 0, dst, len);
    let s = d.create_stream(0).unwrap();
    let e = d.create_event(0).unwrap();
    assert_eq!(f.stat("last_event_flags"), 2, "CU_EVENT_DISABLE_TIMING");
    let done = f.stat("async_copies_done");
    // SAFETY: every range is `len` bytes of live memory, disjoint, and outlives the
    // synchronisation below; the handles are live and from this backend.
    unsafe {
        d.copy(dev(0, src), host(&mut a), len, None).unwrap();
        // An event never recorded, or recorded on an idle stream, has passed.
        assert!(d.event_done(e).unwrap());
        d.record_event(e, s).unwrap();
        assert!(d.event_done(e).unwrap());

        d.copy(host(&mut out), dev(0, src), len, Some(s)).unwrap();
        d.copy(dev(0, dst), host(&mut bytes_b), len, Some(s))
            .unwrap();
        d.record_event(e, s).unwrap();
        assert_eq!(f.stat("queued_ops"), 3, "two copies and a record");
        assert!(out.iter().all(|&x| x == 0), "device-to-host copy ran early");
        assert_eq!(peek(d, 0, dst, len), untouched, "host-to-device ran early");
        assert_eq!(
            f.stat("async_copies_done"),
            done + 2,
            "only the synchronous copies: the fill and the peek"
        );
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

        // cuStreamDestroy returns at once: the queued work is not done yet, but it
        // finishes (here: when its event is waited for) and only then is the handle
        // free again.
        out.fill(0);
        d.copy(host(&mut out), dev(0, src), len, Some(s)).unwrap();
        d.record_event(e, s).unwrap();
        d.destroy_stream(s).unwrap();
        assert_eq!(f.stat("zombie_streams"), 1);
        assert!(out.iter().all(|&x| x == 0), "destroy does not wait");
        d.synchronize_event(e).unwrap();
        assert_eq!(out, a);
        assert_eq!(f.stat("zombie_streams"), 0);

        d.destroy_event(e).unwrap();
        d.free_device(0, src, len).unwrap();
        d.free_device(0, dst, len).unwrap();
    }
}

/// Freeing memory that a queued copy touches lets the copy finish first (cuMemFree's
/// implicit synchronisation).
#[test]
fn free_waits_for_queued_copies() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = 4096;
    let mut data = vec![9u8; len];
    let mut out = vec![0u8; len];
    let p = d.alloc_device(1, len).unwrap();
    let s = d.create_stream(1).unwrap();
    // SAFETY: live ranges that outlive the copies (the free runs them); live stream.
    unsafe {
        d.copy(dev(1, p), host(&mut data), len, Some(s)).unwrap();
        d.copy(host(&mut out), dev(1, p), len, Some(s)).unwrap();
        assert_eq!(f.stat("queued_ops"), 2);
        d.free_device(1, p, len).unwrap();
        assert_eq!(f.stat("queued_ops"), 0);
        d.destroy_stream(s).unwrap();
    }
    assert_eq!(out, data);
}

#[test]
fn streams_and_events() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let streams = f.stat("streams");
    let s0 = d.create_stream(0).unwrap();
    let s1 = d.create_stream(1).unwrap();
    let e1 = d.create_event(1).unwrap();
    assert_eq!(
        f.stat("streams"),
        streams + 2,
        "two of ours, no internal one yet"
    );
    assert_eq!(f.stat("events"), 1);
    // SAFETY: all handles are live and from this backend.
    unsafe {
        d.record_event(e1, s1).unwrap();
        d.stream_wait_event(s0, e1).unwrap();
        d.synchronize_event(e1).unwrap();
        assert!(d.event_done(e1).unwrap());
        d.synchronize_stream(s0).unwrap();
        // An event belongs to its context: the backend refuses before the driver would.
        assert!(matches!(
            d.record_event(e1, s0),
            Err(Error::InvalidArgument(_))
        ));
        d.destroy_event(e1).unwrap();
        d.destroy_stream(s0).unwrap();
        d.destroy_stream(s1).unwrap();
    }
    assert_eq!(f.stat("streams"), streams);
    assert_eq!(f.stat("events"), 0);
    backend_checks::assert_refused_by_the_backend(d, s0, e1);
}

#[test]
fn events_order_streams_across_devices() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = 256 << 10;
    let mut data: Vec<u8> = (0..len).map(|i| (i * 7 % 255) as u8).collect();
    let mut out = vec![0u8; len];
    let mid = d.alloc_device(1, len).unwrap();
    let stage = d.alloc_device(0, len).unwrap();
    let producer = d.create_stream(0).unwrap();
    let consumer = d.create_stream(1).unwrap();
    let e = d.create_event(0).unwrap();
    let idle = d.create_event(1).unwrap();
    // SAFETY: live, disjoint ranges that outlive the synchronisation; live handles.
    unsafe {
        // Device 1 memory filled from the host on device 0's stream is refused.
        assert!(matches!(
            d.copy(dev(1, mid), host(&mut data), len, Some(producer)),
            Err(Error::InvalidArgument(_))
        ));
        d.copy(dev(0, stage), host(&mut data), len, Some(producer))
            .unwrap();
        d.copy(dev(1, mid), dev(0, stage), len, Some(producer))
            .unwrap();
        d.record_event(e, producer).unwrap();
        // The consumer waits (on the device): nothing runs yet.
        d.stream_wait_event(consumer, e).unwrap();
        assert!(!d.event_done(e).unwrap() || f.stat("queued_ops") > 0);
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

#[test]
fn destroyed_handles_are_reused() {
    let (f, _g, b) = setup();
    backend_checks::destroyed_handles_are_reused(&b, &|name| f.stat(name));
}

/// Many threads create and destroy streams and events while the driver reuses handle
/// values: the backend's handle maps must never lose a live entry.
#[test]
fn handle_churn_across_threads() {
    let (f, _g, b) = setup();
    let reused = f.stat("reused_handles");
    let streams = f.stat("streams");
    backend_checks::churn_streams_and_events(&b, 4, 300);
    assert_eq!(f.stat("streams"), streams);
    assert_eq!(f.stat("events"), 0);
    assert!(f.stat("reused_handles") > reused);
}

// ---------------------------------------------------------------------- contexts

/// Every call made from a thread that has never touched CUDA binds the right context
/// first; the fake refuses any that does not (the control below shows it would).
#[test]
fn contexts_are_bound_on_fresh_threads() {
    let (f, _g, b) = setup();
    let refused = f.stat("no_context_errors");
    // Control: a raw allocation from a fresh thread has no context.
    std::thread::spawn(|| {
        let alloc: CuMemAllocFn = raw(c"cuMemAlloc_v2");
        let mut p = 0u64;
        // SAFETY: a valid out-pointer; the fake refuses before writing it.
        assert_eq!(unsafe { alloc(&mut p, 4096) }, code::INVALID_CONTEXT);
    })
    .join()
    .unwrap();
    assert_eq!(f.stat("no_context_errors"), refused + 1);

    let sets = f.stat("ctx_set_current");
    let d: &dyn Backend = &b;
    let e = d.create_event(1).unwrap();
    let s = d.create_stream(1).unwrap();
    let len = 8192;
    let p = d.alloc_device(1, len).unwrap();
    // Each thread does one kind of call as its very first driver call.
    let first_calls: Vec<Box<dyn Fn() + Send + Sync + '_>> = vec![
        Box::new(|| assert_eq!(d.mem_info(1).unwrap().total, DEVICE_MEM)),
        Box::new(|| {
            let q = d.alloc_device(0, 4096).unwrap();
            // SAFETY: just allocated, freed once.
            unsafe { d.free_device(0, q, 4096).unwrap() };
        }),
        Box::new(|| {
            let mut buf = vec![1u8; len];
            // SAFETY: live buffers; the synchronous copy completes before return.
            unsafe { d.copy(dev(1, p), host(&mut buf), len, None).unwrap() };
        }),
        Box::new(|| {
            let mut buf = vec![0u8; len];
            // SAFETY: live handles and ranges, synchronised before the buffer drops.
            unsafe {
                d.copy(host(&mut buf), dev(1, p), len, Some(s)).unwrap();
                d.record_event(e, s).unwrap();
                d.synchronize_event(e).unwrap();
            }
        }),
        Box::new(|| {
            // SAFETY: live handle.
            unsafe { d.synchronize_stream(s).unwrap() };
        }),
        Box::new(|| {
            // SAFETY: live handles.
            unsafe { d.stream_wait_event(s, e).unwrap() };
        }),
        Box::new(|| {
            let mut buf = vec![0u8; 4096];
            let ptr = NonNull::new(buf.as_mut_ptr()).unwrap();
            // SAFETY: the buffer outlives its registration.
            unsafe {
                d.register_host(ptr, 4096).unwrap();
                d.unregister_host(ptr, 4096).unwrap();
            }
        }),
        Box::new(|| {
            let x = d.create_stream(0).unwrap();
            // SAFETY: just created, destroyed once.
            unsafe { d.destroy_stream(x).unwrap() };
        }),
        Box::new(|| {
            let m = d.alloc_managed(1, 4096).unwrap();
            // SAFETY: just allocated, freed once.
            unsafe { d.free_managed(1, m, 4096).unwrap() };
        }),
    ];
    std::thread::scope(|scope| {
        for call in &first_calls {
            scope.spawn(call);
        }
    });
    assert_eq!(
        f.stat("no_context_errors"),
        refused + 1,
        "no call lacked a context"
    );
    assert!(
        f.stat("ctx_set_current") >= sets + 9,
        "each thread bound one"
    );
    // SAFETY: live handles and allocation, released once.
    unsafe {
        d.synchronize_stream(s).unwrap();
        d.destroy_stream(s).unwrap();
        d.destroy_event(e).unwrap();
        d.free_device(1, p, len).unwrap();
    }
    // The backend leaves the caller's binding as it found it: none stays none, ...
    std::thread::scope(|scope| {
        scope.spawn(|| {
            assert!(current_ctx().is_null());
            d.mem_info(1).unwrap();
            assert!(current_ctx().is_null(), "no context left behind");
        });
    });
    // ... another device's context is put back (the CUDA runtime takes its current
    // device from it: PyTorch on device 1 stays on device 1), ...
    let primary = bind_primary(1);
    let theirs = current_ctx();
    assert_eq!(theirs, primary.ctx);
    d.mem_info(0).unwrap();
    assert_eq!(current_ctx(), theirs, "the caller's context is restored");
    // ... and a caller already in the right context costs no switch at all.
    let before = f.stat("ctx_set_current");
    d.mem_info(1).unwrap();
    d.mem_info(1).unwrap();
    assert_eq!(f.stat("ctx_set_current"), before);
}

/// Dropping the last backend releases the primary contexts, which resets them: what
/// was left in them is freed by the driver.
#[test]
fn dropping_the_backend_releases_and_resets_the_contexts() {
    let (f, _g, b) = setup();
    let resets = f.stat("ctx_resets");
    let leaked = b.alloc_device(0, MIB).unwrap();
    let _ = leaked;
    let leaked_stream = b.create_stream(1).unwrap();
    let _ = leaked_stream;
    assert_eq!(f.stat("used:0"), MIB as i64);
    let refs = (f.stat("ctx_refcount:0"), f.stat("ctx_refcount:1"));
    drop(b);
    assert_eq!(
        (f.stat("ctx_refcount:0"), f.stat("ctx_refcount:1")),
        (refs.0 - 1, refs.1 - 1)
    );
    if refs == (1, 1) {
        assert_eq!(f.stat("ctx_resets"), resets + 2, "both devices' contexts");
        assert_eq!(f.stat("used:0"), 0, "reset frees the context's memory");
        assert_eq!(f.stat("streams"), 0);
        // Nothing was current on this thread before the drop, nor is after.
        assert!(current_ctx().is_null());
    }
    // A new backend starts clean.
    let b = CudaBackend::new().unwrap();
    assert_eq!(b.mem_info(0).unwrap().free, DEVICE_MEM);
}

/// One device refuses contexts (another process holds it in EXCLUSIVE_PROCESS mode):
/// the backend still opens and lists it, the other device works, and every call on the
/// refusing one returns the driver's code with the device named, trying again each
/// time. Run with device 1 refusing, then device 0 (host-side calls then use device 1).
#[test]
fn a_device_that_refuses_contexts_leaves_the_others_usable() {
    const TEST: &str = "a_device_that_refuses_contexts_leaves_the_others_usable";
    let Ok(bad) = std::env::var("FAKE_CUDA_RETAIN_FAIL_DEVICE") else {
        for bad in ["1", "0"] {
            run_alone(
                TEST,
                &[(CHILD_ENV, TEST), ("FAKE_CUDA_RETAIN_FAIL_DEVICE", bad)],
            );
        }
        return;
    };
    let bad: usize = bad.parse().unwrap();
    let good = 1 - bad;
    let f = fake();
    let b = CudaBackend::new().expect("one refusing device leaves the backend available");
    let d: &dyn Backend = &b;
    // Listed in full: none of this needs a context.
    assert_eq!(d.devices().len(), 2);
    let info = &d.devices()[bad];
    assert_eq!(info.name, format!("Fake NVIDIA H100 {bad}"));
    assert_eq!(info.total_memory, DEVICE_MEM);
    assert_eq!(
        info.pci_bus_id.as_deref(),
        Some(format!("0000:{:02x}:00.0", 0x1a + bad).as_str())
    );
    assert_eq!(f.stat("retained_contexts"), 0, "nothing opened by new");

    let refused = |err: Error| {
        let message = assert_driver(
            KIND,
            err,
            "cuDevicePrimaryCtxRetain",
            code::DEVICE_UNAVAILABLE,
        );
        assert!(
            message.contains(&format!("CUDA device {bad} (Fake NVIDIA H100 {bad})"))
                && message.contains("busy or unavailable"),
            "{message}"
        );
    };
    // Host-side work first: it opens the device that works.
    let mut buf = vec![0u8; 2 * MIB];
    let pinned = NonNull::new(buf.as_mut_ptr()).unwrap();
    // SAFETY: `buf` outlives its registration, undone below.
    unsafe { d.register_host(pinned, buf.len()).unwrap() };
    assert_eq!(f.stat(&format!("ctx_refcount:{good}")), 1);
    let data: Vec<u8> = (0..MIB).map(|i| (i * 3) as u8).collect();
    let p = d.alloc_device(good, MIB).unwrap();
    // SAFETY: live memory of MIB bytes each; synchronous copies; freed once.
    unsafe {
        d.copy(
            dev(good, p),
            MemRef::Host {
                ptr: NonNull::new(data.as_ptr() as *mut u8).unwrap(),
                kind: HostKind::Pageable,
            },
            MIB,
            None,
        )
        .unwrap();
        assert_eq!(peek(d, good, p, MIB), data);
    }
    assert_eq!(d.vmm_granularity(good), Some(PAGE));
    for attempt in 0..2 {
        let retains = f.stat("ctx_retains");
        refused(d.alloc_device(bad, MIB).unwrap_err());
        refused(d.mem_info(bad).unwrap_err());
        refused(d.create_stream(bad).unwrap_err());
        refused(d.reserve_address(bad, PAGE).unwrap_err());
        // SAFETY: `p` is live memory of `good`; the copy is refused before it is queued.
        refused(unsafe { d.copy(dev(bad, DevicePtr(p.0)), dev(good, p), 4096, None) }.unwrap_err());
        assert_eq!(d.vmm_granularity(bad), None, "attempt {attempt}");
        assert_eq!(f.stat("ctx_retains"), retains, "every attempt refused");
        assert_eq!(f.stat(&format!("ctx_refcount:{bad}")), 0);
    }
    // A Manager on the same machine: the working device's pool and buffers work.
    let mgr = cuda_manager();
    let pool = mgr.device_pool(good, PoolConfig::default()).unwrap();
    let s = mgr.create_stream(good).unwrap();
    let blk = pool.alloc(3 * MIB, &s).unwrap();
    blk.write(0, &data[..4]).unwrap();
    let mut out = [0u8; 4];
    blk.read(0, &mut out).unwrap();
    assert_eq!(out[..], data[..4]);
    assert!(matches!(
        mgr.alloc(Placement::Device(bad), MIB),
        Err(Error::Driver {
            code: code::DEVICE_UNAVAILABLE,
            ..
        })
    ));
    drop((blk, s, pool, mgr));
    // SAFETY: registered above; freed once; nothing queued uses them.
    unsafe {
        d.unregister_host(pinned, buf.len()).unwrap();
        d.free_device(good, p, MIB).unwrap();
    }
    drop(b);
    assert_eq!(f.stat("retained_contexts"), 0);
}

/// A process that uses one GPU of two (a `torchrun` rank: its thread has its GPU's
/// context current, as the CUDA runtime leaves it) makes no context on the other:
/// device memory, streams, the pool, pinned host memory and synchronous copies all stay
/// on its device (host-side calls take the current context's device, not device 0).
#[test]
fn only_the_devices_used_are_opened() {
    let f = fake();
    let _g = FakeCuda::serial();
    let before = (f.stat("ctx_refcount:0"), f.stat("ctx_refcount:1"));
    let rank = bind_primary(1); // torch.cuda.set_device(1), as the runtime does it
    let mgr = cuda_manager();
    assert_eq!(mgr.devices().len(), 2, "both listed");
    let mut pinned = mgr
        .alloc(Placement::Pinned(NumaPolicy::Default), 3 * MIB)
        .unwrap();
    mgr.write(&mut pinned, 0, &layer_bytes(1, 3 * MIB)).unwrap();
    let mut on_dev = mgr.alloc(Placement::Device(1), 3 * MIB).unwrap();
    let s = mgr.create_stream(1).unwrap();
    mgr.copy_async(&mut on_dev, 0, &pinned, 0, 3 * MIB, &s)
        .unwrap();
    let pool = mgr.device_pool(1, PoolConfig::default()).unwrap();
    let blk = pool.alloc(5 * MIB, &s).unwrap();
    blk.write(0, &[7; 64]).unwrap();
    let host_pool = mgr.host_pool(HostPoolConfig::default()).unwrap();
    drop(
        host_pool
            .alloc_pinned(&NumaPolicy::Default, 4 * MIB)
            .unwrap(),
    );
    s.synchronize().unwrap();
    assert_eq!(
        f.stat("ctx_refcount:0"),
        before.0,
        "device 0 never opened: no context made on it"
    );
    assert_eq!(
        f.stat("ctx_refcount:1"),
        before.1 + 2,
        "the rank's and the backend's"
    );
    assert_eq!(current_ctx(), rank.ctx, "still the rank's device");
    drop((blk, pool, host_pool, s, on_dev, pinned, mgr));
    assert_eq!(f.stat("ctx_refcount:1"), before.1 + 1);
    assert_eq!(current_ctx(), rank.ctx);
    drop(rank);
    assert_eq!(f.stat("registrations"), 0);
}

/// The caller's current context is left as it was, by every call and by dropping the
/// backend, also when it is one of the backend's own primary contexts (PyTorch's,
/// which it retains itself): unbinding it would move PyTorch off its device and fail
/// its next call.
#[test]
fn dropping_the_backend_leaves_the_callers_context_current() {
    let f = fake();
    let _g = FakeCuda::serial();
    let alloc: CuMemAllocFn = raw(c"cuMemAlloc_v2");
    let free: CuMemFreeFn = raw(c"cuMemFree_v2");
    for theirs in [0, 1] {
        let primary = bind_primary(theirs);
        let b = CudaBackend::new().unwrap();
        let d: &dyn Backend = &b;
        let mut buf = vec![1u8; 2 * MIB];
        let hp = NonNull::new(buf.as_mut_ptr()).unwrap();
        // SAFETY: live buffers and handles, synchronous copies, each freed once.
        unsafe {
            for device in [0, 1] {
                let p = d.alloc_device(device, 2 * MIB).unwrap();
                d.copy(dev(device, p), host(&mut buf), 2 * MIB, None)
                    .unwrap();
                let s = d.create_stream(device).unwrap();
                d.copy(host(&mut buf), dev(device, p), 2 * MIB, Some(s))
                    .unwrap();
                d.synchronize_stream(s).unwrap();
                d.destroy_stream(s).unwrap();
                d.free_device(device, p, 2 * MIB).unwrap();
                assert_eq!(current_ctx(), primary.ctx, "after calls on device {device}");
            }
            d.register_host(hp, 2 * MIB).unwrap();
            d.unregister_host(hp, 2 * MIB).unwrap();
        }
        assert_eq!(current_ctx(), primary.ctx);
        drop(b);
        assert_eq!(
            current_ctx(),
            primary.ctx,
            "device {theirs}'s context is still current after the drop"
        );
        // And alive: the caller's own reference kept it.
        let mut p = 0u64;
        // SAFETY: a valid out-pointer; the allocation is freed at once.
        unsafe {
            assert_eq!(alloc(&mut p, 4096), 0, "the caller's context works");
            assert_eq!(free(p), 0);
        }
        assert_eq!(
            f.stat(&format!("ctx_refcount:{theirs}")),
            1,
            "only the caller's"
        );
        drop(primary);
    }
}

// ------------------------------------------------------------------ driver errors

#[test]
fn driver_errors_name_the_call_and_message() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    d.mem_info(0).unwrap(); // opens device 0: the failure below is the stream's
    let streams = f.stat("streams");
    f.fail_next("cuStreamCreate", code::UNKNOWN, 1);
    let err = d.create_stream(0).unwrap_err();
    let message = assert_driver(KIND, err, "cuStreamCreate", 999);
    assert_eq!(message, "unknown error");
    assert_eq!(f.stat("streams"), streams);
    // A failed event query is an error, not "not done", whether the bindings' enum knows
    // its code or not (12345: a newer driver's).
    let e = d.create_event(0).unwrap();
    // SAFETY: a live event from this backend, destroyed once.
    unsafe {
        for code in [code::INVALID_HANDLE, 12345] {
            f.fail_next("cuEventQuery", code, 1);
            assert_driver(KIND, d.event_done(e).unwrap_err(), "cuEventQuery", code);
        }
        f.fail_next("cuEventQuery", code::NOT_READY, 1);
        assert!(
            !d.event_done(e).unwrap(),
            "CUDA_ERROR_NOT_READY means not done"
        );
        assert!(d.event_done(e).unwrap());
        d.destroy_event(e).unwrap();
    }
    // A destroy that fails in the driver keeps the handle usable.
    let s = d.create_stream(0).unwrap();
    f.fail_next("cuStreamDestroy_v2", code::UNKNOWN, 1);
    // SAFETY: a live stream, destroyed once successfully.
    unsafe {
        assert_driver(
            KIND,
            d.destroy_stream(s).unwrap_err(),
            "cuStreamDestroy",
            999,
        );
        d.destroy_stream(s).unwrap();
    }
    // Codes the bindings' enum does not know are errors with their number, wherever they
    // come back, and a message that names it.
    f.fail_next("cuMemGetInfo_v2", 12345, 1);
    let message = assert_driver(KIND, d.mem_info(0).unwrap_err(), "cuMemGetInfo", 12345);
    assert!(message.contains("12345"), "{message}");
    f.fail_next("cuMemAlloc_v2", 12345, 1);
    assert_driver(
        KIND,
        d.alloc_device(0, 4096).unwrap_err(),
        "cuMemAlloc",
        12345,
    );
    // The context binding itself can fail (on a fresh thread), and says so.
    let err = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                f.fail_next("cuCtxSetCurrent", code::INVALID_CONTEXT, 1);
                d.mem_info(1).unwrap_err()
            })
            .join()
            .unwrap()
    });
    assert_driver(KIND, err, "cuCtxSetCurrent", code::INVALID_CONTEXT);
}

// ------------------------------------------------------------------ registration

#[test]
fn host_registration() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    // The flag is CU_MEMHOSTREGISTER_PORTABLE.
    backend_checks::register_and_unregister_host(
        d,
        &|name| f.stat(name),
        ("cuMemHostRegister", code::HOST_MEMORY_ALREADY_REGISTERED),
        ("cuMemHostUnregister", code::HOST_MEMORY_NOT_REGISTERED),
    );
    // Device memory is not host memory to pin.
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
            Err(Error::OutOfMemory { tier: Tier::Pinned, requested, .. }) if requested == len
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
            tier, requested, ..
        }) => assert_eq!((tier, requested), (Tier::Pinned, 3 * MIB)),
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

// --------------------------------------------------------------- managed memory

#[test]
fn managed_memory_prefetch_and_advice() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = 2 * MIB;
    let m = d.alloc_managed(1, len).unwrap();
    assert_eq!(f.stat("managed_allocations"), 1);
    assert_eq!(f.stat("used:1"), len as i64);
    let s = d.create_stream(0).unwrap();
    // SAFETY: `m` is live managed memory of `len` bytes from this backend; `s` is live.
    unsafe {
        std::ptr::write_bytes(m.as_ptr(), 7, len);
        d.prefetch(m, len, Location::Device(1), s).unwrap();
        assert_eq!(
            (f.stat("last_prefetch_type"), f.stat("last_prefetch_id")),
            (1, 1),
            "CU_MEM_LOCATION_TYPE_DEVICE, device 1"
        );
        d.prefetch(m, len, Location::Host, s).unwrap();
        assert_eq!(f.stat("last_prefetch_type"), 2, "CU_MEM_LOCATION_TYPE_HOST");
        assert!(matches!(
            d.prefetch(m, len, Location::Device(2), s),
            Err(Error::UnknownDevice { device: 2, .. })
        ));
        // Part of the range, at an offset: fine; past its end: refused by the driver.
        let mid = NonNull::new(m.as_ptr().add(4096)).unwrap();
        d.prefetch(mid, 4096, Location::Device(0), s).unwrap();
        assert_driver(
            KIND,
            d.prefetch(mid, len, Location::Host, s).unwrap_err(),
            "cuMemPrefetchAsync",
            code::INVALID_VALUE,
        );

        let cases = [
            (Advice::SetReadMostly, 1, None),
            (Advice::UnsetReadMostly, 2, None),
            (
                Advice::SetPreferredLocation(Location::Host),
                3,
                Some((2, None)),
            ),
            (
                Advice::SetPreferredLocation(Location::Device(1)),
                3,
                Some((1, Some(1))),
            ),
            (Advice::UnsetPreferredLocation, 4, None),
            (Advice::SetAccessedBy(1), 5, Some((1, Some(1)))),
            (Advice::UnsetAccessedBy(0), 6, Some((1, Some(0)))),
        ];
        let advises = f.stat("advises");
        for (advice, value, location) in cases {
            d.advise(m, len, advice).unwrap();
            assert_eq!(f.stat("last_advice"), value, "{advice:?}");
            if let Some((ty, id)) = location {
                assert_eq!(f.stat("last_advice_type"), ty, "{advice:?}");
                if let Some(id) = id {
                    assert_eq!(f.stat("last_advice_id"), id, "{advice:?}");
                }
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
        assert_driver(
            KIND,
            d.advise(plain_ptr, MIB, Advice::SetReadMostly).unwrap_err(),
            "cuMemAdvise",
            code::INVALID_VALUE,
        );
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

#[test]
fn managed_memory_unsupported() {
    if !child("managed_memory_unsupported", &[("FAKE_CUDA_MANAGED", "0")]) {
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

// --------------------------------------------------------------- foreign streams

#[test]
fn foreign_streams_are_used_and_never_destroyed() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let streams = f.stat("streams");
    let create: CuStreamCreateFn = raw(c"cuStreamCreate");
    let destroy: CuStreamFn = raw(c"cuStreamDestroy_v2");
    let len = 4096;
    let p0 = d.alloc_device(0, len).unwrap();
    let p1 = d.alloc_device(1, len).unwrap();
    let mut data = vec![5u8; len];
    let mut out = vec![0u8; len];
    let _ctx = bind_primary(0); // the caller's own stream is made in device 0's context
    let mut raw_stream = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; device 0's context is current on this thread.
    let made = unsafe { create(&mut raw_stream, 0) };
    assert_eq!(made, 0, "a blocking stream");
    let raw_value = raw_stream as u64;
    // SAFETY: a live stream of device 0 from the same driver, forgotten before it is
    // destroyed; copies are synchronised before the buffers drop.
    unsafe {
        let s = d.import_stream(0, raw_value).unwrap();
        assert_eq!(s.0, raw_value);
        d.copy(dev(0, p0), host(&mut data), len, Some(s)).unwrap();
        d.copy(host(&mut out), dev(0, p0), len, Some(s)).unwrap();
        assert!(out.iter().all(|&x| x == 0), "queued on the caller's stream");
        d.synchronize_stream(s).unwrap();
        assert_eq!(out, data);
        // Claimed for device 1 although the driver made it in device 0's context: the
        // backend cannot tell, the driver refuses an event of device 1 on it.
        let e1 = d.create_event(1).unwrap();
        assert!(
            d.import_stream(1, raw_value).is_err(),
            "one stream, one device"
        );
        d.forget_stream(s).unwrap();
        let wrong = d.import_stream(1, raw_value).unwrap();
        assert_driver(
            KIND,
            d.record_event(e1, wrong).unwrap_err(),
            "cuEventRecord",
            code::INVALID_HANDLE,
        );
        d.forget_stream(wrong).unwrap();

        // The legacy default stream of device 1: a queue like any stream's.
        let legacy = d.import_stream(1, 0).unwrap();
        out.fill(0);
        d.copy(dev(1, p1), host(&mut data), len, Some(legacy))
            .unwrap();
        d.copy(host(&mut out), dev(1, p1), len, Some(legacy))
            .unwrap();
        assert!(out.iter().all(|&x| x == 0), "queued on the legacy stream");
        d.synchronize_stream(legacy).unwrap();
        assert_eq!(out, data, "run in order");
        d.record_event(e1, legacy).unwrap();
        d.synchronize_event(e1).unwrap();
        d.synchronize_stream(legacy).unwrap();
        d.forget_stream(legacy).unwrap();
        d.destroy_event(e1).unwrap();
        assert_eq!(
            f.stat("streams"),
            streams + 1,
            "the caller's stream is still alive"
        );
        assert_eq!(destroy(raw_stream), 0);
        d.free_device(0, p0, len).unwrap();
        d.free_device(1, p1, len).unwrap();
    }
}

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
            tier: Tier::Device(0),
            requested,
            ..
        }) if requested == too_big
    ));
}

/// A copy still queued when its VMM page is unmapped faults on the "device": the
/// context's sticky error comes back from the synchronisation and every later call.
#[test]
fn vmm_unmap_under_a_queued_copy_faults() {
    if !child("vmm_unmap_under_a_queued_copy_faults", &[]) {
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
    if !child("a_copy_by_a_device_without_access_faults", &[]) {
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
        "set_access_refuses_a_device_without_peer_access",
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
    if !child("vmm_unsupported_device", &[("FAKE_CUDA_VMM", "0")]) {
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

// ------------------------------------------------------------ manager, pool, tier

fn layer_bytes(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j * 7 + j / 251) as u8).collect()
}

#[test]
fn manager_buffers_pool_and_tier_store_on_cuda() {
    let f = fake();
    let _g = FakeCuda::serial();
    let mgr = cuda_manager();
    assert_eq!(mgr.backend_kind(), BackendKind::Cuda);
    assert_eq!(mgr.devices().len(), 2);

    // Buffers: pinned host -> device -> host, asynchronously, dropped while in flight.
    let n = 3 * MIB;
    let mut pinned = mgr
        .alloc(Placement::Pinned(NumaPolicy::Default), n)
        .unwrap();
    let data = layer_bytes(99, n);
    mgr.write(&mut pinned, 0, &data).unwrap();
    let mut on_dev = mgr.alloc(Placement::Device(1), n).unwrap();
    let s1 = mgr.create_stream(1).unwrap();
    mgr.copy_async(&mut on_dev, 0, &pinned, 0, n, &s1).unwrap();
    let mut back = mgr.alloc(Placement::Host(NumaPolicy::Default), n).unwrap();
    mgr.copy_async(&mut back, 0, &on_dev, 0, n, &s1).unwrap();
    drop(on_dev); // waits for both copies before cuMemFree
    assert_eq!(back.as_slice().unwrap(), &data[..]);
    drop(pinned);
    assert_eq!(f.stat("registrations"), 0);
    let mut m = mgr.alloc(Placement::Managed { device: 0 }, MIB).unwrap();
    m.as_mut_slice().unwrap().fill(3);
    mgr.prefetch(&m, Location::Device(0), &s1).unwrap();
    mgr.advise(&m, Advice::SetPreferredLocation(Location::Device(0)))
        .unwrap();
    drop(m);

    // The device pool with expandable segments: pages mapped under live blocks only.
    let pool = mgr
        .device_pool(
            0,
            PoolConfig {
                budget: Budget::Bytes(64 * MIB),
                ..PoolConfig::default()
            },
        )
        .unwrap();
    assert!(pool.expandable(), "VMM on the fake: expandable segments");
    let s0 = mgr.create_stream(0).unwrap();
    let blocks: Vec<_> = [700, 3 * MIB + 5, 512, 9 * MIB]
        .iter()
        .map(|&size| pool.alloc(size, &s0).unwrap())
        .collect();
    assert!(f.stat("vmm_mapped_bytes") >= (12 * MIB) as i64);
    assert_eq!(f.stat("vmm_mapped_bytes"), f.stat("vmm_accessible_bytes"));
    for (i, blk) in blocks.iter().enumerate() {
        let bytes = layer_bytes(i, blk.len());
        blk.write(0, &bytes).unwrap();
        let mut out = vec![0u8; blk.len()];
        blk.read(0, &mut out).unwrap();
        assert_eq!(out, bytes, "block {i}");
    }
    // Through a stream, into and out of a block.
    let src = {
        let mut b = mgr
            .alloc(Placement::Pinned(NumaPolicy::Default), MIB)
            .unwrap();
        mgr.write(&mut b, 0, &layer_bytes(7, MIB)).unwrap();
        b
    };
    let mut dst = mgr
        .alloc(Placement::Host(NumaPolicy::Default), MIB)
        .unwrap();
    mgr.copy_to_block(&blocks[3], 4096, &src, 0, MIB, &s0)
        .unwrap();
    mgr.copy_from_block(&mut dst, 0, &blocks[3], 4096, MIB, &s0)
        .unwrap();
    s0.synchronize().unwrap();
    assert_eq!(dst.as_slice().unwrap(), &layer_bytes(7, MIB)[..]);
    let stats = pool.stats();
    assert_eq!(stats.allocation.all.current, 4);
    drop(blocks);
    pool.trim().unwrap();
    assert_eq!(pool.reserved(), 0);
    assert_eq!(f.stat("vmm_mapped_bytes"), 0, "trim unmapped every page");
    assert_eq!(f.stat("vmm_physical_bytes"), 0, "and released them");
    drop(pool);
    assert_eq!(f.stat("vmm_reservations"), 0);

    // The tier store: 6 layers of 1 MiB through a 3-layer device budget, checksums on.
    const LAYERS: usize = 6;
    let mut cfg = TierConfig::new(3 * MIB, 16 * MIB + LAYERS * MIB);
    cfg.checksums = true;
    cfg.sequence = SequenceHint::Given((0..LAYERS as u32).collect());
    let store = TierStore::new(&mgr, cfg).unwrap();
    for i in 0..LAYERS {
        store
            .register(&format!("layer.{i}"), layer_bytes(i, MIB).into())
            .unwrap();
    }
    let compute = mgr.create_stream(0).unwrap();
    for pass in 0..3 {
        for i in 0..LAYERS as u32 {
            let g = store.acquire(i, &compute).unwrap();
            let mut out = vec![0u8; MIB];
            compute.synchronize().unwrap();
            g.block().unwrap().read(0, &mut out).unwrap();
            assert_eq!(out, layer_bytes(i as usize, MIB), "pass {pass} layer {i}");
        }
    }
    let st = store.stats();
    assert_eq!(st.checksum_mismatches, 0);
    assert!(st.loads >= LAYERS as u64, "{st:?}");
    assert!(st.bytes_loaded >= (LAYERS * MIB) as u64);
    drop(store);
    drop(compute);
    drop(s0);
    drop(s1);
    drop((src, dst, back));
    drop(mgr);
    assert_eq!(f.stat("allocations"), 0);
    assert_eq!(f.stat("managed_allocations"), 0);
    assert_eq!(f.stat("registrations"), 0);
    assert_eq!(f.stat("queued_ops"), 0);
    assert_eq!(f.stat("vmm_reservations"), 0);
    assert_eq!(f.stat("faults"), 0, "no copy ran on unmapped memory");
    assert_eq!(f.stat("zombie_streams"), 0);
}

// ------------------------------------------------------------------ the fake itself

/// The fake's definitions against CUDA's own cuda.h (check mode): every signature,
/// constant and struct layout. Needs a CUDA 12.x include directory.
#[test]
#[ignore = "needs CUDA 12.x cuda.h: FAKE_CUDA_INCLUDE=<dir with cuda.h> cargo test --test cuda_fake -- --ignored"]
fn fake_matches_cuda_h() {
    let dir =
        std::env::var("FAKE_CUDA_INCLUDE").unwrap_or_else(|_| "/usr/local/cuda/include".to_owned());
    assert!(
        std::path::Path::new(&dir).join("cuda.h").is_file(),
        "no cuda.h in {dir}"
    );
    let out = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args([
            "-DFAKE_CUDA_REAL_HEADERS",
            "-fsyntax-only",
            "-Wall",
            "-Werror",
        ])
        .arg(format!("-I{dir}"))
        .arg(fake_cuda::fake_cuda_source())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Strictness the backend never provokes, checked on the fake directly.
#[test]
fn fake_is_strict() {
    let (f, _g, _backend) = setup();
    let set: CuCtxSetFn = raw(c"cuCtxSetCurrent");
    let alloc: CuMemAllocFn = raw(c"cuMemAlloc_v2");
    let free: CuMemFreeFn = raw(c"cuMemFree_v2");
    let _ctx = bind_primary(0);
    let mut p = 0u64;
    // SAFETY: valid out-pointers and values; the fake validates before it acts.
    unsafe {
        assert_eq!(alloc(&mut p, 0), code::INVALID_VALUE, "size 0");
        assert_eq!(alloc(&mut p, 4096), 0);
        assert_eq!(
            free(p + 1),
            code::INVALID_VALUE,
            "not an allocation's start"
        );
        assert_eq!(free(p), 0);
        let mut bogus = 0u8;
        assert_eq!(
            set((&mut bogus as *mut u8).cast()),
            code::INVALID_CONTEXT,
            "not a context"
        );
    }
    // Overlapping ends; managed memory with an attach flag other than GLOBAL / HOST.
    let copy_raw: CuMemcpyFn = raw(c"cuMemcpyAsync");
    let managed: CuMemAllocManagedFn = raw(c"cuMemAllocManaged");
    // SAFETY: valid out-pointers; the overlapping copy is refused before it runs.
    unsafe {
        assert_eq!(alloc(&mut p, 8192), 0);
        assert_eq!(
            copy_raw(p + 100, p, 4096, std::ptr::null_mut()),
            code::INVALID_VALUE,
            "source and destination overlap"
        );
        assert_eq!(free(p), 0);
        assert_eq!(
            managed(&mut p, 4096, 4),
            code::INVALID_VALUE,
            "CU_MEM_ATTACH_SINGLE"
        );
        assert_eq!(managed(&mut p, 0, 1), code::INVALID_VALUE, "size 0");
    }
    // A host range that runs out of one registration into the next, or from pageable
    // memory into a registration, is refused (byte ranges, one region per registration).
    let copy: CuMemcpyFn = raw(c"cuMemcpyAsync");
    let register: CuRegisterFn = raw(c"cuMemHostRegister_v2");
    let unregister: CuUnregisterFn = raw(c"cuMemHostUnregister");
    let mut host_buf = vec![0u8; 3 * 4096];
    let mut other = vec![0u8; 2 * 4096];
    let h = host_buf.as_mut_ptr() as u64;
    let o = other.as_mut_ptr() as u64;
    let legacy = std::ptr::null_mut();
    // SAFETY: both buffers outlive their registrations; the copies are on the legacy
    // stream (at once, inside the buffers) or refused before anything is touched.
    unsafe {
        // Bytes 0..4096 pageable, then two registrations of 4096 bytes.
        assert_eq!(register((h + 4096) as *mut c_void, 4096, 1), 0);
        assert_eq!(register((h + 8192) as *mut c_void, 4096, 1), 0);
        assert_eq!(copy(o, h + 4096, 4096, legacy), 0, "inside one");
        assert_eq!(copy(o, h, 4096, legacy), 0, "pageable only");
        assert_eq!(
            copy(o, h + 6144, 4096, legacy),
            code::INVALID_VALUE,
            "across two registrations"
        );
        assert_eq!(
            copy(o, h + 2048, 4096, legacy),
            code::INVALID_VALUE,
            "from pageable memory into a registration"
        );
        assert_eq!(unregister((h + 4096) as *mut c_void), 0);
        assert_eq!(unregister((h + 8192) as *mut c_void), 0);
    }
    assert_eq!(f.stat("allocations"), 0);
}

/// A stream made per request and dropped after it: each request's block is handed to
/// the next request's stream (after an event), so the old stream owns nothing; the pool
/// lets go of such streams instead of keeping every one alive (and its driver stream
/// with it) until a trim.
#[test]
fn the_pool_lets_go_of_streams_it_no_longer_needs() {
    let (f, _g, _b) = setup();
    let mgr = cuda_manager();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let base = f.stat("streams");
    for _ in 0..100 {
        let s = mgr.create_stream(0).unwrap();
        drop(pool.alloc(4 * MIB, &s).unwrap());
    }
    assert!(
        f.stat("streams") <= base + 40,
        "{} driver streams alive after 100 per-request streams (base {base})",
        f.stat("streams")
    );
}

/// A copy cut at registration edges whose second piece the driver refuses has queued
/// its first: the copy is still fenced (a staging slot is not refilled under it), and a
/// synchronous one still waits for it before returning the error.
#[test]
fn a_copy_refused_partway_is_still_fenced() {
    let (f, _g, b) = setup();
    let mgr = cuda_manager();
    // 4 MiB slots registered in two 2 MiB pieces: a slot's copy is two cuMemcpyAsync.
    let cfg = HostPoolConfig {
        threads: 2,
        parallel_threshold: 4 * MIB,
        min_register_chunk: 2 * MIB,
        ..HostPoolConfig::default()
    };
    let host = mgr.host_pool(cfg).unwrap();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let stream = mgr.create_stream(0).unwrap();
    let mut ring =
        hetmem::pool::StagingRing::new(&host, &NumaPolicy::Default, 2, 4 * MIB, 1).unwrap();
    let dst: Vec<_> = (0..3)
        .map(|_| pool.alloc(4 * MIB, &stream).unwrap())
        .collect();
    f.fail_after("cuMemcpyAsync", code::UNKNOWN, 1, 1);
    let err = ring.upload(&vec![0xAA; 4 * MIB], &dst[0], 0, &stream);
    assert!(err.is_err(), "the second piece was refused");
    ring.upload(&vec![0xBB; 4 * MIB], &dst[1], 0, &stream)
        .unwrap(); // slot 1
    ring.upload(&vec![0xCC; 4 * MIB], &dst[2], 0, &stream)
        .unwrap(); // slot 0 again: only once A's first piece is done
    stream.synchronize().unwrap();
    let mut first = [0u8; 16];
    dst[0].read(0, &mut first).unwrap();
    assert_eq!(
        first, [0xAA; 16],
        "slot 0 was refilled under A's queued piece"
    );

    // Synchronous: the error comes back only after the queued piece is done.
    let d: &dyn Backend = &b;
    let mut buf = vec![7u8; 2 * MIB];
    let base = buf.as_mut_ptr();
    // SAFETY: `buf` outlives its two registrations (undone below).
    unsafe {
        d.register_host(NonNull::new(base).unwrap(), MIB).unwrap();
        d.register_host(NonNull::new(base.add(MIB)).unwrap(), MIB)
            .unwrap();
        let dp = d.alloc_device(0, 2 * MIB).unwrap();
        let src = MemRef::Host {
            ptr: NonNull::new(base).unwrap(),
            kind: HostKind::Pinned,
        };
        f.fail_after("cuMemcpyAsync", code::UNKNOWN, 1, 1);
        assert!(d.copy(dev(0, dp), src, 2 * MIB, None).is_err());
        assert_eq!(f.stat("queued_ops"), 0, "nothing of it left queued");
        d.free_device(0, dp, 2 * MIB).unwrap();
        d.unregister_host(NonNull::new(base).unwrap(), MIB).unwrap();
        d.unregister_host(NonNull::new(base.add(MIB)).unwrap(), MIB)
            .unwrap();
    }
    drop(buf);
}

/// A moved page that cuMemMap refuses goes back to the others and then to the driver,
/// counted: after a trim the pool's driver allocations and frees balance, as the
/// driver's own count of pages does.
#[test]
fn a_refused_move_is_counted_as_a_free() {
    let (f, _g, _b) = setup();
    let mgr = cuda_manager();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    assert!(pool.expandable());
    let s = mgr.create_stream(0).unwrap();
    let x1 = pool.alloc(4 * MIB, &s).unwrap();
    let x2 = pool.alloc(4 * MIB, &s).unwrap();
    drop(x1);
    // Growing by three pages moves one of x1's; the driver refuses that map once.
    f.fail_next("cuMemMap", code::OUT_OF_MEMORY, 1);
    let y = pool.alloc(6 * MIB, &s).unwrap();
    drop((x2, y));
    pool.trim().unwrap();
    assert_eq!(pool.reserved(), 0);
    assert_eq!(f.stat("vmm_handles"), 0, "the driver has every page back");
    let st = pool.stats();
    assert_eq!(st.num_device_alloc, st.num_device_free, "{st:?}");
}

// ------------------------------------------------------------------- graph capture

type CuBeginCaptureFn = unsafe extern "C" fn(*mut c_void, c_int) -> c_int;
type CuEndCaptureFn = unsafe extern "C" fn(*mut c_void, *mut *mut c_void) -> c_int;
type CuIsCapturingFn = unsafe extern "C" fn(*mut c_void, *mut c_int) -> c_int;
type CuEventCreateFn = unsafe extern "C" fn(*mut *mut c_void, u32) -> c_int;
type CuEventRecordFn = unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int;
type CuWaitEventFn = unsafe extern "C" fn(*mut c_void, *mut c_void, u32) -> c_int;
type CuCtxSyncFn = unsafe extern "C" fn() -> c_int;

const GLOBAL: c_int = 0;
const RELAXED: c_int = 2;

/// The fake's capture entry points, called directly (as PyTorch's runtime does).
struct Capture {
    begin: CuBeginCaptureFn,
    end: CuEndCaptureFn,
    status: CuIsCapturingFn,
    destroy_graph: CuStreamFn,
}

impl Capture {
    fn new() -> Capture {
        Capture {
            begin: raw(c"cuStreamBeginCapture_v2"),
            end: raw(c"cuStreamEndCapture"),
            status: raw(c"cuStreamIsCapturing"),
            destroy_graph: raw(c"cuGraphDestroy"),
        }
    }

    fn begin(&self, s: *mut c_void, mode: c_int) -> c_int {
        // SAFETY: `s` is a live stream of the current context (or a special value).
        unsafe { (self.begin)(s, mode) }
    }

    /// Ends the capture; on success destroys the graph it made.
    fn end(&self, s: *mut c_void) -> c_int {
        let mut g = std::ptr::null_mut();
        // SAFETY: `s` is a live stream; `g` a valid out-pointer.
        let rc = unsafe { (self.end)(s, &mut g) };
        assert_eq!(
            rc == 0,
            !g.is_null(),
            "a graph exactly when the capture succeeded"
        );
        if !g.is_null() {
            // SAFETY: a live graph, destroyed once.
            assert_eq!(unsafe { (self.destroy_graph)(g) }, 0);
            // SAFETY: as above; destroyed already.
            assert_eq!(unsafe { (self.destroy_graph)(g) }, code::INVALID_VALUE);
        }
        rc
    }

    fn status(&self, s: *mut c_void) -> c_int {
        let mut st = -1;
        // SAFETY: `s` is a live stream; `st` a valid out-pointer.
        assert_eq!(unsafe { (self.status)(s, &mut st) }, 0);
        st
    }
}

fn stream_ptr(s: &hetmem::Stream) -> *mut c_void {
    std::ptr::with_exposed_provenance_mut(s.handle().0 as usize)
}

/// The fake refuses, with the driver's codes, what the programming guide forbids
/// during a capture, and each refusal invalidates the capture; a stream waiting for a
/// captured event joins the capture; unsafe calls fail only in global mode.
#[test]
fn the_fake_refuses_what_a_capture_forbids() {
    let (f, _g, _b) = setup();
    let _ctx = bind_primary(0);
    let cap = Capture::new();
    let create: CuStreamCreateFn = raw(c"cuStreamCreate");
    let destroy: CuStreamFn = raw(c"cuStreamDestroy_v2");
    let sync: CuStreamFn = raw(c"cuStreamSynchronize");
    let ev_create: CuEventCreateFn = raw(c"cuEventCreate");
    let ev_destroy: CuStreamFn = raw(c"cuEventDestroy_v2");
    let record: CuEventRecordFn = raw(c"cuEventRecord");
    let query: CuStreamFn = raw(c"cuEventQuery");
    let ev_sync: CuStreamFn = raw(c"cuEventSynchronize");
    let wait: CuWaitEventFn = raw(c"cuStreamWaitEvent");
    let ctx_sync: CuCtxSyncFn = raw(c"cuCtxSynchronize");
    let alloc: CuMemAllocFn = raw(c"cuMemAlloc_v2");
    let free: CuMemFreeFn = raw(c"cuMemFree_v2");
    let memcpy: CuMemcpyFn = raw(c"cuMemcpyAsync");
    let (mut s, mut t, mut e, mut e2) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    let (mut x, mut y) = (0u64, 0u64);
    let violations = f.stat("capture_violations");
    let joins = f.stat("capture_joins");
    // SAFETY: every handle is made here in the current context and destroyed at the
    // end; the out-pointers are valid; the device buffers are 1 MiB each.
    unsafe {
        assert_eq!(create(&mut s, 1), 0);
        assert_eq!(create(&mut t, 1), 0);
        assert_eq!(ev_create(&mut e, 2), 0);
        assert_eq!(ev_create(&mut e2, 2), 0);
        assert_eq!(alloc(&mut x, MIB), 0);
        assert_eq!(alloc(&mut y, MIB), 0);

        // A captured event may not be queried: 907, and the capture is invalidated.
        assert_eq!(
            cap.begin(std::ptr::null_mut(), GLOBAL),
            code::STREAM_CAPTURE_UNSUPPORTED
        );
        assert_eq!(cap.begin(s, GLOBAL), 0);
        assert_eq!(cap.begin(s, GLOBAL), code::ILLEGAL_STATE);
        assert_eq!((cap.status(s), cap.status(t)), (1, 0));
        assert_eq!(record(e, s), 0);
        assert_eq!(query(e), code::CAPTURED_EVENT);
        assert_eq!(cap.status(s), 2, "invalidated");
        assert_eq!(cap.end(s), code::STREAM_CAPTURE_INVALIDATED);
        assert_eq!(cap.status(s), 0);
        assert_eq!(
            ev_sync(e),
            code::CAPTURED_EVENT,
            "still last recorded in a capture"
        );
        assert_eq!(record(e, t), 0);
        assert_eq!(query(e), 0, "recorded again outside");

        // Synchronising a capturing stream, or the context: 900.
        assert_eq!(cap.begin(s, GLOBAL), 0);
        assert_eq!(sync(s), code::STREAM_CAPTURE_UNSUPPORTED);
        assert_eq!(cap.end(s), code::STREAM_CAPTURE_INVALIDATED);
        assert_eq!(cap.begin(s, RELAXED), 0);
        assert_eq!(ctx_sync(), code::STREAM_CAPTURE_UNSUPPORTED);
        assert_eq!(cap.end(s), code::STREAM_CAPTURE_INVALIDATED);

        // Waiting for an event recorded outside: 905, unless external.
        assert_eq!(record(e2, t), 0);
        assert_eq!(cap.begin(s, GLOBAL), 0);
        assert_eq!(wait(s, e2, 0), code::STREAM_CAPTURE_ISOLATION);
        assert_eq!(cap.end(s), code::STREAM_CAPTURE_INVALIDATED);
        assert_eq!(cap.begin(s, GLOBAL), 0);
        assert_eq!(wait(s, e2, 1), 0, "CU_EVENT_WAIT_EXTERNAL");
        assert_eq!(cap.end(s), 0);
        assert_eq!(
            wait(s, e2, 1),
            code::INVALID_VALUE,
            "external outside a capture"
        );

        // A stream waiting for a captured event joins the capture; its work must be
        // joined back before the end.
        let queued = f.stat("queued_ops");
        assert_eq!(cap.begin(s, GLOBAL), 0);
        assert_eq!(record(e, s), 0);
        assert_eq!(wait(t, e, 0), 0);
        assert_eq!(cap.status(t), 1, "t joined the capture");
        assert_eq!(memcpy(y, x, MIB, t), 0);
        assert_eq!(f.stat("queued_ops"), queued, "captured, not queued");
        assert_eq!(cap.end(s), code::STREAM_CAPTURE_UNJOINED);
        assert_eq!(cap.status(t), 0);
        assert_eq!(cap.begin(s, GLOBAL), 0);
        assert_eq!(record(e, s), 0);
        assert_eq!(wait(t, e, 0), 0);
        assert_eq!(memcpy(y, x, MIB, t), 0);
        assert_eq!(record(e2, t), 0);
        assert_eq!(wait(s, e2, 0), 0, "joined back");
        assert_eq!(cap.end(s), 0);
        assert_eq!(f.stat("capture_joins"), joins + 2);

        // Calls that synchronise the device: refused in global mode, not in relaxed.
        assert_eq!(cap.begin(s, GLOBAL), 0);
        assert_eq!(free(y), code::STREAM_CAPTURE_UNSUPPORTED);
        assert_eq!(cap.end(s), code::STREAM_CAPTURE_INVALIDATED);
        assert_eq!(cap.begin(s, RELAXED), 0);
        assert_eq!(free(y), 0);
        assert_eq!(cap.end(s), 0);

        assert_eq!(f.stat("captures"), 0);
        assert_eq!(f.stat("graphs"), 0);
        assert_eq!(f.stat("capture_violations"), violations + 6);
        assert_eq!(free(x), 0);
        for ev in [e, e2] {
            assert_eq!(ev_destroy(ev), 0);
        }
        for st in [s, t] {
            assert_eq!(destroy(st), 0);
        }
    }
}

/// The device pool over the CUDA backend, allocating and freeing inside a capture in
/// global mode (with a private pool, and with the pool not told): no call the fake
/// refuses, no stream joined, the capture ends with a graph; the graph's block is not
/// handed out outside its pool until released.
#[test]
fn a_pool_cycle_in_a_capture_makes_no_illegal_call() {
    let (f, _g, _b) = setup();
    let mgr = cuda_manager();
    let _ctx = bind_primary(0);
    let cap = Capture::new();
    for told in [true, false] {
        let pool = mgr
            .device_pool(
                0,
                PoolConfig {
                    budget: Budget::Bytes(128 * MIB),
                    ..PoolConfig::default()
                },
            )
            .unwrap();
        let (a, b) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
        // What a capture of `a` would trip over: a's free block (an idle reclaim
        // queries a), b's block used on a (its free records on a).
        drop(pool.alloc(3 * MIB, &a).unwrap());
        drop(pool.alloc(5 * MIB, &b).unwrap());
        let shared = pool.alloc(6 * MIB, &b).unwrap();
        shared.record_stream(&a).unwrap();
        let id = hetmem::pool::PrivatePoolId(9, 0);
        if told {
            let h = a.handle();
            pool.begin_allocate_to_pool(id, move |s| s.handle() == h)
                .unwrap();
        }
        let (violations, joins) = (f.stat("capture_violations"), f.stat("capture_joins"));
        assert_eq!(cap.begin(stream_ptr(&a), GLOBAL), 0);
        assert!(a.is_capturing().unwrap() && !b.is_capturing().unwrap());
        let mut held = Vec::new();
        let mut graph_block = 0;
        for (i, size) in [MIB, 7 * MIB, 512, 3 * MIB, 20 * MIB]
            .into_iter()
            .enumerate()
        {
            let blk = pool.alloc(size, &a).unwrap();
            if size == 7 * MIB {
                graph_block = blk.ptr().0;
            }
            held.push(blk);
            drop(pool.alloc(size + 4096 * i, &b).unwrap());
        }
        drop(shared);
        drop(held);
        assert!(matches!(
            pool.alloc(200 * MIB, &a),
            Err(Error::OutOfMemory { .. })
        ));
        assert_eq!(f.stat("capture_violations"), violations, "told {told}");
        assert_eq!(f.stat("capture_joins"), joins, "told {told}");
        assert_eq!(cap.end(stream_ptr(&a)), 0, "told {told}: a graph");
        if told {
            pool.end_allocate_to_pool(id).unwrap();
            let outside: Vec<_> = (0..3).map(|_| pool.alloc(7 * MIB, &b).unwrap()).collect();
            assert!(outside.iter().all(|o| o.ptr().0 != graph_block));
            drop(outside);
            pool.release_pool(id).unwrap();
        }
        drop(pool.alloc(MIB, &b).unwrap());
        pool.trim().unwrap();
        assert_eq!(pool.reserved(), 0, "told {told}");
        assert_eq!(f.stat("capture_violations"), violations);
    }
    // Tight: the only memory that fits another stream's request is a free block of the
    // capturing stream's. It stays that stream's (reclaiming it would query the
    // capturing stream; handing it over would record on it), and the request fails.
    let tight = mgr
        .device_pool(
            0,
            PoolConfig {
                budget: Budget::Bytes(24 * MIB),
                ..PoolConfig::default()
            },
        )
        .unwrap();
    let (a, b) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
    drop(tight.alloc(16 * MIB, &a).unwrap());
    let violations = f.stat("capture_violations");
    assert_eq!(cap.begin(stream_ptr(&a), GLOBAL), 0);
    assert!(matches!(
        tight.alloc(16 * MIB, &b),
        Err(Error::OutOfMemory { .. })
    ));
    assert_eq!(f.stat("capture_violations"), violations);
    assert_eq!(cap.end(stream_ptr(&a)), 0);
    drop(tight.alloc(16 * MIB, &b).unwrap());
}

/// The tier store over the CUDA backend: an acquire of a resident parameter in a
/// capture (global mode) makes no illegal call, one of a parameter that is not
/// resident is refused without loading, and the copy stream never joins the capture.
#[test]
fn a_tier_store_acquire_in_a_capture_makes_no_illegal_call() {
    let (f, _g, _b) = setup();
    let mgr = cuda_manager();
    let _ctx = bind_primary(0);
    let cap = Capture::new();
    let layer = 4 * MIB;
    let store = TierStore::new(&mgr, TierConfig::new(2 * layer, 8 * layer)).unwrap();
    for i in 0..4 {
        store
            .register(&format!("w{i}"), layer_bytes(i, layer).into())
            .unwrap();
    }
    let (capture, other) = (mgr.create_stream(0).unwrap(), mgr.create_stream(0).unwrap());
    drop(store.acquire(0, &other).unwrap());
    let (violations, joins) = (f.stat("capture_violations"), f.stat("capture_joins"));
    assert_eq!(cap.begin(stream_ptr(&capture), GLOBAL), 0);
    let g = store.acquire(0, &capture).unwrap();
    assert!(matches!(
        store.acquire(3, &capture),
        Err(Error::StreamCapturing { .. })
    ));
    drop(g);
    // Another stream's loads meanwhile evict what the capture used.
    for i in 1..4 {
        drop(store.acquire(i, &other).unwrap());
    }
    assert!(!store.copy_stream().is_capturing().unwrap());
    assert_eq!(f.stat("capture_violations"), violations);
    assert_eq!(f.stat("capture_joins"), joins);
    assert_eq!(cap.end(stream_ptr(&capture)), 0);
    assert_eq!(store.read(3).unwrap(), layer_bytes(3, layer));
}

// ------------------------------------------------------------- special streams

/// A stream of device 0 made by "the caller": blocking (flags 0) or non-blocking.
fn caller_stream(b: &dyn Backend, blocking: bool) -> (*mut c_void, hetmem::backend::StreamHandle) {
    let create: CuStreamCreateFn = raw(c"cuStreamCreate");
    // The backend holds the context from here on: releasing the test's own reference
    // below must not reset it (and destroy the stream).
    b.synchronize_device(0).unwrap();
    let _ctx = bind_primary(0);
    let mut s = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; device 0's context is current.
    assert_eq!(unsafe { create(&mut s, u32::from(!blocking)) }, 0);
    // SAFETY: a live stream of device 0 from this driver, forgotten before it is
    // destroyed (`drop_caller_stream`).
    let h = unsafe { b.import_stream(0, s as u64) }.unwrap();
    (s, h)
}

fn drop_caller_stream(b: &dyn Backend, (s, h): (*mut c_void, hetmem::backend::StreamHandle)) {
    let destroy: CuStreamFn = raw(c"cuStreamDestroy_v2");
    let _ctx = bind_primary(0);
    // SAFETY: imported once above; the caller's stream is destroyed after.
    unsafe {
        b.synchronize_stream(h).unwrap();
        b.forget_stream(h).unwrap();
        assert_eq!(destroy(s), 0);
    }
}

/// The fake's model of handle 2: one queue per thread (and context), so two threads
/// queueing "on stream 2" have two independent orders, and synchronising it on one
/// thread waits for that thread's work only.
#[test]
fn the_per_thread_stream_is_a_queue_per_thread() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
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
    assert_eq!(
        f.stat("per_thread_streams"),
        queues + 2,
        "one per-thread stream per thread"
    );
    assert_eq!(
        f.stat("per_thread_pending"),
        1,
        "the other thread's synchronisation left this thread's copy queued"
    );
    let mut out = vec![0u8; len];
    // SAFETY: as above.
    unsafe {
        d.synchronize_stream(s).unwrap();
        d.copy(host(&mut out), dev(0, p), len, Some(s)).unwrap();
        d.synchronize_stream(s).unwrap();
        d.forget_stream(s).unwrap();
        d.free_device(0, p, len).unwrap();
        d.free_device(0, q, len).unwrap();
    }
    assert_eq!(out, mine);
    assert_eq!(f.stat("per_thread_pending"), 0);
}

/// The fake's model of the legacy stream: its work waits for the work queued before on
/// blocking streams (the caller's flag-0 streams, the per-thread streams), and blocking
/// streams' later work waits for it; non-blocking streams (hetmem's) are not ordered
/// with it either way.
#[test]
fn the_legacy_stream_orders_blocking_streams_and_not_non_blocking_ones() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = 4096;
    let waits = f.stat("implicit_waits");
    // SAFETY: special values of device 0.
    let (legacy, per_thread) = unsafe {
        (
            d.import_stream(0, 0).unwrap(),
            d.import_stream(0, hetmem::backend::PER_THREAD_STREAM)
                .unwrap(),
        )
    };
    let blocking = caller_stream(d, true);
    let non_blocking = d.create_stream(0).unwrap();
    for (name, s, ordered) in [
        ("a blocking stream", blocking.1, true),
        ("the per-thread stream", per_thread, true),
        ("a non-blocking stream", non_blocking, false),
    ] {
        let p = d.alloc_device(0, len).unwrap();
        let mut data = vec![7u8; len];
        let mut out = vec![0u8; len];
        let mut back = vec![9u8; len];
        let mut out2 = vec![0u8; len];
        // SAFETY: the buffers outlive the copies, synchronised below; p is live.
        unsafe {
            // Queued on `s`, then read on the legacy stream.
            d.copy(dev(0, p), host(&mut data), len, Some(s)).unwrap();
            d.copy(host(&mut out), dev(0, p), len, Some(legacy))
                .unwrap();
            d.synchronize_stream(legacy).unwrap();
            assert_eq!(
                out == data,
                ordered,
                "{name}: the legacy stream waited for it: {}",
                out == data
            );
            d.synchronize_stream(s).unwrap();
            // Written on the legacy stream, then read on `s`.
            d.copy(dev(0, p), host(&mut back), len, Some(legacy))
                .unwrap();
            d.copy(host(&mut out2), dev(0, p), len, Some(s)).unwrap();
            d.synchronize_stream(s).unwrap();
            assert_eq!(
                out2 == back,
                ordered,
                "{name}: it waited for the legacy stream: {}",
                out2 == back
            );
            d.synchronize_stream(legacy).unwrap();
            d.free_device(0, p, len).unwrap();
        }
    }
    assert!(f.stat("implicit_waits") >= waits + 4);
    // SAFETY: imported or made above, not used after.
    unsafe {
        d.forget_stream(legacy).unwrap();
        d.forget_stream(per_thread).unwrap();
        d.destroy_stream(non_blocking).unwrap();
    }
    drop_caller_stream(d, blocking);
}

/// A copy with no stream is ordered as cuMemcpy is: after the work queued before it on
/// the legacy stream and, through it, on blocking streams (a kernel's output written on
/// stream 0 is what it reads); not after non-blocking streams' work, which the caller
/// orders (hetmem's buffers do it with fences).
#[test]
fn a_copy_without_a_stream_follows_the_legacy_stream() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = 4096;
    // SAFETY: the legacy stream of device 0.
    let legacy = unsafe { d.import_stream(0, 0) }.unwrap();
    let blocking = caller_stream(d, true);
    let non_blocking = d.create_stream(0).unwrap();
    for (name, s, ordered) in [
        ("the legacy stream", legacy, true),
        ("a blocking stream", blocking.1, true),
        ("a non-blocking stream", non_blocking, false),
    ] {
        let p = d.alloc_device(0, len).unwrap();
        let mut data = vec![3u8; len];
        let mut out = vec![0u8; len];
        // SAFETY: the buffers outlive the copies, synchronised below; p is live.
        unsafe {
            d.copy(dev(0, p), host(&mut data), len, Some(s)).unwrap();
            d.copy(host(&mut out), dev(0, p), len, None).unwrap();
            assert_eq!(
                out == data,
                ordered,
                "{name}: the synchronous copy read what was queued there: {}",
                out == data
            );
            d.synchronize_stream(s).unwrap();
            d.free_device(0, p, len).unwrap();
        }
    }
    assert_eq!(f.stat("legacy_pending"), 0);
    // SAFETY: imported or made above, not used after.
    unsafe {
        d.forget_stream(legacy).unwrap();
        d.destroy_stream(non_blocking).unwrap();
    }
    drop_caller_stream(d, blocking);
}

/// The device pool over the per-thread stream (2) used from two threads: a block freed
/// by one thread's stream with a copy still queued reaches the other thread's stream
/// only behind that copy. Without it, the first thread's copy would land after the
/// second's and overwrite it.
#[test]
fn the_pool_orders_a_block_between_two_threads_per_thread_streams() {
    let (f, _g, _b) = setup();
    let mgr = cuda_manager();
    let cfg = PoolConfig {
        budget: Budget::Bytes(PAGE),
        ..PoolConfig::default()
    };
    let pool = mgr.device_pool(0, cfg).unwrap();
    // SAFETY: every thread has a per-thread stream on device 0.
    let s = unsafe { hetmem::Stream::wrap(&mgr, 0, hetmem::backend::PER_THREAD_STREAM) }.unwrap();
    let mut mine = mgr
        .alloc(Placement::Host(NumaPolicy::Default), PAGE)
        .unwrap();
    mine.as_mut_slice().unwrap().fill(1);
    let blk = pool.alloc(PAGE, &s).unwrap();
    let addr = blk.ptr();
    mgr.copy_to_block(&blk, 0, &mine, 0, PAGE, &s).unwrap();
    drop(blk);
    assert!(
        f.stat("per_thread_pending") > 0,
        "the copy is still queued on this thread's stream"
    );
    let blk = std::thread::scope(|t| {
        t.spawn(|| {
            let mut theirs = mgr
                .alloc(Placement::Host(NumaPolicy::Default), PAGE)
                .unwrap();
            theirs.as_mut_slice().unwrap().fill(2);
            let blk = pool.alloc(PAGE, &s).unwrap();
            assert_eq!(blk.ptr(), addr, "the budget leaves one block");
            mgr.copy_to_block(&blk, 0, &theirs, 0, PAGE, &s).unwrap();
            s.synchronize().unwrap();
            blk
        })
        .join()
        .unwrap()
    });
    // Whatever this thread still had queued runs now, then the block is read.
    s.synchronize().unwrap();
    let mut out = vec![0u8; PAGE];
    blk.read(0, &mut out).unwrap();
    assert!(
        out.iter().all(|&x| x == 2),
        "the first thread's copy landed after the second's: {}",
        out[0]
    );
    assert_eq!(f.stat("per_thread_pending"), 0);
}

/// The same, but the block is freed on a third thread, which cannot name the first
/// thread's per-thread stream: it is handed on after the whole device (cuCtxSynchronize).
#[test]
fn a_per_thread_block_freed_on_another_thread_waits_for_the_device() {
    let (f, _g, _b) = setup();
    let mgr = cuda_manager();
    let cfg = PoolConfig {
        budget: Budget::Bytes(PAGE),
        ..PoolConfig::default()
    };
    let pool = mgr.device_pool(0, cfg).unwrap();
    // SAFETY: every thread has a per-thread stream on device 0.
    let s = unsafe { hetmem::Stream::wrap(&mgr, 0, hetmem::backend::PER_THREAD_STREAM) }.unwrap();
    let mut mine = mgr
        .alloc(Placement::Host(NumaPolicy::Default), PAGE)
        .unwrap();
    mine.as_mut_slice().unwrap().fill(1);
    let blk = pool.alloc(PAGE, &s).unwrap();
    let addr = blk.ptr();
    mgr.copy_to_block(&blk, 0, &mine, 0, PAGE, &s).unwrap();
    std::thread::scope(|t| {
        t.spawn(move || drop(blk));
    });
    assert!(
        f.stat("per_thread_pending") > 0,
        "the copy is still queued on this thread's stream"
    );
    let syncs = f.stat("ctx_synchronizes");
    std::thread::scope(|t| {
        t.spawn(|| {
            let blk = pool.alloc(PAGE, &s).unwrap();
            assert_eq!(blk.ptr(), addr, "the budget leaves one block");
            assert_eq!(
                f.stat("per_thread_pending"),
                0,
                "the first thread's copy ran before the block was handed on"
            );
        });
    });
    assert_eq!(f.stat("ctx_synchronizes"), syncs + 1);
}

/// The driver calls a pool and copies make on the driver itself (counted by the fake):
/// events are recorded again, not made per copy; a pool growing by ten 16 MiB blocks
/// makes at most one physical allocation (one map) per growth, gives each run of them
/// access with one call, and serving the same sizes again calls the driver for no
/// memory at all.
#[test]
fn the_pool_and_copies_call_the_driver_rarely() {
    let (f, _g, _b) = setup();
    let mgr = cuda_manager();
    let calls = |name: &str| f.stat(&format!("calls:{name}"));
    let s = mgr.create_stream(0).unwrap();
    let src = mgr.alloc(Placement::Device(0), MIB).unwrap();
    let mut dst = mgr.alloc(Placement::Device(0), MIB).unwrap();
    let events = calls("cuEventCreate");
    for _ in 0..200 {
        mgr.copy_async(&mut dst, 0, &src, 0, MIB, &s).unwrap();
    }
    s.synchronize().unwrap();
    assert!(
        calls("cuEventCreate") - events <= 4,
        "{} events made for 200 copies",
        calls("cuEventCreate") - events
    );
    let p = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let before: Vec<i64> = ["cuMemCreate", "cuMemMap", "cuMemSetAccess"]
        .iter()
        .map(|c| calls(c))
        .collect();
    let blocks: Vec<_> = (0..10).map(|_| p.alloc(16 * MIB, &s).unwrap()).collect();
    let grown: Vec<i64> = ["cuMemCreate", "cuMemMap", "cuMemSetAccess"]
        .iter()
        .zip(&before)
        .map(|(c, b)| calls(c) - b)
        .collect();
    assert!(
        grown[0] <= 10 && grown[1] == grown[0],
        "creates, maps: {grown:?}"
    );
    assert!(
        grown[2] <= grown[0],
        "one set-access per run at most: {grown:?}"
    );
    drop(blocks);
    let steady: Vec<i64> = ["cuMemCreate", "cuMemMap", "cuMemSetAccess", "cuMemUnmap"]
        .iter()
        .map(|c| calls(c))
        .collect();
    for _ in 0..5 {
        let again: Vec<_> = (0..10).map(|_| p.alloc(16 * MIB, &s).unwrap()).collect();
        drop(again);
    }
    let after: Vec<i64> = ["cuMemCreate", "cuMemMap", "cuMemSetAccess", "cuMemUnmap"]
        .iter()
        .map(|c| calls(c))
        .collect();
    assert_eq!(
        after, steady,
        "no driver call for memory the pool already has"
    );
}
