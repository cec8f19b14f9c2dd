//! Backend selection (builder, `HETMEM_BACKEND`, auto) and device-to-NUMA affinity
//! through the Manager, against sysfs fixture trees.

use std::path::PathBuf;

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
    assert_eq!(
        mgr.resolve_policy(&NumaPolicy::NearDevice(1)).unwrap(),
        NumaPolicy::Default
    );
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

/// Everything that reads the environment, in one test so that no other test in this
/// binary races with `set_var`.
#[test]
fn environment_selects_the_backend() {
    let set = |k: &str, v: Option<&str>| match v {
        Some(v) => std::env::set_var(k, v),
        None => std::env::remove_var(k),
    };
    set("HETMEM_SIM_DEVICES", None);
    set("HETMEM_SIM_MEMORY", None);

    set("HETMEM_BACKEND", Some("host"));
    assert_eq!(Manager::new().unwrap().backend_kind(), BackendKind::Host);
    set("HETMEM_BACKEND", Some("SIM"));
    assert_eq!(Manager::new().unwrap().backend_kind(), BackendKind::Sim);
    set("HETMEM_BACKEND", Some("tpu"));
    assert!(matches!(Manager::new(), Err(Error::InvalidArgument(m)) if m.contains("tpu")));
    // The builder wins over the environment.
    let m = Manager::builder()
        .backend(BackendKind::Host)
        .build()
        .unwrap();
    assert_eq!(m.backend_kind(), BackendKind::Host);

    // Auto: the first GPU backend that opens, else the simulator.
    set("HETMEM_BACKEND", Some("auto"));
    let expect = [BackendKind::Cuda, BackendKind::Rocm]
        .into_iter()
        .find(|k| Manager::builder().backend(*k).build().is_ok())
        .unwrap_or(BackendKind::Sim);
    assert_eq!(Manager::new().unwrap().backend_kind(), expect);
    set("HETMEM_BACKEND", None);
    assert_eq!(Manager::new().unwrap().backend_kind(), expect);

    // The simulated machine's shape from the environment.
    set("HETMEM_SIM_DEVICES", Some("3"));
    set("HETMEM_SIM_MEMORY", Some("64M"));
    let m = Manager::builder()
        .backend(BackendKind::Sim)
        .build()
        .unwrap();
    assert_eq!(m.devices().len(), 3);
    assert_eq!(m.devices()[2].info.total_memory, 64 << 20);
    assert!(matches!(
        m.alloc(Placement::Device(2), 65 << 20),
        Err(Error::OutOfMemory { requested, free, .. }) if requested == 65 << 20 && free == 64 << 20
    ));
    set("HETMEM_SIM_MEMORY", Some("lots"));
    assert!(Manager::builder()
        .backend(BackendKind::Sim)
        .build()
        .is_err());
    set("HETMEM_SIM_DEVICES", None);
    set("HETMEM_SIM_MEMORY", None);

    // The sysfs root from the environment.
    set(
        "HETMEM_SYSFS_ROOT",
        Some(fixture("two-node").to_str().unwrap()),
    );
    let m = Manager::builder()
        .backend(BackendKind::Host)
        .build()
        .unwrap();
    assert_eq!(
        m.topology()
            .nodes()
            .iter()
            .map(|n| n.id)
            .collect::<Vec<_>>(),
        vec![0, 1]
    );
    set("HETMEM_SYSFS_ROOT", None);
}
