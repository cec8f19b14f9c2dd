//! `prof top`: a live view of the processes that use hetmem with profiling or the stats
//! page on (`HETMEM_PROFILE`, `HETMEM_STATS_PAGE=1`, or `prof record`): bytes per tier
//! and device, allocation and load rates, the tier store's hit rate. Reads each
//! process's stats page (`/dev/shm/hetmem-stats.<pid>`, 4 KiB, rewritten by the
//! process five times a second) and redraws in place.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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
    let mut n = 0u64;
    loop {
        let now = Instant::now();
        let pages = read_pages();
        let text = render(&pages, &prev, now);
        if iterations.is_none() {
            // Home and clear: refresh in place.
            print!("\x1b[H\x1b[2J{text}");
        } else {
            print!("{text}");
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
