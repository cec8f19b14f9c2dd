//! Managers, allocation by placement, copies, streams, prefetch and advice, stats.
//!
//! A manager handle keeps every buffer it allocated in a map from start address to
//! [`Buffer`], so C passes plain addresses (a device address for device memory) and
//! hetmem finds the buffer an address falls in: frees of unknown or freed addresses
//! and copies that leave a buffer are errors, never memory faults.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Mutex};

use super::{
    c_str, call, call_with, device_arg, lock, lookup, out_ptr, register, unregister, write_out,
    FfiError, FfiResult, HETMEM_ERR_FOREIGN_POINTER,
};
use crate::backend::{check_device, BackendKind};
use crate::manager::{Buffer, Manager};
use crate::placement::{Advice, Location, NumaPolicy, Placement};
use crate::stream::Stream;

/// Pageable host memory (`device_or_node`: a NUMA node, or -1 for the default policy).
pub const HETMEM_HOST: c_int = 0;
/// Pinned host memory (`device_or_node`: a NUMA node, or -1 for the default policy).
pub const HETMEM_PINNED: c_int = 1;
/// Device memory (`device_or_node`: the device, -1 for device 0).
pub const HETMEM_DEVICE: c_int = 2;
/// Managed memory (`device_or_node`: its device, -1 for device 0).
pub const HETMEM_MANAGED: c_int = 3;

/// [`Advice::SetReadMostly`].
pub const HETMEM_ADVISE_SET_READ_MOSTLY: c_int = 1;
/// [`Advice::UnsetReadMostly`].
pub const HETMEM_ADVISE_UNSET_READ_MOSTLY: c_int = 2;
/// [`Advice::SetPreferredLocation`] (device -1: the host).
pub const HETMEM_ADVISE_SET_PREFERRED_LOCATION: c_int = 3;
/// [`Advice::UnsetPreferredLocation`].
pub const HETMEM_ADVISE_UNSET_PREFERRED_LOCATION: c_int = 4;
/// [`Advice::SetAccessedBy`].
pub const HETMEM_ADVISE_SET_ACCESSED_BY: c_int = 5;
/// [`Advice::UnsetAccessedBy`].
pub const HETMEM_ADVISE_UNSET_ACCESSED_BY: c_int = 6;

/// Opaque C type of `hetmem_manager_t*` handles (tokens, never dereferenced).
#[repr(C)]
pub struct HetmemManager {
    _opaque: [u8; 0],
}

/// Opaque C type of `hetmem_stream_t*` handles (tokens, never dereferenced).
#[repr(C)]
pub struct HetmemStream {
    _opaque: [u8; 0],
}

/// One live allocation of a manager handle.
#[derive(Debug)]
struct Entry {
    len: usize,
    buf: Arc<Mutex<Buffer>>,
}

/// What a manager handle owns.
#[derive(Debug)]
pub(crate) struct FfiManager {
    pub(crate) mgr: Manager,
    /// Start address → allocation.
    buffers: Mutex<BTreeMap<u64, Entry>>,
    /// Streams for calls made without one (prefetch), by device.
    internal: Mutex<HashMap<usize, Stream>>,
}

/// What a stream handle owns.
#[derive(Debug)]
pub(crate) struct FfiStream {
    pub(crate) stream: Stream,
    /// What `hetmem_stream_raw` reports: the driver's handle, or the value wrapped.
    raw: u64,
}

/// Where an address range lies relative to a manager's buffers.
enum Found {
    /// It starts inside a buffer, at this offset.
    Inside(Arc<Mutex<Buffer>>, usize, usize),
    /// It touches no buffer.
    Outside,
    /// It starts outside every buffer but runs into one.
    Overlaps,
}

impl FfiManager {
    /// A manager handle's state over `mgr`, with no buffers yet.
    pub(crate) fn new(mgr: Manager) -> Self {
        FfiManager {
            mgr,
            buffers: Mutex::new(BTreeMap::new()),
            internal: Mutex::new(HashMap::new()),
        }
    }

    fn find(&self, addr: u64, n: usize) -> Found {
        let map = lock(&self.buffers);
        if let Some((start, e)) = map.range(..=addr).next_back() {
            let off = addr - start;
            if off < e.len as u64 {
                return Found::Inside(e.buf.clone(), off as usize, e.len);
            }
        }
        let end = addr.saturating_add(n as u64);
        if n > 0 && map.range(addr..end).next().is_some() {
            Found::Overlaps
        } else {
            Found::Outside
        }
    }

    /// The buffer `addr..addr+n` lies in, and the offset of `addr` in it.
    fn range(&self, addr: u64, n: usize, what: &str) -> FfiResult<(Arc<Mutex<Buffer>>, usize)> {
        match self.find(addr, n) {
            Found::Inside(buf, off, len) => {
                if off.checked_add(n).is_none_or(|end| end > len) {
                    return Err(crate::Error::OutOfBounds {
                        offset: off,
                        len: n,
                        size: len,
                    }
                    .into());
                }
                Ok((buf, off))
            }
            Found::Outside | Found::Overlaps => Err(foreign(what, addr)),
        }
    }

    /// Copies `n` bytes between two hetmem addresses.
    fn copy(&self, dst: u64, src: u64, n: usize, stream: Option<&Stream>) -> FfiResult<()> {
        let (db, doff) = self.range(dst, n, "dst")?;
        let (sb, soff) = self.range(src, n, "src")?;
        if Arc::ptr_eq(&db, &sb) {
            // One buffer: the manager's copy within it (synchronous, overlap allowed),
            // which checks the stream as a copy between two buffers does.
            let mut b = lock(&db);
            self.mgr.copy_within(&mut b, doff, soff, n, stream)?;
            return Ok(());
        }
        // Two buffers: lock in address order so that two threads copying in opposite
        // directions cannot deadlock.
        let (mut d, s) = if Arc::as_ptr(&db) < Arc::as_ptr(&sb) {
            let d = lock(&db);
            (d, lock(&sb))
        } else {
            let s = lock(&sb);
            (lock(&db), s)
        };
        self.mgr.copy(&mut *d, doff, &*s, soff, n, stream)?;
        Ok(())
    }

    /// The manager's own stream on `device`, made on first use.
    fn internal_stream(&self, device: usize) -> FfiResult<Stream> {
        let mut map = lock(&self.internal);
        if let Some(s) = map.get(&device) {
            return Ok(s.clone());
        }
        let s = self.mgr.create_stream(device)?;
        map.insert(device, s.clone());
        Ok(s)
    }

    /// Live buffers and their bytes.
    pub(super) fn live_buffers(&self) -> (usize, usize) {
        let map = lock(&self.buffers);
        (map.len(), map.values().map(|e| e.len).sum::<usize>())
    }
}

fn foreign(what: &str, addr: u64) -> FfiError {
    FfiError::new(
        HETMEM_ERR_FOREIGN_POINTER,
        format!(
            "`{what}` ({addr:#x}) is not in memory allocated by this manager (or it was freed)"
        ),
    )
}

fn addr_of<T>(p: *const T) -> u64 {
    p.expose_provenance() as u64
}

fn placement_arg(mgr: &Manager, placement: c_int, where_: c_int) -> FfiResult<Placement> {
    let node = || -> FfiResult<NumaPolicy> {
        match where_ {
            -1 => Ok(NumaPolicy::Default),
            n => u32::try_from(n).map(NumaPolicy::Bind).map_err(|_| {
                FfiError::invalid(format!(
                    "NUMA node {n}: nodes are numbered from 0, -1 is the default"
                ))
            }),
        }
    };
    let device = || -> FfiResult<usize> {
        let d = if where_ == -1 {
            0
        } else {
            device_arg(where_, "device_or_node")?
        };
        check_device(mgr.backend(), d)?;
        Ok(d)
    };
    Ok(match placement {
        HETMEM_HOST => Placement::Host(node()?),
        HETMEM_PINNED => Placement::Pinned(node()?),
        HETMEM_DEVICE => Placement::Device(device()?),
        HETMEM_MANAGED => Placement::Managed { device: device()? },
        other => {
            return Err(FfiError::invalid(format!(
                "placement {other}: expected HETMEM_HOST, HETMEM_PINNED, HETMEM_DEVICE or HETMEM_MANAGED"
            )))
        }
    })
}

/// Opens a manager: `backend` is `"sim"`, `"host"`, `"cuda"` or `"rocm"`; NULL, `""`
/// or `"auto"` take `HETMEM_BACKEND`, else the first of CUDA, ROCm and sim that works.
/// `*out` is the new handle (NULL on failure); destroy it with
/// [`hetmem_manager_destroy`].
///
/// # Safety
/// `backend` is NULL or a NUL-terminated string; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_manager_create(
    backend: *const c_char,
    out: *mut *mut HetmemManager,
) -> c_int {
    call("hetmem_manager_create", || {
        let out = out_ptr(out, "out")?;
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(out, std::ptr::null_mut()) };
        let mut b = Manager::builder();
        if !backend.is_null() {
            // SAFETY: non-null and NUL-terminated by the caller's contract.
            let name = unsafe { c_str(backend, "backend")? }.trim();
            if !name.is_empty() && name != "auto" {
                b = b.backend(name.parse::<BackendKind>()?);
            }
        }
        let mgr = b.build()?;
        let h = register::<FfiManager, HetmemManager>(FfiManager::new(mgr));
        // SAFETY: as above.
        unsafe { write_out(out, h) };
        Ok(())
    })
}

/// Destroys a manager handle and frees every buffer it still holds (after the copies
/// that use them). Streams and tier stores made from it stay usable until destroyed.
///
/// # Safety
/// `mgr` is a handle or NULL (any value is checked; this is for symmetry).
#[no_mangle]
pub unsafe extern "C" fn hetmem_manager_destroy(mgr: *mut HetmemManager) -> c_int {
    call("hetmem_manager_destroy", || {
        let m = unregister::<FfiManager, _>(mgr, "mgr")?;
        drop(m);
        Ok(())
    })
}

/// The manager's backend name (`"sim"`, `"host"`, `"cuda"`, `"rocm"`), a static
/// string; NULL for a handle that is not live.
///
/// # Safety
/// `mgr` may be any value: it is checked.
#[no_mangle]
pub unsafe extern "C" fn hetmem_manager_backend(mgr: *mut HetmemManager) -> *const c_char {
    call_with("hetmem_manager_backend", std::ptr::null(), || {
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        Ok(match m.mgr.backend_kind() {
            BackendKind::Host => c"host".as_ptr(),
            BackendKind::Sim => c"sim".as_ptr(),
            BackendKind::Cuda => c"cuda".as_ptr(),
            BackendKind::Rocm => c"rocm".as_ptr(),
        })
    })
}

/// How many devices the manager's backend has (0 for `host`).
///
/// # Safety
/// `count` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_device_count(mgr: *mut HetmemManager, count: *mut c_int) -> c_int {
    call("hetmem_device_count", || {
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        let count = out_ptr(count, "count")?;
        let n = c_int::try_from(m.mgr.devices().len()).unwrap_or(c_int::MAX);
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(count, n) };
        Ok(())
    })
}

/// Free and total bytes of `device`, as the driver reports them.
///
/// # Safety
/// `free` and `total` are NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn hetmem_mem_info(
    mgr: *mut HetmemManager,
    device: c_int,
    free: *mut usize,
    total: *mut usize,
) -> c_int {
    call("hetmem_mem_info", || {
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        let free = out_ptr(free, "free")?;
        let total = out_ptr(total, "total")?;
        let d = device_arg(device, "device")?;
        check_device(m.mgr.backend(), d)?;
        let info = m.mgr.backend().mem_info(d)?;
        // SAFETY: both checked non-null; valid by the caller's contract.
        unsafe {
            write_out(free, info.free);
            write_out(total, info.total);
        }
        Ok(())
    })
}

/// Allocates `size` bytes with `placement` (`HETMEM_HOST`, `HETMEM_PINNED`,
/// `HETMEM_DEVICE`, `HETMEM_MANAGED`). `device_or_node` is the NUMA node for host and
/// pinned memory (-1: the default policy) and the device for device and managed memory
/// (-1: device 0). `*out` is the address (a device address for device memory; NULL on
/// failure); give it back with [`hetmem_free`].
///
/// # Safety
/// `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_alloc(
    mgr: *mut HetmemManager,
    placement: c_int,
    device_or_node: c_int,
    size: usize,
    out: *mut *mut c_void,
) -> c_int {
    call("hetmem_alloc", || {
        // Cleared before anything can fail, the handle's look-up included.
        let out = out_ptr(out, "out")?;
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(out, std::ptr::null_mut()) };
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        let placement = placement_arg(&m.mgr, placement, device_or_node)?;
        let buf = m.mgr.alloc(placement, size)?;
        let addr = match (buf.device_ptr(), buf.host_ptr()) {
            (_, Some(p)) => addr_of(p.as_ptr()),
            (Some(d), None) => d.0,
            (None, None) => {
                return Err(FfiError::invalid("the buffer has no address"));
            }
        };
        {
            let mut map = lock(&m.buffers);
            // Host and device addresses share one map: with unified addressing (CUDA,
            // HIP) they never collide, and the simulator's device addresses lie above
            // any user-space address. Refuse rather than alias if they ever do.
            let clash = map
                .range(..addr.saturating_add(size as u64))
                .next_back()
                .is_some_and(|(s, e)| s + e.len as u64 > addr);
            if clash {
                return Err(FfiError::invalid(format!(
                    "the new buffer at {addr:#x} overlaps a live one (host and device addresses collide)"
                )));
            }
            map.insert(
                addr,
                Entry {
                    len: size,
                    buf: Arc::new(Mutex::new(buf)),
                },
            );
        }
        // SAFETY: as above.
        unsafe { write_out(out, std::ptr::with_exposed_provenance_mut(addr as usize)) };
        Ok(())
    })
}

/// Frees a buffer by the address [`hetmem_alloc`] returned (after the copies that use
/// it are done). An address this manager did not return, one inside a buffer, or one
/// freed already is `HETMEM_ERR_FOREIGN_POINTER` and nothing is touched.
///
/// # Safety
/// `ptr` may be any value: it is only looked up, never dereferenced.
#[no_mangle]
pub unsafe extern "C" fn hetmem_free(mgr: *mut HetmemManager, ptr: *mut c_void) -> c_int {
    call("hetmem_free", || {
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        if ptr.is_null() {
            return Err(FfiError::null("ptr"));
        }
        let addr = addr_of(ptr);
        let entry = lock(&m.buffers).remove(&addr);
        match entry {
            // Dropped here, or after a copy on another thread that still holds it.
            Some(e) => {
                drop(e);
                Ok(())
            }
            None => Err(match m.find(addr, 0) {
                Found::Inside(_, off, _) => FfiError::new(
                    HETMEM_ERR_FOREIGN_POINTER,
                    format!("`ptr` ({addr:#x}) is {off} bytes into a buffer: free takes the address hetmem_alloc returned"),
                ),
                _ => foreign("ptr", addr),
            }),
        }
    })
}

fn stream_opt(s: *mut HetmemStream) -> FfiResult<Option<Arc<FfiStream>>> {
    if s.is_null() {
        Ok(None)
    } else {
        lookup::<FfiStream, _>(s, "stream").map(Some)
    }
}

/// Copies `n` bytes from `src` to `dst`, both addresses in buffers of this manager
/// (anywhere inside one; device addresses for device memory). With `stream` NULL it
/// returns when the bytes have arrived, ordered as `cudaMemcpy` on the legacy default
/// stream is (after the work queued before it there and on blocking streams; see
/// [`Backend::copy`](crate::backend::Backend::copy)); else the copy is queued on `stream` (the
/// buffers stay alive until it is done, even if freed). Ranges that leave their buffer
/// are `HETMEM_ERR_OUT_OF_BOUNDS`; addresses outside every buffer
/// `HETMEM_ERR_FOREIGN_POINTER`. Both ranges in one buffer copy synchronously.
///
/// # Safety
/// `dst` and `src` may be any values: they are looked up, never dereferenced unless
/// they lie in this manager's buffers.
#[no_mangle]
pub unsafe extern "C" fn hetmem_copy(
    mgr: *mut HetmemManager,
    dst: *mut c_void,
    src: *const c_void,
    n: usize,
    stream: *mut HetmemStream,
) -> c_int {
    call("hetmem_copy", || {
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        if dst.is_null() {
            return Err(FfiError::null("dst"));
        }
        if src.is_null() {
            return Err(FfiError::null("src"));
        }
        let s = stream_opt(stream)?;
        m.copy(addr_of(dst), addr_of(src), n, s.as_ref().map(|s| &s.stream))
    })
}

/// Copies `n` bytes of caller-owned host memory at `host_src` to `dst` (an address in
/// a buffer of this manager), synchronously. If `host_src` is itself in one of this
/// manager's buffers this is [`hetmem_copy`].
///
/// # Safety
/// `host_src` is NULL or, unless it lies in a buffer of this manager, valid for reads
/// of `n` bytes that no other thread writes during the call.
#[no_mangle]
pub unsafe extern "C" fn hetmem_copy_from_host(
    mgr: *mut HetmemManager,
    dst: *mut c_void,
    host_src: *const c_void,
    n: usize,
) -> c_int {
    call("hetmem_copy_from_host", || {
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        if dst.is_null() {
            return Err(FfiError::null("dst"));
        }
        if host_src.is_null() {
            return Err(FfiError::null("host_src"));
        }
        let (dst, src) = (addr_of(dst), addr_of(host_src));
        match m.find(src, n) {
            Found::Inside(..) => return m.copy(dst, src, n, None),
            Found::Overlaps => {
                return Err(FfiError::invalid(
                    "`host_src` runs into a buffer of this manager without starting in it",
                ))
            }
            Found::Outside => {}
        }
        let (buf, off) = m.range(dst, n, "dst")?;
        // SAFETY: caller-owned memory valid for `n` bytes of reads (the contract), and
        // not part of any buffer of this manager (checked above), so it cannot alias
        // the buffer written below.
        let data = unsafe { std::slice::from_raw_parts(host_src.cast::<u8>(), n) };
        let mut b = lock(&buf);
        m.mgr.write(&mut b, off, data)?;
        Ok(())
    })
}

/// Copies `n` bytes from `src` (an address in a buffer of this manager) to caller-owned
/// host memory at `host_dst`, synchronously. If `host_dst` is itself in one of this
/// manager's buffers this is [`hetmem_copy`].
///
/// # Safety
/// `host_dst` is NULL or, unless it lies in a buffer of this manager, valid for writes
/// of `n` bytes that nothing else uses during the call.
#[no_mangle]
pub unsafe extern "C" fn hetmem_copy_to_host(
    mgr: *mut HetmemManager,
    host_dst: *mut c_void,
    src: *const c_void,
    n: usize,
) -> c_int {
    call("hetmem_copy_to_host", || {
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        if host_dst.is_null() {
            return Err(FfiError::null("host_dst"));
        }
        if src.is_null() {
            return Err(FfiError::null("src"));
        }
        let (dst, srca) = (addr_of(host_dst), addr_of(src));
        match m.find(dst, n) {
            Found::Inside(..) => return m.copy(dst, srca, n, None),
            Found::Overlaps => {
                return Err(FfiError::invalid(
                    "`host_dst` runs into a buffer of this manager without starting in it",
                ))
            }
            Found::Outside => {}
        }
        let (buf, off) = m.range(srca, n, "src")?;
        // SAFETY: caller-owned memory valid for `n` bytes of writes and unused elsewhere
        // during the call (the contract), outside every buffer of this manager
        // (checked above), so it cannot alias the buffer read below.
        let out = unsafe { std::slice::from_raw_parts_mut(host_dst.cast::<u8>(), n) };
        let b = lock(&buf);
        m.mgr.read(&b, off, out)?;
        Ok(())
    })
}

fn new_stream(out: *mut *mut HetmemStream, s: FfiStream) {
    let h = register::<FfiStream, HetmemStream>(s);
    // SAFETY: `out` was checked non-null by the caller of this helper, and is valid by
    // the C caller's contract.
    unsafe { write_out(out, h) };
}

/// Creates a stream on `device`, owned by hetmem (destroyed with
/// [`hetmem_stream_destroy`], once the work queued on it is done).
///
/// # Safety
/// `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_stream_create(
    mgr: *mut HetmemManager,
    device: c_int,
    out: *mut *mut HetmemStream,
) -> c_int {
    call("hetmem_stream_create", || {
        let out = out_ptr(out, "out")?;
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(out, std::ptr::null_mut()) };
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        let stream = m.mgr.create_stream(device_arg(device, "device")?)?;
        let raw = stream.handle().0;
        new_stream(out, FfiStream { stream, raw });
        Ok(())
    })
}

/// Wraps the caller's stream `raw` (a `cudaStream_t` / `CUstream` or `hipStream_t`
/// value; 0 for the device's default stream) of `device`, for use wherever hetmem
/// takes a stream. hetmem never destroys it: [`hetmem_stream_destroy`] only lets go.
/// 2 (`cudaStreamPerThread`, `hipStreamPerThread`) is the per-thread default stream,
/// with the driver's meaning: each thread that uses the handle uses its own
/// ([`Stream::wrap`]).
///
/// # Safety
/// `out` is NULL or valid for a write. `raw` is 0 or a live stream of `device` made by
/// the driver the manager uses, in this process; it stays live while the handle, and
/// any buffer, block or guard that used it, is alive. On the simulator `raw` must be 0
/// or a stream it made (see [`hetmem_stream_raw`]); a bad value is an error there.
#[no_mangle]
pub unsafe extern "C" fn hetmem_stream_wrap(
    mgr: *mut HetmemManager,
    device: c_int,
    raw: usize,
    out: *mut *mut HetmemStream,
) -> c_int {
    call("hetmem_stream_wrap", || {
        let out = out_ptr(out, "out")?;
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(out, std::ptr::null_mut()) };
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        let device = device_arg(device, "device")?;
        // SAFETY: the caller's contract is Stream::wrap's.
        let stream = unsafe { Stream::wrap(&m.mgr, device, raw as u64)? };
        new_stream(
            out,
            FfiStream {
                stream,
                raw: raw as u64,
            },
        );
        Ok(())
    })
}

/// The driver's handle of a stream (`cudaStream_t` / `hipStream_t` value), for
/// launching the caller's own work on it; for a wrapped stream, the value wrapped.
///
/// # Safety
/// `raw` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_stream_raw(stream: *mut HetmemStream, raw: *mut usize) -> c_int {
    call("hetmem_stream_raw", || {
        let s = lookup::<FfiStream, _>(stream, "stream")?;
        let raw = out_ptr(raw, "raw")?;
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(raw, s.raw as usize) };
        Ok(())
    })
}

/// Blocks until the work queued on `stream` so far is done.
///
/// # Safety
/// `stream` may be any value: it is checked.
#[no_mangle]
pub unsafe extern "C" fn hetmem_stream_synchronize(stream: *mut HetmemStream) -> c_int {
    call("hetmem_stream_synchronize", || {
        let s = lookup::<FfiStream, _>(stream, "stream")?;
        s.stream.synchronize()?;
        Ok(())
    })
}

/// Destroys a stream handle. A stream hetmem made is destroyed once no pool block or
/// guard uses it any more; a wrapped one is only let go of.
///
/// # Safety
/// `stream` may be any value: it is checked.
#[no_mangle]
pub unsafe extern "C" fn hetmem_stream_destroy(stream: *mut HetmemStream) -> c_int {
    call("hetmem_stream_destroy", || {
        drop(unregister::<FfiStream, _>(stream, "stream")?);
        Ok(())
    })
}

/// The managed buffer `ptr..ptr+n` lies in, and the host address of `ptr`.
fn managed_range(
    m: &FfiManager,
    ptr: *mut c_void,
    n: usize,
) -> FfiResult<(Arc<Mutex<Buffer>>, usize)> {
    if ptr.is_null() {
        return Err(FfiError::null("ptr"));
    }
    let (buf, off) = m.range(addr_of(ptr), n, "ptr")?;
    if !matches!(lock(&buf).placement(), Placement::Managed { .. }) {
        return Err(crate::Error::InvalidArgument(
            "prefetch and advise need managed memory".into(),
        )
        .into());
    }
    Ok((buf, off))
}

fn location_arg(m: &FfiManager, device: c_int) -> FfiResult<Location> {
    if device == -1 {
        return Ok(Location::Host);
    }
    let d = device_arg(device, "device")?;
    check_device(m.mgr.backend(), d)?;
    Ok(Location::Device(d))
}

/// Queues a migration of managed memory `ptr..ptr+n` to `device` (-1: the host) on
/// `stream`; with `stream` NULL, on a stream of the buffer's device, and waits for it.
///
/// # Safety
/// `ptr` may be any value: it is looked up, never dereferenced.
#[no_mangle]
pub unsafe extern "C" fn hetmem_prefetch(
    mgr: *mut HetmemManager,
    ptr: *mut c_void,
    n: usize,
    device: c_int,
    stream: *mut HetmemStream,
) -> c_int {
    call("hetmem_prefetch", || {
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        let s = stream_opt(stream)?;
        let (buf, off) = managed_range(&m, ptr, n)?;
        let to = location_arg(&m, device)?;
        let b = lock(&buf);
        let Placement::Managed { device: home } = *b.placement() else {
            return Err(FfiError::invalid("not managed memory"));
        };
        let (stream, wait) = match &s {
            Some(s) => {
                if !s.stream.belongs_to(m.mgr.shared_backend()) {
                    return Err(crate::Error::ForeignHandle { what: "stream" }.into());
                }
                (s.stream.clone(), false)
            }
            None => (m.internal_stream(home)?, true),
        };
        let host = b
            .host_ptr()
            .ok_or_else(|| FfiError::invalid("managed memory without a host address"))?;
        // A migration does not change the bytes, so the buffer may be freed after it
        // is queued (the driver orders the free after it).
        // SAFETY: `off + n <= len` (checked by `range`): the range lies in this live
        // managed buffer of this backend; the stream is live and of the same backend.
        unsafe {
            m.mgr
                .backend()
                .prefetch(host.add(off), n, to, stream.handle())?;
        }
        drop(b);
        if wait {
            stream.synchronize()?;
        }
        Ok(())
    })
}

/// Gives the driver `advice` (`HETMEM_ADVISE_*`) about managed memory `ptr..ptr+n`;
/// `device` is the location for the preferred-location and accessed-by advice (-1: the
/// host, for the preferred location only) and ignored otherwise.
///
/// # Safety
/// `ptr` may be any value: it is looked up, never dereferenced.
#[no_mangle]
pub unsafe extern "C" fn hetmem_advise(
    mgr: *mut HetmemManager,
    ptr: *mut c_void,
    n: usize,
    advice: c_int,
    device: c_int,
) -> c_int {
    call("hetmem_advise", || {
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        let (buf, off) = managed_range(&m, ptr, n)?;
        let dev = || -> FfiResult<usize> {
            let d = device_arg(device, "device")?;
            check_device(m.mgr.backend(), d)?;
            Ok(d)
        };
        let advice = match advice {
            HETMEM_ADVISE_SET_READ_MOSTLY => Advice::SetReadMostly,
            HETMEM_ADVISE_UNSET_READ_MOSTLY => Advice::UnsetReadMostly,
            HETMEM_ADVISE_SET_PREFERRED_LOCATION => {
                Advice::SetPreferredLocation(location_arg(&m, device)?)
            }
            HETMEM_ADVISE_UNSET_PREFERRED_LOCATION => Advice::UnsetPreferredLocation,
            HETMEM_ADVISE_SET_ACCESSED_BY => Advice::SetAccessedBy(dev()?),
            HETMEM_ADVISE_UNSET_ACCESSED_BY => Advice::UnsetAccessedBy(dev()?),
            other => {
                return Err(FfiError::invalid(format!(
                    "advice {other}: expected one of HETMEM_ADVISE_*"
                )))
            }
        };
        if n == 0 {
            return Ok(());
        }
        let b = lock(&buf);
        let host = b
            .host_ptr()
            .ok_or_else(|| FfiError::invalid("managed memory without a host address"))?;
        // SAFETY: `off + n <= len` (checked by `range`): the range lies in this live
        // managed buffer of this manager's backend, kept alive by the lock.
        unsafe { m.mgr.backend().advise(host.add(off), n, advice)? };
        Ok(())
    })
}
