//! Builds and drives the fake CUDA driver (`tests/fake_cuda/fake_cuda.c`).
//!
//! [`fake_cuda_library`] compiles it once per test process into
//! `target/fake-cuda/libcuda.so.1`, with the SONAME `libcuda.so.1`, the real driver's.
//!
//! The backend loads the driver itself: `dlopen("libcuda.so.1")` (then `"libcuda.so"`
//! if that fails), once per process, and binds each symbol once per process. A test
//! cannot hand it a path. [`FakeCuda::preload`] therefore loads the built file by its
//! absolute path before any `CudaBackend` exists; glibc answers a later `dlopen` of a
//! bare name with an object already loaded whose SONAME matches, so the backend's
//! `dlopen("libcuda.so.1")` gets the fake — also on a machine with a real driver on
//! the loader path (`preload` checks this with `RTLD_NOLOAD` and panics if the name
//! resolves to anything else). The fake is one machine per process: tests in
//! one binary share it, its memory accounting and its counters. Tests that assert on
//! counters or bytes hold [`FakeCuda::serial`]; tests that need a differently
//! configured machine run in a child process (the environment variables of
//! fake_cuda.c's header).
//!
//! From a shell, without preloading: `LD_LIBRARY_PATH=target/fake-cuda cargo run
//! --example stream_layers -- --backend cuda` (after a test run has built the file).
//!
//! It builds with `fake_hip.rs`'s `compile_shared_library_with`, into its `target_dir`,
//! and reports with its `dl_error`.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use super::fake_hip;

/// File name of the built fake driver: the name the backend asks the loader for first.
pub const FAKE_CUDA_FILE: &str = "libcuda.so.1";

/// `CUresult` codes the tests name.
pub mod code {
    pub const INVALID_VALUE: i32 = 1;
    pub const OUT_OF_MEMORY: i32 = 2;
    pub const NOT_INITIALIZED: i32 = 3;
    pub const STUB_LIBRARY: i32 = 34;
    pub const DEVICE_UNAVAILABLE: i32 = 46;
    pub const NO_DEVICE: i32 = 100;
    pub const INVALID_DEVICE: i32 = 101;
    pub const INVALID_CONTEXT: i32 = 201;
    pub const INVALID_HANDLE: i32 = 400;
    pub const NOT_READY: i32 = 600;
    pub const ILLEGAL_ADDRESS: i32 = 700;
    pub const CONTEXT_IS_DESTROYED: i32 = 709;
    pub const HOST_MEMORY_ALREADY_REGISTERED: i32 = 712;
    pub const HOST_MEMORY_NOT_REGISTERED: i32 = 713;
    pub const NOT_SUPPORTED: i32 = 801;
    pub const ILLEGAL_STATE: i32 = 401;
    pub const STREAM_CAPTURE_UNSUPPORTED: i32 = 900;
    pub const STREAM_CAPTURE_INVALIDATED: i32 = 901;
    pub const STREAM_CAPTURE_MERGE: i32 = 902;
    pub const STREAM_CAPTURE_UNJOINED: i32 = 904;
    pub const STREAM_CAPTURE_ISOLATION: i32 = 905;
    pub const STREAM_CAPTURE_IMPLICIT: i32 = 906;
    pub const CAPTURED_EVENT: i32 = 907;
    pub const UNKNOWN: i32 = 999;
}

/// The C source of the fake driver.
pub fn fake_cuda_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_cuda/fake_cuda.c")
}

/// Set by a test process for the child processes it starts: the fake it built, so that
/// they load that file instead of compiling it again.
pub const BUILT_ENV: &str = "HETMEM_FAKE_CUDA_BUILT";

/// Compiles the fake driver (once per process) into `target/fake-cuda/libcuda.so.1` and
/// returns its path (in a child process started with [`BUILT_ENV`], the parent's).
pub fn fake_cuda_library() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if let Some(built) = std::env::var_os(BUILT_ENV).map(PathBuf::from) {
                if built.is_file() {
                    return Ok(built);
                }
            }
            let src = fake_cuda_source();
            let out = fake_hip::target_dir()
                .join("fake-cuda")
                .join(FAKE_CUDA_FILE);
            fake_hip::compile_shared_library_with(
                &[&src],
                &out,
                &["-Wl,-soname,libcuda.so.1", "-Wall", "-Werror"],
            )?;
            Ok(out)
        })
        .clone()
}

/// The fake driver, loaded for the whole process, with the test hooks it exports.
pub struct FakeCuda {
    path: PathBuf,
    handle: *mut c_void,
}

// SAFETY: the handle is only used to look up symbols (dlsym is thread-safe) and is
// never closed; the hooks it leads to take the fake's own mutex.
unsafe impl Send for FakeCuda {}
// SAFETY: as for Send: shared use only calls thread-safe functions.
unsafe impl Sync for FakeCuda {}

type ConfigureFn = unsafe extern "C" fn(c_int, u64, c_int, c_int) -> c_int;
type FailNextFn = unsafe extern "C" fn(*const c_char, c_int, c_int);
type FailAfterFn = unsafe extern "C" fn(*const c_char, c_int, c_int, c_int);
type StatFn = unsafe extern "C" fn(*const c_char) -> i64;
type SetRegisterLimitFn = unsafe extern "C" fn(u64, c_int) -> c_int;

impl FakeCuda {
    /// Builds the fake and loads it, once per process, so that the backend's later
    /// `dlopen("libcuda.so.1")` finds it. Call before the first `CudaBackend::new` (or
    /// `Manager` with the CUDA backend) in the process. Panics when the fake cannot be
    /// built or loaded, or when `libcuda.so.1` would still resolve to another library.
    pub fn preload() -> &'static FakeCuda {
        static LOADED: OnceLock<FakeCuda> = OnceLock::new();
        LOADED.get_or_init(|| {
            let path = fake_cuda_library().unwrap_or_else(|e| panic!("building fake libcuda: {e}"));
            let c_path = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
            // The handle is never closed: the library stays loaded for the process's life.
            // SAFETY: the file is our freshly built fake driver, whose initialisers do
            // nothing; the path is a valid C string.
            let handle =
                unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if handle.is_null() {
                panic!("dlopen {}: {}", path.display(), fake_hip::dl_error());
            }
            // The bare name must now resolve to this object (by its SONAME) without
            // searching the loader path, where a real driver may be.
            // SAFETY: RTLD_NOLOAD only looks among loaded objects; the name is a valid C
            // string. The extra reference is dropped just below.
            let by_name = unsafe {
                libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD)
            };
            assert_eq!(
                by_name,
                handle,
                "dlopen(\"libcuda.so.1\") does not give the preloaded fake ({})",
                path.display()
            );
            // SAFETY: drops the reference RTLD_NOLOAD added; `handle` keeps one.
            unsafe { libc::dlclose(by_name) };
            FakeCuda { path, handle }
        })
    }

    /// Serialises the tests of one binary that count bytes or calls on the shared fake.
    /// Poisoning (a failed test) is ignored: the next test starts from whatever the
    /// failed one left, which its own assertions then show.
    pub fn serial() -> MutexGuard<'static, ()> {
        static SERIAL: Mutex<()> = Mutex::new(());
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The loaded file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `dlopen("libcuda.so.1")` now gives this object (what the backend will get).
    pub fn answers_libcuda(&self) -> bool {
        // SAFETY: as in `preload`.
        let by_name =
            unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        if by_name.is_null() {
            return false;
        }
        // SAFETY: drops the reference just taken.
        unsafe { libc::dlclose(by_name) };
        by_name == self.handle
    }

    fn sym<T: Copy>(&self, name: &CStr) -> T {
        assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
        // SAFETY: the handle is live (never closed) and the name a C string.
        let p = unsafe { libc::dlsym(self.handle, name.as_ptr()) };
        assert!(!p.is_null(), "fake CUDA lacks {name:?}");
        // SAFETY: T is the function pointer type of this symbol (the callers below
        // match fake_cuda.c), and the sizes are equal (asserted above).
        unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) }
    }

    /// Sets device count, memory per device, managed memory and VMM support. Only
    /// before the first `cuInit` in the process.
    pub fn configure(
        &self,
        devices: i32,
        mem_bytes: u64,
        managed: bool,
        vmm: bool,
    ) -> Result<(), String> {
        let f: ConfigureFn = self.sym(c"fakeCudaConfigure");
        // SAFETY: plain values in; the fake takes its mutex.
        let rc = unsafe { f(devices, mem_bytes, c_int::from(managed), c_int::from(vmm)) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!(
                "fakeCudaConfigure failed with {rc} (cuInit already called?)"
            ))
        }
    }

    /// Makes the next `times` calls of `call` (the exported name, such as
    /// `cuMemAlloc_v2`) return `code` and do nothing.
    pub fn fail_next(&self, call: &str, code: i32, times: i32) {
        let f: FailNextFn = self.sym(c"fakeCudaFailNext");
        let call = CString::new(call).expect("call name without NUL");
        // SAFETY: a valid C string (copied by the fake) and plain values.
        unsafe { f(call.as_ptr(), code, times) }
    }

    /// Makes `call` run as usual `skip` times, then fail `times` times with `code`.
    pub fn fail_after(&self, call: &str, code: i32, times: i32, skip: i32) {
        let f: FailAfterFn = self.sym(c"fakeCudaFailAfter");
        let call = CString::new(call).expect("call name without NUL");
        // SAFETY: a valid C string (copied by the fake) and plain values.
        unsafe { f(call.as_ptr(), code, times, skip) }
    }

    /// From now on, one `cuMemHostRegister` of more than `bytes` (0: the limit stays)
    /// answers `code` (nonzero). The fake is shared by the process: a test that calls
    /// this restores the limit (`stat("max_register_bytes")`, `"max_register_error"`).
    pub fn set_register_limit(&self, bytes: u64, code: i32) {
        let f: SetRegisterLimitFn = self.sym(c"fakeCudaSetRegisterLimit");
        // SAFETY: plain values; the fake takes its mutex.
        let rc = unsafe { f(bytes, code) };
        assert_eq!(rc, 0, "fakeCudaSetRegisterLimit({bytes}, {code})");
    }

    /// A counter of the fake (see `fakeCudaStat` in fake_cuda.c); panics on unknown
    /// names.
    pub fn stat(&self, name: &str) -> i64 {
        let f: StatFn = self.sym(c"fakeCudaStat");
        let c = CString::new(name).expect("stat name without NUL");
        // SAFETY: a valid C string, read during the call only.
        let v = unsafe { f(c.as_ptr()) };
        assert!(
            v != -1 || name.starts_with("last_"),
            "unknown fake CUDA stat {name}"
        );
        v
    }
}
