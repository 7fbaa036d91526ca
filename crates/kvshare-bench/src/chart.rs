//! A self-contained SVG of the headline numbers, readable at a glance: raw K/V GB/s of kvshare
//! vs Redis per cell on a GB/s axis with ticks and grid lines, each bar's value and each cell's
//! kvshare/Redis ratio printed, loopback and shaped-link cells side by side in labelled groups;
//! the lookup latencies (idle and beside a load) as text; the trace's hit rate over time.
//!
//! The width follows the content (cells, labels, title), computed from an estimate of text
//! width (0.6 em per character, generous for sans-serif digits and lower case).

use std::fmt::Write;

use kvshare_core::size::format_size;

use crate::Report;
use crate::throughput::{Cell, LOOPBACK};
use crate::trace::TraceReport;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Estimated width of `s` at `size` px.
fn text_width(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.6
}

/// Left margin (tick labels and the axis title), pixels.
const LEFT: f64 = 64.0;
/// Right margin.
const RIGHT: f64 = 16.0;
/// Width of one bar.
const BAR: f64 = 26.0;
/// Horizontal room of one cell (two bars and the space to the next cell).
const SLOT: f64 = 2.0 * BAR + 2.0 + 18.0;
/// Space between groups (links).
const GROUP_GAP: f64 = 28.0;
/// Top of the plot area and its height.
const PLOT_TOP: f64 = 108.0;
const PLOT_HEIGHT: f64 = 240.0;
/// Colours of the two systems.
const KVSHARE: &str = "#2f81f7";
const REDIS: &str = "#d1242f";

/// A grid step of about a fifth of `max` (1, 2, 2.5 or 5 times a power of ten) and the axis
/// top, a multiple of it at or above `max`.
fn axis(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag);
    (step, (max / step - 1e-9).ceil().max(1.0) * step)
}

/// A tick label: up to two decimals, trailing zeros dropped (`0.5`, `1`, `2.25`).
fn tick_label(v: f64) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// The cells of one link: each kvshare cell with its Redis cell (same op, size, concurrency).
struct Group<'a> {
    link: &'a str,
    header: String,
    /// What the link delivers to one TCP stream, GB/s (server→client, client→server).
    limit_gbps: Option<(f64, f64)>,
    pairs: Vec<(&'a Cell, Option<&'a Cell>)>,
}

impl Group<'_> {
    fn width(&self) -> f64 {
        (self.pairs.len() as f64 * SLOT).max(text_width(&self.header, 11.0) + 8.0)
    }
}

/// The throughput cells grouped by link, in the order measured (loopback first).
fn groups(r: &Report) -> Vec<Group<'_>> {
    let mut out: Vec<Group<'_>> = Vec::new();
    for c in r.throughput.iter().filter(|c| c.system == "kvshare") {
        let redis = r.throughput.iter().find(|o| {
            o.system == "redis"
                && o.link == c.link
                && o.op == c.op
                && o.block_bytes == c.block_bytes
                && o.concurrency == c.concurrency
        });
        match out.iter_mut().find(|g| g.link == c.link) {
            Some(g) => g.pairs.push((c, redis)),
            None => out.push(Group {
                link: &c.link,
                header: link_header(r, &c.link),
                limit_gbps: r
                    .shaped
                    .as_ref()
                    .and_then(|s| s.links.iter().find(|l| l.link == c.link))
                    .map(|l| (l.delivered_down_gbit / 8.0, l.delivered_up_gbit / 8.0)),
                pairs: vec![(c, redis)],
            }),
        }
    }
    out
}

/// The heading of a link's group: `loopback`, or the shaped link with what it delivers.
fn link_header(r: &Report, link: &str) -> String {
    if link == LOOPBACK {
        return "loopback".into();
    }
    let shaped = r
        .shaped
        .as_ref()
        .and_then(|s| s.links.iter().find(|l| l.link == link));
    match shaped {
        Some(l) => format!(
            "link {link} (TCP {:.2}↓ {:.2}↑ Gbit/s)",
            l.delivered_down_gbit, l.delivered_up_gbit
        ),
        None => format!("link {link}"),
    }
}

/// The lines of the lookup section (2,048-block prompt; idle and loaded when measured).
fn lookup_lines(r: &Report) -> Vec<String> {
    let mut lines = Vec::new();
    if !r.lookup_loaded.is_empty() {
        let runs = r.lookup_loaded.first().map_or(0, |l| l.runs.len());
        lines.push(format!(
            "Lookup of a {}-block prompt, p50 / p99 µs (median of {runs} run{}; Redis: pipelined EXISTS)",
            r.lookup_loaded[0].blocks,
            if runs == 1 { "" } else { "s" }
        ));
        for l in &r.lookup_loaded {
            let load = if l.condition == "idle" {
                String::new()
            } else {
                format!(" (load moved {:.2} GB/s)", l.median_load_raw_gbps)
            };
            lines.push(format!(
                "{:<8} {:<18} {:>6.0} / {:>6.0}{load}",
                l.system, l.condition, l.median_p50_us, l.median_p99_us
            ));
        }
    } else if r.lookup.iter().any(|l| l.blocks == 2048) {
        lines.push("Lookup of a 2048-block prompt, p50 / p99 µs (Redis: pipelined EXISTS)".into());
        for l in r.lookup.iter().filter(|l| l.blocks == 2048) {
            lines.push(format!(
                "{:<8} {:>6.0} / {:>6.0}",
                l.system, l.p50_us, l.p99_us
            ));
        }
    }
    lines
}

/// `Redis 7.0.15` from `redis-server --version`'s line (`Redis server v=7.0.15 sha=...`).
fn short_baseline(b: &str) -> String {
    match b.split_whitespace().find_map(|w| w.strip_prefix("v=")) {
        Some(v) => format!("Redis {v}"),
        None => b.to_string(),
    }
}

/// Renders the report as SVG.
pub fn render(r: &Report) -> String {
    let groups = groups(r);
    let title = "kvshare vs Redis: raw K/V GB/s (higher is better)";
    let subtitle = format!(
        "{}; kvshare codec {}{}",
        r.machine,
        r.codec,
        if r.baseline.is_empty() {
            String::new()
        } else {
            format!("; baseline {}", short_baseline(&r.baseline))
        }
    );
    let lookups = lookup_lines(r);
    let legend = format!(
        "ratio below each cell = kvshare / Redis{}",
        if groups.iter().any(|g| g.limit_gbps.is_some()) {
            "; dashed line = raw TCP rate of the shaped link"
        } else {
            ""
        }
    );
    let plot_w: f64 = groups.iter().map(Group::width).sum::<f64>()
        + GROUP_GAP * groups.len().saturating_sub(1) as f64;
    let w = (LEFT + plot_w.max(200.0) + RIGHT)
        .max(text_width(title, 16.0) + 20.0)
        .max(text_width(&subtitle, 11.0) + 20.0)
        .max(LEFT + 140.0 + text_width(&legend, 11.0) + 10.0)
        .max(
            lookups
                .iter()
                .map(|l| text_width(l, 11.0) + 20.0)
                .fold(0.0, f64::max),
        )
        .ceil();
    let labels_bottom = PLOT_TOP + PLOT_HEIGHT + 62.0;
    let lookup_top = labels_bottom + 24.0;
    let trace_top = lookup_top + lookups.len() as f64 * 16.0 + 36.0;
    let h = if r.trace.is_some() {
        trace_top + 150.0
    } else {
        trace_top - 20.0
    }
    .ceil();

    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>"##
    );
    let _ = write!(
        s,
        r##"<text x="10" y="24" font-size="16" font-weight="bold">{}</text><text x="10" y="42" fill="#555">{}</text>"##,
        esc(title),
        esc(&subtitle)
    );
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="54" width="10" height="10" fill="{KVSHARE}"/><text x="{}" y="63">kvshare</text><rect x="{}" y="54" width="10" height="10" fill="{REDIS}"/><text x="{}" y="63">Redis</text><text x="{}" y="63" fill="#555">{}</text>"##,
        LEFT + 14.0,
        LEFT + 70.0,
        LEFT + 84.0,
        LEFT + 140.0,
        esc(&legend)
    );

    let max = r.throughput.iter().map(|c| c.raw_gbps).fold(0.0, f64::max);
    let (step, top) = axis(max);
    let y_of = |v: f64| PLOT_TOP + PLOT_HEIGHT - v / top * PLOT_HEIGHT;
    let right = w - RIGHT;
    // Grid lines and tick labels.
    let ticks = (top / step).round() as usize;
    for i in 0..=ticks {
        let v = i as f64 * step;
        let y = y_of(v);
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="{}"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            if i == 0 { "#333" } else { "#e3e3e3" },
            LEFT - 6.0,
            y + 4.0,
            tick_label(v)
        );
    }
    let mid = PLOT_TOP + PLOT_HEIGHT / 2.0;
    let _ = write!(
        s,
        r##"<line x1="{LEFT}" y1="{PLOT_TOP}" x2="{LEFT}" y2="{}" stroke="#333"/><text x="16" y="{mid}" text-anchor="middle" transform="rotate(-90 16 {mid})">raw K/V GB/s</text>"##,
        PLOT_TOP + PLOT_HEIGHT
    );
    if groups.is_empty() {
        let _ = write!(
            s,
            r##"<text x="{}" y="{mid}" fill="#555">no throughput cells in this run</text>"##,
            LEFT + 10.0
        );
    }

    let mut x = LEFT + 10.0;
    for (gi, g) in groups.iter().enumerate() {
        if gi > 0 {
            let sep = x - GROUP_GAP / 2.0 - 5.0;
            let _ = write!(
                s,
                r##"<line x1="{sep}" y1="{}" x2="{sep}" y2="{labels_bottom}" stroke="#999" stroke-dasharray="4 3"/>"##,
                PLOT_TOP - 24.0
            );
        }
        let _ = write!(
            s,
            r##"<text x="{x}" y="{}" font-weight="bold">{}</text>"##,
            PLOT_TOP - 10.0,
            esc(&g.header)
        );
        if let Some((down, up)) = g.limit_gbps {
            // One line at the slower direction's rate: what one TCP stream gets through.
            let v = down.min(up);
            let y = y_of(v);
            let _ = write!(
                s,
                r##"<line x1="{x}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#333" stroke-dasharray="6 3"><title>link {v:.2} GB/s</title></line>"##,
                x + g.width() - 4.0
            );
        }
        for (i, (k, redis)) in g.pairs.iter().enumerate() {
            cell(&mut s, x + i as f64 * SLOT, k, *redis, &y_of);
        }
        x += g.width() + GROUP_GAP;
    }

    for (i, l) in lookups.iter().enumerate() {
        let _ = write!(
            s,
            r##"<text x="10" y="{}" {}xml:space="preserve">{}</text>"##,
            lookup_top + i as f64 * 16.0,
            if i == 0 {
                r#"font-size="13" font-weight="bold" "#
            } else {
                r#"font-family="monospace" "#
            },
            esc(l)
        );
    }
    if let Some(t) = &r.trace {
        hit_rate_line(&mut s, t, trace_top, w - LEFT - RIGHT);
    }
    s.push_str("</svg>\n");
    s
}

/// One cell at `x`: the kvshare bar, the Redis bar when measured, their values above them, the
/// ratio and the cell's label below the axis.
fn cell(s: &mut String, x: f64, k: &Cell, redis: Option<&Cell>, y_of: &dyn Fn(f64) -> f64) {
    let base = y_of(0.0);
    let mut bar = |x: f64, v: f64, fill: &str| {
        let y = y_of(v);
        let _ = write!(
            s,
            r##"<rect x="{x:.1}" y="{y:.1}" width="{BAR}" height="{:.1}" fill="{fill}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.2}</text>"##,
            base - y,
            x + BAR / 2.0,
            y - 3.0
        );
    };
    bar(x, k.raw_gbps, KVSHARE);
    if let Some(rc) = redis {
        bar(x + BAR + 2.0, rc.raw_gbps, REDIS);
    }
    let cx = x + BAR + 1.0;
    let ratio = match redis {
        Some(rc) if rc.raw_gbps > 0.0 => format!("{:.2}x", k.raw_gbps / rc.raw_gbps),
        _ => "–".into(),
    };
    let size = format_size(k.block_bytes).replace(".00 ", " ");
    let _ = write!(
        s,
        r##"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{ratio}</text><text x="{cx:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="{cx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text><text x="{cx:.1}" y="{:.1}" text-anchor="middle" fill="#555">c{}</text>"##,
        base + 16.0,
        base + 31.0,
        esc(&k.op),
        base + 44.0,
        esc(&size),
        base + 57.0,
        k.concurrency
    );
}

/// The trace's hit rate over time from `y0`, `ww` pixels wide.
fn hit_rate_line(s: &mut String, t: &TraceReport, y0: f64, ww: f64) {
    let hh = 120.0;
    let _ = write!(
        s,
        r##"<text x="10" y="{}" font-size="13" font-weight="bold">Prefix-sharing trace: token hit rate over time ({:.1}% overall)</text>"##,
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
                LEFT + i as f64 / n * ww,
                y0 + hh - wdw.token_hit_rate * hh
            )
        })
        .collect();
    for (v, label) in [(0.0, "0%"), (0.5, "50%"), (1.0, "100%")] {
        let y = y0 + hh - v * hh;
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="#e3e3e3"/><text x="{}" y="{}" text-anchor="end">{label}</text>"##,
            LEFT + ww,
            LEFT - 6.0,
            y + 4.0
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{y0}" width="{ww}" height="{hh}" fill="none" stroke="#ccc"/><polyline fill="none" stroke="{KVSHARE}" stroke-width="2" points="{}"/>"##,
        pts.join(" ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::{LinkReport, ShapedReport, Tbf};
    use crate::throughput::{LookupLoadRow, LookupRun};

    fn cell(system: &str, link: &str, op: &str, gbps: f64) -> Cell {
        Cell {
            system: system.into(),
            link: link.into(),
            op: op.into(),
            block_bytes: 1 << 20,
            concurrency: 4,
            ops: 64,
            seconds: 1.0,
            raw_gbps: gbps,
            wire_gbps: gbps / 1.44,
            ops_per_s: 64.0,
        }
    }

    fn report() -> Report {
        let link = |l: &str, g: f64| LinkReport {
            link: l.into(),
            target_gbit: g,
            tbf: Tbf {
                burst_bytes: 250_000,
                latency_us: 10_000,
            },
            delivered_down_gbit: g * 0.955,
            delivered_up_gbit: g * 0.96,
            within_10pct: true,
            tries: vec![],
        };
        let run = |p50: f64, p99: f64| LookupRun {
            samples: 300,
            p50_us: p50,
            p99_us: p99,
            p999_us: p99 * 2.0,
            load_raw_gbps: 0.0,
        };
        Report {
            machine: "2 cores, AMD EPYC <test> & co".into(),
            codec: "byteplane-zstd".into(),
            baseline: "Redis server v=7.0.15".into(),
            throughput: vec![
                cell("kvshare", LOOPBACK, "get", 1.16),
                cell("redis", LOOPBACK, "get", 2.81),
                cell("kvshare", LOOPBACK, "put", 0.40),
                cell("redis", LOOPBACK, "put", 1.77),
                cell("kvshare", "2gbit", "get", 0.301),
                cell("redis", "2gbit", "get", 0.239),
                cell("kvshare", "2gbit", "put", 0.291),
                cell("redis", "2gbit", "put", 0.240),
            ],
            lookup_loaded: vec![
                LookupLoadRow::new("kvshare", 2048, "idle", vec![run(569.0, 742.0)]),
                LookupLoadRow::new(
                    "kvshare",
                    2048,
                    "mixed 1 MiB x4",
                    vec![run(4117.0, 13409.0)],
                ),
            ],
            shaped: Some(ShapedReport {
                unshaped_gbit: (22.8, 25.9),
                links: vec![link("2gbit", 2.0)],
                ratios: vec![],
                cells: vec![],
                secure: vec![],
            }),
            ..Default::default()
        }
    }

    /// Checks that every element is closed in order and the root is one `<svg>`; returns the
    /// number of elements.
    fn well_formed(svg: &str) -> usize {
        let mut stack: Vec<String> = Vec::new();
        let (mut rest, mut elements, mut roots) = (svg.trim(), 0, 0);
        while let Some(open) = rest.find('<') {
            assert!(
                !rest[..open].contains('>'),
                "stray '>' in text: {:?}",
                &rest[..open]
            );
            let close = rest[open..].find('>').expect("unterminated tag") + open;
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "'<' inside a tag: {tag:?}");
            assert_eq!(
                tag.matches('"').count() % 2,
                0,
                "unbalanced quotes: {tag:?}"
            );
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched </{name}>"
                );
            } else {
                let name = tag
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_end_matches('/');
                assert!(!name.is_empty(), "empty tag");
                if stack.is_empty() {
                    roots += 1;
                    assert_eq!(name, "svg");
                }
                elements += 1;
                if !tag.ends_with('/') {
                    stack.push(name.to_string());
                }
            }
            rest = &rest[close + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert!(rest.trim().is_empty(), "text after the root: {rest:?}");
        assert_eq!(roots, 1);
        elements
    }

    #[test]
    fn axis_steps_are_round() {
        assert_eq!(axis(2.81), (1.0, 3.0));
        assert_eq!(axis(0.9), (0.2, 1.0));
        assert_eq!(axis(1.2), (0.25, 1.25));
        assert_eq!(axis(10.0), (2.0, 10.0));
        assert_eq!(axis(0.0), (0.2, 1.0));
        assert_eq!(tick_label(0.5), "0.5");
        assert_eq!(tick_label(2.0), "2");
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(0.0), "0");
    }

    #[test]
    fn chart_has_axis_values_ratios_and_links() {
        let r = report();
        let svg = render(&r);
        assert!(well_formed(&svg) > 40);
        // Axis: max 2.81 GB/s -> ticks 0, 1, 2, 3 with grid lines.
        for t in ["0", "1", "2", "3"] {
            assert!(
                svg.contains(&format!(r#"text-anchor="end">{t}</text>"#)),
                "tick {t}"
            );
        }
        assert!(svg.contains("raw K/V GB/s</text>"));
        assert!(svg.matches("<line").count() >= 5);
        // Every bar's value.
        for v in ["1.16", "2.81", "0.40", "1.77", "0.30", "0.24", "0.29"] {
            assert!(svg.contains(&format!(">{v}</text>")), "value {v}");
        }
        // Every cell's ratio: 1.16/2.81, 0.40/1.77, 0.301/0.239, 0.291/0.240.
        for q in ["0.41x", "0.23x", "1.26x", "1.21x"] {
            assert!(svg.contains(&format!(">{q}</text>")), "ratio {q}");
        }
        // Both groups, the shaped one labelled with its link and delivered rate.
        assert!(svg.contains(">loopback</text>"));
        assert!(svg.contains("link 2gbit (TCP 1.91↓ 1.92↑ Gbit/s)"));
        assert_eq!(svg.matches(r##"fill="#2f81f7"/>"##).count(), 4 + 1);
        // Lookup rows, and the machine string escaped.
        assert!(svg.contains("mixed 1 MiB x4"));
        assert!(svg.contains("&lt;test&gt; &amp; co"));
        assert!(svg.contains("baseline Redis 7.0.15<"));
        // The shaped group's delivered rate: 1.91 Gbit/s = 0.24 GB/s.
        assert!(svg.contains("<title>link 0.24 GB/s</title>"));
        assert!(svg.contains("dashed line = raw TCP rate"));
    }

    #[test]
    fn width_fits_the_title_and_the_cells() {
        let mut r = report();
        r.throughput.truncate(2);
        r.lookup_loaded.clear();
        r.machine = "m".into();
        let svg = render(&r);
        well_formed(&svg);
        let w: f64 = svg
            .split("width=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        let title = "kvshare vs Redis: raw K/V GB/s (higher is better)";
        assert!(w >= text_width(title, 16.0) + 20.0, "width {w}");
        // Many cells: wider than the title, and every cell has room.
        let mut r = report();
        for i in 0..20 {
            r.throughput.push(cell(
                "kvshare",
                "5gbit",
                if i % 2 == 0 { "get" } else { "put" },
                0.5,
            ));
        }
        let svg = render(&r);
        well_formed(&svg);
        let w2: f64 = svg
            .split("width=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        assert!(w2 >= LEFT + 24.0 * SLOT, "width {w2}");
        // A cell without a Redis counterpart has no ratio.
        assert!(svg.contains(">–</text>"));
    }
}
