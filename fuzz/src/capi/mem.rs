//! Managers, allocation and frees: the arguments every call draws (addresses, streams,
//! lengths), manager life and queries; copies and queries are in `copies.rs` and `queries.rs`.

use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, RwLockReadGuard, RwLockWriteGuard};

use hetmem::ffi::memory::*;
use hetmem::ffi::*;

use super::queries::last_error_str;
use super::{
    addr_ptr, lock, mh, read, remember, sh, write, Buf, BufData, Expect, HandleKind, MgrInfo,
    MgrState, StreamInfo, Thread, MAX_BUFFERS, MGR_SLOTS, SIM_SLOTS, STREAM_SLOTS,
};

pub(crate) const DEVICE: c_int = HETMEM_DEVICE;

/// What a failed call's out-pointer is set to before the call, to see it cleared.
pub(crate) const POISON: usize = 0x5EED;
/// What caller memory holds before a call that may write it.
pub(crate) const SENTINEL: u8 = 0xA5;

/// A manager slot's lock, held.
pub(crate) enum MgrLock<'a> {
    R(#[allow(dead_code)] RwLockReadGuard<'a, ()>),
    W(#[allow(dead_code)] RwLockWriteGuard<'a, ()>),
}

/// Manager slots' locks, held: the `raw` ones first (see the module docs).
pub(crate) struct MgrLocks<'a> {
    _raw: Vec<RwLockReadGuard<'a, ()>>,
    _life: Vec<MgrLock<'a>>,
}

/// The live buffers a call uses, locked in address order.
pub(crate) struct Locked<'a> {
    items: Vec<(*const Buf, MutexGuard<'a, BufData>)>,
}

impl<'a> Locked<'a> {
    /// Locks `bufs` (duplicates once); `None` if one of them died meanwhile.
    pub(crate) fn new(bufs: &[&'a Arc<Buf>]) -> Option<Locked<'a>> {
        let mut v: Vec<&'a Arc<Buf>> = bufs.to_vec();
        v.sort_by_key(|b| Arc::as_ptr(b) as usize);
        v.dedup_by_key(|b| Arc::as_ptr(b) as usize);
        let mut items = Vec::with_capacity(v.len());
        for b in v {
            let g = lock(&b.data);
            if !g.alive {
                return None;
            }
            items.push((Arc::as_ptr(b), g));
        }
        Some(Locked { items })
    }

    pub(crate) fn get(&mut self, b: &Buf) -> &mut BufData {
        let p: *const Buf = b;
        &mut self
            .items
            .iter_mut()
            .find(|(q, _)| *q == p)
            .expect("a buffer the call locked")
            .1
    }
}

/// Where an address lies for the manager a call is made on.
#[derive(Clone)]
pub(crate) enum At {
    Null,
    /// In this live buffer of the manager, at this offset.
    In(Arc<Buf>, usize),
    /// In no buffer of the manager.
    Out,
}

/// An address argument.
#[derive(Clone)]
pub(crate) struct AddrArg {
    pub(crate) addr: u64,
    pub(crate) at: At,
    pub(crate) label: &'static str,
}

impl AddrArg {
    pub(crate) fn buf(b: &Arc<Buf>, off: usize) -> AddrArg {
        AddrArg {
            addr: b.addr + off as u64,
            at: At::In(b.clone(), off),
            label: "address in a buffer",
        }
    }

    pub(crate) fn ptr(&self) -> *mut c_void {
        addr_ptr(self.addr)
    }

    pub(crate) fn buffer(&self) -> Option<&Arc<Buf>> {
        match &self.at {
            At::In(b, _) => Some(b),
            _ => None,
        }
    }

    /// Whether `addr..addr+n` lies in one of the manager's buffers.
    pub(crate) fn fits(&self, n: usize) -> bool {
        matches!(&self.at, At::In(b, off) if off.checked_add(n).is_some_and(|end| end <= b.len))
    }

    /// The faults of `addr..addr+n` as a range in the manager's buffers.
    pub(crate) fn range_faults(&self, n: usize, e: &mut Expect) {
        match &self.at {
            At::Null => {
                e.fault("NULL address", HETMEM_ERR_NULL_POINTER);
            }
            At::Out => {
                e.fault(self.label, HETMEM_ERR_FOREIGN_POINTER);
            }
            At::In(b, off) => {
                if off.checked_add(n).is_none_or(|end| end > b.len) {
                    e.fault("range past the end", HETMEM_ERR_OUT_OF_BOUNDS);
                }
            }
        }
    }
}

/// A stream argument with its slot's lock held.
pub(crate) enum StreamArg<'a> {
    None,
    Live(StreamInfo, #[allow(dead_code)] RwLockReadGuard<'a, ()>),
    Bad(usize, &'static str, c_int),
}

impl StreamArg<'_> {
    pub(crate) fn ptr(&self) -> *mut HetmemStream {
        match self {
            StreamArg::None => std::ptr::null_mut(),
            StreamArg::Live(i, _) => sh(i.handle),
            StreamArg::Bad(h, _, _) => sh(*h),
        }
    }

    /// The faults of the stream for a call on manager `gen`; `fits` says whether its
    /// device suits the call (None: not known).
    pub(crate) fn faults(&self, gen: u64, fits: Option<&dyn Fn(usize) -> bool>, e: &mut Expect) {
        match self {
            StreamArg::None => {}
            StreamArg::Bad(_, what, code) => {
                e.fault(what, *code);
            }
            StreamArg::Live(i, _) => {
                if i.mgr_gen != gen {
                    e.fault("stream of another manager", HETMEM_ERR_FOREIGN_HANDLE);
                } else if let Some(f) = fits {
                    if !f(i.device) {
                        e.fault("stream of the wrong device", HETMEM_ERR_INVALID_ARGUMENT);
                    }
                }
            }
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            StreamArg::None => "NULL".into(),
            StreamArg::Live(i, _) => format!(
                "stream {:#x} (manager gen {}, device {})",
                i.handle, i.mgr_gen, i.device
            ),
            StreamArg::Bad(h, what, _) => format!("{h:#x} ({what})"),
        }
    }
}

/// Caller memory, or an address of a buffer, as the host side of a copy.
pub(crate) enum HostSide {
    Null,
    /// Memory of the caller (hetmem does not know it).
    Caller(Vec<u8>),
    /// A host-readable buffer of another manager (caller memory to this one).
    Other(Arc<Buf>, usize),
    /// An address in this manager's buffers: the call is a hetmem_copy.
    Mine(AddrArg),
}

fn nodes() -> usize {
    let n = std::fs::read_dir("/sys/devices/system/node")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("node")
                        .is_some_and(|r| r.parse::<u32>().is_ok())
                })
                .count()
        })
        .unwrap_or(0);
    n.max(1)
}

impl<'w> Thread<'w> {
    /// Locks manager slots in slot order (write wins over read for a slot).
    pub(crate) fn lock_mgrs(&self, want: &[(usize, bool)]) -> MgrLocks<'w> {
        self.lock_mgrs_raw(want, &[])
    }

    /// Locks the `raw` locks of `raw` shared (the calls touch those managers' memory
    /// themselves), then the slots as [`Thread::lock_mgrs`] does.
    pub(crate) fn lock_mgrs_raw(&self, want: &[(usize, bool)], raw: &[usize]) -> MgrLocks<'w> {
        let w: &'w super::World = self.w;
        let mut r = raw.to_vec();
        r.sort_unstable();
        r.dedup();
        let raw = r.into_iter().map(|s| read(&w.mgrs[s].raw)).collect();
        MgrLocks {
            _raw: raw,
            _life: self.lock_life(want),
        }
    }

    fn lock_life(&self, want: &[(usize, bool)]) -> Vec<MgrLock<'w>> {
        let w: &'w super::World = self.w;
        let mut v: Vec<(usize, bool)> = Vec::new();
        for &(s, wr) in want {
            match v.iter_mut().find(|(x, _)| *x == s) {
                Some(e) => e.1 |= wr,
                None => v.push((s, wr)),
            }
        }
        v.sort();
        v.into_iter()
            .map(|(s, wr)| {
                let l = &w.mgrs[s].life;
                if wr {
                    MgrLock::W(write(l))
                } else {
                    MgrLock::R(read(l))
                }
            })
            .collect()
    }

    /// The live manager of a slot (the operation uses it: see `Thread::uses`).
    pub(crate) fn info(&self, slot: usize) -> Option<Arc<MgrInfo>> {
        let i = lock(&self.w.mgrs[slot].st).info.clone();
        if let Some(i) = &i {
            self.uses(&i.dying);
        }
        i
    }

    /// A manager slot to use (a simulator's mostly), made live if it is empty.
    pub(crate) fn pick_mgr(&mut self) -> usize {
        let slot = if self.rng.chance(85) {
            self.rng.index(SIM_SLOTS)
        } else {
            SIM_SLOTS
        };
        if self.info(slot).is_none() {
            self.create_manager(slot);
        }
        slot
    }

    /// Another slot than `slot`, with a live manager, if there is one.
    pub(crate) fn other_mgr(&mut self, slot: usize) -> Option<usize> {
        let o = (slot + 1 + self.rng.index(MGR_SLOTS - 1)) % MGR_SLOTS;
        self.info(o).map(|_| o)
    }

    /// A random live buffer of `slot` that `pick` accepts.
    pub(crate) fn any_buf(&mut self, slot: usize, pick: impl Fn(&Buf) -> bool) -> Option<Arc<Buf>> {
        let st = lock(&self.w.mgrs[slot].st);
        st.any(&mut self.rng, pick)
    }

    /// A stream argument: none, a live stream of some manager (its lock held), or a
    /// bad handle.
    pub(crate) fn stream_arg(&mut self, none_percent: u64) -> StreamArg<'w> {
        let w: &'w super::World = self.w;
        if self.rng.chance(none_percent) {
            return StreamArg::None;
        }
        if self.rng.chance(85) {
            let slot = self.rng.index(STREAM_SLOTS);
            let s = &w.streams[slot];
            let g = read(&s.life);
            if let Some(i) = lock(&s.st).clone() {
                self.uses(&i.dying);
                return StreamArg::Live(i, g);
            }
            return StreamArg::None;
        }
        match self.bad_handle(HandleKind::Stream) {
            // NULL is no stream, which every call takes.
            (0, _, _) => StreamArg::None,
            (h, what, code) => StreamArg::Bad(h, what, code),
        }
    }

    /// A range length for `rem` bytes left: mostly one that fits, sometimes 0, one past
    /// the end, or SIZE_MAX. `cap` bounds a length that must be backed by caller memory.
    pub(crate) fn length(&mut self, rem: usize, huge_ok: bool) -> usize {
        match self.rng.below(20) {
            0 => 0,
            1 => rem + 1 + self.rng.index(64),
            2 if huge_ok => usize::MAX,
            3 if huge_ok => isize::MAX as usize + 1,
            4..=9 => rem,
            _ => self.rng.index(rem + 1),
        }
    }

    // ---- managers ----

    pub(crate) fn op_manager_lifecycle(&mut self) {
        let slot = self.rng.index(MGR_SLOTS);
        match self.rng.below(10) {
            0 if self.info(slot).is_some() => self.destroy_manager_racing(slot),
            1 | 2 if self.info(slot).is_some() => self.destroy_manager(slot),
            0..=2 => self.create_manager(slot),
            _ => self.create_bad_manager(),
        }
    }

    /// Opens a manager in an empty slot and learns its devices.
    pub(crate) fn create_manager(&mut self, slot: usize) {
        let s = &self.w.mgrs[slot];
        let _l = write(&s.life);
        if lock(&s.st).info.is_some() {
            return;
        }
        let names: &[Option<&CStr>] = if slot < SIM_SLOTS {
            &[
                Some(c"sim"),
                None,
                Some(c""),
                Some(c"auto"),
                Some(c" sim\n"),
            ]
        } else {
            &[Some(c"host"), Some(c"  host")]
        };
        let name = self.rng.pick(names);
        let mut out: *mut HetmemManager = std::ptr::without_provenance_mut(POISON);
        // SAFETY: the name is NULL or a NUL-terminated string; `out` is valid.
        let rc = unsafe {
            hetmem_manager_create(name.map_or(std::ptr::null(), |n| n.as_ptr()), &mut out)
        };
        let e = Expect::ok();
        if !self.check("hetmem_manager_create", rc, &e, &|| format!("{name:?}")) {
            return;
        }
        let h = out.addr();
        // SAFETY: a live handle.
        let b = unsafe { hetmem_manager_backend(mh(h)) };
        let backend = if b.is_null() {
            String::new()
        } else {
            // SAFETY: a static NUL-terminated string.
            unsafe { CStr::from_ptr(b) }.to_string_lossy().into_owned()
        };
        self.w.report.call(false, !b.is_null());
        let want = if slot < SIM_SLOTS { "sim" } else { "host" };
        if backend != want {
            self.contract("hetmem_manager_backend", "backend", || {
                format!("{name:?} opened {backend:?}, {want:?} expected")
            });
        }
        let mut count: c_int = -1;
        // SAFETY: a live handle, a valid out-pointer.
        let rc = unsafe { hetmem_device_count(mh(h), &mut count) };
        self.check("hetmem_device_count", rc, &Expect::ok(), &|| {
            format!("{h:#x}")
        });
        let devices = count.max(0) as usize;
        let mut totals = Vec::new();
        for d in 0..devices {
            let (mut free, mut total) = (0usize, 0usize);
            // SAFETY: as above.
            let rc = unsafe { hetmem_mem_info(mh(h), d as c_int, &mut free, &mut total) };
            self.check("hetmem_mem_info", rc, &Expect::ok(), &|| {
                format!("device {d}")
            });
            totals.push(total);
        }
        let gen = self.w.gens.fetch_add(1, Ordering::Relaxed);
        let mut st = lock(&s.st);
        *st = MgrState::default();
        st.info = Some(Arc::new(MgrInfo {
            handle: h,
            gen,
            sim: slot < SIM_SLOTS,
            devices,
            totals,
            dying: Default::default(),
        }));
    }

    /// Calls hetmem_manager_create with a bad argument (or one that may fail here).
    fn create_bad_manager(&mut self) {
        let mut out: *mut HetmemManager = std::ptr::without_provenance_mut(POISON);
        let mut e = Expect::ok();
        let (name, out_p): (&CStr, *mut *mut HetmemManager) = match self.rng.below(5) {
            0 => {
                e.fault("unknown backend name", HETMEM_ERR_INVALID_ARGUMENT);
                (c"bogus", &mut out)
            }
            1 => {
                e.fault("backend name not UTF-8", HETMEM_ERR_INVALID_ARGUMENT);
                (c"\xff\xfesim", &mut out)
            }
            2 => {
                e.fault("out NULL", HETMEM_ERR_NULL_POINTER);
                (c"sim", std::ptr::null_mut())
            }
            3 => {
                e.edge("a GPU backend (none here)", HETMEM_ERR_BACKEND_UNAVAILABLE);
                (c"cuda", &mut out)
            }
            _ => {
                e.edge("a GPU backend (none here)", HETMEM_ERR_BACKEND_UNAVAILABLE);
                (c"rocm", &mut out)
            }
        };
        // SAFETY: a NUL-terminated name; `out_p` is NULL or valid.
        let rc = unsafe { hetmem_manager_create(name.as_ptr(), out_p) };
        let ok = self.check("hetmem_manager_create", rc, &e, &|| format!("{name:?}"));
        if ok && !out_p.is_null() {
            // SAFETY: the handle just made.
            let rc = unsafe { hetmem_manager_destroy(out) };
            self.check("hetmem_manager_destroy", rc, &Expect::ok(), &|| {
                "new".into()
            });
        } else if !ok && !out_p.is_null() && !out.is_null() {
            self.contract(
                "hetmem_manager_create",
                "*out not NULL after a failure",
                || format!("{name:?} -> {out:?}"),
            );
        }
    }

    /// Checks every buffer of the manager, then destroys it.
    pub(crate) fn destroy_manager(&mut self, slot: usize) {
        let s = &self.w.mgrs[slot];
        let _r = write(&s.raw);
        let _l = write(&s.life);
        let Some(info) = self.info(slot) else {
            return;
        };
        if info.dying.swap(true, Ordering::SeqCst) {
            return; // a racing destroy has it
        }
        let bufs: Vec<Arc<Buf>> = lock(&s.st).bufs.values().cloned().collect();
        for b in &bufs {
            self.verify(&info, b);
        }
        // SAFETY: a live handle.
        let rc = unsafe { hetmem_manager_destroy(mh(info.handle)) };
        self.check("hetmem_manager_destroy", rc, &Expect::ok(), &|| {
            format!("{:#x}", info.handle)
        });
        self.forget_manager(slot, &info);
        // The handle is dead now: one call shows it.
        let mut count = 0;
        // SAFETY: any handle value may be passed; `count` is valid.
        let rc = unsafe { hetmem_device_count(mh(info.handle), &mut count) };
        let mut e = Expect::ok();
        e.fault("dead handle", HETMEM_ERR_INVALID_HANDLE);
        self.check("hetmem_device_count", rc, &e, &|| {
            "destroyed manager".into()
        });
    }

    /// The model's side of a destroy (the slot's `life` lock held exclusively).
    fn forget_manager(&self, slot: usize, info: &MgrInfo) {
        let s = &self.w.mgrs[slot];
        let bufs: Vec<Arc<Buf>> = lock(&s.st).bufs.values().cloned().collect();
        for b in &bufs {
            lock(&b.data).alive = false;
        }
        *lock(&s.st) = MgrState::default();
        remember(&mut lock(&self.w.dead).mgrs, info.handle);
    }

    /// Destroys the manager while other threads may be using it: their calls either
    /// complete (the model follows) or find the handle gone. Only calls that touch its
    /// memory themselves wait (the `raw` lock).
    fn destroy_manager_racing(&mut self, slot: usize) {
        let s = &self.w.mgrs[slot];
        let _r = write(&s.raw);
        let Some(info) = self.info(slot) else {
            return;
        };
        if info.dying.swap(true, Ordering::SeqCst) {
            return;
        }
        // SAFETY: a live handle (no one else destroys it: the flag).
        let rc = unsafe { hetmem_manager_destroy(mh(info.handle)) };
        self.check("hetmem_manager_destroy", rc, &Expect::ok(), &|| {
            format!("{:#x}, racing its users", info.handle)
        });
        self.w.report.add_extra("racing_destroys", 1);
        // Every call that was under way has ended once the lock is ours.
        let _l = write(&s.life);
        self.forget_manager(slot, &info);
    }

    pub(crate) fn op_manager_queries(&mut self) {
        let slot = self.pick_mgr();
        let _l = self.lock_mgrs(&[(slot, false)]);
        let Some(info) = self.info(slot) else {
            return;
        };
        let h = info.handle;
        match self.rng.below(3) {
            0 => {
                let mut e = Expect::ok();
                let null = self.rng.chance(20);
                if null {
                    e.fault("count NULL", HETMEM_ERR_NULL_POINTER);
                }
                let mut count: c_int = -1;
                let p: *mut c_int = if null {
                    std::ptr::null_mut()
                } else {
                    &mut count
                };
                // SAFETY: a live handle; `p` is NULL or valid.
                let rc = unsafe { hetmem_device_count(mh(h), p) };
                if self.check("hetmem_device_count", rc, &e, &|| format!("{h:#x}"))
                    && count as usize != info.devices
                {
                    self.contract("hetmem_device_count", "count changed", || {
                        format!("{count}, {} before", info.devices)
                    });
                }
            }
            1 => {
                // SAFETY: a live handle.
                let b = unsafe { hetmem_manager_backend(mh(h)) };
                self.w.report.call(false, !b.is_null());
                if b.is_null() && !info.dying.load(Ordering::SeqCst) {
                    self.contract(
                        "hetmem_manager_backend",
                        "NULL for a live handle",
                        last_error_str,
                    );
                }
            }
            _ => {
                let mut e = Expect::ok();
                let d: c_int = match self.rng.below(6) {
                    0 => {
                        e.fault("negative device", HETMEM_ERR_INVALID_ARGUMENT);
                        -1 - self.rng.below(3) as c_int
                    }
                    1 => {
                        e.fault("unknown device", HETMEM_ERR_UNKNOWN_DEVICE);
                        if self.rng.chance(50) {
                            c_int::MAX
                        } else {
                            info.devices as c_int + self.rng.below(3) as c_int
                        }
                    }
                    _ if info.devices == 0 => {
                        e.fault("unknown device", HETMEM_ERR_UNKNOWN_DEVICE);
                        0
                    }
                    _ => self.rng.index(info.devices) as c_int,
                };
                let (mut free, mut total) = (0usize, 0usize);
                let nf = self.rng.chance(8);
                let nt = self.rng.chance(8);
                if nf {
                    e.fault("free NULL", HETMEM_ERR_NULL_POINTER);
                }
                if nt {
                    e.fault("total NULL", HETMEM_ERR_NULL_POINTER);
                }
                let fp: *mut usize = if nf { std::ptr::null_mut() } else { &mut free };
                let tp: *mut usize = if nt { std::ptr::null_mut() } else { &mut total };
                // SAFETY: a live handle; out-pointers NULL or valid.
                let rc = unsafe { hetmem_mem_info(mh(h), d, fp, tp) };
                if self.check("hetmem_mem_info", rc, &e, &|| format!("device {d}"))
                    && (total != info.totals[d as usize] || free > total)
                {
                    self.contract("hetmem_mem_info", "sizes", || {
                        format!(
                            "device {d}: free {free}, total {total}, {} before",
                            info.totals[d as usize]
                        )
                    });
                }
            }
        }
    }

    // ---- allocation ----

    pub(crate) fn op_alloc(&mut self) {
        let slot = self.pick_mgr();
        // The new buffer is read directly too.
        let _l = self.lock_mgrs_raw(&[(slot, false)], &[slot]);
        let Some(info) = self.info(slot) else {
            return;
        };
        if lock(&self.w.mgrs[slot].st).bufs.len() >= MAX_BUFFERS {
            drop(_l);
            self.free_live(slot);
            return;
        }
        let mut e = Expect::ok();
        let placement = match self.rng.below(20) {
            0..=4 => HETMEM_HOST,
            5..=8 => HETMEM_PINNED,
            9..=15 => HETMEM_DEVICE,
            16..=18 => HETMEM_MANAGED,
            _ => {
                e.fault("unknown placement", HETMEM_ERR_INVALID_ARGUMENT);
                self.rng.pick(&[4, -1, 99, c_int::MIN])
            }
        };
        let host_like = placement == HETMEM_HOST || placement == HETMEM_PINNED;
        let on_device = placement == HETMEM_DEVICE || placement == HETMEM_MANAGED;
        let nodes = nodes();
        let where_: c_int = match self.rng.below(12) {
            0 => {
                if host_like {
                    e.fault("unknown NUMA node", HETMEM_ERR_UNKNOWN_NUMA_NODE);
                } else if on_device {
                    e.fault("unknown device", HETMEM_ERR_UNKNOWN_DEVICE);
                }
                self.rng
                    .pick(&[nodes.max(info.devices) as c_int, 1000, c_int::MAX])
            }
            1 => {
                if host_like || on_device {
                    e.fault("negative node or device", HETMEM_ERR_INVALID_ARGUMENT);
                }
                -2 - self.rng.below(5) as c_int
            }
            2..=5 => {
                if on_device && info.devices == 0 {
                    e.fault("no device 0", HETMEM_ERR_UNKNOWN_DEVICE);
                }
                -1
            }
            _ if host_like => self.rng.index(nodes) as c_int,
            _ if on_device && info.devices == 0 => {
                e.fault("no device", HETMEM_ERR_UNKNOWN_DEVICE);
                0
            }
            _ if on_device => self.rng.index(info.devices) as c_int,
            _ => 0,
        };
        let device = if on_device { where_.max(0) as usize } else { 0 };
        let size = match self.rng.below(30) {
            0 => {
                e.fault("size 0", HETMEM_ERR_INVALID_SIZE);
                0
            }
            1 => {
                e.fault("size SIZE_MAX", HETMEM_ERR_INVALID_SIZE);
                usize::MAX
            }
            2 => {
                e.fault("size over SSIZE_MAX", HETMEM_ERR_INVALID_SIZE);
                isize::MAX as usize + 1 + self.rng.index(4096)
            }
            3 => {
                // More than any machine has: out of memory, or refused as too large.
                e.fault("size of a petabyte", HETMEM_ERR_OUT_OF_MEMORY);
                e.env(HETMEM_ERR_INVALID_SIZE).env(HETMEM_ERR_OS);
                1 << 50
            }
            4 if placement == HETMEM_DEVICE && device < info.devices => {
                e.fault("more than the device has", HETMEM_ERR_OUT_OF_MEMORY);
                info.totals[device] + 1 + self.rng.index(1 << 20)
            }
            _ => self.rng.size(1 << 20),
        };
        if placement == HETMEM_PINNED {
            // Registering pinned memory may meet the memlock limit.
            e.env(HETMEM_ERR_OUT_OF_MEMORY).env(HETMEM_ERR_OS);
        }
        if !info.sim && placement == HETMEM_MANAGED {
            e.env(HETMEM_ERR_UNSUPPORTED);
        }
        let out_null = self.rng.chance(3);
        if out_null {
            e.fault("out NULL", HETMEM_ERR_NULL_POINTER);
        }
        let mut out: *mut c_void = std::ptr::without_provenance_mut(POISON);
        let op: *mut *mut c_void = if out_null {
            std::ptr::null_mut()
        } else {
            &mut out
        };
        // SAFETY: a live handle; `op` is NULL or valid.
        let rc = unsafe { hetmem_alloc(mh(info.handle), placement, where_, size, op) };
        let args = || format!("placement {placement}, where {where_}, size {size}");
        let ok = self.check("hetmem_alloc", rc, &e, &args);
        if !ok {
            if !out_null && !out.is_null() {
                self.contract("hetmem_alloc", "*out not NULL after a failure", args);
            }
            return;
        }
        if out_null {
            return;
        }
        let addr = out.expose_provenance() as u64;
        if addr == 0 {
            self.contract("hetmem_alloc", "NULL address", args);
            return;
        }
        let buf = Arc::new(Buf {
            addr,
            len: size,
            placement,
            device,
            host: placement != HETMEM_DEVICE,
            freeing: Default::default(),
            data: std::sync::Mutex::new(super::BufData {
                alive: true,
                bytes: self.rng.bytes(size),
            }),
        });
        self.check_new_address(slot, &buf);
        let d = lock(&buf.data);
        // The first bytes, from the caller's memory.
        let src = d.bytes.clone();
        // SAFETY: a live handle; `addr` is the new buffer of `size` bytes; `src` is
        // caller memory of `size` bytes.
        let rc = unsafe { hetmem_copy_from_host(mh(info.handle), out, src.as_ptr().cast(), size) };
        let filled = self.check("hetmem_copy_from_host", rc, &Expect::ok(), &|| {
            format!("first fill of {addr:#x}+{size}")
        });
        if filled && buf.host {
            // SAFETY: host, pinned and managed memory is the caller's to read for
            // `size` bytes at the address hetmem returned, while it is live (the model's
            // lock on it is held).
            let direct = unsafe { std::slice::from_raw_parts(addr_ptr(addr).cast::<u8>(), size) };
            self.compare("hetmem_alloc", "new buffer read directly", direct, &d.bytes);
        }
        if !filled {
            // Unknown bytes: not in the model.
            drop(d);
            // SAFETY: the address just allocated.
            let rc = unsafe { hetmem_free(mh(info.handle), out) };
            self.check("hetmem_free", rc, &Expect::ok(), &|| format!("{addr:#x}"));
            return;
        }
        drop(d);
        let mut st = lock(&self.w.mgrs[slot].st);
        st.dead_addrs.retain(|a| *a != addr);
        st.bufs.insert(addr, buf);
    }

    /// A new buffer must overlap no live one of its manager, nor (device addresses of
    /// the simulator aside, a known defect) one of another manager.
    pub(crate) fn check_new_address(&self, slot: usize, b: &Buf) {
        for s in 0..MGR_SLOTS {
            let st = lock(&self.w.mgrs[s].st);
            // A manager being destroyed has given its memory back before the model
            // forgets its buffers.
            if st
                .info
                .as_ref()
                .is_none_or(|i| i.dying.load(Ordering::SeqCst))
            {
                continue;
            }
            let clash = st
                .bufs
                .range(..b.addr + b.len as u64)
                .next_back()
                .filter(|(a, o)| **a + o.len as u64 > b.addr && !o.freeing.load(Ordering::Relaxed))
                .map(|(a, o)| (*a, o.len, o.placement));
            if let Some((a, len, p)) = clash {
                let key = if s == slot {
                    "new buffer overlaps a live one"
                } else {
                    "address alias between managers"
                };
                self.contract("hetmem_alloc", key, || {
                    format!(
                        "slot {slot}: {:#x}+{} (placement {}) overlaps {a:#x}+{len} (placement {p}) of slot {s}",
                        b.addr, b.len, b.placement
                    )
                });
            }
        }
    }

    /// Reads a whole live buffer back and compares it with the model (its lock taken
    /// here; the manager's lock is the caller's).
    pub(crate) fn verify(&mut self, info: &MgrInfo, b: &Arc<Buf>) {
        let Some(mut l) = Locked::new(&[b]) else {
            return;
        };
        let d = l.get(b);
        let mut out = vec![SENTINEL; b.len];
        // SAFETY: a live handle; `b` is live (locked); `out` is caller memory of `len`.
        let rc = unsafe {
            hetmem_copy_to_host(
                mh(info.handle),
                out.as_mut_ptr().cast(),
                addr_ptr(b.addr),
                b.len,
            )
        };
        if self.check("hetmem_copy_to_host", rc, &Expect::ok(), &|| {
            format!("whole buffer {:#x}+{}", b.addr, b.len)
        }) {
            self.compare("hetmem_copy_to_host", "whole buffer", &out, &d.bytes);
        }
    }

    /// Frees a random live buffer (checked first).
    pub(crate) fn free_live(&mut self, slot: usize) {
        let _l = self.lock_mgrs(&[(slot, false)]);
        let Some(info) = self.info(slot) else {
            return;
        };
        let Some(b) = self.any_buf(slot, |_| true) else {
            return;
        };
        self.verify(&info, &b);
        let Some(mut l) = Locked::new(&[&b]) else {
            return;
        };
        let a = AddrArg::buf(&b, 0);
        self.do_free(slot, &info, &mut l, &a);
    }

    pub(crate) fn op_free(&mut self) {
        let slot = self.pick_mgr();
        match self.rng.below(10) {
            0..=5 => self.free_live(slot),
            6..=8 => {
                // Inside a buffer: refused, nothing touched.
                let _l = self.lock_mgrs(&[(slot, false)]);
                let Some(info) = self.info(slot) else {
                    return;
                };
                let Some(b) = self.any_buf(slot, |b| b.len > 1) else {
                    return;
                };
                let Some(mut l) = Locked::new(&[&b]) else {
                    return;
                };
                let off = 1 + self.rng.index(b.len - 1);
                let mut a = AddrArg::buf(&b, off);
                a.label = "address inside a buffer";
                self.do_free(slot, &info, &mut l, &a);
            }
            _ => {
                let _l = self.lock_mgrs(&[(slot, false)]);
                let Some(info) = self.info(slot) else {
                    return;
                };
                let mut l = Locked { items: Vec::new() };
                let a = AddrArg {
                    addr: 0,
                    at: At::Null,
                    label: "NULL",
                };
                self.do_free(slot, &info, &mut l, &a);
            }
        }
    }

    /// hetmem_free of `a` on manager `slot`: a buffer's start frees it (the model
    /// follows), anything else is refused and nothing is touched.
    pub(crate) fn do_free(&mut self, slot: usize, info: &MgrInfo, l: &mut Locked, a: &AddrArg) {
        let mut e = Expect::ok();
        let mut freed = None;
        match &a.at {
            At::Null => {
                e.fault("NULL address", HETMEM_ERR_NULL_POINTER);
            }
            At::Out => {
                e.fault(a.label, HETMEM_ERR_FOREIGN_POINTER);
            }
            At::In(b, 0) => {
                freed = Some(b.clone());
                b.freeing.store(true, Ordering::Relaxed);
            }
            At::In(_, _) => {
                e.fault("address inside a buffer", HETMEM_ERR_FOREIGN_POINTER);
            }
        }
        // SAFETY: a live handle; the address is only looked up.
        let rc = unsafe { hetmem_free(mh(info.handle), a.ptr()) };
        let ok = self.check("hetmem_free", rc, &e, &|| {
            format!("{:#x} ({})", a.addr, a.label)
        });
        if let Some(b) = freed {
            if ok {
                l.get(&b).alive = false;
                let mut st = lock(&self.w.mgrs[slot].st);
                if st.bufs.get(&b.addr).is_some_and(|x| Arc::ptr_eq(x, &b)) {
                    st.bufs.remove(&b.addr);
                }
                if st.dead_addrs.len() >= super::MAX_DEAD {
                    st.dead_addrs.pop_front();
                }
                st.dead_addrs.push_back(b.addr);
            }
            b.freeing.store(false, Ordering::Relaxed);
        }
    }
}
