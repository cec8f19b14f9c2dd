//! Host memory and NUMA topology: sysfs fixtures with several nodes, and real placement
//! on this machine (one node) proved with `move_pages`.

use crate::common::smaps;

use std::path::{Path, PathBuf};

use hetmem::backend::host::HostBackend;
use hetmem::backend::{Backend, BackendKind, DevicePtr, HostKind, MemRef, StreamHandle};
use hetmem::host_mem::{HostRegion, HUGE_PAGE_SIZE, PAGE_NODE_SAMPLES};
use hetmem::topology::Topology;
use hetmem::{Error, Manager, MemKind, NumaPolicy, Placement};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sysfs")
        .join(name)
}

fn real() -> Topology {
    Topology::from_root(Path::new("/")).expect("this machine's topology")
}

/// A host-backend manager reading its topology from `root` (a fixture, or `/`). Node
/// checks against the topology live in the manager (the placement layer), not in
/// [`HostRegion::alloc`], so errors such as [`Error::UnknownNumaNode`] are asserted
/// through it.
fn host_manager(root: &Path) -> Manager {
    Manager::builder()
        .backend(BackendKind::Host)
        .sysfs_root(root)
        .build()
        .expect("host manager")
}

/// `Manager::alloc` of host memory with `policy`, as its error.
fn manager_host_err(mgr: &Manager, policy: NumaPolicy, len: usize) -> Error {
    match mgr.alloc(Placement::Host(policy), len) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

fn is_mbind_einval(err: &Error) -> bool {
    matches!(
        err,
        Error::Os {
            call: "mbind",
            errno: nix::errno::Errno::EINVAL
        }
    )
}

// ---- topology from fixtures -------------------------------------------------------

#[test]
fn two_node_fixture() {
    let topo = Topology::from_root(&fixture("two-node")).unwrap();
    let nodes = topo.nodes();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0].id, 0);
    assert_eq!(nodes[1].id, 1);
    assert_eq!(nodes[0].cpus, (0..8).collect::<Vec<u32>>());
    assert_eq!(nodes[1].cpus, (8..16).collect::<Vec<u32>>());
    assert_eq!(nodes[0].mem_total, 65_536_000 * 1024);
    assert_eq!(nodes[1].mem_total, 65_536_000 * 1024);
    assert!(topo.check_node(0).is_ok());
    assert!(topo.check_node(1).is_ok());
    assert_eq!(topo.memory_nodes(), vec![0, 1]);
    assert_eq!(topo.node_of_cpu(9), Some(1));
    assert_eq!(topo.node_of_cpu(16), None);
    assert_eq!(topo.node(1).unwrap().cpus.len(), 8);
}

#[test]
fn pci_numa_nodes() {
    let topo = Topology::from_root(&fixture("two-node")).unwrap();
    assert_eq!(topo.pci_numa_node("0000:3b:00.0"), Some(1));
    // Drivers report upper-case addresses; sysfs is lower case.
    assert_eq!(topo.pci_numa_node("0000:3B:00.0"), Some(1));
    // The kernel's -1 (no affinity, as on the H200 host) is None, not node 0 or u32::MAX.
    assert_eq!(topo.pci_numa_node("0000:af:00.0"), None);
    // A device sysfs does not know.
    assert_eq!(topo.pci_numa_node("0000:00:01.0"), None);
}

#[test]
fn unknown_node_lists_available_nodes() {
    let topo = Topology::from_root(&fixture("two-node")).unwrap();
    assert_eq!(
        topo.check_node(2),
        Err(Error::UnknownNumaNode {
            node: 2,
            available: vec![0, 1]
        })
    );
}

#[test]
fn cpu_only_node() {
    let topo = Topology::from_root(&fixture("cpu-only-node")).unwrap();
    assert_eq!(topo.nodes().len(), 2);
    let n1 = topo.node(1).unwrap();
    assert_eq!(n1.mem_total, 0);
    assert_eq!(n1.cpus, vec![4, 5, 6, 7]);
    assert!(topo.check_node(0).is_ok());
    assert_eq!(
        topo.check_node(1),
        Err(Error::NumaNodeWithoutMemory { node: 1 })
    );
    assert_eq!(topo.memory_nodes(), vec![0]);
    // The manager refuses the node before any system call (this machine has no node 1
    // either, which would otherwise surface as mbind's EINVAL).
    let mgr = host_manager(&fixture("cpu-only-node"));
    assert_eq!(
        manager_host_err(&mgr, NumaPolicy::Bind(1), 4096),
        Error::NumaNodeWithoutMemory { node: 1 }
    );
    assert_eq!(
        manager_host_err(&mgr, NumaPolicy::Interleave(vec![0, 1]), 4096),
        Error::NumaNodeWithoutMemory { node: 1 }
    );
    assert_eq!(
        manager_host_err(&mgr, NumaPolicy::Preferred(1), 4096),
        Error::NumaNodeWithoutMemory { node: 1 }
    );
}

#[test]
fn no_numa_fixture() {
    let topo = Topology::from_root(&fixture("no-numa")).unwrap();
    assert_eq!(topo.nodes().len(), 1);
    let n0 = &topo.nodes()[0];
    assert_eq!(n0.id, 0);
    assert_eq!(n0.mem_total, 8_000_000 * 1024);
    assert_eq!(n0.cpus, vec![0, 1, 2, 3]);
    assert!(topo.check_node(0).is_ok());
    assert!(matches!(
        topo.check_node(1),
        Err(Error::UnknownNumaNode { node: 1, ref available }) if available == &[0]
    ));
}

#[test]
fn broken_tree_is_a_config_error_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("hetmem-broken-sysfs-{}", std::process::id()));
    let node0 = dir.join("sys/devices/system/node/node0");
    std::fs::create_dir_all(&node0).unwrap();
    std::fs::write(node0.join("meminfo"), "Node 0 MemTotal: 1024 kB\n").unwrap();
    std::fs::write(node0.join("cpulist"), "0-x\n").unwrap();
    let err = Topology::from_root(&dir).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    match err {
        Error::Config { path, .. } => assert!(path.ends_with("node0/cpulist"), "{path}"),
        other => panic!("expected Config, got {other:?}"),
    }
    // An empty root has neither nodes nor /proc/meminfo.
    let err = Topology::from_root(Path::new("/nonexistent-hetmem-root")).unwrap_err();
    assert!(matches!(err, Error::Config { ref path, .. } if path.ends_with("proc/meminfo")));
}

// ---- real placement on this machine -----------------------------------------------

#[test]
fn bind_node0_places_every_page_on_node0() {
    let len = 8 << 20;
    let region = HostRegion::alloc(len, &NumaPolicy::Bind(0)).unwrap();
    assert_eq!(region.len(), len);
    assert!(!region.is_empty());
    let nodes = region.page_nodes().unwrap();
    assert_eq!(nodes.len(), len / page_size());
    // Every page is present (pre-faulted: no -ENOENT) and on node 0.
    assert!(nodes.iter().all(|&n| n == 0), "page nodes {nodes:?}");
    // The memory is usable.
    // SAFETY: the region is `len` bytes of read-write memory owned by `region`, and no
    // other reference to it exists.
    let bytes = unsafe { std::slice::from_raw_parts_mut(region.ptr().as_ptr(), len) };
    assert!(bytes.iter().all(|&b| b == 0));
    bytes[len - 1] = 7;
    assert_eq!(bytes[len - 1], 7);
}

#[test]
fn page_nodes_samples_large_regions() {
    let len = PAGE_NODE_SAMPLES * page_size() * 2 + 1;
    let region = HostRegion::alloc(len, &NumaPolicy::Preferred(0)).unwrap();
    let nodes = region.page_nodes().unwrap();
    assert_eq!(nodes.len(), PAGE_NODE_SAMPLES);
    assert!(nodes.iter().all(|&n| n == 0), "page nodes {nodes:?}");
}

#[test]
fn default_policy_pages_are_present_on_a_real_node() {
    let topo = real();
    let region = HostRegion::alloc(64 << 10, &NumaPolicy::Default).unwrap();
    let memory_nodes: Vec<i32> = topo.memory_nodes().iter().map(|&n| n as i32).collect();
    for n in region.page_nodes().unwrap() {
        assert!(
            memory_nodes.contains(&n),
            "page on {n}, nodes {memory_nodes:?}"
        );
    }
}

#[test]
fn bind_to_missing_node_is_unknown_numa_node() {
    let topo = real();
    let mgr = host_manager(Path::new("/"));
    let err = manager_host_err(&mgr, NumaPolicy::Bind(7), 1 << 20);
    match err {
        Error::UnknownNumaNode { node, available } => {
            assert_eq!(node, 7);
            assert_eq!(
                available,
                topo.nodes().iter().map(|n| n.id).collect::<Vec<_>>()
            );
        }
        other => panic!("expected UnknownNumaNode, got {other:?}"),
    }
    assert!(matches!(
        manager_host_err(&mgr, NumaPolicy::Preferred(7), 4096),
        Error::UnknownNumaNode { node: 7, .. }
    ));
    assert!(matches!(
        manager_host_err(&mgr, NumaPolicy::Interleave(vec![0, 7]), 4096),
        Error::UnknownNumaNode { node: 7, .. }
    ));
}

#[test]
fn host_region_leaves_missing_nodes_to_the_kernel() {
    // The backend does not consult a topology: a node this kernel lacks is mbind's EINVAL,
    // and an id no node mask can hold is refused the same way without building the mask.
    if real().node(7).is_some() {
        return;
    }
    for policy in [
        NumaPolicy::Bind(7),
        NumaPolicy::Preferred(7),
        NumaPolicy::Interleave(vec![7]),
        NumaPolicy::Bind(u32::MAX),
        NumaPolicy::Interleave(vec![0, u32::MAX]),
    ] {
        let err = HostRegion::alloc(1 << 20, &policy).unwrap_err();
        assert!(is_mbind_einval(&err), "{policy:?}: {err:?}");
    }
    // The kernel intersects an interleave set with the nodes it has: {0, 7} is {0}. That
    // is why the manager checks every node against the topology first (see
    // bind_to_missing_node_is_unknown_numa_node, which refuses {0, 7}).
    let region = HostRegion::alloc(1 << 20, &NumaPolicy::Interleave(vec![0, 7])).unwrap();
    assert!(region.page_nodes().unwrap().iter().all(|&n| n == 0));
}

#[test]
fn fixture_node_missing_from_kernel_is_an_mbind_error() {
    // The two-node fixture promises node 1; this kernel has only node 0, so mbind itself
    // refuses (EINVAL) and the error says so instead of silently placing on node 0.
    if real().node(1).is_some() {
        return;
    }
    let mgr = host_manager(&fixture("two-node"));
    let err = manager_host_err(&mgr, NumaPolicy::Bind(1), 4096);
    assert!(is_mbind_einval(&err), "{err:?}");
    let err = HostRegion::alloc(4096, &NumaPolicy::Bind(1)).unwrap_err();
    assert!(is_mbind_einval(&err), "{err:?}");
}

#[test]
fn interleave_over_node0() {
    let region = HostRegion::alloc(4 << 20, &NumaPolicy::Interleave(vec![0])).unwrap();
    assert!(region.page_nodes().unwrap().iter().all(|&n| n == 0));
    assert!(matches!(
        HostRegion::alloc(4096, &NumaPolicy::Interleave(vec![])),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn near_device_must_be_resolved_first() {
    assert!(matches!(
        HostRegion::alloc(4096, &NumaPolicy::NearDevice(0)),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn invalid_sizes() {
    for len in [0, usize::MAX, usize::MAX - 4095, isize::MAX as usize + 1] {
        match HostRegion::alloc(len, &NumaPolicy::Default) {
            Err(Error::InvalidSize { requested, .. }) => assert_eq!(requested, len),
            other => panic!("{len}: expected InvalidSize, got {other:?}"),
        }
    }
}

#[test]
fn impossible_size_is_host_out_of_memory() {
    // 1 EiB: a valid size no machine can map.
    let len = 1usize << 60;
    match HostRegion::alloc(len, &NumaPolicy::Default) {
        Err(Error::OutOfMemory {
            kind: tier,
            requested,
            free,
            ..
        }) => {
            assert_eq!(tier, MemKind::Host);
            assert_eq!(requested, len);
            assert!(free > 0 && free < len);
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
}

#[test]
fn large_regions_are_thp_advised() {
    let region = HostRegion::alloc(8 << 20, &NumaPolicy::Bind(0)).unwrap();
    assert!(region.huge_pages_advised());
    assert_eq!(region.ptr().as_ptr() as usize % HUGE_PAGE_SIZE, 0);
    let (flags, huge_kb) = smaps::entry(region.ptr().as_ptr() as usize);
    // `hg` is the VMA flag MADV_HUGEPAGE sets.
    assert!(
        flags.split_whitespace().any(|f| f == "hg"),
        "VmFlags: {flags}"
    );
    // Where THP is on and madvised regions may compact synchronously, the aligned,
    // pre-faulted region is backed by huge pages now.
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let defrag =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/defrag").unwrap_or_default();
    if !thp.contains("[never]") && (defrag.contains("madvise]") || defrag.contains("[always]")) {
        assert!(
            huge_kb >= 2048,
            "AnonHugePages {huge_kb} kB, VmFlags {flags}"
        );
    }

    let small = HostRegion::alloc(1 << 20, &NumaPolicy::Default).unwrap();
    assert!(!small.huge_pages_advised());
    let (flags, _) = smaps::entry(small.ptr().as_ptr() as usize);
    assert!(
        !flags.split_whitespace().any(|f| f == "hg"),
        "VmFlags: {flags}"
    );
}

fn page_size() -> usize {
    hetmem::host_mem::page_size()
}

// ---- the host backend ---------------------------------------------------------------

fn vm_lck_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmLck:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn host_backend_has_no_devices() {
    let b = HostBackend::new();
    assert_eq!(b.kind(), BackendKind::Host);
    assert!(b.devices().is_empty());
    let unknown = Error::UnknownDevice {
        device: 0,
        count: 0,
        backend: BackendKind::Host,
    };
    assert_eq!(b.mem_info(0).unwrap_err(), unknown);
    assert_eq!(b.alloc_device(0, 4096).unwrap_err(), unknown);
    assert_eq!(b.alloc_managed(0, 4096).unwrap_err(), unknown);
    assert_eq!(b.create_stream(0).unwrap_err(), unknown);
    assert_eq!(b.create_event(0).unwrap_err(), unknown);
    // SAFETY: the host backend refuses every handle without touching it.
    let err = unsafe { b.synchronize_stream(StreamHandle(1)) }.unwrap_err();
    assert!(matches!(
        err,
        Error::Unsupported {
            backend: BackendKind::Host,
            ..
        }
    ));
    assert!(b.as_any().downcast_ref::<HostBackend>().is_some());
}

#[test]
fn host_backend_copies_host_to_host() {
    let b = HostBackend::new();
    let src = HostRegion::alloc(10_000, &NumaPolicy::Default).unwrap();
    let dst = HostRegion::alloc(10_000, &NumaPolicy::Default).unwrap();
    // SAFETY: `src` is 10_000 bytes owned here with no other reference.
    unsafe { std::slice::from_raw_parts_mut(src.ptr().as_ptr(), 10_000) }
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 251) as u8);
    let host = |r: &HostRegion| MemRef::Host {
        ptr: r.ptr(),
        kind: HostKind::Pageable,
    };
    // SAFETY: both regions are 10_000 bytes, distinct and alive for the call.
    unsafe { b.copy(host(&dst), host(&src), 10_000, None) }.unwrap();
    // SAFETY: as above, read-only now.
    let out = unsafe { std::slice::from_raw_parts(dst.ptr().as_ptr(), 10_000) };
    assert!(out.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));

    let device = MemRef::Device {
        device: 0,
        ptr: DevicePtr(0x1000),
    };
    // SAFETY: refused before any byte moves.
    let err = unsafe { b.copy(device, host(&src), 16, None) }.unwrap_err();
    assert!(matches!(
        err,
        Error::UnknownDevice {
            device: 0,
            count: 0,
            ..
        }
    ));
    // SAFETY: refused before any byte moves.
    let err = unsafe { b.copy(host(&dst), host(&src), 16, Some(StreamHandle(0))) }.unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }));
}

#[test]
fn host_backend_pins_with_mlock() {
    let b = HostBackend::new();
    let len = 256 << 10;
    let region = HostRegion::alloc(len, &NumaPolicy::Default).unwrap();
    let before = vm_lck_kb();
    // SAFETY: the region stays mapped until after unregister_host below.
    unsafe { b.register_host(region.ptr(), len) }.unwrap();
    let during = vm_lck_kb();
    // SAFETY: registered just above; nothing else uses it.
    unsafe { b.unregister_host(region.ptr(), len) }.unwrap();
    let after = vm_lck_kb();
    // Other tests in this binary do not lock memory, so the deltas are ours.
    assert!(during >= before + 256, "VmLck {before} -> {during} kB");
    assert!(after + 256 <= during, "VmLck {during} -> {after} kB");
}

/// The policy asked for is the one the kernel holds for the region's pages (read back
/// with get_mempolicy(MPOL_F_ADDR), not trusted). Where every page is on node 0 anyway
/// (a one-node machine), this is what shows that the region was bound at all.
#[test]
fn regions_carry_the_policy_they_were_asked_for() {
    use hetmem_sys::numa::{self, FixedNodeMask};
    for (policy, mode) in [
        (NumaPolicy::Bind(0), numa::MPOL_BIND),
        (NumaPolicy::Preferred(0), numa::MPOL_PREFERRED),
        (NumaPolicy::Interleave(vec![0]), numa::MPOL_INTERLEAVE),
    ] {
        let region = HostRegion::alloc(4 << 20, &policy).unwrap();
        for off in [0, (4 << 20) - 1] {
            // SAFETY: `off` lies inside the region.
            let at = unsafe { region.ptr().as_ptr().add(off) };
            let (got, mask) = numa::policy_of_address(at.cast()).unwrap();
            assert_eq!(got, mode, "{policy:?} at {off}");
            assert_eq!(mask, FixedNodeMask::single(0).unwrap(), "{policy:?}");
        }
    }
    let plain = HostRegion::alloc(1 << 20, &NumaPolicy::Default).unwrap();
    let (mode, _) = numa::policy_of_address(plain.ptr().as_ptr().cast()).unwrap();
    assert_eq!(mode, numa::MPOL_DEFAULT);
}
