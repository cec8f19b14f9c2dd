//! A pinned staging ring: moves bytes from pageable memory or a mapped file to the
//! device at pinned-copy speed.
//!
//! DMA engines read only pinned memory at link speed (55 GB/s against 6–11 GB/s from
//! pageable memory on the H200 host, DESIGN.md). The ring keeps a few pinned slots:
//! host threads copy the next piece of the source into a free slot while the copy
//! engine drains the slots filled before it, so filling and transfer overlap and the
//! link stays busy. A slot is refilled only after the copy out of it is done (its
//! fence), so nothing is overwritten in flight. A filler no thread can be started for
//! (a pids or thread limit) is run by the caller after its own: slower, never an error.
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
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::host_mem::available_memory;
use crate::placement::{MemKind, NumaPolicy};
use crate::pool::device::PoolBlock;
use crate::pool::host::{size_class, HostBlock, HostPool};
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

impl UploadReport {
    /// This report followed by `next` on the same thread: times add up.
    fn then(self, next: UploadReport) -> UploadReport {
        UploadReport {
            bytes: self.bytes + next.bytes,
            chunks: self.chunks + next.chunks,
            fill: self.fill + next.fill,
            waited: self.waited + next.waited,
        }
    }
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
    /// slots per thread: one filling while the other drains. Where no thread can be
    /// started (a thread or pids limit), the caller fills the slots of the threads
    /// missing.
    ///
    /// # Errors
    /// As [`StagingRing::pinned_bytes`]; [`Error::InvalidArgument`] for zero threads;
    /// [`Error::OutOfMemory`] (tier pinned) for a ring larger than the host memory
    /// available now (`MemAvailable`; pinned pages cannot be swapped out, so pinning
    /// past it would end with the kernel's OOM killer), before anything is pinned:
    /// `requested` is the ring's pinned bytes, `free` what is available. The host
    /// pool's errors.
    pub fn new(
        host: &HostPool,
        policy: &NumaPolicy,
        slots: usize,
        slot_size: usize,
        threads: usize,
    ) -> Result<Self> {
        let total = Self::pinned_bytes(slots, slot_size)?;
        if threads == 0 {
            return Err(Error::InvalidArgument(
                "a staging ring needs at least one filler thread".into(),
            ));
        }
        let available = available_memory();
        if total > available {
            return Err(Error::oom(MemKind::Pinned, total, available));
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

    /// The pinned bytes a ring of `slots` slots of `slot_size` bytes takes from a host
    /// pool: `slots` blocks of `slot_size`'s size class.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for fewer than two slots (one fills while the other
    /// drains); [`Error::InvalidSize`] for a slot of zero bytes or over `isize::MAX`,
    /// or slots that together overflow the address space.
    pub fn pinned_bytes(slots: usize, slot_size: usize) -> Result<usize> {
        if slots < 2 {
            return Err(Error::InvalidArgument(format!(
                "a staging ring needs at least two slots to overlap filling and copying, \
                 not {slots}"
            )));
        }
        if slot_size == 0 || slot_size > isize::MAX as usize {
            return Err(Error::InvalidSize {
                requested: slot_size,
                reason: if slot_size == 0 {
                    "a staging slot needs at least one byte"
                } else {
                    "a staging slot larger than isize::MAX"
                },
            });
        }
        let class = size_class(slot_size)
            .filter(|c| *c <= isize::MAX as usize)
            .ok_or(Error::InvalidSize {
                requested: slot_size,
                reason: "a staging slot that overflows when rounded up to a size class",
            })?;
        slots
            .checked_mul(class)
            .filter(|t| *t <= isize::MAX as usize)
            .ok_or(Error::InvalidSize {
                requested: slots.saturating_mul(class),
                reason: "staging slots that together are larger than the address space",
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
        // slots than the ring has still rotate through all of them. Each slot sits behind
        // its own (uncontended) lock, so that the caller can fill the pieces of a filler
        // no thread could be started for (a thread or pids limit).
        let (tail, head) = self.slots.split_at_mut(self.next);
        let slots: Vec<Mutex<&mut HostBlock>> = head
            .iter_mut()
            .chain(tail.iter_mut())
            .map(Mutex::new)
            .collect();
        self.next = (self.next + pieces) % n;
        let job = Fill {
            src,
            dst,
            dst_offset,
            stream,
            slot_size: self.slot_size,
            fillers,
            slots,
            failed: AtomicBool::new(false),
        };
        let reports: Vec<Result<UploadReport>> = if fillers == 1 {
            vec![job.run(0)]
        } else {
            std::thread::scope(|s| {
                let job = &job;
                let mut helpers = Vec::with_capacity(fillers - 1);
                let mut started = 1;
                while started < fillers {
                    let w = started;
                    let spawned = std::thread::Builder::new()
                        .name("hetmem-staging".into())
                        .spawn_scoped(s, move || job.run(w));
                    match spawned {
                        Ok(h) => helpers.push(h),
                        Err(e) => {
                            // A thread or pids limit (EAGAIN) only means fewer helpers.
                            tracing::warn!(target: "hetmem", error = %e, started = w - 1,
                                wanted = fillers - 1,
                                "cannot start a staging filler thread; the caller fills its pieces");
                            break;
                        }
                    }
                    started += 1;
                }
                // The calling thread is filler 0, and every filler no thread was started
                // for, one after the other.
                let mut own = job.run(0);
                for w in started..fillers {
                    own = match (own, job.run(w)) {
                        (Ok(a), Ok(b)) => Ok(a.then(b)),
                        (Err(e), _) | (_, Err(e)) => Err(e),
                    };
                }
                let mut out = vec![own];
                out.extend(
                    helpers
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
    /// The ring's slots in the order of this upload: filler `w` owns slots `w`,
    /// `w + fillers`, ...
    slots: Vec<Mutex<&'a mut HostBlock>>,
    /// Set by the first filler that fails, so that the others stop early.
    failed: AtomicBool,
}

impl Fill<'_> {
    /// Filler `w`: pieces `w`, `w + fillers`, ... through its own slots in turn.
    fn run(&self, w: usize) -> Result<UploadReport> {
        let mut report = UploadReport::default();
        let mine: Vec<&Mutex<&mut HostBlock>> =
            self.slots.iter().skip(w).step_by(self.fillers).collect();
        if mine.is_empty() {
            // `upload` starts no more fillers than there are slots.
            return Err(Error::InvalidArgument(format!(
                "staging filler {w} of {} has none of the {} slots",
                self.fillers,
                self.slots.len()
            )));
        }
        let pieces = self.src.chunks(self.slot_size).enumerate();
        for (j, (i, piece)) in pieces.skip(w).step_by(self.fillers).enumerate() {
            if self.failed.load(Ordering::Relaxed) {
                break;
            }
            // Only filler `w` takes its slots: the lock is never contended.
            let mut slot = mine[j % mine.len()]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let r = self.piece(&mut slot, i, piece, &mut report);
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
        super::copy::host_to_block(self.dst, at, slot, 0, piece.len(), self.stream)?;
        report.bytes += piece.len();
        report.chunks += 1;
        Ok(())
    }
}
