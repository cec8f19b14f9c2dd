//! The tier store leg, through the Rust API (the C ABI has no call that writes a
//! parameter): stores whose device budget is a fraction of their parameters, checksums
//! on, one from a safetensors file; threads acquire on their own streams and on the
//! store's copy stream, read every byte through the guard and compare it with the
//! model, write and mark dirty, hold guards across operations, release, and give every
//! hint (will-need, dont-need, keep-resident, priority, a sequence, prefetch). At the
//! end every byte of every parameter is compared again, and the store's counters are
//! checked against its budgets.
//!
//! A parameter is used by one thread at a time (a flag taken without waiting), so the
//! model's bytes are the parameter's; the store still sees every thread at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hetmem::tier::source::{write_safetensors, SafetensorsFile};
use hetmem::tier::ParamId;
use hetmem::tier::{ParamGuard, Planner, SequenceHint, TierConfig, TierStore};
use hetmem::{BackendKind, Error, Manager, SimConfig, Stream};

use crate::capi::lock;
use crate::report::{Kind, Report};
use crate::rng::Rng;
use crate::{Config, Progress, Stop};

/// One parameter in the model.
struct Param {
    /// Taken by the thread that uses the parameter now.
    busy: AtomicBool,
    bytes: Mutex<Vec<u8>>,
}

struct Store {
    store: TierStore,
    params: Vec<Param>,
    device_budget: usize,
    host_budget: usize,
    label: String,
}

/// Reads a guard's bytes (an empty parameter's guard has no block and no bytes).
fn read_guard(g: &ParamGuard, out: &mut [u8]) -> hetmem::Result<()> {
    match g.block() {
        Some(b) => b.read(0, out),
        None if out.is_empty() => Ok(()),
        None => Err(Error::InvalidArgument(format!(
            "a guard of {} bytes without a block",
            out.len()
        ))),
    }
}

/// Everything the tier threads share.
pub struct World {
    report: Arc<Report>,
    mgr: Manager,
    stores: Vec<Store>,
}

const MIB: usize = 1 << 20;

impl World {
    /// Three stores on one simulated manager.
    pub fn new(cfg: &Config, report: Arc<Report>) -> Arc<World> {
        let mgr = Manager::builder()
            .backend(BackendKind::Sim)
            .sim_config(SimConfig::with_devices(2, 1 << 30))
            .build()
            .expect("a simulated manager");
        let mut rng = Rng::new(cfg.seed, 1 << 32);
        let dir = std::env::temp_dir().join(format!(
            "hetmem-fuzz-tier-{}-{}",
            std::process::id(),
            cfg.seed
        ));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let mut stores = Vec::new();
        for k in 0..3 {
            let n = 6 + rng.index(10);
            let sizes: Vec<usize> = (0..n)
                .map(|_| match rng.below(4) {
                    0 => 1 + rng.index(4096),
                    1 | 2 => 4096 + rng.index(128 << 10),
                    _ => (256 << 10) + rng.index(MIB),
                })
                .collect();
            let total: usize = sizes.iter().sum();
            let largest = sizes.iter().copied().max().unwrap_or(1);
            // Far below the model: room for the largest few parameters only.
            let device_budget = (3 * hetmem::tier::store::device_footprint(largest)).max(total / 5);
            let slot = (64usize << 10) << rng.below(3);
            let slots = 2 + rng.index(3);
            let host_budget = slots * slot + rng.index(total / 2 + 1);
            let mut c = TierConfig::new(device_budget, host_budget);
            c.device = k % 2;
            c.checksums = true;
            c.staging_slots = slots;
            c.staging_slot_size = slot;
            c.staging_threads = 1 + rng.index(2);
            c.spare_slots = 1 + rng.index(2);
            c.prefetch_depth = rng.pick(&[1, 2, usize::MAX]);
            c.planner = if rng.chance(50) {
                Planner::Belady
            } else {
                Planner::Static
            };
            c.sequence = match rng.below(3) {
                0 => SequenceHint::Lru,
                1 => SequenceHint::Learn,
                _ => SequenceHint::Given((0..n as ParamId).collect()),
            };
            let label = format!(
                "store {k}: {n} params, {total} bytes, device budget {device_budget}, host budget {host_budget}, {:?}, {:?}",
                c.planner, c.sequence
            );
            let store = TierStore::new(&mgr, c).unwrap_or_else(|e| panic!("{label}: {e}"));
            let mut data: Vec<Vec<u8>> = sizes.iter().map(|&s| rng.bytes(s)).collect();
            if k == 2 {
                // A tensor of zero elements: an empty parameter, always on the device.
                data[rng.index(n)] = Vec::new();
            }
            if k == 2 {
                // From a mapped safetensors file: write-backs replace the mapped source.
                let path = dir.join("model.safetensors");
                let names: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
                let shapes: Vec<[usize; 1]> = data.iter().map(|d| [d.len()]).collect();
                let specs: Vec<hetmem::tier::source::TensorSpec<'_>> = (0..n)
                    .map(|i| (names[i].as_str(), "U8", &shapes[i][..], data[i].as_slice()))
                    .collect();
                write_safetensors(&path, &specs).expect("a safetensors file");
                let file = SafetensorsFile::open(&path).expect("the file just written");
                let ids = store.register_safetensors(&file).expect("registration");
                assert_eq!(ids, (0..n as ParamId).collect::<Vec<_>>());
                // Ids follow the file's order, which is not the order written: the
                // model's bytes in id order.
                let mut by_id = vec![Vec::new(); n];
                for (i, d) in data.into_iter().enumerate() {
                    let id = store.id(&names[i]).expect("a registered name");
                    by_id[id as usize] = d;
                }
                data = by_id;
                // The mapping stays; the file may go.
                let _ = std::fs::remove_file(&path);
            } else {
                for (i, d) in data.iter().enumerate() {
                    let id = store
                        .register(&format!("p{i}"), d.clone().into())
                        .expect("registration");
                    assert_eq!(id as usize, i);
                }
            }
            stores.push(Store {
                store,
                params: data
                    .into_iter()
                    .map(|d| Param {
                        busy: AtomicBool::new(false),
                        bytes: Mutex::new(d),
                    })
                    .collect(),
                device_budget,
                host_budget,
                label,
            });
        }
        let _ = std::fs::remove_dir_all(&dir);
        Arc::new(World {
            report,
            mgr,
            stores,
        })
    }
}

/// A guard held across operations, with its parameter's flag.
struct Held {
    store: usize,
    id: ParamId,
    guard: ParamGuard,
}

struct Thread<'w> {
    w: &'w World,
    rng: Rng,
    streams: Vec<Stream>,
    held: Vec<Held>,
}

/// Runs thread `t` of the tier leg until `stop`.
pub fn worker(w: &World, t: usize, seed: u64, stop: &Stop, progress: &Progress) {
    let streams = (0..2)
        .map(|d| w.mgr.create_stream(d).expect("a stream"))
        .collect();
    let mut th = Thread {
        w,
        rng: Rng::new(seed, t as u64),
        streams,
        held: Vec::new(),
    };
    let mut done = 0u64;
    while !stop.now(done) {
        th.step(t, progress);
        progress.tick(t);
        done += 1;
    }
    while let Some(h) = th.held.pop() {
        th.release(h);
    }
}

impl Thread<'_> {
    fn call(&self, ok: bool) {
        self.w.report.call(false, ok);
    }

    fn find(&self, kind: Kind, call: &str, key: &str, example: impl FnOnce() -> String) {
        let known = match (kind, key) {
            (Kind::Hang, _) => None,
            _ => None,
        };
        self.w.report.find(kind, call, key, known, example);
    }

    fn compare(&self, call: &str, got: &[u8], want: &[u8], what: impl FnOnce() -> String) {
        self.w
            .report
            .bytes_checked
            .fetch_add(want.len() as u64, Ordering::Relaxed);
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            self.find(Kind::WrongBytes, call, "parameter bytes", || {
                format!("{}: first difference at {at} of {}", what(), want.len())
            });
        }
    }

    /// An unexpected error of a call that should work.
    fn failed(&self, call: &str, e: &Error, what: impl FnOnce() -> String) {
        let kind = if matches!(e, Error::Checksum { .. }) {
            Kind::WrongBytes
        } else {
            Kind::WrongStatus
        };
        let key = format!("{e:?}")
            .split(['{', '(', ' '])
            .next()
            .unwrap_or("")
            .to_owned();
        self.find(kind, call, &key, || format!("{}: {e}", what()));
    }

    fn step(&mut self, t: usize, progress: &Progress) {
        let s = self.rng.index(self.w.stores.len());
        let n = self.w.stores[s].params.len();
        let id = self.rng.index(n) as ParamId;
        match self.rng.below(100) {
            0..=44 => {
                progress.enter(t, "tier acquire");
                self.acquire(s, id);
            }
            45..=59 => {
                progress.enter(t, "tier release");
                if !self.held.is_empty() {
                    let i = self.rng.index(self.held.len());
                    let h = self.held.swap_remove(i);
                    self.release(h);
                }
            }
            60..=69 => {
                progress.enter(t, "tier read");
                self.read(s, id);
            }
            70..=89 => {
                progress.enter(t, "tier hints");
                self.hint(s, id);
            }
            90..=94 => {
                progress.enter(t, "tier sequence");
                self.sequence(s);
            }
            _ => {
                progress.enter(t, "tier residency");
                let r = self.w.stores[s].store.residency(id);
                self.call(r.is_ok());
                if let Err(e) = r {
                    self.failed("residency", &e, || format!("id {id}"));
                }
            }
        }
    }

    fn take(&self, s: usize, id: ParamId) -> bool {
        self.w.stores[s].params[id as usize]
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    fn give(&self, s: usize, id: ParamId) {
        self.w.stores[s].params[id as usize]
            .busy
            .store(false, Ordering::Release);
    }

    /// Acquires, reads every byte through the guard, maybe writes some, and holds or
    /// releases the guard.
    fn acquire(&mut self, s: usize, id: ParamId) {
        if self.held.len() >= 2 || !self.take(s, id) {
            return;
        }
        let st = &self.w.stores[s];
        let copy = self.rng.chance(20);
        let stream = if copy {
            st.store.copy_stream().clone()
        } else {
            self.streams[st.store.copy_stream().device()].clone()
        };
        let r = if self.rng.chance(50) {
            st.store.acquire(id, &stream)
        } else {
            st.store
                .acquire_timeout(id, &stream, Duration::from_millis(self.rng.below(30)))
        };
        self.call(r.is_ok());
        let mut g = match r {
            Ok(g) => g,
            Err(Error::OutOfMemory { .. }) => {
                // The budget is full of guards (others', or this thread's own).
                self.give(s, id);
                return;
            }
            Err(e) => {
                self.failed("acquire", &e, || format!("{}, id {id}", st.label));
                self.give(s, id);
                return;
            }
        };
        let sync = stream.synchronize();
        self.call(sync.is_ok());
        let len = g.len();
        let mut got = vec![0u8; len];
        let r = read_guard(&g, &mut got);
        self.call(r.is_ok());
        let mut model = lock(&st.params[id as usize].bytes);
        match r {
            Ok(()) => self.compare("acquire", &got, &model, || {
                format!("{}, id {id} at acquire", st.label)
            }),
            Err(e) => self.failed("guard read", &e, || format!("id {id}")),
        }
        if self.rng.chance(40) && len > 0 {
            g.mark_dirty();
            let sync = stream.synchronize();
            self.call(sync.is_ok());
            let off = self.rng.index(len);
            let n = 1 + self.rng.index((len - off).min(4096));
            let data = self.rng.bytes(n);
            let r = match g.block() {
                Some(b) => b.write(off, &data),
                None => Err(Error::InvalidArgument("an empty parameter's guard".into())),
            };
            self.call(r.is_ok());
            match r {
                Ok(()) => model[off..off + n].copy_from_slice(&data),
                Err(e) => self.failed("guard write", &e, || format!("id {id}")),
            }
        }
        drop(model);
        if self.rng.chance(40) {
            self.held.push(Held {
                store: s,
                id,
                guard: g,
            });
        } else {
            drop(g);
            self.give(s, id);
        }
    }

    fn release(&mut self, h: Held) {
        h.guard.release();
        self.give(h.store, h.id);
        self.call(true);
    }

    fn read(&mut self, s: usize, id: ParamId) {
        if !self.take(s, id) {
            return;
        }
        let st = &self.w.stores[s];
        let r = st.store.read(id);
        self.call(r.is_ok());
        match r {
            Ok(bytes) => {
                let model = lock(&st.params[id as usize].bytes);
                self.compare("read", &bytes, &model, || format!("{}, id {id}", st.label));
            }
            Err(e) => self.failed("read", &e, || format!("id {id}")),
        }
        self.give(s, id);
    }

    fn hint(&mut self, s: usize, id: ParamId) {
        let store = &self.w.stores[s].store;
        let (call, r): (&str, hetmem::Result<()>) = match self.rng.below(6) {
            0 => ("will_need", store.will_need(id).map(drop)),
            1 => ("dont_need", store.dont_need(id).map(drop)),
            2 => ("prefetch", store.prefetch(id).map(drop)),
            3 => (
                "priority",
                store.priority(id, self.rng.pick(&[0, 1, -1, 5])),
            ),
            // Only parameter 0 is ever kept, so that the budget never fills with kept
            // ones.
            4 => ("keep_resident", store.keep_resident(0, self.rng.chance(50))),
            _ => {
                // An id that is not there: refused.
                let bad = store.len() as ParamId + self.rng.below(3) as ParamId;
                let r = store.will_need(bad);
                self.w.report.call(true, r.is_ok());
                if r.is_ok() {
                    self.find(Kind::AcceptedBadInput, "will_need", "unknown id", || {
                        format!("id {bad}")
                    });
                }
                return;
            }
        };
        self.call(r.is_ok());
        match r {
            Ok(()) | Err(Error::OutOfMemory { .. }) => {}
            Err(e) => self.failed(call, &e, || format!("id {id}")),
        }
    }

    fn sequence(&mut self, s: usize) {
        let store = &self.w.stores[s].store;
        let n = store.len();
        let order = match self.rng.below(4) {
            0 => None,
            1 => Some((0..n as ParamId).collect()),
            _ => Some(
                (0..1 + self.rng.index(2 * n))
                    .map(|_| self.rng.index(n) as ParamId)
                    .collect::<Vec<_>>(),
            ),
        };
        let r = store.set_sequence(order);
        self.call(r.is_ok());
        if let Err(e) = r {
            self.failed("set_sequence", &e, String::new);
        }
    }
}

/// After the threads: every parameter read back (through the store and through a
/// guard) and compared, and the store's counters checked.
pub fn teardown(w: &World) {
    let mut th = Thread {
        w,
        rng: Rng::new(0, 0),
        streams: Vec::new(),
        held: Vec::new(),
    };
    for (s, st) in w.stores.iter().enumerate() {
        for id in 0..st.params.len() as ParamId {
            th.read(s, id);
            let stream = st.store.copy_stream().clone();
            match st
                .store
                .acquire_timeout(id, &stream, Duration::from_secs(5))
            {
                Ok(g) => {
                    th.call(true);
                    let _ = stream.synchronize();
                    let mut got = vec![0u8; g.len()];
                    if let Err(e) = read_guard(&g, &mut got) {
                        th.failed("guard read", &e, || format!("id {id}"));
                    }
                    let model = lock(&st.params[id as usize].bytes);
                    th.compare("acquire", &got, &model, || {
                        format!("{}, id {id} at the end", st.label)
                    });
                }
                Err(e) => {
                    th.call(false);
                    th.failed("acquire", &e, || {
                        format!("{}, id {id} at the end", st.label)
                    });
                }
            }
        }
        let stats = st.store.stats();
        for (k, v) in [
            ("loads", stats.loads),
            ("hits", stats.hits),
            ("misses", stats.misses),
            ("prefetches", stats.prefetches),
            ("staged_loads", stats.staged_loads),
            ("evictions", stats.evictions),
            ("writebacks", stats.writebacks),
            ("sequences_learnt", stats.sequences_learnt),
            ("sequences_dropped", stats.sequences_dropped),
        ] {
            w.report.add_extra(k, v);
        }
        if stats.checksum_mismatches > 0 {
            th.find(Kind::WrongBytes, "stats", "checksum mismatches", || {
                format!("{}: {stats:?}", st.label)
            });
        }
        if stats.device_peak_bytes > st.device_budget {
            th.find(Kind::Contract, "stats", "device budget exceeded", || {
                format!("{}: peak {} bytes", st.label, stats.device_peak_bytes)
            });
        }
        if stats.host_peak_bytes > st.host_budget {
            th.find(Kind::Contract, "stats", "host budget exceeded", || {
                format!("{}: peak {} bytes", st.label, stats.host_peak_bytes)
            });
        }
    }
}
