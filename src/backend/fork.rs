//! Fork safety: what a `fork()`ed child may do with hetmem objects made before the fork.
//!
//! A GPU driver's contexts, streams, events and device memory belong to the process that
//! made them: a child made by `fork()` (a PyTorch DataLoader worker, a `multiprocessing`
//! pool with the `fork` start method) cannot use them. And recent NVIDIA kernel modules
//! pin host memory with `FOLL_LONGTERM`, so `fork()` copies every pinned page into the
//! child instead of sharing it copy-on-write: each worker would duplicate the pinned
//! weights.
//!
//! - Pinned regions are advised `MADV_DONTFORK` before they are registered
//!   ([`HostRegion::exclude_from_fork`](super::host::HostRegion::exclude_from_fork)), so
//!   a child does not get them at all. `HETMEM_DONTFORK=0` turns that off (to measure
//!   the difference). Every registration is undone only right before the region is
//!   unmapped, so no region ever needs `MADV_DOFORK` again.
//! - A `pthread_atfork` child handler, installed when the first [`Epoch`] is taken (the
//!   first [`Manager`](crate::Manager)), bumps a process-wide generation. Every backend a
//!   `Manager` opens is wrapped in [`ForkGuarded`], which remembers the generation and
//!   pid it was opened in and fails every call with [`Error::Forked`] once the
//!   generation differs, without reaching the driver. The pools keep an [`Epoch`] of
//!   their own for their hot paths: the check is a relaxed load and a compare.
//! - In the child, drops call no driver and take no lock a thread of the parent may have
//!   held at the fork: what the objects own is leaked (it is the parent's; the child's
//!   view of it goes when the child exits). Pinned regions are not unmapped there
//!   either: they are not mapped in the child, and by then the range may hold the
//!   child's own mappings.
//!
//! Not covered: children made without `fork()`'s handlers (`vfork`, a raw `clone`), which
//! should only `exec`; and memory the caller reaches through raw pointers: a pinned
//! region's address is not mapped in the child, so touching it there faults.

use std::any::Any;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Once, OnceLock};

use crate::backend::{
    Backend, BackendKind, DeviceInfo, DevicePtr, EventHandle, MemInfo, MemRef, PhysHandle,
    StreamHandle,
};
use crate::error::{Error, Result};
use crate::placement::{Advice, Location};

/// Bumped in every child made by `fork()` once the handler is installed.
static GENERATION: AtomicU32 = AtomicU32::new(0);

/// The `pthread_atfork` child handler: runs in the child, single-threaded, before
/// `fork()` returns there. Only an atomic add: async-signal-safe.
extern "C" fn after_fork_in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
    // The parent's recording is not the child's (an atomic store).
    crate::profile::forked();
}

fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic and never unwinds
        // (`extern "C"`, no panic possible); the other two slots are empty. Handlers
        // stay registered for the life of the process, as this code does (a static).
        let rc = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        if rc != 0 {
            tracing::warn!(target: "hetmem", errno = rc,
                "pthread_atfork failed: a forked child will not be told apart from its parent");
        }
    });
}

/// The process generation and pid something was made in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Epoch {
    generation: u32,
    pid: u32,
}

impl Epoch {
    /// Now, in this process (installing the fork handler the first time).
    pub(crate) fn now() -> Epoch {
        install();
        Epoch {
            generation: GENERATION.load(Ordering::Relaxed),
            pid: std::process::id(),
        }
    }

    /// Whether this process is still the one the epoch was taken in (no fork since).
    /// Relaxed suffices: the handler runs on the child's only thread before `fork()`
    /// returns there, and threads the child starts later see it through their spawn.
    #[inline]
    pub(crate) fn is_current(self) -> bool {
        GENERATION.load(Ordering::Relaxed) == self.generation
    }

    /// `Err(Error::Forked)` when the process has forked since the epoch was taken and
    /// this is the child.
    #[inline]
    pub(crate) fn check(self) -> Result<()> {
        if self.is_current() {
            Ok(())
        } else {
            Err(self.forked())
        }
    }

    #[cold]
    #[inline(never)]
    fn forked(self) -> Error {
        Error::Forked {
            parent: self.pid,
            child: std::process::id(),
        }
    }
}

/// Whether pinned regions are kept out of forked children (`MADV_DONTFORK`): yes unless
/// `HETMEM_DONTFORK` is `0`, `off` or `false` (read once per process).
pub(crate) fn dontfork_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        let on = !matches!(
            std::env::var("HETMEM_DONTFORK").as_deref().map(str::trim),
            Ok("0" | "off" | "false")
        );
        if !on {
            tracing::info!(target: "hetmem",
                "HETMEM_DONTFORK=0: pinned memory is inherited (copied) by forked children");
        }
        on
    })
}

/// A backend opened by a [`Manager`](crate::Manager): every call first checks that the
/// process has not forked since it was opened, and fails with [`Error::Forked`] in a
/// child. Dropped in a child, it leaks the backend instead of releasing the driver's
/// contexts, which belong to the parent.
pub(crate) struct ForkGuarded<B: Backend> {
    inner: ManuallyDrop<B>,
    epoch: Epoch,
}

impl<B: Backend> std::fmt::Debug for ForkGuarded<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The backend itself: the guard is an implementation detail.
        (*self.inner).fmt(f)
    }
}

impl<B: Backend> ForkGuarded<B> {
    pub(crate) fn new(inner: B) -> Self {
        ForkGuarded {
            inner: ManuallyDrop::new(inner),
            epoch: Epoch::now(),
        }
    }
}

impl<B: Backend> Drop for ForkGuarded<B> {
    fn drop(&mut self) {
        if self.epoch.is_current() {
            // SAFETY: dropped once, here, and `inner` is never used after this.
            unsafe { ManuallyDrop::drop(&mut self.inner) };
        }
        // In a forked child the backend is leaked: its drop would call the driver.
    }
}

// Every method is forwarded, the provided ones too (a default would hide the inner
// backend's own). Calls that reach no driver (kind, devices, granularity: cached at
// open) are not checked.
impl<B: Backend> Backend for ForkGuarded<B> {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }

    fn devices(&self) -> &[DeviceInfo] {
        self.inner.devices()
    }

    fn check_fork(&self) -> Result<()> {
        self.epoch.check()
    }

    fn mem_info(&self, device: usize) -> Result<MemInfo> {
        self.epoch.check()?;
        self.inner.mem_info(device)
    }

    fn alloc_device(&self, device: usize, size: usize) -> Result<DevicePtr> {
        self.epoch.check()?;
        self.inner.alloc_device(device, size)
    }

    unsafe fn free_device(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.free_device(device, ptr, size) }
    }

    fn alloc_managed(&self, device: usize, size: usize) -> Result<NonNull<u8>> {
        self.epoch.check()?;
        self.inner.alloc_managed(device, size)
    }

    unsafe fn free_managed(&self, device: usize, ptr: NonNull<u8>, size: usize) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.free_managed(device, ptr, size) }
    }

    unsafe fn register_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.register_host(ptr, len) }
    }

    unsafe fn unregister_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.unregister_host(ptr, len) }
    }

    fn create_stream(&self, device: usize) -> Result<StreamHandle> {
        self.epoch.check()?;
        self.inner.create_stream(device)
    }

    unsafe fn destroy_stream(&self, stream: StreamHandle) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.destroy_stream(stream) }
    }

    unsafe fn import_stream(&self, device: usize, raw: u64) -> Result<StreamHandle> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.import_stream(device, raw) }
    }

    unsafe fn forget_stream(&self, stream: StreamHandle) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.forget_stream(stream) }
    }

    unsafe fn synchronize_stream(&self, stream: StreamHandle) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.synchronize_stream(stream) }
    }

    fn synchronize_device(&self, device: usize) -> Result<()> {
        self.epoch.check()?;
        self.inner.synchronize_device(device)
    }

    fn create_event(&self, device: usize) -> Result<EventHandle> {
        self.epoch.check()?;
        self.inner.create_event(device)
    }

    unsafe fn destroy_event(&self, event: EventHandle) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.destroy_event(event) }
    }

    unsafe fn record_event(&self, event: EventHandle, stream: StreamHandle) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.record_event(event, stream) }
    }

    unsafe fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.stream_wait_event(stream, event) }
    }

    unsafe fn synchronize_event(&self, event: EventHandle) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.synchronize_event(event) }
    }

    unsafe fn event_done(&self, event: EventHandle) -> Result<bool> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.event_done(event) }
    }

    unsafe fn is_capturing(&self, stream: StreamHandle) -> Result<bool> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.is_capturing(stream) }
    }

    unsafe fn copy(
        &self,
        dst: MemRef,
        src: MemRef,
        len: usize,
        stream: Option<StreamHandle>,
    ) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.copy(dst, src, len, stream) }
    }

    unsafe fn prefetch(
        &self,
        ptr: NonNull<u8>,
        len: usize,
        to: Location,
        stream: StreamHandle,
    ) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.prefetch(ptr, len, to, stream) }
    }

    unsafe fn advise(&self, ptr: NonNull<u8>, len: usize, advice: Advice) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.advise(ptr, len, advice) }
    }

    fn vmm_granularity(&self, device: usize) -> Option<usize> {
        self.inner.vmm_granularity(device)
    }

    fn reserve_address(&self, device: usize, size: usize) -> Result<DevicePtr> {
        self.epoch.check()?;
        self.inner.reserve_address(device, size)
    }

    unsafe fn free_address(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.free_address(device, ptr, size) }
    }

    fn create_physical(&self, device: usize, size: usize) -> Result<PhysHandle> {
        self.epoch.check()?;
        self.inner.create_physical(device, size)
    }

    unsafe fn release_physical(&self, device: usize, handle: PhysHandle) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.release_physical(device, handle) }
    }

    unsafe fn map(
        &self,
        device: usize,
        ptr: DevicePtr,
        size: usize,
        handle: PhysHandle,
    ) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.map(device, ptr, size, handle) }
    }

    unsafe fn unmap(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.unmap(device, ptr, size) }
    }

    unsafe fn set_access(
        &self,
        device: usize,
        ptr: DevicePtr,
        size: usize,
        devices: &[usize],
    ) -> Result<()> {
        self.epoch.check()?;
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.set_access(device, ptr, size, devices) }
    }

    fn as_any(&self) -> &dyn Any {
        // The inner backend, so that `Manager::sim` finds the simulator.
        self.inner.as_any()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_is_current_until_the_generation_moves() {
        let e = Epoch::now();
        assert!(e.is_current());
        assert_eq!(e.check(), Ok(()));
        // What the child handler does, seen from an epoch of the "parent".
        let old = Epoch {
            generation: e.generation.wrapping_sub(1),
            pid: 1,
        };
        assert!(!old.is_current());
        assert_eq!(
            old.check(),
            Err(Error::Forked {
                parent: 1,
                child: std::process::id()
            })
        );
    }
}
