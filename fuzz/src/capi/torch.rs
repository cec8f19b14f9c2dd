//! PyTorch's allocator entry points (`hetmem_torch_*`, the process-wide allocator on
//! the simulator): allocations on every kind of stream value, frees of live, inner,
//! freed and NULL addresses, record_stream, empty_cache, graph pools with a C filter
//! whose context must be dropped exactly once, and the stats JSON.
//!
//! The allocator is one for the process, so every call here holds the model's torch
//! lock: the model then knows which blocks are live. Device memory is not readable by
//! the CPU, so there are no bytes to compare.

use std::collections::BTreeMap;
use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};

use hetmem::ffi::torch::*;
use hetmem::ffi::*;

use super::{addr_ptr, last_error, lock, Expect, Thread};

/// Contexts handed to hetmem_torch_begin_allocate_to_pool, and those dropped.
static CTX_GIVEN: AtomicU64 = AtomicU64::new(0);
static CTX_DROPPED: AtomicU64 = AtomicU64::new(0);

/// What a graph pool's filter answers.
struct FilterCtx {
    answer: c_int,
}

unsafe extern "C" fn filter(ctx: *mut c_void, _stream: *mut c_void) -> c_int {
    // SAFETY: hetmem passes back the context given with this filter, a live FilterCtx
    // until drop_ctx.
    unsafe { (*ctx.cast::<FilterCtx>()).answer }
}

unsafe extern "C" fn drop_ctx(ctx: *mut c_void) {
    CTX_DROPPED.fetch_add(1, Ordering::Relaxed);
    // SAFETY: made by Box::into_raw in `begin`; hetmem calls drop_ctx once (a second
    // call would be a double free, which AddressSanitizer reports).
    drop(unsafe { Box::from_raw(ctx.cast::<FilterCtx>()) });
}

/// One graph pool as the model sees it.
#[derive(Debug, Clone, Copy, Default)]
struct Pool {
    /// Being allocated to (a begin without its end).
    allocating: bool,
    /// Begins not yet undone by a release.
    uses: u32,
    /// The filter's answer while allocating.
    answer: c_int,
    /// When its begin came (the newest route is asked first).
    order: u64,
}

#[derive(Default)]
pub(crate) struct TorchModel {
    /// Whether the allocator opened (None: not tried yet).
    available: Option<bool>,
    /// Live blocks: address → (size, device).
    blocks: BTreeMap<u64, (usize, usize)>,
    dead: Vec<u64>,
    /// (device, pool_a) → pool (pool_b is always 0).
    pools: BTreeMap<(usize, u64), Pool>,
    devices: usize,
}

impl TorchModel {
    fn allocating(&self) -> bool {
        self.pools.values().any(|p| p.allocating)
    }
}

/// A void or pointer-returning call's outcome as a status: 0, or "some error" (-1000)
/// when the last error is set.
fn status_of(failed: bool) -> c_int {
    if failed {
        -1000
    } else {
        HETMEM_OK
    }
}

impl Thread<'_> {
    pub(crate) fn op_torch(&mut self) {
        let w = self.w;
        let mut m = lock(&w.torch);
        if m.available.is_none() {
            // The first call opens the allocator (the simulator, as HETMEM_BACKEND says).
            // SAFETY: a size of 0 allocates nothing.
            unsafe { hetmem_torch_malloc(0, 0, std::ptr::null_mut()) };
            let mut needed = 0usize;
            let mut buf = vec![0u8; 1 << 16];
            // SAFETY: `buf` holds its length.
            let rc =
                unsafe { hetmem_torch_stats_json(buf.as_mut_ptr().cast(), buf.len(), &mut needed) };
            let mut e = Expect::ok();
            e.env(HETMEM_ERR_BUFFER_TOO_SMALL);
            self.check("hetmem_torch_stats_json", rc, &e, &|| "first".into());
            // SAFETY: one byte of the smallest size, to learn whether a backend opened.
            let p = unsafe { hetmem_torch_malloc(1, 0, std::ptr::null_mut()) };
            m.available = Some(!p.is_null());
            if !p.is_null() {
                // SAFETY: the block just allocated.
                unsafe { hetmem_torch_free(p, 1, 0, std::ptr::null_mut()) };
            }
            let json = CStr::from_bytes_until_nul(&buf)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
            let _ = &v["devices"];
            m.devices = std::env::var("HETMEM_SIM_DEVICES")
                .ok()
                .and_then(|d| d.parse().ok())
                .unwrap_or(1);
            if v["live_blocks"].as_u64().unwrap_or(0) != 0 {
                self.contract(
                    "hetmem_torch_stats_json",
                    "blocks live at the start",
                    || json.clone(),
                );
            }
        }
        if m.available != Some(true) {
            return;
        }
        match self.rng.below(20) {
            0..=7 => self.torch_malloc(&mut m),
            8..=12 => self.torch_free(&mut m),
            13 | 14 => self.torch_record(&mut m),
            15 => self.torch_empty(&m),
            16..=18 => self.torch_pools(&mut m),
            _ => self.torch_stats(&m),
        }
    }

    /// A stream value for the allocator: NULL, the legacy and per-thread values, or
    /// one that is no stream (the simulator refuses it).
    fn torch_stream(&mut self, e: &mut Expect) -> *mut c_void {
        match self.rng.below(10) {
            0..=3 => std::ptr::null_mut(),
            4 | 5 => std::ptr::without_provenance_mut(1),
            6..=8 => std::ptr::without_provenance_mut(2),
            _ => {
                e.fault("a value that is no stream", HETMEM_ERR_INVALID_ARGUMENT);
                std::ptr::without_provenance_mut(0xdead_0000)
            }
        }
    }

    fn torch_malloc(&mut self, m: &mut TorchModel) {
        let mut e = Expect::ok();
        let devices = m.devices;
        let device: c_int = match self.rng.below(12) {
            0 => {
                e.fault("negative device", HETMEM_ERR_INVALID_ARGUMENT);
                -1
            }
            1 => {
                e.fault("unknown device", HETMEM_ERR_UNKNOWN_DEVICE);
                devices as c_int + 3
            }
            _ => self.rng.index(devices) as c_int,
        };
        let stream = self.torch_stream(&mut e);
        let size: isize = match self.rng.below(20) {
            0 => 0,
            1 => {
                e.fault("negative size", HETMEM_ERR_INVALID_SIZE);
                -1 - self.rng.below(100) as isize
            }
            2 => {
                e.fault("more than the device has", HETMEM_ERR_OUT_OF_MEMORY)
                    .env(HETMEM_ERR_INVALID_SIZE);
                self.rng.pick(&[1 << 40, isize::MAX])
            }
            _ => self.rng.size(1 << 20) as isize,
        };
        if m.blocks.len() >= 32 && size > 0 && e.ok {
            return;
        }
        // A pool whose filter fails makes its device's allocations fail.
        if device >= 0 && (device as usize) < devices {
            // The newest pool whose filter answers decides: a failing filter fails the
            // allocation.
            let mut active: Vec<(u64, c_int)> = m
                .pools
                .iter()
                .filter(|((d, _), p)| *d == device as usize && p.allocating)
                .map(|(_, p)| (p.order, p.answer))
                .collect();
            active.sort_unstable();
            if active
                .iter()
                .rev()
                .find(|(_, a)| *a != 0)
                .is_some_and(|(_, a)| *a < 0)
            {
                e.fault("a graph pool's filter failing", HETMEM_ERR_INVALID_ARGUMENT);
            }
        }
        // SAFETY: `stream` is NULL, a special value, or a value the simulator refuses.
        let p = unsafe { hetmem_torch_malloc(size, device, stream) };
        let msg = last_error();
        let failed = p.is_null() && size != 0;
        let rc = status_of(failed);
        self.w.report.call(e.bad(), !failed);
        let args =
            || format!("size {size}, device {device}, stream {stream:?}; last error {msg:?}");
        if size == 0 {
            if !p.is_null() || !msg.is_empty() {
                self.contract("hetmem_torch_malloc", "size 0", args);
            }
            return;
        }
        if rc == HETMEM_OK && !e.ok {
            self.w.report.find(
                crate::Kind::AcceptedBadInput,
                "hetmem_torch_malloc",
                &e.faults.join("+"),
                None,
                args,
            );
        } else if failed && e.ok {
            self.w.report.find(
                crate::Kind::WrongStatus,
                "hetmem_torch_malloc",
                "failed",
                None,
                args,
            );
        }
        if failed && !msg.starts_with("hetmem_torch_malloc") {
            self.contract(
                "hetmem_torch_malloc",
                "last error does not name the call",
                args,
            );
        }
        if !failed && !msg.is_empty() {
            self.contract(
                "hetmem_torch_malloc",
                "last error left after a success",
                args,
            );
        }
        if !p.is_null() {
            let a = p.addr() as u64;
            let overlap = m
                .blocks
                .range(..a + size as u64)
                .next_back()
                .is_some_and(|(b, (len, _))| b + *len as u64 > a);
            if overlap {
                self.contract("hetmem_torch_malloc", "a live block handed out again", args);
            }
            m.dead.retain(|d| *d != a);
            m.blocks.insert(a, (size as usize, device as usize));
        }
    }

    fn torch_free(&mut self, m: &mut TorchModel) {
        let (p, live, size, device) = match self.rng.below(10) {
            0..=6 if !m.blocks.is_empty() => {
                let (a, (len, d)) = m
                    .blocks
                    .iter()
                    .nth(self.rng.index(m.blocks.len()))
                    .map(|(a, v)| (*a, *v))
                    .expect("not empty");
                (a, true, len as isize, d as c_int)
            }
            7 if !m.dead.is_empty() => (m.dead[self.rng.index(m.dead.len())], false, 64, 0),
            8 if !m.blocks.is_empty() => {
                let (a, (len, d)) = m
                    .blocks
                    .iter()
                    .next()
                    .map(|(a, v)| (*a, *v))
                    .expect("not empty");
                if len < 2 {
                    return;
                }
                (a + 1 + self.rng.below(len as u64 - 1), false, 8, d as c_int)
            }
            _ => (0, false, 0, 0),
        };
        let mut e = Expect::ok();
        let stream = self.torch_stream(&mut Expect::ok());
        // SAFETY: the address is only looked up; `stream` is only logged.
        unsafe { hetmem_torch_free(addr_ptr(p), size, device, stream) };
        let msg = last_error();
        let failed = !msg.is_empty();
        let bad = p != 0 && !live;
        if bad {
            e.fault(
                "an address that is no live block",
                HETMEM_ERR_FOREIGN_POINTER,
            );
        }
        self.w.report.call(bad, !failed);
        if bad != failed {
            let kind = if bad {
                crate::Kind::AcceptedBadInput
            } else {
                crate::Kind::WrongStatus
            };
            self.w.report.find(
                kind,
                "hetmem_torch_free",
                if bad {
                    "freed or inner address"
                } else {
                    "live block"
                },
                None,
                || format!("{p:#x}, live {live}; last error {msg:?}"),
            );
        }
        if live {
            m.blocks.remove(&p);
            if m.dead.len() >= 64 {
                m.dead.remove(0);
            }
            m.dead.push(p);
        }
    }

    fn torch_record(&mut self, m: &mut TorchModel) {
        let mut e = Expect::ok();
        let p = match self.rng.below(10) {
            0..=6 if !m.blocks.is_empty() => {
                let (a, (len, _)) = m
                    .blocks
                    .iter()
                    .nth(self.rng.index(m.blocks.len()))
                    .map(|(a, v)| (*a, *v))
                    .expect("not empty");
                a + self.rng.below(len as u64)
            }
            7 if !m.dead.is_empty() => {
                let d = m.dead[self.rng.index(m.dead.len())];
                if m.blocks
                    .range(..=d)
                    .next_back()
                    .is_some_and(|(b, (len, _))| d < b + *len as u64)
                {
                    return;
                }
                e.fault("a freed block", HETMEM_ERR_FOREIGN_POINTER);
                d
            }
            8 => 0,
            _ => {
                e.fault("an address that is no block", HETMEM_ERR_FOREIGN_POINTER);
                0x1000
            }
        };
        let stream = self.torch_stream(&mut e);
        if p == 0 {
            e = Expect::ok();
        }
        // SAFETY: the address is only looked up; the stream is NULL, a special value,
        // or a value the simulator refuses.
        let rc = unsafe { hetmem_torch_record_stream(addr_ptr(p), stream) };
        self.check("hetmem_torch_record_stream", rc, &e, &|| {
            format!("{p:#x}, stream {stream:?}")
        });
    }

    fn torch_empty(&mut self, m: &TorchModel) {
        let mut e = Expect::ok();
        if m.allocating() {
            e.fault(
                "a graph pool being allocated to",
                HETMEM_ERR_STREAM_CAPTURING,
            );
        }
        let rc = hetmem_torch_empty_cache();
        self.check("hetmem_torch_empty_cache", rc, &e, &|| "".into());
    }

    fn torch_pools(&mut self, m: &mut TorchModel) {
        let devices = m.devices;
        let mut e = Expect::ok();
        let (device, d): (c_int, Option<usize>) = match self.rng.below(12) {
            0 => {
                e.fault("unknown device", HETMEM_ERR_UNKNOWN_DEVICE);
                (devices as c_int + 1, None)
            }
            1 => {
                e.fault("negative device", HETMEM_ERR_INVALID_ARGUMENT);
                (-1 - self.rng.below(3) as c_int, None)
            }
            _ => {
                let d = self.rng.index(devices);
                (d as c_int, Some(d))
            }
        };
        let a = 1 + self.rng.below(3);
        let pool = d.map(|d| m.pools.get(&(d, a)).copied().unwrap_or_default());
        match self.rng.below(3) {
            0 => {
                if pool.is_some_and(|p| p.allocating) {
                    e.fault("a pool allocated to already", HETMEM_ERR_INVALID_ARGUMENT);
                }
                let with_filter = self.rng.chance(60);
                let answer = match self.rng.below(10) {
                    0 => -1,
                    1..=3 => 0,
                    _ => 1,
                };
                let (f, ctx, drop_f): (Option<StreamFilterFn>, *mut c_void, Option<DropCtxFn>) =
                    if with_filter {
                        CTX_GIVEN.fetch_add(1, Ordering::Relaxed);
                        let b = Box::into_raw(Box::new(FilterCtx { answer }));
                        (Some(filter), b.cast(), Some(drop_ctx))
                    } else {
                        (None, std::ptr::null_mut(), None)
                    };
                // SAFETY: the filter and drop_ctx take this context (hetmem owns it from
                // here); they call nothing of hetmem's.
                let rc =
                    unsafe { hetmem_torch_begin_allocate_to_pool(device, a, 0, f, ctx, drop_f) };
                if self.check("hetmem_torch_begin_allocate_to_pool", rc, &e, &|| {
                    format!("device {device}, pool ({a}, 0)")
                }) {
                    if let Some(d) = d {
                        let p = m.pools.entry((d, a)).or_default();
                        p.allocating = true;
                        p.uses += 1;
                        p.answer = if with_filter { answer } else { 1 };
                        p.order = self.w.names.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            1 => {
                if !pool.is_some_and(|p| p.allocating) {
                    // An unknown device has no pool being allocated to either.
                    e.fault("a pool not allocated to", HETMEM_ERR_INVALID_ARGUMENT);
                }
                let rc = hetmem_torch_end_allocate_to_pool(device, a, 0);
                if self.check("hetmem_torch_end_allocate_to_pool", rc, &e, &|| {
                    format!("device {device}, pool ({a}, 0)")
                }) {
                    if let Some(p) = d.and_then(|d| m.pools.get_mut(&(d, a))) {
                        p.allocating = false;
                    }
                }
            }
            _ => {
                if pool.is_some_and(|p| p.allocating) {
                    e.fault("a pool still allocated to", HETMEM_ERR_INVALID_ARGUMENT);
                }
                if d.is_none() && device >= 0 {
                    // "A pool hetmem does not have is no error": an unknown device has
                    // none.
                    e = Expect::ok();
                    e.edge("unknown device", HETMEM_ERR_UNKNOWN_DEVICE);
                }
                let rc = hetmem_torch_release_pool(device, a, 0);
                if self.check("hetmem_torch_release_pool", rc, &e, &|| {
                    format!("device {device}, pool ({a}, 0)")
                }) {
                    if let Some(dd) = d {
                        if let Some(p) = m.pools.get_mut(&(dd, a)) {
                            p.uses = p.uses.saturating_sub(1);
                            if p.uses == 0 && !p.allocating {
                                m.pools.remove(&(dd, a));
                            }
                        }
                    }
                }
            }
        }
    }

    fn torch_stats(&mut self, m: &TorchModel) {
        let mut needed = 0usize;
        let mut e = Expect::ok();
        e.fault("no buffer", HETMEM_ERR_BUFFER_TOO_SMALL);
        // SAFETY: no buffer; `needed` valid.
        let rc = unsafe { hetmem_torch_stats_json(std::ptr::null_mut(), 0, &mut needed) };
        self.check("hetmem_torch_stats_json", rc, &e, &|| "no buffer".into());
        let mut buf = vec![0u8; needed + 8];
        // SAFETY: `buf` holds its length.
        let rc = unsafe {
            hetmem_torch_stats_json(buf.as_mut_ptr().cast(), buf.len(), std::ptr::null_mut())
        };
        if !self.check("hetmem_torch_stats_json", rc, &Expect::ok(), &|| {
            format!("cap {}", buf.len())
        }) {
            return;
        }
        let json = CStr::from_bytes_until_nul(&buf)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        match serde_json::from_str::<serde_json::Value>(&json) {
            Ok(v) => {
                if v["live_blocks"].as_u64() != Some(m.blocks.len() as u64) {
                    self.contract("hetmem_torch_stats_json", "live blocks", || {
                        format!(
                            "{} live blocks, the model has {}",
                            v["live_blocks"],
                            m.blocks.len()
                        )
                    });
                }
            }
            Err(err) => self.contract("hetmem_torch_stats_json", "not JSON", || {
                format!("{err}: {json}")
            }),
        }
    }

    /// Frees every block, ends and releases every pool, and checks that each filter
    /// context given was dropped exactly once.
    pub(crate) fn torch_teardown(&mut self) {
        let mut m = lock(&self.w.torch);
        for (a, (len, d)) in std::mem::take(&mut m.blocks) {
            // SAFETY: a live block.
            unsafe {
                hetmem_torch_free(addr_ptr(a), len as isize, d as c_int, std::ptr::null_mut())
            };
            self.w.report.call(false, true);
            let msg = last_error();
            if !msg.is_empty() {
                self.w.report.find(
                    crate::Kind::WrongStatus,
                    "hetmem_torch_free",
                    "live block",
                    None,
                    || msg.clone(),
                );
            }
        }
        for ((d, a), p) in std::mem::take(&mut m.pools) {
            if p.allocating {
                let rc = hetmem_torch_end_allocate_to_pool(d as c_int, a, 0);
                self.check(
                    "hetmem_torch_end_allocate_to_pool",
                    rc,
                    &Expect::ok(),
                    &|| "teardown".into(),
                );
            }
            for _ in 0..p.uses {
                let rc = hetmem_torch_release_pool(d as c_int, a, 0);
                self.check("hetmem_torch_release_pool", rc, &Expect::ok(), &|| {
                    "teardown".into()
                });
            }
        }
        if m.available == Some(true) {
            let rc = hetmem_torch_empty_cache();
            self.check("hetmem_torch_empty_cache", rc, &Expect::ok(), &|| {
                "teardown".into()
            });
        }
        let (given, dropped) = (
            CTX_GIVEN.load(Ordering::Relaxed),
            CTX_DROPPED.load(Ordering::Relaxed),
        );
        if given != dropped {
            self.contract(
                "hetmem_torch_begin_allocate_to_pool",
                "filter contexts dropped",
                || format!("{given} given, {dropped} dropped after every pool ended"),
            );
        }
        m.available = None;
    }
}
