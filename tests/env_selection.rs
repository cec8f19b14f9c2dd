//! Backend selection through the environment (`HETMEM_BACKEND`, `HETMEM_SIM_*`,
//! `HETMEM_SYSFS_ROOT`). Alone in its test binary: `set_var` must not race with other
//! tests reading the environment (the C side of `dlopen` included).

use std::path::PathBuf;

use hetmem::{BackendKind, Error, Manager, Placement};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sysfs")
        .join(name)
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
    // GPU only: never the simulator by automatic choice, but still by explicit choice.
    match Manager::builder().gpu_only().build() {
        Ok(m) => assert_eq!(m.backend_kind(), expect),
        Err(Error::BackendUnavailable { reason, .. }) => {
            assert_eq!(expect, BackendKind::Sim);
            assert!(
                reason.contains("cuda:") && reason.contains("rocm:"),
                "{reason}"
            );
        }
        Err(e) => panic!("unexpected {e}"),
    }
    set("HETMEM_BACKEND", Some("sim"));
    let m = Manager::builder().gpu_only().build().unwrap();
    assert_eq!(m.backend_kind(), BackendKind::Sim);
    set("HETMEM_BACKEND", None);

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
