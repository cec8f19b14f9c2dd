//! Growth and giving back: new memory mapped in chunks into the address space (or plain
//! segments), idle chunks moved to where they are needed, cached memory released under
//! pressure or on `trim`, idle streams' free blocks reclaimed, and the out-of-memory
//! error with its numbers.

use super::blocks::{Growth, COMMON, NO_STREAM};
use super::{
    PoolState, SegMem, Segment, Shared, LARGE_ROUND, MID_LIMIT, MID_SEGMENT, SMALL_SEGMENT,
};
use crate::backend::owned::{OwnedMemory, PhysChunk, VmmRegion};
use crate::error::{Error, Result};
use crate::placement::MemKind;
use crate::stream::Stream;

impl Shared {
    /// Makes room for a `rounded`-byte block in new memory and takes it: maps chunks
    /// into a hole of the address space (expandable), or allocates a segment (plain).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn grow(
        &self,
        st: &mut PoolState,
        small: bool,
        rounded: usize,
        size: usize,
        stream: &Stream,
        pool: u32,
        pressure: bool,
    ) -> Result<u64> {
        if !self.expandable {
            let base = self.grow_plain(st, small, rounded, pressure)?;
            return self.take(st, base, rounded, size, stream, pool);
        }
        let key = stream.inner.id();
        let mut g = match st.blocks.find_growth(small, pool, key, rounded) {
            Some(g) => g,
            None => {
                self.add_region(st, small, rounded)?;
                st.blocks
                    .find_growth(small, pool, key, rounded)
                    .expect("a new region holds the request")
            }
        };
        let gran = st.region(g.seg).granularity();
        let need = g.hole_needed(rounded).next_multiple_of(gran);
        let spare: usize = st.spares[small as usize].iter().map(PhysChunk::size).sum();
        let alloc_peak =
            (st.stats.allocated_bytes.all.current as usize + rounded).max(st.alloc_high);
        let band = (alloc_peak as f64 * (1.0 + self.reserve_slack)) as usize;
        if self.release_on_grow
            && !pressure
            && st.routes.is_empty()
            && spare < need
            && st.reserved + need - spare > band
        {
            // Past the band: chunks that are free and idle move here rather than new
            // ones being made. Unmapping changes the holes, and idle streams' blocks
            // became nobody's and merged: look again after. (Not while a capture may
            // be under way: it queries events and unmaps.)
            self.move_idle_chunks(st, small, need - spare)?;
            if let Some(a) = st.blocks.find_fit(small, pool, key, rounded) {
                return self.take(st, a, rounded, size, stream, pool);
            }
            g = match st.blocks.find_growth(small, pool, key, rounded) {
                Some(g) => g,
                None => {
                    self.add_region(st, small, rounded)?;
                    st.blocks
                        .find_growth(small, pool, key, rounded)
                        .expect("a new region holds the request")
                }
            };
        }
        let need = g.hole_needed(rounded).next_multiple_of(gran);
        tracing::trace!(target: "hetmem", need, rounded, hole = g.hole_size, reserved = st.reserved, "pool grows");
        let target = self.chunk_target(st, small, gran, rounded);
        let mapped = self.map_chunks(st, &g, need, target, pressure)?;
        // The new memory joins the block before it, whoever's that is (this stream's
        // or nobody's, in this pool or nobody's in the common one).
        let (owner, owner_pool) = g.prefix.map_or((NO_STREAM, COMMON), |(a, _)| {
            let b = st.blocks.get(a).expect("prefix");
            (b.stream, b.pool)
        });
        let start = st.blocks.fill_hole(g.hole, mapped, owner, owner_pool);
        debug_assert_eq!(start, g.start());
        self.take(st, start, rounded, size, stream, pool)
    }

    /// How much a new chunk of the small or large pool maps at least, for an allocation
    /// of `rounded` bytes: a share of what the pool holds, within the chunk limits, and
    /// no further ahead of the allocated peak than `grow_ahead`.
    pub(super) fn chunk_target(
        &self,
        st: &PoolState,
        small: bool,
        gran: usize,
        rounded: usize,
    ) -> usize {
        let held = st.held[small as usize];
        let share = (held as f64 * self.chunk_fraction) as usize;
        let (lo, hi) = if small {
            (gran, self.min_chunk.max(gran))
        } else {
            (self.min_chunk.min(self.grow_max), self.grow_max)
        };
        let alloc_peak =
            (st.stats.allocated_bytes.all.current as usize + rounded).max(st.alloc_high);
        let ahead =
            ((alloc_peak as f64 * (1.0 + self.grow_ahead)) as usize).saturating_sub(st.reserved);
        share.clamp(lo, hi).min(ahead) / gran * gran
    }

    /// Maps at least `need` bytes (a multiple of the granularity) at the start of the
    /// hole of `g`: spare chunks first, then new ones (`target` bytes at least, within
    /// the budget and the hole), all made accessible with one call. Returns the bytes
    /// mapped.
    pub(super) fn map_chunks(
        &self,
        st: &mut PoolState,
        g: &Growth,
        need: usize,
        target: usize,
        pressure: bool,
    ) -> Result<usize> {
        let (seg, hole, extent) = (g.seg, g.hole, g.hole_size);
        let small = st.segments[seg as usize].as_ref().expect("segment").small;
        let (base, gran) = {
            let r = st.region(seg);
            (r.base().0, r.granularity())
        };
        let idx = small as usize;
        // Spares: the smallest that covers what is left, else the largest that fits.
        let mut run: Vec<PhysChunk> = Vec::new();
        let mut acc = 0;
        while acc < need {
            let left = need - acc;
            let room = extent - acc;
            let spares = &st.spares[idx];
            let pick = spares
                .iter()
                .enumerate()
                .filter(|(_, c)| c.size() <= room && c.size() >= left)
                .min_by_key(|(_, c)| c.size())
                .or_else(|| {
                    spares
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.size() <= room)
                        .max_by_key(|(_, c)| c.size())
                })
                .map(|(i, _)| i);
            let Some(i) = pick else { break };
            let c = st.spares[idx].swap_remove(i);
            acc += c.size();
            run.push(c);
        }
        let reused = run.len();
        if acc < need {
            let left = need - acc;
            if pressure && st.reserved + left > self.budget {
                // Spares that fit nowhere here hold budget a chunk of the right size needs.
                for i in [idx, 1 - idx] {
                    while st.reserved + left > self.budget {
                        let Some(c) = st.spares[i].pop() else { break };
                        st.unhold(i == 1, c.size());
                        st.stats.num_device_free += 1;
                        drop(c);
                    }
                }
            }
            let room = self.budget.saturating_sub(st.reserved);
            if room < left {
                st.spares[idx].append(&mut run);
                return Err(Error::oom(MemKind::Device(self.device), left, room));
            }
            let mut want = left
                .max(target)
                .min(extent - acc)
                .min(room - room % gran)
                .max(left);
            // In pieces of at most `max_chunk` (each one driver allocation).
            while acc < need {
                let piece = want.min((self.max_chunk / gran).max(1) * gran);
                let created = match PhysChunk::create(&self.backend, self.device, piece) {
                    Err(Error::OutOfMemory { .. }) if want > need - acc => {
                        // The device is short of a speculative chunk: the exact need may
                        // fit.
                        want = need - acc;
                        continue;
                    }
                    other => other,
                };
                match created {
                    Ok(c) => {
                        st.hold(small, c.size());
                        st.stats.num_device_alloc += 1;
                        acc += c.size();
                        want -= c.size();
                        run.push(c);
                    }
                    Err(e) => {
                        st.spares[idx].append(&mut run);
                        return Err(e);
                    }
                }
            }
            // Speculation left over (the device was short): nothing more to make.
            let _ = want;
        }
        let off = (hole - base) as usize;
        let was_empty = st.region(seg).mapped_bytes() == 0;
        let region = st.region_mut(seg);
        if let Err((e, mut back)) = region.map_run(off, run, &self.access) {
            // The chunks are intact: kept for the retry (or the budget's last resort).
            st.spares[idx].append(&mut back);
            return Err(e);
        }
        st.stats.num_pages_moved += reused as u64;
        crate::profile::emit(|| crate::record::EventKind::SegmentMap {
            addr: hole,
            size: acc as u64,
            device: self.device as u32,
        });
        if was_empty {
            st.stats.segment.add(small, 1);
        }
        Ok(acc)
    }

    /// Unmaps free chunks whose streams are done (no host wait) until `need` bytes are
    /// spare, in one batch per region.
    pub(super) fn move_idle_chunks(
        &self,
        st: &mut PoolState,
        small: bool,
        need: usize,
    ) -> Result<()> {
        // Free blocks of streams that are done (the allocating stream's own included)
        // are nobody's: their memory can be unmapped without a fault.
        let idle: Vec<u64> = st
            .blocks
            .free_owners()
            .into_iter()
            .filter(|o| st.streams.is_idle(*o))
            .collect();
        if !idle.is_empty() {
            st.blocks.disown(Some(&idle));
        }
        // (segment, block, chunk offset, chunk length)
        let mut cands: Vec<(u32, u64, usize, usize)> = Vec::new();
        for (addr, size, owner, seg) in st.blocks.free_blocks(0) {
            if owner != NO_STREAM {
                continue;
            }
            let Some(Segment {
                mem: SegMem::Vmm(r),
                base,
                small: s,
            }) = &st.segments[seg as usize]
            else {
                continue;
            };
            if *s != small || !r.copies_done() {
                continue;
            }
            for (off, len) in r.chunks_within((addr - base) as usize, size) {
                cands.push((seg, addr, off, len));
            }
        }
        tracing::trace!(target: "hetmem", need, candidates = cands.len(), "pool moves idle chunks");
        // Unmapping synchronises the device implicitly, which a capture forbids.
        if cands.is_empty() || st.streams.any_capturing() {
            return Ok(());
        }
        // One chunk that covers the need, the smallest such; else the largest first.
        let chosen: Vec<(u32, u64, usize, usize)> =
            match cands.iter().filter(|c| c.3 >= need).min_by_key(|c| c.3) {
                Some(c) => vec![*c],
                None => {
                    cands.sort_by_key(|c| std::cmp::Reverse(c.3));
                    let mut acc = 0;
                    cands
                        .into_iter()
                        .take_while(|c| {
                            let take = acc < need;
                            acc += c.3;
                            take
                        })
                        .collect()
                }
            };
        self.unmap_chosen(st, chosen)
    }

    /// Unmaps the chosen chunks (each wholly inside a free block owned by nobody) into
    /// the spares, and turns their ranges into holes.
    pub(super) fn unmap_chosen(
        &self,
        st: &mut PoolState,
        mut chosen: Vec<(u32, u64, usize, usize)>,
    ) -> Result<()> {
        // By segment, and within a block from the highest chunk down: unmapping one
        // splits its block, and the block keeps its address below the hole.
        chosen.sort_by_key(|c| (c.0, c.1, std::cmp::Reverse(c.2)));
        let mut i = 0;
        while i < chosen.len() {
            let seg = chosen[i].0;
            let j = chosen[i..]
                .iter()
                .position(|c| c.0 != seg)
                .map_or(chosen.len(), |k| i + k);
            let offs: Vec<usize> = chosen[i..j].iter().map(|c| c.2).collect();
            let small = st.segments[seg as usize].as_ref().expect("segment").small;
            let base = st.segments[seg as usize].as_ref().expect("segment").base;
            let mut out = Vec::new();
            let res = st.region_mut(seg).unmap_chunks(&offs, &mut out);
            // What was unmapped is a hole now, whatever failed after it.
            for (k, c) in out.iter().enumerate() {
                let (_, block, off, _) = chosen[i + k];
                crate::profile::emit(|| crate::record::EventKind::SegmentUnmap {
                    addr: base + off as u64,
                    size: c.size() as u64,
                    device: self.device as u32,
                });
                st.blocks.make_hole(block, base + off as u64, c.size());
            }
            st.spares[small as usize].append(&mut out);
            if st.region(seg).mapped_bytes() == 0 {
                st.stats.segment.sub(small, 1);
            }
            res?;
            i = j;
        }
        Ok(())
    }

    /// Reserves address space for a pool: the budget (16 GiB at most) for the small
    /// pool, twice the budget for the large one (room for holes); more regions are
    /// added if even that fills.
    pub(super) fn add_region(&self, st: &mut PoolState, small: bool, rounded: usize) -> Result<()> {
        let size = if small {
            self.budget.min(16 << 30)
        } else {
            self.budget.saturating_mul(2)
        };
        let size = size.max(rounded);
        let region = VmmRegion::new(&self.backend, self.device, size)?
            .expect("expandable pools only exist where the backend has VMM");
        let base = region.base().0;
        let size = region.size();
        let seg = st.add_segment(Segment {
            base,
            small,
            mem: SegMem::Vmm(region),
        });
        st.blocks.add_segment(seg, base, size, small, false);
        Ok(())
    }

    /// Allocates a plain segment for a `rounded`-byte block; returns its base.
    pub(super) fn grow_plain(
        &self,
        st: &mut PoolState,
        small: bool,
        rounded: usize,
        pressure: bool,
    ) -> Result<u64> {
        let _ = pressure;
        let exact = rounded.next_multiple_of(LARGE_ROUND);
        let seg_size = if small {
            SMALL_SEGMENT
        } else if rounded < MID_LIMIT && st.reserved + MID_SEGMENT <= self.budget {
            MID_SEGMENT
        } else {
            // A shared mid-size segment would not fit the budget: a segment of its own.
            exact
        };
        if st.reserved + seg_size > self.budget {
            return Err(Error::oom(
                MemKind::Device(self.device),
                seg_size,
                self.budget - st.reserved.min(self.budget),
            ));
        }
        let mem = OwnedMemory::device(&self.backend, self.device, seg_size)?;
        let base = mem
            .device_ptr()
            .expect("device memory has a device address")
            .0;
        st.hold(small, seg_size);
        crate::profile::emit(|| crate::record::EventKind::SegmentMap {
            addr: base,
            size: seg_size as u64,
            device: self.device as u32,
        });
        st.stats.segment.add(small, 1);
        st.stats.num_device_alloc += 1;
        let seg = st.add_segment(Segment {
            base,
            small,
            mem: SegMem::Plain(mem),
        });
        st.blocks.add_segment(seg, base, seg_size, small, true);
        Ok(base)
    }

    /// Gives free memory back: synchronises the streams that own free blocks (once
    /// each), then unmaps every chunk lying wholly in free memory (kept as spares for
    /// the retry of an allocation, or with `everything` given back with the spares) and
    /// frees every unused plain segment.
    /// A stream capturing a graph is not synchronised (its free blocks stay its own),
    /// and nothing is unmapped or freed while any stream the pool knows is capturing.
    pub(super) fn release_cached(&self, st: &mut PoolState, everything: bool) -> Result<()> {
        st.blocks.flush_parked();
        let capturing = st.streams.any_capturing();
        // While one captures: not it, and not a stream whose synchronisation would wait
        // for the whole device.
        let owners: Vec<u64> = st
            .blocks
            .free_owners()
            .into_iter()
            .filter(|o| !capturing || !(st.streams.capturing(*o) || st.streams.syncs_device(*o)))
            .collect();
        for o in &owners {
            st.streams.synchronize(*o)?;
        }
        if !owners.is_empty() {
            st.stats.num_sync_all_streams += 1;
            st.blocks.disown(Some(&owners));
        }
        if capturing {
            return Ok(());
        }
        let mut chunks: Vec<(u32, u64, usize, usize)> = Vec::new();
        let mut plain: Vec<(u32, u64)> = Vec::new();
        for (addr, size, _, seg) in st.blocks.free_blocks(0) {
            match &st.segments[seg as usize] {
                Some(Segment {
                    mem: SegMem::Vmm(r),
                    base,
                    ..
                }) => {
                    for (off, len) in r.chunks_within((addr - base) as usize, size) {
                        chunks.push((seg, addr, off, len));
                    }
                }
                Some(Segment {
                    mem: SegMem::Plain(_),
                    base,
                    ..
                }) if *base == addr => plain.push((seg, addr)),
                _ => {}
            }
        }
        self.unmap_chosen(st, chunks)?;
        for (seg, base) in plain {
            if !st.blocks.remove_segment(base) {
                continue;
            }
            let s = st.segments[seg as usize].take().expect("segment");
            let SegMem::Plain(mem) = &s.mem else {
                unreachable!("plain")
            };
            let len = mem.len();
            crate::profile::emit(|| crate::record::EventKind::SegmentUnmap {
                addr: base,
                size: len as u64,
                device: self.device as u32,
            });
            st.unhold(s.small, len);
            st.stats.segment.sub(s.small, 1);
            st.stats.num_device_free += 1;
            drop(s); // frees the device memory
        }
        if everything {
            for idx in 0..2 {
                for c in std::mem::take(&mut st.spares[idx]) {
                    st.unhold(idx == 1, c.size());
                    st.stats.num_device_free += 1;
                    drop(c);
                }
            }
        }
        Ok(())
    }

    /// The pool's `OutOfMemory`: the request, the room left under the budget, what is
    /// reserved, and the largest free block.
    pub(super) fn oom(&self, st: &mut PoolState, requested: usize, cause: Error) -> Error {
        st.stats.num_ooms += 1;
        let largest = st.blocks.largest_free();
        let device_free = match cause {
            Error::OutOfMemory { free, .. } => free,
            _ => usize::MAX,
        };
        tracing::warn!(target: "hetmem", device = self.device, requested, reserved = st.reserved,
            budget = self.budget, largest, "device pool out of memory");
        crate::profile::emit(|| crate::record::EventKind::OutOfMemory {
            placement: crate::record::Placement::Device,
            index: Some(self.device as u32),
            requested: requested as u64,
            free: (self.budget - st.reserved.min(self.budget)).min(device_free) as u64,
            reserved: Some(st.reserved as u64),
            largest_free_block: Some(largest as u64),
        });
        Error::OutOfMemory {
            kind: MemKind::Device(self.device),
            requested,
            free: (self.budget - st.reserved.min(self.budget)).min(device_free),
            reserved: Some(st.reserved),
            largest_free_block: Some(largest),
        }
    }
}

/// Makes the free blocks of every stream whose queued work is all done nobody's,
/// merged with their free neighbours: nothing can still touch them (a block is freed
/// after the work that used it was queued, and a block used on other streams made its
/// own stream wait for them when it was freed). Waits for nothing.
pub(super) fn reclaim_idle(st: &mut PoolState) {
    let mut owners = st.blocks.free_owners();
    owners.extend(st.blocks.parked_owners());
    owners.sort_unstable();
    owners.dedup();
    let idle: Vec<u64> = owners
        .into_iter()
        .filter(|o| st.streams.is_idle(*o))
        .collect();
    // Parked blocks of idle streams become nobody's as they are coalesced (one pass
    // each), the free ones of those streams after.
    st.blocks.flush_parked_with(&idle);
    if !idle.is_empty() {
        st.blocks.disown(Some(&idle));
    }
}

impl PoolState {
    pub(super) fn add_segment(&mut self, s: Segment) -> u32 {
        let seg = self
            .segments
            .iter()
            .position(Option::is_none)
            .unwrap_or_else(|| {
                self.segments.push(None);
                self.segments.len() - 1
            });
        self.segments[seg] = Some(s);
        seg as u32
    }

    pub(super) fn region(&self, seg: u32) -> &VmmRegion {
        match &self.segments[seg as usize] {
            Some(Segment {
                mem: SegMem::Vmm(r),
                ..
            }) => r,
            _ => unreachable!("segment {seg} is a region"),
        }
    }

    pub(super) fn region_mut(&mut self, seg: u32) -> &mut VmmRegion {
        match &mut self.segments[seg as usize] {
            Some(Segment {
                mem: SegMem::Vmm(r),
                ..
            }) => r,
            _ => unreachable!("segment {seg} is a region"),
        }
    }

    /// Counts `bytes` more held from the device by the small or large pool.
    pub(super) fn hold(&mut self, small: bool, bytes: usize) {
        self.reserved += bytes;
        self.held[small as usize] += bytes;
        self.stats.reserved_bytes.add(small, bytes as u64);
    }

    pub(super) fn unhold(&mut self, small: bool, bytes: usize) {
        self.reserved -= bytes;
        self.held[small as usize] -= bytes;
        self.stats.reserved_bytes.sub(small, bytes as u64);
    }
}
