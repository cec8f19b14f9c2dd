//! A `Manager` on the CUDA backend: buffers, the device pool and the tier store.

use super::*;

// ------------------------------------------------------------ manager, pool, tier

#[test]
fn manager_buffers_pool_and_tier_store_on_cuda() {
    let f = fake();
    let _g = FakeCuda::serial();
    let mgr = cuda_manager();
    assert_eq!(mgr.backend_kind(), BackendKind::Cuda);
    assert_eq!(mgr.devices().len(), 2);

    // Buffers: pinned host -> device -> host, asynchronously, dropped while in flight.
    let n = 3 * MIB;
    let mut pinned = mgr
        .alloc(Placement::Pinned(NumaPolicy::Default), n)
        .unwrap();
    let data = layer_bytes(99, n);
    mgr.write(&mut pinned, 0, &data).unwrap();
    let mut on_dev = mgr.alloc(Placement::Device(1), n).unwrap();
    let s1 = mgr.create_stream(1).unwrap();
    mgr.copy(&mut on_dev, 0, &pinned, 0, n, Some(&s1)).unwrap();
    let mut back = mgr.alloc(Placement::Host(NumaPolicy::Default), n).unwrap();
    mgr.copy(&mut back, 0, &on_dev, 0, n, Some(&s1)).unwrap();
    drop(on_dev); // waits for both copies before cuMemFree
    assert_eq!(back.as_slice().unwrap(), &data[..]);
    drop(pinned);
    assert_eq!(f.stat("registrations"), 0);
    let mut m = mgr.alloc(Placement::Managed { device: 0 }, MIB).unwrap();
    m.as_mut_slice().unwrap().fill(3);
    mgr.prefetch(&m, Location::Device(0), &s1).unwrap();
    mgr.advise(&m, Advice::SetPreferredLocation(Location::Device(0)))
        .unwrap();
    drop(m);

    // The device pool with expandable segments: pages mapped under live blocks only.
    let pool = mgr
        .device_pool(
            0,
            PoolConfig {
                budget: Budget::Bytes(64 * MIB),
                ..PoolConfig::default()
            },
        )
        .unwrap();
    assert!(pool.expandable(), "VMM on the fake: expandable segments");
    let s0 = mgr.create_stream(0).unwrap();
    let mut blocks: Vec<_> = [700, 3 * MIB + 5, 512, 9 * MIB]
        .iter()
        .map(|&size| pool.alloc(size, &s0).unwrap())
        .collect();
    assert!(f.stat("vmm_mapped_bytes") >= (12 * MIB) as i64);
    assert_eq!(f.stat("vmm_mapped_bytes"), f.stat("vmm_accessible_bytes"));
    for (i, blk) in blocks.iter().enumerate() {
        let bytes = layer_bytes(i, blk.len());
        blk.write(0, &bytes).unwrap();
        let mut out = vec![0u8; blk.len()];
        blk.read(0, &mut out).unwrap();
        assert_eq!(out, bytes, "block {i}");
    }
    // Through a stream, into and out of a block.
    let src = {
        let mut b = mgr
            .alloc(Placement::Pinned(NumaPolicy::Default), MIB)
            .unwrap();
        mgr.write(&mut b, 0, &layer_bytes(7, MIB)).unwrap();
        b
    };
    let mut dst = mgr
        .alloc(Placement::Host(NumaPolicy::Default), MIB)
        .unwrap();
    mgr.copy(&mut blocks[3], 4096, &src, 0, MIB, Some(&s0))
        .unwrap();
    mgr.copy(&mut dst, 0, &blocks[3], 4096, MIB, Some(&s0))
        .unwrap();
    s0.synchronize().unwrap();
    assert_eq!(dst.as_slice().unwrap(), &layer_bytes(7, MIB)[..]);
    let stats = pool.stats();
    assert_eq!(stats.allocation.all.current, 4);
    drop(blocks);
    pool.trim().unwrap();
    assert_eq!(pool.reserved(), 0);
    assert_eq!(f.stat("vmm_mapped_bytes"), 0, "trim unmapped every page");
    assert_eq!(f.stat("vmm_physical_bytes"), 0, "and released them");
    drop(pool);
    assert_eq!(f.stat("vmm_reservations"), 0);

    // The tier store: 6 layers of 1 MiB through a 3-layer device budget, checksums on.
    const LAYERS: usize = 6;
    let mut cfg = TierConfig::new(3 * MIB, 16 * MIB + LAYERS * MIB);
    cfg.checksums = true;
    cfg.sequence = SequenceHint::Given((0..LAYERS as u32).collect());
    let store = TierStore::new(&mgr, cfg).unwrap();
    for i in 0..LAYERS {
        store
            .register(&format!("layer.{i}"), layer_bytes(i, MIB).into())
            .unwrap();
    }
    let compute = mgr.create_stream(0).unwrap();
    for pass in 0..3 {
        for i in 0..LAYERS as u32 {
            let g = store.acquire(i, &compute).unwrap();
            let mut out = vec![0u8; MIB];
            compute.synchronize().unwrap();
            g.block().unwrap().read(0, &mut out).unwrap();
            assert_eq!(out, layer_bytes(i as usize, MIB), "pass {pass} layer {i}");
        }
    }
    let st = store.stats();
    assert_eq!(st.checksum_mismatches, 0);
    assert!(st.loads >= LAYERS as u64, "{st:?}");
    assert!(st.bytes_loaded >= (LAYERS * MIB) as u64);
    drop(store);
    drop(compute);
    drop(s0);
    drop(s1);
    drop((src, dst, back));
    drop(mgr);
    assert_eq!(f.stat("allocations"), 0);
    assert_eq!(f.stat("managed_allocations"), 0);
    assert_eq!(f.stat("registrations"), 0);
    assert_eq!(f.stat("queued_ops"), 0);
    assert_eq!(f.stat("vmm_reservations"), 0);
    assert_eq!(f.stat("faults"), 0, "no copy ran on unmapped memory");
    assert_eq!(f.stat("zombie_streams"), 0);
}
