//! The tier store through `hetmem_store_*`: stores over the simulated managers with
//! budgets far below their parameters, registration (bytes and safetensors files),
//! look-ups, every hint, acquires on every kind of stream, guards marked dirty and
//! released (twice, too), and reads compared with the bytes registered.

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A store handle destroyed.
struct DeadStore {
    handle: usize,
}

use hetmem::ffi::tier::*;
use hetmem::ffi::*;

use super::mem::{AddrArg, At, HostSide, Locked, StreamArg, POISON};
use super::{
    gh, lock, mh, read, remember, th, write, Expect, GuardInfo, HandleKind, Param, StoreInfo,
    Thread, STORE_SLOTS,
};

/// Parameters per store, at most.
const MAX_PARAMS: usize = 16;
/// Guards held on one store at once, at most.
const MAX_GUARDS: usize = 3;

impl Thread<'_> {
    /// A store slot and its live store, its lock held shared.
    fn with_store<R>(&mut self, f: impl FnOnce(&mut Self, usize, &StoreInfo) -> R) -> Option<R> {
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
    fn read_param(&mut self, h: usize, id: u32, p: &Param) {
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
    fn param_id(&mut self, s: &StoreInfo, e: &mut Expect) -> u32 {
        if !s.params.is_empty() && self.rng.chance(90) {
            self.rng.index(s.params.len()) as u32
        } else {
            e.fault("an unknown id", HETMEM_ERR_UNKNOWN_PARAM);
            self.rng.pick(&[s.params.len() as u32, u32::MAX, 77])
        }
    }

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
