//! Stats, and every call with a bad handle.

use std::ffi::{c_char, c_int, c_void, CStr};

use hetmem::ffi::memory::*;
use hetmem::ffi::stats::*;
use hetmem::ffi::tier::*;
use hetmem::ffi::*;

use super::{addr_ptr, gh, lock, mh, read, sh, th, Expect, HandleKind, Thread, STORE_SLOTS};

use super::mem::*;

impl Thread<'_> {
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

pub(crate) fn last_error_str() -> String {
    super::last_error()
}
