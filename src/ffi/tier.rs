//! The tier store through C: register parameters, give hints, acquire and release.
//!
//! Parameter ids are the store's (`uint32_t`, from 0 in registration order). Unknown
//! ids and names are `HETMEM_ERR_UNKNOWN_PARAM`.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::Mutex;

use super::memory::{FfiManager, FfiStream, HetmemManager, HetmemStream};
use super::{
    c_str, call, copy_in, device_arg, lock, lookup, out_ptr, register, unregister, write_out,
    FfiError, FfiResult, HETMEM_ERR_BUFFER_TOO_SMALL, HETMEM_ERR_INVALID_HANDLE,
    HETMEM_ERR_INVALID_SIZE, HETMEM_ERR_UNKNOWN_PARAM,
};
use crate::tier::policy::ParamId;
use crate::tier::source::SafetensorsFile;
use crate::tier::{ParamGuard, Planner, Residency, SequenceHint, TierConfig, TierStore};

/// No execution sequence: LRU eviction.
pub const HETMEM_SEQUENCE_NONE: c_int = 0;
/// Learn the execution sequence from the first pass of acquires.
pub const HETMEM_SEQUENCE_LEARN: c_int = 1;

/// Belady's MIN decides what stays on the device (`Planner::Belady`, the default).
pub const HETMEM_PLANNER_BELADY: c_int = 0;
/// A fixed resident set chosen from the sizes, the rest streamed (`Planner::Static`).
pub const HETMEM_PLANNER_STATIC: c_int = 1;

/// Only in its source.
pub const HETMEM_RESIDENCY_COLD: c_int = 0;
/// In pinned host memory, not on the device.
pub const HETMEM_RESIDENCY_HOST: c_int = 1;
/// On the device, its load queued.
pub const HETMEM_RESIDENCY_LOADING: c_int = 2;
/// On the device, loaded.
pub const HETMEM_RESIDENCY_DEVICE: c_int = 3;

/// Settings of a tier store, as C sees them (`hetmem_store_config_t`); fill it with
/// [`hetmem_store_config_init`] and change what you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HetmemStoreConfig {
    /// The device parameters are loaded onto.
    pub device: c_int,
    /// Most device bytes resident parameters may use.
    pub device_budget: usize,
    /// Most pinned host bytes (parameter copies plus the staging ring).
    pub host_budget: usize,
    /// How many steps of the sequence loads may run ahead of the runtime
    /// (`SIZE_MAX`: as far as memory allows, at most one pass).
    pub prefetch_depth: usize,
    /// `HETMEM_SEQUENCE_NONE` or `HETMEM_SEQUENCE_LEARN` (give one with
    /// [`hetmem_store_set_sequence`]).
    pub sequence: c_int,
    /// Non-zero: verify every load against a checksum (slow; tests and debugging).
    pub checksums: c_int,
    /// Slots of the staging ring (at least 2).
    pub staging_slots: usize,
    /// Bytes per staging slot.
    pub staging_slot_size: usize,
    /// Host threads that fill a staging slot.
    pub staging_threads: usize,
    /// The largest parameters' worth of the budget kept out of the plan's cache for
    /// loading ahead (`TierConfig::spare_slots`).
    pub spare_slots: usize,
    /// `HETMEM_PLANNER_BELADY` or `HETMEM_PLANNER_STATIC` (`TierConfig::planner`).
    pub planner: c_int,
}

/// Opaque C type of `hetmem_store_t*` handles (tokens, never dereferenced).
#[repr(C)]
pub struct HetmemStore {
    _opaque: [u8; 0],
}

/// Opaque C type of `hetmem_guard_t*` handles (tokens, never dereferenced).
#[repr(C)]
pub struct HetmemGuard {
    _opaque: [u8; 0],
}

/// What a store handle owns.
#[derive(Debug)]
pub(crate) struct FfiStore {
    pub(super) store: TierStore,
    /// Bytes of each parameter registered through C.
    sizes: Mutex<HashMap<ParamId, usize>>,
}

impl FfiStore {
    /// Checks `id`, and first that this is not a forked child (the store's lock may
    /// have been held by a thread of the parent at the fork).
    fn check_id(&self, id: u32) -> FfiResult<()> {
        self.store.check_fork()?;
        if (id as usize) < self.store.len() {
            Ok(())
        } else {
            Err(unknown_id(id, self.store.len()))
        }
    }
}

fn unknown_id(id: u32, n: usize) -> FfiError {
    FfiError::new(
        HETMEM_ERR_UNKNOWN_PARAM,
        format!("parameter {id} is not registered ({n} are)"),
    )
}

/// What a guard handle owns: the guard until it is released.
#[derive(Debug)]
pub(crate) struct FfiGuard {
    guard: Mutex<Option<ParamGuard>>,
}

/// Fills `cfg` with the defaults for these budgets: device 0, prefetch depth
/// `SIZE_MAX` (as far as memory allows), no sequence, no checksums, a staging ring of 4 slots of 4 MiB filled by 2 threads (so
/// `host_budget` must be at least 16 MiB).
///
/// # Safety
/// `cfg` is NULL or valid for a write of `hetmem_store_config_t`.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_config_init(
    cfg: *mut HetmemStoreConfig,
    device_budget: usize,
    host_budget: usize,
) -> c_int {
    call("hetmem_store_config_init", || {
        let cfg = out_ptr(cfg, "cfg")?;
        let d = TierConfig::new(device_budget, host_budget);
        let c = HetmemStoreConfig {
            device: c_int::try_from(d.device).unwrap_or(0),
            device_budget: d.device_budget,
            host_budget: d.host_budget,
            prefetch_depth: d.prefetch_depth,
            sequence: HETMEM_SEQUENCE_NONE,
            checksums: c_int::from(d.checksums),
            staging_slots: d.staging_slots,
            staging_slot_size: d.staging_slot_size,
            staging_threads: d.staging_threads,
            spare_slots: d.spare_slots,
            planner: HETMEM_PLANNER_BELADY,
        };
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(cfg, c) };
        Ok(())
    })
}

/// `sizeof(hetmem_store_config_t)` as the library sees it, to catch a header that
/// does not match the library.
#[no_mangle]
pub extern "C" fn hetmem_store_config_size() -> usize {
    std::mem::size_of::<HetmemStoreConfig>()
}

/// Creates a tier store over `mgr`'s device `cfg->device`, with its own device pool,
/// pinned host pool, copy stream and staging ring. `*out` is the handle (NULL on
/// failure); destroy it with [`hetmem_store_destroy`].
///
/// # Safety
/// `cfg` is NULL or valid for a read; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_create(
    mgr: *mut HetmemManager,
    cfg: *const HetmemStoreConfig,
    out: *mut *mut HetmemStore,
) -> c_int {
    call("hetmem_store_create", || {
        // Cleared before anything can fail, the handle's look-up included.
        let out = out_ptr(out, "out")?;
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(out, std::ptr::null_mut()) };
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        if cfg.is_null() {
            return Err(FfiError::null("cfg"));
        }
        // SAFETY: non-null and valid for a read by the caller's contract.
        let c = unsafe { cfg.read() };
        let sequence = match c.sequence {
            HETMEM_SEQUENCE_NONE => SequenceHint::Lru,
            HETMEM_SEQUENCE_LEARN => SequenceHint::Learn,
            other => {
                return Err(FfiError::invalid(format!(
                    "sequence mode {other}: expected HETMEM_SEQUENCE_NONE or HETMEM_SEQUENCE_LEARN"
                )))
            }
        };
        let planner = match c.planner {
            HETMEM_PLANNER_BELADY => Planner::Belady,
            HETMEM_PLANNER_STATIC => Planner::Static,
            other => {
                return Err(FfiError::invalid(format!(
                    "planner {other}: expected HETMEM_PLANNER_BELADY or HETMEM_PLANNER_STATIC"
                )))
            }
        };
        let cfg = TierConfig {
            device: device_arg(c.device, "cfg->device")?,
            device_budget: c.device_budget,
            host_budget: c.host_budget,
            prefetch_depth: c.prefetch_depth,
            sequence,
            checksums: c.checksums != 0,
            staging_slots: c.staging_slots,
            staging_slot_size: c.staging_slot_size,
            staging_threads: c.staging_threads,
            spare_slots: c.spare_slots,
            planner,
        };
        let store = TierStore::new(&m.mgr, cfg)?;
        let h = register::<FfiStore, HetmemStore>(FfiStore {
            store,
            sizes: Mutex::new(HashMap::new()),
        });
        // SAFETY: as above.
        unsafe { write_out(out, h) };
        Ok(())
    })
}

/// Destroys a store handle. Guards not yet released keep what they use alive until
/// they are.
///
/// # Safety
/// `store` may be any value: it is checked.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_destroy(store: *mut HetmemStore) -> c_int {
    call("hetmem_store_destroy", || {
        drop(unregister::<FfiStore, _>(store, "store")?);
        Ok(())
    })
}

/// Registers a parameter called `name` whose bytes are a copy of `data[0..n]` (kept in
/// host memory until loaded). `*id` is its id.
///
/// # Safety
/// `name` is NULL or NUL-terminated; `data` is NULL or valid for reads of `n` bytes;
/// `id` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_register(
    store: *mut HetmemStore,
    name: *const c_char,
    data: *const c_void,
    n: usize,
    id: *mut u32,
) -> c_int {
    call("hetmem_store_register", || {
        let s = lookup::<FfiStore, _>(store, "store")?;
        // SAFETY: the caller's contract.
        let name = unsafe { c_str(name, "name")? };
        if n == 0 {
            return Err(FfiError::new(
                HETMEM_ERR_INVALID_SIZE,
                "a parameter of zero bytes: nothing to register",
            ));
        }
        if data.is_null() {
            return Err(FfiError::null("data"));
        }
        let id = out_ptr(id, "id")?;
        // SAFETY: non-null and valid for `n` bytes of reads by the caller's contract;
        // copied at once.
        let bytes = unsafe { copy_in(data.cast::<u8>(), n, "data")? };
        let pid = s.store.register(name, bytes.into())?;
        lock(&s.sizes).insert(pid, n);
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(id, pid) };
        Ok(())
    })
}

/// Registers every tensor of the safetensors file at `path` (mapped, not copied), in
/// file order, under its own name, writing the ids to `ids[0..]`. `*count` is the
/// number of tensors: if it exceeds `cap`, nothing is registered and the call fails
/// with `HETMEM_ERR_BUFFER_TOO_SMALL` (pass `cap` 0 and `ids` NULL to ask). The tensors
/// are registered all or none: on any other failure nothing is, and `*count` is 0. A
/// tensor of zero elements is an empty parameter (see
/// [`TierStore::register_safetensors`]): its size is 0 and it acquires to a NULL
/// device pointer.
///
/// # Safety
/// `path` is NULL or NUL-terminated; `ids` is NULL or valid for `cap` writes; `count`
/// is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_register_safetensors(
    store: *mut HetmemStore,
    path: *const c_char,
    ids: *mut u32,
    cap: usize,
    count: *mut usize,
) -> c_int {
    call("hetmem_store_register_safetensors", || {
        // 0 before anything can fail (the handle, the path), as the header says.
        let count = out_ptr(count, "count")?;
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(count, 0) };
        let s = lookup::<FfiStore, _>(store, "store")?;
        // SAFETY: the caller's contract.
        let path = unsafe { c_str(path, "path")? };
        if ids.is_null() && cap > 0 {
            return Err(FfiError::null("ids"));
        }
        let file = SafetensorsFile::open(path)?;
        let n = file.tensors().len();
        if n > cap {
            // SAFETY: as above.
            unsafe { write_out(count, n) };
            return Err(FfiError::new(
                HETMEM_ERR_BUFFER_TOO_SMALL,
                format!("{path} has {n} tensors, `ids` has room for {cap}"),
            ));
        }
        // All or none: on failure nothing is registered, and `*count` stays 0.
        let pids = s.store.register_safetensors(&file)?;
        let mut sizes = lock(&s.sizes);
        for (i, (t, pid)) in file.tensors().iter().zip(pids).enumerate() {
            sizes.insert(pid, t.len);
            // SAFETY: `i < n <= cap` and `ids` is valid for `cap` writes.
            unsafe { write_out(ids.add(i), pid) };
        }
        // SAFETY: as above.
        unsafe { write_out(count, n) };
        Ok(())
    })
}

/// The id of the parameter called `name`; `HETMEM_ERR_UNKNOWN_PARAM` if none is.
///
/// # Safety
/// `name` is NULL or NUL-terminated; `id` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_lookup(
    store: *mut HetmemStore,
    name: *const c_char,
    id: *mut u32,
) -> c_int {
    call("hetmem_store_lookup", || {
        let s = lookup::<FfiStore, _>(store, "store")?;
        // SAFETY: the caller's contract.
        let name = unsafe { c_str(name, "name")? };
        let id = out_ptr(id, "id")?;
        s.store.check_fork()?;
        let pid = s.store.id(name).ok_or_else(|| {
            FfiError::new(
                HETMEM_ERR_UNKNOWN_PARAM,
                format!("no parameter is called `{name}`"),
            )
        })?;
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(id, pid) };
        Ok(())
    })
}

/// The size in bytes of parameter `id`.
///
/// # Safety
/// `size` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_param_size(
    store: *mut HetmemStore,
    id: u32,
    size: *mut usize,
) -> c_int {
    call("hetmem_store_param_size", || {
        let s = lookup::<FfiStore, _>(store, "store")?;
        let size = out_ptr(size, "size")?;
        s.check_id(id)?;
        let n = lock(&s.sizes)
            .get(&id)
            .copied()
            .ok_or_else(|| unknown_id(id, s.store.len()))?;
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(size, n) };
        Ok(())
    })
}

/// Installs the execution sequence `ids[0..n]` (one pass; ids may repeat), which drives
/// eviction (farthest next use first) and prefetch. `n` 0 drops the sequence (back to
/// LRU, and to learning in learn mode); `ids` may then be NULL.
///
/// # Safety
/// `ids` is NULL or valid for reads of `n` ids.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_set_sequence(
    store: *mut HetmemStore,
    ids: *const u32,
    n: usize,
) -> c_int {
    call("hetmem_store_set_sequence", || {
        let s = lookup::<FfiStore, _>(store, "store")?;
        if n == 0 {
            s.store.set_sequence(None)?;
            return Ok(());
        }
        if ids.is_null() {
            return Err(FfiError::null("ids"));
        }
        // SAFETY: non-null and valid for `n` reads by the caller's contract; copied.
        let order = unsafe { copy_in(ids, n, "ids")? };
        for id in &order {
            s.check_id(*id)?;
        }
        s.store.set_sequence(Some(order))?;
        Ok(())
    })
}

/// Hint: parameter `id` is needed soon; it is loaded now if room can be made without
/// evicting anything in use, kept resident or needed sooner. `*on_device` (if not
/// NULL) says whether it is on the device afterwards.
///
/// # Safety
/// `on_device` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_will_need(
    store: *mut HetmemStore,
    id: u32,
    on_device: *mut c_int,
) -> c_int {
    call("hetmem_store_will_need", || {
        let s = lookup::<FfiStore, _>(store, "store")?;
        s.check_id(id)?;
        let r = s.store.will_need(id)?;
        if !on_device.is_null() {
            // SAFETY: non-null and valid by the caller's contract.
            unsafe { write_out(on_device, c_int::from(r)) };
        }
        Ok(())
    })
}

/// Hint: parameter `id` is not needed for a while; its device copy is dropped now
/// (written back first if dirty) unless a guard holds it. `*dropped` (if not NULL)
/// says whether it was.
///
/// # Safety
/// `dropped` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_dont_need(
    store: *mut HetmemStore,
    id: u32,
    dropped: *mut c_int,
) -> c_int {
    call("hetmem_store_dont_need", || {
        let s = lookup::<FfiStore, _>(store, "store")?;
        s.check_id(id)?;
        let r = s.store.dont_need(id)?;
        if !dropped.is_null() {
            // SAFETY: non-null and valid by the caller's contract.
            unsafe { write_out(dropped, c_int::from(r)) };
        }
        Ok(())
    })
}

/// Keeps parameter `id` on the device once loaded (`keep` non-zero), or lets it be
/// evicted again (0).
///
/// # Safety
/// `store` may be any value: it is checked.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_keep_resident(
    store: *mut HetmemStore,
    id: u32,
    keep: c_int,
) -> c_int {
    call("hetmem_store_keep_resident", || {
        let s = lookup::<FfiStore, _>(store, "store")?;
        s.check_id(id)?;
        s.store.keep_resident(id, keep != 0)?;
        Ok(())
    })
}

/// Sets parameter `id`'s eviction priority (default 0; the lowest goes first).
///
/// # Safety
/// `store` may be any value: it is checked.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_priority(
    store: *mut HetmemStore,
    id: u32,
    priority: c_int,
) -> c_int {
    call("hetmem_store_priority", || {
        let s = lookup::<FfiStore, _>(store, "store")?;
        s.check_id(id)?;
        s.store.priority(id, priority)?;
        Ok(())
    })
}

/// Where parameter `id` is: `*state` is a `HETMEM_RESIDENCY_*` value, `*refs` (if not
/// NULL) the guards held on it.
///
/// # Safety
/// `state` is NULL or valid for a write; `refs` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_residency(
    store: *mut HetmemStore,
    id: u32,
    state: *mut c_int,
    refs: *mut u32,
) -> c_int {
    call("hetmem_store_residency", || {
        let s = lookup::<FfiStore, _>(store, "store")?;
        let state = out_ptr(state, "state")?;
        s.check_id(id)?;
        let (st, r) = match s.store.residency(id)? {
            Residency::Cold => (HETMEM_RESIDENCY_COLD, 0),
            Residency::Host => (HETMEM_RESIDENCY_HOST, 0),
            Residency::Loading { refs } => (HETMEM_RESIDENCY_LOADING, refs),
            Residency::Device { refs } => (HETMEM_RESIDENCY_DEVICE, refs),
        };
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(state, st) };
        if !refs.is_null() {
            // SAFETY: non-null and valid by the caller's contract.
            unsafe { write_out(refs, r) };
        }
        Ok(())
    })
}

/// Acquires parameter `id` for work on `stream`: `*device_ptr` (if not NULL) is its
/// device address, valid for work queued on `stream` from now until
/// [`hetmem_guard_release`]; `stream` waits for the load, the host does not. With
/// `stream` NULL the load runs on the store's copy stream and the call waits for it,
/// so the address is valid at once; the caller then orders its own work before the
/// release. `*out` is the guard (NULL on failure). Fails at once with
/// `HETMEM_ERR_OUT_OF_MEMORY` when the budget is full of acquired or kept parameters.
///
/// # Safety
/// `out` is NULL or valid for a write; `device_ptr` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_acquire(
    store: *mut HetmemStore,
    id: u32,
    stream: *mut HetmemStream,
    out: *mut *mut HetmemGuard,
    device_ptr: *mut *mut c_void,
) -> c_int {
    // SAFETY: the caller's contract is this function's.
    unsafe {
        acquire(
            "hetmem_store_acquire",
            store,
            id,
            stream,
            None,
            out,
            device_ptr,
        )
    }
}

/// [`hetmem_store_acquire`], but when the budget is full it waits up to `timeout_ms`
/// milliseconds for other threads to release guards (or hints to free room) before
/// failing with `HETMEM_ERR_OUT_OF_MEMORY`.
///
/// # Safety
/// As [`hetmem_store_acquire`].
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_acquire_timeout(
    store: *mut HetmemStore,
    id: u32,
    stream: *mut HetmemStream,
    timeout_ms: u64,
    out: *mut *mut HetmemGuard,
    device_ptr: *mut *mut c_void,
) -> c_int {
    let timeout = Some(std::time::Duration::from_millis(timeout_ms));
    // SAFETY: the caller's contract is this function's.
    unsafe {
        acquire(
            "hetmem_store_acquire_timeout",
            store,
            id,
            stream,
            timeout,
            out,
            device_ptr,
        )
    }
}

/// The body of both acquires.
///
/// # Safety
/// As [`hetmem_store_acquire`].
unsafe fn acquire(
    name: &'static str,
    store: *mut HetmemStore,
    id: u32,
    stream: *mut HetmemStream,
    timeout: Option<std::time::Duration>,
    out: *mut *mut HetmemGuard,
    device_ptr: *mut *mut c_void,
) -> c_int {
    call(name, || {
        // Cleared before anything can fail, the handle's look-up included.
        let out = out_ptr(out, "out")?;
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { write_out(out, std::ptr::null_mut()) };
        if !device_ptr.is_null() {
            // SAFETY: non-null and valid by the caller's contract.
            unsafe { write_out(device_ptr, std::ptr::null_mut()) };
        }
        let s = lookup::<FfiStore, _>(store, "store")?;
        s.check_id(id)?;
        let (stream, wait) = if stream.is_null() {
            (s.store.copy_stream().clone(), true)
        } else {
            (
                lookup::<FfiStream, _>(stream, "stream")?.stream.clone(),
                false,
            )
        };
        let g = match timeout {
            Some(t) => s.store.acquire_timeout(id, &stream, t)?,
            None => s.store.acquire(id, &stream)?,
        };
        if wait {
            stream.synchronize()?;
        }
        let addr = g.ptr().0 as usize;
        let h = register::<FfiGuard, HetmemGuard>(FfiGuard {
            guard: Mutex::new(Some(g)),
        });
        // SAFETY: as above.
        unsafe { write_out(out, h) };
        if !device_ptr.is_null() {
            // SAFETY: as above.
            unsafe { write_out(device_ptr, std::ptr::with_exposed_provenance_mut(addr)) };
        }
        Ok(())
    })
}

/// Says the device copy held by `guard` will be written by work queued on its stream
/// after this call: it is copied back to the host before it is ever dropped, the stream
/// first waits for the parameter's earlier (released) uses on other streams, and later
/// acquires on any stream wait for the write.
///
/// # Safety
/// `guard` may be any value: it is checked.
#[no_mangle]
pub unsafe extern "C" fn hetmem_guard_mark_dirty(guard_: *mut HetmemGuard) -> c_int {
    call("hetmem_guard_mark_dirty", || {
        let g = lookup::<FfiGuard, _>(guard_, "guard")?;
        let mut slot = lock(&g.guard);
        // Released by another thread since the lookup: as a handle released already.
        let g = slot
            .as_mut()
            .ok_or_else(|| FfiError::new(HETMEM_ERR_INVALID_HANDLE, "the guard was released"))?;
        g.check_fork()?;
        g.mark_dirty();
        Ok(())
    })
}

/// Ends a use: the parameter's memory is not reused before the work queued on the
/// guard's stream until now is done. The handle is consumed (releasing it again is
/// `HETMEM_ERR_INVALID_HANDLE`, NULL is `HETMEM_ERR_NULL_POINTER`).
///
/// # Safety
/// `guard` may be any value: it is checked.
#[no_mangle]
pub unsafe extern "C" fn hetmem_guard_release(guard_: *mut HetmemGuard) -> c_int {
    call("hetmem_guard_release", || {
        let g = unregister::<FfiGuard, _>(guard_, "guard")?;
        let taken = lock(&g.guard).take();
        drop(taken);
        Ok(())
    })
}

/// Copies parameter `id`'s current bytes (from the device if resident there, after
/// the work queued on it) into `out`, which has room for `cap` bytes; too little room
/// is `HETMEM_ERR_BUFFER_TOO_SMALL` (see [`hetmem_store_param_size`]). Synchronous.
///
/// # Safety
/// `out` is NULL or valid for `cap` bytes of writes.
#[no_mangle]
pub unsafe extern "C" fn hetmem_store_read(
    store: *mut HetmemStore,
    id: u32,
    out: *mut c_void,
    cap: usize,
) -> c_int {
    call("hetmem_store_read", || {
        let s = lookup::<FfiStore, _>(store, "store")?;
        if out.is_null() {
            return Err(FfiError::null("out"));
        }
        s.check_id(id)?;
        let bytes = s.store.read(id)?;
        if bytes.len() > cap {
            return Err(FfiError::new(
                HETMEM_ERR_BUFFER_TOO_SMALL,
                format!(
                    "parameter {id} has {} bytes, `out` has room for {cap}",
                    bytes.len()
                ),
            ));
        }
        // SAFETY: `out` is valid for `cap >= bytes.len()` bytes (the caller's contract)
        // and cannot overlap the fresh vector.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.cast::<u8>(), bytes.len()) };
        Ok(())
    })
}
