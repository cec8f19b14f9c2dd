//! The tier store through `hetmem_store_*`: stores over the simulated managers with
//! budgets far below their parameters, registration (bytes and safetensors files) and
//! look-ups; using the stores (hints, acquires, guards, reads) is in `store_use.rs`.

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A store handle destroyed.
struct DeadStore {
    handle: usize,
}

use hetmem::ffi::tier::*;
use hetmem::ffi::*;

use super::mem::POISON;
use super::{lock, mh, read, remember, th, write, Expect, Param, StoreInfo, Thread, STORE_SLOTS};

/// Parameters per store, at most.
const MAX_PARAMS: usize = 16;
/// Guards held on one store at once, at most.
pub(crate) const MAX_GUARDS: usize = 3;

impl Thread<'_> {
    /// A store slot and its live store, its lock held shared.
    pub(crate) fn with_store<R>(
        &mut self,
        f: impl FnOnce(&mut Self, usize, &StoreInfo) -> R,
    ) -> Option<R> {
        let slot = self.rng.index(STORE_SLOTS);
        let w = self.w;
        let ss = &w.stores[slot];
        let _l = read(&ss.life);
        let st = lock(&ss.st);
        let info = st.as_ref()?;
        // A snapshot: registrations take the lock exclusively, so it cannot change.
        let snap = StoreInfo {
            handle: info.handle,
            mgr_gen: info.mgr_gen,
            mgr_slot: info.mgr_slot,
            device: info.device,
            device_budget: info.device_budget,
            params: info.params.clone(),
            dying: info.dying.clone(),
        };
        drop(st);
        self.uses(&snap.dying);
        Some(f(self, slot, &snap))
    }

    pub(crate) fn op_store_lifecycle(&mut self) {
        let slot = self.rng.index(STORE_SLOTS);
        let live = lock(&self.w.stores[slot].st).is_some();
        if live && self.rng.chance(10) {
            self.destroy_store_racing(slot);
        } else if live && self.rng.chance(20) {
            self.verify_store(slot);
            self.destroy_store(slot);
        } else if !live || self.rng.chance(30) {
            self.create_store(slot);
        }
    }

    /// hetmem_store_create with a valid or a bad configuration; a store made goes into
    /// the slot if it is empty, else is destroyed at once.
    fn create_store(&mut self, slot: usize) {
        let mslot = self.pick_mgr();
        let _ml = self.lock_mgrs(&[(mslot, false)]);
        let Some(info) = self.info(mslot) else {
            return;
        };
        let ss = &self.w.stores[slot];
        let _sl = write(&ss.life);
        let keep = lock(&ss.st).is_none();
        let mut e = Expect::ok();
        let device_budget = (64usize << 10) << self.rng.below(5);
        let slot_size = (32usize << 10) << self.rng.below(3);
        let slots = 2 + self.rng.index(3);
        let ring = slots * slot_size;
        let host_budget = ring + self.rng.index(2 << 20);
        let mut cfg = std::mem::MaybeUninit::<HetmemStoreConfig>::uninit();
        // SAFETY: `cfg` is valid for a write.
        let rc = unsafe { hetmem_store_config_init(cfg.as_mut_ptr(), device_budget, host_budget) };
        if !self.check("hetmem_store_config_init", rc, &Expect::ok(), &|| "".into()) {
            return;
        }
        // SAFETY: initialised by the successful call.
        let mut c = unsafe { cfg.assume_init() };
        c.staging_slots = slots;
        c.staging_slot_size = slot_size;
        c.staging_threads = 1 + self.rng.index(3);
        c.checksums = self.rng.chance(60) as c_int;
        c.sequence = self.rng.below(2) as c_int;
        c.planner = self.rng.below(2) as c_int;
        c.spare_slots = 1 + self.rng.index(2);
        c.prefetch_depth = self.rng.pick(&[0, 1, 2, 4, usize::MAX]);
        c.device = if info.devices > 0 {
            self.rng.index(info.devices) as c_int
        } else {
            e.fault("a host-only manager", HETMEM_ERR_UNKNOWN_DEVICE)
                .env(HETMEM_ERR_UNSUPPORTED);
            0
        };
        let mut cfg_null = false;
        let mut out_null = false;
        match self.rng.below(30) {
            0 => {
                e.fault("device budget 0", HETMEM_ERR_INVALID_ARGUMENT);
                c.device_budget = 0;
            }
            1 => {
                e.fault("host budget below the ring", HETMEM_ERR_INVALID_ARGUMENT);
                c.host_budget = ring - 1;
            }
            2 => {
                e.fault("unknown sequence mode", HETMEM_ERR_INVALID_ARGUMENT);
                c.sequence = self.rng.pick(&[2, -1, 99]);
            }
            3 => {
                e.fault("unknown planner", HETMEM_ERR_INVALID_ARGUMENT);
                c.planner = self.rng.pick(&[2, -1, 99]);
            }
            4 => {
                e.fault("negative device", HETMEM_ERR_INVALID_ARGUMENT);
                c.device = -1;
            }
            5 => {
                e.fault("unknown device", HETMEM_ERR_UNKNOWN_DEVICE);
                c.device = info.devices as c_int + 1;
            }
            6 => {
                e.fault("no spare slot", HETMEM_ERR_INVALID_ARGUMENT);
                c.spare_slots = 0;
            }
            7 => {
                e.fault("one staging slot", HETMEM_ERR_INVALID_ARGUMENT);
                c.staging_slots = self.rng.below(2) as usize;
            }
            8 => {
                e.fault("staging slots of 0 bytes", HETMEM_ERR_INVALID_SIZE);
                c.staging_slot_size = 0;
            }
            9 => {
                e.fault("no staging thread", HETMEM_ERR_INVALID_ARGUMENT);
                c.staging_threads = 0;
            }
            10 => {
                e.fault("cfg NULL", HETMEM_ERR_NULL_POINTER);
                cfg_null = true;
            }
            11 => {
                e.fault("out NULL", HETMEM_ERR_NULL_POINTER);
                out_null = true;
            }
            12 if info.devices > 0 => {
                e.fault(
                    "a device budget over the device's memory",
                    HETMEM_ERR_INVALID_ARGUMENT,
                );
                c.device_budget = info.totals[c.device as usize] + 1;
            }
            13 => {
                e.edge("a host budget of SIZE_MAX", HETMEM_ERR_OUT_OF_MEMORY);
                c.host_budget = usize::MAX;
            }
            14 => {
                // A ring larger than any host's memory, or than the address space: refused
                // before a slot is pinned (issue 15: it pinned until the OOM killer came).
                e.fault("a ring of a petabyte", HETMEM_ERR_OUT_OF_MEMORY)
                    .env(HETMEM_ERR_INVALID_SIZE);
                c.staging_slots = 1 << self.rng.pick(&[30, 40, 50]);
                c.staging_slot_size = 1 << 20;
                c.host_budget = usize::MAX;
            }
            15 => {
                e.fault("a staging slot over SSIZE_MAX", HETMEM_ERR_INVALID_SIZE);
                c.staging_slot_size = isize::MAX as usize + 1;
                c.host_budget = usize::MAX;
            }
            16 => {
                // More filler threads than anyone can start: fillers never outnumber the
                // slots, and the caller fills for those that cannot start (issue 15:
                // thread exhaustion panicked).
                c.staging_threads = self.rng.pick(&[1000, 100_000, usize::MAX]);
            }
            _ => {}
        }
        let mut out: *mut HetmemStore = std::ptr::without_provenance_mut(POISON);
        let op: *mut *mut HetmemStore = if out_null {
            std::ptr::null_mut()
        } else {
            &mut out
        };
        let cp: *const HetmemStoreConfig = if cfg_null { std::ptr::null() } else { &c };
        // SAFETY: a live manager; `cp` and `op` are NULL or valid.
        let rc = unsafe { hetmem_store_create(mh(info.handle), cp, op) };
        let ok = self.check("hetmem_store_create", rc, &e, &|| format!("{c:?}"));
        if !ok {
            if !out_null && !out.is_null() {
                self.contract(
                    "hetmem_store_create",
                    "*out not NULL after a failure",
                    || format!("{out:?}"),
                );
            }
            return;
        }
        if out_null {
            return;
        }
        let s = StoreInfo {
            handle: out.addr(),
            mgr_gen: info.gen,
            mgr_slot: mslot,
            device: c.device as usize,
            device_budget: c.device_budget,
            params: Vec::new(),
            dying: Default::default(),
        };
        if keep {
            *lock(&ss.st) = Some(s);
            ss.guards.store(0, Ordering::Relaxed);
        } else {
            // SAFETY: the store just made.
            let rc = unsafe { hetmem_store_destroy(out) };
            self.check("hetmem_store_destroy", rc, &Expect::ok(), &|| "new".into());
            remember(&mut lock(&self.w.dead).stores, s.handle);
        }
    }

    /// Destroys the store in a slot (its guards stay usable).
    pub(crate) fn destroy_store(&mut self, slot: usize) {
        let ss = &self.w.stores[slot];
        let _sl = write(&ss.life);
        let Some((h, dying)) = lock(&ss.st).as_ref().map(|s| (s.handle, s.dying.clone())) else {
            return;
        };
        if dying.swap(true, Ordering::SeqCst) {
            return; // a racing destroy has it
        }
        lock(&ss.st).take();
        let s = DeadStore { handle: h };
        // SAFETY: a live store handle.
        let rc = unsafe { hetmem_store_destroy(th(s.handle)) };
        self.check("hetmem_store_destroy", rc, &Expect::ok(), &|| {
            format!("{:#x}", s.handle)
        });
        remember(&mut lock(&self.w.dead).stores, s.handle);
        let mut e = Expect::ok();
        e.fault("dead handle", HETMEM_ERR_INVALID_HANDLE);
        let mut size = 0usize;
        // SAFETY: any handle value may be passed; `size` is valid.
        let rc = unsafe { hetmem_store_param_size(th(s.handle), 0, &mut size) };
        self.check("hetmem_store_param_size", rc, &e, &|| {
            "destroyed store".into()
        });
    }

    /// Destroys the store in a slot while other threads may be using it (see the
    /// module docs of `capi`); its guards stay usable.
    fn destroy_store_racing(&mut self, slot: usize) {
        let ss = &self.w.stores[slot];
        let Some((h, dying)) = lock(&ss.st).as_ref().map(|s| (s.handle, s.dying.clone())) else {
            return;
        };
        if dying.swap(true, Ordering::SeqCst) {
            return;
        }
        // SAFETY: a live store handle (no one else destroys it: the flag).
        let rc = unsafe { hetmem_store_destroy(th(h)) };
        self.check("hetmem_store_destroy", rc, &Expect::ok(), &|| {
            format!("{h:#x}, racing its users")
        });
        self.w.report.add_extra("racing_destroys", 1);
        let _sl = write(&ss.life);
        lock(&ss.st).take();
        remember(&mut lock(&self.w.dead).stores, h);
    }

    /// Reads every parameter of the store in a slot back.
    pub(crate) fn verify_store(&mut self, slot: usize) {
        let ss = &self.w.stores[slot];
        let _sl = read(&ss.life);
        let Some((h, params, dying)) = lock(&ss.st)
            .as_ref()
            .map(|s| (s.handle, s.params.clone(), s.dying.clone()))
        else {
            return;
        };
        self.uses(&dying);
        for (id, p) in params.iter().enumerate() {
            self.read_param(h, id as u32, p);
        }
    }

    /// hetmem_store_read of a parameter, compared with its bytes.
    pub(crate) fn read_param(&mut self, h: usize, id: u32, p: &Param) {
        let mut out = vec![0u8; p.bytes.len()];
        // SAFETY: a live store; `out` holds the parameter's size.
        let rc = unsafe { hetmem_store_read(th(h), id, out.as_mut_ptr().cast(), out.len()) };
        if self.check("hetmem_store_read", rc, &Expect::ok(), &|| {
            format!("id {id}")
        }) {
            self.compare("hetmem_store_read", "parameter bytes", &out, &p.bytes);
        }
    }

    pub(crate) fn op_store_register(&mut self) {
        let slot = self.rng.index(STORE_SLOTS);
        let ss = &self.w.stores[slot];
        match self.rng.below(10) {
            0..=5 => {
                let _sl = write(&ss.life);
                let Some(s) = lock(&ss.st).as_ref().map(|s| {
                    self.uses(&s.dying);
                    (s.handle, s.device_budget, s.params.len(), s.params.clone())
                }) else {
                    return;
                };
                if s.2 >= MAX_PARAMS {
                    return;
                }
                self.register(slot, s.0, s.1, &s.3);
            }
            6 => {
                let _sl = write(&ss.life);
                let Some(s) = lock(&ss.st).as_ref().map(|s| {
                    self.uses(&s.dying);
                    (s.handle, s.device_budget, s.params.len())
                }) else {
                    return;
                };
                if s.2 >= MAX_PARAMS {
                    return;
                }
                self.register_file(slot, s.0, s.1);
            }
            _ => {
                self.with_store(|me, _, s| me.lookup(s));
            }
        }
    }

    /// hetmem_store_register (the store's lock is held exclusively: ids are assigned
    /// in order).
    fn register(&mut self, slot: usize, h: usize, budget: usize, params: &[Param]) {
        let mut e = Expect::ok();
        let fresh = format!("p{}", self.w.names.fetch_add(1, Ordering::Relaxed));
        let name: CString = match self.rng.below(14) {
            0 if !params.is_empty() => {
                e.fault("a name taken", HETMEM_ERR_INVALID_ARGUMENT);
                CString::new(params[self.rng.index(params.len())].name.clone()).expect("no NUL")
            }
            1 => {
                e.fault("a name not UTF-8", HETMEM_ERR_INVALID_ARGUMENT);
                CString::new(vec![b'p', 0xff, 0xfe]).expect("no NUL")
            }
            _ => CString::new(fresh.clone()).expect("no NUL"),
        };
        let mut n = self.rng.size(budget / 3);
        let data = self.rng.bytes(n);
        let mut np: *const c_char = name.as_ptr();
        let mut dp: *const c_void = data.as_ptr().cast();
        let mut id: u32 = u32::MAX;
        let mut ip: *mut u32 = &mut id;
        match self.rng.below(16) {
            0 => {
                e.fault("size 0", HETMEM_ERR_INVALID_SIZE);
                n = 0;
            }
            1 => {
                e.fault("larger than the device budget", HETMEM_ERR_OUT_OF_MEMORY);
                n = budget + 1;
            }
            2 => {
                e.fault("size SIZE_MAX", HETMEM_ERR_INVALID_SIZE);
                n = usize::MAX;
            }
            3 => {
                e.fault("name NULL", HETMEM_ERR_NULL_POINTER);
                np = std::ptr::null();
            }
            4 => {
                e.fault("data NULL", HETMEM_ERR_NULL_POINTER);
                dp = std::ptr::null();
            }
            5 => {
                e.fault("id NULL", HETMEM_ERR_NULL_POINTER);
                ip = std::ptr::null_mut();
            }
            _ => {}
        }
        let big;
        if n == budget + 1 {
            big = vec![7u8; n];
            dp = big.as_ptr().cast();
        }
        // SAFETY: a live store; `np` is NULL or a C string; `dp` is NULL or holds `n`
        // bytes (SIZE_MAX aside: refused before any read, the conventions say); `ip` is
        // NULL or valid.
        let rc = unsafe { hetmem_store_register(th(h), np, dp, n, ip) };
        let ok = self.check("hetmem_store_register", rc, &e, &|| {
            format!("{name:?}, {n} bytes")
        });
        if !ok || !e.ok {
            return;
        }
        if id as usize != params.len() {
            self.contract("hetmem_store_register", "id out of order", || {
                format!("id {id}, {} registered before", params.len())
            });
        }
        if let Some(s) = lock(&self.w.stores[slot].st).as_mut() {
            s.params.push(Param {
                name: fresh,
                bytes: Arc::new(data),
            });
        }
    }

    /// hetmem_store_register_safetensors with a file of a few tensors, a malformed
    /// one, or one that is not there.
    fn register_file(&mut self, slot: usize, h: usize, budget: usize) {
        let k = self.w.names.fetch_add(1, Ordering::Relaxed);
        let path = self.w.dir.join(format!("m{k}.safetensors"));
        let count = 1 + self.rng.index(3);
        let mut tensors: Vec<(String, Vec<u8>)> = (0..count)
            .map(|i| {
                let size = self.rng.size(budget / 3);
                (format!("f{k}.{i}"), self.rng.bytes(size))
            })
            .collect();
        let mut e = Expect::ok();
        if self.rng.chance(15) {
            // A tensor of no elements: an empty parameter (issue 15: it was refused, and
            // the file half registered).
            tensors.push((format!("f{k}.empty"), Vec::new()));
        }
        let params: Vec<Param> = lock(&self.w.stores[slot].st)
            .as_ref()
            .map(|s| s.params.clone())
            .unwrap_or_default();
        match self.rng.below(12) {
            0 if !params.is_empty() => {
                // All or none: a name taken, last in the file, and nothing registers.
                let taken = params[self.rng.index(params.len())].name.clone();
                tensors.push((taken, vec![1]));
                e.fault("a tensor's name taken", HETMEM_ERR_INVALID_ARGUMENT);
            }
            1 => {
                tensors.push((format!("f{k}.big"), vec![2; budget + 1]));
                e.fault(
                    "a tensor larger than the device budget",
                    HETMEM_ERR_OUT_OF_MEMORY,
                );
            }
            _ => {}
        }
        let specs: Vec<(&str, &str, Vec<usize>, &[u8])> = tensors
            .iter()
            .map(|(n, d)| (n.as_str(), "U8", vec![d.len()], d.as_slice()))
            .collect();
        let refs: Vec<hetmem::tier::source::TensorSpec<'_>> = specs
            .iter()
            .map(|(n, t, s, d)| (*n, *t, s.as_slice(), *d))
            .collect();
        if let Err(err) = hetmem::tier::source::write_safetensors(&path, &refs) {
            self.contract("write_safetensors", "fixture", || err.to_string());
            return;
        }
        let n = tensors.len();
        let mut cap = n + self.rng.index(2);
        let mut ids = vec![u32::MAX; cap.max(1)];
        let mut idp = ids.as_mut_ptr();
        let mut got: usize = POISON;
        let mut gp: *mut usize = &mut got;
        let cpath = CString::new(path.to_string_lossy().into_owned()).expect("no NUL");
        let mut pp = cpath.as_ptr();
        let missing = CString::new(
            self.w
                .dir
                .join("missing.safetensors")
                .to_string_lossy()
                .into_owned(),
        )
        .expect("no NUL");
        let bad = self.w.dir.join(format!("bad{k}.safetensors"));
        let bad_c = CString::new(bad.to_string_lossy().into_owned()).expect("no NUL");
        let fifo = CString::new(self.w.fifo.to_string_lossy().into_owned()).expect("no NUL");
        let dir = CString::new(self.w.dir.to_string_lossy().into_owned()).expect("no NUL");
        match self.rng.below(14) {
            0 => {
                e.fault("a file that is not there", HETMEM_ERR_CONFIG);
                pp = missing.as_ptr();
            }
            6 => {
                // Issue 15: opening a FIFO blocked for good.
                e.fault("a FIFO", HETMEM_ERR_CONFIG);
                pp = fifo.as_ptr();
            }
            7 => {
                e.fault("a directory", HETMEM_ERR_CONFIG);
                pp = dir.as_ptr();
            }
            1 => {
                e.fault("a malformed file", HETMEM_ERR_CONFIG);
                let mut junk = self.rng.bytes(64);
                junk[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                std::fs::write(&bad, junk).expect("a scratch file");
                pp = bad_c.as_ptr();
            }
            2 => {
                e.fault("room for fewer ids", HETMEM_ERR_BUFFER_TOO_SMALL);
                cap = n - 1;
                if cap == 0 {
                    idp = std::ptr::null_mut();
                }
            }
            3 => {
                e.fault("ids NULL", HETMEM_ERR_NULL_POINTER);
                idp = std::ptr::null_mut();
            }
            4 => {
                e.fault("count NULL", HETMEM_ERR_NULL_POINTER);
                gp = std::ptr::null_mut();
            }
            5 => {
                e.fault("path NULL", HETMEM_ERR_NULL_POINTER);
                pp = std::ptr::null();
            }
            _ => {}
        }
        let before = lock(&self.w.stores[slot].st)
            .as_ref()
            .map_or(0, |s| s.params.len());
        // SAFETY: a live store; `pp` NULL or a C string; `idp` NULL or valid for `cap`
        // ids; `gp` NULL or valid.
        let rc = unsafe { hetmem_store_register_safetensors(th(h), pp, idp, cap, gp) };
        let ok = self.check("hetmem_store_register_safetensors", rc, &e, &|| {
            format!("{} tensors, cap {cap}", n)
        });
        let _ = std::fs::remove_file(&bad);
        if rc == HETMEM_ERR_BUFFER_TOO_SMALL && got != n {
            self.contract(
                "hetmem_store_register_safetensors",
                "count with too small a buffer",
                || format!("{got}, the file has {n}"),
            );
        }
        // All or none: every tensor on success, none on a failure (*count 0, but for
        // too small an `ids`).
        let registered = if ok {
            if got != n {
                self.contract("hetmem_store_register_safetensors", "count", || {
                    format!("{got} of {n}")
                });
            }
            n
        } else {
            if rc != HETMEM_ERR_BUFFER_TOO_SMALL && !gp.is_null() && got != 0 {
                self.contract(
                    "hetmem_store_register_safetensors",
                    "count after a failure",
                    || format!("{got} (rc {rc})"),
                );
            }
            0
        };
        let mut size = 0usize;
        // SAFETY: a live store; `size` is valid.
        let after =
            unsafe { hetmem_store_param_size(th(h), before as u32 + registered as u32, &mut size) };
        let mut e = Expect::ok();
        e.fault("an id past those registered", HETMEM_ERR_UNKNOWN_PARAM);
        self.check("hetmem_store_param_size", after, &e, &|| {
            format!(
                "id {} after registering {registered} of {n} tensors",
                before + registered
            )
        });
        if let Some(s) = lock(&self.w.stores[slot].st).as_mut() {
            for (i, (name, bytes)) in tensors.into_iter().take(registered).enumerate() {
                if ids[i] as usize != before + i {
                    self.contract("hetmem_store_register_safetensors", "ids", || {
                        format!("id {} for tensor {i}, {before} registered before", ids[i])
                    });
                }
                s.params.push(Param {
                    name,
                    bytes: Arc::new(bytes),
                });
            }
        }
        let _ = std::fs::remove_file(&path);
    }

    /// hetmem_store_lookup and hetmem_store_param_size.
    fn lookup(&mut self, s: &StoreInfo) {
        let mut e = Expect::ok();
        let known = (!s.params.is_empty()).then(|| self.rng.index(s.params.len()));
        if self.rng.chance(50) {
            let name = match known {
                Some(i) if self.rng.chance(75) => {
                    CString::new(s.params[i].name.clone()).expect("no NUL")
                }
                _ => {
                    e.fault("an unknown name", HETMEM_ERR_UNKNOWN_PARAM);
                    c"no such parameter".to_owned()
                }
            };
            let mut id = u32::MAX;
            let null = self.rng.chance(8);
            if null {
                e.fault("id NULL", HETMEM_ERR_NULL_POINTER);
            }
            let ip: *mut u32 = if null { std::ptr::null_mut() } else { &mut id };
            // SAFETY: a live store; a C string; `ip` NULL or valid.
            let rc = unsafe { hetmem_store_lookup(th(s.handle), name.as_ptr(), ip) };
            if self.check("hetmem_store_lookup", rc, &e, &|| format!("{name:?}"))
                && !null
                && known.map(|k| k as u32) != Some(id)
            {
                self.contract("hetmem_store_lookup", "id", || {
                    format!("{name:?} -> {id}, want {known:?}")
                });
            }
        } else {
            let id = match known {
                Some(i) if self.rng.chance(80) => i as u32,
                _ => {
                    e.fault("an unknown id", HETMEM_ERR_UNKNOWN_PARAM);
                    self.rng.pick(&[s.params.len() as u32, u32::MAX, 1 << 20])
                }
            };
            let mut size = 0usize;
            let null = self.rng.chance(8);
            if null {
                e.fault("size NULL", HETMEM_ERR_NULL_POINTER);
            }
            let sp: *mut usize = if null {
                std::ptr::null_mut()
            } else {
                &mut size
            };
            // SAFETY: a live store; `sp` NULL or valid.
            let rc = unsafe { hetmem_store_param_size(th(s.handle), id, sp) };
            if self.check("hetmem_store_param_size", rc, &e, &|| format!("id {id}")) && !null {
                let want = s.params[id as usize].bytes.len();
                if size != want {
                    self.contract("hetmem_store_param_size", "size", || {
                        format!("{size}, want {want}")
                    });
                }
            }
        }
    }

    /// An id of the store: mostly registered, sometimes not.
    pub(crate) fn param_id(&mut self, s: &StoreInfo, e: &mut Expect) -> u32 {
        if !s.params.is_empty() && self.rng.chance(90) {
            self.rng.index(s.params.len()) as u32
        } else {
            e.fault("an unknown id", HETMEM_ERR_UNKNOWN_PARAM);
            self.rng.pick(&[s.params.len() as u32, u32::MAX, 77])
        }
    }
}
