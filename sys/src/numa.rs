//! Raw NUMA memory-policy system calls: `mbind`, `set_mempolicy`, `get_mempolicy` and
//! `move_pages`, called through `libc::syscall` (glibc has no wrappers; libnuma is not
//! a dependency). No policy logic lives here: each wrapper returns `Ok` or the `errno`
//! the kernel reported.
//!
//! # Node masks and `maxnode`
//!
//! The kernel takes a node set as an array of `unsigned long` words plus a `maxnode`
//! argument, and `maxnode` is off by one from what its name says: the kernel starts with
//! `--maxnode` (`get_nodes()` / `copy_nodes_to_user()` in `mm/mempolicy.c`) and then uses
//! that many bits. To hand it a mask of `B` bits you pass `maxnode = B + 1`; passing `B`
//! silently drops the highest node. libnuma does the same (`bmp->size + 1`).
//! [`NodeMask::maxnode`] returns the right value for its buffer. Further rules the kernel
//! enforces: `maxnode - 1` may not exceed `PAGE_SIZE * 8` bits, bits at or above the
//! kernel's `MAX_NUMNODES` must be clear (else `EINVAL`), and `get_mempolicy` with a mask
//! needs room for at least `nr_node_ids` bits.

use libc::{c_int, c_long, c_uint, c_ulong, c_void};

/// `MPOL_DEFAULT`: fall back to the thread's policy (for `mbind`) or the system default
/// (first touch on the local node). Takes an empty node mask.
pub const MPOL_DEFAULT: c_int = 0;
/// `MPOL_PREFERRED`: allocate on the one node in the mask first, elsewhere when it is full.
pub const MPOL_PREFERRED: c_int = 1;
/// `MPOL_BIND`: allocate only on the nodes in the mask.
pub const MPOL_BIND: c_int = 2;
/// `MPOL_INTERLEAVE`: spread pages round-robin over the nodes in the mask.
pub const MPOL_INTERLEAVE: c_int = 3;
/// `MPOL_LOCAL`: allocate on the node of the CPU that faults the page (Linux 3.8).
pub const MPOL_LOCAL: c_int = 4;
/// `MPOL_PREFERRED_MANY`: prefer any node of the mask (Linux 5.15).
pub const MPOL_PREFERRED_MANY: c_int = 5;

/// Mode flag: node numbers are absolute, not remapped when the cpuset changes.
pub const MPOL_F_STATIC_NODES: c_int = 1 << 15;
/// Mode flag: node numbers are relative to the cpuset's allowed nodes.
pub const MPOL_F_RELATIVE_NODES: c_int = 1 << 14;

/// `get_mempolicy` flag: return a node id in `*mode` instead of a policy.
pub const MPOL_F_NODE: c_ulong = 1 << 0;
/// `get_mempolicy` flag: look up the policy (or, with [`MPOL_F_NODE`], the node) of the
/// page at `addr`.
pub const MPOL_F_ADDR: c_ulong = 1 << 1;
/// `get_mempolicy` flag: return the set of nodes the thread may use.
pub const MPOL_F_MEMS_ALLOWED: c_ulong = 1 << 2;

/// `mbind` flag: fail with `EIO` if existing pages do not follow the policy.
pub const MPOL_MF_STRICT: c_uint = 1 << 0;
/// `mbind` / `move_pages` flag: migrate pages used only by this process.
pub const MPOL_MF_MOVE: c_uint = 1 << 1;
/// `mbind` / `move_pages` flag: migrate shared pages too (needs `CAP_SYS_NICE`).
pub const MPOL_MF_MOVE_ALL: c_uint = 1 << 2;

/// Bits in one word of a node mask.
const WORD_BITS: usize = c_ulong::BITS as usize;

/// A node set in the kernel's layout: bit `n` of the word array is node `n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMask {
    words: Vec<c_ulong>,
}

impl NodeMask {
    /// An empty mask with room for at least `bits` nodes (at least one word).
    pub fn with_capacity(bits: usize) -> NodeMask {
        let words = bits.div_ceil(WORD_BITS).max(1);
        NodeMask {
            words: vec![0; words],
        }
    }

    /// A mask holding exactly `nodes`, just large enough for the highest one.
    pub fn from_nodes(nodes: &[u32]) -> NodeMask {
        let highest = nodes.iter().copied().max().map_or(0, |n| n as usize + 1);
        let mut mask = NodeMask::with_capacity(highest);
        for &n in nodes {
            mask.set(n);
        }
        mask
    }

    /// Adds node `node`, growing the buffer if needed.
    pub fn set(&mut self, node: u32) {
        let (word, bit) = (node as usize / WORD_BITS, node as usize % WORD_BITS);
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << bit;
    }

    /// Whether node `node` is in the mask.
    pub fn contains(&self, node: u32) -> bool {
        let (word, bit) = (node as usize / WORD_BITS, node as usize % WORD_BITS);
        self.words.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    /// The nodes in the mask, ascending.
    pub fn nodes(&self) -> Vec<u32> {
        (0..self.bits() as u32)
            .filter(|&n| self.contains(n))
            .collect()
    }

    /// Whether no node is set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Size of the buffer in bits (a multiple of the word size).
    pub fn bits(&self) -> usize {
        self.words.len() * WORD_BITS
    }

    /// The `maxnode` argument that makes the kernel use every bit of this buffer:
    /// `bits() + 1`, because the kernel decrements it first (see the module docs).
    pub fn maxnode(&self) -> c_ulong {
        (self.bits() + 1) as c_ulong
    }

    /// The word array, for the kernel to read.
    pub fn as_ptr(&self) -> *const c_ulong {
        self.words.as_ptr()
    }

    /// The word array, for the kernel to write (`get_mempolicy`).
    pub fn as_mut_ptr(&mut self) -> *mut c_ulong {
        self.words.as_mut_ptr()
    }
}

/// Words in a [`FixedNodeMask`].
pub const FIXED_MASK_WORDS: usize = 16;

/// A node set of fixed size ([`FixedNodeMask::BITS`] nodes, 1024 on 64-bit targets) that
/// lives on the stack or in a `static`: for callers that may not allocate, such as a
/// global allocator. Same layout and `maxnode` rule as [`NodeMask`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedNodeMask {
    words: [c_ulong; FIXED_MASK_WORDS],
}

impl FixedNodeMask {
    /// Nodes the mask can hold.
    pub const BITS: usize = FIXED_MASK_WORDS * WORD_BITS;

    /// The empty set.
    pub const fn empty() -> FixedNodeMask {
        FixedNodeMask {
            words: [0; FIXED_MASK_WORDS],
        }
    }

    /// The set `{node}`, or `None` if `node` does not fit.
    pub const fn single(node: u32) -> Option<FixedNodeMask> {
        let n = node as usize;
        if n >= Self::BITS {
            return None;
        }
        let mut mask = FixedNodeMask::empty();
        mask.words[n / WORD_BITS] = 1 << (n % WORD_BITS);
        Some(mask)
    }

    /// Whether node `node` is in the set.
    pub const fn contains(&self, node: u32) -> bool {
        let n = node as usize;
        n < Self::BITS && self.words[n / WORD_BITS] & (1 << (n % WORD_BITS)) != 0
    }

    /// Whether no node is set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The `maxnode` argument for this buffer: `BITS + 1` (see the module docs).
    pub const fn maxnode(&self) -> c_ulong {
        (Self::BITS + 1) as c_ulong
    }

    /// The word array, for the kernel to read.
    pub const fn as_ptr(&self) -> *const c_ulong {
        self.words.as_ptr()
    }

    /// The word array, for the kernel to write (`get_mempolicy`).
    pub fn as_mut_ptr(&mut self) -> *mut c_ulong {
        self.words.as_mut_ptr()
    }
}

/// The calling thread's `errno` after a failed system call.
fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL)
}

/// Turns a `syscall` return value into `Ok(value)` or `Err(errno)`.
fn check(ret: c_long) -> Result<c_long, i32> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

/// `mbind(2)`: sets the memory policy of `addr..addr+len`.
///
/// `addr` must be page-aligned (else `EINVAL`); `nmask`/`maxnode` follow the convention
/// in the module docs ([`NodeMask::as_ptr`], [`NodeMask::maxnode`]); `nmask` may be null
/// with [`MPOL_DEFAULT`] (and [`MPOL_PREFERRED`], meaning local allocation).
///
/// # Safety
/// `addr..addr+len` must be memory this caller owns: with [`MPOL_MF_MOVE`] the kernel may
/// migrate the pages, and a policy on someone else's mapping changes where their pages
/// go. `nmask`, if not null, must point to at least `maxnode - 1` readable bits.
pub unsafe fn mbind(
    addr: *mut c_void,
    len: usize,
    mode: c_int,
    nmask: *const c_ulong,
    maxnode: c_ulong,
    flags: c_uint,
) -> Result<(), i32> {
    // SAFETY: arguments are passed through unchanged; the caller guarantees the range is
    // its own and that `nmask` covers `maxnode - 1` bits, which is all the kernel reads.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as c_ulong,
            len as c_ulong,
            mode as c_ulong,
            nmask,
            maxnode,
            flags as c_ulong,
        )
    };
    check(ret).map(drop)
}

/// `set_mempolicy(2)`: sets the calling thread's default memory policy.
///
/// # Safety
/// `nmask`, if not null, must point to at least `maxnode - 1` readable bits.
pub unsafe fn set_mempolicy(
    mode: c_int,
    nmask: *const c_ulong,
    maxnode: c_ulong,
) -> Result<(), i32> {
    // SAFETY: the kernel reads at most `maxnode - 1` bits of `nmask`, which the caller
    // guarantees are readable; nothing else is dereferenced.
    let ret = unsafe { libc::syscall(libc::SYS_set_mempolicy, mode as c_long, nmask, maxnode) };
    check(ret).map(drop)
}

/// `get_mempolicy(2)`: reads a policy, or with [`MPOL_F_NODE`] | [`MPOL_F_ADDR`] the node
/// of the page at `addr` (into `*mode`; the kernel faults the page in if it is not
/// present, which allocates it under the range's policy).
///
/// # Safety
/// `mode`, if not null, must be writable for one `c_int`; `nmask`, if not null, must be
/// writable for `maxnode - 1` bits rounded up to whole words, and `maxnode - 1` must be
/// at least the kernel's `nr_node_ids`. With [`MPOL_F_ADDR`], `addr` must lie in a
/// mapping of this process that may be faulted in.
pub unsafe fn get_mempolicy(
    mode: *mut c_int,
    nmask: *mut c_ulong,
    maxnode: c_ulong,
    addr: *const c_void,
    flags: c_ulong,
) -> Result<(), i32> {
    // SAFETY: the kernel writes `*mode` and `maxnode - 1` bits of `nmask`, both of which
    // the caller guarantees are writable (or null, which the kernel skips).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            mode,
            nmask,
            maxnode,
            addr as c_ulong,
            flags,
        )
    };
    check(ret).map(drop)
}

/// The node holding the page at `addr`, via `get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)`.
///
/// # Safety
/// `addr` must lie in a mapping of this process that may be faulted in: an absent page is
/// allocated (zero-filled) by the lookup.
pub unsafe fn node_of_address(addr: *const c_void) -> Result<i32, i32> {
    let mut node: c_int = -1;
    // SAFETY: `node` is a live local, writable for one c_int; no mask is passed; the
    // caller vouches for `addr`.
    unsafe {
        get_mempolicy(
            &mut node,
            std::ptr::null_mut(),
            0,
            addr,
            MPOL_F_NODE | MPOL_F_ADDR,
        )
    }?;
    Ok(node)
}

/// The CPU the calling thread runs on at this moment (`sched_getcpu`); `None` where the
/// kernel cannot say.
pub fn current_cpu() -> Option<u32> {
    // SAFETY: sched_getcpu takes no arguments and reads or writes no memory of ours.
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu).ok()
}

/// The nodes this thread may allocate on (`get_mempolicy(MPOL_F_MEMS_ALLOWED)`: its
/// cpuset's memory nodes), without allocating. Fails with `EINVAL` on a kernel with more
/// than [`FixedNodeMask::BITS`] possible nodes.
pub fn mems_allowed_fixed() -> Result<FixedNodeMask, i32> {
    let mut mask = FixedNodeMask::empty();
    // SAFETY: `mask` is a live local of `BITS` writable bits and `maxnode - 1 == BITS`;
    // no mode pointer or address is passed.
    unsafe {
        get_mempolicy(
            std::ptr::null_mut(),
            mask.as_mut_ptr(),
            mask.maxnode(),
            std::ptr::null(),
            MPOL_F_MEMS_ALLOWED,
        )
    }?;
    Ok(mask)
}

/// The policy of the mapping holding `addr` (`get_mempolicy(MPOL_F_ADDR)`): the mode
/// (`MPOL_*`, flags masked off) and its node set. Changes nothing and faults nothing in.
// Nothing at `addr` is read or written: the kernel looks up the mapping holding it.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
pub fn policy_of_address(addr: *const c_void) -> Result<(c_int, FixedNodeMask), i32> {
    let mut mode: c_int = -1;
    let mut mask = FixedNodeMask::empty();
    // SAFETY: `mode` and `mask` are live locals, writable for one c_int and `BITS` bits
    // (`maxnode - 1 == BITS`). Without MPOL_F_NODE the kernel only looks the address's
    // mapping up (EFAULT if there is none); it reads and faults no memory there.
    unsafe {
        get_mempolicy(
            &mut mode,
            mask.as_mut_ptr(),
            mask.maxnode(),
            addr,
            MPOL_F_ADDR,
        )
    }?;
    Ok((mode & !(MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES), mask))
}

/// `move_pages(2)`: moves pages of process `pid` (0 = this one) to `nodes`, or with
/// `nodes` null only reports in `status[i]` the node of page `pages[i]` (a negative errno
/// such as `-ENOENT` for a page that is not present, `-EFAULT` for an unmapped address).
///
/// # Safety
/// `pages` must be readable for `count` pointers and `status` writable for `count` ints;
/// `nodes`, if not null, readable for `count` ints. When moving (non-null `nodes`), the
/// pages must belong to the caller, as for [`mbind`].
pub unsafe fn move_pages(
    pid: libc::pid_t,
    count: usize,
    pages: *const *const c_void,
    nodes: *const c_int,
    status: *mut c_int,
    flags: c_int,
) -> Result<(), i32> {
    // SAFETY: the kernel reads `count` entries of `pages` (and `nodes`) and writes `count`
    // entries of `status`, all of which the caller guarantees.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            pid as c_long,
            count as c_ulong,
            pages,
            nodes,
            status,
            flags as c_long,
        )
    };
    check(ret).map(drop)
}

/// `move_pages` in query mode for this process: `status[i]` receives the node of the page
/// containing `pages[i]`, or a negative errno (`-ENOENT`: not present; `-EFAULT`: not
/// mapped). Changes nothing, so any address is fine.
///
/// # Panics
/// If the two slices differ in length.
pub fn query_page_nodes(pages: &[*const c_void], status: &mut [c_int]) -> Result<(), i32> {
    assert_eq!(pages.len(), status.len(), "one status slot per page");
    if pages.is_empty() {
        return Ok(());
    }
    // SAFETY: both slices hold `pages.len()` entries; `nodes` is null, so the kernel only
    // looks the addresses up (it validates them itself and moves nothing).
    unsafe {
        move_pages(
            0,
            pages.len(),
            pages.as_ptr(),
            std::ptr::null(),
            status.as_mut_ptr(),
            0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_layout_and_maxnode() {
        let m = NodeMask::from_nodes(&[0, 3, 64]);
        assert_eq!(m.bits(), 128);
        assert_eq!(m.maxnode(), 129);
        assert_eq!(m.nodes(), vec![0, 3, 64]);
        assert!(m.contains(3) && !m.contains(4) && !m.contains(1000));
        // SAFETY: the mask holds two words.
        let words = unsafe { std::slice::from_raw_parts(m.as_ptr(), 2) };
        assert_eq!(words, &[0b1001, 1]);
        let empty = NodeMask::from_nodes(&[]);
        assert!(empty.is_empty());
        assert_eq!(empty.maxnode(), WORD_BITS as c_ulong + 1);
    }

    #[test]
    fn query_own_stack_page() {
        let x = 5u64;
        let mut status = [i32::MIN];
        query_page_nodes(&[&x as *const u64 as *const c_void], &mut status).unwrap();
        // A present page reports a node id (>= 0); systems without NUMA support return
        // ENOSYS from the call itself, which the unwrap above would have caught.
        assert!(status[0] >= 0, "status {}", status[0]);
        // SAFETY: `x` is a live stack variable of this process.
        let node = unsafe { node_of_address(&x as *const u64 as *const c_void) }.unwrap();
        assert_eq!(node, status[0]);
    }

    #[test]
    fn fixed_mask() {
        let m = FixedNodeMask::single(65).unwrap();
        assert!(m.contains(65) && !m.contains(64) && !m.contains(5000));
        assert!(!m.is_empty() && FixedNodeMask::empty().is_empty());
        assert_eq!(m.maxnode(), FixedNodeMask::BITS as c_ulong + 1);
        assert!(FixedNodeMask::single(FixedNodeMask::BITS as u32).is_none());
        // SAFETY: the mask holds FIXED_MASK_WORDS words.
        let words = unsafe { std::slice::from_raw_parts(m.as_ptr(), FIXED_MASK_WORDS) };
        assert_eq!(words[1], 2);
        let allowed = mems_allowed_fixed().unwrap();
        assert!(!allowed.is_empty());
        let x = 1u8;
        let (mode, _) = policy_of_address(&x as *const u8 as *const c_void).unwrap();
        assert!(
            (MPOL_DEFAULT..=MPOL_PREFERRED_MANY).contains(&mode),
            "{mode}"
        );
    }

    #[test]
    fn unmapped_address_reports_efault() {
        let mut status = [0];
        query_page_nodes(&[8usize as *const c_void], &mut status).unwrap();
        assert_eq!(status[0], -libc::EFAULT);
    }
}
