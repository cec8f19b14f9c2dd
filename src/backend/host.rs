//! The host backend: no devices; "pins" memory with `mlock` and copies between host
//! buffers with `memcpy`. The host memory itself
//! ([`HostRegion`](crate::host_mem::HostRegion) and the machine's sizes) is
//! [`crate::host_mem`], below every backend.

use std::any::Any;
use std::ptr::NonNull;

use nix::errno::Errno;

use crate::backend::{
    check_device, Backend, BackendKind, DeviceInfo, DevicePtr, EventHandle, MemInfo, MemRef,
    StreamHandle,
};
use crate::error::{Error, Result};
use crate::host_mem::{available_memory, parse_meminfo_field};
use crate::placement::{Advice, Location, MemKind};

/// The backend without devices: host memory only. Pinning is `mlock` (page-locked memory
/// is what "pinned" means with no DMA engine to serve), copies are `memcpy`, and every
/// device, stream or event call fails.
#[derive(Debug, Default)]
pub struct HostBackend {
    _private: (),
}

impl HostBackend {
    /// The host backend. It needs nothing from the system, so it cannot fail.
    pub fn new() -> HostBackend {
        HostBackend { _private: () }
    }

    fn no_device(&self, device: usize) -> Error {
        match check_device(self, device) {
            Err(e) => e,
            Ok(()) => unreachable!("the host backend has no devices"),
        }
    }

    fn unsupported(what: &'static str) -> Error {
        Error::Unsupported {
            backend: BackendKind::Host,
            what,
        }
    }
}

/// Bytes this process may still lock: `RLIMIT_MEMLOCK` less what `/proc/self/status`
/// reports locked (`VmLck`), or available memory where the limit is infinite.
fn lockable_memory() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `struct rlimit`, which `lim` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return available_memory();
    }
    let locked = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_meminfo_field(&s, None, "VmLck").ok().flatten())
        .unwrap_or(0);
    usize::try_from(lim.rlim_cur.saturating_sub(locked)).unwrap_or(usize::MAX)
}

impl Backend for HostBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }

    fn devices(&self) -> &[DeviceInfo] {
        &[]
    }

    fn mem_info(&self, device: usize) -> Result<MemInfo> {
        Err(self.no_device(device))
    }

    fn alloc_device(&self, device: usize, _size: usize) -> Result<DevicePtr> {
        Err(self.no_device(device))
    }

    unsafe fn free_device(&self, device: usize, _ptr: DevicePtr, _size: usize) -> Result<()> {
        Err(self.no_device(device))
    }

    fn alloc_managed(&self, device: usize, _size: usize) -> Result<NonNull<u8>> {
        Err(self.no_device(device))
    }

    unsafe fn free_managed(&self, device: usize, _ptr: NonNull<u8>, _size: usize) -> Result<()> {
        Err(self.no_device(device))
    }

    unsafe fn register_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        // SAFETY: the caller guarantees `ptr..ptr+len` is mapped memory it owns; mlock
        // only pins the pages (faulting them in) and changes no contents.
        if unsafe { libc::mlock(ptr.as_ptr().cast(), len) } == 0 {
            return Ok(());
        }
        match Errno::last() {
            Errno::ENOMEM => {
                let free = lockable_memory();
                tracing::warn!(
                    len,
                    free,
                    "mlock: RLIMIT_MEMLOCK reached; raise `ulimit -l` or grant CAP_IPC_LOCK"
                );
                Err(Error::oom(MemKind::Pinned, len, free))
            }
            Errno::EPERM => Err(Error::os(
                "mlock (RLIMIT_MEMLOCK is 0 and no CAP_IPC_LOCK: raise `ulimit -l`)",
                Errno::EPERM,
            )),
            e => Err(Error::os("mlock", e)),
        }
    }

    unsafe fn unregister_host(&self, ptr: NonNull<u8>, len: usize) -> Result<()> {
        // SAFETY: the caller guarantees the range was registered (locked) by us; munlock
        // only lets the pages be swapped again.
        if unsafe { libc::munlock(ptr.as_ptr().cast(), len) } == 0 {
            Ok(())
        } else {
            Err(Error::os("munlock", Errno::last()))
        }
    }

    fn create_stream(&self, device: usize) -> Result<StreamHandle> {
        Err(self.no_device(device))
    }

    unsafe fn destroy_stream(&self, _stream: StreamHandle) -> Result<()> {
        Err(Self::unsupported("streams"))
    }

    unsafe fn synchronize_stream(&self, _stream: StreamHandle) -> Result<()> {
        Err(Self::unsupported("streams"))
    }

    fn create_event(&self, device: usize) -> Result<EventHandle> {
        Err(self.no_device(device))
    }

    unsafe fn destroy_event(&self, _event: EventHandle) -> Result<()> {
        Err(Self::unsupported("events"))
    }

    unsafe fn record_event(&self, _event: EventHandle, _stream: StreamHandle) -> Result<()> {
        Err(Self::unsupported("events"))
    }

    unsafe fn stream_wait_event(&self, _stream: StreamHandle, _event: EventHandle) -> Result<()> {
        Err(Self::unsupported("events"))
    }

    unsafe fn synchronize_event(&self, _event: EventHandle) -> Result<()> {
        Err(Self::unsupported("events"))
    }

    unsafe fn event_done(&self, _event: EventHandle) -> Result<bool> {
        Err(Self::unsupported("events"))
    }

    unsafe fn copy(
        &self,
        dst: MemRef,
        src: MemRef,
        len: usize,
        stream: Option<StreamHandle>,
    ) -> Result<()> {
        for side in [dst, src] {
            if let MemRef::Device { device, .. } = side {
                return Err(self.no_device(device));
            }
        }
        if stream.is_some() {
            return Err(Self::unsupported("streams (copy with stream None)"));
        }
        let (MemRef::Host { ptr: d, .. }, MemRef::Host { ptr: s, .. }) = (dst, src) else {
            unreachable!("device sides were refused above");
        };
        if len > 0 {
            // SAFETY: the caller guarantees both ranges are valid for `len` bytes and do
            // not overlap; the copy is done before we return.
            unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), d.as_ptr(), len) };
        }
        Ok(())
    }

    unsafe fn prefetch(
        &self,
        _ptr: NonNull<u8>,
        _len: usize,
        to: Location,
        _stream: StreamHandle,
    ) -> Result<()> {
        match to {
            Location::Device(d) => Err(self.no_device(d)),
            Location::Host => Err(Self::unsupported("managed memory")),
        }
    }

    unsafe fn advise(&self, _ptr: NonNull<u8>, _len: usize, advice: Advice) -> Result<()> {
        match advice {
            Advice::SetPreferredLocation(Location::Device(d))
            | Advice::SetAccessedBy(d)
            | Advice::UnsetAccessedBy(d) => Err(self.no_device(d)),
            _ => Err(Self::unsupported("managed memory")),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
