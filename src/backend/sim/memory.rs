//! Simulated memory: device allocations backed by lazily committed host mappings behind
//! synthetic device addresses, managed allocations, VMM reservations and physical
//! pages, and how one side of a copy resolves to the bytes behind it.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{ManagedState, SimBackend, State};
use crate::backend::{DevicePtr, HostKind, MemRef};
use crate::error::{Error, Result};

/// Backing memory of a simulated allocation: an anonymous mapping, so that pages the
/// program never touches cost nothing (a simulated 80 GB device must not need 80 GB of
/// host memory) and come back zeroed.
#[derive(Debug)]
pub(super) struct Memory {
    pub(super) ptr: NonNull<u8>,
    pub(super) len: usize,
}

impl Memory {
    pub(super) fn zeroed(size: usize) -> Option<Memory> {
        // SAFETY: a fresh private anonymous mapping (page-aligned, as drivers hand out
        // memory); MAP_NORESERVE because the device's own capacity is the limit we
        // enforce, not the host's overcommit accounting.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(Memory {
            ptr: NonNull::new(p.cast())?,
            len: size,
        })
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `zeroed` with this length and is ours alone.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[derive(Debug)]
pub(super) struct DeviceAlloc {
    pub(super) device: usize,
    pub(super) len: usize,
    pub(super) mem: Memory,
}

#[derive(Debug)]
pub(super) struct ManagedAlloc {
    pub(super) device: usize,
    pub(super) len: usize,
    pub(super) mem: Memory,
    pub(super) state: ManagedState,
}

/// An address range reserved for virtual memory management, backed by a lazily
/// committed host mapping of the same size so that mapped pages resolve by offset.
#[derive(Debug)]
pub(super) struct Reservation {
    pub(super) device: usize,
    pub(super) size: usize,
    /// Lazily committed host memory of the same size: mapped pages resolve by offset.
    pub(super) host: Memory,
    /// Offset of each mapping.
    pub(super) mapped: BTreeMap<usize, Mapping>,
}

/// One `map` call's range in a reservation.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mapping {
    pub(super) size: usize,
    pub(super) handle: u64,
    /// Whether `set_access` made it readable and writable (until then a device access
    /// faults, so copies are refused).
    pub(super) access: bool,
    /// When the last queued copy touching it ends: unmapping before then is refused.
    pub(super) busy_until: u64,
}

impl Reservation {
    /// Whether `off..off+len` is covered by mappings with no gap (and, with `access`,
    /// all of them accessible).
    pub(super) fn covered(&self, off: usize, len: usize, access: bool) -> bool {
        let end = off + len;
        let mut at = off;
        while at < end {
            match self.mapped.range(..=at).next_back() {
                Some((o, m)) if o + m.size > at && (m.access || !access) => at = o + m.size,
                _ => return false,
            }
        }
        true
    }

    /// The mappings that `off..off+len` touches.
    pub(super) fn touched(&mut self, off: usize, len: usize) -> impl Iterator<Item = &mut Mapping> {
        let first = self
            .mapped
            .range(..=off)
            .next_back()
            .map_or(off, |(o, _)| *o);
        self.mapped
            .range_mut(first..off + len.max(1))
            .map(|(_, m)| m)
    }
}

#[derive(Debug)]
pub(super) struct Physical {
    pub(super) device: usize,
    pub(super) size: usize,
    pub(super) mapped_at: Option<u64>,
}

/// Device addresses of every simulator in the process come from one range, handed out
/// in runs by one counter: a device takes a run when it first allocates and another
/// when its run is used up. No two devices, of one simulator or of two, ever share an
/// address, so a pointer of one manager is never a live allocation of another (as on a
/// GPU driver, which fails such a pointer rather than touching someone else's memory);
/// addresses are never reused, so a stale pointer never aliases a newer allocation. The
/// range lies above any user-space address (and below 2^63, so that callers that hold
/// addresses as signed 64-bit integers, PyTorch's among them, see them positive).
pub(super) const ADDR_BASE: u64 = 1 << 52;
/// The end of the range: 2^63 - 2^52 bytes of allocations per process.
pub(super) const ADDR_LIMIT: u64 = 1 << 63;
/// The size of a run (larger for an allocation that needs more).
pub(super) const ADDR_RUN: u64 = 1 << 40;
/// The largest run, and so the largest allocation or reservation: what one device's
/// whole range was before runs.
pub(super) const MAX_RUN: u64 = 1 << 52;
/// The start of the next run of any simulator in the process.
pub(super) static NEXT_RUN: AtomicU64 = AtomicU64::new(ADDR_BASE);

/// The run of addresses a device allocates from: `next..end`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct AddrRun {
    pub(super) next: u64,
    pub(super) end: u64,
}

/// A new run of at least `min` bytes from the process-wide counter, or `None` once the
/// range is used up (or `min` is over [`MAX_RUN`]).
pub(super) fn take_run(min: u64) -> Option<AddrRun> {
    let len = min.checked_next_multiple_of(ADDR_RUN)?.max(ADDR_RUN);
    if len > MAX_RUN {
        return None;
    }
    let start = NEXT_RUN
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            n.checked_add(len).filter(|end| *end <= ADDR_LIMIT)
        })
        .ok()?;
    Some(AddrRun {
        next: start,
        end: start + len,
    })
}

/// The address for `size` bytes aligned to `align` (a power of two that divides
/// [`ADDR_RUN`]) on `device`, from its run or a new one; `None` once no run is left.
pub(super) fn place(st: &mut State, device: usize, size: usize, align: u64) -> Option<u64> {
    let run = &mut st.addr[device];
    if let Some(at) = run.next.checked_next_multiple_of(align) {
        if let Some(next) = bump(at, size, align, run.end) {
            run.next = next;
            return Some(at);
        }
    }
    let mut fresh = take_run((size as u64).checked_add(2 * align)?)?;
    let at = fresh.next;
    fresh.next = bump(at, size, align, fresh.end)?;
    *run = fresh;
    Some(at)
}

/// Page size of the simulated virtual memory management, as on current NVIDIA GPUs.
pub const VMM_GRANULARITY: usize = 2 << 20;
/// Alignment of device allocations, as CUDA guarantees (256 B; we use 512).
pub(super) const DEVICE_ALIGN: u64 = 512;

impl SimBackend {
    pub(super) fn host_kind(st: &State, ptr: NonNull<u8>, len: usize, kind: HostKind) -> HostKind {
        // Trust registration over the caller's label: pinned speed needs registration.
        let p = ptr.as_ptr() as usize;
        match kind {
            HostKind::Managed => HostKind::Managed,
            _ if is_registered(st, p, len) => HostKind::Pinned,
            _ => HostKind::Pageable,
        }
    }

    /// Resolves one side of a copy to a host-addressable pointer.
    pub(super) fn resolve(st: &State, r: MemRef, len: usize) -> Result<*mut u8> {
        match r {
            MemRef::Host { ptr, .. } => Ok(ptr.as_ptr()),
            MemRef::Device { device, ptr } => {
                if let Some((start, r)) = st.reservations.range(..=ptr.0).next_back() {
                    let off = (ptr.0 - start) as usize;
                    if off < r.size {
                        if r.device != device || !r.covered(off, len, true) {
                            return Err(Error::InvalidArgument(format!(
                                "{:#x}+{len} on sim device {device} is not fully mapped memory \
                                 with access set",
                                ptr.0
                            )));
                        }
                        // SAFETY: off + len lies inside the reservation's host mapping
                        // (covered() checked every byte is in a mapping inside it).
                        return Ok(unsafe { r.host.ptr.as_ptr().add(off) });
                    }
                }
                let (start, a) = st
                    .device_allocs
                    .range(..=ptr.0)
                    .next_back()
                    .ok_or_else(|| bad_device_ptr(device, ptr))?;
                let off = (ptr.0 - start) as usize;
                if a.device != device || off.checked_add(len).is_none_or(|e| e > a.len) {
                    return Err(bad_device_ptr(device, ptr));
                }
                // SAFETY: off + len <= a.len, so the result stays inside the allocation.
                Ok(unsafe { a.mem.ptr.as_ptr().add(off) })
            }
        }
    }
}

/// Records that work ending at `end` uses `r`'s memory, if it lies in a reservation
/// (so that unmapping it before then can be refused).
pub(super) fn mark_busy(st: &mut State, r: MemRef, len: usize, end: u64) {
    let MemRef::Device { ptr, .. } = r else {
        return;
    };
    if let Some((start, res)) = st.reservations.range_mut(..=ptr.0).next_back() {
        let off = (ptr.0 - start) as usize;
        if off < res.size {
            for m in res.touched(off, len) {
                m.busy_until = m.busy_until.max(end);
            }
        }
    }
}

/// The next free address after `size` bytes at `addr` (aligned, with a gap so that
/// neighbours never touch), or `None` if that passes `end`.
pub(super) fn bump(addr: u64, size: usize, align: u64, end: u64) -> Option<u64> {
    let next = addr
        .checked_add(size as u64)?
        .checked_next_multiple_of(align)?
        .checked_add(align)?;
    (next <= end).then_some(next)
}

pub(super) fn out_of_addresses(device: usize, size: usize) -> Error {
    Error::InvalidArgument(format!(
        "sim device {device}: no address range for {size} bytes (over 2^52 bytes, or the \
         process's simulators have used up their address space)"
    ))
}

pub(super) fn bad_device_ptr(device: usize, ptr: DevicePtr) -> Error {
    Error::InvalidArgument(format!(
        "{:#x} is not a live allocation of sim device {device} (or the range runs past its end)",
        ptr.0
    ))
}

/// Whether registrations cover `p..p+len` with no gap (a large region is registered in
/// several adjacent pieces, and a copy may cross from one to the next).
pub(super) fn is_registered(st: &State, p: usize, len: usize) -> bool {
    let end = p + len;
    let mut at = p;
    while at < end {
        match st.registered.range(..=at).next_back() {
            Some((s, l)) if s + l > at => at = s + l,
            _ => return false,
        }
    }
    true
}

pub(super) fn find_managed(st: &State, p: usize, len: usize) -> Option<&ManagedAlloc> {
    st.managed
        .range(..=p)
        .next_back()
        .filter(|(s, m)| p + len <= *s + m.len)
        .map(|(_, m)| m)
}
