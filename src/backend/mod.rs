//! Backends: the only code that talks to a driver.
//!
//! One trait, [`Backend`], and one module per implementation:
//!
//! | module | what it drives |
//! |---|---|
//! | [`host`] | no devices; host memory only (the memory itself is [`crate::host_mem`]) |
//! | [`sim`]  | a simulated GPU with a deterministic virtual clock, the default without a driver |
//! | [`cuda`] | NVIDIA GPUs through the CUDA driver API (`hetmem_sys::cuda`), loaded at run time |
//! | [`rocm`] | AMD GPUs through the HIP runtime (`hetmem_sys::hip`), loaded at run time |
//!
//! Beside them, not backends: `owned` (the owning wrappers that uphold the trait's
//! contracts, and the one copy path), `fork` (the guard every `Manager` wraps its
//! backend in), and what the two driver backends share: `driver` (handle tables,
//! foreign streams) and `registered` (host registration in pieces, with rollback).
//!
//! Handles ([`DevicePtr`], [`StreamHandle`], [`EventHandle`]) are plain numbers: the
//! backend gives them meaning. Calls that take a handle are `unsafe` because a stale or
//! foreign handle is undefined behaviour in a real driver; [`Manager`](crate::Manager)
//! upholds the contracts with owning wrappers. The driver backends also look every
//! stream and event up in their own tables before the driver sees it, and refuse one
//! they do not know with an error: defence in depth, not a licence to pass stale
//! handles (device pointers are not looked up).

pub mod cuda;
pub(crate) mod driver;
pub(crate) mod exit;
pub(crate) mod fork;
pub mod host;
pub(crate) mod owned;
pub(crate) mod registered;
pub mod rocm;
pub mod sim;

pub use crate::backend_kind::BackendKind;

use std::any::Any;
use std::fmt;
use std::ptr::NonNull;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::placement::{Advice, Location};

// Here rather than beside the type: parsing fails with an `Error`, and the type sits
// below `error` (which names it) so that `error` never imports `backend`.
impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "host" => Ok(BackendKind::Host),
            "sim" => Ok(BackendKind::Sim),
            "cuda" => Ok(BackendKind::Cuda),
            "rocm" | "hip" => Ok(BackendKind::Rocm),
            other => Err(Error::InvalidArgument(format!(
                "unknown backend {other:?}: expected cuda, rocm, sim or host"
            ))),
        }
    }
}

/// An address in device memory. For CUDA and HIP it is the device virtual address;
/// the simulator hands out synthetic ones that the CPU cannot dereference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevicePtr(pub u64);

impl DevicePtr {
    /// The address `bytes` further on.
    pub fn offset(self, bytes: usize) -> DevicePtr {
        DevicePtr(self.0 + bytes as u64)
    }
}

/// A backend's stream (an in-order queue of work on one device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamHandle(pub u64);

/// A backend's event (a marker in a stream that others can wait for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventHandle(pub u64);

/// A backend's handle to physical device memory, for virtual memory management.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PhysHandle(pub u64);

/// What kind of host memory a host pointer refers to. Backends use it to pick a copy
/// path (and the simulator to pick a bandwidth).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostKind {
    /// Ordinary pageable memory.
    Pageable,
    /// Registered (page-locked) memory.
    Pinned,
    /// Managed memory (valid on host and device).
    Managed,
}

/// One side of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemRef {
    /// Host memory (pageable, pinned or managed).
    Host {
        /// First byte.
        ptr: NonNull<u8>,
        /// What kind of host memory it is.
        kind: HostKind,
    },
    /// Device memory.
    Device {
        /// Device ordinal.
        device: usize,
        /// First byte.
        ptr: DevicePtr,
    },
}

/// A device as a backend reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Ordinal within the backend, from 0.
    pub ordinal: usize,
    /// Marketing name (`NVIDIA H200`, `sim-H200`, ...).
    pub name: String,
    /// Total device memory in bytes.
    pub total_memory: usize,
    /// PCI address in sysfs form (`0000:3b:00.0`), where the driver reports one.
    pub pci_bus_id: Option<String>,
    /// Whether managed memory works on this device.
    pub managed_memory: bool,
}

/// Free and total memory of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// Bytes free now.
    pub free: usize,
    /// Bytes in all.
    pub total: usize,
}

/// A memory backend. Implementations live one per module in [`crate::backend`].
///
/// Contracts shared by the `unsafe` methods: every handle or pointer passed in was
/// returned by this same backend object, is still live (not freed or destroyed), and
/// the ranges given lie inside the allocation. Copies may run after the call returns
/// when a stream is given: the memory must stay valid until that stream passes them.
///
/// A [`Manager`](crate::Manager) wraps the backend it opens in a guard that forwards
/// every method (`fork::ForkGuarded`): a method added here must be forwarded there too.
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// The devices, by ordinal. Empty for the host backend.
    fn devices(&self) -> &[DeviceInfo];

    /// [`Error::Forked`] when this is a `fork()`ed child of the process that opened the
    /// backend through a [`Manager`](crate::Manager): every other call then fails the
    /// same way without reaching the driver. `Ok` otherwise, and always for a backend
    /// opened directly (`SimBackend::new`, ...), which is not watched.
    fn check_fork(&self) -> Result<()> {
        Ok(())
    }

    /// Free and total memory of a device.
    fn mem_info(&self, device: usize) -> Result<MemInfo>;

    /// Allocates `size` bytes (> 0) of device memory.
    fn alloc_device(&self, device: usize, size: usize) -> Result<DevicePtr>;

    /// Frees device memory.
    ///
    /// # Safety
    /// `ptr` came from [`Backend::alloc_device`] on this backend for `device` and `size`,
    /// was not freed, and no queued work uses it any more.
    unsafe fn free_device(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()>;

    /// Allocates `size` bytes (> 0) of managed memory associated with `device`.
    fn alloc_managed(&self, device: usize, size: usize) -> Result<NonNull<u8>>;

    /// Frees managed memory.
    ///
    /// # Safety
    /// As [`Backend::free_device`], for a pointer from [`Backend::alloc_managed`].
    unsafe fn free_managed(&self, device: usize, ptr: NonNull<u8>, size: usize) -> Result<()>;

    /// Page-locks host memory and makes it reachable by every device's DMA engine.
    ///
    /// # Safety
    /// `ptr..ptr+len` is mapped host memory owned by the caller that stays mapped until
    /// [`Backend::unregister_host`] is called on it.
    unsafe fn register_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()>;

    /// Undoes [`Backend::register_host`].
    ///
    /// # Safety
    /// `ptr..ptr+len` was registered by this backend and no queued work uses it.
    unsafe fn unregister_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()>;

    /// Creates a stream on `device`.
    fn create_stream(&self, device: usize) -> Result<StreamHandle>;

    /// Destroys a stream once its queued work is done.
    ///
    /// # Safety
    /// `stream` is live and from this backend; it is not used afterwards.
    unsafe fn destroy_stream(&self, stream: StreamHandle) -> Result<()>;

    /// Makes a stream created outside hetmem (the caller's `CUstream` / `hipStream_t`,
    /// or 0 for `device`'s default stream) usable in this backend's calls, without
    /// taking ownership: [`Backend::forget_stream`] lets go of it and never destroys it.
    /// The handle returned may differ from `raw` (default streams exist once per device,
    /// so their handles carry the device).
    ///
    /// [`PER_THREAD_STREAM`] (2) is the per-thread default stream, as the drivers define
    /// it: every call with the handle returned acts on the per-thread default stream of
    /// the thread that makes the call, not of the thread that imported it. The handle
    /// is one value for all threads; what keeps their work apart (pools, fences) is the
    /// layer above's (`OwnedStream`'s per-thread views).
    ///
    /// # Safety
    /// `raw` is 0 or a live stream of `device` made by the same driver this backend
    /// talks to, and stays live until every handle imported from it is forgotten.
    unsafe fn import_stream(&self, device: usize, raw: u64) -> Result<StreamHandle> {
        let _ = (device, raw);
        Err(Error::Unsupported {
            backend: self.kind(),
            what: "foreign streams",
        })
    }

    /// Lets go of a stream from [`Backend::import_stream`] without destroying it.
    ///
    /// # Safety
    /// `stream` came from [`Backend::import_stream`] on this backend and is not used
    /// afterwards (each import is forgotten once).
    unsafe fn forget_stream(&self, stream: StreamHandle) -> Result<()> {
        let _ = stream;
        Err(Error::Unsupported {
            backend: self.kind(),
            what: "foreign streams",
        })
    }

    /// Blocks until everything queued on `stream` is done.
    ///
    /// # Safety
    /// `stream` is live and from this backend.
    unsafe fn synchronize_stream(&self, stream: StreamHandle) -> Result<()>;

    /// Blocks until everything queued on `device` so far is done, on every stream
    /// (`cuCtxSynchronize`, `hipDeviceSynchronize`): the per-thread default streams of
    /// all threads included, which no stream handle reaches from another thread, and
    /// work hetmem does not know about (graph replays). Illegal while a stream of the
    /// device is capturing.
    fn synchronize_device(&self, device: usize) -> Result<()> {
        let _ = device;
        Err(Error::Unsupported {
            backend: self.kind(),
            what: "device synchronisation",
        })
    }

    /// Creates an event on `device`.
    fn create_event(&self, device: usize) -> Result<EventHandle>;

    /// Destroys an event.
    ///
    /// # Safety
    /// `event` is live and from this backend; it is not used afterwards.
    unsafe fn destroy_event(&self, event: EventHandle) -> Result<()>;

    /// Records `event` at the current tail of `stream`.
    ///
    /// # Safety
    /// Both handles are live and from this backend.
    unsafe fn record_event(&self, event: EventHandle, stream: StreamHandle) -> Result<()>;

    /// Makes work queued on `stream` after this call wait until `event` has passed.
    ///
    /// # Safety
    /// Both handles are live and from this backend.
    unsafe fn stream_wait_event(&self, stream: StreamHandle, event: EventHandle) -> Result<()>;

    /// Blocks until `event` has passed.
    ///
    /// # Safety
    /// `event` is live and from this backend.
    unsafe fn synchronize_event(&self, event: EventHandle) -> Result<()>;

    /// Whether `event` has passed, without blocking.
    ///
    /// # Safety
    /// `event` is live and from this backend.
    unsafe fn event_done(&self, event: EventHandle) -> Result<bool>;

    /// Whether `stream` is capturing a graph (CUDA stream capture, HIP graphs): its work
    /// is being recorded, not run. While it is, the driver refuses to synchronise it,
    /// to query or synchronise an event recorded on it, and to make it wait for an
    /// event recorded outside the capture, and each such call may invalidate the
    /// capture; an event recorded on it joins any stream that waits for it into the
    /// capture. So the layers above ask this before such calls, and never on a hot
    /// path: it is a driver call. An invalidated capture still counts as capturing
    /// (the stream stays in capture mode until it is ended). Backends without graphs
    /// answer false.
    ///
    /// # Safety
    /// `stream` is live and from this backend.
    unsafe fn is_capturing(&self, stream: StreamHandle) -> Result<bool> {
        let _ = stream;
        Ok(false)
    }

    /// Copies `len` bytes from `src` to `dst`: on `stream` (ordered after the work
    /// already queued there) or, with `None`, synchronously (done when it returns) and
    /// ordered as `cuMemcpy` / `hipMemcpy` are: after the work queued before it on the
    /// device's legacy default stream (HIP's null stream) and so, by the drivers' rule,
    /// on every blocking stream of the device (the per-thread default streams
    /// included); not after work on non-blocking streams (hetmem's own streams are
    /// non-blocking: the fences copies leave on memory order those).
    ///
    /// # Safety
    /// Both ranges are valid for `len` bytes, do not overlap, and stay valid until the
    /// copy is done. `stream`, if given, is live and from this backend.
    unsafe fn copy(
        &self,
        dst: MemRef,
        src: MemRef,
        len: usize,
        stream: Option<StreamHandle>,
    ) -> Result<()>;

    /// Queues a migration of managed memory to `to` on `stream`.
    ///
    /// # Safety
    /// `ptr..ptr+len` lies in managed memory from this backend; `stream` is live.
    unsafe fn prefetch(
        &self,
        ptr: NonNull<u8>,
        len: usize,
        to: Location,
        stream: StreamHandle,
    ) -> Result<()>;

    /// Gives the driver advice about managed memory.
    ///
    /// # Safety
    /// `ptr..ptr+len` lies in managed memory from this backend.
    unsafe fn advise(&self, ptr: NonNull<u8>, len: usize, advice: Advice) -> Result<()>;

    /// The page size of virtual memory management on `device` (2 MiB on current GPUs),
    /// or `None` where the backend cannot reserve addresses and map memory into them.
    /// Pools then fall back to plain segments.
    fn vmm_granularity(&self, device: usize) -> Option<usize> {
        let _ = device;
        None
    }

    /// Reserves `size` bytes (a multiple of the granularity) of device address space,
    /// with nothing mapped.
    fn reserve_address(&self, device: usize, size: usize) -> Result<DevicePtr> {
        let _ = (device, size);
        Err(Error::Unsupported {
            backend: self.kind(),
            what: "virtual memory management",
        })
    }

    /// Gives back an address range.
    ///
    /// # Safety
    /// `ptr`/`size` came from [`Backend::reserve_address`] on `device`, and nothing is
    /// mapped in the range any more.
    unsafe fn free_address(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        let _ = (device, ptr, size);
        Err(Error::Unsupported {
            backend: self.kind(),
            what: "virtual memory management",
        })
    }

    /// Allocates `size` bytes (a multiple of the granularity) of physical device memory,
    /// not yet mapped anywhere.
    fn create_physical(&self, device: usize, size: usize) -> Result<PhysHandle> {
        let _ = (device, size);
        Err(Error::Unsupported {
            backend: self.kind(),
            what: "virtual memory management",
        })
    }

    /// Frees physical memory.
    ///
    /// # Safety
    /// `handle` came from [`Backend::create_physical`] on `device` and is not mapped.
    unsafe fn release_physical(&self, device: usize, handle: PhysHandle) -> Result<()> {
        let _ = (device, handle);
        Err(Error::Unsupported {
            backend: self.kind(),
            what: "virtual memory management",
        })
    }

    /// Maps all of `handle` (`size` bytes) at `ptr`. Nothing can access the range until
    /// [`Backend::set_access`] is called on it.
    ///
    /// # Safety
    /// `ptr..ptr+size` lies inside a reservation of `device` and nothing is mapped there;
    /// `handle` is live, of `size` bytes, and not mapped elsewhere.
    unsafe fn map(
        &self,
        device: usize,
        ptr: DevicePtr,
        size: usize,
        handle: PhysHandle,
    ) -> Result<()> {
        let _ = (device, ptr, size, handle);
        Err(Error::Unsupported {
            backend: self.kind(),
            what: "virtual memory management",
        })
    }

    /// Unmaps `ptr..ptr+size`.
    ///
    /// # Safety
    /// The range is exactly one earlier [`Backend::map`], and no queued work uses it.
    unsafe fn unmap(&self, device: usize, ptr: DevicePtr, size: usize) -> Result<()> {
        let _ = (device, ptr, size);
        Err(Error::Unsupported {
            backend: self.kind(),
            what: "virtual memory management",
        })
    }

    /// Makes `ptr..ptr+size` readable and writable by each device in `devices` (which
    /// includes `device`, the owner): one call for a range of several mappings, as
    /// `cuMemSetAccess` allows.
    ///
    /// # Safety
    /// The range lies in a reservation of `device`, is fully mapped, and starts and ends
    /// at the edges of mappings.
    unsafe fn set_access(
        &self,
        device: usize,
        ptr: DevicePtr,
        size: usize,
        devices: &[usize],
    ) -> Result<()> {
        let _ = (device, ptr, size, devices);
        Err(Error::Unsupported {
            backend: self.kind(),
            what: "virtual memory management",
        })
    }

    /// For downcasting to the concrete backend (the simulator's clock and kernels).
    fn as_any(&self) -> &dyn Any;
}

/// Raw stream values below this are a driver's special streams, which exist once per
/// device (context) rather than once per process: CUDA's 0 (the legacy default
/// stream), 1 (`CU_STREAM_LEGACY`) and 2 (`CU_STREAM_PER_THREAD`, one per thread and
/// device); HIP's 0 (the null stream) and 2 (`hipStreamPerThread`). No real stream
/// object lives at such an address (the simulator's handles start here too).
pub(crate) const SPECIAL_STREAMS: u64 = 16;

/// The raw stream value of the per-thread default stream: `CU_STREAM_PER_THREAD`
/// (CUDA), `hipStreamPerThread` (HIP). Each thread has its own on each device, and the
/// driver picks the calling thread's whenever it is passed; hetmem gives it the same
/// meaning ([`Stream::wrap`](crate::Stream::wrap)).
pub const PER_THREAD_STREAM: u64 = 2;

/// The raw stream value of CUDA's legacy default stream (`CU_STREAM_LEGACY`); 0 means
/// the same stream to the driver API.
pub(crate) const LEGACY_STREAM: u64 = 1;
/// Set in the handle of an imported special stream, whose device sits in bits 8..63.
const SPECIAL_TAG: u64 = 1 << 63;

/// The value the driver takes for a stream handle (the special stream an imported
/// special handle stands for; any other handle is the driver's own value).
pub(crate) fn raw_stream(handle: StreamHandle) -> u64 {
    if handle.0 & SPECIAL_TAG != 0 {
        handle.0 & 0xff
    } else {
        handle.0
    }
}

/// The handle [`ForeignStreams`](driver::ForeignStreams) gives the special stream `raw` of `device` (the
/// simulator uses the same form for its per-thread streams).
pub(crate) fn special_handle(device: usize, raw: u64) -> StreamHandle {
    StreamHandle(SPECIAL_TAG | ((device as u64) << 8) | raw)
}

/// `Some(device)` when `handle` is an imported per-thread default stream.
pub(crate) fn per_thread_device(handle: StreamHandle) -> Option<usize> {
    (handle.0 & SPECIAL_TAG != 0 && handle.0 & 0xff == PER_THREAD_STREAM)
        .then_some(((handle.0 & !SPECIAL_TAG) >> 8) as usize)
}

/// A number for the calling thread, unique for the life of the process (the identity
/// a per-thread default stream belongs to). Never panics, also while the thread's
/// other thread-locals are being destroyed (a `Drop` may run then): it has no
/// destructor, unlike `std::thread::current()`'s handle.
pub(crate) fn thread_key() -> u64 {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local!(static KEY: Cell<u64> = const { Cell::new(0) });
    KEY.with(|k| {
        if k.get() == 0 {
            k.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        k.get()
    })
}

/// `Ok` when `size` is a positive multiple of the VMM page `granularity` (reservations,
/// physical allocations and mappings all come in whole pages).
pub(crate) fn check_vmm_size(what: &str, size: usize, granularity: usize) -> Result<()> {
    if size == 0 || !size.is_multiple_of(granularity) {
        Err(Error::InvalidArgument(format!(
            "{what} of {size} bytes is not a positive multiple of the VMM granularity {granularity}"
        )))
    } else {
        Ok(())
    }
}

/// Checks a device ordinal against a backend's device list.
pub(crate) fn check_device(backend: &dyn Backend, device: usize) -> Result<()> {
    let count = backend.devices().len();
    if device < count {
        Ok(())
    } else {
        Err(Error::UnknownDevice {
            device,
            count,
            backend: backend.kind(),
        })
    }
}

/// Locks one of a backend's maps or its state, carrying on past poisoning: they are
/// updated by single inserts and removes (or, in the simulator, in steps that leave
/// them usable), so a panic elsewhere cannot leave them half-changed in a way that
/// matters more than refusing all further work would.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Refuses a copy queued on a stream of the wrong device: a copy between host and
/// device `d` must be queued on a stream of `d`; a copy between two devices on a stream
/// of either one; a copy between two host ranges on any stream.
pub(crate) fn check_copy_stream(dst: &MemRef, src: &MemRef, stream_device: usize) -> Result<()> {
    match (*dst, *src) {
        (MemRef::Device { device, .. }, MemRef::Host { .. })
        | (MemRef::Host { .. }, MemRef::Device { device, .. })
            if device != stream_device =>
        {
            Err(Error::InvalidArgument(format!(
                "copy to or from device {device} queued on a stream of device {stream_device}"
            )))
        }
        (MemRef::Device { device: d, .. }, MemRef::Device { device: s, .. })
            if stream_device != d && stream_device != s =>
        {
            Err(Error::InvalidArgument(format!(
                "copy from device {s} to device {d} queued on a stream of device {stream_device}"
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_queued_on_a_stream_of_the_right_device() {
        let host = MemRef::Host {
            ptr: NonNull::dangling(),
            kind: HostKind::Pinned,
        };
        let dev = |device| MemRef::Device {
            device,
            ptr: DevicePtr(0x1000),
        };
        // Host <-> device: the stream must be the device's.
        assert!(check_copy_stream(&dev(1), &host, 1).is_ok());
        assert!(check_copy_stream(&host, &dev(0), 0).is_ok());
        for (dst, src) in [(dev(1), host), (host, dev(1))] {
            match check_copy_stream(&dst, &src, 0) {
                Err(Error::InvalidArgument(msg)) => assert_eq!(
                    msg, "copy to or from device 1 queued on a stream of device 0",
                    "{msg}"
                ),
                other => panic!("{other:?}"),
            }
        }
        // Device <-> device: either side's stream will do, a third device's will not.
        assert!(check_copy_stream(&dev(0), &dev(1), 0).is_ok());
        assert!(check_copy_stream(&dev(0), &dev(1), 1).is_ok());
        assert!(check_copy_stream(&dev(2), &dev(2), 2).is_ok());
        match check_copy_stream(&dev(0), &dev(1), 2) {
            Err(Error::InvalidArgument(msg)) => assert_eq!(
                msg,
                "copy from device 1 to device 0 queued on a stream of device 2"
            ),
            other => panic!("{other:?}"),
        }
        // Host <-> host touches no device.
        assert!(check_copy_stream(&host, &host, 3).is_ok());
    }
}
