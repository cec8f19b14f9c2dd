//! Builds and drives the fake HIP runtime (`tests/fake_hip/fake_hip.c`).
//!
//! [`fake_hip_library`] compiles it once per test process. The dynamic loader keeps one
//! copy of a library per file, so every backend made from that path in one process
//! shares one fake machine (its memory accounting included). Tests that need a machine
//! of their own, configured in code rather than by environment, use [`FakeHip`], which
//! loads a private copy of the file.
//!
//! The fake is asynchronous where HIP is: a copy queued on a stream happens only when
//! that stream is synchronised, an event after it is waited for (or found pending by a
//! query), the stream is destroyed, or memory the copy touches is freed or
//! unregistered; and destroyed stream and event handles are handed out again. See the
//! header of fake_hip.c, and the `queued_ops`, `async_copies_done` and
//! `reused_handles` counters of [`FakeHip::stat`].

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// File name of the built fake runtime.
pub const FAKE_HIP_FILE: &str = "libfake_amdhip64.so";

/// Cargo's target directory, where the built fakes go (`<target>/fake-hip`,
/// `<target>/fake-cuda`).
pub fn target_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).to_path_buf()
}

/// What the last failed `dlopen` or `dlsym` of this thread said.
pub fn dl_error() -> String {
    // SAFETY: dlerror returns null or a C string valid until the next dl call, read
    // here before any other.
    let err = unsafe { libc::dlerror() };
    if err.is_null() {
        "unknown error".to_owned()
    } else {
        // SAFETY: non-null dlerror result, read before any other dl call.
        unsafe { CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Compiles C source files into a shared library at `out`, building under a temporary
/// name and renaming, so that parallel test processes never see a half-written file.
pub fn compile_shared_library(sources: &[&Path], out: &Path) -> Result<(), String> {
    compile_shared_library_with(sources, out, &[])
}

/// As [`compile_shared_library`], with `extra` compiler arguments (e.g.
/// `-Wl,-soname,libcuda.so`) after the sources.
pub fn compile_shared_library_with(
    sources: &[&Path],
    out: &Path,
    extra: &[&str],
) -> Result<(), String> {
    let dir = out
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", out.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        out.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let output = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O1", "-pthread", "-o"])
        .arg(&tmp)
        .args(sources)
        .args(extra)
        .output()
        .map_err(|e| format!("cannot run C compiler {cc:?}: {e}"))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "{cc} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot rename {} to {}: {e}", tmp.display(), out.display())
    })
}

/// Compiles `tests/fake_hip/fake_hip.c` (once per process) into
/// `target/fake-hip/libfake_amdhip64.so` and returns its path.
pub fn fake_hip_library() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_hip/fake_hip.c");
            let out = target_dir().join("fake-hip").join(FAKE_HIP_FILE);
            compile_shared_library(&[&src], &out)?;
            Ok(out)
        })
        .clone()
}

/// Compiles a one-off shared library from C source text (for loader tests), named
/// `name` under `target/tmp/fake-hip-extra/`.
pub fn compile_c_snippet(name: &str, source: &str) -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-hip-extra");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let src = dir.join(format!("{name}.{}.c", std::process::id()));
    std::fs::write(&src, source).map_err(|e| format!("cannot write {}: {e}", src.display()))?;
    let out = dir.join(format!("lib{name}.so"));
    let result = compile_shared_library(&[&src], &out);
    let _ = std::fs::remove_file(&src);
    result.map(|()| out)
}

/// A private copy of the fake runtime, loaded, with the test hooks it exports.
///
/// Configure it before the backend calls `hipInit` (that is, before
/// `RocmBackend::with_library(fake.path())`); the backend then loads the same copy.
/// The file is removed on drop (the loaded mapping stays valid).
pub struct FakeHip {
    path: PathBuf,
    handle: *mut c_void,
}

// SAFETY: the handle is only used to look up symbols (dlsym is thread-safe) and the
// hooks it leads to take the fake's own mutex.
unsafe impl Send for FakeHip {}
// SAFETY: as for Send: shared use only calls thread-safe functions.
unsafe impl Sync for FakeHip {}

type ConfigureFn = unsafe extern "C" fn(c_int, u64, c_int) -> c_int;
type FailNextFn = unsafe extern "C" fn(*const c_char, c_int, c_int);
type StatFn = unsafe extern "C" fn(*const c_char) -> i64;

impl FakeHip {
    /// Copies the fake runtime to a file of its own and loads it.
    pub fn new() -> Result<FakeHip, String> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let lib = fake_hip_library()?;
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-hip-instances");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(format!(
            "libfake_amdhip64-{}-{}.so",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::copy(&lib, &path)
            .map_err(|e| format!("cannot copy {} to {}: {e}", lib.display(), path.display()))?;
        let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: the file is our freshly built fake runtime, whose initialisers do
        // nothing; the path is a valid C string.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            let msg = dl_error();
            let _ = std::fs::remove_file(&path);
            return Err(format!("dlopen {}: {msg}", path.display()));
        }
        Ok(FakeHip { path, handle })
    }

    /// A private fake machine with `devices` devices of `mem_bytes` each.
    pub fn with_devices(devices: i32, mem_bytes: u64) -> Result<FakeHip, String> {
        let fake = FakeHip::new()?;
        fake.configure(devices, mem_bytes, true)?;
        Ok(fake)
    }

    /// The file to hand to `RocmBackend::with_library`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sym<T: Copy>(&self, name: &CStr) -> T {
        assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
        // SAFETY: the handle is live (closed only on drop) and the name a C string.
        let p = unsafe { libc::dlsym(self.handle, name.as_ptr()) };
        assert!(!p.is_null(), "fake HIP lacks {name:?}");
        // SAFETY: T is the function pointer type of this symbol (the callers below
        // match fake_hip.c), and the sizes are equal (asserted above).
        unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) }
    }

    /// Sets device count, memory per device and managed-memory support (before hipInit).
    pub fn configure(&self, devices: i32, mem_bytes: u64, managed: bool) -> Result<(), String> {
        let f: ConfigureFn = self.sym(c"fakeHipConfigure");
        // SAFETY: plain values in; the fake takes its mutex.
        let rc = unsafe { f(devices, mem_bytes, c_int::from(managed)) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!(
                "fakeHipConfigure failed with {rc} (already initialised?)"
            ))
        }
    }

    /// Makes the next `times` calls of `call` return `code`.
    pub fn fail_next(&self, call: &str, code: i32, times: i32) {
        let f: FailNextFn = self.sym(c"fakeHipFailNext");
        let call = CString::new(call).expect("call name without NUL");
        // SAFETY: a valid C string (copied by the fake) and plain values.
        unsafe { f(call.as_ptr(), code, times) }
    }

    /// A counter of the fake (see `fakeHipStat` in fake_hip.c); panics on unknown names.
    pub fn stat(&self, name: &str) -> i64 {
        let f: StatFn = self.sym(c"fakeHipStat");
        let c = CString::new(name).expect("stat name without NUL");
        // SAFETY: a valid C string, read during the call only.
        let v = unsafe { f(c.as_ptr()) };
        assert!(
            v != -1 || name.starts_with("last_"),
            "unknown fake HIP stat {name}"
        );
        v
    }
}

impl Drop for FakeHip {
    fn drop(&mut self) {
        // SAFETY: the handle came from dlopen and is closed once; the backend holds its
        // own reference if it still uses the library.
        unsafe { libc::dlclose(self.handle) };
        let _ = std::fs::remove_file(&self.path);
    }
}
