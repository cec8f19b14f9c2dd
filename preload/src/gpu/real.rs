//! Finding the real functions behind the wrappers, and the interposed `dlsym`.
//!
//! A wrapper's real function is found at its first call: `dlsym(RTLD_NEXT)` (the library
//! the program linked), else the same name in a library already loaded whose file name
//! has the right stem (`libcuda.so`, `libcudart.so`, `libamdhip64.so`: loaded by the
//! program with `RTLD_LOCAL`, as PyTorch loads libcudart, opened again with
//! `RTLD_NOLOAD` only, so nothing is ever loaded by the shim). A pointer the program got
//! from `dlsym` or `cuGetProcAddress` for a wrapped name is recorded as that wrapper's
//! real function, and the wrapper is handed back instead.
//!
//! `dlsym` itself is interposed (x86_64 and aarch64): the lookup is glibc's, by the
//! versioned `dlsym` found with `dlvsym`. `RTLD_NEXT` means "after the caller's object",
//! so the entry point passes its return address on, and a lookup with `RTLD_NEXT` from
//! another object is answered by walking the objects loaded after the caller's.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// `dlsym`'s type.
pub type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

static REAL_DLSYM: AtomicUsize = AtomicUsize::new(0);

/// Wrappers handed out by `dlsym`, by `cuGetProcAddress`, and real pointers passed
/// through by `cuGetProcAddress` unwrapped (a variant the shim does not wrap).
pub static HANDED_DLSYM: AtomicU64 = AtomicU64::new(0);
/// See [`HANDED_DLSYM`].
pub static HANDED_PROC: AtomicU64 = AtomicU64::new(0);
/// See [`HANDED_DLSYM`].
pub static PASSED_PROC: AtomicU64 = AtomicU64::new(0);

/// glibc's `dlsym`.
pub fn real_dlsym() -> Option<DlsymFn> {
    let p = REAL_DLSYM.load(Ordering::Acquire);
    if p != 0 {
        // SAFETY: only glibc's dlsym is ever stored here.
        return Some(unsafe { std::mem::transmute::<usize, DlsymFn>(p) });
    }
    for v in [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17"] {
        // SAFETY: dlvsym with RTLD_NEXT and NUL-terminated names; dlvsym is not
        // interposed, so this is glibc's own lookup.
        let f = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), v.as_ptr()) };
        if !f.is_null() {
            REAL_DLSYM.store(f as usize, Ordering::Release);
            // SAFETY: glibc's dlsym has this type.
            return Some(unsafe { std::mem::transmute::<*mut c_void, DlsymFn>(f) });
        }
    }
    None
}

/// The load address of this library (0 until known).
fn own_base() -> usize {
    static BASE: AtomicUsize = AtomicUsize::new(0);
    let b = BASE.load(Ordering::Relaxed);
    if b != 0 {
        return b;
    }
    let b = object_of(own_base as *const () as usize).map_or(0, |(base, _)| base);
    BASE.store(b, Ordering::Relaxed);
    b
}

/// The object holding `addr`: its load address and file name.
fn object_of(addr: usize) -> Option<(usize, *const c_char)> {
    // SAFETY: Dl_info is plain data; dladdr fills it for any address.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::dladdr(addr as *const c_void, &mut info) } == 0 {
        return None;
    }
    Some((info.dli_fbase as usize, info.dli_fname))
}

/// Whether `p` is a function of this library (a wrapper).
pub fn is_ours(p: usize) -> bool {
    p != 0 && object_of(p).is_some_and(|(b, _)| b == own_base())
}

/// A wrapped function's real counterpart, found at first use.
pub struct Real {
    name: &'static CStr,
    /// Stem of the library file name that exports it.
    lib: &'static [u8],
    ptr: AtomicUsize,
}

impl Real {
    /// The function `name` of the library whose file name contains `lib`.
    pub const fn new(name: &'static CStr, lib: &'static [u8]) -> Self {
        Real {
            name,
            lib,
            ptr: AtomicUsize::new(0),
        }
    }

    /// The real function (0: none found).
    #[inline]
    pub fn get(&self) -> usize {
        let p = self.ptr.load(Ordering::Acquire);
        if p != 0 {
            return p;
        }
        let p = self.resolve();
        if p != 0 {
            self.ptr.store(p, Ordering::Release);
        }
        p
    }

    /// Records `p` (from the program's `dlsym` or `cuGetProcAddress`) as the real
    /// function, unless it is one of ours.
    pub fn set(&self, p: usize) {
        if p != 0 && !is_ours(p) {
            self.ptr.store(p, Ordering::Release);
        }
    }

    #[cold]
    fn resolve(&self) -> usize {
        let Some(dlsym) = real_dlsym() else { return 0 };
        // SAFETY: RTLD_NEXT from this library and a NUL-terminated name.
        let p = unsafe { dlsym(libc::RTLD_NEXT, self.name.as_ptr()) } as usize;
        if p != 0 && !is_ours(p) {
            return p;
        }
        in_loaded(self.lib, self.name)
    }
}

/// `name` from an already loaded object whose file name contains `stem` (opened with
/// `RTLD_NOLOAD`: never loads anything). 0: none.
pub fn in_loaded(stem: &[u8], name: &CStr) -> usize {
    let Some(dlsym) = real_dlsym() else { return 0 };
    let mut found = [0u8; 512];
    struct Search<'a> {
        stem: &'a [u8],
        out: &'a mut [u8; 512],
        hit: bool,
    }
    unsafe extern "C" fn cb(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the Search below; `info` is the loader's, valid here.
        let (s, info) = unsafe { (&mut *data.cast::<Search>(), &*info) };
        if info.dlpi_name.is_null() {
            return 0;
        }
        // SAFETY: the loader's NUL-terminated object name.
        let name = unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes();
        let file = name.rsplit(|&b| b == b'/').next().unwrap_or(name);
        if !s.stem.is_empty()
            && file.windows(s.stem.len()).any(|w| w == s.stem)
            && name.len() < s.out.len()
        {
            s.out[..name.len()].copy_from_slice(name);
            s.out[name.len()] = 0;
            s.hit = true;
            return 1;
        }
        0
    }
    let mut s = Search {
        stem,
        out: &mut found,
        hit: false,
    };
    // SAFETY: the callback only reads the loader's entries and writes `s`.
    unsafe { libc::dl_iterate_phdr(Some(cb), (&mut s as *mut Search).cast()) };
    if !s.hit {
        return 0;
    }
    // SAFETY: `found` is NUL-terminated; RTLD_NOLOAD only takes a reference to an
    // object already loaded, given back at once.
    unsafe {
        let h = libc::dlopen(found.as_ptr().cast(), libc::RTLD_NOLOAD | libc::RTLD_LAZY);
        if h.is_null() {
            return 0;
        }
        let p = dlsym(h, name.as_ptr()) as usize;
        libc::dlclose(h);
        if is_ours(p) {
            0
        } else {
            p
        }
    }
}

/// `dlsym(RTLD_NEXT, name)` as seen from the object holding `caller`: the first
/// definition in an object loaded after it.
fn next_after(caller: usize, name: *const c_char, dlsym: DlsymFn) -> *mut c_void {
    let own = own_base();
    let Some((cbase, _)) = object_of(caller) else {
        // SAFETY: glibc's dlsym; from here RTLD_NEXT means after this library.
        return unsafe { dlsym(libc::RTLD_NEXT, name) };
    };
    if cbase == own {
        // SAFETY: the caller is this library: the lookup is the same from here.
        return unsafe { dlsym(libc::RTLD_NEXT, name) };
    }
    const MAX: usize = 1024;
    struct Walk {
        caller: usize,
        names: [*const c_char; MAX],
        n: usize,
        at: Option<usize>,
    }
    unsafe extern "C" fn cb(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the Walk below; `info` is the loader's.
        let (w, info) = unsafe { (&mut *data.cast::<Walk>(), &*info) };
        if w.n >= MAX {
            return 1;
        }
        let mut holds = false;
        for i in 0..usize::from(info.dlpi_phnum) {
            // SAFETY: dlpi_phdr has dlpi_phnum entries.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            if ph.p_type == libc::PT_LOAD {
                let lo = (info.dlpi_addr as usize).wrapping_add(ph.p_vaddr as usize);
                if w.caller.wrapping_sub(lo) < ph.p_memsz as usize {
                    holds = true;
                }
            }
        }
        if holds && w.at.is_none() {
            w.at = Some(w.n);
        }
        w.names[w.n] = info.dlpi_name;
        w.n += 1;
        0
    }
    let mut w = Walk {
        caller,
        names: [std::ptr::null(); MAX],
        n: 0,
        at: None,
    };
    // SAFETY: the callback only reads the loader's entries and writes `w`.
    unsafe { libc::dl_iterate_phdr(Some(cb), (&mut w as *mut Walk).cast()) };
    let Some(at) = w.at else {
        // SAFETY: as the first fallback.
        return unsafe { dlsym(libc::RTLD_NEXT, name) };
    };
    for &obj in w.names.iter().take(w.n).skip(at + 1) {
        // SAFETY: the loader's names of loaded objects (they stay loaded while we
        // hold them open); RTLD_NOLOAD loads nothing; the handle is given back.
        unsafe {
            if obj.is_null() || *obj == 0 {
                continue;
            }
            let h = libc::dlopen(obj, libc::RTLD_NOLOAD | libc::RTLD_LAZY);
            if h.is_null() {
                continue;
            }
            let p = dlsym(h, name);
            libc::dlclose(h);
            if p.is_null() {
                continue;
            }
            // The definition must be that object's own, not one of its dependencies'.
            if let Some((_, fname)) = object_of(p as usize) {
                if !fname.is_null() && libc::strcmp(fname, obj) == 0 {
                    return p;
                }
            }
        }
    }
    std::ptr::null_mut()
}

/// The interposed `dlsym`, with the caller's return address.
extern "C" fn dlsym_from(handle: *mut c_void, name: *const c_char, caller: usize) -> *mut c_void {
    super::guard(std::ptr::null_mut(), || {
        let Some(dlsym) = real_dlsym() else {
            return std::ptr::null_mut();
        };
        if handle == libc::RTLD_NEXT {
            return next_after(caller, name, dlsym);
        }
        // SAFETY: glibc's dlsym with the caller's arguments.
        let p = unsafe { dlsym(handle, name) };
        // hetmem's own lookups (the pool's backend, loading the driver) get the real
        // functions.
        if p.is_null() || name.is_null() || super::config().is_none() || super::own() {
            return p;
        }
        // SAFETY: a non-null name passed to dlsym is NUL-terminated.
        let n = unsafe { CStr::from_ptr(name) }.to_bytes();
        match super::wrapper_for(n) {
            Some((real, wrapper)) if !is_ours(p as usize) => {
                real.set(p as usize);
                HANDED_DLSYM.fetch_add(1, Ordering::Relaxed);
                wrapper as *mut c_void
            }
            _ => p,
        }
    })
}

/// `dlsym(3)`, interposed: the wrappers for the names the shim wraps, glibc's answer
/// for everything else.
///
/// # Safety
/// As the C function.
#[cfg(all(not(test), target_arch = "x86_64"))]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    // The return address (at the stack pointer on entry) as the third argument.
    core::arch::naked_asm!("mov rdx, [rsp]", "jmp {f}", f = sym dlsym_from)
}

/// `dlsym(3)`, interposed (see the x86_64 one).
///
/// # Safety
/// As the C function.
#[cfg(all(not(test), target_arch = "aarch64"))]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    core::arch::naked_asm!("mov x2, x30", "b {f}", f = sym dlsym_from)
}

/// Identifies what a `cuGetProcAddress`/`hipGetProcAddress` returned: the wrapper of
/// exactly that variant when the pointer is a wrapped, exported function of the
/// driver (by its own symbol name, or by comparing with the exported variants of the
/// name asked), else the pointer itself.
#[allow(clippy::not_unsafe_ptr_arg_deref)] // `p` is only compared and given to dladdr
pub fn wrap_proc(asked: &[u8], p: *mut c_void) -> *mut c_void {
    if p.is_null() || super::config().is_none() || is_ours(p as usize) {
        return p;
    }
    // SAFETY: Dl_info is plain data; dladdr fills it for any address.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::dladdr(p, &mut info) } != 0
        && info.dli_saddr == p
        && !info.dli_sname.is_null()
    {
        // SAFETY: the loader's NUL-terminated symbol name.
        let sname = unsafe { CStr::from_ptr(info.dli_sname) }.to_bytes();
        if is_variant(asked, sname) {
            if let Some((real, w)) = super::wrapper_for(sname) {
                real.set(p as usize);
                HANDED_PROC.fetch_add(1, Ordering::Relaxed);
                return w as *mut c_void;
            }
        }
    }
    // Not an exported symbol at its start: compare with the exported variants.
    if let (Some(dlsym), false) = (real_dlsym(), info.dli_fname.is_null()) {
        for (variant, real, w) in super::variants_of(asked) {
            // SAFETY: RTLD_NOLOAD on the object that holds `p` (loaded); the handle is
            // given back.
            let q = unsafe {
                let h = libc::dlopen(info.dli_fname, libc::RTLD_NOLOAD | libc::RTLD_LAZY);
                if h.is_null() {
                    break;
                }
                let q = dlsym(h, variant.as_ptr());
                libc::dlclose(h);
                q
            };
            if q == p {
                real.set(p as usize);
                HANDED_PROC.fetch_add(1, Ordering::Relaxed);
                return w as *mut c_void;
            }
        }
    }
    PASSED_PROC.fetch_add(1, Ordering::Relaxed);
    p
}

/// Whether `sname` is `asked` or a versioned variant of it (`_v2`, `_ptsz`, `_v2_ptds`).
pub fn is_variant(asked: &[u8], sname: &[u8]) -> bool {
    let Some(rest) = sname.strip_prefix(asked) else {
        return false;
    };
    rest.is_empty()
        || rest.starts_with(b"_pt")
        || (rest.starts_with(b"_v") && rest.get(2).is_some_and(u8::is_ascii_digit))
}

/// Calls the real function behind `$real` with the C signature `$ty`, or returns
/// `$missing` when there is none.
macro_rules! call_real {
    ($real:expr, $missing:expr, fn($($t:ty),*) -> $r:ty, $($a:expr),*) => {{
        let p = $real.get();
        if p == 0 {
            $missing
        } else {
            // SAFETY: `p` is the real function named by `$real`, whose C signature is
            // this one; the arguments are the caller's.
            unsafe { std::mem::transmute::<usize, unsafe extern "C" fn($($t),*) -> $r>(p)($($a),*) }
        }
    }};
}
pub(crate) use call_real;
