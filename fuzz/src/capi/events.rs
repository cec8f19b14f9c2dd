//! Events: made on a manager's device (or a device it does not have), recorded on
//! streams of their own manager and device (and on others', refused), waited for by
//! streams of any device of their manager (and refused to another manager's),
//! queried, synchronised (after which a query says done), destroyed (racing their
//! users too).

use std::ffi::c_int;
use std::sync::atomic::Ordering;

use hetmem::ffi::event::*;
use hetmem::ffi::memory::*;
use hetmem::ffi::*;

use super::mem::{StreamArg, POISON};
use super::{
    eh, lock, mh, read, remember, write, EventInfo, Expect, HandleKind, Thread, EVENT_SLOTS,
};

impl<'w> Thread<'w> {
    pub(crate) fn op_events(&mut self) {
        match self.rng.below(12) {
            0 | 1 => self.make_event(),
            2..=4 => self.record_event(),
            5 | 6 => self.wait_event(),
            7 | 8 => self.query_event(),
            9 => {
                let slot = self.rng.index(EVENT_SLOTS);
                if self.rng.chance(50) {
                    self.destroy_event_racing(slot);
                } else {
                    self.destroy_event(slot);
                }
            }
            _ => self.sync_event(),
        }
    }

    /// The live event of a slot, its lock held shared; or a bad handle and its code.
    fn event_arg(&mut self, slot: usize) -> EventArg<'w> {
        let w: &'w super::World = self.w;
        let es = &w.events[slot];
        let g = read(&es.life);
        let live = lock(&es.st).clone();
        match live {
            Some(i) if self.rng.chance(90) => {
                self.uses(&i.dying);
                let h = i.handle;
                (Some(i), h, None, g)
            }
            _ => {
                let (h, what, code) = self.bad_handle(HandleKind::Event);
                (None, h, Some((what, code)), g)
            }
        }
    }

    fn make_event(&mut self) {
        let mslot = self.pick_mgr();
        let _ml = self.lock_mgrs(&[(mslot, false)]);
        let Some(info) = self.info(mslot) else {
            return;
        };
        let slot = self.rng.index(EVENT_SLOTS);
        let es = &self.w.events[slot];
        let _el = write(&es.life);
        let keep = lock(&es.st).is_none();
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
                e.fault("a host-only manager", HETMEM_ERR_UNKNOWN_DEVICE);
                0
            }
            _ => self.rng.index(devices) as c_int,
        };
        let out_null = self.rng.chance(4);
        if out_null {
            e.fault("out NULL", HETMEM_ERR_NULL_POINTER);
        }
        let mut out: *mut HetmemEvent = std::ptr::without_provenance_mut(POISON);
        let op: *mut *mut HetmemEvent = if out_null {
            std::ptr::null_mut()
        } else {
            &mut out
        };
        // SAFETY: a live manager; `op` is NULL or valid.
        let rc = unsafe { hetmem_event_create(mh(info.handle), device, op) };
        let ok = self.check("hetmem_event_create", rc, &e, &|| {
            format!("device {device}")
        });
        if !ok {
            if !out_null && !out.is_null() {
                self.contract(
                    "hetmem_event_create",
                    "*out not NULL after a failure",
                    || format!("{out:?}"),
                );
            }
            return;
        }
        if out_null {
            return;
        }
        // Never recorded: it counts as passed.
        let mut done: c_int = -1;
        // SAFETY: the event just made; `done` is valid.
        let rc = unsafe { hetmem_event_query(out, &mut done) };
        if self.check("hetmem_event_query", rc, &Expect::ok(), &|| "new".into()) && done != 1 {
            self.contract("hetmem_event_query", "a new event not done", || {
                done.to_string()
            });
        }
        let ev = EventInfo {
            handle: out.addr(),
            mgr_gen: info.gen,
            device: device as usize,
            dying: Default::default(),
        };
        if keep {
            *lock(&es.st) = Some(ev);
        } else {
            // SAFETY: the event just made.
            let rc = unsafe { hetmem_event_destroy(out) };
            self.check("hetmem_event_destroy", rc, &Expect::ok(), &|| "new".into());
            remember(&mut lock(&self.w.dead).events, ev.handle);
        }
    }

    /// The faults of a stream argument that must not be NULL.
    fn required_stream(&self, s: &StreamArg, e: &mut Expect) {
        if let StreamArg::None = s {
            e.fault("NULL stream", HETMEM_ERR_NULL_POINTER);
        }
    }

    /// A live stream of manager `gen` (and `device`), its lock held, most of the time;
    /// else any stream argument.
    fn stream_near(&mut self, slot: usize, same_device: bool) -> StreamArg<'w> {
        let w: &'w super::World = self.w;
        let peek = lock(&w.events[slot].st).clone();
        if let Some(ev) = peek.filter(|_| self.rng.chance(70)) {
            let fits: Vec<usize> = (0..super::STREAM_SLOTS)
                .filter(|&i| {
                    lock(&w.streams[i].st).as_ref().is_some_and(|s| {
                        s.mgr_gen == ev.mgr_gen && (!same_device || s.device == ev.device)
                    })
                })
                .collect();
            if !fits.is_empty() {
                let ss = &w.streams[fits[self.rng.index(fits.len())]];
                let g = read(&ss.life);
                if let Some(i) = lock(&ss.st).clone() {
                    self.uses(&i.dying);
                    return StreamArg::Live(i, g);
                }
            }
        }
        self.stream_arg(8)
    }

    fn record_event(&mut self) {
        let slot = self.rng.index(EVENT_SLOTS);
        let stream = self.stream_near(slot, true);
        let (ev, h, bad, _g) = self.event_arg(slot);
        let mut e = Expect::ok();
        self.required_stream(&stream, &mut e);
        if let Some((what, code)) = bad {
            e.fault(what, code);
        }
        match (&ev, &stream) {
            (Some(ev), _) => {
                let device = ev.device;
                stream.faults(ev.mgr_gen, Some(&|d: usize| d == device), &mut e);
            }
            (None, StreamArg::Bad(_, what, code)) => {
                e.fault(what, *code);
            }
            _ => {}
        }
        // SAFETY: the handles are looked up.
        let rc = unsafe { hetmem_event_record(eh(h), stream.ptr()) };
        self.check("hetmem_event_record", rc, &e, &|| {
            format!("event {h:#x} {ev_desc}", ev_desc = describe(&ev))
        });
    }

    fn wait_event(&mut self) {
        let slot = self.rng.index(EVENT_SLOTS);
        let stream = self.stream_near(slot, false);
        let (ev, h, bad, _g) = self.event_arg(slot);
        let mut e = Expect::ok();
        self.required_stream(&stream, &mut e);
        if let Some((what, code)) = bad {
            e.fault(what, code);
        }
        match (&stream, &ev) {
            (StreamArg::Live(s, _), Some(ev)) if s.mgr_gen != ev.mgr_gen => {
                e.fault("an event of another manager", HETMEM_ERR_FOREIGN_HANDLE);
            }
            (StreamArg::Bad(_, what, code), _) => {
                e.fault(what, *code);
            }
            _ => {}
        }
        // SAFETY: the handles are looked up.
        let rc = unsafe { hetmem_stream_wait_event(stream_ptr(&stream), eh(h)) };
        self.check("hetmem_stream_wait_event", rc, &e, &|| {
            format!("event {h:#x} {}", describe(&ev))
        });
    }

    fn query_event(&mut self) {
        let slot = self.rng.index(EVENT_SLOTS);
        let (ev, h, bad, _g) = self.event_arg(slot);
        let mut e = Expect::ok();
        if let Some((what, code)) = bad {
            e.fault(what, code);
        }
        let null = self.rng.chance(8);
        if null {
            e.fault("done NULL", HETMEM_ERR_NULL_POINTER);
        }
        let mut done: c_int = -1;
        let dp: *mut c_int = if null {
            std::ptr::null_mut()
        } else {
            &mut done
        };
        // SAFETY: the handle is looked up; `dp` is NULL or valid.
        let rc = unsafe { hetmem_event_query(eh(h), dp) };
        if self.check("hetmem_event_query", rc, &e, &|| describe(&ev))
            && !null
            && !(0..=1).contains(&done)
        {
            self.contract("hetmem_event_query", "done", || done.to_string());
        }
    }

    /// Synchronises an event, then (no one records it meanwhile: the slot's lock is
    /// held exclusively) a query must say done.
    fn sync_event(&mut self) {
        let slot = self.rng.index(EVENT_SLOTS);
        let es = &self.w.events[slot];
        let _el = write(&es.life);
        let live = lock(&es.st).clone();
        let mut e = Expect::ok();
        let h = match &live {
            Some(i) if self.rng.chance(90) => {
                self.uses(&i.dying);
                i.handle
            }
            _ => {
                let (h, what, code) = self.bad_handle(HandleKind::Event);
                e.fault(what, code);
                h
            }
        };
        // SAFETY: the handle is looked up.
        let rc = unsafe { hetmem_event_synchronize(eh(h)) };
        if !self.check("hetmem_event_synchronize", rc, &e, &|| describe(&live)) || !e.ok {
            return;
        }
        let mut done: c_int = -1;
        // SAFETY: as above; `done` is valid.
        let rc = unsafe { hetmem_event_query(eh(h), &mut done) };
        if self.check("hetmem_event_query", rc, &Expect::ok(), &|| {
            "after synchronize".into()
        }) && done != 1
        {
            self.contract("hetmem_event_query", "not done after synchronize", || {
                done.to_string()
            });
        }
    }

    pub(crate) fn destroy_event(&mut self, slot: usize) {
        let es = &self.w.events[slot];
        let _el = write(&es.life);
        let Some(ev) = lock(&es.st).clone() else {
            return;
        };
        if ev.dying.swap(true, Ordering::SeqCst) {
            return;
        }
        lock(&es.st).take();
        // SAFETY: a live event handle.
        let rc = unsafe { hetmem_event_destroy(eh(ev.handle)) };
        self.check("hetmem_event_destroy", rc, &Expect::ok(), &|| {
            describe(&Some(ev.clone()))
        });
        remember(&mut lock(&self.w.dead).events, ev.handle);
        let mut e = Expect::ok();
        e.fault("dead handle", HETMEM_ERR_INVALID_HANDLE);
        // SAFETY: any handle value may be passed.
        let rc = unsafe { hetmem_event_synchronize(eh(ev.handle)) };
        self.check("hetmem_event_synchronize", rc, &e, &|| "destroyed".into());
    }

    fn destroy_event_racing(&mut self, slot: usize) {
        let es = &self.w.events[slot];
        let Some(ev) = lock(&es.st).clone() else {
            return;
        };
        if ev.dying.swap(true, Ordering::SeqCst) {
            return;
        }
        // SAFETY: a live event handle (no one else destroys it: the flag).
        let rc = unsafe { hetmem_event_destroy(eh(ev.handle)) };
        self.check("hetmem_event_destroy", rc, &Expect::ok(), &|| {
            "racing its users".into()
        });
        self.w.report.add_extra("racing_destroys", 1);
        let _el = write(&es.life);
        lock(&es.st).take();
        remember(&mut lock(&self.w.dead).events, ev.handle);
    }
}

/// An event argument: the live event (if it is one), the handle passed, the fault and
/// its code (if it is not), and the slot's lock.
type EventArg<'w> = (
    Option<EventInfo>,
    usize,
    Option<(&'static str, c_int)>,
    std::sync::RwLockReadGuard<'w, ()>,
);

fn describe(ev: &Option<EventInfo>) -> String {
    match ev {
        Some(e) => format!("(manager gen {}, device {})", e.mgr_gen, e.device),
        None => "(not live)".into(),
    }
}

fn stream_ptr(s: &StreamArg) -> *mut HetmemStream {
    match s {
        StreamArg::None => std::ptr::null_mut(),
        _ => s.ptr(),
    }
}
