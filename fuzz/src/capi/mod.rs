//! The C ABI leg: several threads call every `hetmem_*` function on shared managers,
//! streams, stores and guards, with a shadow model of what each holds.
//!
//! # The model and its locks
//!
//! Each manager slot has a `life` lock. A call on a live manager with addresses of
//! its live buffers holds it shared; creating or destroying the manager, and any call
//! with an address the model has to look up (a dead or made-up one, one of another
//! manager), hold it exclusively, so that no allocation or free can change the answer
//! under the call. Each buffer's bytes sit behind its own lock, held across every call
//! that reads or writes them, so the model's bytes are the buffer's. Streams and stores
//! have a `life` lock too (shared for use, exclusive for destroy). Locks are taken in
//! one order: managers by slot, then streams by slot, then stores, then buffers by
//! address, so that threads cannot deadlock on them.
//!
//! Handles are never reused by hetmem, so a dead handle is always dead and needs no
//! lock; nor does a handle of the wrong kind.
//!
//! Racing destroys: the header promises that a handle destroyed on one thread while
//! another uses it stays valid for that use. So a manager, stream or store is also
//! destroyed without its `life` lock, its `dying` flag set first: calls that use it
//! meanwhile may succeed (the model follows them) or find the handle gone
//! (`INVALID_HANDLE`, accepted for a call that used a dying object). Only the caller's
//! own use of the memory (reading a host buffer directly, passing a stream's raw value)
//! is kept apart from it, by the slot's `raw` lock, since using freed memory would be
//! the caller's bug, not hetmem's.
//!
//! Queued copies: the simulator does a queued copy's work when it is queued (its
//! clock says when it would have happened), and the model takes the bytes as moved
//! then. On a GPU a read would first have to synchronise the stream.

mod events;
mod mem;
mod store;
mod streams;
mod torch;

use std::collections::{BTreeMap, VecDeque};
use std::ffi::{c_int, CStr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hetmem::ffi::*;

use crate::header::Docs;
use crate::report::{Kind, Report};
use crate::rng::Rng;
use crate::{Config, Progress, Stop};

/// Locks a mutex of the model, past poisoning (a finding panics nothing, but a fuzzer
/// bug in one thread must not hide the others' findings).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// Manager slots: the simulator three times, the host backend once.
const SIM_SLOTS: usize = 3;
const MGR_SLOTS: usize = SIM_SLOTS + 1;
const STREAM_SLOTS: usize = 8;
const STORE_SLOTS: usize = 3;
const EVENT_SLOTS: usize = 4;
/// Live buffers per manager, at most.
const MAX_BUFFERS: usize = 40;
/// Dead handles and addresses remembered, per kind.
const MAX_DEAD: usize = 64;

/// One live allocation, as the model sees it.
pub(crate) struct Buf {
    pub(crate) addr: u64,
    pub(crate) len: usize,
    pub(crate) placement: c_int,
    /// The device of device and managed memory.
    pub(crate) device: usize,
    /// Whether the CPU may touch it (host, pinned, managed).
    pub(crate) host: bool,
    /// Set while a thread frees it: an allocation may then get its address.
    pub(crate) freeing: AtomicBool,
    pub(crate) data: Mutex<BufData>,
}

/// What a buffer holds.
pub(crate) struct BufData {
    pub(crate) alive: bool,
    pub(crate) bytes: Vec<u8>,
}

impl Buf {
    /// Whether a copy between this and `other` on a stream of `device` is allowed.
    pub(crate) fn stream_fits(&self, other: &Buf, device: usize) -> bool {
        let dev = |b: &Buf| (b.placement == mem::DEVICE).then_some(b.device);
        match (dev(self), dev(other)) {
            (Some(a), None) | (None, Some(a)) => a == device,
            (Some(a), Some(b)) => a == device || b == device,
            (None, None) => true,
        }
    }
}

/// A live manager.
pub(crate) struct MgrInfo {
    pub(crate) handle: usize,
    /// Unique over the run: streams and stores remember which manager made them.
    pub(crate) gen: u64,
    pub(crate) sim: bool,
    pub(crate) devices: usize,
    pub(crate) totals: Vec<usize>,
    /// Set once a destroy is under way (see the module docs).
    pub(crate) dying: Arc<AtomicBool>,
}

#[derive(Default)]
pub(crate) struct MgrState {
    pub(crate) info: Option<Arc<MgrInfo>>,
    pub(crate) bufs: BTreeMap<u64, Arc<Buf>>,
    pub(crate) dead_addrs: VecDeque<u64>,
}

impl MgrState {
    /// The live buffer containing `addr`, and the offset (the library's rule: a range
    /// starts inside a buffer or it is foreign).
    pub(crate) fn locate(&self, addr: u64) -> Option<(Arc<Buf>, usize)> {
        let (start, b) = self.bufs.range(..=addr).next_back()?;
        let off = addr - start;
        (off < b.len as u64).then(|| (b.clone(), off as usize))
    }

    /// A random live buffer.
    pub(crate) fn any(&self, rng: &mut Rng, pick: impl Fn(&Buf) -> bool) -> Option<Arc<Buf>> {
        let v: Vec<&Arc<Buf>> = self.bufs.values().filter(|b| pick(b)).collect();
        (!v.is_empty()).then(|| v[rng.index(v.len())].clone())
    }
}

pub(crate) struct MgrSlot {
    pub(crate) life: RwLock<()>,
    /// Held by calls that touch the manager's memory themselves (as a C program
    /// would), exclusively by a racing destroy.
    pub(crate) raw: RwLock<()>,
    pub(crate) st: Mutex<MgrState>,
}

/// A live stream handle.
#[derive(Clone)]
pub(crate) struct StreamInfo {
    pub(crate) handle: usize,
    pub(crate) mgr_gen: u64,
    pub(crate) mgr_slot: usize,
    pub(crate) device: usize,
    /// The value hetmem_stream_raw must report (for wrapped streams: the value wrapped;
    /// 0 for made ones, whose value only the library knows).
    pub(crate) raw: Option<usize>,
    pub(crate) dying: Arc<AtomicBool>,
}

pub(crate) struct StreamSlot {
    pub(crate) life: RwLock<()>,
    /// Held while the stream's raw value is in use (wrapped), exclusively by a racing
    /// destroy.
    pub(crate) raw: RwLock<()>,
    pub(crate) st: Mutex<Option<StreamInfo>>,
}

/// A live event handle.
#[derive(Clone)]
pub(crate) struct EventInfo {
    pub(crate) handle: usize,
    pub(crate) mgr_gen: u64,
    pub(crate) device: usize,
    pub(crate) dying: Arc<AtomicBool>,
}

pub(crate) struct EventSlot {
    pub(crate) life: RwLock<()>,
    pub(crate) st: Mutex<Option<EventInfo>>,
}

/// A registered parameter (its bytes never change through the C ABI: nothing in it
/// writes a parameter).
#[derive(Clone)]
pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) bytes: Arc<Vec<u8>>,
}

/// A live store.
pub(crate) struct StoreInfo {
    pub(crate) handle: usize,
    pub(crate) mgr_gen: u64,
    pub(crate) mgr_slot: usize,
    pub(crate) device: usize,
    pub(crate) device_budget: usize,
    pub(crate) params: Vec<Param>,
    pub(crate) dying: Arc<AtomicBool>,
}

pub(crate) struct StoreSlot {
    pub(crate) life: RwLock<()>,
    pub(crate) st: Mutex<Option<StoreInfo>>,
    /// Guards held on it now.
    pub(crate) guards: AtomicUsize,
}

/// A live guard.
pub(crate) struct GuardInfo {
    pub(crate) handle: usize,
    pub(crate) store_slot: usize,
    pub(crate) store_handle: usize,
    pub(crate) id: u32,
    pub(crate) device_ptr: usize,
    pub(crate) bytes: Arc<Vec<u8>>,
}

/// Handles destroyed already, by kind.
#[derive(Default)]
pub(crate) struct Dead {
    pub(crate) mgrs: VecDeque<usize>,
    pub(crate) streams: VecDeque<usize>,
    pub(crate) stores: VecDeque<usize>,
    pub(crate) guards: VecDeque<usize>,
    pub(crate) events: VecDeque<usize>,
}

fn remember(v: &mut VecDeque<usize>, h: usize) {
    if v.len() >= MAX_DEAD {
        v.pop_front();
    }
    v.push_back(h);
}

/// Everything the C ABI threads share.
pub struct World {
    pub(crate) docs: Docs,
    pub(crate) report: Arc<Report>,
    pub(crate) mgrs: Vec<MgrSlot>,
    pub(crate) streams: Vec<StreamSlot>,
    pub(crate) stores: Vec<StoreSlot>,
    pub(crate) events: Vec<EventSlot>,
    pub(crate) guards: Mutex<Vec<GuardInfo>>,
    pub(crate) dead: Mutex<Dead>,
    pub(crate) torch: Mutex<torch::TorchModel>,
    pub(crate) gens: AtomicU64,
    pub(crate) names: AtomicU64,
    /// Safetensors files for the stores.
    pub(crate) dir: PathBuf,
    /// A FIFO in it, given as a safetensors file (no writer ever opens it).
    pub(crate) fifo: PathBuf,
}

impl World {
    /// A world with no manager yet (threads make them).
    pub fn new(cfg: &Config, report: Arc<Report>) -> Arc<World> {
        let dir =
            std::env::temp_dir().join(format!("hetmem-fuzz-{}-{}", std::process::id(), cfg.seed));
        std::fs::create_dir_all(&dir).expect("a scratch directory for safetensors files");
        let fifo = dir.join("fifo.safetensors");
        let c = std::ffi::CString::new(fifo.to_string_lossy().into_owned()).expect("no NUL");
        // SAFETY: a NUL-terminated path.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert!(rc == 0 || fifo.exists(), "mkfifo {}", fifo.display());
        Arc::new(World {
            docs: Docs::load(),
            report,
            mgrs: (0..MGR_SLOTS)
                .map(|_| MgrSlot {
                    life: RwLock::new(()),
                    raw: RwLock::new(()),
                    st: Mutex::new(MgrState::default()),
                })
                .collect(),
            streams: (0..STREAM_SLOTS)
                .map(|_| StreamSlot {
                    life: RwLock::new(()),
                    raw: RwLock::new(()),
                    st: Mutex::new(None),
                })
                .collect(),
            stores: (0..STORE_SLOTS)
                .map(|_| StoreSlot {
                    life: RwLock::new(()),
                    st: Mutex::new(None),
                    guards: AtomicUsize::new(0),
                })
                .collect(),
            events: (0..EVENT_SLOTS)
                .map(|_| EventSlot {
                    life: RwLock::new(()),
                    st: Mutex::new(None),
                })
                .collect(),
            guards: Mutex::new(Vec::new()),
            dead: Mutex::new(Dead::default()),
            torch: Mutex::new(torch::TorchModel::default()),
            gens: AtomicU64::new(1),
            names: AtomicU64::new(0),
            dir,
            fifo,
        })
    }
}

/// What a call should return.
#[derive(Debug, Clone)]
pub(crate) struct Expect {
    /// Success is right.
    pub(crate) ok: bool,
    /// These errors are right.
    pub(crate) errs: Vec<c_int>,
    /// The arguments that are wrong on purpose.
    pub(crate) faults: Vec<&'static str>,
}

impl Expect {
    /// Every argument valid: success (and no error but those added with `env`).
    pub(crate) fn ok() -> Expect {
        Expect {
            ok: true,
            errs: Vec::new(),
            faults: Vec::new(),
        }
    }

    /// An argument that must make the call fail with `code`.
    pub(crate) fn fault(&mut self, what: &'static str, code: c_int) -> &mut Expect {
        self.ok = false;
        self.errs.push(code);
        self.faults.push(what);
        self
    }

    /// An argument the header leaves open: success or `code`.
    pub(crate) fn edge(&mut self, what: &'static str, code: c_int) -> &mut Expect {
        self.errs.push(code);
        self.faults.push(what);
        self
    }

    /// An error the environment may cause (memory running out, ...).
    pub(crate) fn env(&mut self, code: c_int) -> &mut Expect {
        self.errs.push(code);
        self
    }

    pub(crate) fn bad(&self) -> bool {
        !self.faults.is_empty()
    }

    fn key(&self) -> String {
        self.faults.join("+")
    }
}

/// The calling thread's last error message.
pub(crate) fn last_error() -> String {
    // SAFETY: hetmem_last_error returns a NUL-terminated string that stays valid until
    // this thread's next call into hetmem; it is copied at once.
    unsafe { CStr::from_ptr(hetmem_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Defects known and being fixed elsewhere, which a run reports as known rather than
/// failing on: (kind, call or "" for any, a fragment of the finding's key, what it is).
/// Empty: issue 15's (the copy-stream checks, the simulator's addresses aliased between
/// managers, the per-call code lists; in the tier store the thread exhaustion, the
/// unbounded ring, the FIFO hang and zero-element tensors) are fixed, and the fuzzer
/// now fails on any of them.
const KNOWN: &[(Kind, &str, &str, &str)] = &[];

/// Which known defect a finding is, if any (see [`KNOWN`]).
fn known(kind: Kind, call: &str, key: &str) -> Option<&'static str> {
    KNOWN
        .iter()
        .find(|(k, c, frag, _)| *k == kind && (c.is_empty() || *c == call) && key.contains(frag))
        .map(|e| e.3)
}

/// One fuzz thread of the C ABI leg.
pub(crate) struct Thread<'w> {
    pub(crate) w: &'w World,
    pub(crate) t: usize,
    pub(crate) rng: Rng,
    /// Calls by function: (succeeded, failed), added to the report at the end.
    pub(crate) counts: std::cell::RefCell<BTreeMap<&'static str, (u64, u64)>>,
    /// The `dying` flags of the objects the current operation uses.
    pub(crate) used: std::cell::RefCell<Vec<Arc<AtomicBool>>>,
}

impl Thread<'_> {
    /// Checks the status `rc` of `call` against `e` and the header; returns whether the
    /// call succeeded. `args` describes the call for a finding.
    pub(crate) fn check(
        &self,
        call: &'static str,
        rc: c_int,
        e: &Expect,
        args: &dyn Fn() -> String,
    ) -> bool {
        let w = self.w;
        w.report.call(e.bad(), rc == HETMEM_OK);
        {
            let mut c = self.counts.borrow_mut();
            let n = c.entry(call).or_default();
            if rc == HETMEM_OK {
                n.0 += 1;
            } else {
                n.1 += 1;
            }
        }
        let msg = last_error();
        let name = |c: c_int| w.docs.name(c);
        let example = || {
            format!(
                "{call}({}) -> {} (expected {}{}); last error: {msg:?}",
                args(),
                name(rc),
                if e.ok { "OK" } else { "" },
                e.errs
                    .iter()
                    .map(|c| format!(" {}", name(*c)))
                    .collect::<String>(),
            )
        };
        let find = |kind: Kind, key: String| {
            let k = known(kind, call, &key);
            w.report.find(kind, call, &key, k, example);
        };
        // A handle destroyed by another thread during the call (see the module docs).
        let raced = rc == HETMEM_ERR_INVALID_HANDLE
            && self.used.borrow().iter().any(|d| d.load(Ordering::SeqCst));
        if raced {
            w.report.add_extra("raced_destroys_seen", 1);
        }
        if rc == HETMEM_ERR_PANIC {
            find(Kind::Panic, String::new());
        } else if rc != HETMEM_OK && !w.docs.documents(call, rc) {
            find(Kind::Undocumented, name(rc));
        }
        if rc == HETMEM_OK && !e.ok {
            find(Kind::AcceptedBadInput, e.key());
        } else if rc != HETMEM_OK && rc != HETMEM_ERR_PANIC && !e.errs.contains(&rc) && !raced {
            find(Kind::WrongStatus, format!("{}: {}", e.key(), name(rc)));
        }
        if rc == HETMEM_OK && !msg.is_empty() {
            find(Kind::Contract, "last error left after a success".into());
        } else if rc != HETMEM_OK && !msg.starts_with(call) {
            find(Kind::Contract, "last error does not name the call".into());
        }
        rc == HETMEM_OK
    }

    /// Notes that the current operation uses an object that may be destroyed under it.
    pub(crate) fn uses(&self, dying: &Arc<AtomicBool>) {
        self.used.borrow_mut().push(dying.clone());
    }

    /// Records a contract finding.
    pub(crate) fn contract(&self, call: &str, key: &str, example: impl FnOnce() -> String) {
        self.w.report.find(
            Kind::Contract,
            call,
            key,
            known(Kind::Contract, call, key),
            example,
        );
    }

    /// Compares bytes read back with the model's.
    pub(crate) fn compare(&self, call: &str, what: &str, got: &[u8], want: &[u8]) -> bool {
        self.w
            .report
            .bytes_checked
            .fetch_add(want.len() as u64, Ordering::Relaxed);
        if got == want {
            return true;
        }
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        self.w.report.find(Kind::WrongBytes, call, what, None, || {
            format!(
                "{what}: {} bytes read, {} expected; first difference at {at}: got {:?}, want {:?}",
                got.len(),
                want.len(),
                got.get(at..(at + 8).min(got.len())),
                want.get(at..(at + 8).min(want.len()))
            )
        });
        false
    }

    /// A handle value hetmem never made: small numbers, odd values, addresses of real
    /// memory.
    pub(crate) fn forged_handle(&mut self) -> usize {
        let local = 0u64;
        match self.rng.below(6) {
            0 => 1,
            // Between two of hetmem's tokens (they are 16 apart from 0x4865_0000).
            1 => 0x4865_0000 + 8 + 16 * self.rng.index(1 << 20),
            2 => usize::MAX,
            3 => std::ptr::addr_of!(local).addr(),
            4 => 0x4865_0000 - 16,
            _ => self.rng.next_u64() as usize | 1,
        }
    }

    /// A dead handle of a kind, if one is remembered.
    pub(crate) fn dead_handle(&mut self, kind: fn(&Dead) -> &VecDeque<usize>) -> Option<usize> {
        let d = lock(&self.w.dead);
        let v = kind(&d);
        (!v.is_empty()).then(|| v[self.rng.index(v.len())])
    }

    /// A live handle of some kind other than `not`, if there is one (no lock: a handle
    /// of the wrong kind is refused whether it is live or not).
    pub(crate) fn other_kind(&mut self, not: HandleKind) -> Option<usize> {
        let kinds = [
            HandleKind::Manager,
            HandleKind::Stream,
            HandleKind::Store,
            HandleKind::Guard,
            HandleKind::Event,
        ];
        let k = self.rng.pick(&kinds);
        if k == not {
            return None;
        }
        let w = self.w;
        match k {
            HandleKind::Manager => {
                let s = &w.mgrs[self.rng.index(MGR_SLOTS)];
                let h = lock(&s.st).info.as_ref().map(|i| i.handle);
                h
            }
            HandleKind::Stream => {
                let s = &w.streams[self.rng.index(STREAM_SLOTS)];
                let h = lock(&s.st).as_ref().map(|i| i.handle);
                h
            }
            HandleKind::Store => {
                let s = &w.stores[self.rng.index(STORE_SLOTS)];
                let h = lock(&s.st).as_ref().map(|i| i.handle);
                h
            }
            HandleKind::Guard => {
                let g = lock(&w.guards);
                (!g.is_empty()).then(|| g[self.rng.index(g.len())].handle)
            }
            HandleKind::Event => {
                let s = &w.events[self.rng.index(EVENT_SLOTS)];
                let h = lock(&s.st).as_ref().map(|i| i.handle);
                h
            }
        }
    }

    /// A handle that is not a live one of `kind`, and the code it calls for.
    pub(crate) fn bad_handle(&mut self, kind: HandleKind) -> (usize, &'static str, c_int) {
        let dead: fn(&Dead) -> &VecDeque<usize> = match kind {
            HandleKind::Manager => |d| &d.mgrs,
            HandleKind::Stream => |d| &d.streams,
            HandleKind::Store => |d| &d.stores,
            HandleKind::Guard => |d| &d.guards,
            HandleKind::Event => |d| &d.events,
        };
        match self.rng.below(4) {
            0 => (0, "NULL handle", HETMEM_ERR_NULL_POINTER),
            1 => match self.dead_handle(dead) {
                Some(h) => (h, "dead handle", HETMEM_ERR_INVALID_HANDLE),
                None => (
                    self.forged_handle(),
                    "forged handle",
                    HETMEM_ERR_INVALID_HANDLE,
                ),
            },
            2 => match self.other_kind(kind) {
                Some(h) => (h, "handle of another kind", HETMEM_ERR_INVALID_HANDLE),
                None => (
                    self.forged_handle(),
                    "forged handle",
                    HETMEM_ERR_INVALID_HANDLE,
                ),
            },
            _ => (
                self.forged_handle(),
                "forged handle",
                HETMEM_ERR_INVALID_HANDLE,
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandleKind {
    Manager,
    Stream,
    Store,
    Guard,
    Event,
}

/// A manager handle as C sees it.
pub(crate) fn mh(h: usize) -> *mut memory::HetmemManager {
    std::ptr::without_provenance_mut(h)
}

/// A stream handle as C sees it.
pub(crate) fn sh(h: usize) -> *mut memory::HetmemStream {
    std::ptr::without_provenance_mut(h)
}

/// A store handle as C sees it.
pub(crate) fn th(h: usize) -> *mut tier::HetmemStore {
    std::ptr::without_provenance_mut(h)
}

/// A guard handle as C sees it.
pub(crate) fn gh(h: usize) -> *mut tier::HetmemGuard {
    std::ptr::without_provenance_mut(h)
}

/// An event handle as C sees it.
pub(crate) fn eh(h: usize) -> *mut event::HetmemEvent {
    std::ptr::without_provenance_mut(h)
}

/// An address hetmem gave (or a made-up one) as C passes it.
pub(crate) fn addr_ptr(a: u64) -> *mut std::ffi::c_void {
    std::ptr::with_exposed_provenance_mut(a as usize)
}

/// Runs thread `t` of the C ABI leg until `stop`.
pub fn worker(w: &World, t: usize, seed: u64, stop: &Stop, progress: &Progress) {
    let mut th = Thread {
        w,
        t,
        rng: Rng::new(seed, t as u64),
        counts: Default::default(),
        used: Default::default(),
    };
    let mut done = 0u64;
    while !stop.now(done) {
        th.step(progress);
        progress.tick(t);
        done += 1;
    }
    th.release_some(usize::MAX);
    w.report.merge_calls(&th.counts.borrow());
}

impl Thread<'_> {
    fn step(&mut self, progress: &Progress) {
        let r = self.rng.below(1000);
        let op: (&str, fn(&mut Self)) = match r {
            0..=14 => ("manager lifecycle", Self::op_manager_lifecycle),
            15..=44 => ("manager queries", Self::op_manager_queries),
            45..=149 => ("alloc", Self::op_alloc),
            150..=219 => ("free", Self::op_free),
            220..=339 => ("copy", Self::op_copy),
            340..=419 => ("copy from host", Self::op_copy_from_host),
            420..=499 => ("copy to host", Self::op_copy_to_host),
            500..=529 => ("direct access", Self::op_direct),
            530..=559 => ("foreign addresses", Self::op_foreign_addresses),
            560..=619 => ("streams", Self::op_streams),
            620..=649 => ("prefetch and advise", Self::op_prefetch_advise),
            650..=669 => ("stats", Self::op_stats),
            670..=699 => ("bad handles", Self::op_bad_handles),
            700..=719 => ("store lifecycle", Self::op_store_lifecycle),
            720..=759 => ("store register", Self::op_store_register),
            760..=809 => ("store hints", Self::op_store_hints),
            810..=879 => ("store acquire", Self::op_store_acquire),
            880..=909 => ("store guards", Self::op_store_guards),
            910..=929 => ("store read", Self::op_store_read),
            930..=969 => ("torch", Self::op_torch),
            970..=989 => ("events", Self::op_events),
            _ => ("misc", Self::op_misc),
        };
        progress.enter(self.t, op.0);
        self.used.borrow_mut().clear();
        (op.1)(self);
    }

    /// Version, status names, last error.
    fn op_misc(&mut self) {
        // SAFETY: hetmem_version returns a static NUL-terminated string.
        let v = unsafe { CStr::from_ptr(hetmem_version()) };
        if v.to_str().ok() != Some(hetmem_version_expected()) {
            self.contract("hetmem_version", "version", || format!("{v:?}"));
        }
        let code = match self.rng.below(3) {
            0 => *self
                .w
                .docs
                .codes
                .values()
                .nth(self.rng.index(self.w.docs.codes.len()))
                .unwrap_or(&0),
            1 => self.rng.next_u64() as c_int,
            _ => -(self.rng.below(120) as c_int),
        };
        // SAFETY: hetmem_status_string returns a static NUL-terminated string.
        let s = unsafe { CStr::from_ptr(hetmem_status_string(code)) }
            .to_string_lossy()
            .into_owned();
        let want = match self.w.docs.codes.iter().find(|(_, v)| **v == code) {
            Some((k, _)) if k == "OK" => "HETMEM_OK".to_owned(),
            Some((k, _)) => format!("HETMEM_ERR_{k}"),
            None => "HETMEM_ERR_UNKNOWN_STATUS".to_owned(),
        };
        self.w.report.call(false, true);
        if s != want {
            self.contract("hetmem_status_string", "name", || {
                format!("{code} -> {s:?}, the header says {want:?}")
            });
        }
        // SAFETY: as above; hetmem_store_config_size takes nothing.
        let size = hetmem::ffi::tier::hetmem_store_config_size();
        if size != std::mem::size_of::<tier::HetmemStoreConfig>() {
            self.contract("hetmem_store_config_size", "size", || size.to_string());
        }
    }
}

fn hetmem_version_expected() -> &'static str {
    // The header's HETMEM_VERSION.
    let h = crate::header::HEADER;
    h.lines()
        .find_map(|l| l.trim().strip_prefix("#define HETMEM_VERSION \""))
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or("?")
}

/// After the threads: every buffer and parameter checked once more, then everything
/// released and destroyed, each call checked.
pub fn teardown(w: &World, seed: u64) {
    let mut th = Thread {
        w,
        t: usize::MAX,
        rng: Rng::new(seed, u64::MAX),
        counts: Default::default(),
        used: Default::default(),
    };
    th.release_some(usize::MAX);
    for slot in 0..STORE_SLOTS {
        th.verify_store(slot);
        th.destroy_store(slot);
    }
    for slot in 0..EVENT_SLOTS {
        th.destroy_event(slot);
    }
    for slot in 0..STREAM_SLOTS {
        th.destroy_stream(slot);
    }
    for slot in 0..MGR_SLOTS {
        th.destroy_manager(slot);
    }
    th.torch_teardown();
    w.report.merge_calls(&th.counts.borrow());
    let _ = std::fs::remove_dir_all(&w.dir);
}
