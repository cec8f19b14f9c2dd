//! `NumaAlloc` called directly (not installed): placement proved by asking the kernel
//! where pages are (`move_pages` in query mode) and which policy a mapping has
//! (`get_mempolicy(MPOL_F_ADDR)`), not by trusting the request.

use crate::common::smaps;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;

use hetmem::host_mem::numa_alloc::{NumaAlloc, NumaAllocPolicy, DEFAULT_THRESHOLD};
use hetmem::host_mem::{page_size, HUGE_PAGE_SIZE};
use hetmem_sys::numa::{self, FixedNodeMask};
use libc::c_void;

const MIB: usize = 1 << 20;

/// The node of every page of `ptr..ptr+len` (a negative errno for pages the kernel could
/// not report: `-ENOENT` for not yet faulted in).
fn page_nodes(ptr: *const u8, len: usize) -> Vec<i32> {
    let page = page_size();
    let addrs: Vec<*const c_void> = (0..len.div_ceil(page))
        .map(|i| ptr.wrapping_add(i * page).cast())
        .collect();
    let mut status = vec![i32::MIN; addrs.len()];
    numa::query_page_nodes(&addrs, &mut status).expect("move_pages query");
    status
}

/// The policy mode and node set of the mapping holding `ptr`.
fn policy_at(ptr: *const u8) -> (i32, FixedNodeMask) {
    numa::policy_of_address(ptr.cast()).expect("get_mempolicy(MPOL_F_ADDR)")
}

/// A node id this kernel does not have.
fn missing_node() -> u32 {
    (1..1024)
        .find(|n| !Path::new(&format!("/sys/devices/system/node/node{n}")).exists())
        .expect("a free node id")
}

/// Writes one byte per page (the first touch that places it) plus a pattern at both ends.
///
/// # Safety
/// `ptr..ptr+len` must be writable memory owned by the caller.
unsafe fn touch(ptr: *mut u8, len: usize) {
    for off in (0..len).step_by(page_size()) {
        // SAFETY: `off < len`, inside the caller's block.
        unsafe { ptr.add(off).write((off / page_size()) as u8) };
    }
    // SAFETY: as above; `len >= 1`.
    unsafe { ptr.add(len - 1).write(0xA5) };
}

fn fill(ptr: *mut u8, len: usize) {
    // SAFETY: every caller passes a live block of at least `len` bytes it owns.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
}

fn check(ptr: *const u8, len: usize) {
    // SAFETY: every caller passes a live block of at least `len` initialised bytes.
    let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
    if let Some(i) = bytes
        .iter()
        .enumerate()
        .position(|(i, &b)| b != (i % 251) as u8)
    {
        panic!("byte {i} of {len} lost: {}", bytes[i]);
    }
}

fn thp_madvise_works() -> bool {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{f}"))
            .unwrap_or_default()
    };
    let (enabled, defrag) = (read("enabled"), read("defrag"));
    !enabled.is_empty()
        && !enabled.contains("[never]")
        && (defrag.contains("madvise]") || defrag.contains("[always]"))
}

#[test]
fn bind0_pages_are_on_node0_after_first_touch() {
    let a = NumaAlloc::bind(0);
    let len = 8 * MIB;
    let layout = Layout::from_size_align(len, 8).unwrap();
    // SAFETY: non-zero layout.
    let p = unsafe { a.alloc(layout) };
    assert!(!p.is_null());
    assert_eq!(
        p as usize % HUGE_PAGE_SIZE,
        0,
        "large blocks are 2 MiB aligned"
    );

    // The kernel holds a bind-to-{0} policy for the mapping.
    let (mode, mask) = policy_at(p);
    assert_eq!(mode, numa::MPOL_BIND);
    assert_eq!(mask, FixedNodeMask::single(0).unwrap());
    // Nothing is faulted in yet: placement happens at the program's first touch.
    let before = page_nodes(p, len);
    assert!(
        before.iter().all(|&n| n == -libc::ENOENT),
        "pre-faulted? {before:?}"
    );

    // SAFETY: `p` is `len` writable bytes we own.
    unsafe { touch(p, len) };
    let nodes = page_nodes(p, len);
    assert_eq!(nodes.len(), len / page_size());
    assert!(nodes.iter().all(|&n| n == 0), "page nodes {nodes:?}");

    // THP advice is on the mapping, and where THP works on madvised memory the aligned,
    // touched block is backed by huge pages.
    let (flags, huge_kb) = smaps::entry(p as usize);
    assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
    if thp_madvise_works() {
        assert!(huge_kb >= 2048, "AnonHugePages {huge_kb} kB");
    }
    // SAFETY: allocated above with this layout.
    unsafe { a.dealloc(p, layout) };
}

#[test]
fn small_allocations_are_the_system_allocators() {
    let a = NumaAlloc::bind(0);
    // Just under the threshold: System's (unbound); at it: ours (bound to node 0).
    let below = Layout::from_size_align(DEFAULT_THRESHOLD - 1, 8).unwrap();
    let at = Layout::from_size_align(DEFAULT_THRESHOLD, 8).unwrap();
    let tiny = Layout::from_size_align(24, 8).unwrap();
    // SAFETY: non-zero layouts.
    let (pb, pa, pt) = unsafe { (a.alloc(below), a.alloc(at), a.alloc(tiny)) };
    assert!(!pb.is_null() && !pa.is_null() && !pt.is_null());
    assert_eq!(policy_at(pb).0, numa::MPOL_DEFAULT);
    assert_eq!(policy_at(pt).0, numa::MPOL_DEFAULT);
    assert_eq!(policy_at(pa).0, numa::MPOL_BIND);
    // A tiny block lives inside malloc's heap: not at the start of a page, as a mapping
    // of its own would be.
    assert_ne!(pt as usize % page_size(), 0);
    fill(pt, 24);
    fill(pb, below.size());
    check(pt, 24);
    // They really are System's blocks: System frees them (glibc would abort on a
    // pointer it did not hand out).
    // SAFETY: if NumaAlloc forwarded them to System, these are System's blocks with
    // these layouts; the assertions above are what this test proves.
    unsafe {
        System.dealloc(pt, tiny);
        System.dealloc(pb, below);
        a.dealloc(pa, at);
    }
    // alloc_zeroed on both paths gives zeros.
    for size in [100, DEFAULT_THRESHOLD + 1] {
        let l = Layout::from_size_align(size, 8).unwrap();
        // SAFETY: non-zero layout.
        let p = unsafe { a.alloc_zeroed(l) };
        // SAFETY: `p` is `size` bytes we own, zeroed.
        assert!(unsafe { std::slice::from_raw_parts(p, size) }
            .iter()
            .all(|&b| b == 0));
        // SAFETY: allocated above with `l`.
        unsafe { a.dealloc(p, l) };
    }
}

#[test]
fn realloc_across_and_within_the_threshold_keeps_contents() {
    let threshold = 64 << 10;
    let a = NumaAlloc::bind(0).threshold(threshold);
    let align = 16;
    let mut layout = Layout::from_size_align(1000, align).unwrap();
    // SAFETY: non-zero layout.
    let mut p = unsafe { a.alloc(layout) };
    fill(p, layout.size());
    // small -> small, up across, large grow, large shrink, large -> same pages, down across.
    for new_size in [
        30_000,
        threshold + 1,
        10 * MIB + 123,
        3 * MIB,
        3 * MIB - 1,
        40 * MIB,
        threshold,
        threshold - 1,
        100,
    ] {
        // SAFETY: `p` was allocated by `a` with `layout`; new_size is non-zero and small.
        let q = unsafe { a.realloc(p, layout, new_size) };
        assert!(!q.is_null(), "realloc to {new_size}");
        check(q, layout.size().min(new_size));
        let expect = if a.is_large(new_size) {
            numa::MPOL_BIND
        } else {
            numa::MPOL_DEFAULT
        };
        // The policy holds for the whole block, the grown part included.
        assert_eq!(policy_at(q).0, expect, "{new_size}");
        assert_eq!(
            policy_at(q.wrapping_add(new_size - 1)).0,
            expect,
            "{new_size}"
        );
        layout = Layout::from_size_align(new_size, align).unwrap();
        fill(q, new_size);
        if a.is_large(new_size) {
            let nodes = page_nodes(q, new_size);
            assert!(nodes.iter().all(|&n| n == 0), "{new_size}: {nodes:?}");
        }
        p = q;
    }
    // SAFETY: `p` is ours with `layout`.
    unsafe { a.dealloc(p, layout) };
}

/// Maps an inaccessible page right behind `ptr..ptr+len` (rounded to pages) so that the
/// block cannot grow in place; returns it for unmapping (or null if the address was taken,
/// which blocks growth just the same).
fn block_growth(ptr: *mut u8, len: usize) -> *mut c_void {
    let end = ptr.wrapping_add(len.div_ceil(page_size()) * page_size());
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the page is new.
    let g = unsafe {
        libc::mmap(
            end.cast(),
            page_size(),
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if g == libc::MAP_FAILED || g != end.cast() {
        if g != libc::MAP_FAILED {
            // SAFETY: an old kernel placed our hint elsewhere: that page is ours.
            unsafe { libc::munmap(g, page_size()) };
        }
        return std::ptr::null_mut();
    }
    g
}

#[test]
fn realloc_that_must_move_keeps_policy_and_contents() {
    let a = NumaAlloc::bind(0);
    let old = Layout::from_size_align(4 * MIB, 8).unwrap();
    // SAFETY: non-zero layout.
    let p = unsafe { a.alloc(old) };
    fill(p, old.size());
    let guard = block_growth(p, old.size());
    let new_size = 16 * MIB;
    // SAFETY: ours, with `old`.
    let q = unsafe { a.realloc(p, old, new_size) };
    assert!(!q.is_null());
    assert_ne!(q, p, "the guard page forces a move");
    check(q, old.size());
    // mremap moved the mapping with its policy: the grown tail is bound as well.
    assert_eq!(policy_at(q.wrapping_add(new_size - 1)).0, numa::MPOL_BIND);
    // SAFETY: `q` is `new_size` bytes we own.
    unsafe { touch(q, new_size) };
    assert!(page_nodes(q, new_size).iter().all(|&n| n == 0));
    let (flags, _) = smaps::entry(q as usize + new_size - 1);
    assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
    // SAFETY: ours, with the new layout.
    unsafe { a.dealloc(q, Layout::from_size_align(new_size, 8).unwrap()) };
    if !guard.is_null() {
        // SAFETY: the guard page mapped by block_growth.
        unsafe { libc::munmap(guard, page_size()) };
    }

    // An alignment above a page cannot go through mremap (page-aligned only): copied.
    let align = 8 * MIB;
    let old = Layout::from_size_align(3 * MIB, align).unwrap();
    // SAFETY: non-zero layout.
    let p = unsafe { a.alloc(old) };
    assert_eq!(p as usize % align, 0);
    fill(p, old.size());
    let guard = block_growth(p, old.size());
    // SAFETY: ours, with `old`.
    let q = unsafe { a.realloc(p, old, 20 * MIB) };
    assert!(!q.is_null());
    assert_eq!(q as usize % align, 0);
    check(q, old.size());
    assert_eq!(policy_at(q).0, numa::MPOL_BIND);
    // SAFETY: ours, with the new layout.
    unsafe { a.dealloc(q, Layout::from_size_align(20 * MIB, align).unwrap()) };
    if !guard.is_null() {
        // SAFETY: the guard page mapped by block_growth.
        unsafe { libc::munmap(guard, page_size()) };
    }
}

#[test]
fn zero_size_huge_align_and_absurd_sizes() {
    for a in [NumaAlloc::new(), NumaAlloc::bind(0).threshold(0)] {
        // Zero-size layouts (outside GlobalAlloc's contract for callers, defined here:
        // they always go to System).
        assert!(!a.is_large(0));
        let zero = Layout::from_size_align(0, 1).unwrap();
        // SAFETY: NumaAlloc forwards zero sizes to System, which accepts them.
        let p = unsafe { a.alloc(zero) };
        if !p.is_null() {
            // SAFETY: as above.
            unsafe { a.dealloc(p, zero) };
        }
    }
    let a = NumaAlloc::bind(0);
    // Huge alignment on both paths.
    for (size, align) in [(64, MIB), (4 * MIB, 64 * MIB), (HUGE_PAGE_SIZE, 1 << 30)] {
        let l = Layout::from_size_align(size, align).unwrap();
        // SAFETY: non-zero layout.
        let p = unsafe { a.alloc(l) };
        assert!(!p.is_null(), "{size} align {align}");
        assert_eq!(p as usize % align, 0, "{size} align {align}");
        fill(p, size);
        check(p, size);
        // SAFETY: allocated above with `l`.
        unsafe { a.dealloc(p, l) };
    }
    // Absurd sizes: null, no panic.
    for (size, align) in [
        (isize::MAX as usize, 1),
        (1 << 60, 8),
        (1 << 62, 1 << 62),
        (isize::MAX as usize - 4095, 4096),
    ] {
        let l = Layout::from_size_align(size, align).unwrap();
        // SAFETY: non-zero layouts.
        let (p, z) = unsafe { (a.alloc(l), a.alloc_zeroed(l)) };
        assert!(p.is_null() && z.is_null(), "{size} align {align}");
    }
    // A realloc to an absurd size fails and leaves the block as it was.
    let l = Layout::from_size_align(4 * MIB, 8).unwrap();
    // SAFETY: non-zero layout.
    let p = unsafe { a.alloc(l) };
    fill(p, l.size());
    // SAFETY: ours with `l`; the size is a valid (if hopeless) layout size.
    assert!(unsafe { a.realloc(p, l, 1 << 60) }.is_null());
    check(p, l.size());
    // SAFETY: still ours with `l`.
    unsafe { a.dealloc(p, l) };
}

#[test]
fn bind_or_prefer_a_missing_node_is_null() {
    let n = missing_node();
    let large = Layout::from_size_align(4 * MIB, 8).unwrap();
    let small = Layout::from_size_align(256, 8).unwrap();
    for a in [NumaAlloc::bind(n), NumaAlloc::bind(u32::MAX)] {
        // SAFETY: non-zero layouts.
        unsafe {
            assert!(a.alloc(large).is_null(), "{a:?}");
            assert!(a.alloc_zeroed(large).is_null(), "{a:?}");
            // Small allocations are System's and do not care.
            let p = a.alloc(small);
            assert!(!p.is_null());
            a.dealloc(p, small);
            // Growing a small block across the threshold fails; the block stays.
            let p = a.alloc(small);
            fill(p, 256);
            assert!(a.realloc(p, small, 4 * MIB).is_null());
            check(p, 256);
            a.dealloc(p, small);
        }
    }
    // Preferred to a node the kernel refuses is refused too, never a silent first touch.
    for a in [NumaAlloc::preferred(n), NumaAlloc::preferred(u32::MAX)] {
        // SAFETY: non-zero layouts.
        unsafe {
            assert!(a.alloc(large).is_null(), "{a:?}");
            assert!(a.alloc_zeroed(large).is_null(), "{a:?}");
            let p = a.alloc(small);
            assert!(!p.is_null(), "small ones are System's");
            a.dealloc(p, small);
        }
    }
    // Preferred to a real node is a preferred policy.
    let a = NumaAlloc::preferred(0);
    // SAFETY: non-zero layout.
    let p = unsafe { a.alloc(large) };
    let (mode, mask) = policy_at(p);
    assert_eq!(mode, numa::MPOL_PREFERRED);
    assert!(mask.contains(0));
    // SAFETY: ours, 4 MiB.
    unsafe { touch(p, large.size()) };
    assert!(page_nodes(p, large.size()).iter().all(|&n| n == 0));
    // SAFETY: ours with `large`.
    unsafe { a.dealloc(p, large) };
}

#[test]
fn interleave_all_and_default() {
    let allowed = numa::mems_allowed_fixed().unwrap();
    let len = 8 * MIB;
    let l = Layout::from_size_align(len, 8).unwrap();

    let a = NumaAlloc::interleave_all();
    assert_eq!(a.placement(), NumaAllocPolicy::InterleaveAll);
    // SAFETY: non-zero layout.
    let p = unsafe { a.alloc(l) };
    let (mode, mask) = policy_at(p);
    assert_eq!(mode, numa::MPOL_INTERLEAVE);
    assert_eq!(mask, allowed);
    // SAFETY: ours, `len` bytes.
    unsafe { touch(p, len) };
    for n in page_nodes(p, len) {
        assert!(n >= 0 && allowed.contains(n as u32), "page on {n}");
    }
    // SAFETY: ours with `l`.
    unsafe { a.dealloc(p, l) };

    // Default policy, and THP advice only when asked for.
    for (a, hg) in [
        (NumaAlloc::new(), true),
        (NumaAlloc::new().huge_pages(false), false),
    ] {
        // SAFETY: non-zero layout.
        let p = unsafe { a.alloc(l) };
        assert_eq!(policy_at(p).0, numa::MPOL_DEFAULT);
        let (flags, _) = smaps::entry(p as usize);
        assert_eq!(flags.split_whitespace().any(|f| f == "hg"), hg, "{flags}");
        // SAFETY: ours, `len` bytes.
        unsafe { touch(p, len) };
        assert!(page_nodes(p, len).iter().all(|&n| n >= 0));
        // SAFETY: ours with `l`.
        unsafe { a.dealloc(p, l) };
    }
}

#[test]
fn threads_hammer_both_paths() {
    static A: NumaAlloc = NumaAlloc::bind(0).threshold(256 << 10);
    std::thread::scope(|s| {
        for t in 0..4usize {
            s.spawn(move || {
                for i in 0..200usize {
                    let size = if i % 10 == 0 {
                        (256 << 10) + i * 4096 + t
                    } else {
                        8 + (i * 37 + t) % 4000
                    };
                    let l = Layout::from_size_align(size, 16).unwrap();
                    // SAFETY: non-zero layout.
                    let p = unsafe { A.alloc(l) };
                    assert!(!p.is_null());
                    fill(p, size);
                    // SAFETY: ours with `l`, grown to a valid size.
                    let q = unsafe { A.realloc(p, l, size * 2) };
                    assert!(!q.is_null());
                    check(q, size);
                    // SAFETY: ours with the grown layout.
                    unsafe { A.dealloc(q, Layout::from_size_align(size * 2, 16).unwrap()) };
                }
            });
        }
    });
}

/// A freed block of up to the cache limit comes back to the next allocation of its
/// length, pages and placement kept; `alloc_zeroed` never gets one, nor does another
/// length; with no cache, freed blocks are unmapped.
#[test]
fn freed_blocks_are_kept_for_the_same_length() {
    let a = NumaAlloc::bind(0);
    let l4 = Layout::from_size_align(4 * MIB, 8).unwrap();
    let l6 = Layout::from_size_align(6 * MIB, 8).unwrap();
    // SAFETY: non-zero layouts; every block is freed with the layout it was made with.
    unsafe {
        let p = a.alloc(l4);
        fill(p, l4.size());
        a.dealloc(p, l4);
        let q = a.alloc(l4);
        assert_eq!(q, p, "the kept block comes back");
        check(q, l4.size());
        assert_eq!(policy_at(q).0, numa::MPOL_BIND, "still bound");
        a.dealloc(q, l4);
        // Another length maps anew; zeroed memory is never a kept block.
        let r = a.alloc(l6);
        assert_ne!(r, p);
        let z = a.alloc_zeroed(l4);
        assert_ne!(z, p);
        assert!(std::slice::from_raw_parts(z, l4.size())
            .iter()
            .all(|&b| b == 0));
        a.dealloc(z, l4);
        a.dealloc(r, l6);
    }
    drop(a); // unmaps the blocks it kept
             // Rebuilt with another placement, an allocator hands out no block placed the old way.
    let first = NumaAlloc::new();
    // SAFETY: non-zero layout; freed with it.
    unsafe {
        let p = first.alloc(l4);
        first.dealloc(p, l4);
        let bound = first.policy(NumaAllocPolicy::Bind(0));
        let q = bound.alloc(l4);
        assert_eq!(
            policy_at(q).0,
            numa::MPOL_BIND,
            "a block of the old placement"
        );
        bound.dealloc(q, l4);
    }
    // With no cache a freed block is unmapped: the next one of its length is fresh
    // zero pages, never the old bytes.
    let none = NumaAlloc::bind(0).cache_limit(0);
    // SAFETY: non-zero layout; each block freed with it.
    unsafe {
        let p = none.alloc(l4);
        fill(p, l4.size());
        none.dealloc(p, l4);
        let q = none.alloc(l4);
        assert!(std::slice::from_raw_parts(q, l4.size())
            .iter()
            .all(|&b| b == 0));
        none.dealloc(q, l4);
    }
}
