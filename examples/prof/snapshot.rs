//! `prof snapshot`: a PyTorch memory snapshot (the dictionary
//! `torch.cuda.memory._snapshot()` returns, pickled) of device memory, for
//! pytorch.org/memory_viz and `python -m torch.cuda._memory_viz`. Pinned memory is its
//! own device index (one past the last GPU), since the viewer draws no host memory.
//!
//! Pool memory is expandable segments: each run of mapped memory is a segment
//! (`is_expandable`), `segment_map` / `segment_unmap` in the history; blocks tile their
//! segment in address order (`active_allocated`, `inactive` between). Device memory
//! allocated outside a pool and pinned memory are a segment each (`segment_alloc`, then
//! `alloc`; `free_requested`, `free_completed`, `segment_free`). The history is the
//! last `max_entries` per device of the window (as PyTorch's ring buffer), so replayed
//! backwards from the final segments, as the viewer does, it stays consistent.
//!
//! Written as pickle protocol 4 of plain containers (dict, list, str, int, bool, None,
//! a tuple), with only the opcodes the viewer's JavaScript unpickler reads.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{BufWriter, Write};

use rustc_hash::FxHashMap;

use crate::input::{Ev, Stream, Tier, NO_SITE};

pub struct Opts {
    pub from_ns: u64,
    pub to_ns: u64,
    pub max_entries: usize,
}

/// A pickled value.
pub enum P {
    Dict(Vec<(&'static str, P)>),
    List(Vec<P>),
    Tuple2(Box<P>, Box<P>),
    Str(String),
    Int(i64),
    Bool(bool),
}

pub fn write_pickle(v: &P, w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(&[0x80, 4])?;
    put(v, w)?;
    w.write_all(b".")
}

fn put_str(s: &str, w: &mut impl Write) -> std::io::Result<()> {
    let b = s.as_bytes();
    if b.len() < 256 {
        w.write_all(&[0x8c, b.len() as u8])?;
    } else {
        w.write_all(b"X")?;
        w.write_all(&(b.len() as u32).to_le_bytes())?;
    }
    w.write_all(b)
}

fn put(v: &P, w: &mut impl Write) -> std::io::Result<()> {
    match v {
        P::Dict(items) => {
            w.write_all(b"}")?;
            for batch in items.chunks(1000) {
                w.write_all(b"(")?;
                for (k, v) in batch {
                    put_str(k, w)?;
                    put(v, w)?;
                }
                w.write_all(b"u")?;
            }
        }
        P::List(items) => {
            w.write_all(b"]")?;
            for batch in items.chunks(1000) {
                w.write_all(b"(")?;
                for v in batch {
                    put(v, w)?;
                }
                w.write_all(b"e")?;
            }
        }
        P::Tuple2(a, b) => {
            put(a, w)?;
            put(b, w)?;
            w.write_all(&[0x86])?;
        }
        P::Str(s) => put_str(s, w)?,
        P::Int(i) => {
            let i = *i;
            if (0..256).contains(&i) {
                w.write_all(&[b'K', i as u8])?;
            } else if (0..65536).contains(&i) {
                w.write_all(b"M")?;
                w.write_all(&(i as u16).to_le_bytes())?;
            } else if i32::try_from(i).is_ok() {
                w.write_all(b"J")?;
                w.write_all(&(i as i32).to_le_bytes())?;
            } else {
                w.write_all(&[0x8a, 8])?;
                w.write_all(&i.to_le_bytes())?;
            }
        }
        P::Bool(b) => w.write_all(&[if *b { 0x88 } else { 0x89 }])?,
    }
    Ok(())
}

fn int(v: u64) -> P {
    P::Int(v.min(i64::MAX as u64) as i64)
}

fn frames(sites: &[String], site: u32) -> P {
    if site == NO_SITE {
        return P::List(Vec::new());
    }
    P::List(
        sites[site as usize]
            .lines()
            .map(|name| {
                P::Dict(vec![
                    ("filename", P::Str(String::new())),
                    ("line", P::Int(0)),
                    ("name", P::Str(name.to_owned())),
                ])
            })
            .collect(),
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Alloc,
    FreeRequested,
    FreeCompleted,
    SegmentAlloc,
    SegmentFree,
    SegmentMap,
    SegmentUnmap,
    Oom,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Alloc => "alloc",
            Action::FreeRequested => "free_requested",
            Action::FreeCompleted => "free_completed",
            Action::SegmentAlloc => "segment_alloc",
            Action::SegmentFree => "segment_free",
            Action::SegmentMap => "segment_map",
            Action::SegmentUnmap => "segment_unmap",
            Action::Oom => "oom",
        }
    }
}

struct Entry {
    action: Action,
    addr: u64,
    size: u64,
    stream: u64,
    t: u64,
    site: u32,
    free: u64,
}

/// A device index of the snapshot: a GPU, or pinned memory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Dev {
    Gpu(u32),
    Pinned,
}

#[derive(Default)]
struct DevState {
    /// Mapped runs of pool memory: start → length (merged when they touch).
    mapped: BTreeMap<u64, u64>,
    /// Segments of their own (plain device allocations, pinned blocks): start → length.
    own: BTreeMap<u64, u64>,
    /// Live blocks: address → (requested size, stream, site).
    blocks: BTreeMap<u64, (u64, u64, u32)>,
    trace: VecDeque<Entry>,
}

impl DevState {
    fn log(&mut self, e: Entry, max: usize, inside: bool) {
        if !inside {
            return;
        }
        if self.trace.len() >= max {
            self.trace.pop_front();
        }
        self.trace.push_back(e);
    }

    fn map(&mut self, addr: u64, size: u64) {
        let (mut a, mut s) = (addr, size);
        if let Some((&pa, &ps)) = self.mapped.range(..=addr).next_back() {
            if pa + ps == addr {
                self.mapped.remove(&pa);
                a = pa;
                s += ps;
            }
        }
        if let Some(&ns) = self.mapped.get(&(addr + size)) {
            self.mapped.remove(&(addr + size));
            s += ns;
        }
        self.mapped.insert(a, s);
    }

    fn unmap(&mut self, addr: u64, size: u64) {
        let Some((&pa, &ps)) = self.mapped.range(..=addr).next_back() else {
            return;
        };
        if addr + size > pa + ps {
            return;
        }
        self.mapped.remove(&pa);
        if addr > pa {
            self.mapped.insert(pa, addr - pa);
        }
        if addr + size < pa + ps {
            self.mapped.insert(addr + size, pa + ps - addr - size);
        }
    }
}

/// The size a pool block takes: the request rounded to the pool's 512 bytes.
fn rounded(size: u64) -> u64 {
    size.div_ceil(512) * 512
}

pub fn run(paths: &[String], out_path: &str, o: &Opts) -> Result<String, String> {
    let mut s = Stream::open(paths)?;
    let mut devs: BTreeMap<Dev, DevState> = BTreeMap::new();
    let mut last_alloc: FxHashMap<(usize, u32), (Dev, u64)> = FxHashMap::default();
    let mut max_gpu: Option<u32> = None;
    let m = o.max_entries;
    while let Some(it) = s.next()? {
        if it.t > o.to_ns {
            break;
        }
        let inside = it.t >= o.from_ns;
        let t = it.t;
        let e = |action, addr, size, stream| Entry {
            action,
            addr,
            size,
            stream,
            t,
            site: NO_SITE,
            free: 0,
        };
        match it.ev {
            Ev::Alloc {
                tier,
                addr,
                size,
                stream,
                pooled,
            } => {
                let dev = match tier {
                    Tier::Device(d) | Tier::Managed(d) => {
                        max_gpu = Some(max_gpu.map_or(d, |m| m.max(d)));
                        Dev::Gpu(d)
                    }
                    Tier::Pinned => Dev::Pinned,
                    _ => continue,
                };
                let st = devs.entry(dev).or_default();
                if !pooled {
                    st.own.insert(addr, size);
                    st.log(e(Action::SegmentAlloc, addr, size, stream), m, inside);
                }
                st.blocks.insert(addr, (size, stream, NO_SITE));
                st.log(e(Action::Alloc, addr, size, stream), m, inside);
                last_alloc.insert((it.file, it.thread), (dev, addr));
            }
            Ev::Free {
                tier, addr, pooled, ..
            } => {
                let dev = match tier {
                    Tier::Device(d) | Tier::Managed(d) => Dev::Gpu(d),
                    Tier::Pinned => Dev::Pinned,
                    _ => continue,
                };
                let st = devs.entry(dev).or_default();
                let Some((size, stream, _)) = st.blocks.remove(&addr) else {
                    continue;
                };
                st.log(e(Action::FreeRequested, addr, size, stream), m, inside);
                st.log(e(Action::FreeCompleted, addr, size, stream), m, inside);
                if !pooled {
                    if let Some(seg) = st.own.remove(&addr) {
                        st.log(e(Action::SegmentFree, addr, seg, stream), m, inside);
                    }
                }
            }
            Ev::Map { device, addr, size } => {
                max_gpu = Some(max_gpu.map_or(device, |m| m.max(device)));
                let st = devs.entry(Dev::Gpu(device)).or_default();
                st.map(addr, size);
                st.log(e(Action::SegmentMap, addr, size, 0), m, inside);
            }
            Ev::Unmap { device, addr, size } => {
                let st = devs.entry(Dev::Gpu(device)).or_default();
                st.unmap(addr, size);
                st.log(e(Action::SegmentUnmap, addr, size, 0), m, inside);
            }
            Ev::Oom {
                tier: Tier::Device(d),
                requested,
                free,
                ..
            } => {
                let st = devs.entry(Dev::Gpu(d)).or_default();
                let mut x = e(Action::Oom, 0, requested, 0);
                x.free = free;
                st.log(x, m, inside);
            }
            Ev::Site { site } => {
                if let Some((dev, addr)) = last_alloc.get(&(it.file, it.thread)) {
                    if let Some(st) = devs.get_mut(dev) {
                        if let Some(b) = st.blocks.get_mut(addr) {
                            b.2 = site;
                        }
                        if let Some(x) = st.trace.back_mut() {
                            if x.addr == *addr && x.action == Action::Alloc {
                                x.site = site;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let sites = &s.input.sites;
    let pinned_index = max_gpu.map_or(0, |m| m + 1);
    let index = |d: Dev| match d {
        Dev::Gpu(g) => g,
        Dev::Pinned => pinned_index,
    };
    let n_devices = devs.keys().map(|d| index(*d) + 1).max().unwrap_or(0);
    let mut segments = Vec::new();
    let mut traces: Vec<P> = (0..n_devices).map(|_| P::List(Vec::new())).collect();
    let mut orphans = 0usize;
    for (dev, st) in &devs {
        let di = index(*dev);
        let mut segs: Vec<(u64, u64, bool)> = st
            .mapped
            .iter()
            .map(|(a, s)| (*a, *s, true))
            .chain(st.own.iter().map(|(a, s)| (*a, *s, false)))
            .collect();
        segs.sort();
        for (base, total, expandable) in segs {
            let mut blocks = Vec::new();
            let mut at = base;
            let (mut allocated, mut requested) = (0u64, 0u64);
            let mut stream0 = 0;
            for (&addr, &(size, stream, site)) in st.blocks.range(base..base + total) {
                if addr < at {
                    orphans += 1;
                    continue;
                }
                if addr > at {
                    blocks.push(inactive(addr - at));
                }
                let next = st
                    .blocks
                    .range(addr + 1..)
                    .next()
                    .map_or(base + total, |(a, _)| (*a).min(base + total));
                let bsize = if expandable {
                    rounded(size).min(next - addr).max(size.min(next - addr))
                } else {
                    total
                };
                let bsize = bsize.min(base + total - addr);
                if stream0 == 0 {
                    stream0 = stream;
                }
                allocated += bsize;
                requested += size.min(bsize);
                blocks.push(P::Dict(vec![
                    ("address", int(addr)),
                    ("size", int(bsize)),
                    ("requested_size", int(size.min(bsize))),
                    ("state", P::Str("active_allocated".into())),
                    ("frames", frames(sites, site)),
                ]));
                at = addr + bsize;
            }
            if at < base + total {
                blocks.push(inactive(base + total - at));
            }
            segments.push(P::Dict(vec![
                ("device", int(u64::from(di))),
                ("address", int(base)),
                ("total_size", int(total)),
                ("allocated_size", int(allocated)),
                ("active_size", int(allocated)),
                ("requested_size", int(requested)),
                ("stream", int(if expandable { 0 } else { stream0 })),
                (
                    "segment_type",
                    P::Str(if total <= 2 << 20 { "small" } else { "large" }.into()),
                ),
                (
                    "segment_pool_id",
                    P::Tuple2(Box::new(P::Int(0)), Box::new(P::Int(0))),
                ),
                ("is_expandable", P::Bool(expandable)),
                ("frames", P::List(Vec::new())),
                ("blocks", P::List(blocks)),
            ]));
        }
        // Blocks outside every segment (the record began after their memory was
        // mapped) cannot be drawn; counted.
        orphans += st
            .blocks
            .keys()
            .filter(|a| {
                let inside = |m: &BTreeMap<u64, u64>| {
                    m.range(..=**a)
                        .next_back()
                        .is_some_and(|(b, s)| **a < b + s)
                };
                !inside(&st.mapped) && !inside(&st.own)
            })
            .count();
        let trace: Vec<P> = st
            .trace
            .iter()
            .map(|x| {
                let mut d = vec![
                    ("action", P::Str(x.action.name().into())),
                    ("addr", int(x.addr)),
                    ("size", int(x.size)),
                    ("stream", int(x.stream)),
                    ("time_us", int(x.t / 1000)),
                    ("frames", frames(sites, x.site)),
                ];
                if x.action == Action::Oom {
                    d.push(("device_free", int(x.free)));
                }
                P::Dict(d)
            })
            .collect();
        traces[di as usize] = P::List(trace);
    }
    let snap = P::Dict(vec![
        ("segments", P::List(segments)),
        ("device_traces", P::List(traces)),
        (
            "allocator_settings",
            P::Dict(vec![("expandable_segments", P::Bool(true))]),
        ),
    ]);
    let f = File::create(out_path).map_err(|e| format!("{out_path}: {e}"))?;
    let mut w = BufWriter::new(f);
    write_pickle(&snap, &mut w)
        .and_then(|_| w.flush())
        .map_err(|e| format!("{out_path}: {e}"))?;
    let gpus = max_gpu.map_or(0, |m| m + 1);
    Ok(format!(
        "{gpus} GPU(s) as devices 0..{gpus}, pinned memory as device {pinned_index}{}",
        if orphans > 0 {
            format!("; {orphans} blocks outside any recorded segment left out")
        } else {
            String::new()
        }
    ))
}

fn inactive(size: u64) -> P {
    P::Dict(vec![
        ("size", int(size)),
        ("requested_size", int(0)),
        ("state", P::Str("inactive".into())),
        ("frames", P::List(Vec::new())),
    ])
}
