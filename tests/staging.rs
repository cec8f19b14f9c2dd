//! The pinned staging ring: bytes arrive intact, slots are not refilled under a copy
//! still reading them (checked on the asynchronous fake HIP runtime), a mapped file
//! streams like memory, and on the simulator the link runs at pinned speed.

#[path = "common/fake_hip.rs"]
mod fake_hip;

use hetmem::pool::{HostPoolConfig, PoolConfig, StagingRing};
use hetmem::{BackendKind, Error, Manager, NumaPolicy, Placement, SimConfig};

const MIB: usize = 1 << 20;

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn read_back(mgr: &Manager, blk: &hetmem::pool::PoolBlock, stream: &hetmem::Stream) -> Vec<u8> {
    let mut out = mgr
        .alloc(Placement::Pinned(NumaPolicy::Default), blk.len())
        .unwrap();
    mgr.copy_from_block(&mut out, 0, blk, 0, blk.len(), stream)
        .unwrap();
    out.as_slice().unwrap().to_vec()
}

#[test]
fn uploads_arrive_at_pinned_link_speed_on_sim() {
    let mgr = Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(SimConfig::with_devices(1, 1 << 30))
        .build()
        .unwrap();
    let sim = mgr.sim().unwrap();
    let host = mgr.host_pool(HostPoolConfig::default()).unwrap();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let stream = mgr.create_stream(0).unwrap();
    // 8 MiB slots: the 8 µs a copy costs to start is then 5% of its 152 µs on the link.
    let mut ring = StagingRing::new(&host, &NumaPolicy::NearDevice(0), 4, 8 * MIB, 2).unwrap();
    let src = pattern(80 * MIB + 777, 3); // pageable
    let dst = pool.alloc(src.len(), &stream).unwrap();
    // From when the upload can start: the host has spent time in the driver already.
    let t0 = sim
        .stream_time_ns(stream.handle())
        .unwrap()
        .max(sim.host_time_ns());
    let r = ring.upload(&src, &dst, 0, &stream).unwrap();
    assert_eq!((r.bytes, r.chunks), (src.len(), 11));
    let t1 = sim.stream_time_ns(stream.handle()).unwrap();
    let gbps = src.len() as f64 / (t1 - t0) as f64;
    let link = sim.config().h2d_gbps;
    assert!(
        gbps >= 0.9 * link,
        "ring moved {gbps:.1} GB/s on a {link} GB/s link"
    );
    assert!(
        read_back(&mgr, &dst, &stream) == src,
        "bytes differ after the ring"
    );
    // The same bytes copied straight from pageable memory would run at the pageable
    // speed: the ring is what makes the difference.
    assert!(sim.config().pageable_gbps < 0.5 * link);
}

/// A manager over the fake HIP runtime, which runs queued copies only when a stream is
/// waited for; with its host pool, device pool and a stream.
fn on_fake_hip() -> (
    fake_hip::FakeHip,
    Manager,
    hetmem::pool::HostPool,
    hetmem::pool::DevicePool,
    hetmem::Stream,
) {
    let fake = fake_hip::FakeHip::with_devices(1, 512 << 20).unwrap();
    let mgr = Manager::builder()
        .backend(BackendKind::Rocm)
        .rocm_library(fake.path())
        .build()
        .unwrap();
    let host = mgr.host_pool(HostPoolConfig::default()).unwrap();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let stream = mgr.create_stream(0).unwrap();
    (fake, mgr, host, pool, stream)
}

#[test]
fn slots_wait_for_their_copies_on_an_asynchronous_runtime() {
    let (_fake, mgr, host, pool, stream) = on_fake_hip();
    // Three slots for ten pieces: each slot is refilled while copies are still queued
    // (the fake runs them only when the stream is waited for). A refill that did not
    // wait for its slot's copy would overwrite bytes not yet sent.
    let mut ring = StagingRing::new(&host, &NumaPolicy::Default, 3, MIB, 1).unwrap();
    let src = pattern(10 * MIB, 9);
    let dst = pool.alloc(src.len(), &stream).unwrap();
    ring.upload(&src, &dst, 0, &stream).unwrap();
    assert!(
        read_back(&mgr, &dst, &stream) == src,
        "a slot was refilled under its copy"
    );
    // Uploading into the middle of a block with an offset.
    let part = pattern(3 * MIB + 5, 1);
    ring.upload(&part, &dst, 2 * MIB + 1, &stream).unwrap();
    let back = read_back(&mgr, &dst, &stream);
    assert!(back[2 * MIB + 1..5 * MIB + 6] == part[..]);
    assert!(back[..2 * MIB + 1] == src[..2 * MIB + 1]);
}

#[test]
fn parallel_fillers_wait_for_their_own_slots_copies() {
    let (_fake, mgr, host, pool, stream) = on_fake_hip();
    // Three fillers over five slots (two, two and one each), 25 pieces: every slot is
    // refilled several times by its filler while copies queued by all three wait on the
    // fake's stream.
    let mut ring = StagingRing::new(&host, &NumaPolicy::Default, 5, MIB, 3).unwrap();
    for (seed, len) in [(4u8, 24 * MIB + 333), (5, 12 * MIB), (6, MIB / 2)] {
        let src = pattern(len, seed);
        let dst = pool.alloc(src.len(), &stream).unwrap();
        let r = ring.upload(&src, &dst, 0, &stream).unwrap();
        assert_eq!((r.bytes, r.chunks), (len, len.div_ceil(MIB)));
        assert!(
            read_back(&mgr, &dst, &stream) == src,
            "{len} bytes: a slot was refilled under its copy"
        );
    }
}

#[test]
fn a_mapped_file_streams_like_memory() {
    let mgr = Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(SimConfig::with_devices(1, 1 << 30))
        .build()
        .unwrap();
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("staging-{}.bin", std::process::id()));
    let data = pattern(9 * MIB + 3, 5);
    std::fs::write(&path, &data).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    // SAFETY: the file is ours, written above and not changed while mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let host = mgr.host_pool(HostPoolConfig::default()).unwrap();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let stream = mgr.create_stream(0).unwrap();
    let mut ring = StagingRing::new(&host, &NumaPolicy::Default, 2, 2 * MIB, 2).unwrap();
    let dst = pool.alloc(map.len(), &stream).unwrap();
    ring.upload(&map, &dst, 0, &stream).unwrap();
    assert!(read_back(&mgr, &dst, &stream) == data);
    drop(map);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bad_uploads_are_refused() {
    let mgr = Manager::builder()
        .backend(BackendKind::Sim)
        .build()
        .unwrap();
    let host = mgr.host_pool(HostPoolConfig::default()).unwrap();
    let pool = mgr.device_pool(0, PoolConfig::default()).unwrap();
    let stream = mgr.create_stream(0).unwrap();
    assert!(StagingRing::new(&host, &NumaPolicy::Default, 1, MIB, 1).is_err());
    assert!(StagingRing::new(&host, &NumaPolicy::Default, 2, 0, 1).is_err());
    let mut ring = StagingRing::new(&host, &NumaPolicy::Default, 2, MIB, 1).unwrap();
    let dst = pool.alloc(MIB, &stream).unwrap();
    assert!(matches!(
        ring.upload(&[0; 100], &dst, MIB - 50, &stream),
        Err(Error::OutOfBounds { .. })
    ));
    let other = Manager::builder()
        .backend(BackendKind::Sim)
        .build()
        .unwrap();
    let foreign = other.create_stream(0).unwrap();
    assert!(ring.upload(&[0; 100], &dst, 0, &foreign).is_err());
}
