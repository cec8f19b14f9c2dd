//! `prof top`: a live view of the processes that use hetmem with profiling or the stats
//! page on (`HETMEM_PROFILE`, `HETMEM_STATS_PAGE=1`, or `prof record`): bytes per tier
//! and device, allocation and load rates, the tier store's hit rate. Reads each
//! process's stats page (`/dev/shm/hetmem-stats.<pid>`, 4 KiB, rewritten by the
//! process five times a second) and redraws in place. Processes under the LD_PRELOAD
//! shim that record (`HETMEM_RECORD`, as `prof record` runs them) are found by their
//! environment, and their record is read as it grows: host bytes of the blocks it
//! records (large ones, or all with `HETMEM_RECORD_ALL`) and allocation rates.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hetmem::record::{EventKind, Placement, Reader};
use rustc_hash::FxHashMap;

use crate::input::bytes;

type Page = BTreeMap<String, String>;

fn read_pages() -> Vec<(u32, Page)> {
    let dir = hetmem::profile::stats_dir();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("hetmem-stats.")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // A page left by a process that died without finishing.
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path()) else {
            continue;
        };
        let text = String::from_utf8_lossy(&raw);
        let text = text.trim_end_matches('\0');
        if !text.starts_with("hetmem-stats 1") {
            continue;
        }
        let page: Page = text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        out.push((pid, page));
    }
    out.sort_by_key(|(p, _)| *p);
    out
}

/// A shim's record, read as it grows (whole chunks only).
struct Tail {
    path: PathBuf,
    header: Vec<u8>,
    off: u64,
    live: FxHashMap<u64, (u64, bool)>,
    host: i64,
    pinned: i64,
    allocs: i64,
    frees: i64,
}

impl Tail {
    fn poll(&mut self) -> std::io::Result<()> {
        let mut f = std::fs::File::open(&self.path)?;
        if self.header.is_empty() {
            let mut h = [0u8; 12];
            f.read_exact(&mut h)?;
            let len = usize::from(u16::from_le_bytes([h[10], h[11]])).max(12);
            let mut rest = vec![0u8; len - 12];
            f.read_exact(&mut rest)?;
            self.header = [&h[..], &rest[..]].concat();
            self.off = len as u64;
        }
        f.seek(SeekFrom::Start(self.off))?;
        let mut buf = Vec::new();
        f.take(64 << 20).read_to_end(&mut buf)?;
        let mut end = 0;
        while end + 8 <= buf.len() {
            let len = u32::from_le_bytes([buf[end], buf[end + 1], buf[end + 2], buf[end + 3]]);
            if end + 8 + len as usize > buf.len() {
                break;
            }
            end += 8 + len as usize;
        }
        let data = [&self.header[..], &buf[..end]].concat();
        let Ok(r) = Reader::new(&data[..]) else {
            return Ok(());
        };
        for e in r.flatten() {
            let add = |addr: u64, size: u64, p: Placement, me: &mut Tail| {
                let pinned = p == Placement::Pinned;
                me.live.insert(addr, (size, pinned));
                *if pinned { &mut me.pinned } else { &mut me.host } += size as i64;
                me.allocs += 1;
            };
            let sub = |addr: u64, me: &mut Tail| {
                if let Some((size, pinned)) = me.live.remove(&addr) {
                    *if pinned { &mut me.pinned } else { &mut me.host } -= size as i64;
                }
                me.frees += 1;
            };
            match e.kind {
                EventKind::Alloc {
                    addr,
                    size,
                    placement,
                    ..
                } => add(addr, size, placement, self),
                EventKind::Free { addr, .. } => sub(addr, self),
                EventKind::Realloc {
                    old,
                    new,
                    size,
                    placement,
                    ..
                } => {
                    sub(old, self);
                    add(new, size, placement, self);
                }
                _ => {}
            }
        }
        self.off += end as u64;
        Ok(())
    }
}

/// Processes with the shim loaded that record: pid → their record's path.
fn shim_processes() -> Vec<(u32, PathBuf)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        let get = |k: &str| {
            vars.iter()
                .find_map(|v| v.strip_prefix(k.as_bytes()))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let (Some(pre), Some(rec)) = (get("LD_PRELOAD="), get("HETMEM_RECORD=")) else {
            continue;
        };
        if !pre.contains("hetmem_preload") || rec.is_empty() {
            continue;
        }
        // The environment is the one the process started with: check the shim is mapped.
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        if !maps.contains("hetmem_preload") {
            continue;
        }
        let rec = PathBuf::from(rec.replace("%p", &pid.to_string()));
        let path = if rec.is_absolute() {
            rec
        } else {
            match std::fs::read_link(format!("/proc/{pid}/cwd")) {
                Ok(cwd) => cwd.join(rec),
                Err(_) => continue,
            }
        };
        out.push((pid, path));
    }
    out
}

/// Adds the shims' figures to the pages (a page of their own where the process has no
/// library page).
fn add_shims(pages: &mut Vec<(u32, Page)>, tails: &mut FxHashMap<u32, Tail>) {
    let procs = shim_processes();
    tails.retain(|pid, _| procs.iter().any(|(p, _)| p == pid));
    for (pid, path) in procs {
        let t = tails.entry(pid).or_insert_with(|| Tail {
            path,
            header: Vec::new(),
            off: 0,
            live: FxHashMap::default(),
            host: 0,
            pinned: 0,
            allocs: 0,
            frees: 0,
        });
        if t.poll().is_err() {
            continue;
        }
        let i = match pages.iter().position(|(p, _)| *p == pid) {
            Some(i) => i,
            None => {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let mut page = Page::new();
                page.insert("cmd".into(), comm.trim().to_owned());
                pages.push((pid, page));
                pages.len() - 1
            }
        };
        let page = &mut pages[i].1;
        let mut bump = |k: &str, v: i64| {
            let old: i64 = page.get(k).and_then(|x| x.parse().ok()).unwrap_or(0);
            page.insert(k.to_owned(), (old + v).to_string());
        };
        bump("host", t.host);
        bump("pinned", t.pinned);
        bump("allocs", t.allocs);
        bump("frees", t.frees);
        let cmd = page.get("cmd").cloned().unwrap_or_default();
        if !cmd.ends_with("+shim") {
            page.insert("cmd".into(), format!("{cmd}+shim"));
        }
    }
    pages.sort_by_key(|(p, _)| *p);
}

fn num(p: &Page, k: &str) -> i64 {
    p.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn render(pages: &[(u32, Page)], prev: &BTreeMap<u32, (Instant, Page)>, now: Instant) -> String {
    let mut s = format!(
        "hetmem top: {} process(es)   {}\n\n{:>8}  {:<22} {:>10} {:>10} {:>10} {:>22} {:>10} {:>9} {:>11} {:>8}\n",
        pages.len(),
        hetmem::profile::stats_dir().display(),
        "PID",
        "COMMAND",
        "HOST",
        "PINNED",
        "MANAGED",
        "DEVICE alloc/reserved",
        "ALLOC/s",
        "LOADS/s",
        "LOAD B/s",
        "HIT %"
    );
    for (pid, p) in pages {
        let host = num(p, "host");
        let (mut dev, mut res) = (0i64, 0i64);
        let mut per_dev = Vec::new();
        for d in 0..hetmem::profile::MAX_INDEX {
            let a = num(p, &format!("device.{d}"));
            let r = num(p, &format!("reserved.{d}"));
            if a != 0 || r != 0 {
                per_dev.push(format!(
                    "{d}:{}/{}",
                    bytes(a.max(0) as u64),
                    bytes(r.max(0) as u64)
                ));
            }
            dev += a;
            res += r;
        }
        let (mut ar, mut lr, mut br) = (0.0, 0.0, 0.0);
        if let Some((t, q)) = prev.get(pid) {
            let dt = now.duration_since(*t).as_secs_f64().max(1e-3);
            ar = (num(p, "allocs") - num(q, "allocs")) as f64 / dt;
            lr = (num(p, "loads") - num(q, "loads")) as f64 / dt;
            br = (num(p, "loaded_bytes") - num(q, "loaded_bytes")) as f64 / dt;
        }
        let acq = num(p, "hits") + num(p, "late") + num(p, "misses");
        let hit = if acq > 0 {
            format!(
                "{:.1}",
                100.0 * (num(p, "hits") + num(p, "late")) as f64 / acq as f64
            )
        } else {
            "-".into()
        };
        let cmd = p
            .get("cmd")
            .map(|c| c.rsplit('/').next().unwrap_or(c).to_owned())
            .unwrap_or_default();
        s += &format!(
            "{:>8}  {:<22} {:>10} {:>10} {:>10} {:>22} {:>10.0} {:>9.1} {:>11} {:>8}\n",
            pid,
            cmd.chars().take(22).collect::<String>(),
            bytes(host.max(0) as u64),
            bytes(num(p, "pinned").max(0) as u64),
            bytes(num(p, "managed").max(0) as u64),
            format!("{}/{}", bytes(dev.max(0) as u64), bytes(res.max(0) as u64)),
            ar,
            lr,
            format!("{}/s", bytes(br as u64)),
            hit
        );
        let nodes: Vec<String> = p
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("node.")?, v.parse::<i64>().ok()?)))
            .filter(|(_, b)| *b != 0)
            .map(|(n, b)| format!("{n}:{}", bytes(b.max(0) as u64)))
            .collect();
        if !nodes.is_empty() {
            s += &format!("{:>10}host by NUMA node {}\n", "", nodes.join("  "));
        }
        if per_dev.len() > 1 {
            s += &format!("{:>10}devices {}\n", "", per_dev.join("  "));
        }
        if num(p, "ooms") > 0 || num(p, "dropped") > 0 {
            s += &format!(
                "{:>10}out of memory {} times, {} profile events dropped\n",
                "",
                num(p, "ooms"),
                num(p, "dropped")
            );
        }
    }
    s
}

pub fn run(interval: Duration, iterations: Option<u64>) -> Result<(), String> {
    let mut prev: BTreeMap<u32, (Instant, Page)> = BTreeMap::new();
    let mut tails: FxHashMap<u32, Tail> = FxHashMap::default();
    let mut n = 0u64;
    loop {
        let now = Instant::now();
        let mut pages = read_pages();
        add_shims(&mut pages, &mut tails);
        let text = render(&pages, &prev, now);
        if iterations.is_none() {
            // Home and clear: refresh in place.
            out!("\x1b[H\x1b[2J{text}");
        } else {
            out!("{text}");
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        prev = pages.into_iter().map(|(p, g)| (p, (now, g))).collect();
        n += 1;
        if iterations.is_some_and(|k| n >= k) {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}
