//! [`DriverPinned`]: pinned host memory the driver allocates itself, the baseline
//! hetmem's own pinning is measured against.

use std::ffi::c_void;
use std::ptr::{self, NonNull};

use hetmem_sys::cuda::Status;

use super::backend::check_size;
use super::CudaBackend;
use crate::backend::{check_device, BackendKind};
use crate::error::{Error, Result};
use crate::host_mem::available_memory;
use crate::placement::MemKind;

/// Pinned host memory allocated by the driver itself: `cuMemAllocHost`, the call behind
/// `cudaMallocHost` / `cudaHostAlloc(.., cudaHostAllocDefault)`. Freed with
/// `cuMemFreeHost` on drop.
///
/// hetmem never hands this out. It is kept as the baseline that hetmem's own pinned
/// path — map and place the pages first (NUMA binding, parallel pre-fault), then
/// `cuMemHostRegister` them — is measured against (`benches/pinning.rs`): the driver
/// allocates, zeroes and locks the pages in one serial call, which DESIGN.md measured at
/// 587 ms per GiB (`cudaHostAlloc`) against 102 ms for registering 1 GiB already in
/// place (`cudaHostRegister`).
///
/// `cuMemAllocHost_v2` rather than `cuMemHostAlloc(.., 0)`: the two are the same
/// allocation (the driver documents `cuMemAllocHost` as `cuMemHostAlloc` with no
/// flags), and `cuMemAllocHost` is the call the comparison names. Neither passes
/// `CU_MEMHOSTALLOC_PORTABLE`, so the pages count as pinned for `device`'s context only
/// (hetmem registers with `PORTABLE`); with unified addressing every device can still
/// address them. The pages land where the driver's zeroing faults them (the calling
/// thread's NUMA policy), not near `device`.
///
/// The borrow of the backend keeps the primary context that owns the allocation alive
/// until the memory is freed.
#[derive(Debug)]
pub struct DriverPinned<'a> {
    backend: &'a CudaBackend,
    device: usize,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the struct owns its allocation exclusively, like a `Box<[u8]>`; pinned host
// memory is ordinary memory readable from any thread, and `Drop` binds the context on
// whichever thread it runs (the driver API is thread-safe, see `CudaBackend`).
unsafe impl Send for DriverPinned<'_> {}
// SAFETY: `&self` only exposes the address and length; nothing is mutated through it.
unsafe impl Sync for DriverPinned<'_> {}

impl<'a> DriverPinned<'a> {
    /// Allocates `len` bytes of page-locked host memory with `cuMemAllocHost_v2`, in
    /// `device`'s primary context. When it returns, the pages are resident, zeroed and
    /// pinned: nothing more is needed before a DMA copy.
    ///
    /// Errors: [`Error::UnknownDevice`] for a device this backend does not have,
    /// [`Error::InvalidSize`] for 0 bytes, [`Error::Unsupported`] when libcuda lacks
    /// `cuMemAllocHost_v2` or `cuMemFreeHost` (checked once in [`CudaBackend::new`]),
    /// [`Error::OutOfMemory`] (tier `Pinned`) when the driver cannot pin that much, and
    /// [`Error::Driver`] for any other failure.
    pub fn new(backend: &'a CudaBackend, device: usize, len: usize) -> Result<DriverPinned<'a>> {
        check_device(backend, device)?;
        check_size(len)?;
        if !backend.driver_pinned {
            return Err(Error::Unsupported {
                backend: BackendKind::Cuda,
                what: "cuMemAllocHost (libcuda lacks cuMemAllocHost_v2 or cuMemFreeHost)",
            });
        }
        let _ctx = backend.bind(device)?;
        let drv = backend.drv;
        let mut p: *mut c_void = ptr::null_mut();
        // SAFETY: the symbol exists (checked in `new`), the device's context is current
        // and `p` is a valid out-pointer.
        match unsafe { drv.cuMemAllocHost_v2(&mut p, len) } {
            Status::SUCCESS => match NonNull::new(p.cast::<u8>()) {
                Some(ptr) => Ok(DriverPinned {
                    backend,
                    device,
                    ptr,
                    len,
                }),
                None => Err(drv.error("cuMemAllocHost", Status::UNKNOWN)),
            },
            Status::OUT_OF_MEMORY => Err(Error::oom(MemKind::Pinned, len, available_memory())),
            other => Err(drv.error("cuMemAllocHost", other)),
        }
    }

    /// The first byte; valid for [`len`](Self::len) bytes until `self` is dropped.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// The size asked for, in bytes (never 0).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: a zero-byte allocation is refused by [`new`](Self::new).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device whose context the memory was allocated in.
    pub fn device(&self) -> usize {
        self.device
    }
}

impl Drop for DriverPinned<'_> {
    fn drop(&mut self) {
        let _ctx = self
            .backend
            .bind(self.device)
            .inspect_err(|e| tracing::warn!(device = self.device, error = %e, "binding context to free pinned host memory"));
        let drv = self.backend.drv;
        // SAFETY: `ptr` came from cuMemAllocHost_v2 in `new` (so the symbols exist) and
        // is freed exactly once, here; the borrow of the backend kept its context alive.
        let status = unsafe { drv.cuMemFreeHost(self.ptr.as_ptr().cast::<c_void>()) };
        if let Err(e) = drv.check("cuMemFreeHost", status) {
            tracing::warn!(
                device = self.device,
                len = self.len,
                error = %e,
                "freeing driver-pinned host memory; it leaks"
            );
        }
    }
}
