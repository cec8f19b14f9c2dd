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
    /// GPU's node: `NumaPolicy::NearDevice(d)`), filled by `threads` host threads.
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
        let mut report = UploadReport::default();
        for (i, piece) in src.chunks(self.slot_size).enumerate() {
            let n = self.slots.len();
            let slot = &mut self.slots[self.next];
            self.next = (self.next + 1) % n;
            // Taking the slot's bytes waits for the copy that last drained it.
            let t = Instant::now();
            let bytes = &mut slot.as_mut_slice()?[..piece.len()];
            report.waited += t.elapsed();
            let t = Instant::now();
            fill(bytes, piece, self.threads);
            report.fill += t.elapsed();
            let at = dst_offset + i * self.slot_size;
            dst.with_end(|d| copy::copy(d, at, slot.mem(), 0, piece.len(), Some(&stream.inner)))?;
            report.bytes += piece.len();
            report.chunks += 1;
        }
        Ok(report)
    }
}

/// Copies `src` into `dst` with up to `threads` threads (one memcpy stream per core
/// cannot keep up with the link on its own).
fn fill(dst: &mut [u8], src: &[u8], threads: usize) {
    // Below a few MiB a thread costs more to start than it saves.
    let threads = threads.min(src.len() / (1 << 20)).max(1);
    if threads == 1 {
        dst.copy_from_slice(src);
        return;
    }
    let part = src.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (d, c) in dst.chunks_mut(part).zip(src.chunks(part)) {
            s.spawn(move || d.copy_from_slice(c));
        }
    });
}
