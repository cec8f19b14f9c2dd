//! A pinned staging ring: moves bytes from pageable memory or a mapped file to the
//! device at pinned-copy speed.
//!
//! DMA engines read only pinned memory at link speed (55 GB/s against 6–11 GB/s from
//! pageable memory on the H200 host, DESIGN.md). The ring keeps a few pinned slots:
//! host threads copy the next piece of the source into a free slot while the copy
//! engine drains the slots filled before it, so filling and transfer overlap and the
//! link stays busy. A slot is refilled only after the copy out of it is done (its
//! fence), so nothing is overwritten in flight.
//!
//! ```
//! use hetmem::{BackendKind, Manager, NumaPolicy};
//! use hetmem::pool::{HostPoolConfig, PoolConfig, StagingRing};
//!
//! let mgr = Manager::builder().backend(BackendKind::Sim).build()?;
//! let host = mgr.host_pool(HostPoolConfig::default())?;
//! let pool = mgr.device_pool(0, PoolConfig::default())?;
//! let stream = mgr.create_stream(0)?;
//! let mut ring = StagingRing::new(&host, &NumaPolicy::NearDevice(0), 4, 4 << 20, 2)?;
//! let weights = vec![7u8; 10 << 20];                  // pageable, or a mapped file
//! let dst = pool.alloc(weights.len(), &stream)?;
//! ring.upload(&weights, &dst, 0, &stream)?;           // returns once the last slot is queued
//! stream.synchronize()?;
//! # Ok::<(), hetmem::Error>(())
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::backend::copy;
use crate::error::{Error, Result};
use crate::placement::NumaPolicy;
use crate::pool::device::PoolBlock;
use crate::pool::host::{HostBlock, HostPool};
use crate::stream::Stream;

/// What one [`StagingRing::upload`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UploadReport {
    /// Bytes moved.
    pub bytes: usize,
    /// Slots filled (copies queued).
    pub chunks: usize,
    /// Wall time the host spent copying into slots.
    pub fill: Duration,
    /// Wall time spent waiting for a slot to come free (the link was the bottleneck).
    pub waited: Duration,
}

/// Pinned slots that stage host bytes on their way to the device.
#[derive(Debug)]
pub struct StagingRing {
    slots: Vec<HostBlock>,
    slot_size: usize,
    threads: usize,
    next: usize,
}

impl StagingRing {
    /// `slots` pinned slots of `slot_size` bytes from `host`, placed by `policy` (the
    /// GPU's node: `NumaPolicy::NearDevice(d)`), filled by up to `threads` host threads
    /// (the caller's among them). Each thread owns whole slots, so give the ring two
    /// slots per thread: one filling while the other drains.
    pub fn new(
        host: &HostPool,
        policy: &NumaPolicy,
        slots: usize,
        slot_size: usize,
        threads: usize,
    ) -> Result<Self> {
        if slots < 2 {
            return Err(Error::InvalidArgument(
                "a staging ring needs at least two slots to overlap filling and copying".into(),
            ));
        }
        if slot_size == 0 || threads == 0 {
            return Err(Error::InvalidArgument(
                "staging slots and filler threads must be more than zero".into(),
            ));
        }
        let slots = (0..slots)
            .map(|_| host.alloc_pinned(policy, slot_size))
            .collect::<Result<Vec<_>>>()?;
        Ok(StagingRing {
            slots,
            slot_size,
            threads,
            next: 0,
        })
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Queues the transfer of `src` to `dst[dst_offset..]` on `stream`, slot by slot.
    /// Returns when the last piece is queued; the data has arrived once `stream` passes
    /// that point (synchronise it or record an event). The slots stay fenced until their
    /// copies are done, so the ring may be reused or dropped at once.
    pub fn upload(
        &mut self,
        src: &[u8],
        dst: &PoolBlock,
        dst_offset: usize,
        stream: &Stream,
    ) -> Result<UploadReport> {
        match dst_offset.checked_add(src.len()) {
            Some(end) if end <= dst.len() => {}
            _ => {
                return Err(Error::OutOfBounds {
                    offset: dst_offset,
                    len: src.len(),
                    size: dst.len(),
                })
            }
        }
        dst.record_stream(stream)?;
        let pieces = src.len().div_ceil(self.slot_size);
        let n = self.slots.len();
        // Fillers: each owns whole slots, fills its own pieces (every `fillers`-th one)
        // and queues their copies, so the copies of one slot run while the others are
        // filled and no thread is started per slot. Below 4 MiB a filler costs more to
        // start than it saves.
        let fillers = self
            .threads
            .min(n)
            .min(pieces)
            .min((src.len() >> 22).max(1))
            .max(1);
        // Slot `next + k` goes to filler `k % fillers`, so that uploads that use fewer
        // slots than the ring has still rotate through all of them.
        let mut owned: Vec<Vec<&mut HostBlock>> = (0..fillers).map(|_| Vec::new()).collect();
        let (tail, head) = self.slots.split_at_mut(self.next);
        for (k, slot) in head.iter_mut().chain(tail.iter_mut()).enumerate() {
            owned[k % fillers].push(slot);
        }
        self.next = (self.next + pieces) % n;
        let job = Fill {
            src,
            dst,
            dst_offset,
            stream,
            slot_size: self.slot_size,
            fillers,
            failed: AtomicBool::new(false),
        };
        let mut owned = owned.into_iter();
        let first = owned.next().expect("at least one filler");
        let reports: Vec<Result<UploadReport>> = if fillers == 1 {
            vec![job.run(0, first)]
        } else {
            std::thread::scope(|s| {
                let job = &job;
                let others: Vec<_> = owned
                    .enumerate()
                    .map(|(w, slots)| s.spawn(move || job.run(w + 1, slots)))
                    .collect();
                // The calling thread is filler 0.
                let mut out = vec![job.run(0, first)];
                out.extend(
                    others
                        .into_iter()
                        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
                );
                out
            })
        };
        let mut report = UploadReport::default();
        for r in reports {
            let r = r?;
            report.bytes += r.bytes;
            report.chunks += r.chunks;
            // Wall time: the fillers ran side by side, so the busiest one's.
            report.fill = report.fill.max(r.fill);
            report.waited = report.waited.max(r.waited);
        }
        Ok(report)
    }
}

/// One upload, shared by its fillers.
struct Fill<'a> {
    src: &'a [u8],
    dst: &'a PoolBlock,
    dst_offset: usize,
    stream: &'a Stream,
    slot_size: usize,
    fillers: usize,
    /// Set by the first filler that fails, so that the others stop early.
    failed: AtomicBool,
}

impl Fill<'_> {
    /// Filler `w`: pieces `w`, `w + fillers`, ... through `slots` in turn.
    fn run(&self, w: usize, mut slots: Vec<&mut HostBlock>) -> Result<UploadReport> {
        let mut report = UploadReport::default();
        let pieces = self.src.chunks(self.slot_size).enumerate();
        for (j, (i, piece)) in pieces.skip(w).step_by(self.fillers).enumerate() {
            if self.failed.load(Ordering::Relaxed) {
                break;
            }
            let k = j % slots.len();
            let r = self.piece(&mut *slots[k], i, piece, &mut report);
            if r.is_err() {
                self.failed.store(true, Ordering::Relaxed);
                return r.map(|_| report);
            }
        }
        Ok(report)
    }

    fn piece(
        &self,
        slot: &mut HostBlock,
        i: usize,
        piece: &[u8],
        report: &mut UploadReport,
    ) -> Result<()> {
        // Taking the slot's bytes waits for the copy that last drained it.
        let t = Instant::now();
        let bytes = &mut slot.as_mut_slice()?[..piece.len()];
        report.waited += t.elapsed();
        let t = Instant::now();
        bytes.copy_from_slice(piece);
        report.fill += t.elapsed();
        let at = self.dst_offset + i * self.slot_size;
        let stream = Some(&*self.stream.inner);
        self.dst
            .with_end(|d| copy::copy(d, at, slot.mem(), 0, piece.len(), stream))?;
        report.bytes += piece.len();
        report.chunks += 1;
        Ok(())
    }
}
