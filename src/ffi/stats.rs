//! The stats of a manager and of a tier store as JSON: `hetmem_stats_json`.
//!
//! Above both `memory` (managers) and `tier` (stores), which do not know of each other's
//! stats.

use std::ffi::{c_char, c_int};

use super::memory::{FfiManager, HetmemManager};
use super::tier::{FfiStore, HetmemStore};
use super::{call, json_array, json_object, json_str, lookup, write_c_text};
use crate::stats::CounterSnapshot;

/// Writes the stats of the manager (and of `store`, if not NULL) as NUL-terminated
/// JSON into `buf` if it fits in `cap` bytes; `*needed` (if not NULL) is always set to
/// the bytes the JSON needs, NUL included. Too small a buffer is
/// `HETMEM_ERR_BUFFER_TOO_SMALL` (call again with `*needed` bytes).
///
/// Keys: `backend`, `devices` (ordinal, name, total_memory, numa_node), `live_buffers`,
/// `live_bytes`, `host` / `pinned` / `device[]` / `managed[]` (`current`, `peak`,
/// `count`), and `tier` (the store's counters, or null).
///
/// # Safety
/// `buf` is NULL or valid for `cap` bytes of writes; `needed` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn hetmem_stats_json(
    mgr: *mut HetmemManager,
    store: *mut HetmemStore,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> c_int {
    call("hetmem_stats_json", || {
        let m = lookup::<FfiManager, _>(mgr, "mgr")?;
        let tier = if store.is_null() {
            "null".to_owned()
        } else {
            let s = lookup::<FfiStore, _>(store, "store")?;
            store_json(&s)
        };
        let json = m.json(vec![("tier", tier)]);
        // SAFETY: the caller's contract.
        unsafe { write_c_text(&json, buf, cap, needed) }
    })
}

/// The store's stats as a JSON object.
fn store_json(s: &FfiStore) -> String {
    let t = s.store.stats();
    let p = s.store.pool_stats();
    json_object([
        ("params", s.store.len().to_string()),
        ("hits", t.hits.to_string()),
        ("misses", t.misses.to_string()),
        ("loads", t.loads.to_string()),
        ("prefetches", t.prefetches.to_string()),
        ("bytes_loaded", t.bytes_loaded.to_string()),
        ("staged_loads", t.staged_loads.to_string()),
        ("evictions", t.evictions.to_string()),
        ("writebacks", t.writebacks.to_string()),
        ("writeback_bytes", t.writeback_bytes.to_string()),
        ("checksum_mismatches", t.checksum_mismatches.to_string()),
        ("sequences_learnt", t.sequences_learnt.to_string()),
        ("sequences_dropped", t.sequences_dropped.to_string()),
        ("unplanned_evictions", t.unplanned_evictions.to_string()),
        ("device_bytes", t.device_bytes.to_string()),
        ("device_peak_bytes", t.device_peak_bytes.to_string()),
        ("host_bytes", t.host_bytes.to_string()),
        ("host_peak_bytes", t.host_peak_bytes.to_string()),
        ("mapped_bytes", t.mapped_bytes.to_string()),
        // The device pool under the store: maps and stream synchronisations between
        // passes mean the host waited for the GPU. Pages moved are unmapped and mapped.
        (
            "pool_maps",
            (p.num_device_alloc + p.num_pages_moved).to_string(),
        ),
        (
            "pool_unmaps",
            (p.num_device_free + p.num_pages_moved).to_string(),
        ),
        ("pool_syncs", p.num_sync_all_streams.to_string()),
        (
            "pool_reserved_peak_bytes",
            p.reserved_bytes.all.peak.to_string(),
        ),
    ])
}

impl FfiManager {
    /// The manager's stats JSON, with `extra` fields at the end.
    fn json(&self, extra: Vec<(&'static str, String)>) -> String {
        let snap = |c: &CounterSnapshot| {
            json_object([
                ("current", c.current.to_string()),
                ("peak", c.peak.to_string()),
                ("count", c.count.to_string()),
            ])
        };
        let st = self.mgr.stats();
        let (live, bytes) = self.live_buffers();
        let devices = self.mgr.devices().iter().map(|d| {
            json_object([
                ("ordinal", d.info.ordinal.to_string()),
                ("name", json_str(&d.info.name)),
                ("total_memory", d.info.total_memory.to_string()),
                (
                    "numa_node",
                    d.numa_node.map_or("null".to_owned(), |n| n.to_string()),
                ),
            ])
        });
        let fields = vec![
            ("backend", json_str(self.mgr.backend_kind().name())),
            ("devices", json_array(devices)),
            ("live_buffers", live.to_string()),
            ("live_bytes", bytes.to_string()),
            ("host", snap(&st.host)),
            ("pinned", snap(&st.pinned)),
            ("device", json_array(st.device.iter().map(snap))),
            ("managed", json_array(st.managed.iter().map(snap))),
        ];
        json_object(fields.into_iter().chain(extra))
    }
}
