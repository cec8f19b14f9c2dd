//! [`PinnedAllocator`]: a [`HostPool`]'s pinned memory behind `allocator_api2`'s
//! [`Allocator`], so that `allocator_api2::vec::Vec<T, PinnedAllocator>` lives in pinned
//! memory. Its `unsafe impl` is a promise about ownership (the methods contain no
//! `unsafe` operation).

use std::alloc::Layout;
use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use allocator_api2::alloc::{AllocError, Allocator};

use super::{HostBlock, HostPool};
use crate::host_mem::page_size;
use crate::placement::NumaPolicy;

/// An `allocator_api2` [`Allocator`] over a [`HostPool`]'s pinned memory: each
/// allocation is one pool block (so its size is rounded up to a [`size_class`](super::size_class), at
/// least one page: tiny allocations cost a page of pinned memory each, so this is for
/// buffers, not for many small objects), and deallocation gives the block back to the
/// pool's cache, registered, for the next allocation of its class. Alignments up to a
/// page are served (blocks are page-aligned); larger ones are refused.
///
/// Clones share the same blocks: memory from one may be freed through another.
///
/// After a `fork()`, the child must not touch memory from this allocator: it is pinned,
/// and so not mapped in the child (`MADV_DONTFORK`, see [`Error::Forked`](crate::Error::Forked)).
///
/// ```
/// use allocator_api2::vec::Vec;
/// use hetmem::{BackendKind, Manager, NumaPolicy};
/// use hetmem::pool::HostPoolConfig;
/// let mgr = Manager::builder().backend(BackendKind::Sim).build()?;
/// let pool = mgr.host_pool(HostPoolConfig::default())?;
/// let mut v: Vec<u32, _> = Vec::new_in(pool.pinned_allocator(NumaPolicy::NearDevice(0)));
/// v.extend(0..1000);
/// assert_eq!(v[999], 999);
/// # Ok::<(), hetmem::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PinnedAllocator {
    pub(super) pool: HostPool,
    pub(super) policy: NumaPolicy,
    /// Live blocks by address: `deallocate` gets only the pointer.
    pub(super) live: Arc<Mutex<HashMap<usize, HostBlock>>>,
}

impl PinnedAllocator {
    /// The pool it draws from.
    pub fn pool(&self) -> &HostPool {
        &self.pool
    }

    /// Whether `ptr` is the start of a block this allocator (or a clone) handed out and
    /// has not been given back, and that block is pinned.
    pub fn is_pinned(&self, ptr: *const u8) -> bool {
        self.lock()
            .get(&(ptr as usize))
            .is_some_and(HostBlock::is_pinned)
    }

    /// Blocks handed out and not yet given back.
    pub fn live_blocks(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<usize, HostBlock>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// Why the `Allocator` contract holds:
// - `allocate` returns memory of a pool block that is mapped read-write for at least the
//   returned length (its class size, >= `layout.size()`) and page-aligned (>= the
//   accepted alignments); zero-size requests get a dangling, well-aligned pointer that
//   `deallocate` ignores.
// - The block stays in `live` (so mapped, and owned by no one else) until `deallocate`
//   of its pointer removes it; `live` is shared by all clones, so the memory stays
//   valid while any clone exists, and a pointer from one clone may be freed by another.
// - The pool never hands the same block out twice while it is live: a block is either
//   owned by one `HostBlock` or in the cache, and leaves the cache only by being taken
//   out of it under the pool's lock. So blocks from concurrent `allocate`s never alias.
// - Nothing else writes to the memory: the pool's only other access is waiting for the
//   fences of copies made by its earlier owner, before it is handed out.
// SAFETY: as argued above: memory stays valid and unaliased until `deallocate`, and the
// pool never hands the same block out twice while it is live.
unsafe impl Allocator for PinnedAllocator {
    fn allocate(&self, layout: Layout) -> std::result::Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            let dangling = NonNull::new(std::ptr::without_provenance_mut::<u8>(layout.align()))
                .ok_or(AllocError)?;
            return Ok(NonNull::slice_from_raw_parts(dangling, 0));
        }
        if layout.align() > page_size() {
            return Err(AllocError);
        }
        let block = self
            .pool
            .alloc_pinned(&self.policy, layout.size())
            .map_err(|e| {
                tracing::debug!(target: "hetmem", error = %e, size = layout.size(),
                    "pinned allocator: allocation failed");
                AllocError
            })?;
        let ptr = block.as_ptr();
        let cap = block.capacity();
        self.lock().insert(ptr.as_ptr() as usize, block);
        Ok(NonNull::slice_from_raw_parts(ptr, cap))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        let block = self.lock().remove(&(ptr.as_ptr() as usize));
        match block {
            // Dropped outside the allocator's lock: it takes the pool's.
            Some(b) => drop(b),
            None => tracing::error!(target: "hetmem", ?ptr,
                "pinned allocator: deallocate of a pointer it did not hand out"),
        }
    }
}
