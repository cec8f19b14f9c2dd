//! The tier store in use through `hetmem_store_*`: every hint, acquires on every kind
//! of stream, guards marked dirty and released (twice, too), and reads compared with
//! the bytes registered.

use std::ffi::{c_int, c_void};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hetmem::ffi::tier::*;
use hetmem::ffi::*;

use super::mem::{AddrArg, At, HostSide, Locked, StreamArg, POISON};
use super::{
    gh, lock, read, remember, th, Expect, GuardInfo, HandleKind, Param, StoreInfo, Thread,
    STORE_SLOTS,
};

use super::store::*;

impl Thread<'_> {
    pub(crate) fn op_store_hints(&mut self) {
        self.with_store(|me, _, s| {
            let mut e = Expect::ok();
            match me.rng.below(7) {
                0 => {
                    let n = me.rng.index(2 * s.params.len() + 1);
                    let mut ids: Vec<u32> =
                        (0..n).map(|_| me.param_id(s, &mut Expect::ok())).collect();
                    if ids.iter().any(|i| *i as usize >= s.params.len()) {
                        e.fault("an unknown id", HETMEM_ERR_UNKNOWN_PARAM);
                    }
                    let mut len = ids.len();
                    let mut p = ids.as_mut_ptr().cast_const();
                    match me.rng.below(12) {
                        0 => {
                            len = 0;
                            p = std::ptr::null();
                            e = Expect::ok();
                        }
                        1 if len > 0 => {
                            e.fault("ids NULL", HETMEM_ERR_NULL_POINTER);
                            p = std::ptr::null();
                        }
                        2 => {
                            e.fault("length SIZE_MAX", HETMEM_ERR_INVALID_SIZE)
                                .env(HETMEM_ERR_UNKNOWN_PARAM);
                            len = usize::MAX;
                            ids.push(0);
                            p = ids.as_ptr();
                        }
                        _ => {}
                    }
                    // SAFETY: a live store; `p` NULL or valid for `len` ids (SIZE_MAX
                    // aside: refused before any read, the conventions say).
                    let rc = unsafe { hetmem_store_set_sequence(th(s.handle), p, len) };
                    me.check("hetmem_store_set_sequence", rc, &e, &|| {
                        format!("{} ids", len)
                    });
                }
                1 => {
                    let id = me.param_id(s, &mut e);
                    let mut on = -1 as c_int;
                    let p: *mut c_int = if me.rng.chance(30) {
                        std::ptr::null_mut()
                    } else {
                        &mut on
                    };
                    // SAFETY: a live store; `p` NULL or valid.
                    let rc = unsafe { hetmem_store_will_need(th(s.handle), id, p) };
                    if me.check("hetmem_store_will_need", rc, &e, &|| format!("id {id}"))
                        && !p.is_null()
                        && !(0..=1).contains(&on)
                    {
                        me.contract("hetmem_store_will_need", "on_device", || on.to_string());
                    }
                }
                2 => {
                    let id = me.param_id(s, &mut e);
                    let mut d = -1 as c_int;
                    let p: *mut c_int = if me.rng.chance(30) {
                        std::ptr::null_mut()
                    } else {
                        &mut d
                    };
                    // SAFETY: a live store; `p` NULL or valid.
                    let rc = unsafe { hetmem_store_dont_need(th(s.handle), id, p) };
                    if me.check("hetmem_store_dont_need", rc, &e, &|| format!("id {id}"))
                        && !p.is_null()
                        && !(0..=1).contains(&d)
                    {
                        me.contract("hetmem_store_dont_need", "dropped", || d.to_string());
                    }
                }
                3 => {
                    let id = me.param_id(s, &mut e);
                    // Keep only the first parameter, so that the budget never fills with
                    // kept ones (acquires would all fail).
                    let keep = if id == 0 { me.rng.below(2) as c_int } else { 0 };
                    // SAFETY: a live store.
                    let rc = unsafe { hetmem_store_keep_resident(th(s.handle), id, keep) };
                    me.check("hetmem_store_keep_resident", rc, &e, &|| {
                        format!("id {id}, keep {keep}")
                    });
                }
                4 => {
                    let id = me.param_id(s, &mut e);
                    let pr = me.rng.pick(&[0, 1, -1, c_int::MAX, c_int::MIN]);
                    // SAFETY: a live store.
                    let rc = unsafe { hetmem_store_priority(th(s.handle), id, pr) };
                    me.check("hetmem_store_priority", rc, &e, &|| {
                        format!("id {id}, priority {pr}")
                    });
                }
                _ => {
                    let id = me.param_id(s, &mut e);
                    let mut state = -1 as c_int;
                    let mut refs = u32::MAX;
                    let sn = me.rng.chance(8);
                    if sn {
                        e.fault("state NULL", HETMEM_ERR_NULL_POINTER);
                    }
                    let sp: *mut c_int = if sn { std::ptr::null_mut() } else { &mut state };
                    let rp: *mut u32 = if me.rng.chance(30) {
                        std::ptr::null_mut()
                    } else {
                        &mut refs
                    };
                    // SAFETY: a live store; out-pointers NULL or valid.
                    let rc = unsafe { hetmem_store_residency(th(s.handle), id, sp, rp) };
                    if me.check("hetmem_store_residency", rc, &e, &|| format!("id {id}"))
                        && !sn
                        && !(0..=3).contains(&state)
                    {
                        me.contract("hetmem_store_residency", "state", || state.to_string());
                    }
                }
            }
        });
    }

    pub(crate) fn op_store_acquire(&mut self) {
        // Managers first, then streams, then the store (the lock order).
        let slot = self.rng.index(STORE_SLOTS);
        let Some(mslot) = lock(&self.w.stores[slot].st).as_ref().map(|s| s.mgr_slot) else {
            return;
        };
        let fmslot = self.pick_mgr();
        let poke = self.rng.chance(10);
        let want = if poke {
            vec![(mslot, false), (fmslot, true)]
        } else {
            vec![(mslot, false)]
        };
        let _ml = self.lock_mgrs(&want);
        let stream = self.stream_arg(40);
        let ss = &self.w.stores[slot];
        let _sl = read(&ss.life);
        let Some(s) = lock(&ss.st).as_ref().map(|s| StoreInfo {
            handle: s.handle,
            mgr_gen: s.mgr_gen,
            mgr_slot: s.mgr_slot,
            device: s.device,
            device_budget: s.device_budget,
            params: s.params.clone(),
            dying: s.dying.clone(),
        }) else {
            return;
        };
        self.uses(&s.dying);
        if ss.guards.load(Ordering::Relaxed) >= MAX_GUARDS {
            drop(_sl);
            drop(_ml);
            self.release_some(1);
            return;
        }
        let mut e = Expect::ok();
        let id = self.param_id(&s, &mut e);
        let device = s.device;
        let fits = move |d: usize| d == device;
        stream.faults(s.mgr_gen, Some(&fits), &mut e);
        // The budget may be full of other threads' guards.
        e.env(HETMEM_ERR_OUT_OF_MEMORY);
        let out_null = self.rng.chance(4);
        if out_null {
            e.fault("out NULL", HETMEM_ERR_NULL_POINTER);
        }
        let mut out: *mut HetmemGuard = std::ptr::without_provenance_mut(POISON);
        let op: *mut *mut HetmemGuard = if out_null {
            std::ptr::null_mut()
        } else {
            &mut out
        };
        let mut dev_ptr: *mut c_void = std::ptr::without_provenance_mut(POISON);
        let dp: *mut *mut c_void = if self.rng.chance(20) {
            std::ptr::null_mut()
        } else {
            &mut dev_ptr
        };
        let timed = self.rng.chance(30);
        let timeout = self.rng.below(20);
        // SAFETY: a live store; the stream is live or a bad value; out-pointers NULL or
        // valid.
        let (call, rc) = unsafe {
            if timed {
                (
                    "hetmem_store_acquire_timeout",
                    hetmem_store_acquire_timeout(th(s.handle), id, stream.ptr(), timeout, op, dp),
                )
            } else {
                (
                    "hetmem_store_acquire",
                    hetmem_store_acquire(th(s.handle), id, stream.ptr(), op, dp),
                )
            }
        };
        let ok = self.check(call, rc, &e, &|| {
            format!("id {id}, stream {}", stream_text(&stream))
        });
        if !ok {
            if !out_null && !out.is_null() {
                self.contract(call, "*out not NULL after a failure", || format!("{out:?}"));
            }
            if !dp.is_null() && !out_null && !dev_ptr.is_null() {
                self.contract(call, "*device_ptr not NULL after a failure", || {
                    format!("{dev_ptr:?}")
                });
            }
            return;
        }
        if out_null {
            return;
        }
        ss.guards.fetch_add(1, Ordering::Relaxed);
        let p = &s.params[id as usize];
        // While the guard is held the bytes read are the registered ones.
        self.read_param(s.handle, id, p);
        let g = GuardInfo {
            handle: out.addr(),
            store_slot: slot,
            store_handle: s.handle,
            id,
            device_ptr: if dp.is_null() { 0 } else { dev_ptr.addr() },
            bytes: p.bytes.clone(),
        };
        let empty = p.bytes.is_empty();
        if !dp.is_null() && (g.device_ptr == 0) != empty || g.device_ptr == POISON {
            // An empty parameter has no memory: NULL; any other an address.
            self.contract(call, "device address", || {
                format!("{dev_ptr:?} for a parameter of {} bytes", p.bytes.len())
            });
        } else if poke && g.device_ptr != 0 {
            // The guard's device address is no buffer of any manager's: a copy into it
            // is refused (or, if the model knows a buffer there, lands in that one).
            self.poke_guard(fmslot, g.device_ptr as u64);
        }
        lock(&self.w.guards).push(g);
    }

    /// hetmem_copy_from_host into a store's device address, on manager `slot` (its
    /// lock held exclusively).
    fn poke_guard(&mut self, slot: usize, addr: u64) {
        let Some(info) = self.info(slot) else {
            return;
        };
        let at = match lock(&self.w.mgrs[slot].st).locate(addr) {
            Some((b, off)) => At::In(b, off),
            None => At::Out,
        };
        let a = AddrArg {
            addr,
            at,
            label: "a tier store's device address",
        };
        let bufs: Vec<&Arc<super::Buf>> = a.buffer().into_iter().collect();
        let Some(mut l) = Locked::new(&bufs) else {
            return;
        };
        let n = 1 + self.rng.index(64);
        let src = HostSide::Caller(self.rng.bytes(n));
        self.do_copy_from_host(&info, &mut l, &a, &src, n);
    }

    /// Releases up to `n` guards (any thread's).
    pub(crate) fn release_some(&mut self, n: usize) {
        for _ in 0..n {
            let g = {
                let mut v = lock(&self.w.guards);
                if v.is_empty() {
                    return;
                }
                let i = self.rng.index(v.len());
                v.swap_remove(i)
            };
            self.release(g);
        }
    }

    fn release(&mut self, g: GuardInfo) {
        // SAFETY: a live guard, taken out of the model: no other thread uses it.
        let rc = unsafe { hetmem_guard_release(gh(g.handle)) };
        self.check("hetmem_guard_release", rc, &Expect::ok(), &|| {
            format!("id {}", g.id)
        });
        let ss = &self.w.stores[g.store_slot];
        if lock(&ss.st)
            .as_ref()
            .is_some_and(|s| s.handle == g.store_handle)
        {
            ss.guards.fetch_sub(1, Ordering::Relaxed);
        }
        remember(&mut lock(&self.w.dead).guards, g.handle);
    }

    pub(crate) fn op_store_guards(&mut self) {
        let g = {
            let mut v = lock(&self.w.guards);
            if v.is_empty() {
                None
            } else {
                let i = self.rng.index(v.len());
                Some(v.swap_remove(i))
            }
        };
        let Some(g) = g else {
            // Nothing held: a bad guard.
            let (h, what, code) = self.bad_handle(HandleKind::Guard);
            let mut e = Expect::ok();
            e.fault(what, code);
            // SAFETY: any handle value may be passed.
            let rc = unsafe { hetmem_guard_mark_dirty(gh(h)) };
            self.check("hetmem_guard_mark_dirty", rc, &e, &|| format!("{h:#x}"));
            return;
        };
        match self.rng.below(4) {
            0 | 1 => {
                // SAFETY: a live guard, out of the model while used here.
                let rc = unsafe { hetmem_guard_mark_dirty(gh(g.handle)) };
                self.check("hetmem_guard_mark_dirty", rc, &Expect::ok(), &|| {
                    format!("id {}", g.id)
                });
                // Dirty, unchanged (nothing in the C ABI writes it): the same bytes.
                let ss = &self.w.stores[g.store_slot];
                let _sl = read(&ss.life);
                let same = lock(&ss.st)
                    .as_ref()
                    .filter(|s| s.handle == g.store_handle)
                    .map(|s| s.dying.clone());
                if let Some(dying) = same {
                    self.uses(&dying);
                    let p = Param {
                        name: String::new(),
                        bytes: g.bytes.clone(),
                    };
                    self.read_param(g.store_handle, g.id, &p);
                }
                drop(_sl);
                lock(&self.w.guards).push(g);
            }
            2 => {
                let h = g.handle;
                self.release(g);
                let mut e = Expect::ok();
                e.fault("released twice", HETMEM_ERR_INVALID_HANDLE);
                // SAFETY: any handle value may be passed.
                let rc = unsafe { hetmem_guard_release(gh(h)) };
                self.check("hetmem_guard_release", rc, &e, &|| "twice".into());
                // SAFETY: as above.
                let rc = unsafe { hetmem_guard_mark_dirty(gh(h)) };
                self.check("hetmem_guard_mark_dirty", rc, &e, &|| {
                    "after release".into()
                });
            }
            _ => self.release(g),
        }
    }

    pub(crate) fn op_store_read(&mut self) {
        self.with_store(|me, _, s| {
            let mut e = Expect::ok();
            let id = me.param_id(s, &mut e);
            let len = s.params.get(id as usize).map_or(64, |p| p.bytes.len());
            let mut cap = len + me.rng.index(3);
            if me.rng.chance(10) && len > 0 {
                cap = me.rng.index(len);
                e.fault("a buffer too small", HETMEM_ERR_BUFFER_TOO_SMALL);
            }
            let mut out = vec![0u8; cap.max(1)];
            let null = me.rng.chance(5);
            if null {
                e.fault("out NULL", HETMEM_ERR_NULL_POINTER);
            }
            let p: *mut c_void = if null {
                std::ptr::null_mut()
            } else {
                out.as_mut_ptr().cast()
            };
            // SAFETY: a live store; `p` NULL or valid for `cap` bytes.
            let rc = unsafe { hetmem_store_read(th(s.handle), id, p, cap) };
            if me.check("hetmem_store_read", rc, &e, &|| {
                format!("id {id}, cap {cap}")
            }) && e.ok
            {
                me.compare(
                    "hetmem_store_read",
                    "parameter bytes",
                    &out[..len],
                    &s.params[id as usize].bytes,
                );
            }
        });
    }
}

fn stream_text(s: &StreamArg) -> String {
    match s {
        StreamArg::None => "NULL".into(),
        StreamArg::Live(i, _) => {
            format!("{:#x} (gen {}, device {})", i.handle, i.mgr_gen, i.device)
        }
        StreamArg::Bad(h, w, _) => format!("{h:#x} ({w})"),
    }
}
