//! Streams: made, wrapped (the special values and a live stream's own value), their
//! raw values, synchronisation, destruction; a stream handle given to
//! hetmem_manager_destroy must stay live.

use std::ffi::c_int;
use std::sync::atomic::Ordering;

use hetmem::ffi::memory::*;
use hetmem::ffi::*;

use super::mem::POISON;
use super::{lock, mh, read, remember, sh, write, Expect, StreamInfo, Thread, STREAM_SLOTS};

impl Thread<'_> {
    pub(crate) fn op_streams(&mut self) {
        match self.rng.below(12) {
            0..=3 => self.make_stream(),
            4 | 5 => self.use_stream(),
            6 => {
                let slot = self.rng.index(STREAM_SLOTS);
                if self.rng.chance(50) {
                    self.destroy_stream_racing(slot);
                } else {
                    self.destroy_stream(slot);
                }
            }
            7 => self.wrap_own_value(),
            8 => self.stream_to_manager_destroy(),
            _ => self.use_stream(),
        }
    }

    /// hetmem_stream_create or hetmem_stream_wrap into an empty slot (valid or not).
    fn make_stream(&mut self) {
        let mslot = self.pick_mgr();
        let _ml = self.lock_mgrs(&[(mslot, false)]);
        let Some(info) = self.info(mslot) else {
            return;
        };
        let sslot = self.rng.index(STREAM_SLOTS);
        let ss = &self.w.streams[sslot];
        let _sl = write(&ss.life);
        let keep = lock(&ss.st).is_none();
        let mut e = Expect::ok();
        let devices = info.devices;
        let device: c_int = match self.rng.below(10) {
            0 => {
                e.fault("negative device", HETMEM_ERR_INVALID_ARGUMENT);
                -1 - self.rng.below(3) as c_int
            }
            1 => {
                e.fault("unknown device", HETMEM_ERR_UNKNOWN_DEVICE);
                devices as c_int + self.rng.below(3) as c_int
            }
            _ if devices == 0 => {
                e.fault("a host-only manager", HETMEM_ERR_UNSUPPORTED)
                    .env(HETMEM_ERR_UNKNOWN_DEVICE);
                0
            }
            _ => self.rng.index(devices) as c_int,
        };
        if !info.sim && devices == 0 {
            e.env(HETMEM_ERR_UNSUPPORTED);
        }
        let out_null = self.rng.chance(4);
        if out_null {
            e.fault("out NULL", HETMEM_ERR_NULL_POINTER);
        }
        let mut out: *mut HetmemStream = std::ptr::without_provenance_mut(POISON);
        let op: *mut *mut HetmemStream = if out_null {
            std::ptr::null_mut()
        } else {
            &mut out
        };
        let wrap = self.rng.chance(40);
        let (call, raw, rc) = if wrap {
            let raw: usize = match self.rng.below(8) {
                0 => {
                    e.fault("a value that is no stream", HETMEM_ERR_INVALID_ARGUMENT);
                    self.rng.pick(&[3usize, 0xdead_0000, usize::MAX, 12345])
                }
                n => [0usize, 1, 2][n as usize % 3],
            };
            // SAFETY: a live handle; on the simulator any value is checked; `op` is NULL
            // or valid.
            let rc = unsafe { hetmem_stream_wrap(mh(info.handle), device, raw, op) };
            ("hetmem_stream_wrap", Some(raw), rc)
        } else {
            // SAFETY: a live handle; `op` is NULL or valid.
            let rc = unsafe { hetmem_stream_create(mh(info.handle), device, op) };
            ("hetmem_stream_create", None, rc)
        };
        let ok = self.check(call, rc, &e, &|| format!("device {device}, raw {raw:?}"));
        if !ok {
            if !out_null && !out.is_null() {
                self.contract(call, "*out not NULL after a failure", || format!("{out:?}"));
            }
            return;
        }
        if out_null {
            return;
        }
        let s = StreamInfo {
            handle: out.addr(),
            mgr_gen: info.gen,
            mgr_slot: mslot,
            device: device as usize,
            raw,
            dying: Default::default(),
        };
        if keep {
            *lock(&ss.st) = Some(s);
        } else {
            // No room: used once and let go.
            // SAFETY: the live stream just made.
            let rc = unsafe { hetmem_stream_synchronize(out) };
            self.check("hetmem_stream_synchronize", rc, &Expect::ok(), &|| {
                "new".into()
            });
            // SAFETY: as above.
            let rc = unsafe { hetmem_stream_destroy(out) };
            self.check("hetmem_stream_destroy", rc, &Expect::ok(), &|| "new".into());
            remember(&mut lock(&self.w.dead).streams, s.handle);
        }
    }

    /// hetmem_stream_raw or hetmem_stream_synchronize on a stream in a slot, or on a
    /// bad handle.
    fn use_stream(&mut self) {
        let sslot = self.rng.index(STREAM_SLOTS);
        let ss = &self.w.streams[sslot];
        let _sl = read(&ss.life);
        let live = lock(&ss.st).clone();
        if let Some(s) = &live {
            self.uses(&s.dying);
        }
        let mut e = Expect::ok();
        let h = match &live {
            Some(s) if self.rng.chance(85) => s.handle,
            _ => {
                let (h, what, code) = self.bad_handle(super::HandleKind::Stream);
                e.fault(what, code);
                h
            }
        };
        if self.rng.chance(50) {
            let mut raw: usize = POISON;
            let null = self.rng.chance(10);
            if null {
                e.fault("raw NULL", HETMEM_ERR_NULL_POINTER);
            }
            let rp: *mut usize = if null { std::ptr::null_mut() } else { &mut raw };
            // SAFETY: the handle is looked up; `rp` is NULL or valid.
            let rc = unsafe { hetmem_stream_raw(sh(h), rp) };
            if self.check("hetmem_stream_raw", rc, &e, &|| format!("{h:#x}")) && !null {
                if let Some(s) = &live {
                    let bad = match s.raw {
                        Some(v) => raw != v,
                        None => raw == POISON,
                    };
                    if bad {
                        self.contract("hetmem_stream_raw", "raw value", || {
                            format!("{raw:#x}, wrapped {:?}", s.raw)
                        });
                    }
                }
            }
        } else {
            // SAFETY: the handle is looked up.
            let rc = unsafe { hetmem_stream_synchronize(sh(h)) };
            self.check("hetmem_stream_synchronize", rc, &e, &|| format!("{h:#x}"));
        }
    }

    /// Destroys the stream in a slot (and shows its handle is dead after).
    pub(crate) fn destroy_stream(&mut self, sslot: usize) {
        let ss = &self.w.streams[sslot];
        let _r = write(&ss.raw);
        let _sl = write(&ss.life);
        let Some(s) = lock(&ss.st).clone() else {
            return;
        };
        if s.dying.swap(true, Ordering::SeqCst) {
            return; // a racing destroy has it
        }
        lock(&ss.st).take();
        // SAFETY: a live stream handle.
        let rc = unsafe { hetmem_stream_destroy(sh(s.handle)) };
        self.check("hetmem_stream_destroy", rc, &Expect::ok(), &|| {
            format!("{:#x}", s.handle)
        });
        remember(&mut lock(&self.w.dead).streams, s.handle);
        let mut e = Expect::ok();
        e.fault("dead handle", HETMEM_ERR_INVALID_HANDLE);
        // SAFETY: any handle value may be passed.
        let rc = unsafe { hetmem_stream_destroy(sh(s.handle)) };
        self.check("hetmem_stream_destroy", rc, &e, &|| {
            "destroyed twice".into()
        });
    }

    /// Destroys the stream in a slot while other threads may be using it (see the
    /// module docs of `capi`).
    fn destroy_stream_racing(&mut self, sslot: usize) {
        let ss = &self.w.streams[sslot];
        let _r = write(&ss.raw);
        let Some(s) = lock(&ss.st).clone() else {
            return;
        };
        if s.dying.swap(true, Ordering::SeqCst) {
            return;
        }
        // SAFETY: a live stream handle (no one else destroys it: the flag).
        let rc = unsafe { hetmem_stream_destroy(sh(s.handle)) };
        self.check("hetmem_stream_destroy", rc, &Expect::ok(), &|| {
            format!("{:#x}, racing its users", s.handle)
        });
        self.w.report.add_extra("racing_destroys", 1);
        let _sl = write(&ss.life);
        lock(&ss.st).take();
        remember(&mut lock(&self.w.dead).streams, s.handle);
    }

    /// Wraps the raw value of a live stream hetmem made (for its own device: fine; for
    /// another: refused), uses the wrapper, and lets it go.
    fn wrap_own_value(&mut self) {
        let sslot = self.rng.index(STREAM_SLOTS);
        let Some(mslot) = lock(&self.w.streams[sslot].st).as_ref().map(|s| s.mgr_slot) else {
            return;
        };
        let _ml = self.lock_mgrs(&[(mslot, false)]);
        let ss = &self.w.streams[sslot];
        // Its raw value is used as the caller's own: no racing destroy meanwhile.
        let _r = read(&ss.raw);
        let _sl = read(&ss.life);
        let Some(s) = lock(&ss.st).clone() else {
            return;
        };
        if s.dying.load(Ordering::SeqCst) {
            return;
        }
        let Some(info) = self.info(mslot).filter(|i| i.gen == s.mgr_gen) else {
            return;
        };
        let mut raw = 0usize;
        // SAFETY: a live stream handle; `raw` is valid.
        let rc = unsafe { hetmem_stream_raw(sh(s.handle), &mut raw) };
        if !self.check("hetmem_stream_raw", rc, &Expect::ok(), &|| {
            format!("{:#x}", s.handle)
        }) {
            return;
        }
        let mut e = Expect::ok();
        let device = if self.rng.chance(30) && info.devices > 1 {
            // 0, 1 and 2 name a stream of whichever device they are given with.
            if s.raw.is_none_or(|r| r > 2) {
                e.fault("a stream of another device", HETMEM_ERR_INVALID_ARGUMENT);
            }
            (s.device + 1) % info.devices
        } else {
            s.device
        };
        let mut out: *mut HetmemStream = std::ptr::without_provenance_mut(POISON);
        // SAFETY: a live manager; `raw` is a live stream of this manager's simulator
        // (kept live by the slot's lock) for `s.device`, checked by the simulator for
        // another device.
        let rc = unsafe { hetmem_stream_wrap(mh(info.handle), device as c_int, raw, &mut out) };
        if !self.check("hetmem_stream_wrap", rc, &e, &|| {
            format!("own raw {raw:#x} for device {device}")
        }) {
            if !out.is_null() {
                self.contract(
                    "hetmem_stream_wrap",
                    "*out not NULL after a failure",
                    || format!("{out:?}"),
                );
            }
            return;
        }
        let mut got = 0usize;
        // SAFETY: the wrapper just made.
        let rc = unsafe { hetmem_stream_raw(out, &mut got) };
        if self.check("hetmem_stream_raw", rc, &Expect::ok(), &|| "wrapper".into()) && got != raw {
            self.contract("hetmem_stream_raw", "wrapped value", || {
                format!("{got:#x} for {raw:#x}")
            });
        }
        // SAFETY: as above.
        let rc = unsafe { hetmem_stream_synchronize(out) };
        self.check("hetmem_stream_synchronize", rc, &Expect::ok(), &|| {
            "wrapper".into()
        });
        // SAFETY: as above.
        let rc = unsafe { hetmem_stream_destroy(out) };
        self.check("hetmem_stream_destroy", rc, &Expect::ok(), &|| {
            "wrapper".into()
        });
        remember(&mut lock(&self.w.dead).streams, out.addr());
        // The stream wrapped is still live.
        // SAFETY: a live stream handle.
        let rc = unsafe { hetmem_stream_synchronize(sh(s.handle)) };
        self.check("hetmem_stream_synchronize", rc, &Expect::ok(), &|| {
            "after its wrapper went".into()
        });
    }

    /// A live stream handle given to hetmem_manager_destroy is refused and stays live.
    fn stream_to_manager_destroy(&mut self) {
        let sslot = self.rng.index(STREAM_SLOTS);
        let ss = &self.w.streams[sslot];
        let _sl = read(&ss.life);
        let Some(s) = lock(&ss.st).clone() else {
            return;
        };
        self.uses(&s.dying);
        let mut e = Expect::ok();
        e.fault("handle of another kind", HETMEM_ERR_INVALID_HANDLE);
        // SAFETY: any handle value may be passed.
        let rc = unsafe { hetmem_manager_destroy(mh(s.handle)) };
        self.check("hetmem_manager_destroy", rc, &e, &|| {
            "a stream handle".into()
        });
        // SAFETY: a live stream handle.
        let rc = unsafe { hetmem_stream_synchronize(sh(s.handle)) };
        self.check("hetmem_stream_synchronize", rc, &Expect::ok(), &|| {
            "after hetmem_manager_destroy refused it".into()
        });
    }
}
