//! What hetmem sees on this machine: the backends it can open, the devices of the one
//! it picks, and the NUMA nodes.
//!
//! ```text
//! cargo run --release --example info            # a readable report
//! cargo run --release --example info -- --json  # one JSON object
//! HETMEM_BACKEND=sim cargo run --example info   # force a backend
//! ```

use hetmem::{BackendKind, Manager, NumaPolicy, Placement};
use serde_json::{json, Value};

fn main() {
    let json_out = std::env::args().skip(1).any(|a| a == "--json");
    if std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
        eprintln!("usage: info [--json]\n  HETMEM_BACKEND=cuda|rocm|sim|host forces a backend");
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("HETMEM_LOG"))
        .with_writer(std::io::stderr)
        .try_init();

    // Every backend, opened on its own, to say which are usable and why not.
    let backends: Vec<Value> = BackendKind::ALL
        .iter()
        .map(|k| match Manager::builder().backend(*k).build() {
            Ok(m) => json!({"name": k.name(), "available": true, "devices": m.devices().len()}),
            Err(e) => json!({"name": k.name(), "available": false, "reason": e.to_string()}),
        })
        .collect();

    let mgr = match Manager::new() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("info: no backend could be opened: {e}");
            std::process::exit(1);
        }
    };
    let devices: Vec<Value> = mgr
        .devices()
        .iter()
        .map(|d| {
            let free = mgr.backend().mem_info(d.info.ordinal).ok().map(|m| m.free);
            json!({
                "ordinal": d.info.ordinal,
                "name": d.info.name,
                "total_memory": d.info.total_memory,
                "free_memory": free,
                "pci_bus_id": d.info.pci_bus_id,
                "numa_node": d.numa_node,
                "managed_memory": d.info.managed_memory,
            })
        })
        .collect();
    let nodes: Vec<Value> = mgr
        .topology()
        .nodes()
        .iter()
        .map(|n| json!({"id": n.id, "memory": n.mem_total, "cpus": n.cpus}))
        .collect();
    // Proof of placement: a small allocation bound to each node, its pages read back.
    let placement: Vec<Value> = mgr
        .topology()
        .memory_nodes()
        .into_iter()
        .map(|node| {
            let found = mgr
                .alloc(Placement::Host(NumaPolicy::Bind(node)), 4 << 20)
                .and_then(|b| b.page_nodes());
            match found {
                Ok(pages) => json!({
                    "node": node,
                    "pages": pages.len(),
                    "on_node": pages.iter().filter(|p| **p == node as i32).count(),
                }),
                Err(e) => json!({"node": node, "error": e.to_string()}),
            }
        })
        .collect();
    let verified = !placement.is_empty()
        && placement
            .iter()
            .all(|p| p["pages"].as_u64().is_some_and(|n| n > 0) && p["pages"] == p["on_node"]);
    let report = json!({
        "host_placement_verified": verified,
        "host_placement": placement,
        "backend": mgr.backend_kind().name(),
        "backends": backends,
        "devices": devices,
        "numa_nodes": nodes,
    });

    if json_out {
        println!("{report}");
        return;
    }
    println!("hetmem {}", env!("CARGO_PKG_VERSION"));
    println!("\nbackends:");
    for b in report["backends"].as_array().into_iter().flatten() {
        let name = b["name"].as_str().unwrap_or("?");
        if b["available"] == true {
            let chosen = if name == mgr.backend_kind().name() {
                "  <- in use"
            } else {
                ""
            };
            println!("  {name:<5} available, {} device(s){chosen}", b["devices"]);
        } else {
            println!(
                "  {name:<5} unavailable: {}",
                b["reason"].as_str().unwrap_or("")
            );
        }
    }
    println!("\ndevices ({}):", mgr.backend_kind());
    if mgr.devices().is_empty() {
        println!("  none");
    }
    for d in mgr.devices() {
        let node = d.numa_node.map_or("none".to_string(), |n| n.to_string());
        println!(
            "  [{}] {}  {:.1} GiB  pci {}  NUMA node {node}",
            d.info.ordinal,
            d.info.name,
            gib(d.info.total_memory as u64),
            d.info.pci_bus_id.as_deref().unwrap_or("-"),
        );
    }
    println!("\nNUMA nodes:");
    for n in mgr.topology().nodes() {
        println!(
            "  node {}  {:.1} GiB  cpus {}",
            n.id,
            gib(n.mem_total),
            cpu_ranges(&n.cpus)
        );
    }
    println!("\nhost placement (4 MiB bound to each node, pages read back with move_pages):");
    for p in report["host_placement"].as_array().into_iter().flatten() {
        match p.get("error") {
            Some(e) => println!("  node {}: {}", p["node"], e.as_str().unwrap_or("")),
            None => println!(
                "  node {}: {}/{} pages on the node",
                p["node"], p["on_node"], p["pages"]
            ),
        }
    }
    println!("  verified: {verified}");
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// `[0,1,2,3,8]` → `0-3,8`.
fn cpu_ranges(cpus: &[u32]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        while i + 1 < cpus.len() && cpus[i + 1] == cpus[i] + 1 {
            i += 1;
        }
        out.push(if cpus[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", cpus[i])
        });
        i += 1;
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(",")
    }
}
