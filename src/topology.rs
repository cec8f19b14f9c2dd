//! Machine topology: NUMA nodes (memory, CPUs) and which node each GPU's PCI slot
//! hangs off, read from sysfs under a root that tests can point at fixture trees.
//!
//! Files read, all relative to the root:
//!
//! | file | what |
//! |---|---|
//! | `sys/devices/system/node/nodeN/meminfo` | `Node N MemTotal: X kB` |
//! | `sys/devices/system/node/nodeN/cpulist` | CPU list, `0-7,16-23` |
//! | `sys/devices/system/node/has_memory` | nodes with memory (optional) |
//! | `proc/meminfo`, `sys/devices/system/cpu/online` | the one node of a kernel without NUMA |
//! | `sys/bus/pci/devices/<addr>/numa_node` | a PCI device's node, `-1` for none |

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::host_mem::parse_meminfo_field;

/// The environment variable that moves the sysfs root away from `/`.
pub const SYSFS_ROOT_ENV: &str = "HETMEM_SYSFS_ROOT";

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
    /// The kernel's `has_memory` list, where the file exists.
    has_memory: Option<Vec<u32>>,
}

impl Topology {
    /// Reads the running machine's topology (root `/`, or `HETMEM_SYSFS_ROOT`).
    pub fn detect() -> Result<Self> {
        Self::from_root(&root_from_env(std::env::var_os(SYSFS_ROOT_ENV)))
    }

    /// Reads the topology from a sysfs tree rooted at `root` (`root/sys/devices/...`).
    pub fn from_root(root: &Path) -> Result<Self> {
        let node_dir = root.join("sys/devices/system/node");
        let mut nodes = Vec::new();
        match fs::read_dir(&node_dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(|e| config(&node_dir, e.to_string()))?;
                    let name = entry.file_name();
                    let Some(id) = name
                        .to_str()
                        .and_then(|n| n.strip_prefix("node"))
                        .and_then(|n| n.parse::<u32>().ok())
                    else {
                        continue;
                    };
                    nodes.push(read_node(&entry.path(), id)?);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(config(&node_dir, e.to_string())),
        }

        let has_memory = if nodes.is_empty() {
            // A kernel built without NUMA has no node directory: one node 0 holds
            // all memory and every online CPU.
            tracing::debug!(dir = %node_dir.display(), "no NUMA nodes in sysfs; assuming one node");
            let meminfo = root.join("proc/meminfo");
            let mem_total = parse_meminfo_total(&read(&meminfo)?, None)
                .map_err(|reason| config(&meminfo, reason))?;
            let online = root.join("sys/devices/system/cpu/online");
            let cpus = parse_list(&read(&online)?).map_err(|reason| config(&online, reason))?;
            nodes.push(NumaNode {
                id: 0,
                mem_total,
                cpus,
            });
            None
        } else {
            let path = node_dir.join("has_memory");
            match fs::read_to_string(&path) {
                Ok(text) => Some(parse_list(&text).map_err(|reason| config(&path, reason))?),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(config(&path, e.to_string())),
            }
        };
        nodes.sort_by_key(|n| n.id);
        tracing::debug!(root = %root.display(), nodes = nodes.len(), "read NUMA topology");
        Ok(Topology {
            root: root.to_path_buf(),
            nodes,
            has_memory,
        })
    }

    /// Memory of the whole machine in bytes: `MemTotal` of `root/proc/meminfo`, or the
    /// sum of the nodes where that file is missing (fixture trees). Sandboxes can report
    /// less in the nodes than in `/proc/meminfo`; this is the figure the kernel's
    /// overcommit check uses.
    pub fn system_memory(&self) -> u64 {
        let sum = self.nodes.iter().map(|n| n.mem_total).sum();
        fs::read_to_string(self.root.join("proc/meminfo"))
            .ok()
            .and_then(|t| parse_meminfo_total(&t, None).ok())
            .unwrap_or(sum)
    }

    /// The sysfs root this topology was read from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The nodes, sorted by id.
    pub fn nodes(&self) -> &[NumaNode] {
        &self.nodes
    }

    /// One node by id.
    pub fn node(&self, id: u32) -> Option<&NumaNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Whether node `id` exists and has memory: a non-zero `MemTotal`, and listed in
    /// `has_memory` where the kernel provides that file.
    pub fn has_memory(&self, id: u32) -> bool {
        self.node(id).is_some_and(|n| n.mem_total > 0)
            && self
                .has_memory
                .as_ref()
                .is_none_or(|list| list.contains(&id))
    }

    /// The ids of the nodes that have memory, ascending.
    pub fn memory_nodes(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .map(|n| n.id)
            .filter(|&id| self.has_memory(id))
            .collect()
    }

    /// The node that CPU `cpu` belongs to.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.cpus.contains(&cpu))
            .map(|n| n.id)
    }

    /// Fails with [`Error::UnknownNumaNode`] or [`Error::NumaNodeWithoutMemory`] unless
    /// `id` is a node with memory.
    pub fn check_node(&self, id: u32) -> Result<()> {
        match self.node(id) {
            None => Err(Error::UnknownNumaNode {
                node: id,
                available: self.nodes.iter().map(|n| n.id).collect(),
            }),
            Some(_) if !self.has_memory(id) => Err(Error::NumaNodeWithoutMemory { node: id }),
            Some(_) => Ok(()),
        }
    }

    /// The NUMA node a PCI device (sysfs address, `0000:3b:00.0`) is attached to; `None`
    /// where the kernel reports `-1` or the device is not in sysfs.
    pub fn pci_numa_node(&self, bus_id: &str) -> Option<u32> {
        // sysfs spells addresses in lower case; drivers (cuDeviceGetPCIBusId) in upper.
        let bus_id = bus_id.trim().to_ascii_lowercase();
        if bus_id.is_empty() || bus_id.contains('/') || bus_id.starts_with('.') {
            return None;
        }
        let path = self
            .root
            .join("sys/bus/pci/devices")
            .join(&bus_id)
            .join("numa_node");
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "no PCI NUMA node");
                return None;
            }
        };
        match text.trim().parse::<i64>() {
            Ok(n) if n >= 0 => u32::try_from(n).ok(),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unparsable PCI numa_node");
                None
            }
        }
    }
}

/// The root named by the `HETMEM_SYSFS_ROOT` value, or `/` when unset or empty.
fn root_from_env(value: Option<OsString>) -> PathBuf {
    value
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

fn config(path: &Path, reason: impl Into<String>) -> Error {
    Error::Config {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| config(path, e.to_string()))
}

fn read_node(dir: &Path, id: u32) -> Result<NumaNode> {
    let meminfo = dir.join("meminfo");
    let mem_total = parse_meminfo_total(&read(&meminfo)?, Some(id))
        .map_err(|reason| config(&meminfo, reason))?;
    let cpulist = dir.join("cpulist");
    let cpus = parse_list(&read(&cpulist)?).map_err(|reason| config(&cpulist, reason))?;
    Ok(NumaNode {
        id,
        mem_total,
        cpus,
    })
}

/// `MemTotal` in bytes from `/proc/meminfo` (`node: None`, lines `MemTotal: X kB`) or a
/// node's `meminfo` (`Some(n)`, lines `Node n MemTotal: X kB`).
pub(crate) fn parse_meminfo_total(text: &str, node: Option<u32>) -> Result<u64, String> {
    parse_meminfo_field(text, node, "MemTotal")?.ok_or_else(|| "no MemTotal line".to_string())
}

/// Largest id a list may name: guards against `0-4294967295` allocating the world.
const MAX_LIST_ID: u32 = 1 << 20;

/// A kernel list (`cpulist`, `has_memory`, `cpu/online`): comma-separated ids and
/// inclusive ranges, `0-7,16-23`; empty means none. Sorted and deduplicated.
pub(crate) fn parse_list(text: &str) -> Result<Vec<u32>, String> {
    let text = text.trim();
    let mut ids = Vec::new();
    if text.is_empty() {
        return Ok(ids);
    }
    for part in text.split(',') {
        let part = part.trim();
        let num = |s: &str| {
            s.trim()
                .parse::<u32>()
                .ok()
                .filter(|&n| n <= MAX_LIST_ID)
                .ok_or_else(|| format!("bad id {s:?} in list {text:?}"))
        };
        match part.split_once('-') {
            None => ids.push(num(part)?),
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("backwards range {part:?} in list {text:?}"));
                }
                ids.extend(a..=b);
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists() {
        assert_eq!(
            parse_list("0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_list("0\n").unwrap(), vec![0]);
        assert_eq!(parse_list("\n").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_list("5,1-2,2").unwrap(), vec![1, 2, 5]);
        assert_eq!(
            parse_list("0-7,16-23").unwrap(),
            (0..8).chain(16..24).collect::<Vec<_>>()
        );
        for bad in ["3-1", "a", "1,,2", "1-", "-1", "0-4294967295", "0-3:2/4"] {
            assert!(parse_list(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn node_meminfo() {
        let text = "Node 1 MemTotal:       65536 kB\nNode 1 MemFree:        1024 kB\n";
        assert_eq!(parse_meminfo_total(text, Some(1)).unwrap(), 65536 * 1024);
        assert_eq!(
            parse_meminfo_field(text, Some(1), "MemFree").unwrap(),
            Some(1024 * 1024)
        );
        assert_eq!(parse_meminfo_field(text, Some(1), "Nope").unwrap(), None);
        // A file that talks about another node is a parse error, not silently node 1.
        assert!(parse_meminfo_total("Node 0 MemTotal: 4 kB\n", Some(1)).is_err());
        assert!(parse_meminfo_total("Node 1 MemFree: 4 kB\n", Some(1)).is_err());
        assert!(parse_meminfo_total("Node 1 MemTotal: x kB\n", Some(1)).is_err());
        assert!(parse_meminfo_total("Node 1 MemTotal: 4 MB\n", Some(1)).is_err());
        assert_eq!(
            parse_meminfo_total("Node 1 MemTotal: 0 kB\n", Some(1)).unwrap(),
            0
        );
    }

    #[test]
    fn proc_meminfo() {
        let text = "MemTotal:        8000000 kB\nMemFree:  100 kB\nMemAvailable:  4000 kB\nHugePages_Total:       0\n";
        assert_eq!(parse_meminfo_total(text, None).unwrap(), 8_000_000 * 1024);
        assert_eq!(
            parse_meminfo_field(text, None, "MemAvailable").unwrap(),
            Some(4000 * 1024)
        );
        assert_eq!(
            parse_meminfo_field(text, None, "HugePages_Total").unwrap(),
            Some(0)
        );
        assert!(parse_meminfo_total("MemFree: 1 kB\n", None).is_err());
    }

    #[test]
    fn env_root() {
        assert_eq!(root_from_env(None), PathBuf::from("/"));
        assert_eq!(root_from_env(Some("".into())), PathBuf::from("/"));
        assert_eq!(
            root_from_env(Some("/tmp/x".into())),
            PathBuf::from("/tmp/x")
        );
    }

    #[test]
    fn this_machine() {
        // The real sysfs: at least one node with memory and CPUs, whatever the machine.
        let topo = Topology::from_root(Path::new("/")).unwrap();
        assert!(!topo.nodes().is_empty());
        let with_mem = topo.memory_nodes();
        assert!(!with_mem.is_empty());
        assert!(topo.check_node(with_mem[0]).is_ok());
        assert!(topo.nodes().iter().map(|n| n.cpus.len()).sum::<usize>() > 0);
        assert!(topo.nodes().windows(2).all(|w| w[0].id < w[1].id));
    }

    #[test]
    fn pci_id_cannot_escape_the_tree() {
        let topo = Topology::from_root(Path::new("/")).unwrap();
        assert_eq!(topo.pci_numa_node("../../../../proc/self"), None);
        assert_eq!(topo.pci_numa_node(""), None);
    }
}
