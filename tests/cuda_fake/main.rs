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
//! environment variables ([`child`]). A binary of its own for that reason: the driver
//! bound there is the fake, and the tests that re-run it must find only these tests.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

use common::{backend_checks, fake_cuda, fake_hip};

mod capture;
mod contexts;
mod fake;
mod manager;
mod memory;
mod registration;
mod streams;
mod vmm;

use std::ffi::{c_int, c_void, CStr};
use std::path::PathBuf;
use std::process::Command;
use std::ptr::NonNull;
use std::sync::{MutexGuard, OnceLock};

use backend_checks::{
    assert_driver, assert_leaked, dev, host, peek, unavailable_reason, Call, FakeDriver,
    Reservation,
};
use fake_cuda::{code, fake_cuda_library, FakeCuda};
use fake_hip::compile_c_snippet;
use hetmem::backend::cuda::{CudaBackend, DriverPinned, REGISTER_ROLLBACK_CALL};
use hetmem::backend::{Backend, BackendKind, DevicePtr, HostKind, MemRef, PhysHandle};
use hetmem::pool::host::HostPoolConfig;
use hetmem::pool::{Budget, PoolConfig};
use hetmem::tier::{SequenceHint, TierConfig, TierStore};
use hetmem::{Advice, Error, Location, Manager, MemKind, NumaPolicy, Placement};

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

/// The shared fake with this test's turn at it, and a backend on it, for the shared
/// scenarios.
struct Cuda {
    // Dropped before the turn ends.
    b: CudaBackend,
    f: &'static FakeCuda,
    _turn: MutexGuard<'static, ()>,
}

fn open() -> Cuda {
    let (f, turn, b) = setup();
    Cuda { b, f, _turn: turn }
}

impl FakeDriver for Cuda {
    fn backend(&self) -> &dyn Backend {
        &self.b
    }

    fn stat(&self, name: &str) -> i64 {
        self.f.stat(name)
    }

    fn fail_next(&self, call: &str, code: i32, times: i32) {
        self.f.fail_next(call, code, times)
    }

    fn call(&self, call: Call) -> &'static str {
        match call {
            Call::Alloc => "cuMemAlloc",
            Call::Free => "cuMemFree",
            // A copy without a stream runs on the device's internal stream.
            Call::SyncCopy => "cuMemcpyAsync",
            Call::Register => "cuMemHostRegister",
            Call::Unregister => "cuMemHostUnregister",
            Call::StreamCreate => "cuStreamCreate",
            Call::StreamDestroy => "cuStreamDestroy",
            Call::EventQuery => "cuEventQuery",
            Call::Advise => "cuMemAdvise",
        }
    }

    fn symbol(&self, call: Call) -> &'static str {
        match call {
            Call::Alloc => "cuMemAlloc_v2",
            Call::Free => "cuMemFree_v2",
            Call::Register => "cuMemHostRegister_v2",
            Call::StreamDestroy => "cuStreamDestroy_v2",
            Call::Advise => "cuMemAdvise_v2",
            other => self.call(other),
        }
    }

    fn device_name(&self, i: usize) -> String {
        format!("Fake NVIDIA H100 {i}")
    }

    fn pci_bus_ids(&self) -> [&'static str; 2] {
        ["0000:1a:00.0", "0000:1b:00.0"]
    }

    /// The backend refuses it before the driver would: the event is another context's.
    fn check_cross_device_record(&self, r: Result<(), Error>) {
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    }

    /// A `CUmemLocation`: type 1 is a device (its id), type 2 the host.
    fn last_location(&self, of: &str) -> Location {
        match self.stat(&format!("last_{of}_type")) {
            2 => Location::Host,
            1 => Location::Device(self.stat(&format!("last_{of}_id")) as usize),
            other => panic!("location type {other}"),
        }
    }

    fn device_synchronizes(&self) -> i64 {
        self.stat("ctx_synchronizes")
    }

    fn manager(&self) -> Manager {
        cuda_manager()
    }
}

/// What only the CUDA backend reports as driver errors: codes the bindings' enum does
/// not know (a newer driver's), wherever they come back, and a context binding that
/// fails on a fresh thread.
#[test]
fn unknown_codes_and_failed_context_bindings_are_driver_errors() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let e = d.create_event(0).unwrap();
    f.fail_next("cuEventQuery", 12345, 1);
    // SAFETY: a live event from this backend, destroyed once.
    unsafe {
        assert_driver(KIND, d.event_done(e).unwrap_err(), "cuEventQuery", 12345);
        d.destroy_event(e).unwrap();
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

/// Prefetching part of a managed range at an offset works; past its end the driver
/// refuses it.
#[test]
fn prefetch_of_part_of_a_managed_range() {
    let (_f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = 2 * MIB;
    let m = d.alloc_managed(1, len).unwrap();
    let s = d.create_stream(0).unwrap();
    // SAFETY: `m` is live managed memory of `len` bytes; `s` is live; both released once.
    unsafe {
        let mid = NonNull::new(m.as_ptr().add(4096)).unwrap();
        d.prefetch(mid, 4096, Location::Device(0), s).unwrap();
        assert_driver(
            KIND,
            d.prefetch(mid, len, Location::Host, s).unwrap_err(),
            "cuMemPrefetchAsync",
            code::INVALID_VALUE,
        );
        d.destroy_stream(s).unwrap();
        d.free_managed(1, m, len).unwrap();
    }
}

driver_scenarios!(open);

/// Devices are listed with no context: the VMM page of each, one retain per device per
/// backend at the device's first use, released on drop.
#[test]
fn devices_are_listed_without_a_context_and_opened_at_first_use() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    for i in 0..2 {
        assert_eq!(d.vmm_granularity(i), Some(PAGE));
    }
    assert_eq!(d.vmm_granularity(2), None);
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

/// A copy without a stream is queued on the device's internal stream (made at its first
/// use) and waited for; device to device across devices is `cuMemcpyPeerAsync`, on one
/// device a plain copy; a peer copy past its source is refused.
#[test]
fn sync_copies_use_the_internal_stream_and_peer_copies_both_contexts() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = MIB + 123;
    let mut src: Vec<u8> = (0..len).map(|i| (i * 17 % 253) as u8).collect();
    let streams = f.stat("streams");
    let before = ["copies", "async_copies", "peer_copies"].map(|n| f.stat(n));
    let (a, c) = (
        d.alloc_device(0, len).unwrap(),
        d.alloc_device(1, len).unwrap(),
    );
    let peer = d.create_stream(1).unwrap();
    // SAFETY: live, disjoint ranges of `len` bytes, kept until the stream is synchronised.
    unsafe {
        d.copy(dev(0, a), host(&mut src), len, None).unwrap();
        d.copy(dev(1, c), dev(0, a), len, Some(peer)).unwrap();
        d.synchronize_stream(peer).unwrap();
    }
    let after = ["copies", "async_copies", "peer_copies"].map(|n| f.stat(n));
    // The synchronous copy went through the internal stream (queued, then synced), none
    // on the legacy stream; the copy across devices is a peer copy.
    assert_eq!(after, [before[0], before[1] + 2, before[2] + 1]);

    // Device to device on one device: a plain copy, on the device's stream.
    let a2 = d.alloc_device(0, len).unwrap();
    // SAFETY: live, disjoint, `len` bytes each; synchronous.
    unsafe { d.copy(dev(0, a2), dev(0, a), len, None).unwrap() };
    assert_eq!(peek(d, 0, a2, len), src);
    // Read back from device 1 without a stream: device 1's internal stream.
    assert_eq!(peek(d, 1, c, len), src);
    // A peer copy that runs past its source is refused.
    // SAFETY: the fake checks bounds before touching memory.
    let err = unsafe { d.copy(dev(0, a), dev(1, c.offset(8)), len, None) }.unwrap_err();
    assert_driver(KIND, err, "cuMemcpyPeerAsync", code::INVALID_VALUE);
    // SAFETY: live handles and allocations from this backend, released once.
    unsafe {
        d.free_device(0, a2, len).unwrap();
        d.destroy_stream(peer).unwrap();
        d.free_device(0, a, len).unwrap();
        d.free_device(1, c, len).unwrap();
    }
    assert_eq!(
        f.stat("streams"),
        streams + 2,
        "only the two internal copy streams, made by the synchronous copies"
    );
}

/// `cuStreamDestroy` returns at once: the queued work is not done yet, but it finishes
/// (here: when its event is waited for) and only then is the handle free again.
#[test]
fn destroying_a_stream_returns_before_its_work_is_done() {
    let (f, _g, b) = setup();
    let d: &dyn Backend = &b;
    let len = 64 << 10;
    let mut a: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut out = vec![0u8; len];
    let src = d.alloc_device(0, len).unwrap();
    let s = d.create_stream(0).unwrap();
    let e = d.create_event(0).unwrap();
    // SAFETY: live, disjoint ranges that outlive the event's synchronisation; live
    // handles from this backend, each destroyed once.
    unsafe {
        d.copy(dev(0, src), host(&mut a), len, None).unwrap();
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
    }
}

/// Runs the calling test (its path in this binary, `module::name`) alone in a child process with `env` (the fake's variables are
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
    let built = fake_cuda_library().unwrap();
    let mut env = env.to_vec();
    env.push((fake_cuda::BUILT_ENV, built.to_str().expect("a UTF-8 path")));
    common::child::run(test, &env);
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

// ------------------------------------------------------------------------ copies

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

fn layer_bytes(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 31 + j * 7 + j / 251) as u8).collect()
}
