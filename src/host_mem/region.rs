//! [`HostRegion`]: host memory placed by a NUMA policy, pre-faulted, unmapped on drop.

use std::ptr::NonNull;

use hetmem_sys::numa;
use libc::c_void;
use nix::errno::Errno;

use super::fork::{self, Epoch};
use super::{available_memory, page_size, HUGE_PAGE_SIZE, PAGE_NODE_SAMPLES};
use crate::error::{Error, Result};
use crate::placement::{MemKind, NumaPolicy};

/// `(offset, len)` of the parts a mapping of `map_len` bytes is pre-faulted in by
/// `threads` threads: contiguous, in order, whole huge pages when `huge` (whole base
/// pages otherwise), at most `threads` of them, covering the mapping.
fn prefault_parts(map_len: usize, huge: bool, threads: usize) -> Vec<(usize, usize)> {
    let unit = if huge { HUGE_PAGE_SIZE } else { page_size() };
    let threads = threads.max(1);
    let per = map_len.div_ceil(threads).next_multiple_of(unit).max(unit);
    (0..map_len)
        .step_by(per)
        .map(|off| (off, per.min(map_len - off)))
        .collect()
}

/// A region of host memory placed by a NUMA policy; unmapped on drop.
#[derive(Debug)]
pub struct HostRegion {
    ptr: NonNull<u8>,
    /// Bytes asked for.
    len: usize,
    /// Bytes mapped: `len` rounded up to a page.
    map_len: usize,
    huge: bool,
    /// Set by [`HostRegion::leak`]: drop leaves the mapping in place.
    leaked: bool,
    /// Largest piece the region is registered with the backend in, once pinned (see
    /// `OwnedMemory::pinned_with`); 0 when it is registered whole (the backend then
    /// chunks by [`HOST_REGISTER_CHUNK`](crate::backend::registered::HOST_REGISTER_CHUNK) itself).
    register_chunk: usize,
    /// When the region was advised `MADV_DONTFORK` (see
    /// [`HostRegion::exclude_from_fork`]): a child forked after that has no mapping here.
    dontfork: Option<Epoch>,
}

// SAFETY: the region is plain memory owned by this value; nothing in it is tied to a thread.
unsafe impl Send for HostRegion {}
// SAFETY: &HostRegion only exposes the pointer value; access through it is the caller's concern.
unsafe impl Sync for HostRegion {}

/// Highest node id (exclusive) a mask may name: the kernel reads at most `PAGE_SIZE * 8`
/// bits of a node mask (`mm/mempolicy.c`, `get_nodes()`), and refuses larger `maxnode`
/// values with `EINVAL`. Checking here keeps an absurd id (`u32::MAX`) from building a
/// 512 MiB mask only for the kernel to refuse it.
const MAX_MASK_NODES: u32 = 4096 * 8;

/// `mbind` arguments for a policy, or `None` for the default policy.
///
/// Nodes are not checked against a topology here (that is the placement layer's job, see
/// `Manager`): a node the kernel does not have is its `EINVAL`, reported as
/// [`Error::Os`] `{ call: "mbind", .. }` like any other refusal.
fn mbind_args(policy: &NumaPolicy) -> Result<Option<(i32, numa::NodeMask)>> {
    let check = |nodes: &[u32]| {
        if nodes.iter().any(|&n| n >= MAX_MASK_NODES) {
            Err(Error::os("mbind", Errno::EINVAL))
        } else {
            Ok(numa::NodeMask::from_nodes(nodes))
        }
    };
    match policy {
        NumaPolicy::Default => Ok(None),
        NumaPolicy::Bind(n) => Ok(Some((numa::MPOL_BIND, check(&[*n])?))),
        NumaPolicy::Preferred(n) => Ok(Some((numa::MPOL_PREFERRED, check(&[*n])?))),
        NumaPolicy::Interleave(nodes) => {
            if nodes.is_empty() {
                return Err(Error::InvalidArgument(
                    "NumaPolicy::Interleave needs at least one node".into(),
                ));
            }
            Ok(Some((numa::MPOL_INTERLEAVE, check(nodes)?)))
        }
        NumaPolicy::NearDevice(d) => Err(Error::InvalidArgument(format!(
            "NumaPolicy::NearDevice({d}) must be resolved to a node before allocating host memory"
        ))),
    }
}

/// `len` rounded up to whole pages, or the reason it cannot be mapped.
fn page_round(len: usize) -> Result<usize> {
    if len == 0 {
        return Err(Error::InvalidSize {
            requested: len,
            reason: "zero bytes",
        });
    }
    let page = page_size();
    let rounded = len
        .checked_add(page - 1)
        .map(|n| n & !(page - 1))
        .ok_or(Error::InvalidSize {
            requested: len,
            reason: "overflows when rounded up to a page",
        })?;
    if rounded > isize::MAX as usize {
        return Err(Error::InvalidSize {
            requested: len,
            reason: "larger than isize::MAX",
        });
    }
    Ok(rounded)
}

/// Maps `map_len` bytes of anonymous read-write memory, aligned to [`HUGE_PAGE_SIZE`]
/// when `align_huge` (so that every 2 MiB of the region can be one huge page).
fn map_anonymous(map_len: usize, align_huge: bool, requested: usize) -> Result<NonNull<u8>> {
    // Over-reserve by one huge page less a base page, then trim head and tail: mmap itself
    // only promises base-page alignment (kernels since 6.7 align large anonymous maps on
    // their own, older ones do not).
    let page = page_size();
    let reserve = if align_huge {
        map_len.checked_add(HUGE_PAGE_SIZE - page)
    } else {
        Some(map_len)
    };
    let Some(reserve) = reserve else {
        return Err(Error::InvalidSize {
            requested,
            reason: "overflows when aligned to a huge page",
        });
    };
    // No MAP_NORESERVE: the pages are faulted in right away, so let the kernel's
    // overcommit check refuse a hopeless size here (a clean ENOMEM) rather than in the
    // middle of faulting (the OOM killer).
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches
    // no existing memory; the result is checked before use.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        let errno = Errno::last();
        return Err(match errno {
            Errno::ENOMEM => Error::oom(MemKind::Host, requested, available_memory()),
            e => Error::os("mmap", e),
        });
    }
    let start = addr as usize;
    let aligned = if align_huge {
        (start + HUGE_PAGE_SIZE - 1) & !(HUGE_PAGE_SIZE - 1)
    } else {
        start
    };
    let head = aligned - start;
    let tail = reserve - head - map_len;
    for (at, len) in [(start, head), (aligned + map_len, tail)] {
        if len == 0 {
            continue;
        }
        // SAFETY: `at..at+len` lies in the reservation just mapped above, outside the
        // part we keep, and nothing refers to it.
        if unsafe { libc::munmap(at as *mut c_void, len) } != 0 {
            tracing::warn!(error = %Errno::last(), len, "munmap of alignment slack failed");
        }
    }
    NonNull::new(aligned as *mut u8).ok_or_else(|| Error::os("mmap", Errno::EFAULT))
}

impl HostRegion {
    /// Maps `len` bytes placed by `policy` (already resolved: not `NearDevice`).
    ///
    /// The pages are faulted in before this returns, so they are committed and already
    /// on the policy's node(s). Errors: [`Error::InvalidSize`] for 0 or sizes no mapping
    /// can have; [`Error::InvalidArgument`] for `NearDevice` or an empty interleave set;
    /// [`Error::Os`] `{ call: "mbind", errno: EINVAL }` for a node the kernel does not
    /// have (or one without memory); [`Error::OutOfMemory`] (tier host) when the kernel
    /// refuses the memory.
    ///
    /// The backend does not know the machine's topology: callers that want
    /// [`Error::UnknownNumaNode`] / [`Error::NumaNodeWithoutMemory`] check the nodes
    /// first, as `Manager` does.
    pub fn alloc(len: usize, policy: &NumaPolicy) -> Result<HostRegion> {
        Self::alloc_parallel(len, policy, 1)
    }

    /// [`HostRegion::alloc`], pre-faulting the pages from up to `threads` threads: the
    /// range is split into `threads` parts (whole huge pages where the region is advised
    /// for them) and each thread populates its own part. The pages still land on the
    /// policy's node(s): `mbind` has run on the whole range before any thread touches
    /// it, and the policy belongs to the range, not to the faulting thread. Worth it for
    /// large regions only (zeroing pages is the cost, and it is per-core work); with
    /// `threads <= 1`, or a region of fewer than two parts, it is `alloc`.
    pub fn alloc_parallel(len: usize, policy: &NumaPolicy, threads: usize) -> Result<HostRegion> {
        let map_len = page_round(len)?;
        let bind = mbind_args(policy)?;
        let huge = map_len >= HUGE_PAGE_SIZE;
        let ptr = map_anonymous(map_len, huge, len)?;
        // From here on, dropping `region` unmaps the memory on every error path.
        let region = HostRegion {
            ptr,
            len,
            map_len,
            huge,
            leaked: false,
            register_chunk: 0,
            dontfork: None,
        };

        if huge {
            // SAFETY: the range is the mapping we own; madvise(MADV_HUGEPAGE) only changes
            // how the kernel backs it.
            let rc = unsafe { libc::madvise(region.addr(), map_len, libc::MADV_HUGEPAGE) };
            if rc != 0 {
                match Errno::last() {
                    // THP compiled out or disabled (`never`): base pages it is.
                    Errno::EINVAL => {
                        tracing::debug!("MADV_HUGEPAGE refused (THP off); using base pages")
                    }
                    e => tracing::warn!(error = %e, "MADV_HUGEPAGE failed; using base pages"),
                }
            }
        }

        if let Some((mode, mask)) = &bind {
            // SAFETY: the range is our own fresh mapping with no page touched yet; the mask
            // buffer covers `maxnode - 1` bits by construction.
            let rc = unsafe {
                numa::mbind(
                    region.addr(),
                    map_len,
                    *mode,
                    mask.as_ptr(),
                    mask.maxnode(),
                    0,
                )
            };
            match rc.map_err(Errno::from_raw) {
                Ok(()) => {}
                // A preference or an interleave where the kernel allows no policies at
                // all (no NUMA, or a seccomp filter): there is nothing to choose between.
                // A node the kernel refuses (EINVAL) stays an error, as every refusal of
                // a bind does.
                Err(e @ (Errno::EPERM | Errno::ENOSYS))
                    if *mode == numa::MPOL_PREFERRED || *mode == numa::MPOL_INTERLEAVE =>
                {
                    tracing::debug!(error = %e, ?policy,
                        "mbind not permitted; no policy can be set, default placement");
                }
                Err(e) => return Err(Error::os("mbind", e)),
            }
        }

        region.prefault_parallel(threads)?;
        tracing::debug!(
            ptr = ?region.ptr,
            len,
            map_len,
            huge,
            threads,
            ?policy,
            "host region mapped"
        );
        Ok(region)
    }

    /// Faults every page in, after `mbind`, so each lands on its node now rather than at
    /// some first touch later (perhaps from a thread on another node, or after the memory
    /// was registered with a driver, when pages can no longer move).
    ///
    /// `MAP_POPULATE` is no use here: it faults at `mmap` time, before `mbind` could set
    /// the policy. `MADV_POPULATE_WRITE` (Linux 5.14) faults the range in the kernel in
    /// one call, honouring the policy and huge pages, and reports ENOMEM as an error
    /// instead of a SIGBUS later; older kernels answer EINVAL and we touch one byte per
    /// page instead.
    fn prefault_parallel(&self, threads: usize) -> Result<()> {
        let parts = prefault_parts(self.map_len, self.huge, threads);
        if parts.len() <= 1 {
            return self.prefault_range(0, self.map_len);
        }
        // Every part is its own thread, but the first is the caller's, and so is every
        // part no thread could be started for (a thread or pids limit): pre-faulting
        // then takes longer, it does not fail. The first error in range order is
        // reported.
        std::thread::scope(|s| {
            let mut helpers = Vec::with_capacity(parts.len() - 1);
            for &(off, len) in &parts[1..] {
                let spawned = std::thread::Builder::new()
                    .name("hetmem-prefault".into())
                    .spawn_scoped(s, move || self.prefault_range(off, len));
                match spawned {
                    Ok(h) => helpers.push(h),
                    Err(e) => {
                        tracing::warn!(error = %e, started = helpers.len(),
                            wanted = parts.len() - 1,
                            "cannot start a pre-faulting thread; the caller faults its part");
                        break;
                    }
                }
            }
            let started = 1 + helpers.len();
            let first = self.prefault_range(parts[0].0, parts[0].1);
            let rest: Vec<Result<()>> = parts[started..]
                .iter()
                .map(|&(off, len)| self.prefault_range(off, len))
                .collect();
            let joined: Vec<Result<()>> = helpers
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::InvalidArgument(
                            "a pre-faulting thread panicked".into(),
                        ))
                    })
                })
                .collect();
            std::iter::once(first).chain(joined).chain(rest).collect()
        })
    }

    /// Pre-faults `off..off+len` of the mapping (both page multiples); see `prefault`.
    fn prefault_range(&self, off: usize, len: usize) -> Result<()> {
        debug_assert!(off + len <= self.map_len);
        // SAFETY: `off + len <= map_len`, so the pointer stays inside our own mapping.
        let start = unsafe { self.ptr.as_ptr().add(off) };
        // SAFETY: the range lies in our own mapping; populating it writes nothing visible
        // (anonymous pages read as zero either way).
        let rc = unsafe { libc::madvise(start.cast(), len, libc::MADV_POPULATE_WRITE) };
        if rc == 0 {
            return Ok(());
        }
        match Errno::last() {
            Errno::EINVAL => {
                tracing::debug!("MADV_POPULATE_WRITE unsupported; touching pages");
                let page = page_size();
                for at in (0..len).step_by(page) {
                    // The volatile write of zero (what the page already holds) keeps the
                    // store from being elided.
                    // SAFETY: `at < len`: the byte is in our read-write mapping, no
                    // reference to it exists yet, and other threads' parts are disjoint.
                    unsafe { start.add(at).write_volatile(0) };
                }
                Ok(())
            }
            Errno::ENOMEM => Err(Error::oom(MemKind::Host, self.len, available_memory())),
            e => Err(Error::os("madvise(MADV_POPULATE_WRITE)", e)),
        }
    }

    /// Keeps the region out of processes forked from this one (`MADV_DONTFORK`), for
    /// memory about to be pinned: a driver that pins with `FOLL_LONGTERM` (recent NVIDIA
    /// kernel modules) makes `fork()` copy every pinned page into the child at once,
    /// where it is useless (the child cannot use the parent's GPU state). A forked child
    /// then has nothing mapped at this range, and drop leaves the range alone there.
    /// Does nothing when `HETMEM_DONTFORK=0`. A refusal (none is expected on an
    /// anonymous mapping) is logged, and the region works as before, inherited by
    /// children.
    pub(crate) fn exclude_from_fork(&mut self) {
        if self.dontfork.is_some() || !fork::dontfork_enabled() {
            return;
        }
        // SAFETY: the range is the mapping we own; MADV_DONTFORK only changes whether
        // fork() copies it into a child, not the memory or its mapping here.
        let rc = unsafe { libc::madvise(self.addr(), self.map_len, libc::MADV_DONTFORK) };
        if rc != 0 {
            tracing::warn!(target: "hetmem", error = %Errno::last(), len = self.map_len,
                "MADV_DONTFORK refused: a forked child will copy this pinned region");
            return;
        }
        self.dontfork = Some(Epoch::now());
    }

    /// The largest piece this region is registered in (0: registered whole).
    pub(crate) fn register_chunk(&self) -> usize {
        self.register_chunk
    }

    /// Records the piece size the region was registered in, so that it is unregistered
    /// in the same pieces.
    pub(crate) fn set_register_chunk(&mut self, chunk: usize) {
        self.register_chunk = chunk;
    }

    fn addr(&self) -> *mut c_void {
        self.ptr.as_ptr().cast()
    }

    /// First byte.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes, as asked for.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never true: zero sizes are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Leaves the mapping in place when this value is dropped. For memory a driver may
    /// still use (a failed unregistration, a copy that could not be waited for): a leak
    /// is better than a device writing into pages the kernel has handed to someone else.
    pub fn leak(&mut self) {
        self.leaked = true;
    }

    /// Bytes actually mapped: [`HostRegion::len`] rounded up to a page.
    pub fn mapped_len(&self) -> usize {
        self.map_len
    }

    /// Whether the region was advised for transparent huge pages (and aligned to them).
    pub fn huge_pages_advised(&self) -> bool {
        self.huge
    }

    /// The NUMA node of the region's pages, from `move_pages` in query mode: one entry per
    /// sampled page, where the sample is every page of regions up to
    /// [`PAGE_NODE_SAMPLES`] pages and that many evenly spaced pages (first and last
    /// included) of larger ones. An entry is a node id, or a negative errno for a page the
    /// kernel could not report (`-ENOENT`: not present).
    pub fn page_nodes(&self) -> Result<Vec<i32>> {
        let page = page_size();
        let pages = self.map_len / page;
        let indices: Vec<usize> = if pages <= PAGE_NODE_SAMPLES {
            (0..pages).collect()
        } else {
            (0..PAGE_NODE_SAMPLES)
                .map(|i| i * (pages - 1) / (PAGE_NODE_SAMPLES - 1))
                .collect()
        };
        let addrs: Vec<*const c_void> = indices
            .iter()
            // `wrapping_add` only computes addresses; nothing is dereferenced here.
            .map(|&i| self.ptr.as_ptr().wrapping_add(i * page) as *const c_void)
            .collect();
        let mut status = vec![i32::MIN; addrs.len()];
        numa::query_page_nodes(&addrs, &mut status)
            .map_err(|e| Error::os("move_pages", Errno::from_raw(e)))?;
        Ok(status)
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        if self.leaked {
            return;
        }
        if self.dontfork.is_some_and(|e| !e.is_current()) {
            // A forked child: the region was never mapped here, and the range may hold
            // the child's own mappings by now.
            return;
        }
        // SAFETY: `ptr..ptr+map_len` is the mapping made in `alloc`, owned by this value and
        // unmapped only here.
        if unsafe { libc::munmap(self.addr(), self.map_len) } != 0 {
            tracing::warn!(
                ptr = ?self.ptr,
                len = self.map_len,
                error = %Errno::last(),
                "munmap of host region failed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        let page = page_size();
        assert_eq!(page_round(1).unwrap(), page);
        assert_eq!(page_round(page).unwrap(), page);
        assert_eq!(page_round(page + 1).unwrap(), 2 * page);
        assert!(matches!(page_round(0), Err(Error::InvalidSize { .. })));
        assert!(matches!(
            page_round(usize::MAX),
            Err(Error::InvalidSize { .. })
        ));
        assert!(matches!(
            page_round(isize::MAX as usize + 1),
            Err(Error::InvalidSize { .. })
        ));
    }

    #[test]
    fn prefault_parts_cover_the_mapping() {
        let page = page_size();
        assert_eq!(prefault_parts(page, false, 8), vec![(0, page)]);
        assert_eq!(prefault_parts(10 * page, false, 1), vec![(0, 10 * page)]);
        let parts = prefault_parts(10 * page, false, 4);
        assert_eq!(
            parts,
            vec![
                (0, 3 * page),
                (3 * page, 3 * page),
                (6 * page, 3 * page),
                (9 * page, page)
            ]
        );
        let h = HUGE_PAGE_SIZE;
        // A huge region: parts are whole huge pages, the tail takes what is left.
        let parts = prefault_parts(5 * h + page, true, 2);
        assert_eq!(parts, vec![(0, 3 * h), (3 * h, 2 * h + page)]);
        for (len, huge, threads) in [(1 << 30, true, 8), (7 * h, true, 3), (13 * page, false, 5)] {
            let parts = prefault_parts(len, huge, threads);
            assert!(parts.len() <= threads);
            assert_eq!(parts.iter().map(|p| p.1).sum::<usize>(), len);
            assert!(parts.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
        }
    }

    #[test]
    fn parallel_prefault_is_placed_and_zeroed() {
        let len = 8 * HUGE_PAGE_SIZE;
        let r = HostRegion::alloc_parallel(len, &NumaPolicy::Bind(0), 4).unwrap();
        let nodes = r.page_nodes().unwrap();
        assert!(nodes.iter().all(|&n| n == 0), "{nodes:?}");
        // SAFETY: the region is mapped, readable and `len` bytes long; nothing writes it.
        let bytes = unsafe { std::slice::from_raw_parts(r.ptr().as_ptr(), len) };
        assert!(bytes.iter().all(|&b| b == 0));
    }

    #[test]
    fn huge_alignment() {
        let r = HostRegion::alloc(HUGE_PAGE_SIZE + 1, &NumaPolicy::Default).unwrap();
        assert!(r.huge_pages_advised());
        assert_eq!(r.ptr().as_ptr() as usize % HUGE_PAGE_SIZE, 0);
        assert_eq!(r.mapped_len(), HUGE_PAGE_SIZE + page_size());
        let small = HostRegion::alloc(100, &NumaPolicy::Default).unwrap();
        assert!(!small.huge_pages_advised());
        assert_eq!(small.mapped_len(), page_size());
    }
}
