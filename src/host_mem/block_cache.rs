//! [`BlockCache`]: a few freed mappings kept for reuse, lock-free, for
//! [`NumaAlloc`](super::numa_alloc::NumaAlloc).
//!
//! Mapping, placing and unmapping a large block costs syscalls and, worse, a fresh set
//! of pages to fault in and zero each time; glibc keeps freed blocks of these sizes in
//! its heap instead. The cache keeps up to `N` of them, each in one atomic word: its
//! address (aligned to [`UNIT`], so the low bits are free) with its length in pages in
//! those low bits. Zero is an empty slot. A block is put with one compare-and-swap from
//! zero and taken with one back to zero, so two threads can never take the same block,
//! and nothing here allocates, blocks or panics (a global allocator's rules). The
//! loom model in `tests/loom.rs` checks that under every interleaving.

#[cfg(loom)]
use loom::sync::atomic::{AtomicUsize, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicUsize, Ordering};

/// Addresses the cache holds are multiples of this (2 MiB: huge-page mappings).
pub const UNIT: usize = 2 << 20;
/// Lengths (in pages) must be below this: they share the word with the address.
const LEN_LIMIT: usize = UNIT;

/// Up to `N` freed blocks, each `(address, pages)`; see the module docs.
#[derive(Debug)]
pub struct BlockCache<const N: usize> {
    slots: [AtomicUsize; N],
}

impl<const N: usize> BlockCache<N> {
    /// An empty cache.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        BlockCache {
            slots: [const { AtomicUsize::new(0) }; N],
        }
    }

    /// An empty cache.
    #[cfg(loom)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        BlockCache {
            slots: std::array::from_fn(|_| AtomicUsize::new(0)),
        }
    }

    /// Whether a block at `addr` of `pages` pages can be kept at all.
    pub fn fits(addr: usize, pages: usize) -> bool {
        addr != 0 && addr.is_multiple_of(UNIT) && pages > 0 && pages < LEN_LIMIT
    }

    /// Keeps the block; false (the caller keeps it) if it cannot be kept or every slot
    /// is taken.
    pub fn put(&self, addr: usize, pages: usize) -> bool {
        if !Self::fits(addr, pages) {
            return false;
        }
        let word = addr | pages;
        self.slots.iter().any(|s| {
            s.compare_exchange(0, word, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }

    /// Takes a block of exactly `pages` pages whose address is a multiple of `align`.
    pub fn take(&self, pages: usize, align: usize) -> Option<usize> {
        for s in &self.slots {
            let word = s.load(Ordering::Relaxed);
            let addr = word & !(LEN_LIMIT - 1);
            if word != 0
                && word & (LEN_LIMIT - 1) == pages
                && addr.is_multiple_of(align)
                && s.compare_exchange(word, 0, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                return Some(addr);
            }
        }
        None
    }

    /// Takes every block, for the caller to give back.
    pub fn drain(&self, mut f: impl FnMut(usize, usize)) {
        for s in &self.slots {
            let word = s.swap(0, Ordering::AcqRel);
            if word != 0 {
                f(word & !(LEN_LIMIT - 1), word & (LEN_LIMIT - 1));
            }
        }
    }
}

#[cfg(not(loom))]
impl<const N: usize> Default for BlockCache<N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_back_by_length_and_alignment_once() {
        let c = BlockCache::<2>::new();
        assert!(!c.put(UNIT + 4096, 1), "unaligned addresses are not kept");
        assert!(
            !c.put(UNIT, 0) && !c.put(UNIT, LEN_LIMIT),
            "lengths must fit the word"
        );
        assert!(c.put(UNIT, 512));
        assert!(c.put(3 * UNIT, 512));
        assert!(!c.put(5 * UNIT, 512), "two slots");
        assert_eq!(c.take(256, 4096), None, "exact lengths only");
        assert_eq!(c.take(512, 2 * UNIT), None, "neither is 4 MiB aligned");
        let a = c.take(512, UNIT).unwrap();
        let b = c.take(512, UNIT).unwrap();
        assert_ne!(a, b);
        assert_eq!(c.take(512, UNIT), None);
        assert!(c.put(4 * UNIT, 7));
        assert_eq!(c.take(7, 2 * UNIT), Some(4 * UNIT));
        assert!(c.put(6 * UNIT, 9));
        let mut out = Vec::new();
        c.drain(|a, p| out.push((a, p)));
        assert_eq!(out, vec![(6 * UNIT, 9)]);
        assert_eq!(c.take(9, UNIT), None);
    }
}
