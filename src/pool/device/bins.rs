//! The index of free mapped blocks: segregated size classes, as in TLSF.
//!
//! A balanced tree keyed by size finds the best fit exactly, but each insert, remove
//! and search walks it (about 40 ns each; a split costs four of them), which put the
//! pool's slow path at 150–200 ns. Here a block goes into one of eight classes per
//! power of two (sizes within 12.5% of each other), one unordered list per class and
//! owner, with a bitmap of the classes that hold anything: insert and remove are O(1)
//! (a block remembers its place in its list), and a search looks at the request's own
//! class (the smallest block there that fits) and else takes the smallest block of the
//! next class that has any, found with the bitmap. The fit is then within one class of
//! the best fit.

#![deny(unsafe_code)]

use rustc_hash::FxHashMap;

/// Size classes per power of two (a power of two itself, for the shifts).
const SUB: usize = 8;
const SUB_BITS: u32 = SUB.trailing_zeros();
/// The smallest block size (log2): 512 bytes.
const MIN_LOG: u32 = 9;
/// Classes up to 2^64 bytes.
const CLASSES: usize = (64 - MIN_LOG as usize) * SUB;
const WORDS: usize = CLASSES.div_ceil(64);
/// A search looks at no more than this many blocks of one class for the smallest.
const SCAN: usize = 32;

/// The class of a block of `size` bytes (≥ 512).
fn class(size: usize) -> usize {
    let size = size.max(1 << MIN_LOG);
    let log = usize::BITS - 1 - size.leading_zeros();
    let sub = (size >> (log - SUB_BITS)) & (SUB - 1);
    (log - MIN_LOG) as usize * SUB + sub
}

/// The free blocks of one owner in one pool.
#[derive(Debug)]
struct Classes {
    bitmap: [u64; WORDS],
    lists: Vec<Vec<(usize, u64)>>,
    len: usize,
}

impl Classes {
    fn new() -> Self {
        Classes {
            bitmap: [0; WORDS],
            lists: (0..CLASSES).map(|_| Vec::new()).collect(),
            len: 0,
        }
    }

    /// The first class at or above `c` that holds a block.
    fn next_class(&self, c: usize) -> Option<usize> {
        let mut w = c / 64;
        let mut bits = self.bitmap.get(w)? & (!0u64 << (c % 64));
        loop {
            if bits != 0 {
                return Some(w * 64 + bits.trailing_zeros() as usize);
            }
            w += 1;
            bits = *self.bitmap.get(w)?;
        }
    }

    /// The smallest of (at most SCAN of) the blocks of class `c` that hold `size`.
    fn smallest_in(&self, c: usize, size: usize) -> Option<(usize, u64)> {
        self.lists[c]
            .iter()
            .take(SCAN)
            .filter(|(s, _)| *s >= size)
            .min()
            .copied()
    }

    fn fit(&self, size: usize) -> Option<(usize, u64)> {
        let c = class(size);
        if let Some(f) = self.smallest_in(c, size) {
            return Some(f);
        }
        // Every block of a higher class holds the request.
        let n = self.next_class(c + 1)?;
        self.smallest_in(n, 0)
    }
}

/// (small pool, private pool tag, owner stream).
type Key = (bool, u32, u64);

/// Free mapped blocks by (small pool, private pool, owner), in size classes.
#[derive(Debug, Default)]
pub(crate) struct Bins {
    owners: FxHashMap<Key, Classes>,
    len: usize,
}

impl Bins {
    /// Adds a block; returns its place in its list (for [`Bins::remove`]).
    pub(crate) fn insert(
        &mut self,
        small: bool,
        pool: u32,
        owner: u64,
        size: usize,
        addr: u64,
    ) -> u32 {
        let cl = self
            .owners
            .entry((small, pool, owner))
            .or_insert_with(Classes::new);
        let c = class(size);
        let list = &mut cl.lists[c];
        list.push((size, addr));
        cl.bitmap[c / 64] |= 1 << (c % 64);
        cl.len += 1;
        self.len += 1;
        (list.len() - 1) as u32
    }

    /// Removes the block at place `pos` of its list. Returns the block that moved into
    /// that place (its address), whose place the caller updates to `pos`.
    pub(crate) fn remove(
        &mut self,
        small: bool,
        pool: u32,
        owner: u64,
        size: usize,
        pos: u32,
    ) -> Option<u64> {
        let cl = self
            .owners
            .get_mut(&(small, pool, owner))
            .expect("a free block's owner is indexed");
        let c = class(size);
        let list = &mut cl.lists[c];
        list.swap_remove(pos as usize);
        if list.is_empty() {
            cl.bitmap[c / 64] &= !(1 << (c % 64));
        }
        let moved = list.get(pos as usize).map(|(_, a)| *a);
        cl.len -= 1;
        self.len -= 1;
        if cl.len == 0 && (owner != super::blocks::NO_STREAM || pool != super::blocks::COMMON) {
            // Streams and private pools come and go; the common pool's nobody stays.
            self.owners.remove(&(small, pool, owner));
        }
        moved
    }

    /// A free block of `owner`'s in private pool `pool` (or the common one) of the small
    /// or large pool that holds `size` bytes, within a size class of the smallest that
    /// does: (size, address).
    pub(crate) fn fit(
        &self,
        small: bool,
        pool: u32,
        owner: u64,
        size: usize,
    ) -> Option<(usize, u64)> {
        self.owners.get(&(small, pool, owner))?.fit(size)
    }

    /// Whether the block at `addr` sits at place `pos` of its list (for checks).
    #[cfg(test)]
    pub(crate) fn holds(
        &self,
        small: bool,
        pool: u32,
        owner: u64,
        size: usize,
        pos: u32,
        addr: u64,
    ) -> bool {
        self.owners
            .get(&(small, pool, owner))
            .and_then(|cl| cl.lists[class(size)].get(pos as usize))
            == Some(&(size, addr))
    }

    /// Every free block: (small, private pool, owner, size, address).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (bool, u32, u64, usize, u64)> + '_ {
        self.owners.iter().flat_map(|(&(small, pool, owner), cl)| {
            cl.lists
                .iter()
                .flatten()
                .map(move |&(size, addr)| (small, pool, owner, size, addr))
        })
    }

    /// The free blocks of one owner in one pool: (size, address).
    pub(crate) fn of(
        &self,
        small: bool,
        pool: u32,
        owner: u64,
    ) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.owners
            .get(&(small, pool, owner))
            .into_iter()
            .flat_map(|cl| cl.lists.iter().flatten().copied())
    }

    /// The addresses of the free blocks whose owner `pick` accepts (any pool): only
    /// their lists are visited.
    pub(crate) fn of_owners<'a>(
        &'a self,
        pick: impl Fn(u64) -> bool + 'a,
    ) -> impl Iterator<Item = u64> + 'a {
        self.owners
            .iter()
            .filter(move |((_, _, o), cl)| cl.len > 0 && pick(*o))
            .flat_map(|(_, cl)| cl.lists.iter().flatten().map(|(_, a)| *a))
    }

    /// The owners with free blocks (in any pool).
    pub(crate) fn owners(&self) -> impl Iterator<Item = u64> + '_ {
        self.owners
            .iter()
            .filter(|(_, cl)| cl.len > 0)
            .map(|((_, _, o), _)| *o)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_ordered_and_fine() {
        assert_eq!(class(512), 0);
        assert_eq!(class(1024), SUB);
        let mut last = 0;
        for s in (512..(64 << 20)).step_by(4096) {
            let c = class(s);
            assert!(c >= last, "{s}");
            last = c;
        }
        // Sizes in one class are within 12.5% of each other.
        assert_eq!(class(8 << 20), class((9 << 20) - 1));
        assert_ne!(class(8 << 20), class(9 << 20));
        assert_eq!(class(usize::MAX), CLASSES - 1);
    }

    #[test]
    fn fits_within_a_class_of_the_best_and_removes_in_place() {
        let mut b = Bins::default();
        let p1 = b.insert(false, 0, 1, 8 << 20, 0x1000);
        let p2 = b.insert(false, 0, 1, (8 << 20) + 4096, 0x2000);
        let _ = b.insert(false, 0, 1, 64 << 20, 0x3000);
        assert_eq!(
            b.fit(false, 0, 1, (8 << 20) + 1),
            Some(((8 << 20) + 4096, 0x2000))
        );
        assert_eq!(b.fit(false, 0, 1, 8 << 20), Some((8 << 20, 0x1000)));
        assert_eq!(b.fit(false, 0, 1, 10 << 20), Some((64 << 20, 0x3000)));
        assert_eq!(b.fit(false, 0, 1, 65 << 20), None);
        assert_eq!(b.fit(true, 0, 1, 512), None, "the other pool");
        assert_eq!(b.fit(false, 0, 2, 512), None, "another owner");
        assert_eq!(b.fit(false, 3, 1, 512), None, "a private pool");
        // Removing the first moves the last of its list into its place.
        assert_eq!(b.remove(false, 0, 1, 8 << 20, p1), Some(0x2000));
        assert!(b.holds(false, 0, 1, (8 << 20) + 4096, p1, 0x2000));
        let _ = p2;
        assert_eq!(b.len(), 2);
        assert_eq!(b.owners().collect::<Vec<_>>(), vec![1]);
        assert_eq!(b.of(false, 0, 1).count(), 2);
    }
}
