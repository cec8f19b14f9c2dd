//! Reading records: one or more files (the library's and the shim's of one run) merged
//! by time, streamed (a chunk of each file in memory at a time), into normalised
//! events with the tier each touches.

use std::collections::BinaryHeap;
use std::fs::File;
use std::io::BufReader;

use hetmem::record::{device_flags, Event, EventKind, Placement, Reader};
use rustc_hash::FxHashMap;

/// Where memory is: the tracks every tool draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Small host blocks of the shim (malloc's).
    HostSmall,
    /// Large host blocks by NUMA node (`u32::MAX`: no single node).
    Host(u32),
    /// Pinned host memory.
    Pinned,
    /// Device memory allocated (blocks) on a device.
    Device(u32),
    /// Managed memory of a device.
    Managed(u32),
}

impl Tier {
    pub fn name(&self) -> String {
        match self {
            Tier::HostSmall => "host small".into(),
            Tier::Host(u32::MAX) => "host".into(),
            Tier::Host(n) => format!("host node {n}"),
            Tier::Pinned => "pinned".into(),
            Tier::Device(d) => format!("device {d}"),
            Tier::Managed(d) => format!("managed {d}"),
        }
    }
}

/// A normalised event at an absolute monotonic time (ns).
#[derive(Debug, Clone)]
pub enum Ev {
    Alloc {
        tier: Tier,
        addr: u64,
        size: u64,
        stream: u64,
        /// A device pool block (inside a mapped segment).
        pooled: bool,
    },
    Free {
        tier: Tier,
        addr: u64,
        pooled: bool,
    },
    Map {
        device: u32,
        addr: u64,
        size: u64,
    },
    Unmap {
        device: u32,
        addr: u64,
        size: u64,
    },
    Oom {
        tier: Tier,
        requested: u64,
        free: u64,
        reserved: Option<u64>,
        largest: Option<u64>,
    },
    Budget {
        tier: Tier,
        bytes: u64,
    },
    Param {
        id: u64,
        size: u64,
        name: String,
    },
    Load {
        id: u64,
        bytes: u64,
        stream: u64,
        start: Option<u64>,
        end: Option<u64>,
        flags: u8,
    },
    Evict {
        id: u64,
        bytes: u64,
    },
    WriteBack {
        id: u64,
        bytes: u64,
        stream: u64,
        start: Option<u64>,
        end: Option<u64>,
    },
    Acquire {
        id: u64,
        bytes: u64,
        outcome: u8,
    },
    /// The call site of the thread's previous allocation (interned).
    Site {
        site: u32,
    },
    Dropped {
        count: u64,
    },
    End,
}

/// A normalised event: when (ns since the earliest file's start), which file, thread.
#[derive(Debug, Clone)]
pub struct Item {
    pub t: u64,
    pub file: usize,
    pub thread: u32,
    pub ev: Ev,
}

struct Source {
    reader: Reader<BufReader<File>>,
    start: u64,
    next: Option<Event>,
}

/// The merged, normalised stream of one or more records.
pub struct Input {
    sources: Vec<Source>,
    heap: BinaryHeap<std::cmp::Reverse<(u64, usize)>>,
    /// The earliest start (monotonic ns) of the files.
    pub origin: u64,
    /// Wall clock (ns since the epoch) at `origin`.
    pub origin_unix: u64,
    /// Site texts by id.
    pub sites: Vec<String>,
    site_ids: FxHashMap<String, u32>,
    /// The size of live shim blocks by address (its frees may not say).
    pub pids: Vec<u32>,
    pub truncated: bool,
    pub events: u64,
    /// The second half of a realloc, returned next.
    pub pending: Option<Item>,
}

fn tier_of(p: Placement, node: Option<u32>) -> Tier {
    match p {
        Placement::SmallGlibc | Placement::SmallFast | Placement::Other => Tier::HostSmall,
        Placement::Host => Tier::Host(node.unwrap_or(u32::MAX)),
        Placement::Pinned => Tier::Pinned,
        Placement::Device => Tier::Device(node.unwrap_or(0)),
        Placement::Managed => Tier::Managed(node.unwrap_or(0)),
    }
}

impl Input {
    pub fn open(paths: &[String]) -> Result<Input, String> {
        let mut sources = Vec::new();
        let mut pids = Vec::new();
        let mut origin_unix = 0;
        for p in paths {
            let f = File::open(p).map_err(|e| format!("{p}: {e}"))?;
            let reader = Reader::new(BufReader::with_capacity(1 << 20, f))
                .map_err(|e| format!("{p}: {e}"))?;
            let h = *reader.header();
            pids.push(h.pid);
            if sources.is_empty()
                || h.start_mono_ns
                    < sources
                        .iter()
                        .map(|s: &Source| s.start)
                        .min()
                        .unwrap_or(u64::MAX)
            {
                origin_unix = h.start_unix_ns;
            }
            sources.push(Source {
                reader,
                start: h.start_mono_ns,
                next: None,
            });
        }
        let origin = sources.iter().map(|s| s.start).min().unwrap_or(0);
        let mut input = Input {
            sources,
            heap: BinaryHeap::new(),
            origin,
            origin_unix,
            sites: Vec::new(),
            site_ids: FxHashMap::default(),
            pids,
            truncated: false,
            events: 0,
            pending: None,
        };
        for i in 0..input.sources.len() {
            input.refill(i)?;
        }
        Ok(input)
    }

    fn refill(&mut self, i: usize) -> Result<(), String> {
        let s = &mut self.sources[i];
        s.next = s.reader.next_event().map_err(|e| e.to_string())?;
        match &s.next {
            Some(e) => {
                let t = (s.start + e.time_ns).saturating_sub(self.origin);
                self.heap.push(std::cmp::Reverse((t, i)));
            }
            None => self.truncated |= s.reader.truncated(),
        }
        Ok(())
    }

    fn intern(&mut self, text: String) -> u32 {
        if let Some(&id) = self.site_ids.get(&text) {
            return id;
        }
        let id = self.sites.len() as u32;
        self.sites.push(text.clone());
        self.site_ids.insert(text, id);
        id
    }

    /// The next event in time order (across files; within a file, the order written).
    pub fn next_item(&mut self) -> Result<Option<Item>, String> {
        loop {
            let Some(std::cmp::Reverse((t, i))) = self.heap.pop() else {
                return Ok(None);
            };
            let e = self.sources[i].next.take().expect("queued");
            self.refill(i)?;
            self.events += 1;
            let ev = match e.kind {
                EventKind::Alloc {
                    addr,
                    size,
                    placement,
                    node,
                } => Ev::Alloc {
                    tier: tier_of(placement, node),
                    addr,
                    size,
                    stream: 0,
                    pooled: false,
                },
                EventKind::Free {
                    addr, placement, ..
                } => Ev::Free {
                    tier: tier_of(placement, None),
                    addr,
                    pooled: false,
                },
                EventKind::Realloc {
                    old,
                    new,
                    size,
                    placement,
                    node,
                } => {
                    // A free of the old block then an allocation of the new one: the
                    // first now, the second queued just after at the same time.
                    let tier = tier_of(placement, node);
                    self.pending = Some(Item {
                        t,
                        file: i,
                        thread: e.thread,
                        ev: Ev::Alloc {
                            tier,
                            addr: new,
                            size,
                            stream: 0,
                            pooled: false,
                        },
                    });
                    Ev::Free {
                        tier,
                        addr: old,
                        pooled: false,
                    }
                }
                EventKind::Stack { frames } => {
                    let text = frames
                        .iter()
                        .take(8)
                        .map(|f| format!("{f:#x}"))
                        .collect::<Vec<_>>()
                        .join("\n");
                    Ev::Site {
                        site: self.intern(text),
                    }
                }
                EventKind::Site { text } => Ev::Site {
                    site: self.intern(text),
                },
                EventKind::Dropped { count } => Ev::Dropped { count },
                EventKind::End { .. } => Ev::End,
                EventKind::DeviceAlloc {
                    addr,
                    size,
                    device,
                    stream,
                    flags,
                } => Ev::Alloc {
                    tier: if flags & device_flags::MANAGED != 0 {
                        Tier::Managed(device)
                    } else {
                        Tier::Device(device)
                    },
                    addr,
                    size,
                    stream,
                    pooled: flags & device_flags::POOL != 0,
                },
                EventKind::DeviceFree {
                    addr,
                    device,
                    flags,
                    ..
                } => Ev::Free {
                    tier: if flags & device_flags::MANAGED != 0 {
                        Tier::Managed(device)
                    } else {
                        Tier::Device(device)
                    },
                    addr,
                    pooled: flags & device_flags::POOL != 0,
                },
                EventKind::SegmentMap { addr, size, device } => Ev::Map { device, addr, size },
                EventKind::SegmentUnmap { addr, size, device } => Ev::Unmap { device, addr, size },
                EventKind::OutOfMemory {
                    placement,
                    index,
                    requested,
                    free,
                    reserved,
                    largest_free_block,
                } => Ev::Oom {
                    tier: tier_of(placement, index),
                    requested,
                    free,
                    reserved,
                    largest: largest_free_block,
                },
                EventKind::Budget {
                    placement,
                    index,
                    bytes,
                } => Ev::Budget {
                    tier: tier_of(placement, index),
                    bytes,
                },
                EventKind::Param { id, size, name } => Ev::Param { id, size, name },
                EventKind::Load {
                    id,
                    bytes,
                    stream,
                    start,
                    end,
                    flags,
                } => Ev::Load {
                    id,
                    bytes,
                    stream,
                    start,
                    end,
                    flags,
                },
                EventKind::Evict { id, bytes, .. } => Ev::Evict { id, bytes },
                EventKind::WriteBack {
                    id,
                    bytes,
                    stream,
                    start,
                    end,
                } => Ev::WriteBack {
                    id,
                    bytes,
                    stream,
                    start,
                    end,
                },
                EventKind::Acquire { id, bytes, outcome } => Ev::Acquire { id, bytes, outcome },
                EventKind::Unknown { .. } => continue,
            };
            return Ok(Some(Item {
                t,
                file: i,
                thread: e.thread,
                ev,
            }));
        }
    }
}

/// Iterates the merged stream, realloc's second half included.
pub struct Stream {
    pub input: Input,
}

impl Stream {
    pub fn open(paths: &[String]) -> Result<Stream, String> {
        Ok(Stream {
            input: Input::open(paths)?,
        })
    }

    pub fn next(&mut self) -> Result<Option<Item>, String> {
        if let Some(p) = self.input.pending.take() {
            return Ok(Some(p));
        }
        self.input.next_item()
    }
}

/// What is live, by address space (host or a device), with the size and tier of each
/// block and its call site; totals per tier.
#[derive(Default)]
pub struct Live {
    pub blocks: FxHashMap<(u32, u64), Block>,
    pub totals: FxHashMap<Tier, u64>,
    /// Mapped (reserved) bytes per device: pool segments and plain device allocations.
    pub reserved: FxHashMap<u32, u64>,
    /// The last allocation of each thread (for the site event that follows it).
    last: FxHashMap<(usize, u32), (u32, u64)>,
}

#[derive(Debug, Clone, Copy)]
pub struct Block {
    pub tier: Tier,
    pub size: u64,
    pub site: u32,
    pub t: u64,
    pub stream: u64,
    pub pooled: bool,
}

/// The address space a tier's addresses live in.
pub fn space(t: Tier) -> u32 {
    match t {
        Tier::Device(d) | Tier::Managed(d) => d + 1,
        _ => 0,
    }
}

pub const NO_SITE: u32 = u32::MAX;

impl Live {
    /// Applies `it`; returns the tier whose total changed, if one did.
    pub fn apply(&mut self, it: &Item) -> Option<Tier> {
        match &it.ev {
            Ev::Alloc {
                tier,
                addr,
                size,
                stream,
                pooled,
            } => {
                let key = (space(*tier), *addr);
                if let Some(old) = self.blocks.remove(&key) {
                    // A free the record missed.
                    self.sub(old.tier, old.size, old.pooled);
                }
                self.blocks.insert(
                    key,
                    Block {
                        tier: *tier,
                        size: *size,
                        site: NO_SITE,
                        t: it.t,
                        stream: *stream,
                        pooled: *pooled,
                    },
                );
                self.last.insert((it.file, it.thread), key);
                *self.totals.entry(*tier).or_default() += size;
                if let (Tier::Device(d), false) = (tier, pooled) {
                    *self.reserved.entry(*d).or_default() += size;
                }
                Some(*tier)
            }
            Ev::Free { tier, addr, .. } => {
                let b = self.blocks.remove(&(space(*tier), *addr))?;
                self.sub(b.tier, b.size, b.pooled);
                Some(b.tier)
            }
            Ev::Map { device, size, .. } => {
                *self.reserved.entry(*device).or_default() += size;
                Some(Tier::Device(*device))
            }
            Ev::Unmap { device, size, .. } => {
                let r = self.reserved.entry(*device).or_default();
                *r = r.saturating_sub(*size);
                Some(Tier::Device(*device))
            }
            Ev::Site { site } => {
                if let Some(key) = self.last.get(&(it.file, it.thread)) {
                    if let Some(b) = self.blocks.get_mut(key) {
                        b.site = *site;
                    }
                }
                None
            }
            _ => None,
        }
    }

    fn sub(&mut self, tier: Tier, size: u64, pooled: bool) {
        let t = self.totals.entry(tier).or_default();
        *t = t.saturating_sub(size);
        if let (Tier::Device(d), false) = (tier, pooled) {
            let r = self.reserved.entry(d).or_default();
            *r = r.saturating_sub(size);
        }
    }

    pub fn total(&self, t: Tier) -> u64 {
        self.totals.get(&t).copied().unwrap_or(0)
    }
}

/// Bytes, human-readable.
pub fn bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Seconds from ns, for display.
pub fn secs(ns: u64) -> String {
    format!("{:.6} s", ns as f64 / 1e9)
}
