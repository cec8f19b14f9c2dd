//! The device pool's free-list core: blocks, the free sets, parking, split and coalesce.
//!
//! Pure bookkeeping over addresses: no backend calls, no `unsafe`. The pool above it
//! decides when to map memory and hands events between streams; this module only says
//! which address range is what.
//!
//! - A segment (a reserved region, or a plain driver allocation) is a doubly linked list
//!   of blocks that tile it in address order.
//! - A block is allocated, parked (freed, waiting on a per-(stream, size) list for the
//!   next allocation of that size), or free. A free block is either **mapped** (memory
//!   under it, in the free set by owner stream and size) or a **hole** (address space
//!   with nothing mapped, in the hole set by size; holes have no owner).
//! - Free blocks merge with free neighbours of the same kind: mapped blocks only with
//!   blocks of the same owner (a block freed on one stream merged into memory no stream
//!   used would make another stream that takes it wait for the first one's work), holes
//!   with holes.
//! - A block allocated for a **private pool** (a graph's: see the pool's docs) carries
//!   its tag, and freed it stays that pool's: free in the pool's own sets, never parked,
//!   merged only with blocks of the same pool, found only by allocations for that pool,
//!   until [`Blocks::release_pool`] gives the pool's blocks to the common pool. An
//!   allocation for a private pool may also take memory of the common pool that nobody
//!   owns: that part becomes the pool's.
//!
//! (Over 1,000 lines, a quarter of them its tests: one data structure, whose
//! operations keep the same invariants, kept in one file.)

#![deny(unsafe_code)]

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;

use super::bins::Bins;

/// Requests are rounded up to this, as in PyTorch.
pub const MIN_BLOCK: usize = 512;
/// Owner of memory that no stream has used yet (or whose users are all done).
pub(crate) const NO_STREAM: u64 = u64::MAX;
/// The tag of blocks in no private pool.
pub(crate) const COMMON: u32 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockState {
    Allocated,
    Free,
    Parked,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Block {
    pub(crate) size: usize,
    /// Bytes the caller asked for (0 when not allocated).
    pub(crate) requested: usize,
    pub(crate) seg: u32,
    pub(crate) small: bool,
    pub(crate) prev: Option<u64>,
    pub(crate) next: Option<u64>,
    /// The stream whose queued work may still use it ([`NO_STREAM`] for none).
    pub(crate) stream: u64,
    pub(crate) state: BlockState,
    /// Whether memory is mapped under it (always, in plain segments).
    pub(crate) mapped: bool,
    /// The private pool it belongs to ([`COMMON`] for none); holes are always common.
    pub(crate) pool: u32,
    /// A free mapped block's place in its list of the free index.
    pos: u32,
    /// A parked block's successor on its (stream, size) list ([`NONE`] at the end).
    next_parked: u64,
}

/// No block: the end of a parked list.
const NONE: u64 = u64::MAX;

impl Block {
    /// Memory of the common pool that no stream owns.
    fn is_nobodys(&self) -> bool {
        self.stream == NO_STREAM && self.pool == COMMON
    }
}

/// A place to grow into: a hole, and the free mapped block just before it that the
/// allocation may start in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Growth {
    pub(crate) hole: u64,
    pub(crate) hole_size: usize,
    pub(crate) seg: u32,
    /// The free mapped block ending where the hole starts, if the taker may use it.
    pub(crate) prefix: Option<(u64, usize)>,
}

impl Growth {
    /// Where the allocation starts.
    pub(crate) fn start(&self) -> u64 {
        self.prefix.map_or(self.hole, |(a, _)| a)
    }

    /// Bytes of the hole an allocation of `size` bytes needs.
    pub(crate) fn hole_needed(&self, size: usize) -> usize {
        size - self.prefix.map_or(0, |(_, s)| s)
    }
}

/// (small pool, size, address).
type HoleKey = (bool, usize, u64);

/// The blocks of every segment of one pool.
#[derive(Debug, Default)]
pub(crate) struct Blocks {
    blocks: FxHashMap<u64, Block>,
    /// Free mapped blocks, by pool and owner, in size classes.
    free: Bins,
    holes: BTreeSet<HoleKey>,
    /// The first parked block of each (stream, size) freed since the last flush (the
    /// rest linked through the blocks: no allocation per size, however many there are).
    parked: FxHashMap<(u64, usize), u64>,
    n_parked: usize,
    /// Reused by [`Blocks::flush_parked`].
    scratch: Vec<u64>,
}

impl Blocks {
    pub(crate) fn get(&self, addr: u64) -> Option<&Block> {
        self.blocks.get(&addr)
    }

    /// Blocks parked now.
    pub(crate) fn parked(&self) -> usize {
        self.n_parked
    }

    /// Adds a segment of `size` bytes at `base`: one free block, mapped or a hole.
    pub(crate) fn add_segment(
        &mut self,
        seg: u32,
        base: u64,
        size: usize,
        small: bool,
        mapped: bool,
    ) {
        self.blocks.insert(
            base,
            Block {
                size,
                requested: 0,
                seg,
                small,
                prev: None,
                next: None,
                stream: NO_STREAM,
                state: BlockState::Free,
                mapped,
                pool: COMMON,
                pos: 0,
                next_parked: NONE,
            },
        );
        self.index(base);
    }

    /// Removes a segment that is one free block; returns false (and keeps it) otherwise.
    pub(crate) fn remove_segment(&mut self, base: u64) -> bool {
        match self.blocks.get(&base) {
            Some(b) if b.state == BlockState::Free && b.prev.is_none() && b.next.is_none() => {
                self.unindex(base);
                self.blocks.remove(&base);
                true
            }
            _ => false,
        }
    }

    fn index(&mut self, addr: u64) {
        let b = self.blocks.get_mut(&addr).expect("known");
        debug_assert_eq!(b.state, BlockState::Free);
        if b.mapped {
            b.pos = self.free.insert(b.small, b.pool, b.stream, b.size, addr);
        } else {
            self.holes.insert((b.small, b.size, addr));
        }
    }

    fn unindex(&mut self, addr: u64) {
        let b = self.blocks[&addr];
        if b.mapped {
            if let Some(moved) = self.free.remove(b.small, b.pool, b.stream, b.size, b.pos) {
                self.blocks
                    .get_mut(&moved)
                    .expect("indexed blocks are known")
                    .pos = b.pos;
            }
        } else {
            self.holes.remove(&(b.small, b.size, addr));
        }
    }

    /// A free mapped block of `owner`'s in `pool` of at least `size` bytes in the small
    /// or large pool, within a size class of the smallest: (size, address).
    fn fit(&self, small: bool, pool: u32, owner: u64, size: usize) -> Option<(usize, u64)> {
        self.free.fit(small, pool, owner, size)
    }

    /// The smallest free mapped block (within a size class) of at least `size` bytes
    /// that `stream` can take for `pool` without waiting for anyone: its own in `pool`,
    /// or one nobody owns there. For a private pool, when the pool has none, memory of
    /// the common pool that nobody owns.
    pub(crate) fn find_fit(&self, small: bool, pool: u32, stream: u64, size: usize) -> Option<u64> {
        let best = match (
            self.fit(small, pool, stream, size),
            self.fit(small, pool, NO_STREAM, size),
        ) {
            (Some(a), Some(b)) => Some(a.min(b).1),
            (a, b) => a.or(b).map(|(_, a)| a),
        };
        if best.is_none() && pool != COMMON {
            return self.fit(small, COMMON, NO_STREAM, size).map(|(_, a)| a);
        }
        best
    }

    /// The smallest free mapped block of at least `size` bytes owned by one of `others`
    /// (taking it costs a hand-over: the taker waits for the owner's queued work).
    pub(crate) fn find_others_fit(
        &self,
        small: bool,
        stream: u64,
        size: usize,
        others: impl Iterator<Item = u64>,
    ) -> Option<u64> {
        others
            .filter(|s| *s != stream && *s != NO_STREAM)
            .filter_map(|s| self.fit(small, COMMON, s, size))
            .min()
            .map(|(_, a)| a)
    }

    /// The smallest run of a free block of `stream`'s with the free blocks nobody owns
    /// on either side of it that holds `size` bytes; returns the stream's block. (A
    /// stream's freed block and memory nobody owns do not merge on their own: another
    /// stream taking the merged block would wait for this one's work.) The common pool
    /// only.
    pub(crate) fn find_merged_fit(&self, small: bool, stream: u64, size: usize) -> Option<u64> {
        let nobodys = |a: Option<u64>| {
            a.map(|a| &self.blocks[&a])
                .filter(|b| b.state == BlockState::Free && b.mapped && b.is_nobodys())
                .map_or(0, |b| b.size)
        };
        self.free
            .of(small, COMMON, stream)
            .filter_map(|(bsize, addr)| {
                let b = &self.blocks[&addr];
                let total = bsize + nobodys(b.prev) + nobodys(b.next);
                (total >= size).then_some((total, addr))
            })
            .min()
            .map(|(_, a)| a)
    }

    /// Gives the free blocks nobody owns on either side of `stream`'s free block `addr`
    /// to `stream`, merged into one block; returns where it starts.
    pub(crate) fn adopt_neighbours(&mut self, addr: u64, stream: u64) -> u64 {
        let b = self.blocks[&addr];
        for n in [b.prev, b.next].into_iter().flatten() {
            let nb = self.blocks[&n];
            if nb.state == BlockState::Free && nb.mapped && nb.is_nobodys() {
                self.unindex(n);
                self.blocks.get_mut(&n).expect("linked").stream = stream;
                self.index(n);
            }
        }
        self.unindex(addr);
        self.coalesce(addr)
    }

    /// The smallest hole (with the free mapped block before it, when that block is
    /// `stream`'s or nobody's in `pool`, or nobody's in the common pool) that holds
    /// `size` bytes.
    pub(crate) fn find_growth(
        &self,
        small: bool,
        pool: u32,
        stream: u64,
        size: usize,
    ) -> Option<Growth> {
        let mut best: Option<(usize, Growth)> = None;
        for &(_, hole_size, hole) in self
            .holes
            .range((small, 0, 0)..=(small, usize::MAX, u64::MAX))
        {
            let b = &self.blocks[&hole];
            let prefix = b.prev.and_then(|p| {
                let pb = &self.blocks[&p];
                (pb.state == BlockState::Free
                    && pb.mapped
                    && ((pb.pool == pool && (pb.stream == stream || pb.stream == NO_STREAM))
                        || pb.is_nobodys()))
                .then_some((p, pb.size))
            });
            let total = hole_size + prefix.map_or(0, |(_, s)| s);
            if total >= size && best.as_ref().is_none_or(|(t, _)| total < *t) {
                best = Some((
                    total,
                    Growth {
                        hole,
                        hole_size,
                        seg: b.seg,
                        prefix,
                    },
                ));
            }
        }
        best.map(|(_, g)| g)
    }

    /// Takes `rounded` bytes at the start of the free mapped block `addr` for `stream`
    /// and private pool `pool` (splitting off the rest, which stays free with its owner
    /// and pool). Returns the block's owner before, for the hand-over between streams.
    #[cfg(test)]
    pub(crate) fn take(
        &mut self,
        addr: u64,
        rounded: usize,
        requested: usize,
        stream: u64,
        pool: u32,
    ) -> u64 {
        self.take_sized(addr, rounded, requested, stream, pool).0
    }

    /// [`Blocks::take`], also returning the size taken (the block's, when the rest was
    /// too small to split off). Each block is looked up as few times as it can be: this
    /// is the path of every allocation that misses the parked lists.
    #[inline]
    pub(crate) fn take_sized(
        &mut self,
        addr: u64,
        rounded: usize,
        requested: usize,
        stream: u64,
        pool: u32,
    ) -> (u64, usize) {
        let b = self.blocks[&addr];
        debug_assert!(b.mapped && b.state == BlockState::Free && b.size >= rounded);
        if let Some(moved) = self.free.remove(b.small, b.pool, b.stream, b.size, b.pos) {
            self.blocks
                .get_mut(&moved)
                .expect("indexed blocks are known")
                .pos = b.pos;
        }
        let mut taken = Block {
            state: BlockState::Allocated,
            stream,
            requested,
            pool,
            ..b
        };
        if b.size - rounded >= MIN_BLOCK {
            let rest = addr + rounded as u64;
            let mut rb = Block {
                size: b.size - rounded,
                prev: Some(addr),
                ..b
            };
            if let Some(n) = b.next {
                self.blocks.get_mut(&n).expect("linked").prev = Some(rest);
            }
            rb.pos = self
                .free
                .insert(rb.small, rb.pool, rb.stream, rb.size, rest);
            self.blocks.insert(rest, rb);
            taken.size = rounded;
            taken.next = Some(rest);
        }
        *self.blocks.get_mut(&addr).expect("known") = taken;
        (b.stream, taken.size)
    }

    /// Undoes [`Blocks::take`] when the hand-over failed: free again, owned by `owner`
    /// in `pool` (as it was).
    pub(crate) fn untake(&mut self, addr: u64, owner: u64, pool: u32) {
        let b = self.blocks.get_mut(&addr).expect("known");
        b.stream = owner;
        b.pool = pool;
        self.coalesce(addr);
    }

    /// Frees the allocated block `addr`: parked for the next allocation of its size on
    /// its stream, or, in a private pool, free in that pool at once (parked blocks are
    /// the common pool's fast path). Returns it as it was (for the stats), or `None` if
    /// it was not an allocated block.
    #[inline(always)]
    pub(crate) fn park(&mut self, addr: u64) -> Option<Block> {
        let b = self.blocks.get_mut(&addr)?;
        if b.state != BlockState::Allocated {
            return None;
        }
        if b.pool != COMMON {
            return Some(self.free_private(addr));
        }
        let was = *b;
        b.state = BlockState::Parked;
        let head = self.parked.entry((was.stream, was.size)).or_insert(NONE);
        b.next_parked = *head;
        *head = addr;
        self.n_parked += 1;
        Some(was)
    }

    /// Frees the allocated block `addr` of a private pool into that pool's free set;
    /// returns it as it was. Out of line: the hot path is the common pool's.
    #[cold]
    #[inline(never)]
    fn free_private(&mut self, addr: u64) -> Block {
        let was = self.blocks[&addr];
        self.coalesce(addr);
        was
    }

    /// The block parked for `stream` at exactly `size` bytes, allocated again.
    #[inline(always)]
    pub(crate) fn unpark(&mut self, stream: u64, size: usize, requested: usize) -> Option<u64> {
        let head = self.parked.get_mut(&(stream, size))?;
        if *head == NONE {
            return None;
        }
        let addr = *head;
        let b = self.blocks.get_mut(&addr).expect("parked blocks are known");
        *head = b.next_parked;
        self.n_parked -= 1;
        b.state = BlockState::Allocated;
        b.requested = requested;
        Some(addr)
    }

    /// Moves every parked block into the free set, merged with its neighbours.
    pub(crate) fn flush_parked(&mut self) {
        self.flush_parked_with(&[]);
    }

    /// The streams that own parked blocks.
    pub(crate) fn parked_owners(&self) -> impl Iterator<Item = u64> + '_ {
        self.parked.keys().map(|(s, _)| *s)
    }

    /// [`Blocks::flush_parked`], the blocks of the streams in `idle` (whose queued work
    /// is done) given to nobody as they go.
    pub(crate) fn flush_parked_with(&mut self, idle: &[u64]) {
        if self.n_parked == 0 {
            return;
        }
        // Drained, keys and all: one per (stream, size) ever freed would pile up.
        let mut parked = std::mem::take(&mut self.scratch);
        for ((stream, _), mut at) in self.parked.drain() {
            let disown = idle.contains(&stream);
            while at != NONE {
                parked.push(at);
                let b = self.blocks.get_mut(&at).expect("parked blocks are known");
                if disown {
                    b.stream = NO_STREAM;
                }
                at = b.next_parked;
            }
        }
        self.n_parked = 0;
        for &addr in &parked {
            self.coalesce(addr);
        }
        parked.clear();
        self.scratch = parked;
    }

    /// Marks `addr` (allocated, parked, or free but out of the sets) free and merges it
    /// with the free neighbours of its kind on each side (a run of them, after
    /// [`Blocks::disown`] made several blocks alike at once); returns where the merged
    /// block starts.
    fn coalesce(&mut self, addr: u64) -> u64 {
        let mut b = self.blocks[&addr];
        b.state = BlockState::Free;
        b.requested = 0;
        let (mapped, stream, pool) = (b.mapped, b.stream, b.pool);
        let joins = |o: &Block| {
            o.state == BlockState::Free
                && o.mapped == mapped
                && (!mapped || (o.stream == stream && o.pool == pool))
        };
        let mut start = addr;
        while let Some(p) = b.prev {
            let pb = self.blocks[&p];
            if !joins(&pb) {
                break;
            }
            self.unindex(p);
            self.blocks.remove(&start);
            b.size += pb.size;
            b.prev = pb.prev;
            start = p;
        }
        while let Some(n) = b.next {
            let nb = self.blocks[&n];
            if !joins(&nb) {
                break;
            }
            self.unindex(n);
            self.blocks.remove(&n);
            b.size += nb.size;
            b.next = nb.next;
        }
        if let Some(n) = b.next {
            self.blocks.get_mut(&n).expect("linked").prev = Some(start);
        }
        self.blocks.insert(start, b);
        self.index(start);
        start
    }

    /// Splits the block at `addr` so that a block starts at `at` (inside it); returns the
    /// new block's address. The two halves keep the state, owner and kind.
    fn split_at(&mut self, addr: u64, at: u64) -> u64 {
        let b = self.blocks[&addr];
        debug_assert!(at > addr && at < addr + b.size as u64);
        let free = b.state == BlockState::Free;
        if free {
            self.unindex(addr);
        }
        let first = (at - addr) as usize;
        let second = Block {
            size: b.size - first,
            prev: Some(addr),
            ..b
        };
        if let Some(n) = b.next {
            self.blocks.get_mut(&n).expect("linked").prev = Some(at);
        }
        self.blocks.insert(at, second);
        let bm = self.blocks.get_mut(&addr).expect("known");
        bm.size = first;
        bm.next = Some(at);
        if free {
            self.index(addr);
            self.index(at);
        }
        at
    }

    /// Turns the first `len` bytes of the hole `hole` into free mapped memory owned by
    /// `owner` in `pool`, merged with its neighbours. Returns where the merged block
    /// starts.
    pub(crate) fn fill_hole(&mut self, hole: u64, len: usize, owner: u64, pool: u32) -> u64 {
        let b = self.blocks[&hole];
        debug_assert!(!b.mapped && b.state == BlockState::Free && len <= b.size);
        if len < b.size {
            self.split_at(hole, hole + len as u64);
        }
        self.unindex(hole);
        let bm = self.blocks.get_mut(&hole).expect("known");
        bm.mapped = true;
        bm.stream = owner;
        bm.pool = pool;
        self.coalesce(hole)
    }

    /// Turns `start..start+len`, which lies inside the one free mapped block `block`,
    /// into a hole (its memory is being unmapped), merged with neighbouring holes.
    pub(crate) fn make_hole(&mut self, block: u64, start: u64, len: usize) {
        let b = self.blocks[&block];
        debug_assert!(b.mapped && b.state == BlockState::Free && b.pool == COMMON);
        debug_assert!(start >= block && start + len as u64 <= block + b.size as u64);
        let mut at = block;
        if start > block {
            at = self.split_at(block, start);
        }
        let end = start + len as u64;
        if end < at + self.blocks[&at].size as u64 {
            self.split_at(at, end);
        }
        self.unindex(at);
        let bm = self.blocks.get_mut(&at).expect("known");
        bm.mapped = false;
        bm.stream = NO_STREAM;
        self.coalesce(at);
    }

    /// Gives every free mapped block owned by one of `owners` (all owners when `None`)
    /// to nobody (of its pool: a private pool's block stays the pool's), and merges
    /// them with their neighbours.
    pub(crate) fn disown(&mut self, owners: Option<&[u64]>) {
        let addrs: Vec<u64> = self
            .free
            .of_owners(|o| o != NO_STREAM && owners.is_none_or(|os| os.contains(&o)))
            .collect();
        for &a in &addrs {
            self.unindex(a);
            self.blocks
                .get_mut(&a)
                .expect("free blocks are known")
                .stream = NO_STREAM;
            self.index(a);
        }
        self.merge_all(addrs);
    }

    /// Merges each of the free mapped blocks at `addrs` with its neighbours (after their
    /// owner or pool changed, several at once).
    fn merge_all(&mut self, addrs: Vec<u64>) {
        for a in addrs {
            // A neighbour merged in an earlier round is gone from under its address.
            if self
                .blocks
                .get(&a)
                .is_some_and(|b| b.state == BlockState::Free && b.mapped)
            {
                self.unindex(a);
                self.coalesce(a);
            }
        }
    }

    /// The owners of free mapped blocks (other than nobody).
    pub(crate) fn free_owners(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.free.owners().filter(|s| *s != NO_STREAM).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Free mapped blocks of the common pool of at least `min` bytes: (address, size,
    /// owner, segment). (A private pool's memory is never unmapped: its graphs replay
    /// into it.)
    pub(crate) fn free_blocks(
        &self,
        min: usize,
    ) -> impl Iterator<Item = (u64, usize, u64, u32)> + '_ {
        self.free
            .iter()
            .filter(move |k| k.1 == COMMON && k.3 >= min)
            .map(|k| (k.4, k.3, k.2, self.blocks[&k.4].seg))
    }

    /// The largest free mapped block of the common pool.
    pub(crate) fn largest_free(&self) -> usize {
        self.free
            .iter()
            .filter(|k| k.1 == COMMON)
            .map(|k| k.3)
            .max()
            .unwrap_or(0)
    }

    /// Gives every block of private pool `pool` to the common pool: free ones merge
    /// with their common neighbours (keeping their owner stream), allocated ones go
    /// back to the common pool when freed. Returns the bytes that were free in it.
    pub(crate) fn release_pool(&mut self, pool: u32) -> usize {
        debug_assert_ne!(pool, COMMON);
        let members: Vec<(u64, BlockState)> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.pool == pool)
            .map(|(a, b)| (*a, b.state))
            .collect();
        let mut free = Vec::new();
        for (a, state) in members {
            if state == BlockState::Free {
                self.unindex(a);
                free.push(a);
            }
            self.blocks.get_mut(&a).expect("listed").pool = COMMON;
        }
        let mut bytes = 0;
        for &a in &free {
            bytes += self.blocks[&a].size;
            self.index(a);
        }
        self.merge_all(free);
        bytes
    }

    /// Bytes of private pool `pool` allocated now and free in it: (allocated, free).
    /// Parked-for-deferral blocks count as allocated. A scan of every block.
    pub(crate) fn pool_bytes(&self, pool: u32) -> (usize, usize) {
        self.blocks
            .values()
            .filter(|b| b.pool == pool)
            .fold((0, 0), |(a, f), b| match b.state {
                BlockState::Free => (a, f + b.size),
                _ => (a + b.size, f),
            })
    }

    /// The streams that own or are recorded on blocks (for forgetting the others).
    pub(crate) fn owners(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks.values().map(|b| b.stream)
    }

    /// Checks the structure: segments tiled in order, the sets matching the blocks, no
    /// two free neighbours that should have merged. For tests.
    #[cfg(test)]
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut n_free = 0;
        let mut n_holes = 0;
        for (&a, b) in &self.blocks {
            if let Some(n) = b.next {
                let nb = self
                    .blocks
                    .get(&n)
                    .ok_or(format!("{a:#x}: next {n:#x} missing"))?;
                if a + b.size as u64 != n || nb.prev != Some(a) || nb.seg != b.seg {
                    return Err(format!("{a:#x}+{} and its next {n:#x} do not tile", b.size));
                }
                let both_free = b.state == BlockState::Free && nb.state == BlockState::Free;
                let alike = !b.mapped || (b.stream == nb.stream && b.pool == nb.pool);
                if both_free && b.mapped == nb.mapped && alike {
                    return Err(format!("{a:#x} and {n:#x} should have merged"));
                }
            }
            if b.state == BlockState::Free {
                let indexed = if b.mapped {
                    n_free += 1;
                    self.free.holds(b.small, b.pool, b.stream, b.size, b.pos, a)
                } else {
                    n_holes += 1;
                    b.stream == NO_STREAM
                        && b.pool == COMMON
                        && self.holes.contains(&(b.small, b.size, a))
                };
                if !indexed {
                    return Err(format!("free block {a:#x} is not indexed as it is: {b:?}"));
                }
            } else if !b.mapped {
                return Err(format!("{a:#x} is in use but not mapped"));
            }
        }
        if n_free != self.free.len() || n_holes != self.holes.len() {
            return Err("the free sets hold blocks that are gone".into());
        }
        let mut parked = 0;
        for (&(stream, size), &head) in &self.parked {
            let mut at = head;
            while at != NONE {
                let Some(b) = self.blocks.get(&at) else {
                    return Err(format!("{at:#x} is parked but unknown"));
                };
                if b.pool != COMMON || b.state != BlockState::Parked {
                    return Err(format!("{at:#x} is parked but not a parked common block"));
                }
                if (b.stream, b.size) != (stream, size) {
                    return Err(format!("{at:#x} is on another stream's or size's list"));
                }
                parked += 1;
                at = b.next_parked;
            }
        }
        if parked != self.n_parked {
            return Err(format!("{parked} parked, counted {}", self.n_parked));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;
    const BASE: u64 = 1 << 40;

    fn region(mapped: bool) -> Blocks {
        let mut b = Blocks::default();
        b.add_segment(0, BASE, 64 * MIB, false, mapped);
        b
    }

    #[test]
    fn take_splits_and_frees_merge_back() {
        let mut b = region(true);
        let a = b.find_fit(false, COMMON, 1, 3 * MIB).unwrap();
        assert_eq!(b.take(a, 3 * MIB, 3 * MIB - 7, 1, COMMON), NO_STREAM);
        let c = b.find_fit(false, COMMON, 1, MIB).unwrap();
        assert_eq!(
            c,
            BASE + 3 * MIB as u64,
            "best fit is the rest, after the first"
        );
        b.take(c, MIB, MIB, 1, COMMON);
        b.check().unwrap();
        assert!(b.park(a).is_some());
        assert!(b.park(a).is_none(), "a double free is refused");
        assert_eq!(
            b.unpark(1, 3 * MIB, 5),
            Some(a),
            "parked for its stream and size"
        );
        b.park(a);
        b.park(c);
        b.flush_parked();
        b.check().unwrap();
        // Stream 1's freed blocks merged with each other, not with nobody's rest.
        assert_eq!(b.get(BASE).unwrap().size, 4 * MIB);
        assert_eq!(b.free_owners(), vec![1]);
        b.disown(None);
        b.check().unwrap();
        assert_eq!(
            b.get(BASE).unwrap().size,
            64 * MIB,
            "disowned, all one block again"
        );
    }

    #[test]
    fn another_streams_block_is_never_a_plain_fit() {
        let mut b = region(true);
        let x = b.find_fit(false, COMMON, 1, 8 * MIB).unwrap();
        b.take(x, 8 * MIB, 8 * MIB, 1, COMMON);
        let y = b.find_fit(false, COMMON, 2, 2 * MIB).unwrap();
        b.take(y, 2 * MIB, 2 * MIB, 2, COMMON);
        b.park(x);
        b.park(y);
        b.flush_parked();
        // Stream 3 fits in nobody's rest.
        let z = b.find_fit(false, COMMON, 3, MIB).unwrap();
        assert_eq!(b.get(z).unwrap().stream, NO_STREAM);
        let owner = b.take(z, 54 * MIB, 54 * MIB, 3, COMMON);
        assert_eq!(owner, NO_STREAM);
        // Nothing of its own or nobody's is left: another stream's block is only found
        // when asked for, the smallest that fits.
        assert_eq!(b.find_fit(false, COMMON, 3, 2 * MIB), None);
        let h = b
            .find_others_fit(false, 3, 2 * MIB, [1, 2, 3].into_iter())
            .unwrap();
        assert_eq!(
            (h, b.get(h).unwrap().stream),
            (y, 2),
            "2 MiB of stream 2, not 8 of 1"
        );
        // Stream 1's own block is its best fit even with nobody's memory about.
        assert_eq!(b.find_fit(false, COMMON, 1, 2 * MIB), Some(x));
        b.check().unwrap();
    }

    #[test]
    fn holes_grow_into_mapped_memory_and_back() {
        let mut b = region(false);
        assert_eq!(b.find_fit(false, COMMON, 1, MIB), None, "nothing mapped");
        let g = b.find_growth(false, COMMON, 1, 5 * MIB).unwrap();
        assert_eq!(
            (g.hole, g.prefix, g.hole_needed(5 * MIB)),
            (BASE, None, 5 * MIB)
        );
        // Map 8 MiB (a chunk larger than the need), take 5 of it.
        let at = b.fill_hole(g.hole, 8 * MIB, NO_STREAM, COMMON);
        b.take(at, 5 * MIB, 5 * MIB, 1, COMMON);
        b.check().unwrap();
        // 3 MiB mapped are left before the hole: a 10 MiB request uses them.
        let g = b.find_growth(false, COMMON, 1, 10 * MIB).unwrap();
        assert_eq!(g.prefix, Some((BASE + 5 * MIB as u64, 3 * MIB)));
        assert_eq!(g.hole_needed(10 * MIB), 7 * MIB);
        let at = b.fill_hole(g.hole, 8 * MIB, NO_STREAM, COMMON);
        assert_eq!(
            at,
            g.start(),
            "the new memory merged into the block before it"
        );
        b.take(at, 10 * MIB, 10 * MIB, 1, COMMON);
        b.check().unwrap();
        // Free everything; unmap 16 MiB in the middle; a hole opens there.
        b.park(BASE);
        b.park(at);
        b.flush_parked();
        b.disown(None);
        let (blk, size) = b.free_blocks(0).map(|(a, s, _, _)| (a, s)).next().unwrap();
        assert_eq!((blk, size), (BASE, 16 * MIB));
        b.make_hole(BASE, BASE + 2 * MIB as u64, 12 * MIB);
        b.check().unwrap();
        assert_eq!(b.get(BASE).unwrap().size, 2 * MIB);
        let g = b.find_growth(false, COMMON, 1, 12 * MIB).unwrap();
        assert_eq!((g.hole, g.hole_size), (BASE + 2 * MIB as u64, 12 * MIB));
        // Unmapping the last 2 MiB joins the hole before it and the tail hole.
        b.make_hole(BASE + 14 * MIB as u64, BASE + 14 * MIB as u64, 2 * MIB);
        b.check().unwrap();
        assert_eq!(b.get(BASE + 2 * MIB as u64).unwrap().size, 62 * MIB);
    }

    #[test]
    fn a_prefix_of_another_stream_is_not_used() {
        let mut b = region(false);
        let at = b.fill_hole(BASE, 4 * MIB, NO_STREAM, COMMON);
        b.take(at, 2 * MIB, 2 * MIB, 1, COMMON);
        let rest = BASE + 2 * MIB as u64;
        let rb = b.get(rest).unwrap();
        assert_eq!((rb.size, rb.stream), (2 * MIB, NO_STREAM));
        // Stream 2 takes nobody's 2 MiB, frees it: now stream 2's.
        b.take(rest, 2 * MIB, 2 * MIB, 2, COMMON);
        b.park(rest);
        b.flush_parked();
        let g = b.find_growth(false, COMMON, 3, 6 * MIB).unwrap();
        assert_eq!(
            g.prefix, None,
            "stream 2's block is not stream 3's to extend"
        );
        let g = b.find_growth(false, COMMON, 2, 6 * MIB).unwrap();
        assert_eq!(g.prefix, Some((rest, 2 * MIB)));
        // Filled for stream 2, the new memory joins its block.
        let start = b.fill_hole(g.hole, 4 * MIB, 2, COMMON);
        assert_eq!((start, b.get(start).unwrap().size), (rest, 6 * MIB));
        b.check().unwrap();
        let owner = b.take(start, 6 * MIB, 6 * MIB, 2, COMMON);
        assert_eq!(owner, 2);
        b.untake(start, owner, COMMON);
        b.check().unwrap();
    }

    /// Disowning makes runs of blocks alike at once: they all merge, not just pairs.
    #[test]
    fn disowned_runs_merge_whole() {
        let mut b = region(true);
        let mut addrs = Vec::new();
        for s in [1, 2, 1, 2] {
            let a = b.find_fit(false, COMMON, s, MIB).unwrap();
            b.take(a, MIB, MIB, s, COMMON);
            addrs.push(a);
        }
        for a in addrs {
            b.park(a);
        }
        b.flush_parked();
        b.check().unwrap();
        b.disown(None);
        b.check().unwrap();
        assert_eq!(b.get(BASE).unwrap().size, 64 * MIB);
    }

    /// A private pool's freed blocks are found only by allocations for that pool, are
    /// never parked, and join the common pool when the pool is released.
    #[test]
    fn private_pool_blocks_stay_private_until_released() {
        const P: u32 = 7;
        let mut b = region(true);
        // Stream 1 takes 4 MiB for pool P from memory nobody owns, then 1 MiB for the
        // common pool after it.
        let a = b.find_fit(false, P, 1, 4 * MIB).unwrap();
        assert_eq!(b.take(a, 4 * MIB, 4 * MIB, 1, P), NO_STREAM);
        let x = b.find_fit(false, COMMON, 1, MIB).unwrap();
        b.take(x, MIB, MIB, 1, COMMON);
        let kept = b.find_fit(false, COMMON, 2, 2 * MIB).unwrap();
        b.take(kept, 2 * MIB, 2 * MIB, 2, P);
        assert!(b.park(a).is_some());
        assert_eq!(b.parked(), 0, "a private block is free in its pool at once");
        b.check().unwrap();
        // Neither the parked fast path nor any stream of the common pool finds it.
        assert_eq!(b.unpark(1, 4 * MIB, 4 * MIB), None);
        let c = b.find_fit(false, COMMON, 1, 4 * MIB).unwrap();
        assert!(
            c > x,
            "{c:#x}: the common pool's rest, not the private block"
        );
        // Disowned (its stream done), it stays the pool's.
        b.disown(None);
        b.check().unwrap();
        assert_ne!(b.find_fit(false, COMMON, 3, 4 * MIB), Some(a));
        assert_eq!(b.find_fit(false, P, 1, 2 * MIB), Some(a));
        assert_eq!(b.find_fit(false, P, 9, 2 * MIB), Some(a), "nobody's in P");
        assert_eq!(b.pool_bytes(P), (2 * MIB, 4 * MIB));
        assert_eq!(b.largest_free(), 57 * MIB, "the common pool's rest");
        // Released: the free block is the common pool's and merges; the allocated one
        // goes back to the common pool (parked) when freed.
        assert_eq!(b.release_pool(P), 4 * MIB);
        b.check().unwrap();
        assert_eq!(b.pool_bytes(P), (0, 0));
        assert_eq!(b.find_fit(false, COMMON, 3, 4 * MIB), Some(a));
        b.park(kept).unwrap();
        assert_eq!(b.parked(), 1);
        b.park(x).unwrap();
        b.flush_parked();
        b.disown(None);
        b.check().unwrap();
        assert_eq!(b.get(BASE).unwrap().size, 64 * MIB, "all one block again");
    }

    /// An allocation for a private pool grows from a hole after its own free block or
    /// memory nobody owns, never after another pool's or another stream's block.
    #[test]
    fn private_growth_extends_only_its_own_or_nobodys_memory() {
        const P: u32 = 3;
        let mut b = region(false);
        let at = b.fill_hole(BASE, 4 * MIB, NO_STREAM, COMMON);
        b.take(at, 2 * MIB, 2 * MIB, 1, P);
        let rest = BASE + 2 * MIB as u64;
        // Pool P's stream 1 frees its block: the hole after the common rest.
        b.park(at).unwrap();
        let g = b.find_growth(false, P, 1, 6 * MIB).unwrap();
        assert_eq!(g.prefix, Some((rest, 2 * MIB)), "nobody's common memory");
        b.take(rest, 2 * MIB, 2 * MIB, 5, COMMON);
        b.park(rest).unwrap();
        b.flush_parked();
        assert_eq!(
            b.find_growth(false, P, 1, 6 * MIB).unwrap().prefix,
            None,
            "stream 5's common block is not the pool's to extend"
        );
        b.check().unwrap();
    }

    #[test]
    fn segments_come_and_go_whole() {
        let mut b = Blocks::default();
        b.add_segment(0, BASE, 2 * MIB, true, true);
        let a = b.find_fit(true, COMMON, 1, 4096).unwrap();
        b.take(a, 4096, 4000, 1, COMMON);
        assert!(!b.remove_segment(BASE), "in use");
        b.park(a);
        b.flush_parked();
        assert!(
            !b.remove_segment(BASE),
            "stream 1's block and nobody's rest stay apart"
        );
        b.disown(None);
        assert!(b.remove_segment(BASE));
        b.check().unwrap();
        assert_eq!(b.largest_free(), 0);
    }
}
