//! [`NumaAlloc`]: a [`GlobalAlloc`] that places large allocations with a NUMA policy on
//! huge-page-advised anonymous mappings and hands small ones to the system allocator.
//!
//! ```no_run
//! use hetmem::host_mem::numa_alloc::NumaAlloc;
//!
//! // Buffers of 2 MiB and more land on node 0 (or nowhere); smaller ones are malloc's.
//! #[global_allocator]
//! static ALLOC: NumaAlloc = NumaAlloc::bind(0);
//! # fn main() {}
//! ```
//!
//! # How a large allocation is made
//!
//! An anonymous private `mmap` of the size rounded up to a page, aligned to
//! [`HUGE_PAGE_SIZE`] when it is at least that large (so that every aligned 2 MiB of it
//! can be one transparent huge page) or to `layout.align()` when that is larger (the
//! mapping is over-reserved by `align - page` and the slack unmapped again), advised with
//! `MADV_HUGEPAGE`, then given its policy with `mbind` before any page is touched. Pages
//! are not faulted in here: the program's first touch allocates each one, under the
//! policy, so a bound allocation costs nothing up front and still lands on its node.
//! (Contrast [`HostRegion`](super::HostRegion), which pre-faults because its pages
//! may be pinned for a device.)
//!
//! `dealloc` keeps the block for reuse when it is at most [`NumaAlloc::cache_limit`]
//! (16 MiB by default) and one of [`CACHE_SLOTS`] slots is free ([`BlockCache`]:
//! lock-free), else `munmap`s it. A kept block comes back, pages still faulted in and
//! placed, to the next `alloc` of the same length (not to `alloc_zeroed`, which maps
//! fresh zero pages): repeated large allocations then cost what they cost in glibc's
//! heap, not a mapping and a page fault per 4 KiB. At most `CACHE_SLOTS ×
//! cache_limit` bytes stay held; dropping the allocator gives them back. `realloc`
//! between two large sizes shrinks in place (unmapping
//! the tail) and grows with `mremap`, in place when the address space after the block is
//! free, else `MREMAP_MAYMOVE`, which moves page tables rather than bytes and carries the
//! mapping's policy and `MADV_HUGEPAGE` flag along (the grown part included). A request
//! that crosses the threshold either way is alloc + copy + free.
//!
//! # Rules an allocator lives by
//!
//! Nothing here allocates (no `Vec`, `String`, `format!`, `tracing`: any of them would
//! re-enter the allocator), panics, or blocks on a lock. Node masks are fixed-size
//! ([`FixedNodeMask`], 1024 nodes) on the stack. Every failure is a null return, as the
//! [`GlobalAlloc`] contract asks; `realloc` returning null leaves the old block as it was.
//!
//! # Policies and missing nodes
//!
//! - [`NumaAlloc::bind`]: the contract is "on the node or not at all". A node the kernel
//!   does not have (or that has no memory, or does not fit the 1024-node mask) makes
//!   `mbind` fail, and the allocation returns null. First-touch faults that find the node
//!   full are the kernel's business (reclaim, then the OOM killer), as with any bind.
//! - [`NumaAlloc::preferred`]: the node first, any node when it is full. A node the
//!   kernel refuses (`EINVAL`: it does not exist or has no memory) is a configuration
//!   error, not a preference: the allocation returns null, as with `bind`, rather than
//!   landing wherever first touch puts it. Where the kernel allows no policy at all
//!   (`EPERM` from a seccomp filter, `ENOSYS`), preferred and interleaved allocations
//!   take the default placement.
//! - [`NumaAlloc::interleave_all`]: pages round-robin over the nodes this thread may use
//!   (its cpuset's `mems_allowed`); null if those cannot be read for another reason than
//!   the policies being unavailable altogether.
//!
//! A null return aborts a program whose global allocator this is, with only the size
//! in the message: check the node first, e.g. with
//! [`Topology::check_node`](crate::topology::Topology::check_node), whose error names
//! the nodes there are.
//! - [`NumaAlloc::new`]: default placement (first touch), huge pages only.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;

use hetmem_sys::numa::{self, FixedNodeMask};
use libc::c_void;

use super::block_cache::BlockCache;
use super::{page_size, HUGE_PAGE_SIZE};

/// How many freed large blocks each [`NumaAlloc`] keeps for reuse.
pub const CACHE_SLOTS: usize = 8;

/// Default [`NumaAlloc::cache_limit`]: blocks up to 16 MiB are kept for reuse.
pub const DEFAULT_CACHE_LIMIT: usize = 16 << 20;

/// Default [`NumaAlloc::threshold`]: 2 MiB, one transparent huge page.
///
/// Why there: below one huge page THP can back nothing, so the only gain left is NUMA
/// placement, and the price is a syscall round trip per allocation (`mmap` + `madvise` +
/// `mbind` + `munmap`, a few µs, plus a fresh zeroed page on every first touch) where
/// malloc serves a small request from its free lists in tens of ns. From 2 MiB up the
/// comparison flips: touching the memory itself (zeroing 2 MiB at the first faults)
/// costs tens of µs, so the syscalls are a few percent on top, and glibc's malloc is
/// mmapping blocks this size anyway once they pass its own `M_MMAP_THRESHOLD` (128 KiB,
/// adapting up to 32 MiB). `benches/global_alloc.rs` measures both sides of it.
pub const DEFAULT_THRESHOLD: usize = HUGE_PAGE_SIZE;

/// Where large allocations go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumaAllocPolicy {
    /// The process's default policy: first touch on the faulting CPU's node.
    Default,
    /// Only on this node; null if it cannot be bound.
    Bind(u32),
    /// This node first, others when it is full; null if the kernel refuses the node.
    Preferred(u32),
    /// Round-robin over every node the thread may use.
    InterleaveAll,
}

/// A [`GlobalAlloc`] for NUMA-placed, huge-page-backed large allocations; see the
/// [module docs](self). All constructors are `const`, for use in a `static`.
///
/// The builders (`policy`, `threshold`, `huge_pages`, `cache_limit`) are for setting an
/// allocator up: one that changes placement starts with an empty cache, so that no block
/// placed the old way is handed out (blocks an allocator in use had kept stay mapped).
#[derive(Debug)]
pub struct NumaAlloc {
    policy: NumaAllocPolicy,
    threshold: usize,
    huge_pages: bool,
    cache_limit: usize,
    cache: BlockCache<CACHE_SLOTS>,
}

impl Default for NumaAlloc {
    fn default() -> Self {
        NumaAlloc::new()
    }
}

impl NumaAlloc {
    /// Large allocations with the default placement (first touch), THP-advised.
    pub const fn new() -> NumaAlloc {
        NumaAlloc {
            policy: NumaAllocPolicy::Default,
            threshold: DEFAULT_THRESHOLD,
            huge_pages: true,
            cache_limit: DEFAULT_CACHE_LIMIT,
            cache: BlockCache::new(),
        }
    }

    /// Large allocations only on `node`: null where it cannot be bound.
    pub const fn bind(node: u32) -> NumaAlloc {
        NumaAlloc::new().policy(NumaAllocPolicy::Bind(node))
    }

    /// Large allocations on `node` first, elsewhere when it is full; null where the node
    /// does not exist or has no memory.
    pub const fn preferred(node: u32) -> NumaAlloc {
        NumaAlloc::new().policy(NumaAllocPolicy::Preferred(node))
    }

    /// Large allocations interleaved page by page over the nodes this thread may use.
    pub const fn interleave_all() -> NumaAlloc {
        NumaAlloc::new().policy(NumaAllocPolicy::InterleaveAll)
    }

    /// The same allocator with another policy.
    pub const fn policy(mut self, policy: NumaAllocPolicy) -> NumaAlloc {
        self.policy = policy;
        self.cache = BlockCache::new();
        self
    }

    /// Sizes of at least `bytes` are mapped and placed; smaller ones go to
    /// [`System`]. Default [`DEFAULT_THRESHOLD`]. Zero counts as one: zero-size layouts
    /// always go to [`System`].
    pub const fn threshold(mut self, bytes: usize) -> NumaAlloc {
        self.threshold = if bytes == 0 { 1 } else { bytes };
        self
    }

    /// Freed large blocks of up to `bytes` (rounded to pages) are kept for the next
    /// allocation of the same length, up to [`CACHE_SLOTS`] of them; 0 keeps none.
    /// Default [`DEFAULT_CACHE_LIMIT`].
    pub const fn cache_limit(mut self, bytes: usize) -> NumaAlloc {
        self.cache_limit = bytes;
        self.cache = BlockCache::new();
        self
    }

    /// Whether large mappings of at least [`HUGE_PAGE_SIZE`] are aligned to it and
    /// advised with `MADV_HUGEPAGE` (default true).
    pub const fn huge_pages(mut self, on: bool) -> NumaAlloc {
        self.huge_pages = on;
        self.cache = BlockCache::new();
        self
    }

    /// The policy of large allocations.
    pub const fn placement(&self) -> NumaAllocPolicy {
        self.policy
    }

    /// The size from which allocations are mapped rather than given to [`System`].
    pub const fn threshold_bytes(&self) -> usize {
        self.threshold
    }

    /// Whether an allocation of `size` bytes takes the mapped, NUMA-placed path.
    #[inline]
    pub const fn is_large(&self, size: usize) -> bool {
        size >= self.threshold
    }

    /// Maps and places a large block (or, unless `zeroed`, takes a kept one of the same
    /// length); null on any failure.
    #[cold]
    #[inline(never)]
    fn map_large(&self, size: usize, align: usize, zeroed: bool) -> *mut u8 {
        let page = page_size();
        let Some(map_len) = round_to_page(size, page) else {
            return ptr::null_mut();
        };
        let huge = self.huge_pages && map_len >= HUGE_PAGE_SIZE;
        let mut align = align.max(page);
        if huge {
            align = align.max(HUGE_PAGE_SIZE);
        }
        if !zeroed && map_len <= self.cache_limit {
            if let Some(addr) = self.cache.take(map_len / page, align) {
                return ptr::with_exposed_provenance_mut(addr);
            }
        }
        let ptr = map_aligned(map_len, align, page);
        if ptr.is_null() {
            return ptr;
        }
        if huge {
            advise_huge(ptr, map_len);
        }
        if !self.place(ptr, map_len) {
            // SAFETY: `ptr..ptr+map_len` is the mapping made just above; nothing else
            // knows of it.
            unsafe { libc::munmap(ptr.cast(), map_len) };
            return ptr::null_mut();
        }
        ptr
    }

    /// Gives `ptr..ptr+len` (our own fresh mapping) the policy. False where the
    /// allocation must fail: a policy the kernel refuses (an unknown node, one without
    /// memory), or nodes to interleave over that cannot be read.
    fn place(&self, ptr: *mut u8, len: usize) -> bool {
        let (mode, mask) = match self.policy {
            NumaAllocPolicy::Default => return true,
            NumaAllocPolicy::Bind(n) => match FixedNodeMask::single(n) {
                Some(mask) => (numa::MPOL_BIND, mask),
                None => return false,
            },
            NumaAllocPolicy::Preferred(n) => match FixedNodeMask::single(n) {
                Some(mask) => (numa::MPOL_PREFERRED, mask),
                None => return false,
            },
            NumaAllocPolicy::InterleaveAll => match numa::mems_allowed_fixed() {
                Ok(mask) if !mask.is_empty() => (numa::MPOL_INTERLEAVE, mask),
                // No policies here at all: nothing to interleave over.
                Err(e) if e == libc::EPERM || e == libc::ENOSYS => return true,
                _ => return false,
            },
        };
        // SAFETY: the range is a mapping this allocator just made and owns, no page of
        // which has been touched; `mask` is a live local covering `maxnode - 1` bits.
        let rc = unsafe { numa::mbind(ptr.cast(), len, mode, mask.as_ptr(), mask.maxnode(), 0) };
        match rc {
            Ok(()) => true,
            // No policies at all here (no NUMA, or a seccomp filter): a preference or an
            // interleave has nothing to choose between, so it is not an error; a bind is.
            Err(e) if e == libc::EPERM || e == libc::ENOSYS => {
                !matches!(self.policy, NumaAllocPolicy::Bind(_))
            }
            Err(_) => false,
        }
    }

    /// Keeps or unmaps a large block.
    ///
    /// # Safety
    /// `ptr` is a large block of this allocator, allocated with `size` bytes, that the
    /// caller gives back.
    #[cold]
    #[inline(never)]
    unsafe fn free_large(&self, ptr: *mut u8, size: usize) {
        // Mapped with exactly this length by `map_large` (or trimmed/remapped to it by
        // `remap_large`); the caller's contract says the layout is the same.
        let page = page_size();
        let len = round_to_page(size, page).unwrap_or(0);
        if len <= self.cache_limit && self.cache.put(ptr.expose_provenance(), len / page) {
            return;
        }
        // SAFETY: `ptr..ptr+len` is the caller's block, a mapping of ours it gives back.
        unsafe { libc::munmap(ptr.cast(), len) };
    }

    /// Large to large `realloc`; null (old block intact) on failure.
    #[cold]
    #[inline(never)]
    fn remap_large(&self, old: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let page = page_size();
        // The old size was mapped, so it rounds without overflow.
        let old_len = round_to_page(layout.size(), page).unwrap_or(usize::MAX);
        let Some(new_len) = round_to_page(new_size, page) else {
            return ptr::null_mut();
        };
        if new_len == old_len {
            return old;
        }
        if new_len < old_len {
            // SAFETY: `old + new_len .. old + old_len` is the tail of our own mapping, past
            // the `new_size` bytes the caller keeps.
            let rc = unsafe { libc::munmap(old.add(new_len).cast(), old_len - new_len) };
            return if rc == 0 { old } else { ptr::null_mut() };
        }
        // Grow in place when the address space behind the block is free: no move, and
        // the kernel extends the mapping (its policy and THP advice cover the new part).
        // SAFETY: `old..old+old_len` is our own mapping; without MREMAP_MAYMOVE the kernel
        // either extends it where it is or fails and leaves it alone.
        let p = unsafe { libc::mremap(old.cast(), old_len, new_len, 0) };
        let moved = if p != libc::MAP_FAILED {
            p
        } else if layout.align() <= page {
            // Move: page tables, not bytes. The new mapping keeps the old one's policy
            // and flags (mremap copies the VMA), so the grown part is bound too.
            // SAFETY: as above; with MREMAP_MAYMOVE the kernel may pick a new address,
            // and on failure the old mapping is unchanged.
            unsafe { libc::mremap(old.cast(), old_len, new_len, libc::MREMAP_MAYMOVE) }
        } else {
            // mremap only promises page alignment: copy into a mapping that honours
            // the larger one.
            libc::MAP_FAILED
        };
        if moved != libc::MAP_FAILED {
            let p = moved.cast::<u8>();
            if self.huge_pages && new_len >= HUGE_PAGE_SIZE {
                advise_huge(p, new_len);
            }
            return p;
        }
        // SAFETY: realloc's contract makes `new_size` rounded up to `layout.align()` fit
        // in isize, so this is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: forwarded to our own alloc/dealloc with the caller's guarantees.
        unsafe { self.move_to(old, layout, new_layout) }
    }

    /// realloc by alloc + copy + free; null (old block intact) if the alloc fails.
    ///
    /// # Safety
    /// `old` was allocated by `self` with `layout`; `new_layout` is a valid layout of
    /// non-zero size.
    unsafe fn move_to(&self, old: *mut u8, layout: Layout, new_layout: Layout) -> *mut u8 {
        // SAFETY: `new_layout` has non-zero size (the caller's guarantee).
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live, distinct allocations of at least the copied
            // length; `old` is freed with the layout it was allocated with.
            unsafe {
                ptr::copy_nonoverlapping(old, new, layout.size().min(new_layout.size()));
                self.dealloc(old, layout);
            }
        }
        new
    }
}

impl Drop for NumaAlloc {
    fn drop(&mut self) {
        // A static allocator is never dropped; one made as a value gives its kept
        // blocks back.
        let page = page_size();
        self.cache.drain(|addr, pages| {
            // SAFETY: a kept block is a whole mapping of ours that nothing refers to
            // (its owner freed it), `pages` pages long.
            unsafe { libc::munmap(ptr::with_exposed_provenance_mut(addr), pages * page) };
        });
    }
}

// Why the contract holds: small layouts are forwarded to `System` unchanged (alloc, alloc_zeroed,
// realloc, dealloc all decide by `layout.size()`, and `realloc` by the old and new size,
// so a block always returns to the allocator that made it). Large blocks are private
// anonymous mappings of exactly `size` rounded up to a page, aligned to at least
// `layout.align()` (zero-filled by the kernel for `alloc_zeroed`, which never takes a
// kept block), owned by the caller until `dealloc` keeps or unmaps exactly that length;
// a kept block is handed out again only for that same length and an alignment it has,
// and the cache's compare-and-swap hands it to one caller only; `realloc` keeps the first `min(old, new)` bytes (mremap
// moves the pages themselves, the copy path copies them). Nothing here allocates, so
// installing it as `#[global_allocator]` cannot recurse, and nothing panics.
// SAFETY: as argued just above: every block returns to the allocator that made it, with
// the size and alignment asked for, valid until it is freed.
unsafe impl GlobalAlloc for NumaAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if self.is_large(layout.size()) {
            self.map_large(layout.size(), layout.align(), false)
        } else {
            // SAFETY: the caller's layout, forwarded as is.
            unsafe { System.alloc(layout) }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if self.is_large(layout.size()) {
            // Fresh anonymous pages read as zero (a kept block would need zeroing).
            self.map_large(layout.size(), layout.align(), true)
        } else {
            // SAFETY: the caller's layout, forwarded as is.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if self.is_large(layout.size()) {
            // SAFETY: the caller gives back a large block of ours with its layout.
            unsafe { self.free_large(ptr, layout.size()) }
        } else {
            // SAFETY: a small block comes from `System` with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match (self.is_large(layout.size()), self.is_large(new_size)) {
            // SAFETY: a small block from `System`, resized by it under the caller's terms.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            (true, true) => self.remap_large(ptr, layout, new_size),
            _ => {
                // SAFETY: the caller guarantees `new_size` rounded up to the alignment
                // fits in isize, so this is a valid, non-zero layout.
                let new_layout =
                    unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
                // SAFETY: `ptr` is ours with `layout`; crossing the threshold changes
                // which allocator owns the block, so copy.
                unsafe { self.move_to(ptr, layout, new_layout) }
            }
        }
    }
}

/// `size` rounded up to whole pages, if that fits a mapping (at most `isize::MAX`).
#[inline]
fn round_to_page(size: usize, page: usize) -> Option<usize> {
    let len = size.checked_add(page - 1)? & !(page - 1);
    (len <= isize::MAX as usize).then_some(len)
}

/// An anonymous read-write mapping of `len` bytes (a page multiple) at an address that is
/// a multiple of `align` (a power of two, at least `page`), or null. Reserves
/// `len + align - page` and unmaps the slack at both ends.
fn map_aligned(len: usize, align: usize, page: usize) -> *mut u8 {
    let Some(reserve) = len.checked_add(align - page) else {
        return ptr::null_mut();
    };
    // No MAP_NORESERVE: let the kernel's overcommit check refuse hopeless sizes here,
    // as malloc's own mappings do.
    // SAFETY: an anonymous private mapping at a kernel-chosen address touches no existing
    // memory; the result is checked before use.
    let addr = unsafe {
        libc::mmap(
            ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return ptr::null_mut();
    }
    let start = addr as usize;
    // `start + align - 1` cannot overflow: the reservation itself ends below it.
    let aligned = (start + align - 1) & !(align - 1);
    let head = aligned - start;
    let tail = reserve - head - len;
    for (at, n) in [(start, head), (aligned + len, tail)] {
        if n != 0 {
            // SAFETY: `at..at+n` is slack of the reservation just made, outside the part
            // we keep; nothing refers to it. A failure only leaves it mapped (a leak of
            // address space, not of anything reachable).
            unsafe { libc::munmap(at as *mut c_void, n) };
        }
    }
    aligned as *mut u8
}

/// `MADV_HUGEPAGE` on our own mapping. Errors are ignored: with THP off the memory works
/// the same on base pages.
fn advise_huge(ptr: *mut u8, len: usize) {
    // SAFETY: the range is a mapping of ours; the advice only changes how the kernel
    // backs it, never its contents.
    unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_are_const() {
        static A: NumaAlloc = NumaAlloc::bind(3)
            .threshold(0)
            .huge_pages(false)
            .cache_limit(0);
        assert_eq!(A.placement(), NumaAllocPolicy::Bind(3));
        assert_eq!(A.threshold_bytes(), 1);
        assert!(!A.is_large(0) && A.is_large(1));
        let d = NumaAlloc::default();
        assert_eq!(
            (d.placement(), d.threshold_bytes(), d.cache_limit),
            (
                NumaAllocPolicy::Default,
                DEFAULT_THRESHOLD,
                DEFAULT_CACHE_LIMIT
            )
        );
        assert_eq!(NumaAlloc::new().threshold_bytes(), DEFAULT_THRESHOLD);
        assert_eq!(
            NumaAlloc::interleave_all().placement(),
            NumaAllocPolicy::InterleaveAll
        );
    }

    #[test]
    fn rounding() {
        assert_eq!(round_to_page(1, 4096), Some(4096));
        assert_eq!(round_to_page(4096, 4096), Some(4096));
        assert_eq!(round_to_page(usize::MAX, 4096), None);
        assert_eq!(round_to_page(isize::MAX as usize, 4096), None);
    }
}
