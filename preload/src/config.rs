//! The shim's configuration: environment variables, parsed once at start-up.
//!
//! | variable | values | default |
//! |---|---|---|
//! | `HETMEM_PRELOAD` | `0` turns the shim off (everything goes to glibc) | on |
//! | `HETMEM_PRELOAD_THRESHOLD` | size (`2M`, `512k`, `1048576`; at least 4096) from which hetmem serves a request | `2M` |
//! | `HETMEM_PRELOAD_POLICY` | `default`, `bind:N`, `preferred:N`, `interleave`, `interleave:0,2`, `near-gpu:N` (the N-th GPU by PCI address) or `near-gpu:0000:3b:00.0` | `default` |
//! | `HETMEM_PRELOAD_HUGE` | `1`/`0`: advise large blocks for transparent huge pages | `1` |
//! | `HETMEM_PRELOAD_CACHE` | size of freed large blocks kept for reuse (`0`: none) | `64M` |
//! | `HETMEM_PRELOAD_SMALL` | `glibc` or `mimalloc`: who serves requests under the threshold | `glibc` |
//! | `HETMEM_PRELOAD_ARENA` | address space reserved for large blocks | `1T` |
//! | `HETMEM_PRELOAD_COUNT` | `0`: no counters on the small path (the large path always counts) | `1` |
//! | `HETMEM_STATS` | `1`: counters to stderr at exit; any other value: a file to write them to (see below) | off |
//! | `HETMEM_RECORD` | a file for the binary event record ([`hetmem::record`]; see below) | off |
//! | `HETMEM_RECORD_ALL` | `1`: record every allocation, not only the large ones | `0` |
//! | `HETMEM_RECORD_STACKS` | frames per sampled call stack (`0`: none, at most 32) | `0` |
//! | `HETMEM_RECORD_SAMPLE` | one call stack every N recorded allocations | `100` |
//! | `HETMEM_RECORD_BUFFER` | memory of the in-process event queue | `4M` |
//!
//! File names: `%p` is replaced by the pid; without it the first process writes the
//! name as given and the processes it starts `NAME.PID`.
//!
//! Anything that does not parse, a policy naming a node the machine does not have, or a
//! GPU it does not have, makes the shim print one line on stderr and step aside: the
//! program runs as if it were not loaded.

use std::path::Path;

use hetmem::topology::Topology;

/// Where large blocks are placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// First touch (the faulting CPU's node).
    Default,
    /// Only on this node.
    Bind(u32),
    /// This node first.
    Preferred(u32),
    /// Page by page over these nodes (empty: every node the process may use).
    Interleave(Vec<u32>),
}

/// What the small path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Small {
    /// glibc's malloc (least memory).
    Glibc,
    /// mimalloc, built into the shim (fastest).
    Mimalloc,
}

/// The parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Requests of at least this many bytes are hetmem's.
    pub threshold: usize,
    /// Placement of large blocks.
    pub policy: Policy,
    /// The node that `near-gpu` resolved to, for the stats (`None`: not near-gpu).
    pub near_gpu: Option<String>,
    /// `MADV_HUGEPAGE` on large blocks.
    pub huge: bool,
    /// Bytes of freed large blocks kept.
    pub cache: usize,
    /// Count small allocations.
    pub count: bool,
    /// The small path.
    pub small: Small,
    /// Address space reserved for large blocks.
    pub arena: usize,
    /// `Some(None)`: stats to stderr; `Some(Some(path))`: to a file.
    pub stats: Option<Option<String>>,
    /// The record file.
    pub record: Option<String>,
    /// Record every allocation.
    pub record_all: bool,
    /// Frames per sampled stack.
    pub stack_depth: usize,
    /// One stack every this many recorded allocations.
    pub stack_sample: u64,
    /// Bytes of the event queue.
    pub record_buffer: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            threshold: 2 << 20,
            policy: Policy::Default,
            near_gpu: None,
            huge: true,
            cache: 64 << 20,
            count: true,
            small: Small::Glibc,
            arena: 1 << 40,
            stats: None,
            record: None,
            record_all: false,
            stack_depth: 0,
            stack_sample: 100,
            record_buffer: 4 << 20,
        }
    }
}

/// Parses `16`, `64k`, `2M`, `2MiB`, `1G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: usize = num.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    n.checked_mul(1usize << shift)
}

fn parse_bool(name: &str, v: &str) -> Result<bool, String> {
    match v.trim() {
        "1" | "on" | "yes" | "true" => Ok(true),
        "0" | "off" | "no" | "false" => Ok(false),
        _ => Err(format!("{name}={v}: expected 1 or 0")),
    }
}

fn parse_node(name: &str, v: &str, n: &str, topo: &Topology) -> Result<u32, String> {
    let node: u32 = n
        .parse()
        .map_err(|_| format!("{name}={v}: {n:?} is not a NUMA node number"))?;
    topo.check_node(node)
        .map_err(|e| format!("{name}={v}: {e}"))?;
    Ok(node)
}

/// The PCI addresses of the GPUs (display controllers of NVIDIA and AMD) under `root`,
/// in PCI order.
pub fn gpus(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root.join("sys/bus/pci/devices")) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let class = read("class");
        let vendor = read("vendor");
        if class.trim().starts_with("0x03") && matches!(vendor.trim(), "0x10de" | "0x1002") {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

/// Parses the configuration from `get` (the environment), checking nodes against
/// `topo`. `Ok(None)`: the shim is turned off. `Err`: the line to print.
pub fn parse(
    get: &dyn Fn(&str) -> Option<String>,
    topo: &dyn Fn() -> Result<Topology, String>,
) -> Result<Option<Config>, String> {
    let mut c = Config::default();
    if let Some(v) = get("HETMEM_PRELOAD") {
        if !parse_bool("HETMEM_PRELOAD", &v)? {
            return Ok(None);
        }
    }
    let size = |name: &str| -> Result<Option<usize>, String> {
        match get(name) {
            None => Ok(None),
            Some(v) => parse_size(&v)
                .map(Some)
                .ok_or_else(|| format!("{name}={v}: not a size (e.g. 2M, 65536)")),
        }
    };
    if let Some(t) = size("HETMEM_PRELOAD_THRESHOLD")? {
        if t < 4096 {
            return Err(format!("HETMEM_PRELOAD_THRESHOLD={t}: at least 4096"));
        }
        c.threshold = t;
    }
    if let Some(n) = size("HETMEM_PRELOAD_CACHE")? {
        c.cache = n;
    }
    if let Some(n) = size("HETMEM_PRELOAD_ARENA")? {
        if n < 1 << 30 {
            return Err(format!("HETMEM_PRELOAD_ARENA={n}: at least 1G"));
        }
        c.arena = n;
    }
    if let Some(n) = size("HETMEM_RECORD_BUFFER")? {
        c.record_buffer = n.max(64 << 10);
    }
    if let Some(v) = get("HETMEM_PRELOAD_HUGE") {
        c.huge = parse_bool("HETMEM_PRELOAD_HUGE", &v)?;
    }
    if let Some(v) = get("HETMEM_PRELOAD_COUNT") {
        c.count = parse_bool("HETMEM_PRELOAD_COUNT", &v)?;
    }
    if let Some(v) = get("HETMEM_PRELOAD_SMALL") {
        c.small = match v.trim() {
            "glibc" => Small::Glibc,
            "mimalloc" | "fast" => Small::Mimalloc,
            _ => {
                return Err(format!(
                    "HETMEM_PRELOAD_SMALL={v}: expected glibc or mimalloc"
                ))
            }
        };
    }
    if let Some(v) = get("HETMEM_PRELOAD_POLICY") {
        const NAME: &str = "HETMEM_PRELOAD_POLICY";
        let v = v.trim().to_owned();
        let (kind, arg) = match v.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (v.as_str(), None),
        };
        c.policy = match (kind, arg) {
            ("default" | "local", None) => Policy::Default,
            ("bind", Some(n)) => Policy::Bind(parse_node(NAME, &v, n, &topo()?)?),
            ("preferred", Some(n)) => Policy::Preferred(parse_node(NAME, &v, n, &topo()?)?),
            ("interleave", None) => Policy::Interleave(Vec::new()),
            ("interleave", Some(list)) => {
                let t = topo()?;
                let mut nodes = Vec::new();
                for n in list.split(',') {
                    nodes.push(parse_node(NAME, &v, n.trim(), &t)?);
                }
                Policy::Interleave(nodes)
            }
            ("near-gpu", Some(which)) => {
                let t = topo()?;
                let bus = if which.contains(':') {
                    which.to_owned()
                } else {
                    let i: usize = which
                        .parse()
                        .map_err(|_| format!("{NAME}={v}: {which:?} is not a GPU number"))?;
                    let all = gpus(t.root());
                    all.get(i).cloned().ok_or_else(|| {
                        format!("{NAME}={v}: no GPU {i} (this machine has {})", all.len())
                    })?
                };
                if !t.root().join("sys/bus/pci/devices").join(&bus).exists() {
                    return Err(format!("{NAME}={v}: no PCI device {bus}"));
                }
                c.near_gpu = Some(bus.clone());
                match t.pci_numa_node(&bus) {
                    // Preferred: a GPU's node is where its memory is best, not the only
                    // place it may go.
                    Some(n) if t.has_memory(n) => Policy::Preferred(n),
                    // The slot reports no node (one-node machines): first touch.
                    _ => Policy::Default,
                }
            }
            _ => {
                return Err(format!(
                "{NAME}={v}: expected default, bind:N, preferred:N, interleave[:N,M], near-gpu:N"
            ))
            }
        };
    }
    if let Some(v) = get("HETMEM_STATS") {
        let v = v.trim();
        c.stats = match v {
            "" | "0" => None,
            "1" => Some(None),
            path => Some(Some(path.to_owned())),
        };
    }
    if let Some(v) = get("HETMEM_RECORD") {
        if !v.trim().is_empty() {
            c.record = Some(v.trim().to_owned());
        }
    }
    if let Some(v) = get("HETMEM_RECORD_ALL") {
        c.record_all = parse_bool("HETMEM_RECORD_ALL", &v)?;
    }
    if let Some(v) = get("HETMEM_RECORD_STACKS") {
        let d: usize = v
            .trim()
            .parse()
            .map_err(|_| format!("HETMEM_RECORD_STACKS={v}: not a number of frames"))?;
        c.stack_depth = d.min(32);
    }
    if let Some(v) = get("HETMEM_RECORD_SAMPLE") {
        let n: u64 = v
            .trim()
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("HETMEM_RECORD_SAMPLE={v}: not a positive number"))?;
        c.stack_sample = n;
    }
    Ok(Some(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(vars: &[(&str, &str)]) -> Result<Option<Config>, String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(&|k| map.get(k).cloned(), &|| {
            Topology::detect().map_err(|e| e.to_string())
        })
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("64k"), Some(64 << 10));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("2X"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999999T"), None);
    }

    #[test]
    fn defaults_and_values() {
        let c = run(&[]).unwrap().unwrap();
        assert_eq!(c, Config::default());
        let c = run(&[
            ("HETMEM_PRELOAD_THRESHOLD", "1M"),
            ("HETMEM_PRELOAD_POLICY", "bind:0"),
            ("HETMEM_PRELOAD_SMALL", "mimalloc"),
            ("HETMEM_STATS", "/tmp/x"),
            ("HETMEM_RECORD_STACKS", "99"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.threshold, 1 << 20);
        assert_eq!(c.policy, Policy::Bind(0));
        assert_eq!(c.small, Small::Mimalloc);
        assert_eq!(c.stats, Some(Some("/tmp/x".into())));
        assert_eq!(c.stack_depth, 32);
        assert_eq!(run(&[("HETMEM_PRELOAD", "0")]), Ok(None));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("HETMEM_PRELOAD_THRESHOLD", "lots"),
            ("HETMEM_PRELOAD_THRESHOLD", "100"),
            ("HETMEM_PRELOAD_POLICY", "bind:4000"),
            ("HETMEM_PRELOAD_POLICY", "bind:x"),
            ("HETMEM_PRELOAD_POLICY", "scatter"),
            ("HETMEM_PRELOAD_POLICY", "near-gpu:7"),
            ("HETMEM_PRELOAD_SMALL", "tcmalloc"),
            ("HETMEM_PRELOAD_HUGE", "maybe"),
        ] {
            let e = run(&[(k, v)]).unwrap_err();
            assert!(e.starts_with(&format!("{k}={v}")), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
