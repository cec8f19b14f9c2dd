//! The GPU side of the shim (issue 18): an unmodified program's CUDA and HIP
//! allocations seen, counted, limited and, past a limit, oversubscribed.
//!
//! Interposed entry points: the CUDA runtime ([`runtime`]: `cudaMalloc`, ...), the CUDA
//! driver ([`driver`]: `cuMemAlloc_v2`, ... by symbol, by `dlsym` and through
//! `cuGetProcAddress`/`_v2`), HIP ([`hip`]). The real functions are found lazily, at
//! the program's first call of each ([`real`]): the shim never loads a driver or a
//! runtime itself, so a process that does not use CUDA pays only the parsing of a few
//! variables at start-up and one comparison per `dlsym`.
//!
//! | variable | values | default |
//! |---|---|---|
//! | `HETMEM_GPU` | `0`: every GPU call passes through untouched, uncounted | on |
//! | `HETMEM_GPU_MODE` | `observe` (count only), `pool` (CUDA device allocations from hetmem's device pool, stream-ordered, pinned ones from its host pool: [`pool`]), `oversubscribe` (past the limit, managed memory preferring the host, prefetched to the device at its first copy on a stream) | `observe` |
//! | `HETMEM_DEVICE_LIMIT` | `8G` (every device), `0:8G,1:20G`, `0.5` or `50%` (of each device's memory), `0:0.25`: device memory this process may hold; allocations past it fail with the out-of-memory code, and `cudaMemGetInfo`/`cuMemGetInfo_v2`/`hipMemGetInfo` answer total = the limit, free = the limit minus what the process holds | none |
//! | `HETMEM_DEVICE_LIMIT_SHARED` | a name: the limit is shared by every process that gives the same name (what the live ones hold together; [`shared`]) | the process's own |
//! | `HETMEM_GPU_PIN_ON_COPY` | size (`64M`) or `1` (64 MiB) / `0`: a pageable block of the host side's large path copied to or from the device with `cudaMemcpy[Async]`, at least this large, is registered (pinned) at its first copy and unregistered when freed | `0` |
//! | `HETMEM_GPU_PIN_CACHE` | bytes pinned on copies at most | `16G` |
//! | `HETMEM_GPU_STATS` | `1`: the GPU counters (one JSON line) on stderr at exit; else a file (`%p`: the pid) | off |
//!
//! A value that does not parse prints one line on stderr and the GPU side passes every
//! call through (the host side is configured separately and is not affected).
#![allow(clippy::missing_safety_doc)]

pub mod driver;
pub mod hip;
pub mod pool;
pub mod real;
pub mod runtime;
pub mod shared;
pub mod state;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// Devices the limits and counters cover (ordinals past it are passed through).
pub const MAX_DEVICES: usize = 64;

/// What the GPU side does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Count (and limit, when a limit is set).
    Observe,
    /// As observe; past the limit, managed memory preferring the host.
    Oversubscribe,
    /// Device allocations from hetmem's device pool, pinned ones from its host pool.
    Pool,
}

/// One device's limit as written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// Bytes.
    Bytes(u64),
    /// A fraction of the device's memory (0 < f <= 1).
    Fraction(f64),
}

/// The GPU side's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuConfig {
    /// The mode.
    pub mode: Mode,
    /// Per device (index: ordinal); `None`: no limit.
    pub limits: Vec<Option<Limit>>,
    /// Pin-on-copy threshold (`None`: off).
    pub pin_on_copy: Option<usize>,
    /// Bytes pinned on copies at most.
    pub pin_cache: usize,
    /// The name of a limit shared with other processes (`HETMEM_DEVICE_LIMIT_SHARED`).
    pub shared: Option<String>,
    /// `Some(None)`: stats to stderr, `Some(Some(path))`: to a file.
    pub stats: Option<Option<String>>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            mode: Mode::Observe,
            limits: Vec::new(),
            pin_on_copy: None,
            pin_cache: 16 << 30,
            shared: None,
            stats: None,
        }
    }
}

impl GpuConfig {
    /// Whether device allocations come from the pool.
    pub fn pooled(&self) -> bool {
        self.mode == Mode::Pool
    }

    /// The limit of `dev`, if any.
    pub fn limit(&self, dev: i32) -> Option<Limit> {
        usize::try_from(dev)
            .ok()
            .and_then(|d| self.limits.get(d))
            .copied()
            .flatten()
    }
}

fn parse_limit_value(v: &str) -> Option<Limit> {
    let v = v.trim();
    if let Some(p) = v.strip_suffix('%') {
        let f: f64 = p.trim().parse().ok()?;
        return (f > 0.0 && f <= 100.0).then_some(Limit::Fraction(f / 100.0));
    }
    if v.contains('.') {
        let f: f64 = v.parse().ok()?;
        return (f > 0.0 && f <= 1.0).then_some(Limit::Fraction(f));
    }
    crate::config::parse_size(v).map(|b| Limit::Bytes(b as u64))
}

/// Parses `HETMEM_DEVICE_LIMIT`: the limits per device.
pub fn parse_limits(v: &str) -> Result<Vec<Option<Limit>>, String> {
    let bad = |why: &str| format!("HETMEM_DEVICE_LIMIT={v}: {why}");
    let mut all = None;
    let mut per: Vec<Option<Limit>> = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once(':') {
            Some((d, val)) => {
                let d: usize = d
                    .trim()
                    .parse()
                    .ok()
                    .filter(|&d| d < MAX_DEVICES)
                    .ok_or_else(|| {
                        bad(&format!(
                            "{d:?} is not a device ordinal under {MAX_DEVICES}"
                        ))
                    })?;
                let l = parse_limit_value(val).ok_or_else(|| {
                    bad(&format!(
                        "{val:?} is not a size (8G) or a fraction (0.5, 50%)"
                    ))
                })?;
                if per.len() <= d {
                    per.resize(d + 1, None);
                }
                per[d] = Some(l);
            }
            None => {
                all = Some(parse_limit_value(part).ok_or_else(|| {
                    bad(&format!(
                        "{part:?} is not a size (8G) or a fraction (0.5, 50%)"
                    ))
                })?);
            }
        }
    }
    if all.is_none() && per.is_empty() {
        return Err(bad("no limit given"));
    }
    if let Some(a) = all {
        per.resize(MAX_DEVICES, None);
        for slot in &mut per {
            slot.get_or_insert(a);
        }
    }
    Ok(per)
}

/// Parses the GPU side's variables through `get`; `Ok(None)`: `HETMEM_GPU=0`.
pub fn parse(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<GpuConfig>, String> {
    let mut c = GpuConfig::default();
    if let Some(v) = get("HETMEM_GPU") {
        match v.trim() {
            "0" | "off" | "no" | "false" => return Ok(None),
            "1" | "on" | "yes" | "true" | "" => {}
            _ => return Err(format!("HETMEM_GPU={v}: expected 1 or 0")),
        }
    }
    if let Some(v) = get("HETMEM_GPU_MODE") {
        c.mode = match v.trim() {
            "observe" | "" => Mode::Observe,
            "oversubscribe" => Mode::Oversubscribe,
            "pool" => Mode::Pool,
            _ => {
                return Err(format!(
                    "HETMEM_GPU_MODE={v}: expected observe, pool or oversubscribe"
                ))
            }
        };
    }
    if let Some(v) = get("HETMEM_DEVICE_LIMIT") {
        c.limits = parse_limits(&v)?;
    }
    if let Some(v) = get("HETMEM_DEVICE_LIMIT_SHARED") {
        let v = v.trim();
        if !shared::valid_name(v) {
            return Err(format!(
                "HETMEM_DEVICE_LIMIT_SHARED={v}: expected a name (letters, digits, - _ .)"
            ));
        }
        if c.limits.is_empty() {
            return Err(format!(
                "HETMEM_DEVICE_LIMIT_SHARED={v} needs HETMEM_DEVICE_LIMIT"
            ));
        }
        c.shared = Some(v.to_owned());
    }
    if c.mode == Mode::Oversubscribe && c.limits.is_empty() {
        return Err("HETMEM_GPU_MODE=oversubscribe needs HETMEM_DEVICE_LIMIT".into());
    }
    if let Some(v) = get("HETMEM_GPU_PIN_ON_COPY") {
        c.pin_on_copy = match v.trim() {
            "0" | "off" | "no" | "false" => None,
            "1" | "on" | "yes" | "true" => Some(64 << 20),
            s => Some(
                crate::config::parse_size(s)
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        format!("HETMEM_GPU_PIN_ON_COPY={v}: expected 0, 1 or a size (64M)")
                    })?,
            ),
        };
    }
    if let Some(v) = get("HETMEM_GPU_PIN_CACHE") {
        c.pin_cache = crate::config::parse_size(&v)
            .ok_or_else(|| format!("HETMEM_GPU_PIN_CACHE={v}: expected a size (16G)"))?;
    }
    if let Some(v) = get("HETMEM_GPU_STATS") {
        c.stats = match v.trim() {
            "0" | "" => None,
            "1" => Some(None),
            p => Some(Some(p.to_owned())),
        };
    }
    Ok(Some(c))
}

/// 0: not started, 1: active, 2: pass-through.
static STATE: AtomicU8 = AtomicU8::new(0);
static CONFIG: OnceLock<GpuConfig> = OnceLock::new();

/// The configuration, when the GPU side is active (else every call passes through).
#[inline]
pub fn config() -> Option<&'static GpuConfig> {
    if STATE.load(Ordering::Acquire) == 1 {
        CONFIG.get()
    } else {
        None
    }
}

/// Reads the variables (once, from the start-up constructor).
pub fn init() {
    if STATE.load(Ordering::Relaxed) != 0 {
        return;
    }
    // SAFETY: getauxval has no memory preconditions.
    let secure = unsafe { libc::getauxval(libc::AT_SECURE) } != 0;
    let off = secure || std::env::var("HETMEM_PRELOAD").is_ok_and(|v| v.trim() == "0");
    let parsed = if off {
        Ok(None)
    } else {
        parse(&|k| std::env::var(k).ok())
    };
    match parsed {
        Ok(Some(c)) => {
            let _ = CONFIG.set(c);
            state::init_fork_handlers();
            STATE.store(1, Ordering::Release);
        }
        Ok(None) => STATE.store(2, Ordering::Release),
        Err(line) => {
            crate::say(&format!("{line}; GPU calls pass through"));
            STATE.store(2, Ordering::Release);
        }
    }
}

/// Writes the counters where `HETMEM_GPU_STATS` asks (at exit).
pub fn finish() {
    let Some(c) = config() else { return };
    let Some(to) = &c.stats else { return };
    let json = state::json(c);
    match to {
        None => crate::say(&format!("gpu {json}")),
        Some(path) => {
            let path = path.replace("%p", &std::process::id().to_string());
            if let Err(e) = std::fs::write(&path, json + "\n") {
                crate::say(&format!("HETMEM_GPU_STATS={path}: {e}"));
            }
        }
    }
}

/// Runs `f`, turning a panic into `fallback` (nothing unwinds into C).
#[inline]
pub(crate) fn guard<R>(fallback: R, f: impl FnOnce() -> R) -> R {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(fallback)
}

extern "C" fn gpu_init() {
    let _ = std::panic::catch_unwind(init);
}

extern "C" fn gpu_fini() {
    let _ = std::panic::catch_unwind(finish);
}

#[cfg(not(test))]
#[used]
#[link_section = ".init_array"]
static GPU_INIT: extern "C" fn() = gpu_init;

#[cfg(not(test))]
#[used]
#[link_section = ".fini_array"]
static GPU_FINI: extern "C" fn() = gpu_fini;

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn limits_parse() {
        let l = parse_limits("0:8G,1:20G").unwrap();
        assert_eq!(l[0], Some(Limit::Bytes(8 << 30)));
        assert_eq!(l[1], Some(Limit::Bytes(20 << 30)));
        assert_eq!(l.get(2).copied().flatten(), None);
        let l = parse_limits("0.5").unwrap();
        assert_eq!(l[7], Some(Limit::Fraction(0.5)));
        let l = parse_limits("1:25%,64M").unwrap();
        assert_eq!(l[1], Some(Limit::Fraction(0.25)));
        assert_eq!(l[0], Some(Limit::Bytes(64 << 20)));
        for bad in ["", "x", "0:", "99:1G", "1.5", "0:-1", "150%", "a:1G"] {
            assert!(parse_limits(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_parses_and_refuses() {
        let c = parse(&env(&[])).unwrap().unwrap();
        assert_eq!(c, GpuConfig::default());
        assert_eq!(parse(&env(&[("HETMEM_GPU", "0")])).unwrap(), None);
        let c = parse(&env(&[
            ("HETMEM_GPU_MODE", "oversubscribe"),
            ("HETMEM_DEVICE_LIMIT", "1G"),
            ("HETMEM_GPU_PIN_ON_COPY", "1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.mode, Mode::Oversubscribe);
        assert_eq!(c.pin_on_copy, Some(64 << 20));
        assert_eq!(c.limit(3), Some(Limit::Bytes(1 << 30)));
        for bad in [
            &[("HETMEM_GPU_MODE", "fast")][..],
            &[("HETMEM_GPU_MODE", "oversubscribe")][..],
            &[("HETMEM_GPU", "maybe")][..],
            &[("HETMEM_GPU_PIN_ON_COPY", "lots")][..],
            &[("HETMEM_DEVICE_LIMIT_SHARED", "a")][..],
            &[
                ("HETMEM_DEVICE_LIMIT", "1G"),
                ("HETMEM_DEVICE_LIMIT_SHARED", "../x"),
            ][..],
        ] {
            let owned: Vec<(String, String)> = bad
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect();
            let get = move |k: &str| owned.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let e = parse(&get).unwrap_err();
            assert!(e.starts_with("HETMEM_"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}

// ---- what the wrappers share ------------------------------------------------------------

/// Declares the wrapped names of a module: `NAMES` (for `cuGetProcAddress` matching)
/// and `wrapper(name)`: the real-function slot and the wrapper of an exported name.
macro_rules! wrapped {
    ($($name:ident => $real:ident),* $(,)?) => {
        /// The wrapped names.
        #[allow(dead_code)]
        pub(crate) const NAMES: &[&std::ffi::CStr] = &[$(
            match std::ffi::CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                Ok(c) => c,
                Err(_) => panic!("a name with a NUL"),
            }
        ),*];
        /// The real-function slot and the wrapper of `name`, if wrapped here.
        pub(crate) fn wrapper(name: &[u8]) -> Option<(&'static $crate::gpu::real::Real, usize)> {
            let _ = name;
            $(
                if name == stringify!($name).as_bytes() {
                    return Some((&$real, $name as *const () as usize));
                }
            )*
            None
        }
    };
}
pub(crate) use wrapped;

/// The real-function slot and wrapper of an exported name the shim wraps.
pub fn wrapper_for(name: &[u8]) -> Option<(&'static real::Real, usize)> {
    driver::wrapper(name)
        .or_else(|| runtime::wrapper(name))
        .or_else(|| hip::wrapper(name))
}

/// The wrapped variants of a base name (`cuMemAlloc` → `cuMemAlloc_v2`, ...).
pub fn variants_of(
    asked: &[u8],
) -> impl Iterator<Item = (&'static std::ffi::CStr, &'static real::Real, usize)> + '_ {
    driver::NAMES
        .iter()
        .chain(hip::NAMES.iter())
        .filter(move |n| real::is_variant(asked, n.to_bytes()))
        .filter_map(|n| wrapper_for(n.to_bytes()).map(|(r, w)| (*n, r, w)))
}

std::thread_local! {
    // `const` and without a destructor: no TLS destructor is registered.
    static NESTED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    static OWN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Whether this thread runs hetmem's own code (the pool): its `dlsym` lookups get the
/// real functions. (A runtime wrapper's nesting does not count: the runtime loads the
/// driver inside the program's first call, and its lookups must get the wrappers.)
#[inline]
pub(crate) fn own() -> bool {
    OWN.with(|n| n.get() != 0)
}

/// Marks this thread inside hetmem's own code, and nested, until dropped.
pub(crate) struct Own(#[allow(dead_code)] Nest);

impl Own {
    pub(crate) fn enter() -> Own {
        OWN.with(|n| n.set(n.get().saturating_add(1)));
        Own(Nest::enter())
    }
}

impl Drop for Own {
    fn drop(&mut self) {
        OWN.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// Whether this thread is inside a runtime wrapper (whose driver calls, made by the
/// runtime, are then not counted twice).
#[inline]
pub(crate) fn nested() -> bool {
    NESTED.with(|n| n.get() != 0)
}

/// Marks this thread inside a runtime wrapper until dropped.
pub(crate) struct Nest;

impl Nest {
    pub(crate) fn enter() -> Nest {
        NESTED.with(|n| n.set(n.get().saturating_add(1)));
        Nest
    }
}

impl Drop for Nest {
    fn drop(&mut self) {
        NESTED.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// What a device allocation may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Charged to its device: allocate (and [`state::uncharge`] if that fails).
    Charged,
    /// Past the limit: fail with the out-of-memory code.
    Refused,
    /// Past the limit, oversubscribe: managed memory instead.
    Over,
}

/// Charges a device allocation against the device's limit.
pub(crate) fn admit(
    cfg: &GpuConfig,
    dev: i32,
    size: u64,
    total: &dyn Fn() -> Option<u64>,
) -> Admit {
    let limit = state::limit_bytes(cfg, dev, total);
    if state::charge(dev, size, limit) {
        Admit::Charged
    } else if cfg.mode == Mode::Oversubscribe {
        Admit::Over
    } else {
        Admit::Refused
    }
}

/// After the program's own memory-information call returned `rc`: with limits set,
/// the answer of the device `dev` names adjusted to its limit ([`adjust_info`]).
/// Nested calls (the shim's own) and null pointers are left as the driver wrote them.
///
/// # Safety
/// Non-null pointers were written by the call when `rc` is 0.
pub(crate) unsafe fn limit_mem_info(
    rc_ok: bool,
    outer: bool,
    free: *mut usize,
    total: *mut usize,
    dev: impl FnOnce() -> i32,
) {
    if !rc_ok || !outer || free.is_null() || total.is_null() {
        return;
    }
    if let Some(cfg) = config().filter(|c| !c.limits.is_empty()) {
        // SAFETY: both written by the successful call.
        guard((), || unsafe { adjust_info(cfg, dev(), free, total) });
    }
}

/// Adjusts a successful memory-information answer of `dev` to its limit: total = the
/// limit (at most the device's memory), free = total minus what the process holds (at
/// most what the driver says is free).
///
/// # Safety
/// Both pointers are valid and written by the driver's successful answer.
pub(crate) unsafe fn adjust_info(cfg: &GpuConfig, dev: i32, free: *mut usize, total: *mut usize) {
    // SAFETY: the caller's valid pointers.
    let (f, t) = unsafe { (*free as u64, *total as u64) };
    let Some(limit) = state::limit_bytes(cfg, dev, &|| Some(t)) else {
        return;
    };
    let t2 = limit.min(t);
    let f2 = f.min(t2.saturating_sub(state::held_all(dev)));
    // SAFETY: as above.
    unsafe {
        *total = t2 as usize;
        *free = f2 as usize;
    }
    state::INFO_ADJUSTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Pool mode: serves a device allocation already charged to `dev` from the pool.
/// `Some(code)`: handled (`0`, the address given to `out`; or `oom`, the charge given
/// back); `None`: the driver serves it.
pub(crate) fn pool_alloc(
    cfg: &GpuConfig,
    dev: i32,
    size: usize,
    stream: *mut std::ffi::c_void,
    oom: std::ffi::c_int,
    out: &mut dyn FnMut(u64),
) -> Option<std::ffi::c_int> {
    if !cfg.pooled() {
        return None;
    }
    let limit = state::limit_bytes(cfg, dev, &|| driver::total_mem(dev));
    match pool::alloc(dev, size, stream as u64, limit) {
        pool::Served::Pool(a) => {
            out(a);
            state::note_on(
                a,
                state::Rec {
                    size: size as u64,
                    dev,
                    kind: state::Kind::Device,
                },
                stream as u64,
            );
            state::POOL_SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(0)
        }
        pool::Served::OutOfMemory => {
            state::uncharge(dev, size as u64);
            Some(oom)
        }
        pool::Served::Driver => None,
    }
}

/// Pool mode: frees a pool block (stream-ordered on `stream` when given). `Some(0)`:
/// it was one; `Some(invalid)`: it was one, freed already (a double free answered as
/// the driver answers one, without reaching it); `None`: not the pool's.
pub(crate) fn pool_free(
    addr: u64,
    stream: Option<(i32, *mut std::ffi::c_void)>,
    invalid: std::ffi::c_int,
) -> Option<std::ffi::c_int> {
    if !config().is_some_and(GpuConfig::pooled) {
        return None;
    }
    // Out of the table before the block goes back to the pool: once it is back, another
    // thread may be given the same address and note it, which a later take would remove.
    let rec = state::detach(addr);
    if pool::free(addr, stream.map(|(d, s)| (d, s as u64))) {
        state::freed(addr, rec);
        return Some(0);
    }
    if let Some(r) = rec {
        state::reattach(addr, r);
    }
    if pool::freed_before(addr) {
        state::UNKNOWN_FREES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Some(invalid);
    }
    None
}

/// A device allocation the driver was asked for under an admitted charge: noted (and
/// known to pool mode as the driver's) when it succeeded, its charge given back when
/// it failed.
pub(crate) fn driver_alloc_done(
    ok: bool,
    addr: impl FnOnce() -> u64,
    size: usize,
    dev: i32,
    stream: u64,
) {
    if ok {
        let a = addr();
        state::note_on(
            a,
            state::Rec {
                size: size as u64,
                dev,
                kind: state::Kind::Device,
            },
            stream,
        );
        pool_driver_gave(a);
    } else {
        state::uncharge(dev, size as u64);
    }
}

/// Pool mode: the driver handed out `addr` (so it is no freed pool block).
pub(crate) fn pool_driver_gave(addr: u64) {
    if config().is_some_and(GpuConfig::pooled) {
        pool::driver_gave(addr);
    }
}

/// Pool mode: pinned memory from the host pool for an allocation with `flags` (only
/// the default and portable ones: mapped and write-combined memory is the driver's).
pub(crate) fn pool_pinned(size: usize, flags: u32) -> Option<u64> {
    if nested() || flags & !1 != 0 || !config().is_some_and(GpuConfig::pooled) {
        return None;
    }
    let a = pool::alloc_pinned(size)?;
    state::note(
        a,
        state::Rec {
            size: size as u64,
            dev: -1,
            kind: state::Kind::Pinned,
        },
    );
    state::POOL_PINNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Some(a)
}

/// Pool mode: frees pinned memory of the host pool; true when it was its.
pub(crate) fn pool_free_pinned(addr: u64) -> bool {
    if nested() || !config().is_some_and(GpuConfig::pooled) {
        return false;
    }
    if pool::free_pinned(addr) {
        let _ = state::take(addr);
        return true;
    }
    false
}
