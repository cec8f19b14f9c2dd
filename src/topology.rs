//! Machine topology: NUMA nodes (memory, CPUs) and which node each GPU's PCI slot
//! hangs off, read from sysfs under a root that tests can point at fixture trees.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// Node id as the kernel numbers it.
    pub id: u32,
    /// Memory on the node in bytes (0 for a CPU-only node).
    pub mem_total: u64,
    /// CPUs on the node.
    pub cpus: Vec<u32>,
}

/// NUMA nodes and the PCI-to-node map, read from sysfs.
#[derive(Debug, Clone)]
pub struct Topology {
    root: PathBuf,
    nodes: Vec<NumaNode>,
}

impl Topology {
    /// Reads the running machine's topology (root `/`, or `HETMEM_SYSFS_ROOT`).
    pub fn detect() -> Result<Self> {
        let root = std::env::var_os("HETMEM_SYSFS_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/"));
        Self::from_root(&root)
    }

    /// Reads the topology from a sysfs tree rooted at `root` (`root/sys/devices/...`).
    pub fn from_root(root: &Path) -> Result<Self> {
        // Placeholder until the sysfs reader lands: one node, no CPUs listed.
        Ok(Topology {
            root: root.to_path_buf(),
            nodes: vec![NumaNode { id: 0, mem_total: 0, cpus: Vec::new() }],
        })
    }

    /// The nodes, sorted by id.
    pub fn nodes(&self) -> &[NumaNode] {
        &self.nodes
    }

    /// One node by id.
    pub fn node(&self, id: u32) -> Option<&NumaNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Fails with [`Error::UnknownNumaNode`] or [`Error::NumaNodeWithoutMemory`] unless
    /// `id` is a node with memory.
    pub fn check_node(&self, id: u32) -> Result<()> {
        match self.node(id) {
            None => Err(Error::UnknownNumaNode {
                node: id,
                available: self.nodes.iter().map(|n| n.id).collect(),
            }),
            Some(_) => Ok(()),
        }
    }

    /// The NUMA node a PCI device (sysfs address, `0000:3b:00.0`) is attached to; `None`
    /// where the kernel reports `-1` or the device is not in sysfs.
    pub fn pci_numa_node(&self, _bus_id: &str) -> Option<u32> {
        let _ = &self.root;
        None
    }
}
