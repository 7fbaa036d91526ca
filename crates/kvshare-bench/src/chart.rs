//! A self-contained SVG of the headline numbers: raw K/V GB/s of kvshare vs Redis per cell, and
//! the trace's hit rate over time.

use std::fmt::Write;

use crate::Report;
use crate::throughput::Cell;
use crate::trace::TraceReport;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Top of the bar chart and its height, pixels.
const BARS_TOP: f64 = 40.0;
const BARS_HEIGHT: f64 = 220.0;

/// Renders the report as SVG.
pub fn render(r: &Report) -> String {
    let cells: Vec<&Cell> = r
        .throughput
        .iter()
        .filter(|c| c.system == "kvshare")
        .collect();
    let w = 60 + cells.len().max(1) * 44;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="520" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><text x="10" y="18" font-size="14">kvshare vs Redis: raw K/V GB/s ({})</text>"##,
        esc(&r.machine)
    );
    let max = r.throughput.iter().map(|c| c.raw_gbps).fold(0.01, f64::max);
    for (i, c) in cells.iter().enumerate() {
        let redis = r.throughput.iter().find(|o| {
            o.system == "redis"
                && o.op == c.op
                && o.block_bytes == c.block_bytes
                && o.concurrency == c.concurrency
        });
        bar_pair(&mut s, 50 + i * 44, c, redis, max);
    }
    let _ = write!(
        s,
        r##"<text x="50" y="{}"><tspan fill="#2f81f7">■ kvshare</tspan>  <tspan fill="#d1242f">■ redis</tspan>  (max {max:.2} GB/s)</text>"##,
        BARS_TOP - 6.0
    );
    if let Some(t) = &r.trace {
        hit_rate_line(&mut s, t, (w - 80) as f64);
    }
    s.push_str("</svg>\n");
    s
}

/// The bars of one cell at `x` (kvshare, then Redis when measured) and its label; `max` GB/s
/// is the full height.
fn bar_pair(s: &mut String, x: usize, c: &Cell, redis: Option<&Cell>, max: f64) {
    let (top, h) = (BARS_TOP, BARS_HEIGHT);
    let bar = |v: f64| v / max * h;
    let kh = bar(c.raw_gbps);
    let _ = write!(
        s,
        r##"<rect x="{x}" y="{:.1}" width="18" height="{kh:.1}" fill="#2f81f7"/>"##,
        top + h - kh
    );
    if let Some(rc) = redis {
        let rh = bar(rc.raw_gbps);
        let _ = write!(
            s,
            r##"<rect x="{}" y="{:.1}" width="18" height="{rh:.1}" fill="#d1242f"/>"##,
            x + 19,
            top + h - rh
        );
    }
    let _ = write!(
        s,
        r##"<text x="{}" y="{}" transform="rotate(60 {} {})">{} {}K c{}</text>"##,
        x,
        top + h + 12.0,
        x,
        top + h + 12.0,
        c.op,
        c.block_bytes / 1024,
        c.concurrency
    );
}

/// The trace's hit rate over time as a line `ww` pixels wide.
fn hit_rate_line(s: &mut String, t: &TraceReport, ww: f64) {
    let (y0, hh) = (370.0, 120.0);
    let _ = write!(
        s,
        r##"<text x="10" y="{}" font-size="14">Prefix-sharing trace: token hit rate over time ({:.1}% overall)</text>"##,
        y0 - 10.0,
        100.0 * t.token_hit_rate
    );
    let n = t.windows.len().max(2) as f64 - 1.0;
    let pts: Vec<String> = t
        .windows
        .iter()
        .enumerate()
        .map(|(i, wdw)| {
            format!(
                "{:.1},{:.1}",
                50.0 + i as f64 / n * ww,
                y0 + hh - wdw.token_hit_rate * hh
            )
        })
        .collect();
    let _ = write!(
        s,
        r##"<rect x="50" y="{y0}" width="{ww}" height="{hh}" fill="none" stroke="#ccc"/><polyline fill="none" stroke="#2f81f7" stroke-width="2" points="{}"/>"##,
        pts.join(" ")
    );
}
