//! What the GPU side knows: the live allocations it saw (address → size, device,
//! kind), what each device holds against its limit, and the counters.

use std::sync::atomic::{AtomicU64, Ordering};

use rustc_hash::FxHashMap;

use super::{GpuConfig, Limit, MAX_DEVICES};
use crate::lock::Lock;

/// Kinds of allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Device memory (cuMemAlloc, cudaMalloc, the async ones, hipMalloc): charged to
    /// its device.
    Device = 0,
    /// The program's own managed memory: counted, not charged.
    Managed = 1,
    /// Page-locked host memory from the driver (cuMemAllocHost, cudaHostAlloc, ...).
    Pinned = 2,
    /// Host memory the program registered.
    Registered = 3,
    /// A physical allocation (cuMemCreate): charged to its device.
    Physical = 4,
    /// Past the limit, served as managed memory preferring the host (oversubscribe).
    Oversubscribed = 5,
    /// Registered by the shim on a copy (pin-on-copy).
    PinnedOnCopy = 6,
}

const KINDS: usize = 7;
const KIND_NAMES: [&str; KINDS] = [
    "device",
    "managed",
    "pinned",
    "registered",
    "physical",
    "oversubscribed",
    "pinned_on_copy",
];

/// One live allocation.
#[derive(Debug, Clone, Copy)]
pub struct Rec {
    /// Bytes.
    pub size: u64,
    /// Device ordinal (-1: none, host memory).
    pub dev: i32,
    /// Kind.
    pub kind: Kind,
}

struct Table {
    live: Option<FxHashMap<u64, Rec>>,
    /// cuMemCreate handles.
    handles: Option<FxHashMap<u64, Rec>>,
    held: [u64; MAX_DEVICES],
    peak: [u64; MAX_DEVICES],
}

static TABLE: Lock<Table> = Lock::new(Table {
    live: None,
    handles: None,
    held: [0; MAX_DEVICES],
    peak: [0; MAX_DEVICES],
});

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
static ALLOCS: [AtomicU64; KINDS] = [ZERO; KINDS];
static FREES: [AtomicU64; KINDS] = [ZERO; KINDS];
static BYTES: [AtomicU64; KINDS] = [ZERO; KINDS];
/// Allocations served by hetmem's pools (device, pinned).
pub static POOL_SERVED: AtomicU64 = AtomicU64::new(0);
/// See [`POOL_SERVED`].
pub static POOL_PINNED: AtomicU64 = AtomicU64::new(0);
/// Allocations refused at the limit.
pub static REFUSED: AtomicU64 = AtomicU64::new(0);
/// Memory-information answers adjusted to the limit.
pub static INFO_ADJUSTED: AtomicU64 = AtomicU64::new(0);
/// Allocations passed through untouched because their stream was capturing.
pub static CAPTURED: AtomicU64 = AtomicU64::new(0);
/// Frees of pointers the shim never saw (passed on to the driver, which decides).
pub static UNKNOWN_FREES: AtomicU64 = AtomicU64::new(0);
/// Copies that pinned their host block, and copies that found it pinned.
pub static PIN_MISSES: AtomicU64 = AtomicU64::new(0);
/// See [`PIN_MISSES`].
pub static PIN_HITS: AtomicU64 = AtomicU64::new(0);
/// Oversubscribed allocations prefetched to their device at first use from a stream.
pub static PREFETCHES: AtomicU64 = AtomicU64::new(0);
/// Oversubscribed allocations: address, size, device, prefetched yet.
static OVERS: Lock<Vec<(u64, u64, i32, bool)>> = Lock::new(Vec::new());
static OVER_COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The oversubscribed allocation holding `p` if it was not prefetched yet (it is
/// marked prefetched): its start, size and device.
pub fn first_use(p: u64) -> Option<(u64, u64, i32)> {
    if OVER_COUNT.load(Ordering::Acquire) == 0 {
        return None;
    }
    OVERS.with(|v| {
        let e = v.iter_mut().find(|e| !e.3 && p >= e.0 && p - e.0 < e.1)?;
        e.3 = true;
        Some((e.0, e.1, e.2))
    })
}

/// Limits resolved from fractions (bytes; 0: not yet).
static RESOLVED: [AtomicU64; MAX_DEVICES] = [ZERO; MAX_DEVICES];

// No code path holds two of these locks at once, so any order is free of deadlock.
extern "C" fn prepare() {
    super::pool::fork_lock();
    super::runtime::fork_lock();
    TABLE.lock();
    OVERS.lock();
}
extern "C" fn parent() {
    OVERS.unlock();
    TABLE.unlock();
    super::runtime::fork_unlock(false);
    super::pool::fork_unlock(false);
}
extern "C" fn child() {
    OVERS.reset_in_child();
    TABLE.reset_in_child();
    // A forked child holds no device memory of its own (CUDA memory is the parent's).
    TABLE.with(|t| t.held = [0; MAX_DEVICES]);
    super::runtime::fork_unlock(true);
    super::pool::fork_unlock(true);
}

/// Holds the table across `fork` (a child never inherits it locked).
pub fn init_fork_handlers() {
    // SAFETY: registers three handlers with no preconditions.
    unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
}

fn slot(dev: i32) -> Option<usize> {
    usize::try_from(dev).ok().filter(|&d| d < MAX_DEVICES)
}

/// The limit of `dev` in bytes; `total` gives the device's memory for fractions.
pub fn limit_bytes(cfg: &GpuConfig, dev: i32, total: &dyn Fn() -> Option<u64>) -> Option<u64> {
    match cfg.limit(dev)? {
        Limit::Bytes(b) => Some(b),
        Limit::Fraction(f) => {
            let d = slot(dev)?;
            let r = RESOLVED[d].load(Ordering::Relaxed);
            if r != 0 {
                return Some(r);
            }
            let b = (total()? as f64 * f) as u64;
            RESOLVED[d].store(b.max(1), Ordering::Relaxed);
            Some(b)
        }
    }
}

/// Charges `size` bytes to `dev` if its limit allows (`limit`: `None`, no limit);
/// false: refused (counted). A charge is given back with [`uncharge`] when the
/// allocation fails, or by [`take`] when it is freed.
pub fn charge(dev: i32, size: u64, limit: Option<u64>) -> bool {
    let Some(d) = slot(dev) else { return true };
    let name = super::config().and_then(|c| c.shared.as_deref());
    let ok = match (name, limit) {
        (Some(name), Some(l)) => super::shared::with_others(name, d, |others| {
            TABLE.with(|t| {
                let held = t.held[d];
                if held.saturating_add(size).saturating_add(others) > l {
                    return (false, held);
                }
                t.held[d] = held.saturating_add(size);
                t.peak[d] = t.peak[d].max(t.held[d]);
                (true, t.held[d])
            })
        }),
        _ => None,
    };
    if let Some(ok) = ok {
        if !ok {
            REFUSED.fetch_add(1, Ordering::Relaxed);
        }
        return ok;
    }
    let ok = TABLE.with(|t| {
        let held = t.held[d];
        if limit.is_some_and(|l| held.saturating_add(size) > l) {
            return false;
        }
        t.held[d] = held.saturating_add(size);
        t.peak[d] = t.peak[d].max(t.held[d]);
        true
    });
    if !ok {
        REFUSED.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

/// Gives back a charge whose allocation failed.
pub fn uncharge(dev: i32, size: u64) {
    if let Some(d) = slot(dev) {
        TABLE.with(|t| {
            t.held[d] = t.held[d].saturating_sub(size);
            super::shared::publish(d, t.held[d]);
        });
    }
}

/// What `dev` holds.
pub fn held(dev: i32) -> u64 {
    slot(dev).map_or(0, |d| TABLE.with(|t| t.held[d]))
}

/// What `dev` holds, with what the other processes sharing the limit hold.
pub fn held_all(dev: i32) -> u64 {
    let mine = held(dev);
    let others = match (super::config().and_then(|c| c.shared.as_deref()), slot(dev)) {
        (Some(name), Some(d)) => super::shared::others(name, d),
        _ => 0,
    };
    mine.saturating_add(others)
}

fn charged(k: Kind) -> bool {
    matches!(k, Kind::Device | Kind::Physical)
}

/// Records a live allocation (already charged when its kind is charged).
pub fn note(addr: u64, rec: Rec) {
    note_on(addr, rec, 0);
}

/// Records a live allocation made for `stream` (in the event record too, when one is
/// kept: `HETMEM_RECORD`).
pub fn note_on(addr: u64, rec: Rec, stream: u64) {
    crate::recorder::gpu(true, addr, rec.size, rec.kind as u8, rec.dev, stream);
    let k = rec.kind as usize;
    if rec.kind == Kind::Oversubscribed {
        OVERS.with(|v| v.push((addr, rec.size, rec.dev, false)));
        OVER_COUNT.fetch_add(1, Ordering::Release);
    }
    ALLOCS[k].fetch_add(1, Ordering::Relaxed);
    BYTES[k].fetch_add(rec.size, Ordering::Relaxed);
    TABLE.with(|t| {
        t.live
            .get_or_insert_with(FxHashMap::default)
            .insert(addr, rec);
    });
}

/// Records a physical allocation (cuMemCreate) by its handle.
pub fn note_handle(h: u64, rec: Rec) {
    crate::recorder::gpu(true, h, rec.size, rec.kind as u8, rec.dev, 0);
    let k = rec.kind as usize;
    ALLOCS[k].fetch_add(1, Ordering::Relaxed);
    BYTES[k].fetch_add(rec.size, Ordering::Relaxed);
    TABLE.with(|t| {
        t.handles
            .get_or_insert_with(FxHashMap::default)
            .insert(h, rec);
    });
}

/// Takes the allocation at `addr` out of the table (before its free), its charge
/// given back; `None`: never seen (counted).
pub fn take(addr: u64) -> Option<Rec> {
    let r = detach(addr);
    freed(addr, r);
    r
}

/// Removes the allocation at `addr` from the table, its charge given back, and
/// counts nothing: [`freed`] does once the free is done, or [`reattach`] undoes it.
pub fn detach(addr: u64) -> Option<Rec> {
    TABLE.with(|t| {
        let r = t.live.as_mut().and_then(|m| m.remove(&addr))?;
        uncharge_locked(t, r);
        Some(r)
    })
}

/// Puts back what [`detach`] removed (the memory was not freed after all).
pub fn reattach(addr: u64, r: Rec) {
    TABLE.with(|t| {
        if charged(r.kind) {
            if let Some(d) = slot(r.dev) {
                t.held[d] = t.held[d].saturating_add(r.size);
                super::shared::publish(d, t.held[d]);
            }
        }
        t.live
            .get_or_insert_with(FxHashMap::default)
            .insert(addr, r);
    });
}

/// Counts and records the free of what [`detach`] found at `addr` (`None`: an
/// address never seen).
pub fn freed(addr: u64, r: Option<Rec>) {
    if r.is_some_and(|r| r.kind == Kind::Oversubscribed) {
        OVERS.with(|v| v.retain(|e| e.0 != addr));
        OVER_COUNT.fetch_sub(1, Ordering::Release);
    }
    if let Some(r) = r {
        crate::recorder::gpu(false, addr, r.size, r.kind as u8, r.dev, 0);
    }
    match r {
        Some(r) => FREES[r.kind as usize].fetch_add(1, Ordering::Relaxed),
        None => UNKNOWN_FREES.fetch_add(1, Ordering::Relaxed),
    };
}

/// Takes a cuMemCreate handle out of the table.
pub fn take_handle(h: u64) -> Option<Rec> {
    let r = TABLE.with(|t| {
        let r = t.handles.as_mut().and_then(|m| m.remove(&h))?;
        uncharge_locked(t, r);
        Some(r)
    });
    if let Some(r) = r {
        crate::recorder::gpu(false, h, r.size, r.kind as u8, r.dev, 0);
        FREES[r.kind as usize].fetch_add(1, Ordering::Relaxed);
    }
    r
}

fn uncharge_locked(t: &mut Table, r: Rec) {
    if charged(r.kind) {
        if let Some(d) = slot(r.dev) {
            t.held[d] = t.held[d].saturating_sub(r.size);
            super::shared::publish(d, t.held[d]);
        }
    }
}

/// Puts back an allocation whose free failed (the driver still holds it).
pub fn restore(addr: u64, r: Rec) {
    reattach(addr, r);
    FREES[r.kind as usize].fetch_sub(1, Ordering::Relaxed);
}

/// Puts back a handle whose release failed.
pub fn restore_handle(h: u64, r: Rec) {
    TABLE.with(|t| {
        if let Some(d) = slot(r.dev) {
            t.held[d] = t.held[d].saturating_add(r.size);
            super::shared::publish(d, t.held[d]);
        }
        t.handles
            .get_or_insert_with(FxHashMap::default)
            .insert(h, r);
    });
    FREES[r.kind as usize].fetch_sub(1, Ordering::Relaxed);
}

/// The counters as one JSON object.
pub fn json(cfg: &GpuConfig) -> String {
    let mut s = String::from("{\"mode\":\"");
    s += match cfg.mode {
        super::Mode::Observe => "observe",
        super::Mode::Oversubscribe => "oversubscribe",
        super::Mode::Pool => "pool",
    };
    s += "\",\"kinds\":{";
    for (i, name) in KIND_NAMES.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s += &format!(
            "\"{name}\":{{\"allocs\":{},\"frees\":{},\"bytes\":{}}}",
            ALLOCS[i].load(Ordering::Relaxed),
            FREES[i].load(Ordering::Relaxed),
            BYTES[i].load(Ordering::Relaxed)
        );
    }
    s += "},\"devices\":[";
    let (held, peak, live) = TABLE.with(|t| {
        (
            t.held,
            t.peak,
            t.live.as_ref().map_or(0, |m| m.len()) + t.handles.as_ref().map_or(0, |m| m.len()),
        )
    });
    let mut first = true;
    for d in 0..MAX_DEVICES {
        let limit = match cfg.limit(d as i32) {
            Some(Limit::Bytes(b)) => b.to_string(),
            Some(Limit::Fraction(_)) => match RESOLVED[d].load(Ordering::Relaxed) {
                0 => "null".into(),
                b => b.to_string(),
            },
            None => "null".into(),
        };
        if peak[d] == 0 && limit == "null" {
            continue;
        }
        if !first {
            s.push(',');
        }
        first = false;
        s += &format!(
            "{{\"device\":{d},\"held\":{},\"peak\":{},\"limit\":{limit}}}",
            held[d], peak[d]
        );
    }
    s += &format!(
        "],\"live\":{live},\"refused\":{},\"info_adjusted\":{},\"captured\":{},\"unknown_frees\":{},\"pin_misses\":{},\"pin_hits\":{},\"prefetches\":{},\"pool_served\":{},\"pool_pinned\":{},\"handed_dlsym\":{},\"handed_proc\":{},\"passed_proc\":{}}}",
        REFUSED.load(Ordering::Relaxed),
        INFO_ADJUSTED.load(Ordering::Relaxed),
        CAPTURED.load(Ordering::Relaxed),
        UNKNOWN_FREES.load(Ordering::Relaxed),
        PIN_MISSES.load(Ordering::Relaxed),
        PIN_HITS.load(Ordering::Relaxed),
        PREFETCHES.load(Ordering::Relaxed),
        POOL_SERVED.load(Ordering::Relaxed),
        POOL_PINNED.load(Ordering::Relaxed),
        super::real::HANDED_DLSYM.load(Ordering::Relaxed),
        super::real::HANDED_PROC.load(Ordering::Relaxed),
        super::real::PASSED_PROC.load(Ordering::Relaxed),
    );
    s
}
