//! glibc's own allocator, reached through its `__libc_*` entry points (bound at link
//! time: no `dlsym` on any hot path), and the global allocator of the shim's own Rust
//! code, which goes there directly so that nothing the shim allocates re-enters the
//! interposed `malloc`.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};

use libc::{c_void, size_t};

extern "C" {
    fn __libc_malloc(size: size_t) -> *mut c_void;
    fn __libc_calloc(n: size_t, size: size_t) -> *mut c_void;
    fn __libc_realloc(p: *mut c_void, size: size_t) -> *mut c_void;
    fn __libc_free(p: *mut c_void);
    fn __libc_memalign(align: size_t, size: size_t) -> *mut c_void;
}

/// `malloc` of glibc.
#[inline]
pub fn malloc(size: usize) -> *mut c_void {
    // SAFETY: glibc's malloc takes any size and returns null or a fresh block.
    unsafe { __libc_malloc(size) }
}

/// `calloc` of glibc (checks `n * size` for overflow itself).
#[inline]
pub fn calloc(n: usize, size: usize) -> *mut c_void {
    // SAFETY: as `malloc`; glibc checks the product.
    unsafe { __libc_calloc(n, size) }
}

/// `memalign` of glibc: `align` must be a power of two (glibc rounds others up).
#[inline]
pub fn memalign(align: usize, size: usize) -> *mut c_void {
    // SAFETY: glibc's memalign takes any alignment and size and returns null or a block.
    unsafe { __libc_memalign(align, size) }
}

/// `realloc` of glibc.
///
/// # Safety
/// `p` is null or a live block of glibc's.
#[inline]
pub unsafe fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: the caller passes a glibc block or null.
    unsafe { __libc_realloc(p, size) }
}

/// `free` of glibc.
///
/// # Safety
/// `p` is null or a live block of glibc's, given back.
#[inline]
pub unsafe fn free(p: *mut c_void) {
    // SAFETY: the caller passes a glibc block or null.
    unsafe { __libc_free(p) }
}

/// glibc's `malloc_usable_size`, looked up once with `dlsym(RTLD_NEXT)` (glibc exports
/// no `__libc_` name for it); 0 until [`resolve_usable_size`] ran.
static USABLE_SIZE: AtomicUsize = AtomicUsize::new(0);

/// Looks glibc's `malloc_usable_size` up (at start-up, outside any hook: `dlsym` may
/// call `calloc`, which is served by glibc then).
pub fn resolve_usable_size() {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name; the result is a function
    // pointer or null.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"malloc_usable_size".as_ptr()) };
    USABLE_SIZE.store(f as usize, Ordering::Release);
}

/// The usable size of a glibc block.
///
/// # Safety
/// `p` is null or a live block of glibc's.
pub unsafe fn usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        return 0;
    }
    let f = USABLE_SIZE.load(Ordering::Acquire);
    if f != 0 {
        // SAFETY: `f` is glibc's malloc_usable_size (RTLD_NEXT from this library, which
        // defines its own, finds the next definition: libc's).
        let f: unsafe extern "C" fn(*mut c_void) -> size_t = unsafe { std::mem::transmute(f) };
        // SAFETY: `p` is a live glibc block.
        return unsafe { f(p) };
    }
    // SAFETY: the caller vouches for `p`, a glibc block.
    unsafe { chunk_bytes(p) }.saturating_sub(16)
}

/// The bytes glibc's chunk of `p` occupies, header included: the size word in front
/// of every glibc block, flags masked off. Used for accounting only.
///
/// # Safety
/// `p` is a live block of glibc's (its chunk header is the word before it).
#[inline]
pub unsafe fn chunk_bytes(p: *mut c_void) -> usize {
    // SAFETY: every glibc block is preceded by its chunk's size word.
    unsafe { *(p as *const usize).sub(1) & !7 }
}

/// The global allocator of the shim's own Rust code (the recorder's buffers, the
/// large-block tables): glibc, directly.
pub struct LibcAlloc;

// SAFETY: every method hands the request to glibc's allocator, which returns blocks of
// at least the size asked, aligned as asked (memalign for alignments above 16).
unsafe impl GlobalAlloc for LibcAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= 16 {
            malloc(layout.size()).cast()
        } else {
            memalign(layout.align(), layout.size()).cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= 16 {
            calloc(1, layout.size()).cast()
        } else {
            let p = memalign(layout.align(), layout.size());
            if !p.is_null() {
                // SAFETY: `p` is a fresh block of `layout.size()` bytes.
                unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, layout.size()) };
            }
            p.cast()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, a glibc block.
        unsafe { free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= 16 {
            // SAFETY: `ptr` is a glibc block of ours.
            return unsafe { realloc(ptr.cast(), new_size) }.cast();
        }
        let new = memalign(layout.align(), new_size);
        if !new.is_null() {
            // SAFETY: both blocks are live and hold at least min(old, new) bytes; they
            // are distinct blocks.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new.cast(), layout.size().min(new_size));
                free(ptr.cast());
            }
        }
        new.cast()
    }
}
