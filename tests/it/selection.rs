//! Backend selection (builder, `HETMEM_BACKEND`, auto) and device-to-NUMA affinity
//! through the Manager, against sysfs fixture trees.

use std::path::PathBuf;

use crate::common::pin;

use hetmem::backend::sim::SimDevice;
use hetmem::{BackendKind, Error, Manager, NumaPolicy, Placement, SimConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sysfs")
        .join(name)
}

/// Two simulated GPUs in the PCI slots of the two-node fixture: one on node 1, one
/// whose slot reports -1.
fn two_node_sim() -> SimConfig {
    let dev = |pci: &str| SimDevice {
        name: "sim-H200".into(),
        capacity: 1 << 30,
        pci_bus_id: Some(pci.into()),
    };
    SimConfig {
        devices: vec![dev("0000:3b:00.0"), dev("0000:AF:00.0")],
        ..SimConfig::default()
    }
}

#[test]
fn devices_get_their_numa_node_from_sysfs() {
    let mgr = Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(two_node_sim())
        .sysfs_root(fixture("two-node"))
        .build()
        .unwrap();
    assert_eq!(mgr.topology().nodes().len(), 2);
    assert_eq!(mgr.devices()[0].numa_node, Some(1), "slot 3b is on node 1");
    assert_eq!(mgr.devices()[1].numa_node, None, "slot af reports -1");
    assert_eq!(
        mgr.resolve_policy(&NumaPolicy::NearDevice(0)).unwrap(),
        NumaPolicy::Bind(1)
    );
    // No node for device 1 on a machine with two: the node of the CPU this thread runs
    // on (the fixture's map: CPUs 0-7 are node 0's, 8-15 node 1's, others no node's),
    // as a preference, never the scattering default.
    let cases = [
        (0..8, NumaPolicy::Preferred(0)),
        (8..16, NumaPolicy::Preferred(1)),
        (16..1024, NumaPolicy::Default),
    ];
    let mut ran = 0;
    for (cpus, want) in cases {
        if let Some(got) = pin::on_one_of(cpus, || mgr.resolve_policy(&NumaPolicy::NearDevice(1))) {
            assert_eq!(got.unwrap(), want);
            ran += 1;
        }
    }
    if ran == 0 {
        eprintln!("skipped NearDevice(1): this thread's CPUs could not be pinned");
    }
    assert!(matches!(
        mgr.resolve_policy(&NumaPolicy::NearDevice(2)),
        Err(Error::UnknownDevice {
            device: 2,
            count: 2,
            ..
        })
    ));
    assert_eq!(
        mgr.resolve_policy(&NumaPolicy::Bind(0)).unwrap(),
        NumaPolicy::Bind(0)
    );
}

#[test]
fn cpu_only_node_is_refused_by_name() {
    let mgr = Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(SimConfig::with_devices(1, 1 << 20))
        .sysfs_root(fixture("cpu-only-node"))
        .build()
        .unwrap();
    for p in [
        Placement::Host(NumaPolicy::Bind(1)),
        Placement::Pinned(NumaPolicy::Bind(1)),
    ] {
        assert!(
            matches!(
                mgr.alloc(p.clone(), 4096),
                Err(Error::NumaNodeWithoutMemory { node: 1 })
            ),
            "{p:?}"
        );
    }
}

#[test]
fn sim_config_is_validated() {
    let bad = SimConfig {
        devices: vec![],
        ..SimConfig::default()
    };
    assert!(matches!(
        Manager::builder()
            .backend(BackendKind::Sim)
            .sim_config(bad)
            .build(),
        Err(Error::InvalidArgument(_))
    ));
    let bad = SimConfig {
        h2d_gbps: 0.0,
        ..SimConfig::default()
    };
    assert!(Manager::builder()
        .backend(BackendKind::Sim)
        .sim_config(bad)
        .build()
        .is_err());
}

#[test]
fn missing_driver_libraries_are_clear_errors() {
    // Where a GPU driver exists this test has nothing to check for that backend.
    if let Err(e) = Manager::builder().backend(BackendKind::Cuda).build() {
        assert!(
            matches!(&e, Error::BackendUnavailable { backend: BackendKind::Cuda, reason } if !reason.is_empty()),
            "{e:?}"
        );
    }
    let e = Manager::builder()
        .backend(BackendKind::Rocm)
        .rocm_library("/nonexistent/libamdhip64.so")
        .build()
        .unwrap_err();
    match e {
        Error::BackendUnavailable {
            backend: BackendKind::Rocm,
            reason,
        } => {
            assert!(reason.contains("/nonexistent/libamdhip64.so"), "{reason}")
        }
        other => panic!("expected BackendUnavailable, got {other:?}"),
    }
}
