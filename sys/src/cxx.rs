//! Throwing a C++ exception to a C++ caller, for interfaces with no error return.
//!
//! PyTorch's pluggable allocator calls `void* malloc(size, device, stream)` through a
//! `std::function` and uses whatever comes back: NULL becomes a tensor whose storage is
//! address 0, and the first kernel that touches it faults on the device, far from the
//! cause. The caller's protocol for failure is an exception. This module throws
//! `std::runtime_error(message)` the way a C++ compiler lowers `throw` (Itanium C++
//! ABI, every Linux target): `__cxa_allocate_exception`, the class's constructor,
//! `__cxa_throw` with its `type_info` and destructor. The symbols come from the
//! process's libstdc++ by `dlopen(RTLD_NOLOAD)` and `dlsym`, so hetmem does not link it;
//! in a process without it (a C program) nothing is thrown and the caller must report
//! the failure its own way.

use std::ffi::{c_char, c_void, CStr};
use std::sync::OnceLock;

type AllocateException = unsafe extern "C" fn(usize) -> *mut c_void;
type Construct = unsafe extern "C-unwind" fn(*mut c_void, *const c_char);
type Destroy = unsafe extern "C" fn(*mut c_void);
type Throw = unsafe extern "C-unwind" fn(*mut c_void, *const c_void, Destroy) -> !;

/// What a `throw std::runtime_error(msg)` needs from libstdc++.
#[derive(Clone, Copy)]
struct Abi {
    allocate: AllocateException,
    construct: Construct,
    destroy: Destroy,
    type_info: *const c_void,
    throw: Throw,
}

// SAFETY: function pointers and the address of a type_info object that lives as long as
// the process; nothing in them is tied to a thread.
unsafe impl Send for Abi {}
// SAFETY: as above; the pointee is never written.
unsafe impl Sync for Abi {}

/// Room given to the exception object: `std::runtime_error` is 16 bytes in libstdc++
/// (a vtable pointer and a reference-counted string); more costs nothing.
const OBJECT_BYTES: usize = 64;

/// The five symbols, all from libstdc++: the copy loaded anywhere in the process (also
/// with `RTLD_LOCAL`, as Python loads PyTorch's libraries, where `RTLD_DEFAULT` does not
/// see it), else the global scope (a C++ executable linked with it statically). All
/// from one object: mixing libc++abi's `__cxa_throw` with libstdc++'s class would throw
/// an exception libstdc++'s `catch` does not recognise.
fn lookup() -> Option<Abi> {
    // SAFETY: RTLD_NOLOAD only returns a handle to a library already loaded (adding a
    // reference, kept for the process's life); it loads and initialises nothing.
    let handle = unsafe {
        libc::dlopen(
            c"libstdc++.so.6".as_ptr(),
            libc::RTLD_NOLOAD | libc::RTLD_LAZY,
        )
    };
    let scope = if handle.is_null() {
        libc::RTLD_DEFAULT
    } else {
        handle
    };
    let sym = |name: &CStr| {
        // SAFETY: dlsym with a handle from dlopen (or RTLD_DEFAULT) and a NUL-terminated
        // name only looks the symbol up.
        let p = unsafe { libc::dlsym(scope, name.as_ptr()) };
        (!p.is_null()).then_some(p)
    };
    let allocate = sym(c"__cxa_allocate_exception")?;
    let construct = sym(c"_ZNSt13runtime_errorC1EPKc")?;
    let destroy = sym(c"_ZNSt13runtime_errorD1Ev")?;
    let type_info = sym(c"_ZTISt13runtime_error")?;
    let throw = sym(c"__cxa_throw")?;
    if scope == libc::RTLD_DEFAULT
        && !same_object(&[allocate, construct, destroy, type_info, throw])
    {
        return None;
    }
    // SAFETY: these are the Itanium C++ ABI entry points and libstdc++'s
    // `std::runtime_error::runtime_error(const char*)` and `~runtime_error()`, whose
    // signatures are the types above (`this` first).
    unsafe {
        Some(Abi {
            allocate: std::mem::transmute::<*mut c_void, AllocateException>(allocate),
            construct: std::mem::transmute::<*mut c_void, Construct>(construct),
            destroy: std::mem::transmute::<*mut c_void, Destroy>(destroy),
            type_info,
            throw: std::mem::transmute::<*mut c_void, Throw>(throw),
        })
    }
}

/// Whether every address lies in the same loaded object.
fn same_object(addrs: &[*mut c_void]) -> bool {
    let base = |p: *mut c_void| {
        // SAFETY: an all-zero Dl_info is a valid value to be overwritten.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: dladdr only reads the loader's tables and writes `info`.
        let found = unsafe { libc::dladdr(p, &mut info) } != 0;
        found.then_some(info.dli_fbase)
    };
    let first = addrs.first().and_then(|p| base(*p));
    first.is_some() && addrs.iter().all(|p| base(*p) == first)
}

/// The symbols, once found; looked up again on each call until then (libstdc++ may be
/// loaded after the first one).
fn abi() -> Option<Abi> {
    static ABI: OnceLock<Abi> = OnceLock::new();
    if let Some(a) = ABI.get() {
        return Some(*a);
    }
    let a = lookup()?;
    Some(*ABI.get_or_init(|| a))
}

/// Whether this process can throw C++ exceptions (libstdc++ is loaded).
pub fn available() -> bool {
    abi().is_some()
}

/// Throws `std::runtime_error(message)` from here to the nearest C++ `catch`. Returns
/// (doing nothing) only when libstdc++ is not loaded in the process.
///
/// # Safety
/// Every frame between here and the C++ `catch` must allow unwinding: the caller is a
/// Rust function with an `extern "C-unwind"` (or Rust) ABI that is not inside
/// `catch_unwind` (a foreign exception reaching it aborts the process), and the frames
/// above are C++ code (or C compiled with unwind tables) that expects exceptions from
/// this call. Rust values in the unwound frames are dropped as in a panic.
pub unsafe fn throw_runtime_error(message: &CStr) {
    let Some(abi) = abi() else {
        return;
    };
    // SAFETY: `__cxa_allocate_exception` returns room for an object of the size asked
    // (it terminates rather than return NULL).
    let obj = unsafe { (abi.allocate)(OBJECT_BYTES) };
    // SAFETY: `obj` is fresh, suitably aligned room for a `std::runtime_error`; the
    // constructor copies `message`. If it throws (std::bad_alloc) that exception
    // unwinds instead, which the caller allows.
    unsafe { (abi.construct)(obj, message.as_ptr()) };
    // SAFETY: `obj` holds a constructed `std::runtime_error`, `type_info` is its
    // `typeid` and `destroy` its destructor, as `throw` expects; the caller allows the
    // unwinding that follows.
    unsafe { (abi.throw)(obj, abi.type_info, abi.destroy) }
}
