//! The counters behind the stats page (`/dev/shm/hetmem-stats.<pid>`) that `prof top`
//! reads: kept by the writer thread from the events it drains, written as `key value`
//! lines.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use rustc_hash::FxHashMap;

use super::MAX_INDEX;
use crate::record::{self, acquire, EventKind, Placement};

/// Counters behind the stats page: what is live now, per tier.
#[derive(Debug, Default)]
pub(super) struct Counters {
    host: AtomicI64,
    pinned: AtomicI64,
    device: [AtomicI64; MAX_INDEX],
    device_reserved: [AtomicI64; MAX_INDEX],
    managed: AtomicI64,
    allocs: AtomicU64,
    frees: AtomicU64,
    loads: AtomicU64,
    loaded_bytes: AtomicU64,
    evictions: AtomicU64,
    writeback_bytes: AtomicU64,
    hits: AtomicU64,
    late: AtomicU64,
    misses: AtomicU64,
    ooms: AtomicU64,
    /// Host blocks on a known node (address → node, bytes), and bytes per node: frees
    /// do not say the node. Only the writer thread takes the lock.
    nodes: Mutex<Nodes>,
}

/// Host blocks on a known node (address → node, bytes), and bytes per node.
type Nodes = (FxHashMap<u64, (u32, u64)>, BTreeMap<u32, i64>);

fn slot(i: Option<u32>, n: usize) -> usize {
    i.map_or(n - 1, |i| (i as usize).min(n - 1))
}

impl Counters {
    pub(super) fn apply(&self, k: &EventKind) {
        let r = Ordering::Relaxed;
        let host = |placement: Placement| match placement {
            Placement::Pinned => Some(&self.pinned),
            Placement::Host => Some(&self.host),
            _ => None,
        };
        match k {
            EventKind::Alloc {
                addr,
                size,
                placement,
                node,
            } => {
                self.allocs.fetch_add(1, r);
                if let Some(c) = host(*placement) {
                    c.fetch_add(*size as i64, r);
                }
                if let (Placement::Host, Some(n)) = (placement, node) {
                    let mut g = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
                    g.0.insert(*addr, (*n, *size));
                    *g.1.entry(*n).or_default() += *size as i64;
                }
            }
            EventKind::Free {
                addr,
                size,
                placement,
            } => {
                self.frees.fetch_add(1, r);
                if let Some(c) = host(*placement) {
                    c.fetch_sub(*size as i64, r);
                }
                if *placement == Placement::Host {
                    let mut g = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some((n, b)) = g.0.remove(addr) {
                        *g.1.entry(n).or_default() -= b as i64;
                    }
                }
            }
            EventKind::DeviceAlloc {
                size,
                device,
                flags,
                ..
            } => {
                self.allocs.fetch_add(1, r);
                let d = slot(Some(*device), MAX_INDEX);
                if flags & record::device_flags::MANAGED != 0 {
                    self.managed.fetch_add(*size as i64, r);
                } else {
                    self.device[d].fetch_add(*size as i64, r);
                    if flags & record::device_flags::POOL == 0 {
                        self.device_reserved[d].fetch_add(*size as i64, r);
                    }
                }
            }
            EventKind::DeviceFree {
                size,
                device,
                flags,
                ..
            } => {
                self.frees.fetch_add(1, r);
                let d = slot(Some(*device), MAX_INDEX);
                if flags & record::device_flags::MANAGED != 0 {
                    self.managed.fetch_sub(*size as i64, r);
                } else {
                    self.device[d].fetch_sub(*size as i64, r);
                    if flags & record::device_flags::POOL == 0 {
                        self.device_reserved[d].fetch_sub(*size as i64, r);
                    }
                }
            }
            EventKind::SegmentMap { size, device, .. } => {
                self.device_reserved[slot(Some(*device), MAX_INDEX)].fetch_add(*size as i64, r);
            }
            EventKind::SegmentUnmap { size, device, .. } => {
                self.device_reserved[slot(Some(*device), MAX_INDEX)].fetch_sub(*size as i64, r);
            }
            EventKind::OutOfMemory { .. } => {
                self.ooms.fetch_add(1, r);
            }
            EventKind::Load { bytes, .. } => {
                self.loads.fetch_add(1, r);
                self.loaded_bytes.fetch_add(*bytes, r);
            }
            EventKind::Evict { .. } => {
                self.evictions.fetch_add(1, r);
            }
            EventKind::WriteBack { bytes, .. } => {
                self.writeback_bytes.fetch_add(*bytes, r);
            }
            EventKind::Acquire { outcome, .. } => {
                match *outcome {
                    acquire::HIT => &self.hits,
                    acquire::LATE => &self.late,
                    _ => &self.misses,
                }
                .fetch_add(1, r);
            }
            _ => {}
        }
    }

    /// The page's text: `key value` lines.
    pub(super) fn page(&self, pid: u32, events: u64, dropped: u64, path: &str) -> String {
        let r = Ordering::Relaxed;
        let mut s = format!(
            "hetmem-stats 1\npid {pid}\ncmd {}\nrecord {}\nunix_ms {}\n",
            std::env::args()
                .next()
                .unwrap_or_default()
                .replace('\n', " "),
            if path.is_empty() { "-" } else { path },
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        );
        let mut line = |k: String, v: i64| {
            if v != 0 || !k.contains('.') {
                s.push_str(&format!("{k} {v}\n"));
            }
        };
        line("host".into(), self.host.load(r));
        for (n, b) in &self.nodes.lock().unwrap_or_else(|e| e.into_inner()).1 {
            line(format!("node.{n}"), *b);
        }
        line("pinned".into(), self.pinned.load(r));
        line("managed".into(), self.managed.load(r));
        for i in 0..MAX_INDEX {
            line(format!("device.{i}"), self.device[i].load(r));
            line(format!("reserved.{i}"), self.device_reserved[i].load(r));
        }
        for (k, c) in [
            ("allocs", &self.allocs),
            ("frees", &self.frees),
            ("loads", &self.loads),
            ("loaded_bytes", &self.loaded_bytes),
            ("evictions", &self.evictions),
            ("writeback_bytes", &self.writeback_bytes),
            ("hits", &self.hits),
            ("late", &self.late),
            ("misses", &self.misses),
            ("ooms", &self.ooms),
        ] {
            line(k.into(), c.load(r) as i64);
        }
        line("events".into(), events as i64);
        line("dropped".into(), dropped as i64);
        s
    }
}
