//! [`HostBlock`]: host memory from a [`HostPool`](super::HostPool), back to its cache on drop.

use std::ptr::NonNull;
use std::sync::Arc;

use super::{registrations, Key, Shared};
use crate::backend::owned::{MemoryKind, OwnedMemory};
use crate::error::Result;
use crate::placement::NumaPolicy;

/// Host memory from a [`HostPool`](super::HostPool); back to the pool's cache on drop (still
/// registered, for pinned memory).
#[derive(Debug)]
pub struct HostBlock {
    pub(super) shared: Arc<Shared>,
    pub(super) key: Option<Key>,
    pub(super) class: usize,
    pub(super) len: usize,
    pub(super) mem: Option<OwnedMemory>,
}

impl HostBlock {
    /// Bytes asked for.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: zero-byte requests are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the block really has: its size class (the memory past [`HostBlock::len`]
    /// is mapped, placed and registered like the rest).
    pub fn capacity(&self) -> usize {
        self.class
    }

    /// The first byte.
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.mem()
            .host_ptr()
            .expect("host pool memory is host memory")
    }

    /// Whether the block is registered (pinned) memory.
    pub fn is_pinned(&self) -> bool {
        matches!(self.mem().kind(), MemoryKind::Pinned(_))
    }

    /// The resolved NUMA policy its pages were placed by.
    pub fn policy(&self) -> &NumaPolicy {
        &self.key.as_ref().expect("live blocks have a key").1
    }

    /// How many registrations pin it (pieces of a large region; 1 for a region
    /// registered whole; 0 for pageable memory).
    pub fn registrations(&self) -> u64 {
        registrations(self.mem())
    }

    /// The bytes (the first [`HostBlock::len`]), after copies that use the block are done.
    pub fn as_slice(&self) -> Result<&[u8]> {
        Ok(&self.mem().host_slice()?[..self.len])
    }

    /// The bytes, mutable, after copies that use the block are done.
    pub fn as_mut_slice(&mut self) -> Result<&mut [u8]> {
        let len = self.len;
        let mem = self.mem.as_mut().expect("live blocks have memory");
        Ok(&mut mem.host_slice_mut()?[..len])
    }

    /// Where the pages are: the NUMA node of each sampled page, from `move_pages` (see
    /// [`Buffer::page_nodes`](crate::Buffer::page_nodes)).
    pub fn page_nodes(&self) -> Result<Vec<i32>> {
        self.mem().page_nodes()
    }

    /// The memory, for copy code.
    pub(crate) fn mem(&self) -> &OwnedMemory {
        self.mem.as_ref().expect("live blocks have memory")
    }
}

/// The record's placement of a host pool block.
pub(super) fn profile_placement(pinned: bool) -> crate::record::Placement {
    if pinned {
        crate::record::Placement::Pinned
    } else {
        crate::record::Placement::Host
    }
}

impl Drop for HostBlock {
    fn drop(&mut self) {
        if let (Some(key), Some(mem)) = (self.key.take(), self.mem.take()) {
            crate::profile::emit(|| crate::record::EventKind::Free {
                addr: mem.host_ptr().map_or(0, |p| p.as_ptr() as u64),
                size: self.len as u64,
                placement: profile_placement(key.0),
            });
            if self.shared.backend.check_fork().is_err() {
                // A forked child: no lock (a thread of the parent may have held it);
                // the memory's own drop leaks what is the parent's.
                drop(mem);
                return;
            }
            self.shared.give_back(key, self.class, mem);
        }
    }
}
