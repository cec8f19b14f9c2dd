//! Host memory, below the backends: what every layer above gets host memory from.
//!
//! - [`HostRegion`] (`region.rs`): pageable host memory, an anonymous `mmap` advised for
//!   transparent huge pages when it is at least [`HUGE_PAGE_SIZE`], bound to NUMA nodes
//!   with `mbind` before any page is touched, then pre-faulted so the pages sit on their
//!   node at once. Backends pin it; pools and the tier store hand it out.
//! - The sizes of this machine: [`page_size`], [`available_memory`], and meminfo
//!   parsing (also for [`Topology`](crate::topology::Topology)); read-only file
//!   mappings for parameters read straight out of a file.
//! - `fork`: which process a value was made in, so that a `fork()`ed child leaks what
//!   belongs to its parent instead of freeing it.
//! - [`numa_alloc`]: [`NumaAlloc`](numa_alloc::NumaAlloc), a NUMA-placing
//!   `GlobalAlloc` for the whole program, and `block_cache`, its lock-free cache.
//!
//! `unsafe` lives here as in `backend/` and `sys/`: these are the system calls that
//! make, place and free memory, each block with its `SAFETY` comment.

pub(crate) mod block_cache;
pub(crate) mod fork;
// Its constructors are `const` (for a `static`); loom's atomics are not, so under loom
// only its cache (`block_cache`) is built, and modelled.
#[cfg(not(loom))]
pub mod numa_alloc;
mod region;

use std::sync::OnceLock;

use nix::errno::Errno;

pub use self::region::HostRegion;
use crate::error::{Error, Result};

/// Size of a transparent huge page (PMD size on x86-64 and 4 KiB-page arm64). Regions at
/// least this large are aligned to it and advised with `MADV_HUGEPAGE`.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// At most this many pages are looked up by [`HostRegion::page_nodes`].
pub const PAGE_NODE_SAMPLES: usize = 4096;

/// The base page size of this machine.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the running system; no memory is passed.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if n > 0 {
            n as usize
        } else {
            4096
        }
    })
}

/// Host memory this process could allocate now, for [`Error::OutOfMemory`]: what the
/// kernel says is available (`MemAvailable`, else `sysinfo`'s free RAM), and no more than
/// the address space left under `RLIMIT_AS` when the process has such a limit (there a
/// mapping fails long before RAM runs out, and the RAM figure would tell a caller that
/// the memory it was refused is free).
pub fn available_memory() -> usize {
    ram_available().min(address_space_left().unwrap_or(usize::MAX))
}

fn ram_available() -> usize {
    if let Ok(text) = std::fs::read_to_string("/proc/meminfo") {
        if let Ok(Some(bytes)) = parse_meminfo_field(&text, None, "MemAvailable") {
            return usize::try_from(bytes).unwrap_or(usize::MAX);
        }
    }
    // SAFETY: sysinfo only writes the struct we pass, which is a live, zeroed local.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable `struct sysinfo`.
    if unsafe { libc::sysinfo(&mut info) } == 0 {
        (info.freeram as usize).saturating_mul(info.mem_unit.max(1) as usize)
    } else {
        0
    }
}

/// The soft `RLIMIT_AS` less the process's mapped size (`/proc/self/statm`), or `None`
/// when there is no limit (or it cannot be read).
fn address_space_left() -> Option<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().next()?.parse().ok()?;
    let limit = usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
    Some(limit.saturating_sub(pages.saturating_mul(page_size())))
}

/// Maps all of `file` read-only into this process (`PROT_READ`, `MAP_SHARED`), for
/// parameters read straight out of a file with no host copy.
///
/// Known limitation (the one `memmap2` documents for every file mapping): the mapping
/// stays coherent with the file, so if another process truncates the file while it is
/// mapped, reading the pages past the new end raises `SIGBUS`, and if it rewrites the
/// bytes, readers see the new bytes under a `&[u8]` that promised them immutable.
/// Callers map files they own (model files at rest); nothing in this process writes them.
pub(crate) fn map_file_readonly(file: &std::fs::File) -> Result<memmap2::Mmap> {
    // Why this holds: the mapping is read-only (`Mmap`, never `MmapMut`) and backed by a
    // file this process only reads; `memmap2` maps the whole length it reads with
    // `fstat`, so every byte of the slice lies inside the file at mapping time.
    // SAFETY: as above; another process truncating or rewriting the file while it is
    // mapped is outside our control: the limitation documented on this function.
    unsafe { memmap2::Mmap::map(file) }
        .map_err(|e| Error::os("mmap", e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)))
}

/// One `kB` field of a meminfo file (`/proc/meminfo`, a node's `meminfo`,
/// `/proc/self/status`) in bytes; `Ok(None)` when the field is absent. `node: Some(n)`
/// expects lines prefixed `Node n`.
pub(crate) fn parse_meminfo_field(
    text: &str,
    node: Option<u32>,
    field: &str,
) -> Result<Option<u64>, String> {
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let Some(n) = node {
            if words.next() != Some("Node") {
                continue;
            }
            let id = words.next().unwrap_or("");
            if id.parse::<u32>().ok() != Some(n) {
                return Err(format!("line {line:?} is not about node {n}"));
            }
        }
        let Some(key) = words.next().and_then(|k| k.strip_suffix(':')) else {
            continue;
        };
        if key != field {
            continue;
        }
        let value = words
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("bad {field} line {line:?}"))?;
        let bytes = match words.next() {
            Some("kB") => value.checked_mul(1024),
            None => Some(value),
            Some(unit) => return Err(format!("unknown unit {unit:?} in {line:?}")),
        };
        return bytes
            .map(Some)
            .ok_or_else(|| format!("{field} overflows in {line:?}"));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_read_in_bytes() {
        let text = "MemTotal:       16318480 kB\nMemAvailable:    9500000 kB\nHugePages_Total: 0\n";
        assert_eq!(
            parse_meminfo_field(text, None, "MemAvailable"),
            Ok(Some(9_500_000 * 1024))
        );
        assert_eq!(
            parse_meminfo_field(text, None, "HugePages_Total"),
            Ok(Some(0))
        );
        assert_eq!(parse_meminfo_field(text, None, "Missing"), Ok(None));
        let node = "Node 1 MemFree:  2048 kB\n";
        assert_eq!(
            parse_meminfo_field(node, Some(1), "MemFree"),
            Ok(Some(2 << 20))
        );
        assert!(parse_meminfo_field(node, Some(0), "MemFree").is_err());
        assert!(page_size().is_power_of_two());
        assert!(available_memory() > 0);
    }
}
