//! Owning wrappers for virtual memory management: a reserved device address range
//! ([`VmmRegion`]) into which physical chunks ([`PhysChunk`]) are mapped on demand.
//!
//! A chunk is one physical allocation (`cuMemCreate`) of any multiple of the
//! granularity, so that a pool can grow by a few large chunks instead of one driver
//! allocation per 2 MiB page. A run of chunks mapped side by side is made accessible
//! with one `set_access` call. A chunk unmapped from one place is kept (a [`PhysChunk`])
//! and can be mapped somewhere else without a new driver allocation; dropped, it goes
//! back to the driver.

use std::collections::BTreeMap;
use std::ptr::NonNull;

use super::copy::{check_range, CopyEnd, Fences};
use super::sync::SharedBackend;
use crate::backend::{DevicePtr, HostKind, MemRef, PhysHandle};
use crate::error::{Error, Result};

/// Physical device memory not mapped anywhere. Dropped, it is given back to the driver.
#[derive(Debug)]
pub(crate) struct PhysChunk {
    backend: SharedBackend,
    device: usize,
    size: usize,
    handle: Option<PhysHandle>,
}

impl PhysChunk {
    /// Allocates `size` bytes (a multiple of the granularity) of physical memory.
    pub(crate) fn create(backend: &SharedBackend, device: usize, size: usize) -> Result<Self> {
        let handle = backend.create_physical(device, size)?;
        Ok(PhysChunk {
            backend: backend.clone(),
            device,
            size,
            handle: Some(handle),
        })
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }
}

impl Drop for PhysChunk {
    fn drop(&mut self) {
        if self.backend.check_fork().is_err() {
            // A forked child: the driver's memory is the parent's (leaked here).
            return;
        }
        if let Some(h) = self.handle.take() {
            // SAFETY: a PhysChunk holds a live handle of this device that is mapped
            // nowhere (it was created unmapped, or unmapped before it was handed out).
            if let Err(e) = unsafe { self.backend.release_physical(self.device, h) } {
                tracing::warn!(target: "hetmem", error = %e, "releasing physical memory failed");
            }
        }
    }
}

/// One chunk mapped in a region.
#[derive(Debug, Clone, Copy)]
struct Mapped {
    len: usize,
    handle: PhysHandle,
}

/// A reserved device address range with chunks mapped into it on demand. Drop unmaps
/// and releases every chunk and frees the range.
#[derive(Debug)]
pub(crate) struct VmmRegion {
    backend: SharedBackend,
    device: usize,
    base: DevicePtr,
    size: usize,
    granularity: usize,
    /// Offset → the chunk mapped there.
    chunks: BTreeMap<usize, Mapped>,
    mapped: usize,
    /// Left by asynchronous copies into the region; unmapping waits for them.
    fences: Fences,
}

impl VmmRegion {
    /// Reserves `size` bytes (rounded up to the granularity) of address space on
    /// `device`; `None` where the backend has no virtual memory management.
    pub(crate) fn new(backend: &SharedBackend, device: usize, size: usize) -> Result<Option<Self>> {
        let Some(granularity) = backend.vmm_granularity(device) else {
            return Ok(None);
        };
        let size = size.div_ceil(granularity).max(1) * granularity;
        let base = backend.reserve_address(device, size)?;
        Ok(Some(VmmRegion {
            backend: backend.clone(),
            device,
            base,
            size,
            granularity,
            chunks: BTreeMap::new(),
            mapped: 0,
            fences: Fences::default(),
        }))
    }

    pub(crate) fn base(&self) -> DevicePtr {
        self.base
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }

    pub(crate) fn granularity(&self) -> usize {
        self.granularity
    }

    /// Bytes mapped now.
    pub(crate) fn mapped_bytes(&self) -> usize {
        self.mapped
    }

    /// Maps `chunks` side by side from offset `off`, then makes the whole run readable and
    /// writable by every device in `access` (which includes the region's own) with one
    /// call. On failure nothing stays mapped and every chunk is handed back with the
    /// error.
    pub(crate) fn map_run(
        &mut self,
        off: usize,
        chunks: Vec<PhysChunk>,
        access: &[usize],
    ) -> std::result::Result<(), (Error, Vec<PhysChunk>)> {
        let len: usize = chunks.iter().map(PhysChunk::size).sum();
        if let Err(e) = self.check_free_range(off, len, &chunks) {
            return Err((e, chunks));
        }
        let mut done = 0;
        let mut at = off;
        let mut failure = None;
        for c in &chunks {
            let h = c.handle.expect("a PhysChunk holds its handle");
            // SAFETY: `at..at+c.size` lies inside our reservation with nothing mapped
            // (check_free_range), and `h` is a live handle of this device and size,
            // mapped nowhere else (PhysChunk's invariant).
            match unsafe {
                self.backend
                    .map(self.device, self.base.offset(at), c.size, h)
            } {
                Ok(()) => {
                    done += 1;
                    at += c.size;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() {
            // SAFETY: off..off+len is exactly the chunks just mapped, side by side, in our
            // reservation of this device.
            let granted = unsafe {
                self.backend
                    .set_access(self.device, self.base.offset(off), len, access)
            };
            if let Err(e) = granted {
                failure = Some(e);
            }
        }
        if let Some(e) = failure {
            let mut at = off;
            for c in &chunks[..done] {
                // SAFETY: mapped above and never made accessible (or access failed), so no
                // device work can use it.
                if let Err(e2) = unsafe {
                    self.backend
                        .unmap(self.device, self.base.offset(at), c.size)
                } {
                    tracing::error!(target: "hetmem", error = %e2, "unmapping after a failed map");
                }
                at += c.size;
            }
            return Err((e, chunks));
        }
        let mut at = off;
        for mut c in chunks {
            let handle = c.handle.take().expect("a PhysChunk holds its handle");
            self.chunks.insert(
                at,
                Mapped {
                    len: c.size,
                    handle,
                },
            );
            at += c.size;
        }
        self.mapped += len;
        Ok(())
    }

    fn check_free_range(&self, off: usize, len: usize, chunks: &[PhysChunk]) -> Result<()> {
        let g = self.granularity;
        let fits = off.is_multiple_of(g)
            && len > 0
            && off.checked_add(len).is_some_and(|e| e <= self.size)
            && chunks
                .iter()
                .all(|c| c.device == self.device && c.size.is_multiple_of(g));
        let overlaps = self
            .chunks
            .range(..off.saturating_add(len))
            .next_back()
            .is_some_and(|(o, m)| o + m.len > off);
        if !fits || overlaps {
            return Err(Error::InvalidArgument(format!(
                "cannot map {len} bytes at offset {off} of a {}-byte region: unaligned, \
                 outside it, already mapped, or chunks of another device",
                self.size
            )));
        }
        Ok(())
    }

    /// The chunks lying wholly inside `off..off+len`, as (offset, length).
    pub(crate) fn chunks_within(
        &self,
        off: usize,
        len: usize,
    ) -> impl Iterator<Item = (usize, usize)> + '_ {
        let end = off.saturating_add(len);
        self.chunks
            .range(off..end)
            .map(|(o, m)| (*o, m.len))
            .take_while(move |(o, l)| o + l <= end)
    }

    /// Whether every byte of `off..off+len` is mapped.
    pub(crate) fn is_mapped(&self, off: usize, len: usize) -> bool {
        let end = off.saturating_add(len);
        let mut at = off;
        while at < end {
            match self.chunks.range(..=at).next_back() {
                Some((o, m)) if o + m.len > at => at = o + m.len,
                _ => return false,
            }
        }
        true
    }

    /// Whether every asynchronous copy into the region has finished.
    pub(crate) fn copies_done(&self) -> bool {
        self.fences.all_done()
    }

    /// Unmaps the chunks at `offs` and returns their physical memory, to be mapped again
    /// or given back (dropped). Waits once for the copies queued into the region; the
    /// caller makes sure no other queued device work uses the chunks (the device would
    /// fault). Stops at the first failure, keeping what was unmapped so far in `out`.
    pub(crate) fn unmap_chunks(&mut self, offs: &[usize], out: &mut Vec<PhysChunk>) -> Result<()> {
        if offs.is_empty() {
            return Ok(());
        }
        if self.fences.must_leak() {
            return Err(Error::Unfenced { what: "region" });
        }
        self.fences.wait()?;
        for &off in offs {
            let Some(m) = self.chunks.get(&off).copied() else {
                return Err(Error::NotMapped {
                    offset: off,
                    len: self.granularity,
                });
            };
            // SAFETY: exactly one mapping made by map_run; the copies fenced on the
            // region are done and the caller guarantees no other queued work uses it.
            unsafe {
                self.backend
                    .unmap(self.device, self.base.offset(off), m.len)?
            };
            self.chunks.remove(&off);
            self.mapped -= m.len;
            out.push(PhysChunk {
                backend: self.backend.clone(),
                device: self.device,
                size: m.len,
                handle: Some(m.handle),
            });
        }
        Ok(())
    }

    /// Copies `data` to `offset` in the region, synchronously; every byte it touches
    /// must be mapped.
    pub(crate) fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        let Some(host) = NonNull::new(data.as_ptr().cast_mut()) else {
            return Ok(());
        };
        let dev = self.checked_ref(offset, data.len())?;
        // After the copies queued on the region, as a synchronous copy should be.
        self.fences.wait()?;
        let src = MemRef::Host {
            ptr: host,
            kind: HostKind::Pageable,
        };
        // SAFETY: the device range is inside this region and fully mapped (checked), the
        // host slice is valid for its length, the two cannot overlap (device memory),
        // and the copy is synchronous. The backend only reads through `src`.
        unsafe { self.backend.copy(dev, src, data.len(), None) }
    }

    /// Copies `out.len()` bytes from `offset` in the region, synchronously.
    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        let Some(host) = NonNull::new(out.as_mut_ptr()) else {
            return Ok(());
        };
        let dev = self.checked_ref(offset, out.len())?;
        self.fences.wait()?;
        let dst = MemRef::Host {
            ptr: host,
            kind: HostKind::Pageable,
        };
        // SAFETY: as in `write`; `out` is exclusively borrowed for the copy.
        unsafe { self.backend.copy(dst, dev, out.len(), None) }
    }

    fn checked_ref(&self, offset: usize, len: usize) -> Result<MemRef> {
        check_range(offset, len, self.size)?;
        if len > 0 && !self.is_mapped(offset, len) {
            return Err(Error::NotMapped { offset, len });
        }
        Ok(MemRef::Device {
            device: self.device,
            ptr: self.base.offset(offset),
        })
    }
}

impl CopyEnd for VmmRegion {
    fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    fn end(&self, offset: usize, len: usize) -> Result<MemRef> {
        self.checked_ref(offset, len)
    }

    fn fences(&self) -> &Fences {
        &self.fences
    }
}

impl Drop for VmmRegion {
    fn drop(&mut self) {
        if self.backend.check_fork().is_err() {
            return;
        }
        let offs: Vec<usize> = self.chunks.keys().copied().collect();
        let mut out = Vec::new();
        if let Err(e) = self.unmap_chunks(&offs, &mut out) {
            tracing::error!(target: "hetmem", error = %e, "unmapping a pool region failed");
            // Leave the reservation in place: freeing an address range with chunks still
            // mapped would fail anyway. What was unmapped is released below.
            return;
        }
        drop(out); // gives the physical memory back
                   // SAFETY: the reservation is ours and every chunk in it was unmapped above.
        if let Err(e) = unsafe { self.backend.free_address(self.device, self.base, self.size) } {
            tracing::warn!(target: "hetmem", error = %e, "freeing a reserved address range failed");
        }
    }
}
