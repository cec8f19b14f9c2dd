//! The large path: requests at or above the threshold, served from one reserved range of
//! address space (the arena), so that telling hetmem's blocks from the small path's at
//! `free` is one subtraction and one comparison (`owns`), with no lock and no table.
//!
//! The arena is reserved once (`PROT_NONE`, `MAP_NORESERVE`: address space only, no
//! memory) and aligned to 1 GiB. A block is a run of it mapped read-write with
//! `MAP_FIXED` (fresh zero pages), advised `MADV_HUGEPAGE` when it spans a huge page
//! (its start is then 2 MiB-aligned, so every whole 2 MiB of it can be one), and given
//! the NUMA policy with `mbind` before any page is touched; the program's first touch
//! places each page. A freed block is either kept in a small cache (bounded in bytes and
//! count; best fit, the surplus tail given back) or mapped `PROT_NONE` again, which drops
//! its pages without ever leaving a hole another mapping could take: nothing in the
//! arena is ever unmapped. A cache miss empties the cache first, so memory held for
//! reuse never adds to a peak that glibc would not have had. `realloc` grows in place
//! when the range after the block is free, else moves the pages (page tables, not bytes:
//! `mremap` with `MREMAP_DONTUNMAP` onto a new run, the old run then mapped `PROT_NONE`),
//! copying only where the kernel cannot move them.
//!
//! Everything here runs under one lock (a futex lock held across `fork` by the atfork
//! handlers) and allocates only through the shim's own global allocator (glibc's
//! `__libc_malloc`), never through the interposed entry points.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use hetmem_sys::numa::{self, FixedNodeMask};
use libc::c_void;
use rustc_hash::FxHashMap;

use crate::config::{Config, Policy};
use crate::lock::Lock;

/// One transparent huge page.
pub const HUGE: usize = 2 << 20;
/// Arena alignment (the largest alignment served without over-reserving).
const ARENA_ALIGN: usize = 1 << 30;
/// Freed blocks kept at most.
const CACHE_SLOTS: usize = 16;
/// Stats slots: nodes 0..NODES-1, and one for "no single node" (first touch, interleave).
pub const NODES: usize = 64;

static BASE: AtomicUsize = AtomicUsize::new(0);
static LEN: AtomicUsize = AtomicUsize::new(0);

/// Whether `p` is a block of the large path: O(1), lock-free, two loads and a compare.
#[inline(always)]
pub(crate) fn owns(p: *mut c_void) -> bool {
    // LEN is published after BASE: a thread that sees the length sees the base.
    let len = LEN.load(Ordering::Acquire);
    (p as usize).wrapping_sub(BASE.load(Ordering::Relaxed)) < len
}

/// The arena's range, for tests and stats.
#[cfg(test)]
fn arena() -> (usize, usize) {
    (BASE.load(Ordering::Relaxed), LEN.load(Ordering::Relaxed))
}

/// A live block.
#[derive(Debug, Clone, Copy)]
struct Block {
    /// Mapped bytes (a multiple of the page).
    len: usize,
    /// Bytes asked for.
    size: usize,
    /// Alignment of its start.
    align: usize,
}

/// Counters of one node (or of "no single node").
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeStats {
    /// Bytes asked for, live now.
    pub current: u64,
    /// Highest `current`.
    pub peak: u64,
    /// Allocations (malloc-like calls and reallocs that moved here).
    pub calls: u64,
    /// Frees.
    pub frees: u64,
}

/// Counters of the large path.
#[derive(Debug, Clone, Copy)]
pub struct LargeStats {
    /// Per node, and `[NODES]` for blocks with no single node.
    pub nodes: [NodeStats; NODES + 1],
    /// Bytes asked for, live now, all nodes.
    pub current: u64,
    /// Highest `current`.
    pub peak: u64,
    /// Mapped bytes live now (page-rounded), and in the cache.
    pub mapped: u64,
    /// Bytes held in the cache of freed blocks.
    pub cached: u64,
    /// Allocations served from the cache.
    pub cache_hits: u64,
    /// Allocations that mapped fresh memory.
    pub fresh: u64,
    /// `realloc`s: in place (shrunk or grown), moved by remapping, moved by copying.
    pub realloc_in_place: u64,
    /// See `realloc_in_place`.
    pub realloc_moved: u64,
    /// See `realloc_in_place`.
    pub realloc_copied: u64,
    /// `mbind` calls the kernel refused (the block kept its default placement).
    pub placement_failures: u64,
    /// Large requests the arena could not serve (given to the small path instead).
    pub fallbacks: u64,
    /// `free` of an address inside the arena that is no live block (ignored).
    pub bad_frees: u64,
}

impl Default for LargeStats {
    fn default() -> Self {
        LargeStats {
            nodes: [NodeStats::default(); NODES + 1],
            current: 0,
            peak: 0,
            mapped: 0,
            cached: 0,
            cache_hits: 0,
            fresh: 0,
            realloc_in_place: 0,
            realloc_moved: 0,
            realloc_copied: 0,
            placement_failures: 0,
            fallbacks: 0,
            bad_frees: 0,
        }
    }
}

/// The large path's state.
struct Large {
    page: usize,
    huge: bool,
    cache_limit: usize,
    /// `mbind` mode and mask; `None`: default placement.
    policy: Option<(i32, FixedNodeMask)>,
    /// The stats slot of every block.
    node: usize,
    /// Free runs of the arena (reserved, `PROT_NONE`): start → length.
    free: BTreeMap<usize, usize>,
    live: FxHashMap<usize, Block>,
    cache: Vec<(usize, usize)>,
    cache_bytes: usize,
    stats: LargeStats,
}

static LARGE: Lock<Option<Large>> = Lock::new(None);

fn round_up(n: usize, to: usize) -> Option<usize> {
    Some(n.checked_add(to - 1)? & !(to - 1))
}

/// Reserves the arena and sets the large path up; false (with the reason) where it
/// cannot be.
pub fn init(cfg: &Config) -> Result<(), String> {
    // SAFETY: sysconf has no memory preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let mut want = cfg.arena;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live local the kernel writes.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } == 0
        && lim.rlim_cur != libc::RLIM_INFINITY
    {
        // A reservation counts against an address-space limit: take a quarter of it.
        want = want.min((lim.rlim_cur as usize / 4) & !(ARENA_ALIGN - 1));
    }
    let (base, len) = loop {
        if want < ARENA_ALIGN {
            return Err("cannot reserve address space for large blocks".into());
        }
        let total = want + ARENA_ALIGN;
        // SAFETY: a fresh anonymous reservation; no existing mapping is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            want /= 2;
            continue;
        }
        let start = p as usize;
        let base = (start + ARENA_ALIGN - 1) & !(ARENA_ALIGN - 1);
        // SAFETY: both trims are parts of the reservation just made, outside
        // `base..base+want`.
        unsafe {
            if base > start {
                libc::munmap(p, base - start);
            }
            let end = base + want;
            if start + total > end {
                libc::munmap(end as *mut c_void, start + total - end);
            }
        }
        break (base, want);
    };
    let policy = match &cfg.policy {
        Policy::Default => None,
        Policy::Bind(n) => FixedNodeMask::single(*n).map(|m| (numa::MPOL_BIND, m)),
        Policy::Preferred(n) => FixedNodeMask::single(*n).map(|m| (numa::MPOL_PREFERRED, m)),
        Policy::Interleave(nodes) => {
            let mask = if nodes.is_empty() {
                numa::mems_allowed_fixed().ok()
            } else {
                let mut m = FixedNodeMask::empty();
                for &n in nodes {
                    if let Some(s) = FixedNodeMask::single(n) {
                        m = or(m, s);
                    }
                }
                Some(m)
            };
            mask.filter(|m| !m.is_empty())
                .map(|m| (numa::MPOL_INTERLEAVE, m))
        }
    };
    let node = match &cfg.policy {
        Policy::Bind(n) | Policy::Preferred(n) if (*n as usize) < NODES => *n as usize,
        _ => NODES,
    };
    let mut free = BTreeMap::new();
    free.insert(base, len);
    LARGE.with(|l| {
        *l = Some(Large {
            page,
            huge: cfg.huge,
            cache_limit: cfg.cache,
            policy,
            node,
            free,
            live: FxHashMap::default(),
            cache: Vec::with_capacity(CACHE_SLOTS),
            cache_bytes: 0,
            stats: LargeStats::default(),
        })
    });
    BASE.store(base, Ordering::Relaxed);
    LEN.store(len, Ordering::Release);
    Ok(())
}

/// `a ∪ b`.
fn or(a: FixedNodeMask, b: FixedNodeMask) -> FixedNodeMask {
    let mut out = a;
    let w = out.as_mut_ptr();
    for i in 0..numa::FIXED_MASK_WORDS {
        // SAFETY: both masks hold FIXED_MASK_WORDS words; `out` is a local copy.
        unsafe { *w.add(i) |= *b.as_ptr().add(i) };
    }
    out
}

/// `fork` handlers: hold the lock across the fork, free it on both sides.
pub fn fork_prepare() {
    LARGE.lock();
}
/// See [`fork_prepare`].
pub fn fork_parent() {
    LARGE.unlock();
}
/// See [`fork_prepare`].
pub fn fork_child() {
    LARGE.reset_in_child();
}

/// Maps `start..start+len` read-write over the reservation and places it.
fn commit(l: &mut Large, start: usize, len: usize) -> bool {
    // SAFETY: `start..start+len` is a run of our own reservation that no block uses;
    // MAP_FIXED replaces it atomically.
    let p = unsafe {
        libc::mmap(
            start as *mut c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p as usize != start {
        return false;
    }
    if l.huge && len >= HUGE {
        // SAFETY: our own fresh mapping; advice only.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
    }
    if let Some((mode, mask)) = &l.policy {
        // SAFETY: our own fresh mapping, no page of it touched; `mask` covers
        // `maxnode - 1` bits.
        let r = unsafe { numa::mbind(p, len, *mode, mask.as_ptr(), mask.maxnode(), 0) };
        if r.is_err() {
            l.stats.placement_failures += 1;
        }
    }
    true
}

/// Gives `start..start+len` back to the reservation (its pages go) and to the free runs.
fn release(l: &mut Large, start: usize, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: a run of our own arena that no live block uses; MAP_FIXED replaces it with
    // a reservation atomically, so no other mapping can take the range meanwhile.
    let p = unsafe {
        libc::mmap(
            start as *mut c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        // (Too many mappings to split one more.) Drop the pages at least; the run stays
        // mapped read-write, which `commit` maps over again.
        // SAFETY: as above; advice only.
        unsafe { libc::madvise(start as *mut c_void, len, libc::MADV_DONTNEED) };
    }
    insert_free(l, start, len);
}

fn insert_free(l: &mut Large, mut start: usize, mut len: usize) {
    if let Some((&s, &n)) = l.free.range(..start).next_back() {
        if s + n == start {
            l.free.remove(&s);
            start = s;
            len += n;
        }
    }
    if let Some(n) = l.free.remove(&(start + len)) {
        len += n;
    }
    l.free.insert(start, len);
}

/// Takes `len` bytes of free arena aligned to `align` (first fit).
fn take_range(l: &mut Large, len: usize, align: usize) -> Option<usize> {
    let (s, n, at) = l.free.iter().find_map(|(&s, &n)| {
        let at = round_up(s, align)?;
        (at.checked_add(len)? <= s + n).then_some((s, n, at))
    })?;
    l.free.remove(&s);
    if at > s {
        l.free.insert(s, at - s);
    }
    if at + len < s + n {
        l.free.insert(at + len, s + n - at - len);
    }
    Some(at)
}

fn drain_cache(l: &mut Large) {
    while let Some((s, n)) = l.cache.pop() {
        l.cache_bytes -= n;
        release(l, s, n);
    }
}

fn account_alloc(l: &mut Large, size: usize, len: usize) {
    let st = &mut l.stats;
    let n = &mut st.nodes[l.node];
    n.current += size as u64;
    n.peak = n.peak.max(n.current);
    n.calls += 1;
    st.current += size as u64;
    st.peak = st.peak.max(st.current);
    st.mapped += len as u64;
}

fn account_free(l: &mut Large, size: usize, len: usize) {
    let st = &mut l.stats;
    let n = &mut st.nodes[l.node];
    n.current = n.current.saturating_sub(size as u64);
    n.frees += 1;
    st.current = st.current.saturating_sub(size as u64);
    st.mapped = st.mapped.saturating_sub(len as u64);
}

impl Large {
    fn align_for(&self, len: usize, align: usize) -> usize {
        let mut a = align.max(self.page);
        if self.huge && len >= HUGE {
            a = a.max(HUGE);
        }
        a
    }

    fn alloc(&mut self, size: usize, align: usize, zero: bool) -> Option<usize> {
        let need = round_up(size.max(1), self.page)?;
        let a = self.align_for(need, align);
        // Best fit among the kept blocks.
        let hit = self
            .cache
            .iter()
            .enumerate()
            .filter(|(_, &(s, n))| n >= need && s % a == 0)
            .min_by_key(|(_, &(_, n))| n)
            .map(|(i, _)| i);
        let (start, len) = if let Some(i) = hit {
            let (s, mut n) = self.cache.swap_remove(i);
            self.cache_bytes -= n;
            // Keep the whole block (its pages are faulted in already, as glibc keeps a
            // freed chunk in its heap) unless it is more than four times the request
            // and the surplus is large; then give the surplus back.
            if n / 4 > need && n - need >= 16 << 20 {
                let keep = if self.huge && need >= HUGE {
                    round_up(need, HUGE)?.min(n)
                } else {
                    need
                };
                release(self, s + keep, n - keep);
                n = keep;
            }
            if zero {
                // SAFETY: `s..s+n` is mapped read-write and now ours alone.
                unsafe { std::ptr::write_bytes(s as *mut u8, 0, size) };
            }
            self.stats.cache_hits += 1;
            (s, n)
        } else if let Some(s) = self.grow_cached(need, a, zero, size) {
            self.stats.cache_hits += 1;
            (s, need)
        } else {
            drain_cache(self);
            let s = take_range(self, need, a)?;
            if !commit(self, s, need) {
                release(self, s, need);
                return None;
            }
            self.stats.fresh += 1;
            (s, need)
        };
        self.live.insert(
            start,
            Block {
                len,
                size,
                align: a,
            },
        );
        account_alloc(self, size, len);
        Some(start)
    }

    /// A miss: the largest kept block grown to `need` (its pages reused, only the rest
    /// faulted in), or `None`.
    fn grow_cached(&mut self, need: usize, a: usize, zero: bool, size: usize) -> Option<usize> {
        let (i, &(s, n)) = self
            .cache
            .iter()
            .enumerate()
            .filter(|(_, &(s, _))| s % a == 0)
            .max_by_key(|(_, &(_, n))| n)?;
        self.cache.swap_remove(i);
        self.cache_bytes -= n;
        match self.grow(s, n, need, a, n) {
            Some(p) => {
                if zero {
                    // SAFETY: `p..p+need` is mapped read-write and ours alone; the grown
                    // part is fresh zero pages already.
                    unsafe { std::ptr::write_bytes(p as *mut u8, 0, n.min(size)) };
                }
                Some(p)
            }
            None => {
                self.cache.push((s, n));
                self.cache_bytes += n;
                None
            }
        }
    }

    /// Grows the run `p..p+len` to `new_len` (in place where the arena after it is
    /// free, else moved to a run aligned to `align`, pages moved rather than copied
    /// where the kernel can, `keep` bytes copied where it cannot): its new start, or
    /// `None` with the run unchanged.
    fn grow(
        &mut self,
        p: usize,
        len: usize,
        new_len: usize,
        align: usize,
        keep: usize,
    ) -> Option<usize> {
        let grow = new_len - len;
        if let Some(&n) = self.free.get(&(p + len)) {
            if n >= grow {
                self.free.remove(&(p + len));
                if n > grow {
                    self.free.insert(p + new_len, n - grow);
                }
                if commit(self, p + len, grow) {
                    self.stats.realloc_in_place += 1;
                    return Some(p);
                }
                release(self, p + len, grow);
            }
        }
        let new = take_range(self, new_len, align)?;
        if !commit(self, new + len, grow) {
            release(self, new, new_len);
            return None;
        }
        // Move the pages (MREMAP_DONTUNMAP leaves the old run mapped, empty, so no
        // hole opens in the arena), else copy them.
        // SAFETY: `p..p+len` is our run, `new..new+len` a reserved run of ours; with
        // MREMAP_FIXED the kernel replaces the target atomically.
        let moved = unsafe {
            libc::mremap(
                p as *mut c_void,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
                new as *mut c_void,
            )
        };
        if moved as usize == new {
            self.stats.realloc_moved += 1;
        } else {
            if !commit(self, new, len) {
                release(self, new, new_len);
                return None;
            }
            // SAFETY: two distinct runs of ours, each at least `keep` long.
            unsafe { std::ptr::copy_nonoverlapping(p as *const u8, new as *mut u8, keep) };
            self.stats.realloc_copied += 1;
        }
        release(self, p, len);
        Some(new)
    }

    fn free(&mut self, p: usize) -> Option<Block> {
        let Some(b) = self.live.remove(&p) else {
            self.stats.bad_frees += 1;
            return None;
        };
        account_free(self, b.size, b.len);
        if b.len <= self.cache_limit {
            while !self.cache.is_empty()
                && (self.cache.len() >= CACHE_SLOTS || self.cache_bytes + b.len > self.cache_limit)
            {
                let (s, n) = self.cache.remove(0);
                self.cache_bytes -= n;
                release(self, s, n);
            }
            self.cache.push((p, b.len));
            self.cache_bytes += b.len;
        } else {
            release(self, p, b.len);
        }
        self.stats.cached = self.cache_bytes as u64;
        Some(b)
    }

    /// Large to large: the new address (maybe `p`), or `None` (the block unchanged).
    fn realloc(&mut self, p: usize, size: usize) -> Option<usize> {
        let b = *self.live.get(&p)?;
        let len = round_up(size.max(1), self.page)?;
        if len <= b.len {
            // Shrink in place, giving back whole huge pages at the tail.
            let mut keep = b.len;
            if b.len - len >= HUGE {
                keep = if self.huge && len >= HUGE {
                    round_up(len, HUGE)?.min(b.len)
                } else {
                    len
                };
                release(self, p + keep, b.len - keep);
            }
            self.resize(p, b, size, keep);
            self.stats.realloc_in_place += 1;
            return Some(p);
        }
        let a = self.align_for(len, b.align);
        let new = self.grow(p, b.len, len, a, b.size)?;
        if new == p {
            self.resize(p, b, size, len);
            return Some(p);
        }
        self.live.remove(&p);
        account_free(self, b.size, b.len);
        self.live.insert(
            new,
            Block {
                len,
                size,
                align: a,
            },
        );
        account_alloc(self, size, len);
        self.stats.nodes[self.node].calls -= 1; // a move, not a new allocation
        self.stats.nodes[self.node].frees -= 1;
        Some(new)
    }

    fn resize(&mut self, p: usize, b: Block, size: usize, len: usize) {
        account_free(self, b.size, b.len);
        self.stats.nodes[self.node].frees -= 1;
        self.live.insert(p, Block { len, size, ..b });
        account_alloc(self, size, len);
        self.stats.nodes[self.node].calls -= 1;
    }
}

/// A large block of `size` bytes aligned to `align` (0: none beyond the page), zeroed
/// if asked; `None` where the arena cannot serve it.
pub fn alloc(size: usize, align: usize, zero: bool) -> Option<*mut c_void> {
    LARGE.with(|l| {
        let l = l.as_mut()?;
        let r = l.alloc(size, align, zero);
        if r.is_none() {
            l.stats.fallbacks += 1;
        }
        r.map(|a| a as *mut c_void)
    })
}

/// Frees a block of ours; its requested size, or `None` if `p` is no live block.
pub fn free(p: *mut c_void) -> Option<usize> {
    LARGE.with(|l| l.as_mut()?.free(p as usize).map(|b| b.size))
}

/// Resizes a block of ours within the large path: the new address, or `None` (the block
/// is unchanged: not ours, or no room).
pub fn realloc(p: *mut c_void, size: usize) -> Option<*mut c_void> {
    LARGE.with(|l| {
        l.as_mut()?
            .realloc(p as usize, size)
            .map(|a| a as *mut c_void)
    })
}

/// The usable size of a block of ours (its mapped length), and its requested size.
pub fn sizes(p: *mut c_void) -> Option<(usize, usize)> {
    LARGE.with(|l| l.as_ref()?.live.get(&(p as usize)).map(|b| (b.len, b.size)))
}

/// A copy of the counters.
pub fn stats() -> LargeStats {
    LARGE.with(|l| l.as_ref().map(|l| l.stats).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_cached_zeroed_grown_and_told_apart() {
        let cfg = Config {
            arena: 8 << 30,
            ..Config::default()
        };
        init(&cfg).unwrap();
        let (base, len) = arena();
        assert!(base.is_multiple_of(1 << 30) && len == 8 << 30);
        let a = alloc(3 << 20, 0, false).unwrap();
        assert!(owns(a) && (a as usize).is_multiple_of(HUGE));
        // SAFETY: a live block of 3 MiB.
        unsafe { std::ptr::write_bytes(a.cast::<u8>(), 7, 3 << 20) };
        assert_eq!(free(a), Some(3 << 20));
        assert_eq!(free(a), None, "a double free is refused, not a crash");
        // The kept block comes back, zeroed for calloc.
        let b = alloc(3 << 20, 0, true).unwrap();
        assert_eq!(a, b);
        // SAFETY: a live block of 3 MiB.
        let bytes = unsafe { std::slice::from_raw_parts_mut(b.cast::<u8>(), 3 << 20) };
        assert!(bytes.iter().all(|&x| x == 0));
        for (i, x) in bytes.iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
        // A neighbour in the way: growing moves the pages, keeping the bytes.
        let n = alloc(2 << 20, 0, false).unwrap();
        let c = realloc(b, 40 << 20).unwrap();
        // SAFETY: a live block of 40 MiB.
        let moved = unsafe { std::slice::from_raw_parts(c.cast::<u8>(), 3 << 20) };
        assert!(moved.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
        assert_eq!(sizes(c), Some((40 << 20, 40 << 20)));
        let d = alloc(5 << 20, 1 << 30, false).unwrap();
        assert_eq!(d as usize % (1 << 30), 0);
        let x = 5u8;
        assert!(!owns(&x as *const u8 as *mut c_void));
        assert!(!owns(std::ptr::null_mut()));
        for p in [c, d, n] {
            assert!(free(p).is_some());
        }
        let s = stats();
        assert!(s.cache_hits >= 1 && s.realloc_moved + s.realloc_copied + s.realloc_in_place >= 1);
        assert_eq!((s.current, s.bad_frees), (0, 1));
        assert_eq!(s.peak, (40 << 20) + (5 << 20) + (2 << 20));
        assert!(alloc(16 << 30, 0, false).is_none(), "larger than the arena");
    }
}
