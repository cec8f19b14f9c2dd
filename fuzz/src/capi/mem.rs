//! Managers, allocation, frees, copies, direct access, prefetch and advice, stats, and
//! every call with a bad handle.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, RwLockReadGuard, RwLockWriteGuard};

use hetmem::ffi::memory::*;
use hetmem::ffi::stats::*;
use hetmem::ffi::tier::*;
use hetmem::ffi::*;

use super::{
    addr_ptr, gh, lock, mh, read, remember, sh, th, write, Buf, BufData, Expect, HandleKind,
    MgrInfo, MgrState, StreamInfo, Thread, MAX_BUFFERS, MGR_SLOTS, SIM_SLOTS, STORE_SLOTS,
    STREAM_SLOTS,
};

pub(crate) const DEVICE: c_int = HETMEM_DEVICE;

/// What a failed call's out-pointer is set to before the call, to see it cleared.
pub(crate) const POISON: usize = 0x5EED;
/// What caller memory holds before a call that may write it.
const SENTINEL: u8 = 0xA5;

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

    fn ptr(&self) -> *mut c_void {
        addr_ptr(self.addr)
    }

    pub(crate) fn buffer(&self) -> Option<&Arc<Buf>> {
        match &self.at {
            At::In(b, _) => Some(b),
            _ => None,
        }
    }

    /// Whether `addr..addr+n` lies in one of the manager's buffers.
    fn fits(&self, n: usize) -> bool {
        matches!(&self.at, At::In(b, off) if off.checked_add(n).is_some_and(|end| end <= b.len))
    }

    /// The faults of `addr..addr+n` as a range in the manager's buffers.
    fn range_faults(&self, n: usize, e: &mut Expect) {
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

    fn describe(&self) -> String {
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
    fn other_mgr(&mut self, slot: usize) -> Option<usize> {
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
    fn length(&mut self, rem: usize, huge_ok: bool) -> usize {
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
    fn check_new_address(&self, slot: usize, b: &Buf) {
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
    fn free_live(&mut self, slot: usize) {
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

    // ---- copies ----

    /// Two buffers of a manager (the same one at times) and offsets in them.
    fn two_bufs(&mut self, slot: usize) -> Option<(Arc<Buf>, Arc<Buf>)> {
        let a = self.any_buf(slot, |_| true)?;
        let b = if self.rng.chance(20) {
            a.clone()
        } else {
            self.any_buf(slot, |_| true)?
        };
        Some((a, b))
    }

    pub(crate) fn op_copy(&mut self) {
        let slot = self.pick_mgr();
        let _l = self.lock_mgrs(&[(slot, false)]);
        let Some(info) = self.info(slot) else {
            return;
        };
        let stream = self.stream_arg(45);
        let Some((db, sb)) = self.two_bufs(slot) else {
            return;
        };
        let Some(mut l) = Locked::new(&[&db, &sb]) else {
            return;
        };
        let doff = self.rng.index(db.len);
        let soff = self.rng.index(sb.len);
        let rem = (db.len - doff).min(sb.len - soff);
        let n = self.length(rem, true);
        let mut dst = AddrArg::buf(&db, doff);
        let mut src = AddrArg::buf(&sb, soff);
        if self.rng.chance(3) {
            dst.at = At::Null;
            dst.addr = 0;
        }
        if self.rng.chance(3) {
            src.at = At::Null;
            src.addr = 0;
        }
        self.do_copy(&info, &mut l, &dst, &src, n, &stream);
    }

    /// hetmem_copy(dst, src, n, stream) on the manager `info`; the model follows.
    pub(crate) fn do_copy(
        &mut self,
        info: &MgrInfo,
        l: &mut Locked,
        dst: &AddrArg,
        src: &AddrArg,
        n: usize,
        stream: &StreamArg,
    ) {
        let mut e = Expect::ok();
        dst.range_faults(n, &mut e);
        src.range_faults(n, &mut e);
        let (db, sb) = (dst.buffer().cloned(), src.buffer().cloned());
        match (&db, &sb) {
            (Some(d), Some(s)) => {
                let fits = |dev: usize| d.stream_fits(s, dev);
                stream.faults(info.gen, Some(&fits), &mut e);
            }
            _ => stream.faults(info.gen, None, &mut e),
        }
        // SAFETY: a live handle; the addresses are looked up, and dereferenced only
        // inside live buffers (locked by the model); the stream is live or a bad value.
        let rc = unsafe { hetmem_copy(mh(info.handle), dst.ptr(), src.ptr(), n, stream.ptr()) };
        let ok = self.check("hetmem_copy", rc, &e, &|| {
            format!(
                "dst {:#x} ({}), src {:#x} ({}), n {n}, stream {}",
                dst.addr,
                dst.label,
                src.addr,
                src.label,
                stream.describe()
            )
        });
        // The model follows what happened, expected or not.
        if ok && e.ok || ok && dst.fits(n) && src.fits(n) {
            if let (At::In(d, doff), At::In(s, soff)) = (&dst.at, &src.at) {
                if Arc::ptr_eq(d, s) {
                    l.get(d).bytes.copy_within(*soff..soff + n, *doff);
                } else {
                    let tmp = l.get(s).bytes[*soff..soff + n].to_vec();
                    l.get(d).bytes[*doff..doff + n].copy_from_slice(&tmp);
                }
            }
        }
    }

    pub(crate) fn op_copy_from_host(&mut self) {
        let slot = self.pick_mgr();
        let other = if self.rng.chance(15) {
            self.other_mgr(slot)
        } else {
            None
        };
        let mut want = vec![(slot, false)];
        want.extend(other.map(|o| (o, false)));
        // Another manager's host memory is caller memory here: kept from a racing
        // destroy.
        let raw: Vec<usize> = other.into_iter().collect();
        let _l = self.lock_mgrs_raw(&want, &raw);
        let Some(info) = self.info(slot) else {
            return;
        };
        let Some(db) = self.any_buf(slot, |_| true) else {
            return;
        };
        let ob = other.and_then(|o| self.any_buf(o, |b| b.host));
        let mine = if self.rng.chance(15) {
            self.any_buf(slot, |_| true)
        } else {
            None
        };
        let mut bufs = vec![&db];
        bufs.extend(ob.as_ref());
        bufs.extend(mine.as_ref());
        let Some(mut l) = Locked::new(&bufs) else {
            return;
        };
        let doff = self.rng.index(db.len);
        let mut dst = AddrArg::buf(&db, doff);
        let (src, n) = if let Some(ob) = &ob {
            let soff = self.rng.index(ob.len);
            let n = self.length((db.len - doff).min(ob.len - soff), false);
            (HostSide::Other(ob.clone(), soff), n.min(ob.len - soff))
        } else if let Some(m) = &mine {
            let soff = self.rng.index(m.len);
            let n = self.length((db.len - doff).min(m.len - soff), true);
            (HostSide::Mine(AddrArg::buf(m, soff)), n)
        } else if self.rng.chance(4) {
            (HostSide::Null, self.rng.index(64))
        } else {
            let n = self.length(db.len - doff, true);
            let backing = if n > db.len + 64 { 64 } else { n };
            (HostSide::Caller(self.rng.bytes(backing)), n)
        };
        if self.rng.chance(3) {
            dst.at = At::Null;
            dst.addr = 0;
        }
        self.do_copy_from_host(&info, &mut l, &dst, &src, n);
    }

    /// hetmem_copy_from_host(dst, src, n).
    pub(crate) fn do_copy_from_host(
        &mut self,
        info: &MgrInfo,
        l: &mut Locked,
        dst: &AddrArg,
        src: &HostSide,
        n: usize,
    ) {
        let mut e = Expect::ok();
        dst.range_faults(n, &mut e);
        let (sp, data): (*const c_void, Option<Vec<u8>>) = match src {
            HostSide::Null => {
                e.fault("NULL host_src", HETMEM_ERR_NULL_POINTER);
                (std::ptr::null(), None)
            }
            HostSide::Caller(v) => {
                if n > v.len() {
                    // Only with a length that cannot fit any buffer: the call must refuse
                    // it before reading (the conventions: SIZE_MAX is an error code); a
                    // range that long from caller memory runs into the manager's buffers,
                    // which is refused as well.
                    debug_assert!(n > isize::MAX as usize);
                    e.env(HETMEM_ERR_INVALID_ARGUMENT);
                }
                (v.as_ptr().cast(), (n <= v.len()).then(|| v[..n].to_vec()))
            }
            HostSide::Other(b, off) => {
                let d = l.get(b);
                let data = d.bytes.get(*off..off.saturating_add(n)).map(|s| s.to_vec());
                (addr_ptr(b.addr + *off as u64).cast_const(), data)
            }
            HostSide::Mine(a) => {
                a.range_faults(n, &mut e);
                let data = match &a.at {
                    At::In(b, off) => l
                        .get(b)
                        .bytes
                        .get(*off..off.saturating_add(n))
                        .map(|s| s.to_vec()),
                    _ => None,
                };
                (a.ptr().cast_const(), data)
            }
        };
        // SAFETY: a live handle; `dst` is looked up; `sp` is NULL, caller memory of at
        // least `n` bytes (or a length no buffer can take, refused before any read), or
        // an address in a live buffer (locked).
        let rc = unsafe { hetmem_copy_from_host(mh(info.handle), dst.ptr(), sp, n) };
        let ok = self.check("hetmem_copy_from_host", rc, &e, &|| {
            format!("dst {:#x} ({}), n {n}", dst.addr, dst.label)
        });
        if ok && dst.fits(n) {
            if let (At::In(b, off), Some(data)) = (&dst.at, data) {
                l.get(b).bytes[*off..off + n].copy_from_slice(&data);
            }
        }
    }

    pub(crate) fn op_copy_to_host(&mut self) {
        let slot = self.pick_mgr();
        let other = if self.rng.chance(15) {
            self.other_mgr(slot)
        } else {
            None
        };
        let mut want = vec![(slot, false)];
        want.extend(other.map(|o| (o, false)));
        // Another manager's host memory is caller memory here: kept from a racing
        // destroy.
        let raw: Vec<usize> = other.into_iter().collect();
        let _l = self.lock_mgrs_raw(&want, &raw);
        let Some(info) = self.info(slot) else {
            return;
        };
        let Some(sb) = self.any_buf(slot, |_| true) else {
            return;
        };
        let ob = other.and_then(|o| self.any_buf(o, |b| b.host));
        let mine = if self.rng.chance(15) {
            self.any_buf(slot, |_| true)
        } else {
            None
        };
        let mut bufs = vec![&sb];
        bufs.extend(ob.as_ref());
        bufs.extend(mine.as_ref());
        let Some(mut l) = Locked::new(&bufs) else {
            return;
        };
        let whole = self.rng.chance(40);
        let soff = if whole { 0 } else { self.rng.index(sb.len) };
        let mut src = AddrArg::buf(&sb, soff);
        let (dst, n) = if let Some(ob) = &ob {
            let doff = self.rng.index(ob.len);
            let n = self.length((sb.len - soff).min(ob.len - doff), false);
            (HostSide::Other(ob.clone(), doff), n.min(ob.len - doff))
        } else if let Some(m) = &mine {
            let doff = self.rng.index(m.len);
            let n = self.length((sb.len - soff).min(m.len - doff), true);
            (HostSide::Mine(AddrArg::buf(m, doff)), n)
        } else if self.rng.chance(4) {
            (HostSide::Null, self.rng.index(64))
        } else {
            let n = if whole {
                sb.len
            } else {
                self.length(sb.len - soff, true)
            };
            let backing = if n > sb.len + 64 { 64 } else { n };
            (HostSide::Caller(vec![SENTINEL; backing]), n)
        };
        if self.rng.chance(3) {
            src.at = At::Null;
            src.addr = 0;
        }
        self.do_copy_to_host(&info, &mut l, dst, &src, n);
    }

    /// hetmem_copy_to_host(dst, src, n): the bytes that arrive are compared with the
    /// model.
    pub(crate) fn do_copy_to_host(
        &mut self,
        info: &MgrInfo,
        l: &mut Locked,
        mut dst: HostSide,
        src: &AddrArg,
        n: usize,
    ) {
        let mut e = Expect::ok();
        src.range_faults(n, &mut e);
        let want: Option<Vec<u8>> = match &src.at {
            At::In(b, off) => l
                .get(b)
                .bytes
                .get(*off..off.saturating_add(n))
                .map(|s| s.to_vec()),
            _ => None,
        };
        let dp: *mut c_void = match &mut dst {
            HostSide::Null => {
                e.fault("NULL host_dst", HETMEM_ERR_NULL_POINTER);
                std::ptr::null_mut()
            }
            HostSide::Caller(v) => {
                if n > v.len() {
                    // As in do_copy_from_host.
                    e.env(HETMEM_ERR_INVALID_ARGUMENT);
                }
                v.as_mut_ptr().cast()
            }
            HostSide::Other(b, off) => addr_ptr(b.addr + *off as u64),
            HostSide::Mine(a) => {
                a.range_faults(n, &mut e);
                a.ptr()
            }
        };
        // SAFETY: a live handle; `src` is looked up; `dp` is NULL, caller memory of at
        // least `n` bytes (or a length no buffer can take, refused before any write), or
        // an address in a live buffer (locked).
        let rc = unsafe { hetmem_copy_to_host(mh(info.handle), dp, src.ptr(), n) };
        let ok = self.check("hetmem_copy_to_host", rc, &e, &|| {
            format!("src {:#x} ({}), n {n}", src.addr, src.label)
        });
        match (&dst, ok, want) {
            (HostSide::Caller(v), true, Some(want)) => {
                self.compare("hetmem_copy_to_host", "bytes read", &v[..n], &want);
            }
            (HostSide::Caller(v), false, _) if v.iter().any(|b| *b != SENTINEL) => {
                self.contract(
                    "hetmem_copy_to_host",
                    "a failed call wrote caller memory",
                    || format!("src {:#x}, n {n}", src.addr),
                );
            }
            (HostSide::Other(b, off), true, Some(want)) => {
                // Another manager's host memory, written as caller memory.
                let d = l.get(b);
                d.bytes[*off..off + n].copy_from_slice(&want);
                // SAFETY: the caller's memory in a live host buffer (locked), `n` bytes.
                let direct = unsafe {
                    std::slice::from_raw_parts(addr_ptr(b.addr + *off as u64).cast::<u8>(), n)
                };
                let got = direct.to_vec();
                self.compare(
                    "hetmem_copy_to_host",
                    "bytes written to another manager's buffer",
                    &got,
                    &want,
                );
            }
            (
                HostSide::Mine(AddrArg {
                    at: At::In(b, off), ..
                }),
                true,
                Some(want),
            ) => {
                if let Some(d) = l.get(b).bytes.get_mut(*off..off.saturating_add(n)) {
                    d.copy_from_slice(&want);
                }
            }
            _ => {}
        }
    }

    /// Reads or writes host-visible memory directly, as a C program does.
    pub(crate) fn op_direct(&mut self) {
        let slot = self.pick_mgr();
        let _l = self.lock_mgrs_raw(&[(slot, false)], &[slot]);
        let Some(info) = self.info(slot) else {
            return;
        };
        let Some(b) = self.any_buf(slot, |b| b.host) else {
            return;
        };
        let Some(mut l) = Locked::new(&[&b]) else {
            return;
        };
        let d = l.get(&b);
        let off = self.rng.index(b.len);
        let n = 1 + self.rng.index(b.len - off);
        let p = addr_ptr(b.addr + off as u64).cast::<u8>();
        if self.rng.chance(50) {
            let data = self.rng.bytes(n);
            // SAFETY: `off + n <= len` in a live host-visible buffer (locked).
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, n) };
            d.bytes[off..off + n].copy_from_slice(&data);
        } else {
            // SAFETY: as above.
            let got = unsafe { std::slice::from_raw_parts(p, n) }.to_vec();
            let want = d.bytes[off..off + n].to_vec();
            self.compare("direct read", "host-visible buffer", &got, &want);
        }
        let _ = info;
    }

    /// Calls with addresses the model has to look up: freed ones, made-up ones, the end
    /// of a buffer, another manager's. The manager's lock is exclusive, so the answer
    /// cannot change under the call.
    pub(crate) fn op_foreign_addresses(&mut self) {
        let slot = self.pick_mgr();
        let other = self.other_mgr(slot).filter(|_| self.rng.chance(50));
        let mut want = vec![(slot, true)];
        want.extend(other.map(|o| (o, false)));
        let _l = self.lock_mgrs(&want);
        let Some(info) = self.info(slot) else {
            return;
        };
        let ob = other.and_then(|o| self.any_buf(o, |_| true));
        let local = [0u8; 16];
        let (addr, label) = {
            let st = lock(&self.w.mgrs[slot].st);
            match self.rng.below(8) {
                0 | 1 if ob.is_some() => {
                    let b = ob.as_ref().expect("checked");
                    (
                        b.addr + self.rng.below(b.len as u64),
                        "address of another manager",
                    )
                }
                2 if !st.dead_addrs.is_empty() => (
                    st.dead_addrs[self.rng.index(st.dead_addrs.len())],
                    "freed address",
                ),
                3 => match st.any(&mut self.rng, |_| true) {
                    Some(b) => (b.addr + b.len as u64, "one past a buffer's end"),
                    None => (0x1000, "made-up address"),
                },
                4 => (
                    (1u64 << 52) + self.rng.below(1 << 20),
                    "a simulated device address",
                ),
                5 => (local.as_ptr().addr() as u64, "caller memory"),
                6 => (
                    self.rng.pick(&[1u64, 0x1000, u64::MAX, u64::MAX - 7]),
                    "made-up address",
                ),
                _ => (
                    0x7f00_0000_0000 + self.rng.below(1 << 30),
                    "made-up address",
                ),
            }
        };
        let at = match lock(&self.w.mgrs[slot].st).locate(addr) {
            Some((b, off)) => At::In(b, off),
            None => At::Out,
        };
        let a = AddrArg { addr, at, label };
        // A second, ordinary buffer for the other end of a copy.
        let peer = self.any_buf(slot, |_| true);
        let mut bufs: Vec<&Arc<Buf>> = Vec::new();
        bufs.extend(a.buffer());
        bufs.extend(peer.as_ref());
        bufs.extend(ob.as_ref());
        let Some(mut l) = Locked::new(&bufs) else {
            return;
        };
        match self.rng.below(6) {
            0 => self.do_free(slot, &info, &mut l, &a),
            1 | 2 => {
                let Some(p) = &peer else { return };
                let pa = AddrArg::buf(p, self.rng.index(p.len));
                let n = self.length(64, true);
                let stream = StreamArg::None;
                if self.rng.chance(50) {
                    self.do_copy(&info, &mut l, &a, &pa, n, &stream);
                } else {
                    self.do_copy(&info, &mut l, &pa, &a, n, &stream);
                }
            }
            3 => {
                let n = self.length(64, true);
                let backing = if n > 1 << 20 { 64 } else { n };
                let src = HostSide::Caller(self.rng.bytes(backing));
                self.do_copy_from_host(&info, &mut l, &a, &src, n);
            }
            4 => {
                let n = self.length(64, true);
                let backing = if n > 1 << 20 { 64 } else { n };
                let dst = HostSide::Caller(vec![SENTINEL; backing]);
                self.do_copy_to_host(&info, &mut l, dst, &a, n);
            }
            _ => {
                let n = self.length(64, true);
                drop(l);
                self.do_prefetch_or_advise(&info, &a, n, StreamArg::None);
            }
        }
    }

    // ---- prefetch and advice ----

    pub(crate) fn op_prefetch_advise(&mut self) {
        let slot = self.pick_mgr();
        let _l = self.lock_mgrs(&[(slot, false)]);
        let Some(info) = self.info(slot) else {
            return;
        };
        let stream = self.stream_arg(50);
        let managed_only = self.rng.chance(80);
        let Some(b) = self.any_buf(slot, |b| !managed_only || b.placement == HETMEM_MANAGED) else {
            return;
        };
        let Some(l) = Locked::new(&[&b]) else {
            return;
        };
        let off = self.rng.index(b.len);
        let n = self.length(b.len - off, true);
        let a = AddrArg::buf(&b, off);
        // The buffer stays locked: a migration must not change its bytes, and no one
        // else may change them meanwhile.
        self.do_prefetch_or_advise(&info, &a, n, stream);
        drop(l);
    }

    /// hetmem_prefetch or hetmem_advise on `a..a+n`.
    fn do_prefetch_or_advise(&mut self, info: &MgrInfo, a: &AddrArg, n: usize, stream: StreamArg) {
        let mut e = Expect::ok();
        a.range_faults(n, &mut e);
        if let At::In(b, _) = &a.at {
            if b.placement != HETMEM_MANAGED {
                e.fault("not managed memory", HETMEM_ERR_INVALID_ARGUMENT);
            }
        }
        let devices = info.devices;
        let mut device: c_int = match self.rng.below(8) {
            0 => -1,
            1 => {
                e.fault("unknown device", HETMEM_ERR_UNKNOWN_DEVICE);
                devices as c_int + self.rng.below(4) as c_int
            }
            2 => {
                e.fault("negative device", HETMEM_ERR_INVALID_ARGUMENT);
                -2 - self.rng.below(4) as c_int
            }
            _ if devices == 0 => -1,
            _ => self.rng.index(devices) as c_int,
        };
        if self.rng.chance(50) {
            if n == 0 && e.ok {
                e.edge("0 bytes", HETMEM_ERR_INVALID_SIZE)
                    .env(HETMEM_ERR_INVALID_ARGUMENT);
            }
            let fits = |_d: usize| true;
            stream.faults(info.gen, Some(&fits), &mut e);
            // A stream of any device of the manager will do (as the drivers allow).
            // SAFETY: a live handle; the address is looked up; the stream is live or a
            // bad value.
            let rc = unsafe { hetmem_prefetch(mh(info.handle), a.ptr(), n, device, stream.ptr()) };
            self.check("hetmem_prefetch", rc, &e, &|| {
                format!(
                    "{:#x} ({}), n {n}, device {device}, stream {}",
                    a.addr,
                    a.label,
                    stream.describe()
                )
            });
        } else {
            let advice: c_int = match self.rng.below(10) {
                0 => {
                    e.fault("unknown advice", HETMEM_ERR_INVALID_ARGUMENT);
                    self.rng.pick(&[0, 7, -1, c_int::MAX])
                }
                _ => 1 + self.rng.below(6) as c_int,
            };
            // The device matters for preferred location (-1 is the host) and accessed-by
            // (a device).
            let uses_device = matches!(advice, 3 | 5 | 6);
            if !uses_device {
                // Any value is ignored: undo the faults the device drew.
                e = Expect::ok();
                a.range_faults(n, &mut e);
                if let At::In(b, _) = &a.at {
                    if b.placement != HETMEM_MANAGED {
                        e.fault("not managed memory", HETMEM_ERR_INVALID_ARGUMENT);
                    }
                }
                if !(1..=6).contains(&advice) {
                    e.fault("unknown advice", HETMEM_ERR_INVALID_ARGUMENT);
                }
            } else if device == -1 && advice != 3 {
                e.fault("the host for accessed-by", HETMEM_ERR_INVALID_ARGUMENT);
            }
            if devices == 0 && device >= 0 && !uses_device {
                device = 0;
            }
            // SAFETY: a live handle; the address is looked up.
            let rc = unsafe { hetmem_advise(mh(info.handle), a.ptr(), n, advice, device) };
            self.check("hetmem_advise", rc, &e, &|| {
                format!(
                    "{:#x} ({}), n {n}, advice {advice}, device {device}",
                    a.addr, a.label
                )
            });
        }
    }

    // ---- stats ----

    pub(crate) fn op_stats(&mut self) {
        let slot = self.pick_mgr();
        let _l = self.lock_mgrs(&[(slot, true)]);
        let Some(info) = self.info(slot) else {
            return;
        };
        let store_slot = self.rng.index(STORE_SLOTS);
        let ss = &self.w.stores[store_slot];
        let _sl = read(&ss.life);
        let (store_h, params, mut e) = match self.rng.below(4) {
            0 => (0, None, Expect::ok()),
            1 => {
                let (h, what, code) = self.bad_handle(HandleKind::Store);
                let mut e = Expect::ok();
                if h != 0 {
                    e.fault(what, code);
                }
                (h, None, e)
            }
            _ => match lock(&ss.st).as_ref() {
                Some(s) => {
                    self.uses(&s.dying);
                    (s.handle, Some(s.params.len()), Expect::ok())
                }
                None => (0, None, Expect::ok()),
            },
        };
        let mut needed = 0usize;
        let mut e0 = e.clone();
        e0.fault("no buffer", HETMEM_ERR_BUFFER_TOO_SMALL);
        // SAFETY: a live handle, the store handle is checked; no buffer, `needed` valid.
        let rc = unsafe {
            hetmem_stats_json(
                mh(info.handle),
                th(store_h),
                std::ptr::null_mut(),
                0,
                &mut needed,
            )
        };
        self.check("hetmem_stats_json", rc, &e0, &|| "no buffer".into());
        if rc != HETMEM_ERR_BUFFER_TOO_SMALL {
            return;
        }
        if needed == 0 {
            self.contract("hetmem_stats_json", "needed not set", || "cap 0".into());
            return;
        }
        let short = self.rng.chance(20);
        let cap = if short {
            needed - 1
        } else {
            needed + self.rng.index(16)
        };
        if short && params.is_none() {
            e.fault("buffer one byte short", HETMEM_ERR_BUFFER_TOO_SMALL);
        }
        if params.is_some() {
            // The store's counters move under other threads' calls: the text may have
            // grown since the first call.
            e.env(HETMEM_ERR_BUFFER_TOO_SMALL);
        }
        let mut buf = vec![0u8; cap];
        let np: *mut usize = if self.rng.chance(30) {
            std::ptr::null_mut()
        } else {
            &mut needed
        };
        // SAFETY: as above; `buf` holds `cap` bytes.
        let rc = unsafe {
            hetmem_stats_json(
                mh(info.handle),
                th(store_h),
                buf.as_mut_ptr().cast::<c_char>(),
                cap,
                np,
            )
        };
        if !self.check("hetmem_stats_json", rc, &e, &|| format!("cap {cap}")) || short {
            if rc == HETMEM_ERR_BUFFER_TOO_SMALL && !np.is_null() && needed <= cap && !short {
                self.contract("hetmem_stats_json", "too small, but needed fits", || {
                    format!("cap {cap}, needed {needed}")
                });
            }
            return;
        }
        let text = CStr::from_bytes_until_nul(&buf)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let v: serde_json::Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(err) => {
                self.contract("hetmem_stats_json", "not JSON", || format!("{err}: {text}"));
                return;
            }
        };
        let (count, bytes) = {
            let st = lock(&self.w.mgrs[slot].st);
            (
                st.bufs.len() as u64,
                st.bufs.values().map(|b| b.len as u64).sum::<u64>(),
            )
        };
        if v["live_buffers"].as_u64() != Some(count) || v["live_bytes"].as_u64() != Some(bytes) {
            self.contract("hetmem_stats_json", "live buffers", || {
                format!(
                    "live_buffers {} live_bytes {}, the model has {count} and {bytes}",
                    v["live_buffers"], v["live_bytes"]
                )
            });
        }
        let want_backend = if info.sim { "sim" } else { "host" };
        if v["backend"].as_str() != Some(want_backend) {
            self.contract("hetmem_stats_json", "backend", || v["backend"].to_string());
        }
        if let Some(p) = params {
            if v["tier"]["params"].as_u64() != Some(p as u64) {
                self.contract("hetmem_stats_json", "tier params", || {
                    format!("{} params, the model has {p}", v["tier"]["params"])
                });
            }
        } else if store_h == 0 && !v["tier"].is_null() {
            self.contract("hetmem_stats_json", "tier without a store", || {
                v["tier"].to_string()
            });
        }
    }

    // ---- bad handles ----

    /// One call with a handle that is not live (or NULL, or of another kind); the other
    /// arguments are valid where the call could reach them.
    pub(crate) fn op_bad_handles(&mut self) {
        let kind = self.rng.pick(&[
            HandleKind::Manager,
            HandleKind::Manager,
            HandleKind::Stream,
            HandleKind::Store,
            HandleKind::Guard,
            HandleKind::Event,
        ]);
        let (h, what, code) = self.bad_handle(kind);
        let mut e = Expect::ok();
        e.fault(what, code);
        let args = || format!("{h:#x} ({what})");
        let mut out: usize = POISON;
        let outp: *mut usize = &mut out;
        let mut caller = [0u8; 64];
        let cp = caller.as_mut_ptr().cast::<c_void>();
        let junk = addr_ptr(0x1000);
        let mut cfg = std::mem::MaybeUninit::<HetmemStoreConfig>::uninit();
        // SAFETY: `cfg` is valid for a write.
        unsafe { hetmem_store_config_init(cfg.as_mut_ptr(), 1 << 20, 32 << 20) };
        // SAFETY: initialised just above (the call cannot fail with a valid pointer).
        let cfg = unsafe { cfg.assume_init() };
        let ids = [0u32; 4];
        let (call, rc): (&'static str, c_int) =
        // SAFETY: (every call below) the handle is only looked up (never dereferenced);
        // out-pointers are valid; caller memory is 64 bytes and lengths are at most 64;
        // made-up addresses are only looked up in a manager that is not there.
        unsafe {
            match kind {
                HandleKind::Manager => {
                    let m = mh(h);
                    match self.rng.below(17) {
                        0 => ("hetmem_manager_destroy", hetmem_manager_destroy(m)),
                        1 => {
                            let b = hetmem_manager_backend(m);
                            self.w.report.call(true, !b.is_null());
                            if !b.is_null() {
                                self.contract(
                                    "hetmem_manager_backend",
                                    "a name for a bad handle",
                                    args,
                                );
                            } else if !super::last_error().starts_with("hetmem_manager_backend") {
                                self.contract(
                                    "hetmem_manager_backend",
                                    "last error does not name the call",
                                    args,
                                );
                            }
                            return;
                        }
                        2 => ("hetmem_device_count", hetmem_device_count(m, outp.cast())),
                        3 => {
                            let mut t = 0usize;
                            ("hetmem_mem_info", hetmem_mem_info(m, 0, outp, &mut t))
                        }
                        4 => (
                            "hetmem_alloc",
                            hetmem_alloc(m, HETMEM_HOST, -1, 64, outp.cast()),
                        ),
                        5 => ("hetmem_free", hetmem_free(m, junk)),
                        6 => (
                            "hetmem_copy",
                            hetmem_copy(m, junk, junk, 8, std::ptr::null_mut()),
                        ),
                        7 => (
                            "hetmem_copy_from_host",
                            hetmem_copy_from_host(m, junk, cp, 64),
                        ),
                        8 => ("hetmem_copy_to_host", hetmem_copy_to_host(m, cp, junk, 64)),
                        9 => (
                            "hetmem_stream_create",
                            hetmem_stream_create(m, 0, outp.cast()),
                        ),
                        10 => (
                            "hetmem_stream_wrap",
                            hetmem_stream_wrap(m, 0, 0, outp.cast()),
                        ),
                        11 => (
                            "hetmem_prefetch",
                            hetmem_prefetch(m, junk, 8, 0, std::ptr::null_mut()),
                        ),
                        12 => ("hetmem_advise", hetmem_advise(m, junk, 8, 1, 0)),
                        13 => {
                            let mut n = 0usize;
                            (
                                "hetmem_stats_json",
                                hetmem_stats_json(m, std::ptr::null_mut(), cp.cast(), 64, &mut n),
                            )
                        }
                        14 => (
                            "hetmem_store_create",
                            hetmem_store_create(m, &cfg, outp.cast()),
                        ),
                        _ => (
                            "hetmem_event_create",
                            hetmem::ffi::event::hetmem_event_create(m, 0, outp.cast()),
                        ),
                    }
                }
                HandleKind::Stream => {
                    let s = sh(h);
                    match self.rng.below(3) {
                        0 => ("hetmem_stream_raw", hetmem_stream_raw(s, outp)),
                        1 => ("hetmem_stream_synchronize", hetmem_stream_synchronize(s)),
                        _ => ("hetmem_stream_destroy", hetmem_stream_destroy(s)),
                    }
                }
                HandleKind::Store => {
                    let s = th(h);
                    let mut id = 0u32;
                    let mut st = 0 as c_int;
                    match self.rng.below(15) {
                        0 => ("hetmem_store_destroy", hetmem_store_destroy(s)),
                        1 => (
                            "hetmem_store_register",
                            hetmem_store_register(s, c"x".as_ptr(), cp, 64, &mut id),
                        ),
                        2 => {
                            let mut ids = [0u32; 4];
                            let mut n = 0usize;
                            let path = c"/nonexistent.safetensors";
                            (
                                "hetmem_store_register_safetensors",
                                hetmem_store_register_safetensors(
                                    s,
                                    path.as_ptr(),
                                    ids.as_mut_ptr(),
                                    4,
                                    &mut n,
                                ),
                            )
                        }
                        3 => (
                            "hetmem_store_lookup",
                            hetmem_store_lookup(s, c"x".as_ptr(), &mut id),
                        ),
                        4 => (
                            "hetmem_store_param_size",
                            hetmem_store_param_size(s, 0, outp),
                        ),
                        5 => (
                            "hetmem_store_set_sequence",
                            hetmem_store_set_sequence(s, ids.as_ptr(), 4),
                        ),
                        6 => (
                            "hetmem_store_will_need",
                            hetmem_store_will_need(s, 0, &mut st),
                        ),
                        7 => (
                            "hetmem_store_dont_need",
                            hetmem_store_dont_need(s, 0, &mut st),
                        ),
                        8 => (
                            "hetmem_store_keep_resident",
                            hetmem_store_keep_resident(s, 0, 1),
                        ),
                        9 => ("hetmem_store_priority", hetmem_store_priority(s, 0, 1)),
                        10 => (
                            "hetmem_store_residency",
                            hetmem_store_residency(s, 0, &mut st, std::ptr::null_mut()),
                        ),
                        11 => (
                            "hetmem_store_acquire",
                            hetmem_store_acquire(
                                s,
                                0,
                                std::ptr::null_mut(),
                                outp.cast(),
                                std::ptr::null_mut(),
                            ),
                        ),
                        12 => (
                            "hetmem_store_acquire_timeout",
                            hetmem_store_acquire_timeout(
                                s,
                                0,
                                std::ptr::null_mut(),
                                1,
                                outp.cast(),
                                std::ptr::null_mut(),
                            ),
                        ),
                        13 => ("hetmem_store_read", hetmem_store_read(s, 0, cp, 64)),
                        _ => {
                            // A live manager, a bad store.
                            let slot = self.pick_mgr();
                            let _l = self.lock_mgrs(&[(slot, false)]);
                            let Some(info) = self.info(slot) else { return };
                            let mut n = 0usize;
                            if h == 0 {
                                return; // NULL is "no store"
                            }
                            (
                                "hetmem_stats_json",
                                hetmem_stats_json(mh(info.handle), s, cp.cast(), 64, &mut n),
                            )
                        }
                    }
                }
                HandleKind::Guard => {
                    let g = gh(h);
                    if self.rng.chance(50) {
                        ("hetmem_guard_mark_dirty", hetmem_guard_mark_dirty(g))
                    } else {
                        ("hetmem_guard_release", hetmem_guard_release(g))
                    }
                }
                HandleKind::Event => {
                    let ev = super::eh(h);
                    // The other handle is made up too (its code is the same).
                    let forged = sh(0x4865_0008);
                    e.env(HETMEM_ERR_INVALID_HANDLE);
                    let mut done = 0;
                    match self.rng.below(5) {
                        0 => ("hetmem_event_query", hetmem::ffi::event::hetmem_event_query(ev, &mut done)),
                        1 => ("hetmem_event_synchronize", hetmem::ffi::event::hetmem_event_synchronize(ev)),
                        2 => ("hetmem_event_destroy", hetmem::ffi::event::hetmem_event_destroy(ev)),
                        3 => ("hetmem_event_record", hetmem::ffi::event::hetmem_event_record(ev, forged)),
                        _ => ("hetmem_stream_wait_event", hetmem::ffi::event::hetmem_stream_wait_event(forged, ev)),
                    }
                }
            }
        };
        self.check(call, rc, &e, &args);
        if matches!(
            call,
            "hetmem_alloc"
                | "hetmem_stream_create"
                | "hetmem_stream_wrap"
                | "hetmem_store_create"
                | "hetmem_event_create"
                | "hetmem_store_acquire"
                | "hetmem_store_acquire_timeout"
        ) && out != 0
        {
            self.contract(call, "*out not NULL after a failure", args);
        }
        let _ = ids;
    }
}

fn last_error_str() -> String {
    super::last_error()
}
