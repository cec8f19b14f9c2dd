//! `prof plot`: an SVG (or a self-contained HTML page around it) of memory over time:
//! all tiers stacked, with the total's peak marked; then a panel per tier with its
//! allocated bytes (and reserved, for devices), its budget as a dashed line and its
//! peak marked. Each pixel column shows the largest value in its interval, so no peak
//! is thinned away.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::input::{bytes, Ev, Live, Stream, Tier};
use crate::series::Series;

const W: f64 = 1200.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 20.0;
const COLS: usize = 1000;
const COLORS: [&str; 10] = [
    "#4e79a7", "#f28e2c", "#e15759", "#76b7b2", "#59a14f", "#edc949", "#af7aa1", "#ff9da7",
    "#9c755f", "#bab0ab",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn run(paths: &[String], out_path: &str, from_ns: u64, to_ns: u64) -> Result<(), String> {
    let mut s = Stream::open(paths)?;
    let mut live = Live::default();
    let mut series: BTreeMap<Tier, Series> = BTreeMap::new();
    let mut reserved: BTreeMap<u32, Series> = BTreeMap::new();
    let mut total = Series::new();
    let mut budgets: BTreeMap<Tier, u64> = BTreeMap::new();
    let mut peaks: BTreeMap<Tier, (u64, u64)> = BTreeMap::new();
    let mut total_peak = (0u64, 0u64);
    let (mut t0, mut t1) = (u64::MAX, 0u64);
    let mut sum = 0u64;
    let mut sums: BTreeMap<Tier, u64> = BTreeMap::new();
    while let Some(it) = s.next()? {
        let changed = live.apply(&it);
        if it.t > to_ns {
            break;
        }
        if let Ev::Budget { tier, bytes } = it.ev {
            budgets.insert(tier, bytes);
        }
        let Some(tier) = changed else { continue };
        let v = live.total(tier);
        let old = sums.insert(tier, v).unwrap_or(0);
        sum = sum - old.min(sum) + v;
        if it.t < from_ns {
            continue;
        }
        t0 = t0.min(it.t);
        t1 = t1.max(it.t);
        series
            .entry(tier)
            .or_insert_with(Series::new)
            .push(it.t, v as f64);
        let p = peaks.entry(tier).or_default();
        if v > p.0 {
            *p = (v, it.t);
        }
        if let Tier::Device(d) = tier {
            let r = live.reserved.get(&d).copied().unwrap_or(0);
            reserved
                .entry(d)
                .or_insert_with(Series::new)
                .push(it.t, r as f64);
        }
        total.push(it.t, sum as f64);
        if sum > total_peak.0 {
            total_peak = (sum, it.t);
        }
    }
    if t0 == u64::MAX {
        t0 = 0;
    }
    let t1 = t1.max(t0 + 1);
    let span = (t1 - t0) as f64;
    let col_t = |c: usize| t0 + ((c as f64) * span / COLS as f64) as u64;
    let x_of = |t: u64| LEFT + (t.saturating_sub(t0) as f64 / span) * (W - LEFT - RIGHT);
    let cw = (W - LEFT - RIGHT) / COLS as f64;
    let tiers: Vec<Tier> = series.keys().copied().collect();
    let mut svg = String::new();
    let stacked_h = 300.0;
    let panel_h = 130.0;
    let top = 40.0;
    let height = top + stacked_h + 50.0 + tiers.len() as f64 * (panel_h + 40.0) + 20.0;
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="20" font-size="15">Memory per tier over {:.3} s (hetmem prof; largest value per pixel)</text>
"#,
        span / 1e9
    );
    // The stacked panel.
    let cols: Vec<Vec<f64>> = tiers
        .iter()
        .map(|t| {
            (0..COLS)
                .map(|c| series[t].max_in(col_t(c), col_t(c + 1)))
                .collect()
        })
        .collect();
    let ymax = (0..COLS)
        .map(|c| cols.iter().map(|v| v[c]).sum::<f64>())
        .fold(1.0f64, f64::max)
        .max(total_peak.0 as f64);
    axes(
        &mut svg,
        top,
        stacked_h,
        ymax,
        t0,
        span,
        "all tiers, stacked",
    );
    let y_of = |v: f64, y0: f64, h: f64, ymax: f64| y0 + h - v / ymax * h;
    let mut base = vec![0.0; COLS];
    for (i, t) in tiers.iter().enumerate() {
        let mut pts = String::new();
        for (c, b) in base.iter().enumerate() {
            let _ = write!(
                pts,
                "{:.1},{:.1} ",
                LEFT + c as f64 * cw,
                y_of(b + cols[i][c], top, stacked_h, ymax)
            );
            let _ = write!(
                pts,
                "{:.1},{:.1} ",
                LEFT + (c + 1) as f64 * cw,
                y_of(b + cols[i][c], top, stacked_h, ymax)
            );
        }
        for c in (0..COLS).rev() {
            let _ = write!(
                pts,
                "{:.1},{:.1} ",
                LEFT + (c + 1) as f64 * cw,
                y_of(base[c], top, stacked_h, ymax)
            );
            let _ = write!(
                pts,
                "{:.1},{:.1} ",
                LEFT + c as f64 * cw,
                y_of(base[c], top, stacked_h, ymax)
            );
        }
        let _ = writeln!(
            svg,
            r#"<polygon points="{pts}" fill="{}" fill-opacity="0.85"><title>{}</title></polygon>"#,
            COLORS[i % COLORS.len()],
            esc(&t.name())
        );
        for c in 0..COLS {
            base[c] += cols[i][c];
        }
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            W - RIGHT - 150.0,
            top + 8.0 + i as f64 * 14.0,
            COLORS[i % COLORS.len()],
            W - RIGHT - 135.0,
            top + 17.0 + i as f64 * 14.0,
            esc(&t.name())
        );
    }
    peak_mark(
        &mut svg,
        x_of(total_peak.1),
        y_of(total_peak.0 as f64, top, stacked_h, ymax),
        total_peak,
        t0,
    );
    // A panel per tier.
    let mut y0 = top + stacked_h + 50.0;
    for (i, t) in tiers.iter().enumerate() {
        let budget = budgets.get(t).copied();
        let res = match t {
            Tier::Device(d) => reserved.get(d),
            _ => None,
        };
        let peak = peaks.get(t).copied().unwrap_or_default();
        let rmax = res.map_or(0.0, |r| {
            (0..COLS)
                .map(|c| r.max_in(col_t(c), col_t(c + 1)))
                .fold(0.0, f64::max)
        });
        let ymax = (peak.0 as f64)
            .max(rmax)
            .max(budget.unwrap_or(0) as f64)
            .max(1.0)
            * 1.05;
        let title = format!(
            "{}: peak {}{}",
            t.name(),
            bytes(peak.0),
            budget
                .map(|b| format!(", budget {}", bytes(b)))
                .unwrap_or_default()
        );
        axes(&mut svg, y0, panel_h, ymax, t0, span, &title);
        let line = |vals: &dyn Fn(usize) -> f64| {
            let mut pts = String::new();
            for c in 0..COLS {
                let y = y_of(vals(c), y0, panel_h, ymax);
                let _ = write!(
                    pts,
                    "{:.1},{:.1} {:.1},{:.1} ",
                    LEFT + c as f64 * cw,
                    y,
                    LEFT + (c + 1) as f64 * cw,
                    y
                );
            }
            pts
        };
        if let Some(r) = res {
            let pts = line(&|c| r.max_in(col_t(c), col_t(c + 1)));
            let _ = writeln!(
                svg,
                r##"<polyline points="{pts}" fill="none" stroke="#888" stroke-width="1.2"><title>reserved</title></polyline>"##
            );
        }
        let pts = line(&|c| cols[i][c]);
        let _ = writeln!(
            svg,
            r#"<polyline points="{pts}" fill="none" stroke="{}" stroke-width="1.5"><title>{}</title></polyline>"#,
            COLORS[i % COLORS.len()],
            esc(&t.name())
        );
        if let Some(b) = budget {
            let y = y_of(b as f64, y0, panel_h, ymax);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#d62728" stroke-dasharray="6 4"/><text x="{}" y="{:.1}" fill="#d62728">budget {}</text>"##,
                W - RIGHT,
                W - RIGHT - 120.0,
                y - 3.0,
                bytes(b)
            );
        }
        peak_mark(
            &mut svg,
            x_of(peak.1),
            y_of(peak.0 as f64, y0, panel_h, ymax),
            peak,
            t0,
        );
        y0 += panel_h + 40.0;
    }
    svg.push_str("</svg>\n");
    let text = if out_path.ends_with(".html") || out_path.ends_with(".htm") {
        format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>hetmem memory</title></head>\n<body style=\"margin:0\">\n{svg}</body></html>\n"
        )
    } else {
        svg
    };
    std::fs::write(out_path, text).map_err(|e| format!("{out_path}: {e}"))
}

fn peak_mark(svg: &mut String, x: f64, y: f64, peak: (u64, u64), _t0: u64) {
    let _ = writeln!(
        svg,
        r##"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="none" stroke="#d62728" stroke-width="2"/><text x="{:.1}" y="{:.1}" fill="#d62728">peak {} at {:.3} s</text>"##,
        x + 6.0,
        (y - 6.0).max(12.0),
        bytes(peak.0),
        peak.1 as f64 / 1e9
    );
}

fn axes(svg: &mut String, y0: f64, h: f64, ymax: f64, t0: u64, span: f64, title: &str) {
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="{:.1}" font-size="12">{}</text><rect x="{LEFT}" y="{y0:.1}" width="{}" height="{h}" fill="none" stroke="#333"/>"##,
        y0 - 6.0,
        esc(title),
        W - LEFT - RIGHT
    );
    for k in 0..=4 {
        let v = ymax * k as f64 / 4.0;
        let y = y0 + h - h * k as f64 / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{:.1}" x2="{LEFT}" y1="{y:.1}" y2="{y:.1}" stroke="#333"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT - 4.0,
            LEFT - 6.0,
            y + 4.0,
            bytes(v as u64)
        );
    }
    for k in 0..=5 {
        let x = LEFT + (W - LEFT - RIGHT) * k as f64 / 5.0;
        let t = (t0 as f64 + span * k as f64 / 5.0) / 1e9;
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}" stroke="#333"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{t:.3} s</text>"##,
            y0 + h,
            y0 + h + 4.0,
            y0 + h + 15.0
        );
    }
}
