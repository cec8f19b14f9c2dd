//! The profiler's recorder (`hetmem::profile`): what a sim run of the device pool, the
//! host pool, manager buffers and the tier store writes, read back with the record
//! reader; the stats page; and a bounded queue that drops and counts instead of
//! growing. One test function: the recorder is one per process.

use std::collections::BTreeMap;

use hetmem::pool::{HostPoolConfig, PoolConfig};
use hetmem::profile::{self, ProfileConfig};
use hetmem::record::{acquire, kind, EventKind, Placement as RP, Reader};
use hetmem::tier::source::Source;
use hetmem::{BackendKind, Manager, NumaPolicy, Placement, TierConfig, TierStore};

fn kind_of(k: &EventKind) -> u8 {
    match k {
        EventKind::Alloc { .. } => kind::ALLOC,
        EventKind::Free { .. } => kind::FREE,
        EventKind::Realloc { .. } => kind::REALLOC,
        EventKind::Stack { .. } => kind::STACK,
        EventKind::Dropped { .. } => kind::DROPPED,
        EventKind::End { .. } => kind::END,
        EventKind::DeviceAlloc { .. } => kind::DEVICE_ALLOC,
        EventKind::DeviceFree { .. } => kind::DEVICE_FREE,
        EventKind::SegmentMap { .. } => kind::SEGMENT_MAP,
        EventKind::SegmentUnmap { .. } => kind::SEGMENT_UNMAP,
        EventKind::OutOfMemory { .. } => kind::OOM,
        EventKind::Budget { .. } => kind::BUDGET,
        EventKind::Param { .. } => kind::PARAM,
        EventKind::Load { .. } => kind::LOAD,
        EventKind::Evict { .. } => kind::EVICT,
        EventKind::WriteBack { .. } => kind::WRITEBACK,
        EventKind::Acquire { .. } => kind::ACQUIRE,
        EventKind::Site { .. } => kind::SITE,
        EventKind::Unknown { kind, .. } => *kind,
    }
}

fn read(path: &std::path::Path) -> Vec<hetmem::record::Event> {
    let f = std::fs::File::open(path).unwrap();
    Reader::new(std::io::BufReader::new(f))
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
}

#[test]
fn recorder_writes_every_event_kind_and_stays_bounded() {
    let dir = std::env::temp_dir().join(format!("hetmem-profile-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::env::set_var("HETMEM_STATS_DIR", &dir);
    let path = dir.join("run.hrec");
    let mut cfg = ProfileConfig::new(&path);
    cfg.queue_events = 1 << 14;
    cfg.stack_every = 4;
    profile::start(cfg.clone()).unwrap();
    assert!(profile::start(cfg).is_err(), "one recording at a time");
    {
        let mgr = Manager::builder()
            .backend(BackendKind::Sim)
            .build()
            .unwrap();
        // Manager buffers: host on node 0, pinned, device.
        let h = mgr
            .alloc(Placement::Host(NumaPolicy::Bind(0)), 1 << 20)
            .unwrap();
        let p = mgr
            .alloc(Placement::Pinned(NumaPolicy::Default), 1 << 20)
            .unwrap();
        let d = mgr.alloc(Placement::Device(0), 1 << 20).unwrap();
        // The device pool, out of memory under its budget.
        let pool = mgr
            .device_pool(
                0,
                PoolConfig {
                    budget: hetmem::pool::Budget::Bytes(64 << 20),
                    ..PoolConfig::default()
                },
            )
            .unwrap();
        let s = mgr.create_stream(0).unwrap();
        let blocks: Vec<_> = (0..8).map(|_| pool.alloc(3 << 20, &s).unwrap()).collect();
        assert!(pool.alloc(1 << 30, &s).is_err());
        drop(blocks);
        pool.trim().unwrap();
        let hp = mgr.host_pool(HostPoolConfig::default()).unwrap();
        let hb = hp.alloc_pinned(&NumaPolicy::Default, 1 << 20).unwrap();
        drop((p, d, hb));
        // The tier store: 6 layers through room for 3, two passes.
        let store = TierStore::new(&mgr, TierConfig::new(3 << 20, 64 << 20)).unwrap();
        let ids: Vec<_> = (0..6)
            .map(|i| {
                store
                    .register(
                        &format!("layer.{i}"),
                        Source::Host(vec![i as u8; 1 << 20].into()),
                    )
                    .unwrap()
            })
            .collect();
        store.set_sequence(Some(ids.clone())).unwrap();
        let cs = mgr.create_stream(0).unwrap();
        for _ in 0..2 {
            for &id in &ids {
                let mut g = store.acquire(id, &cs).unwrap();
                if id == ids[0] {
                    g.mark_dirty();
                }
            }
        }
        cs.synchronize().unwrap();
        // The stats page is there while recording.
        std::thread::sleep(std::time::Duration::from_millis(450));
        let page =
            std::fs::read_to_string(dir.join(format!("hetmem-stats.{}", std::process::id())))
                .unwrap();
        assert!(page.starts_with("hetmem-stats 1\n"), "{page}");
        assert!(page.contains("\nloads "), "{page}");
        // The host buffer bound to node 0 is still live: the page says where.
        assert!(page.contains("\nnode.0 1048576\n"), "{page}");
        drop(h);
    }
    let sum = profile::finish().unwrap();
    assert!(
        !dir.join(format!("hetmem-stats.{}", std::process::id()))
            .exists(),
        "the page goes with the recording"
    );
    let events = read(&path);
    let mut counts: BTreeMap<u8, u64> = BTreeMap::new();
    for e in &events {
        *counts.entry(kind_of(&e.kind)).or_default() += 1;
    }
    for k in [
        kind::ALLOC,
        kind::FREE,
        kind::DEVICE_ALLOC,
        kind::DEVICE_FREE,
        kind::SEGMENT_MAP,
        kind::SEGMENT_UNMAP,
        kind::OOM,
        kind::BUDGET,
        kind::PARAM,
        kind::LOAD,
        kind::EVICT,
        kind::WRITEBACK,
        kind::ACQUIRE,
        kind::SITE,
        kind::END,
    ] {
        assert!(counts.contains_key(&k), "no event of kind {k}: {counts:?}");
    }
    // Host memory on node 0 says so; the OOM names the largest free block.
    assert!(events.iter().any(|e| matches!(e.kind,
        EventKind::Alloc { placement: RP::Host, node: Some(0), size, .. } if size == 1 << 20)));
    assert!(events.iter().any(|e| matches!(
        e.kind,
        EventKind::OutOfMemory {
            placement: RP::Device,
            largest_free_block: Some(_),
            ..
        }
    )));
    // Loads on the simulator carry their span on the device clock.
    assert!(events.iter().any(|e| matches!(e.kind,
        EventKind::Load { start: Some(a), end: Some(b), .. } if b > a)));
    assert!(events.iter().any(|e| matches!(e.kind,
        EventKind::Acquire { outcome, .. } if outcome != acquire::MISS)));
    // Every device block allocated is freed, in the same bytes.
    let dev: i64 = events
        .iter()
        .map(|e| match e.kind {
            EventKind::DeviceAlloc { size, .. } => size as i64,
            EventKind::DeviceFree { size, .. } => -(size as i64),
            _ => 0,
        })
        .sum();
    assert_eq!(dev, 0);
    let Some(EventKind::End { events: n, dropped }) = events.last().map(|e| e.kind.clone()) else {
        panic!("the record ends with its end event");
    };
    assert_eq!(n as usize, events.len() - 1);
    assert_eq!((dropped, sum.dropped), (0, 0));

    // Bounded: a burst from several threads far larger than the queue is written or
    // dropped and counted, never queued without bound.
    let path2 = dir.join("burst.hrec");
    let mut cfg = ProfileConfig::new(&path2);
    cfg.stats_page = false;
    profile::start(cfg).unwrap();
    let per_thread = 200_000u64;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                for i in 0..per_thread {
                    profile::emit(|| EventKind::Acquire {
                        id: t,
                        bytes: i,
                        outcome: acquire::HIT,
                    });
                }
            });
        }
    });
    let sum = profile::finish().unwrap();
    let events = read(&path2);
    let acquires = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Acquire { .. }))
        .count() as u64;
    let dropped: u64 = events
        .iter()
        .map(|e| match e.kind {
            EventKind::Dropped { count } => count,
            _ => 0,
        })
        .sum();
    assert_eq!(acquires + dropped, 4 * per_thread, "{sum:?}");
    assert_eq!(dropped, sum.dropped);
    // Off again: nothing is recorded.
    assert!(!profile::enabled());
    std::fs::remove_dir_all(&dir).ok();
}
