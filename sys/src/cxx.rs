//! Throwing a C++ exception to a C++ caller, for interfaces with no error return.
//!
//! PyTorch's pluggable allocator calls `void* malloc(size, device, stream)` through a
//! `std::function` and uses whatever comes back: NULL becomes a tensor whose storage is
//! address 0, and the first kernel that touches it faults on the device, far from the
//! cause. The caller's protocol for failure is an exception. This module throws
//! `std::runtime_error(message)` the way a C++ compiler lowers `throw` (Itanium C++
//! ABI, every Linux target): `__cxa_allocate_exception`, the class's constructor,
//! `__cxa_throw` with its `type_info` and destructor. The symbols come from the
//! process's libstdc++ by `dlsym`, so hetmem does not link it; a process without it (a
//! C program) gets `None` back and must report the failure its own way.

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

fn abi() -> Option<Abi> {
    static ABI: OnceLock<Option<Abi>> = OnceLock::new();
    *ABI.get_or_init(|| {
        let sym = |name: &CStr| {
            // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks the
            // symbol up in the objects already loaded.
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            (!p.is_null()).then_some(p)
        };
        let allocate = sym(c"__cxa_allocate_exception")?;
        let construct = sym(c"_ZNSt13runtime_errorC1EPKc")?;
        let destroy = sym(c"_ZNSt13runtime_errorD1Ev")?;
        let type_info = sym(c"_ZTISt13runtime_error")?;
        let throw = sym(c"__cxa_throw")?;
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
    })
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
