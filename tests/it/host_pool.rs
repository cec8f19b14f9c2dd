//! The host pool: reuse of pinned blocks without a second registration, NUMA placement
//! (proved with `move_pages`), `NearDevice` resolution, budgets and `OutOfMemory`,
//! trim, threads, chunked parallel pinning of a 1 GiB region, and
//! `allocator_api2::vec::Vec` in pinned memory. Every test runs on the sim backend and
//! the host backend (where pinning is `mlock`).

use crate::common::{child, pin};

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use allocator_api2::vec::Vec as PinnedVec;
use hetmem::backend::sim::SimDevice;
use hetmem::pool::{size_class, HostPool, HostPoolConfig};
use hetmem::{BackendKind, Error, Manager, MemKind, NumaPolicy, Placement, SimConfig};

const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;

fn manager(kind: BackendKind) -> Manager {
    let b = Manager::builder().backend(kind);
    let b = if kind == BackendKind::Sim {
        b.sim_config(SimConfig::with_devices(1, GIB))
    } else {
        b
    };
    b.build().unwrap()
}

fn each_backend(f: impl Fn(&Manager)) {
    for kind in [BackendKind::Sim, BackendKind::Host] {
        f(&manager(kind));
    }
}

fn pool(mgr: &Manager) -> HostPool {
    mgr.host_pool(HostPoolConfig::default()).unwrap()
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sysfs")
        .join(name)
}

/// Error events logged while `f` runs on this thread (drops log their failures).
fn errors_logged(f: impl FnOnce()) -> String {
    #[derive(Clone)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let out = Capture(Arc::new(Mutex::new(Vec::new())));
    let writer = out.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(sub, f);
    let bytes = out.0.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn a_freed_pinned_block_is_reused_without_registering_again() {
    each_backend(|mgr| {
        let pool = pool(mgr);
        let mut a = pool.alloc_pinned(&NumaPolicy::Default, 3 * MIB).unwrap();
        assert!(a.is_pinned());
        assert_eq!(a.len(), 3 * MIB);
        assert_eq!(a.capacity(), 4 * MIB, "3 MiB rounds up to two huge pages");
        assert!(a.as_slice().unwrap().iter().all(|&b| b == 0));
        a.as_mut_slice().unwrap()[..4].copy_from_slice(b"keep");
        let addr = a.as_ptr();
        drop(a);
        let s = pool.stats().pinned;
        assert_eq!(
            (s.live_bytes.current, s.cached_bytes.current),
            (0, 4 * MIB as u64)
        );

        // Same class (3.5 MiB also rounds to 4 MiB): the same block, no new registration.
        let b = pool
            .alloc_pinned(&NumaPolicy::Default, 3 * MIB + MIB / 2)
            .unwrap();
        assert_eq!(b.as_ptr(), addr);
        assert_eq!(&b.as_slice().unwrap()[..4], b"keep", "reused, not remapped");
        let s = pool.stats().pinned;
        assert_eq!((s.hits, s.misses), (1, 1));
        assert_eq!(s.registrations, 1, "{s:?}");
        assert_eq!(s.regions_created, 1);
        assert_eq!(s.live_bytes.current, 4 * MIB as u64);
        assert_eq!(s.held_bytes.peak, 4 * MIB as u64);

        // Pageable memory is a separate cache: it does not take the pinned block.
        let c = pool.alloc_host(&NumaPolicy::Default, 3 * MIB).unwrap();
        assert!(!c.is_pinned());
        assert_ne!(c.as_ptr(), addr);
        assert_eq!(c.registrations(), 0);
        assert_eq!(pool.stats().pageable.misses, 1);
        assert_eq!(pool.stats().pinned.registrations, 1);
    });
}

#[test]
fn a_slightly_larger_cached_block_is_reused() {
    each_backend(|mgr| {
        let pool = pool(mgr);
        let a = pool.alloc_pinned(&NumaPolicy::Default, 34 * MIB).unwrap();
        let addr = a.as_ptr();
        drop(a);
        // 32 MiB class; the cached 34 MiB block is within 1/8 of it.
        let b = pool.alloc_pinned(&NumaPolicy::Default, 32 * MIB).unwrap();
        assert_eq!(b.as_ptr(), addr);
        assert_eq!(b.len(), 32 * MIB);
        assert_eq!(b.capacity(), 34 * MIB);
        drop(b);
        // 16 MiB: the 34 MiB block is far too large to hand out.
        let c = pool.alloc_pinned(&NumaPolicy::Default, 16 * MIB).unwrap();
        assert_ne!(c.as_ptr(), addr);
        assert_eq!(pool.stats().pinned.registrations, 2);
    });
}

#[test]
fn bind_0_pinned_pages_are_on_node_0() {
    each_backend(|mgr| {
        let pool = pool(mgr);
        for size in [64 << 10, 8 * MIB] {
            let b = pool.alloc_pinned(&NumaPolicy::Bind(0), size).unwrap();
            assert_eq!(b.policy(), &NumaPolicy::Bind(0));
            let nodes = b.page_nodes().unwrap();
            assert!(!nodes.is_empty());
            assert!(nodes.iter().all(|&n| n == 0), "{nodes:?}");
        }
        let i = pool
            .alloc(&Placement::Host(NumaPolicy::Interleave(vec![0])), MIB)
            .unwrap();
        assert!(i.page_nodes().unwrap().iter().all(|&n| n == 0));
    });
}

#[test]
fn near_device_is_resolved_by_the_manager() {
    // Default sim device: no PCI slot, so no node: the default policy.
    let mgr = manager(BackendKind::Sim);
    let pool = pool(&mgr);
    let a = pool.alloc_pinned(&NumaPolicy::NearDevice(0), MIB).unwrap();
    assert_eq!(a.policy(), &NumaPolicy::Default);
    let addr = a.as_ptr();
    drop(a);
    // The cache is keyed by the resolved policy: Default takes the NearDevice(0) block.
    let b = pool.alloc_pinned(&NumaPolicy::Default, MIB).unwrap();
    assert_eq!(b.as_ptr(), addr);
    assert!(matches!(
        pool.alloc_pinned(&NumaPolicy::NearDevice(3), MIB),
        Err(Error::UnknownDevice { device: 3, .. })
    ));

    // Two GPUs in the two-node fixture: device 0's slot is on node 1, device 1's says -1.
    let dev = |pci: &str| SimDevice {
        name: "sim-H200".into(),
        capacity: GIB,
        pci_bus_id: Some(pci.into()),
    };
    let mgr = Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(SimConfig {
            devices: vec![dev("0000:3b:00.0"), dev("0000:af:00.0")],
            ..SimConfig::default()
        })
        .sysfs_root(fixture("two-node"))
        .build()
        .unwrap();
    let pool = mgr.host_pool(HostPoolConfig::default()).unwrap();
    match pool.alloc_pinned(&NumaPolicy::NearDevice(0), MIB) {
        // This machine has node 1: the pages are there.
        Ok(b) => {
            assert_eq!(b.policy(), &NumaPolicy::Bind(1));
            assert!(b.page_nodes().unwrap().iter().all(|&n| n == 1));
        }
        // One node here (the fixture has two): mbind to node 1 is the kernel's EINVAL,
        // proof that NearDevice(0) became Bind(1).
        Err(e) => assert!(
            matches!(
                e,
                Error::Os {
                    call: "mbind",
                    errno: nix::errno::Errno::EINVAL
                }
            ),
            "{e:?}"
        ),
    }
    // Device 1 reports no node: the calling thread's node, preferred (CPUs 0-7 are
    // node 0 in the fixture, and node 0 is this machine's). Where this process may not
    // run on those CPUs, there is nothing to check.
    let on_node0 = pin::on_one_of(0..8, || pool.alloc_pinned(&NumaPolicy::NearDevice(1), MIB));
    match on_node0 {
        Some(b) => {
            let b = b.unwrap();
            assert_eq!(b.policy(), &NumaPolicy::Preferred(0));
            assert!(b.page_nodes().unwrap().iter().all(|&n| n == 0));
        }
        None => eprintln!("skipped NearDevice(1): no CPU of 0-7 allowed here"),
    }
    // Nodes are checked against the topology as Manager::alloc does.
    assert!(matches!(
        pool.alloc_pinned(&NumaPolicy::Bind(7), MIB),
        Err(Error::UnknownNumaNode { node: 7, .. })
    ));
}

#[test]
fn the_pinned_budget_evicts_cached_blocks_then_fails_with_numbers() {
    each_backend(|mgr| {
        let pool = mgr
            .host_pool(HostPoolConfig {
                pinned_budget: Some(8 * MIB),
                ..HostPoolConfig::default()
            })
            .unwrap();
        let a = pool.alloc_pinned(&NumaPolicy::Default, 6 * MIB).unwrap();
        match pool.alloc_pinned(&NumaPolicy::Default, 4 * MIB) {
            Err(Error::OutOfMemory {
                kind: tier,
                requested,
                free,
                reserved,
                largest_free_block,
            }) => {
                assert_eq!(tier, MemKind::Pinned);
                assert_eq!(requested, 4 * MIB);
                assert_eq!(free, 2 * MIB);
                assert_eq!(reserved, Some(6 * MIB));
                assert_eq!(largest_free_block, Some(0));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(pool.stats().pinned.num_ooms, 1);
        // Pageable memory has its own (unlimited) budget.
        let h = pool.alloc_host(&NumaPolicy::Default, 4 * MIB).unwrap();
        drop(h);
        // Freed, the 6 MiB block is cached; a 4 MiB request evicts it to make room.
        drop(a);
        let b = pool.alloc_pinned(&NumaPolicy::Default, 4 * MIB).unwrap();
        let s = pool.stats().pinned;
        assert_eq!(s.regions_released, 1);
        assert_eq!(s.cached_bytes.current, 0);
        assert_eq!(s.held_bytes.current, 4 * MIB as u64);
        assert!(s.held_bytes.peak <= 8 * MIB as u64);
        // A cached block that the request could use is reported as the largest free one.
        let c = pool.alloc_pinned(&NumaPolicy::Default, 2 * MIB).unwrap();
        drop(c);
        match pool.alloc_pinned(&NumaPolicy::Default, 6 * MIB) {
            Err(Error::OutOfMemory {
                free,
                reserved,
                largest_free_block,
                ..
            }) => {
                assert_eq!(free, 2 * MIB);
                assert_eq!(reserved, Some(6 * MIB));
                assert_eq!(largest_free_block, Some(2 * MIB));
            }
            other => panic!("{other:?}"),
        }
        drop(b);
        assert!(matches!(
            mgr.host_pool(HostPoolConfig {
                pinned_budget: Some(0),
                ..HostPoolConfig::default()
            }),
            Err(Error::InvalidArgument(_))
        ));
    });
}

#[test]
fn trim_gives_cached_memory_back() {
    each_backend(|mgr| {
        let pool = pool(mgr);
        let blocks: Vec<_> = [MIB, 2 * MIB, 6 * MIB]
            .iter()
            .map(|&n| pool.alloc_pinned(&NumaPolicy::Default, n).unwrap())
            .collect();
        let h = pool.alloc_host(&NumaPolicy::Default, 100 << 10).unwrap();
        let live = pool.alloc_pinned(&NumaPolicy::Default, 4 * MIB).unwrap();
        drop(blocks);
        drop(h);
        let released = pool.trim();
        assert_eq!(released, MIB + 2 * MIB + 6 * MIB + (128 << 10));
        let s = pool.stats();
        assert_eq!(s.pinned.cached_bytes.current, 0);
        assert_eq!(s.pageable.cached_bytes.current, 0);
        assert_eq!(s.pinned.regions_released, 3);
        assert_eq!(s.pinned.live_bytes.current, 4 * MIB as u64);
        assert_eq!(pool.trim(), 0);
        // The live block is untouched; freed later, it is cached again.
        drop(live);
        assert_eq!(pool.stats().pinned.cached_bytes.current, 4 * MIB as u64);
        // Dropping the pool releases the rest (a clone keeps it alive until then).
        let clone = pool.clone();
        drop(pool);
        assert_eq!(clone.trim(), 4 * MIB);
    });
}

#[test]
fn threads_allocate_and_free_concurrently() {
    each_backend(|mgr| {
        let pool = pool(mgr);
        let sizes = [4 << 10, 60 << 10, MIB, 2 * MIB, 3 * MIB];
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let pool = pool.clone();
                s.spawn(move || {
                    for i in 0..100usize {
                        let size = sizes[(i + t as usize) % sizes.len()];
                        let pinned = i % 3 != 0;
                        let p = if pinned {
                            Placement::Pinned(NumaPolicy::Default)
                        } else {
                            Placement::Host(NumaPolicy::Default)
                        };
                        let mut b = pool.alloc(&p, size).unwrap();
                        assert_eq!(b.is_pinned(), pinned);
                        let tag = t.wrapping_mul(31).wrapping_add(i as u8);
                        b.as_mut_slice().unwrap().fill(tag);
                        std::thread::yield_now();
                        assert!(b.as_slice().unwrap().iter().all(|&x| x == tag));
                    }
                });
            }
        });
        let s = pool.stats();
        for t in [s.pinned, s.pageable] {
            assert_eq!(t.live_bytes.current, 0);
            assert_eq!(t.live_blocks.current, 0);
            assert_eq!(t.cached_bytes.current, t.held_bytes.current);
            assert!(t.hits > 0, "{t:?}");
            assert_eq!(t.regions_created, t.misses);
        }
        assert_eq!(
            s.pinned.hits + s.pinned.misses + s.pageable.hits + s.pageable.misses,
            400
        );
        // Small regions are registered whole.
        assert_eq!(s.pinned.registrations, s.pinned.regions_created);
        // At most one block per thread per class is ever needed at once.
        assert!(s.pinned.regions_created <= 4 * sizes.len() as u64, "{s:?}");
    });
}

#[test]
fn a_1_gib_region_is_pinned_in_pieces_by_several_threads_and_all_unregistered() {
    each_backend(|mgr| {
        let pool = mgr
            .host_pool(HostPoolConfig {
                threads: 4,
                ..HostPoolConfig::default()
            })
            .unwrap();
        let logged = errors_logged(|| {
            let mut b = pool.alloc_pinned(&NumaPolicy::Bind(0), GIB).unwrap();
            assert!(b.is_pinned());
            assert_eq!(b.registrations(), 4, "four 256 MiB pieces");
            assert_eq!(pool.stats().pinned.registrations, 4);
            let nodes = b.page_nodes().unwrap();
            assert!(nodes.iter().all(|&n| n == 0), "{nodes:?}");
            let bytes = b.as_mut_slice().unwrap();
            bytes[0] = 1;
            bytes[GIB - 1] = 2;
            drop(b);
            // Reused whole: no registration.
            let b = pool.alloc_pinned(&NumaPolicy::Bind(0), GIB).unwrap();
            assert_eq!(b.as_slice().unwrap()[GIB - 1], 2);
            assert_eq!(pool.stats().pinned.registrations, 4);
            drop(b);
            // Every piece is unregistered; the sim refuses an unregistration it does
            // not know (and munlock a range that is not mapped), and drop logs it.
            assert_eq!(pool.trim(), GIB);
        });
        assert!(logged.is_empty(), "{logged}");
        assert_eq!(pool.stats().pinned.regions_released, 1);
    });
}

#[test]
fn an_unbalanced_unregistration_would_be_seen() {
    // The check above relies on failed unregistrations being logged: prove it.
    let mgr = manager(BackendKind::Sim);
    let logged = errors_logged(|| {
        let mut v = vec![0u8; 8192];
        let p = std::ptr::NonNull::new(v.as_mut_ptr()).unwrap();
        // SAFETY: the range was never registered; the sim only looks it up.
        let res = unsafe { mgr.backend().unregister_host(p, 4096) };
        assert!(res.is_err());
        tracing::error!("freeing a buffer failed: {}", res.unwrap_err());
    });
    assert!(logged.contains("not registered"), "{logged}");
}

#[test]
fn a_vec_lives_in_pinned_memory() {
    each_backend(|mgr| {
        let pool = pool(mgr);
        let alloc = pool.pinned_allocator(NumaPolicy::NearDevice(0));
        let alloc = if mgr.backend_kind() == BackendKind::Host {
            // No devices on the host backend: place by node instead.
            pool.pinned_allocator(NumaPolicy::Bind(0))
        } else {
            alloc
        };
        let mut v: PinnedVec<u64, _> = PinnedVec::new_in(alloc.clone());
        for i in 0..300_000u64 {
            v.push(i * 3);
        }
        assert_eq!(v.len(), 300_000);
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3));
        assert!(
            alloc.is_pinned(v.as_ptr().cast()),
            "the buffer is a pinned block"
        );
        assert_eq!(alloc.live_blocks(), 1, "grown blocks were given back");
        let s = pool.stats().pinned;
        assert_eq!(s.live_blocks.current, 1);
        assert!(s.registrations >= 2, "grew through several classes: {s:?}");
        assert!(s.live_bytes.current >= (300_000 * 8) as u64);
        if mgr.backend_kind() == BackendKind::Host {
            // mlock'd: the kernel counts the buffer as locked.
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let locked_kb: usize = status
                .lines()
                .find_map(|l| l.strip_prefix("VmLck:"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap();
            assert!(locked_kb * 1024 >= v.capacity() * 8, "VmLck {locked_kb} kB");
        }
        // Cloned vectors draw from the same pool; a second vector of the size of one
        // freed during growth takes that block back without pinning.
        let regs = pool.stats().pinned.registrations;
        let w: PinnedVec<u64, _> = PinnedVec::with_capacity_in(1024, alloc.clone());
        assert!(alloc.is_pinned(w.as_ptr().cast()));
        assert_eq!(pool.stats().pinned.registrations, regs);
        drop(v);
        drop(w);
        assert_eq!(alloc.live_blocks(), 0);
        assert_eq!(pool.stats().pinned.live_blocks.current, 0);
        // Zero-sized and over-aligned requests.
        use allocator_api2::alloc::Allocator;
        let z = std::alloc::Layout::from_size_align(0, 64).unwrap();
        let p = alloc.allocate(z).unwrap();
        assert_eq!(p.cast::<u8>().as_ptr() as usize % 64, 0);
        // SAFETY: `p` came from `allocate` with this layout.
        unsafe { alloc.deallocate(p.cast(), z) };
        let big_align = std::alloc::Layout::from_size_align(64, 1 << 22).unwrap();
        assert!(alloc.allocate(big_align).is_err());
    });
}

#[test]
fn bad_requests_are_refused() {
    each_backend(|mgr| {
        let pool = pool(mgr);
        assert!(matches!(
            pool.alloc(&Placement::Device(0), 4096),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            pool.alloc_pinned(&NumaPolicy::Default, 0),
            Err(Error::InvalidSize { .. })
        ));
        assert!(matches!(
            pool.alloc_pinned(&NumaPolicy::Default, usize::MAX),
            Err(Error::InvalidSize { .. })
        ));
        assert!(matches!(
            pool.alloc_pinned(&NumaPolicy::Bind(4000), 4096),
            Err(Error::UnknownNumaNode { .. })
        ));
        assert_eq!(size_class(5000), Some(8192));
    });
}

/// Issue 15 (exhaustion): under an address-space limit (`RLIMIT_AS`), host, pinned and
/// pooled allocations are refused with `OutOfMemory` and numbers that tell the truth
/// (the bytes free are what the limit leaves, fewer than requested), nothing aborts,
/// and once the limit is lifted the same calls succeed. The limit would bind every
/// thread of the test harness, so the test runs itself in a child process of its own.
#[test]
fn an_address_space_limit_is_an_error_with_numbers_and_allocation_recovers() {
    const REQ: usize = 256 * MIB;
    const NAME: &str = "an_address_space_limit_is_an_error_with_numbers_and_allocation_recovers";
    if let Some(text) = child::alone(module_path!(), NAME) {
        assert!(text.contains("limit checked"), "child ran nothing:\n{text}");
        return;
    }
    for kind in [BackendKind::Sim, BackendKind::Host] {
        let mgr = manager(kind);
        let pool = pool(&mgr);
        // Warm up what the calls below touch once (threads, tables), then limit the
        // address space to what is mapped now plus 64 MiB.
        drop(
            mgr.alloc(Placement::Pinned(NumaPolicy::Default), MIB)
                .unwrap(),
        );
        drop(pool.alloc_pinned(&NumaPolicy::Default, MIB).unwrap());
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let mapped: usize = statm.split_whitespace().next().unwrap().parse().unwrap();
        // SAFETY: sysconf reads a constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct passed, a live local.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) }, 0);
        let saved = lim.rlim_cur;
        lim.rlim_cur = (mapped * page + 64 * MIB) as libc::rlim_t;
        // SAFETY: setrlimit reads the struct passed; lowering the soft limit is allowed.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);

        let refused = |what: &str, r: hetmem::Result<()>, tier: MemKind| match r {
            Err(Error::OutOfMemory {
                kind: t,
                requested,
                free,
                ..
            }) => {
                assert_eq!(t, tier, "{what}");
                assert_eq!(requested, REQ, "{what}");
                assert!(free < requested, "{what}: {free} bytes said free");
                // What the limit leaves (a little more once cached blocks are unmapped).
                assert!(free <= 128 * MIB, "{what}: {free} bytes said free");
            }
            other => panic!("{kind:?} {what} under RLIMIT_AS: {other:?}"),
        };
        let host = Placement::Host(NumaPolicy::Default);
        let pinned = Placement::Pinned(NumaPolicy::Default);
        refused(
            "host",
            mgr.alloc(host.clone(), REQ).map(drop),
            MemKind::Host,
        );
        refused(
            "pinned",
            mgr.alloc(pinned.clone(), REQ).map(drop),
            MemKind::Pinned,
        );
        refused(
            "pool host",
            pool.alloc_host(&NumaPolicy::Default, REQ).map(drop),
            MemKind::Host,
        );
        refused(
            "pool pinned",
            pool.alloc_pinned(&NumaPolicy::Default, REQ).map(drop),
            MemKind::Pinned,
        );
        // What fits under the limit is still served.
        drop(mgr.alloc(host.clone(), 8 * MIB).unwrap());
        drop(pool.alloc_pinned(&NumaPolicy::Default, 8 * MIB).unwrap());

        lim.rlim_cur = saved;
        // SAFETY: as above; the soft limit goes back to what it was (≤ the hard one).
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);
        let mut b = mgr.alloc(host, REQ).unwrap();
        b.as_mut_slice().unwrap()[REQ - 1] = 7;
        drop(b);
        drop(mgr.alloc(pinned, REQ).unwrap());
        drop(pool.alloc_pinned(&NumaPolicy::Default, REQ).unwrap());
        drop(pool.alloc_host(&NumaPolicy::Default, REQ).unwrap());
    }
    println!("limit checked");
}
