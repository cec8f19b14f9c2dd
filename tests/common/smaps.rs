//! Reading `/proc/self/smaps`, for tests that check how the kernel backs a mapping.

/// The `VmFlags` and `AnonHugePages` (kB) of the `/proc/self/smaps` entry holding `addr`.
pub fn entry(addr: usize) -> (String, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let (mut inside, mut huge_kb) = (false, 0);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = a <= addr && addr < b;
                continue;
            }
        }
        if !inside {
            continue;
        }
        if let Some(v) = line.strip_prefix("AnonHugePages:") {
            huge_kb = v.trim().trim_end_matches("kB").trim().parse().unwrap();
        }
        if let Some(v) = line.strip_prefix("VmFlags:") {
            return (v.trim().to_string(), huge_kb);
        }
    }
    panic!("no smaps entry for {addr:#x}");
}

/// Whether the mapping holding `addr` has the `hg` flag (MADV_HUGEPAGE).
pub fn huge_advised(addr: usize) -> bool {
    entry(addr).0.split_whitespace().any(|f| f == "hg")
}
