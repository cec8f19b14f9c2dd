//! The C ABI of `libhetmem.so`, declared for C and C++ in `include/hetmem.h`.
//!
//! - [`memory`](crate::ffi::memory): managers, allocation by placement, copies, streams (made by hetmem or
//!   wrapped from the caller's `cudaStream_t` / `hipStream_t`), prefetch, advice.
//! - [`event`](crate::ffi::event): events, to order work on streams and the host after hetmem's.
//! - [`tier`](crate::ffi::tier): the tiered parameter store: register, hints, acquire and release.
//! - [`torch`](crate::ffi::torch): the two entry points PyTorch's `CUDAPluggableAllocator` loads.
//! - [`stats`](crate::ffi::stats): the stats of a manager and a store as JSON.
//!
//! Conventions shared by every export:
//!
//! - Functions return an `int` status: [`HETMEM_OK`](crate::ffi::HETMEM_OK) (0) or a negative `HETMEM_ERR_*`
//!   code, one per [`Error`](crate::Error) variant plus the C-side faults (null pointer, a handle or
//!   pointer hetmem does not know, a buffer too small, a panic). The message of the
//!   calling thread's last call is [`hetmem_last_error`](crate::ffi::hetmem_last_error)'s.
//! - No panic unwinds into C: every body runs inside [`std::panic::catch_unwind`], and
//!   a panic becomes [`HETMEM_ERR_PANIC`](crate::ffi::HETMEM_ERR_PANIC) with its message.
//! - Handles (`hetmem_manager_t*`, ...) are opaque tokens, never addresses: a live
//!   handle is found in a registry, so a destroyed, forged or wrong-kind handle is
//!   [`HETMEM_ERR_INVALID_HANDLE`](crate::ffi::HETMEM_ERR_INVALID_HANDLE), not undefined behaviour, and a handle destroyed on
//!   one thread while another uses it stays valid for that use.
//! - Out-pointers are checked before any work, so a call that fails for a null
//!   out-pointer has done nothing.
//! - The header lists, per function, every code it can fail with; [`codes`](crate::ffi::codes)
//!   reads the lists and, in tests (`HETMEM_CHECK_CODES=1`), aborts on a code a call's
//!   list lacks.

pub mod codes;
pub mod event;
pub mod memory;
pub mod profile;
pub mod stats;
pub mod tier;
pub mod torch;

#[cfg(test)]
mod bad_input_tests;

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use rustc_hash::FxHashMap;

use crate::error::Error;

/// Success.
pub const HETMEM_OK: c_int = 0;
/// [`Error::OutOfMemory`]: a kind of memory had too little left.
pub const HETMEM_ERR_OUT_OF_MEMORY: c_int = -1;
/// [`Error::InvalidSize`]: zero, or larger than any allocator can give.
pub const HETMEM_ERR_INVALID_SIZE: c_int = -2;
/// [`Error::UnknownDevice`].
pub const HETMEM_ERR_UNKNOWN_DEVICE: c_int = -3;
/// [`Error::UnknownNumaNode`].
pub const HETMEM_ERR_UNKNOWN_NUMA_NODE: c_int = -4;
/// [`Error::NumaNodeWithoutMemory`].
pub const HETMEM_ERR_NUMA_NODE_WITHOUT_MEMORY: c_int = -5;
/// [`Error::ForeignHandle`]: a stream or buffer of another manager.
pub const HETMEM_ERR_FOREIGN_HANDLE: c_int = -6;
/// [`Error::OutOfBounds`]: a range past the end of a buffer.
pub const HETMEM_ERR_OUT_OF_BOUNDS: c_int = -7;
/// [`Error::InvalidArgument`].
pub const HETMEM_ERR_INVALID_ARGUMENT: c_int = -8;
/// [`Error::Unsupported`]: not possible with this placement or backend.
pub const HETMEM_ERR_UNSUPPORTED: c_int = -9;
/// [`Error::BackendUnavailable`]: the driver library is missing or unusable.
pub const HETMEM_ERR_BACKEND_UNAVAILABLE: c_int = -10;
/// [`Error::Driver`]: a driver call failed.
pub const HETMEM_ERR_DRIVER: c_int = -11;
/// [`Error::Os`]: a system call failed.
pub const HETMEM_ERR_OS: c_int = -12;
/// [`Error::Config`]: a file could not be read or parsed (safetensors, sysfs).
pub const HETMEM_ERR_CONFIG: c_int = -13;
/// [`Error::Checksum`]: a parameter's bytes did not match its checksum (a store made
/// with checksums).
pub const HETMEM_ERR_CHECKSUM: c_int = -14;
/// [`Error::Forked`]: a call in a `fork()`ed child on something made before the fork
/// (GPU driver state does not survive a fork). Frees and destroys there succeed and
/// leak instead.
pub const HETMEM_ERR_FORKED: c_int = -15;
/// [`Error::StreamCapturing`]: not possible while a stream is capturing a graph.
pub const HETMEM_ERR_STREAM_CAPTURING: c_int = -16;
/// A required pointer argument was NULL.
pub const HETMEM_ERR_NULL_POINTER: c_int = -20;
/// A handle that is not live: destroyed already, of another kind, or never made.
pub const HETMEM_ERR_INVALID_HANDLE: c_int = -21;
/// A memory address this manager did not allocate, or freed already.
pub const HETMEM_ERR_FOREIGN_POINTER: c_int = -22;
/// An output buffer too small for the result (the size needed is reported).
pub const HETMEM_ERR_BUFFER_TOO_SMALL: c_int = -23;
/// A parameter id or name the tier store does not have.
pub const HETMEM_ERR_UNKNOWN_PARAM: c_int = -24;
/// A panic inside hetmem was caught at the boundary (a bug: please report it).
pub const HETMEM_ERR_PANIC: c_int = -99;

/// The status code of a library error: the one place `Error` meets the C codes.
pub(crate) fn status_of(e: &Error) -> c_int {
    match e {
        Error::OutOfMemory { .. } => HETMEM_ERR_OUT_OF_MEMORY,
        Error::InvalidSize { .. } => HETMEM_ERR_INVALID_SIZE,
        Error::UnknownDevice { .. } => HETMEM_ERR_UNKNOWN_DEVICE,
        Error::UnknownNumaNode { .. } => HETMEM_ERR_UNKNOWN_NUMA_NODE,
        Error::NumaNodeWithoutMemory { .. } => HETMEM_ERR_NUMA_NODE_WITHOUT_MEMORY,
        Error::ForeignHandle { .. } => HETMEM_ERR_FOREIGN_HANDLE,
        Error::OutOfBounds { .. } => HETMEM_ERR_OUT_OF_BOUNDS,
        Error::InvalidArgument(_)
        | Error::UnknownHandle { .. }
        | Error::Unfenced { .. }
        | Error::NotMapped { .. } => HETMEM_ERR_INVALID_ARGUMENT,
        Error::Unsupported { .. } => HETMEM_ERR_UNSUPPORTED,
        Error::BackendUnavailable { .. } => HETMEM_ERR_BACKEND_UNAVAILABLE,
        Error::Driver { .. } | Error::RegistrationLeaked { .. } => HETMEM_ERR_DRIVER,
        Error::Os { .. } => HETMEM_ERR_OS,
        Error::Config { .. } => HETMEM_ERR_CONFIG,
        Error::Checksum { .. } => HETMEM_ERR_CHECKSUM,
        Error::Forked { .. } => HETMEM_ERR_FORKED,
        Error::StreamCapturing { .. } => HETMEM_ERR_STREAM_CAPTURING,
    }
}

/// The name of a status code, as a static C string.
fn status_name(code: c_int) -> &'static CStr {
    match code {
        HETMEM_OK => c"HETMEM_OK",
        HETMEM_ERR_OUT_OF_MEMORY => c"HETMEM_ERR_OUT_OF_MEMORY",
        HETMEM_ERR_INVALID_SIZE => c"HETMEM_ERR_INVALID_SIZE",
        HETMEM_ERR_UNKNOWN_DEVICE => c"HETMEM_ERR_UNKNOWN_DEVICE",
        HETMEM_ERR_UNKNOWN_NUMA_NODE => c"HETMEM_ERR_UNKNOWN_NUMA_NODE",
        HETMEM_ERR_NUMA_NODE_WITHOUT_MEMORY => c"HETMEM_ERR_NUMA_NODE_WITHOUT_MEMORY",
        HETMEM_ERR_FOREIGN_HANDLE => c"HETMEM_ERR_FOREIGN_HANDLE",
        HETMEM_ERR_OUT_OF_BOUNDS => c"HETMEM_ERR_OUT_OF_BOUNDS",
        HETMEM_ERR_INVALID_ARGUMENT => c"HETMEM_ERR_INVALID_ARGUMENT",
        HETMEM_ERR_UNSUPPORTED => c"HETMEM_ERR_UNSUPPORTED",
        HETMEM_ERR_BACKEND_UNAVAILABLE => c"HETMEM_ERR_BACKEND_UNAVAILABLE",
        HETMEM_ERR_DRIVER => c"HETMEM_ERR_DRIVER",
        HETMEM_ERR_OS => c"HETMEM_ERR_OS",
        HETMEM_ERR_CONFIG => c"HETMEM_ERR_CONFIG",
        HETMEM_ERR_CHECKSUM => c"HETMEM_ERR_CHECKSUM",
        HETMEM_ERR_FORKED => c"HETMEM_ERR_FORKED",
        HETMEM_ERR_STREAM_CAPTURING => c"HETMEM_ERR_STREAM_CAPTURING",
        HETMEM_ERR_NULL_POINTER => c"HETMEM_ERR_NULL_POINTER",
        HETMEM_ERR_INVALID_HANDLE => c"HETMEM_ERR_INVALID_HANDLE",
        HETMEM_ERR_FOREIGN_POINTER => c"HETMEM_ERR_FOREIGN_POINTER",
        HETMEM_ERR_BUFFER_TOO_SMALL => c"HETMEM_ERR_BUFFER_TOO_SMALL",
        HETMEM_ERR_UNKNOWN_PARAM => c"HETMEM_ERR_UNKNOWN_PARAM",
        HETMEM_ERR_PANIC => c"HETMEM_ERR_PANIC",
        _ => c"HETMEM_ERR_UNKNOWN_STATUS",
    }
}

/// A failed C call: its status code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FfiError {
    code: c_int,
    message: String,
}

impl FfiError {
    pub(crate) fn new(code: c_int, message: impl Into<String>) -> Self {
        FfiError {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn null(what: &str) -> Self {
        Self::new(HETMEM_ERR_NULL_POINTER, format!("`{what}` is NULL"))
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(HETMEM_ERR_INVALID_ARGUMENT, message)
    }
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        FfiError {
            code: status_of(&e),
            message: e.to_string(),
        }
    }
}

/// Result of a C call's body.
pub(crate) type FfiResult<T> = std::result::Result<T, FfiError>;

thread_local! {
    /// The message of this thread's last call that set one ("" after a success).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

// Both use `try_with`: a call from a thread's exit (a TLS destructor of the caller's)
// finds the slot gone, and `with` would panic outside the catch, aborting.
fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

fn clear_last_error() {
    let _ = LAST_ERROR.try_with(|e| {
        let mut e = e.borrow_mut();
        if !e.as_bytes().is_empty() {
            *e = CString::default();
        }
    });
}

/// A copy of `n` caller bytes at `data` (checked non-null by the caller), refused
/// before any slice is made when `n` cannot be a real object, and an out-of-memory
/// error rather than an abort when the copy cannot be allocated.
///
/// # Safety
/// `data` is valid for reads of `n` bytes when `n <= isize::MAX`.
pub(crate) unsafe fn copy_in<T: Copy>(data: *const T, n: usize, what: &str) -> FfiResult<Vec<T>> {
    let bytes = n.checked_mul(std::mem::size_of::<T>());
    if bytes.is_none_or(|b| b > isize::MAX as usize) {
        return Err(FfiError::new(
            HETMEM_ERR_INVALID_SIZE,
            format!("`{what}`: {n} elements is more than any memory holds"),
        ));
    }
    let mut v = Vec::new();
    if v.try_reserve_exact(n).is_err() {
        return Err(FfiError::new(
            HETMEM_ERR_OUT_OF_MEMORY,
            format!("`{what}`: no host memory for a copy of {n} elements"),
        ));
    }
    // SAFETY: `n` elements fit in isize (checked) and the caller vouches for them.
    v.extend_from_slice(unsafe { std::slice::from_raw_parts(data, n) });
    Ok(v)
}

fn panic_message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}

/// Runs the body of the export `name`, catching panics: `f`'s value, or the status
/// code of its error after recording the message as this thread's last error (and
/// logging it).
fn run<T>(name: &'static str, f: impl FnOnce() -> FfiResult<T>) -> Result<T, c_int> {
    let err = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => {
            clear_last_error();
            return Ok(v);
        }
        Ok(Err(e)) => {
            tracing::debug!(target: "hetmem::ffi", call = name, code = e.code,
                error = %e.message, "call failed");
            codes::check(name, e.code, &e.message);
            e
        }
        Err(p) => {
            let e = FfiError::new(HETMEM_ERR_PANIC, format!("panic: {}", panic_message(&*p)));
            tracing::error!(target: "hetmem::ffi", call = name, error = %e.message,
                "caught a panic at the C boundary");
            e
        }
    };
    set_last_error(&format!("{name}: {}", err.message));
    Err(err.code)
}

/// Runs the body of the export `name` (see [`run`]) and returns its status.
pub(crate) fn call(name: &'static str, f: impl FnOnce() -> FfiResult<()>) -> c_int {
    match run(name, f) {
        Ok(()) => HETMEM_OK,
        Err(code) => code,
    }
}

/// Runs the body of the export `name` (see [`run`]); `fallback` when it fails.
pub(crate) fn call_with<T>(name: &'static str, fallback: T, f: impl FnOnce() -> FfiResult<T>) -> T {
    run(name, f).unwrap_or(fallback)
}

/// A copy of the calling thread's last error message.
pub(crate) fn last_error_message() -> CString {
    LAST_ERROR
        .try_with(|e| e.borrow().clone())
        .unwrap_or_default()
}

/// The calling thread's last error message: empty after a call that succeeded.
///
/// The string stays valid until the thread's next call into hetmem (other than
/// `hetmem_last_error` and `hetmem_status_string`). Never NULL.
#[no_mangle]
pub extern "C" fn hetmem_last_error() -> *const c_char {
    // Reading a thread-local cannot panic short of TLS teardown; `try_with` covers that.
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// The name of a status code (`"HETMEM_ERR_NULL_POINTER"`, ...), a static string;
/// `"HETMEM_ERR_UNKNOWN_STATUS"` for a value that is not a code.
#[no_mangle]
pub extern "C" fn hetmem_status_string(status: c_int) -> *const c_char {
    status_name(status).as_ptr()
}

/// The library version (`"0.1.0"`), a static string. Compare with `HETMEM_VERSION` of
/// the header the caller was built with.
#[no_mangle]
pub extern "C" fn hetmem_version() -> *const c_char {
    const V: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    V.as_ptr()
}

// ---- handles ----

/// Every kind of object a C handle can stand for.
#[derive(Clone)]
pub(crate) enum Handle {
    Manager(Arc<memory::FfiManager>),
    Stream(Arc<memory::FfiStream>),
    Event(Arc<event::FfiEvent>),
    Store(Arc<tier::FfiStore>),
    Guard(Arc<tier::FfiGuard>),
}

/// An object that C sees through a handle.
pub(crate) trait HandleKind: Sized {
    /// What the handle is called in error messages.
    const NAME: &'static str;
    fn into_handle(this: Arc<Self>) -> Handle;
    fn from_handle(h: &Handle) -> Option<&Arc<Self>>;
}

macro_rules! handle_kind {
    ($t:ty, $variant:ident, $name:literal) => {
        impl HandleKind for $t {
            const NAME: &'static str = $name;
            fn into_handle(this: Arc<Self>) -> Handle {
                Handle::$variant(this)
            }
            fn from_handle(h: &Handle) -> Option<&Arc<Self>> {
                match h {
                    Handle::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
handle_kind!(memory::FfiManager, Manager, "manager");
handle_kind!(memory::FfiStream, Stream, "stream");
handle_kind!(event::FfiEvent, Event, "event");
handle_kind!(tier::FfiStore, Store, "tier store");
handle_kind!(tier::FfiGuard, Guard, "parameter guard");

/// Live handles by token. Tokens are never reused, so a stale handle is always caught.
static HANDLES: RwLock<Option<FxHashMap<usize, Handle>>> = RwLock::new(None);
/// The next token: pointer-aligned numbers in a range no allocation of this process
/// sits at by chance matters, since tokens are never dereferenced.
static NEXT_TOKEN: AtomicUsize = AtomicUsize::new(0x4865_0000);

/// Registers `v` and returns its handle for C.
pub(crate) fn register<T: HandleKind, P>(v: T) -> *mut P {
    let token = NEXT_TOKEN.fetch_add(16, Ordering::Relaxed);
    let mut map = HANDLES.write().unwrap_or_else(|e| e.into_inner());
    map.get_or_insert_with(FxHashMap::default)
        .insert(token, T::into_handle(Arc::new(v)));
    std::ptr::without_provenance_mut(token)
}

fn bad_handle<T: HandleKind>(token: usize) -> FfiError {
    FfiError::new(
        HETMEM_ERR_INVALID_HANDLE,
        format!(
            "{token:#x} is not a live {} handle (destroyed already, or not made by hetmem)",
            T::NAME
        ),
    )
}

/// The object behind a handle of kind `T`.
pub(crate) fn lookup<T: HandleKind, P>(h: *const P, what: &str) -> FfiResult<Arc<T>> {
    if h.is_null() {
        return Err(FfiError::null(what));
    }
    let token = h.addr();
    let map = HANDLES.read().unwrap_or_else(|e| e.into_inner());
    map.as_ref()
        .and_then(|m| m.get(&token))
        .and_then(T::from_handle)
        .cloned()
        .ok_or_else(|| bad_handle::<T>(token))
}

/// Unregisters a handle of kind `T` and returns its object (dropped by the caller, or
/// later by whoever still uses it).
pub(crate) fn unregister<T: HandleKind, P>(h: *const P, what: &str) -> FfiResult<Arc<T>> {
    if h.is_null() {
        return Err(FfiError::null(what));
    }
    let token = h.addr();
    let mut map = HANDLES.write().unwrap_or_else(|e| e.into_inner());
    let m = map.get_or_insert_with(FxHashMap::default);
    // Only a handle of the right kind is removed: a stream handle passed to
    // hetmem_manager_destroy must stay live.
    let v = m
        .get(&token)
        .and_then(T::from_handle)
        .cloned()
        .ok_or_else(|| bad_handle::<T>(token))?;
    m.remove(&token);
    Ok(v)
}

// ---- argument helpers ----

/// Checks an out-pointer (before any work is done).
pub(crate) fn out_ptr<T>(p: *mut T, what: &str) -> FfiResult<*mut T> {
    if p.is_null() {
        Err(FfiError::null(what))
    } else {
        Ok(p)
    }
}

/// Writes through an out-pointer checked by [`out_ptr`].
///
/// # Safety
/// `p` is non-null, aligned and valid for a write of `T` (the C caller's contract).
pub(crate) unsafe fn write_out<T>(p: *mut T, v: T) {
    // SAFETY: the caller's contract.
    unsafe { p.write(v) }
}

/// A C string argument as UTF-8.
///
/// # Safety
/// `p` is NULL or points at a NUL-terminated string that stays valid during the call.
pub(crate) unsafe fn c_str<'a>(p: *const c_char, what: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    // SAFETY: non-null, and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| FfiError::invalid(format!("`{what}` is not UTF-8")))
}

/// A device ordinal from C (`what` names the argument).
pub(crate) fn device_arg(device: c_int, what: &str) -> FfiResult<usize> {
    usize::try_from(device).map_err(|_| {
        FfiError::invalid(format!("`{what}` is {device}: devices are numbered from 0"))
    })
}

/// Copies `text` and a NUL into `buf` if it fits in `cap` bytes; reports the bytes
/// needed (NUL included) either way.
///
/// # Safety
/// `buf` is NULL or valid for `cap` bytes of writes; `needed` is NULL or valid.
pub(crate) unsafe fn write_c_text(
    text: &str,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> FfiResult<()> {
    let n = text.len() + 1;
    if !needed.is_null() {
        // SAFETY: non-null and valid by the caller's contract.
        unsafe { needed.write(n) };
    }
    if cap < n || buf.is_null() {
        return Err(FfiError::new(
            HETMEM_ERR_BUFFER_TOO_SMALL,
            format!("{n} bytes are needed, the buffer has {cap}"),
        ));
    }
    // SAFETY: `buf` holds at least `n` bytes (checked) and cannot overlap `text`, which
    // hetmem owns.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
        buf.add(text.len()).write(0);
    }
    Ok(())
}

/// Locks a mutex of the C layer, carrying on past poisoning (bodies run under
/// `catch_unwind`, so a panic may poison one; the data stays consistent because every
/// update is a single insert or remove).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- JSON, written by hand ----

/// A JSON string literal for `s`.
pub(crate) fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON object from `(key, already-encoded value)` pairs.
pub(crate) fn json_object<K: AsRef<str>>(fields: impl IntoIterator<Item = (K, String)>) -> String {
    let body: Vec<String> = fields
        .into_iter()
        .map(|(k, v)| format!("{}:{v}", json_str(k.as_ref())))
        .collect();
    format!("{{{}}}", body.join(","))
}

/// A JSON array of already-encoded values.
pub(crate) fn json_array(items: impl IntoIterator<Item = String>) -> String {
    let body: Vec<String> = items.into_iter().collect();
    format!("[{}]", body.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_own_code_and_name() {
        use crate::backend::BackendKind;
        use crate::placement::MemKind;
        let errors = [
            Error::oom(MemKind::Host, 1, 0),
            Error::InvalidSize {
                requested: 0,
                reason: "x",
            },
            Error::UnknownDevice {
                device: 1,
                count: 1,
                backend: BackendKind::Sim,
            },
            Error::UnknownNumaNode {
                node: 9,
                available: vec![0],
            },
            Error::NumaNodeWithoutMemory { node: 1 },
            Error::ForeignHandle { what: "stream" },
            Error::OutOfBounds {
                offset: 0,
                len: 2,
                size: 1,
            },
            Error::InvalidArgument("x".into()),
            Error::Unsupported {
                backend: BackendKind::Host,
                what: "x",
            },
            Error::BackendUnavailable {
                backend: BackendKind::Cuda,
                reason: "x".into(),
            },
            Error::Driver {
                backend: BackendKind::Cuda,
                call: "x",
                code: 1,
                message: "x".into(),
            },
            Error::os("x", nix::errno::Errno::EINVAL),
            Error::Config {
                path: "x".into(),
                reason: "x".into(),
            },
        ];
        let mut codes: Vec<c_int> = errors.iter().map(status_of).collect();
        codes.extend([
            HETMEM_ERR_NULL_POINTER,
            HETMEM_ERR_INVALID_HANDLE,
            HETMEM_ERR_FOREIGN_POINTER,
            HETMEM_ERR_BUFFER_TOO_SMALL,
            HETMEM_ERR_UNKNOWN_PARAM,
            HETMEM_ERR_PANIC,
        ]);
        let mut unique = codes.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), codes.len(), "codes collide: {codes:?}");
        for c in codes {
            assert!(c < 0);
            assert_ne!(status_name(c), c"HETMEM_ERR_UNKNOWN_STATUS", "{c}");
        }
    }

    #[test]
    fn panics_become_a_status_and_a_message() {
        let code = call("test_call", || panic!("boom"));
        assert_eq!(code, HETMEM_ERR_PANIC);
        // SAFETY: hetmem_last_error returns a live NUL-terminated string.
        let msg = unsafe { CStr::from_ptr(hetmem_last_error()) };
        assert!(msg.to_str().unwrap().contains("boom"), "{msg:?}");
        assert_eq!(call("test_call", || Ok(())), HETMEM_OK);
        // SAFETY: as above.
        assert!(unsafe { CStr::from_ptr(hetmem_last_error()) }.is_empty());
        let v = call_with("test_call", 7, || Err(FfiError::invalid("no")));
        assert_eq!(v, 7);
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("a\"b\\c\n\u{1}"), r#""a\"b\\c\n\u0001""#);
        assert_eq!(
            json_object([("k", "1".to_owned()), ("s", json_str("v"))]),
            r#"{"k":1,"s":"v"}"#
        );
        assert_eq!(json_array(["1".to_owned(), "2".to_owned()]), "[1,2]");
    }
}
