//! The self-contained HTML report of a run (inline SVG plots, no network).
//!
//! One page, everything inline: the summary table, then five plots drawn here in Rust as
//! SVG — throughput and p99 over time, the latency histogram, remaining credits over time,
//! requests per node. No scripts, styles or fonts are fetched. A few lines of inline
//! JavaScript measure each plot's data marks after load (`getBBox`) and set
//! `data-drawn="yes"` on its `<svg>` when they have a size, so a headless browser can
//! check that the plots are really drawn.

use std::fmt::Write as _;

use crate::{Report, Second};

/// The `id`s of the plots' `<svg>` elements, in page order.
pub const PLOT_IDS: [&str; 5] = [
    "plot-throughput",
    "plot-p99",
    "plot-histogram",
    "plot-remaining",
    "plot-nodes",
];

/// Width of every plot's view box, in SVG user units.
const WIDTH: f64 = 720.0;
/// Height of the time-series and histogram plots.
const HEIGHT: f64 = 260.0;
const MARGIN_LEFT: f64 = 64.0;
const MARGIN_RIGHT: f64 = 20.0;
const MARGIN_TOP: f64 = 28.0;
const MARGIN_BOTTOM: f64 = 44.0;
/// Space for the node URLs left of the bars of the per-node chart.
const NODE_LABEL_WIDTH: f64 = 250.0;
/// Height of one bar row of the per-node chart.
const NODE_ROW: f64 = 30.0;

/// Renders the page: `title` as heading, `summary` as a two-column table (the rows of the
/// terminal table), then the plots of `report`.
pub fn render(title: &str, report: &Report, summary: &[(String, String)]) -> String {
    let mut page = String::with_capacity(64 * 1024);
    let _ = write!(
        page,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
        escape(title),
        escape(title)
    );
    page.push_str("<section class=\"summary\">\n<table>\n<tbody>\n");
    for (label, value) in summary {
        let _ = writeln!(
            page,
            "<tr><th scope=\"row\">{}</th><td>{}</td></tr>",
            escape(label),
            escape(value)
        );
    }
    page.push_str("</tbody>\n</table>\n</section>\n<section class=\"plots\">\n");

    let t_end = time_span(&report.timeline);
    figure(
        &mut page,
        "Throughput (per second)",
        &step_chart(
            PLOT_IDS[0],
            "requests / s",
            t_end,
            &[
                series("requests", "s-requests", &report.timeline, |s| {
                    Some(s.requests as f64)
                }),
                series("VALID", "s-valid", &report.timeline, |s| {
                    Some(s.valid as f64)
                }),
                series("errors", "s-errors", &report.timeline, |s| {
                    Some(s.errors as f64)
                }),
            ],
        ),
    );
    figure(
        &mut page,
        "p99 latency (per second)",
        &step_chart(
            PLOT_IDS[1],
            "p99 ms",
            t_end,
            &[series("p99", "s-p99", &report.timeline, |s| {
                (s.requests > 0).then_some(s.p99_ms)
            })],
        ),
    );
    figure(
        &mut page,
        "Latency histogram",
        &histogram(PLOT_IDS[2], &report.histogram_ms),
    );
    figure(
        &mut page,
        "Remaining credits (lowest in a VALID answer, per second)",
        &step_chart(
            PLOT_IDS[3],
            "credits",
            t_end,
            &[series("remaining", "s-remaining", &report.timeline, |s| {
                s.min_remaining.map(|r| r as f64)
            })],
        ),
    );
    let nodes: Vec<(&str, u64)> = report
        .nodes
        .iter()
        .map(|(url, n)| (url.as_str(), *n))
        .collect();
    figure(
        &mut page,
        "Requests per node",
        &node_bars(PLOT_IDS[4], &nodes),
    );

    let _ = write!(
        page,
        "</section>\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    );
    page
}

const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto;
  max-width: 780px; padding: 0 1rem; color: #1f2328; background: #fff; }
h1 { font-size: 1.25rem; font-weight: 600; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 0.25rem 0.5rem; border-bottom: 1px solid #e5e7eb;
  vertical-align: top; }
th { font-weight: 500; color: #57606a; width: 40%; }
figure { margin: 2rem 0; }
figcaption { font-weight: 600; margin-bottom: 0.5rem; }
svg.plot { width: 100%; height: auto; display: block; }
svg text { font: 11px system-ui, sans-serif; fill: #57606a; }
svg .title { font-weight: 600; fill: #1f2328; }
.axis { stroke: #8c959f; stroke-width: 1; }
.grid { stroke: #eaeef2; stroke-width: 1; }
.mark { fill: none; stroke-width: 2; }
.s-requests { stroke: #0969da; } .s-valid { stroke: #1a7f37; } .s-errors { stroke: #cf222e; }
.s-p99 { stroke: #8250df; } .s-remaining { stroke: #bc4c00; }
rect.mark { stroke: none; fill: #0969da; }
rect.mark.node { fill: #1a7f37; }
.swatch { stroke-width: 3; }
";

/// After load: `data-drawn="yes"` on each plot whose data marks have a non-zero box.
const SCRIPT: &str = "
window.addEventListener('load', function () {
  document.querySelectorAll('svg.plot').forEach(function (svg) {
    var drawn = false;
    svg.querySelectorAll('.mark').forEach(function (m) {
      var b = m.getBBox();
      if (b.width > 0 || b.height > 0) { drawn = true; }
    });
    svg.setAttribute('data-drawn', drawn ? 'yes' : 'no');
  });
});
";

fn figure(page: &mut String, caption: &str, svg: &str) {
    let _ = writeln!(
        page,
        "<figure>\n<figcaption>{}</figcaption>\n{svg}\n</figure>",
        escape(caption)
    );
}

/// Escapes text and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One line of a time-series plot: `(second, value)`, `None` where there is no value.
struct Series<'a> {
    name: &'a str,
    class: &'a str,
    points: Vec<(u64, Option<f64>)>,
}

fn series<'a>(
    name: &'a str,
    class: &'a str,
    timeline: &[Second],
    value: impl Fn(&Second) -> Option<f64>,
) -> Series<'a> {
    Series {
        name,
        class,
        points: timeline
            .iter()
            .map(|s| (s.t, value(s).filter(|v| v.is_finite())))
            .collect(),
    }
}

/// Seconds the timeline covers (at least 1).
fn time_span(timeline: &[Second]) -> u64 {
    timeline
        .iter()
        .map(|s| s.t.saturating_add(1))
        .max()
        .unwrap_or(1)
        .max(1)
}

/// A "nice" tick step (1, 2 or 5 × 10^k) for about `ticks` intervals over `0..=max`.
fn nice_step(max: f64, ticks: f64) -> f64 {
    let raw = if max > 0.0 && max.is_finite() {
        max / ticks
    } else {
        1.0 / ticks
    };
    let magnitude = 10f64.powf(raw.log10().floor());
    let norm = raw / magnitude;
    // Thresholds at the geometric means of 1, 2, 5, 10 (as d3's ticks).
    let factor = if norm < 2f64.sqrt() {
        1.0
    } else if norm < 10f64.sqrt() {
        2.0
    } else if norm < 50f64.sqrt() {
        5.0
    } else {
        10.0
    };
    factor * magnitude
}

/// Tick values `0, step, …` up to `top` (at most 50).
fn ticks(top: f64, step: f64) -> Vec<f64> {
    (0..=50u32)
        .map(|i| step * f64::from(i))
        .take_while(|v| *v <= top * (1.0 + 1e-9))
        .collect()
}

/// The axis top for data up to `max`: a multiple of the tick step with 5 % headroom, so
/// a line at the maximum does not sit on the frame.
fn axis_top(max: f64, ticks: f64) -> (f64, f64) {
    let step = nice_step(max, ticks);
    let top = if max > 0.0 && max.is_finite() {
        (max * 1.05 / step).ceil() * step
    } else {
        step * ticks
    };
    (top, step)
}

/// A tick label with as many decimals as the step needs.
fn tick_label(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else if step >= 0.1 {
        format!("{v:.1}")
    } else if step >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn svg_open(out: &mut String, id: &str, height: f64, label: &str) {
    let _ = write!(
        out,
        "<svg id=\"{id}\" class=\"plot\" viewBox=\"0 0 {WIDTH} {height}\" role=\"img\" \
         aria-label=\"{}\">",
        escape(label)
    );
}

/// Time series as step lines: each second's value spans `[t, t + 1)`. Gaps (`None`) break
/// the line.
fn step_chart(id: &str, y_label: &str, t_end: u64, series: &[Series<'_>]) -> String {
    let plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().filter_map(|p| p.1))
        .fold(0.0f64, f64::max);
    let (y_top, y_step) = axis_top(y_max, 5.0);
    let t_end_f = t_end as f64;
    let (_, x_step) = axis_top(t_end_f, 10.0);
    let x_step = x_step.max(1.0);
    let px = |t: f64| MARGIN_LEFT + t / t_end_f * plot_w;
    let py = |v: f64| MARGIN_TOP + plot_h - v / y_top * plot_h;

    let mut out = String::new();
    svg_open(&mut out, id, HEIGHT, y_label);
    // Grid and y labels.
    for v in ticks(y_top, y_step) {
        let y = py(v);
        let _ = write!(
            out,
            "<line class=\"grid\" x1=\"{MARGIN_LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - MARGIN_RIGHT,
            MARGIN_LEFT - 6.0,
            y + 4.0,
            tick_label(v, y_step)
        );
    }
    // X ticks (seconds).
    for t in ticks(t_end_f, x_step) {
        let x = px(t);
        let _ = write!(
            out,
            "<line class=\"axis\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            MARGIN_TOP + plot_h,
            MARGIN_TOP + plot_h + 5.0,
            MARGIN_TOP + plot_h + 18.0,
            tick_label(t, x_step)
        );
    }
    axes(&mut out, plot_h);
    let _ = write!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">seconds since start</text>\
         <text class=\"title\" x=\"{MARGIN_LEFT}\" y=\"16\">{}</text>",
        MARGIN_LEFT + plot_w / 2.0,
        HEIGHT - 8.0,
        escape(y_label)
    );
    // Data.
    let mut any = false;
    for s in series {
        let mut d = String::new();
        let mut prev: Option<u64> = None;
        for &(t, v) in &s.points {
            let Some(v) = v else {
                prev = None;
                continue;
            };
            let (x0, x1, y) = (px(t as f64), px(t.saturating_add(1) as f64), py(v));
            if prev.is_some_and(|p| p.saturating_add(1) == t) {
                let _ = write!(d, "V{y:.1}H{x1:.1}");
            } else {
                let _ = write!(d, "M{x0:.1} {y:.1}H{x1:.1}");
            }
            prev = Some(t);
        }
        if !d.is_empty() {
            any = true;
            let _ = write!(
                out,
                "<path class=\"mark {}\" d=\"{d}\"><title>{}</title></path>",
                s.class,
                escape(s.name)
            );
        }
    }
    if !any {
        no_data(&mut out, plot_h);
    }
    // Legend (only with more than one series).
    if series.len() > 1 {
        let mut x = WIDTH - MARGIN_RIGHT - 90.0 * series.len() as f64;
        for s in series {
            let _ = write!(
                out,
                "<line class=\"swatch {}\" x1=\"{x:.1}\" x2=\"{:.1}\" y1=\"12\" y2=\"12\"/>\
                 <text x=\"{:.1}\" y=\"16\">{}</text>",
                s.class,
                x + 16.0,
                x + 21.0,
                escape(s.name)
            );
            x += 90.0;
        }
    }
    out.push_str("</svg>");
    out
}

fn axes(out: &mut String, plot_h: f64) {
    let bottom = MARGIN_TOP + plot_h;
    let _ = write!(
        out,
        "<line class=\"axis\" x1=\"{MARGIN_LEFT}\" x2=\"{MARGIN_LEFT}\" y1=\"{MARGIN_TOP}\" \
         y2=\"{bottom:.1}\"/><line class=\"axis\" x1=\"{MARGIN_LEFT}\" x2=\"{:.1}\" \
         y1=\"{bottom:.1}\" y2=\"{bottom:.1}\"/>",
        WIDTH - MARGIN_RIGHT
    );
}

fn no_data(out: &mut String, plot_h: f64) {
    let _ = write!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">no data</text>",
        MARGIN_LEFT + (WIDTH - MARGIN_LEFT - MARGIN_RIGHT) / 2.0,
        MARGIN_TOP + plot_h / 2.0
    );
}

/// The latency histogram: one bar per bucket of equal width, labelled with upper bounds.
/// Empty buckets before the first and after the last non-empty one are left out.
fn histogram(id: &str, buckets: &[(f64, u64)]) -> String {
    let first = buckets.iter().position(|b| b.1 > 0);
    let last = buckets.iter().rposition(|b| b.1 > 0);
    let shown = match (first, last) {
        (Some(a), Some(b)) => &buckets[a..=b],
        _ => &[][..],
    };
    let plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
    let max = shown.iter().map(|b| b.1).max().unwrap_or(0) as f64;
    let (y_top, y_step) = axis_top(max, 5.0);
    let py = |v: f64| MARGIN_TOP + plot_h - v / y_top * plot_h;

    let mut out = String::new();
    svg_open(&mut out, id, HEIGHT, "latency histogram");
    for v in ticks(y_top, y_step) {
        let y = py(v);
        let _ = write!(
            out,
            "<line class=\"grid\" x1=\"{MARGIN_LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - MARGIN_RIGHT,
            MARGIN_LEFT - 6.0,
            y + 4.0,
            tick_label(v, y_step)
        );
    }
    axes(&mut out, plot_h);
    let _ = write!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">latency, upper bound of \
         bucket (ms, log scale)</text><text class=\"title\" x=\"{MARGIN_LEFT}\" y=\"16\">requests</text>",
        MARGIN_LEFT + plot_w / 2.0,
        HEIGHT - 8.0
    );
    if shown.is_empty() {
        no_data(&mut out, plot_h);
        out.push_str("</svg>");
        return out;
    }
    let n = shown.len() as f64;
    let bar_w = plot_w / n;
    let gap = if bar_w > 4.0 { 1.0 } else { 0.0 };
    // About 8 labels along the axis.
    let label_every = shown.len().div_ceil(8).max(1);
    let mut x = MARGIN_LEFT;
    for (i, &(upper_ms, count)) in shown.iter().enumerate() {
        if count > 0 {
            let y = py(count as f64);
            let _ = write!(
                out,
                "<rect class=\"mark\" x=\"{:.2}\" y=\"{y:.1}\" width=\"{:.2}\" height=\"{:.1}\">\
                 <title>≤ {} ms: {count}</title></rect>",
                x + gap / 2.0,
                (bar_w - gap).max(0.5),
                MARGIN_TOP + plot_h - y,
                format_ms(upper_ms)
            );
        }
        if i % label_every == 0 {
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x + bar_w / 2.0,
                MARGIN_TOP + plot_h + 18.0,
                format_ms(upper_ms)
            );
        }
        x += bar_w;
    }
    out.push_str("</svg>");
    out
}

/// Milliseconds with 3 significant digits or so.
fn format_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}

/// Requests per node as horizontal bars, the URL left of each bar and the count right.
fn node_bars(id: &str, nodes: &[(&str, u64)]) -> String {
    let rows = nodes.len().max(1) as f64;
    let height = MARGIN_TOP + rows * NODE_ROW + 16.0;
    let bar_x = NODE_LABEL_WIDTH;
    let bar_max_w = WIDTH - NODE_LABEL_WIDTH - 80.0;
    let max = nodes.iter().map(|n| n.1).max().unwrap_or(0) as f64;
    let total: u64 = nodes.iter().map(|n| n.1).sum();

    let mut out = String::new();
    svg_open(&mut out, id, height, "requests per node");
    let _ = write!(
        out,
        "<text class=\"title\" x=\"{MARGIN_LEFT}\" y=\"16\">requests sent</text>\
         <line class=\"axis\" x1=\"{bar_x}\" x2=\"{bar_x}\" y1=\"{MARGIN_TOP}\" y2=\"{:.1}\"/>",
        height - 16.0
    );
    if nodes.is_empty() {
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">no data</text>",
            WIDTH / 2.0,
            MARGIN_TOP + NODE_ROW / 2.0
        );
    }
    let mut y = MARGIN_TOP;
    for &(url, count) in nodes {
        let w = if max > 0.0 {
            count as f64 / max * bar_max_w
        } else {
            0.0
        };
        let share = if total > 0 {
            count as f64 / total as f64 * 100.0
        } else {
            0.0
        };
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            bar_x - 8.0,
            y + NODE_ROW / 2.0 + 4.0,
            escape(&shorten(url, 38))
        );
        if count > 0 {
            let _ = write!(
                out,
                "<rect class=\"mark node\" x=\"{bar_x}\" y=\"{:.1}\" width=\"{w:.1}\" \
                 height=\"{:.1}\"><title>{}: {count}</title></rect>",
                y + 4.0,
                NODE_ROW - 8.0,
                escape(url)
            );
        }
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\">{count} ({share:.1} %)</text>",
            bar_x + w + 6.0,
            y + NODE_ROW / 2.0 + 4.0
        );
        y += NODE_ROW;
    }
    out.push_str("</svg>");
    out
}

/// `s` cut to `max` characters with an ellipsis in the middle.
fn shorten(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        return s.to_owned();
    }
    let keep = max.saturating_sub(1) / 2;
    let head: String = s.chars().take(keep).collect();
    let tail: String = s.chars().skip(n - keep).collect();
    format!("{head}…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps_are_1_2_5() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(9.0, 10.0), 1.0);
        assert_eq!(nice_step(0.0, 5.0), 0.2);
        let (top, step) = axis_top(1234.0, 5.0);
        assert_eq!((top, step), (1400.0, 200.0));
        assert_eq!(axis_top(200.0, 5.0), (250.0, 50.0));
        assert_eq!(ticks(1.0, 0.2).len(), 6);
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn gaps_break_step_lines() {
        let s = Series {
            name: "r",
            class: "s-remaining",
            points: vec![(0, Some(10.0)), (1, Some(5.0)), (2, None), (3, Some(1.0))],
        };
        let svg = step_chart("p", "credits", 4, &[s]);
        let d = svg
            .split(" d=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(d.matches('M').count(), 2, "{d}");
        assert_eq!(d.matches('V').count(), 1, "{d}");
    }

    #[test]
    fn empty_report_renders_no_data() {
        let page = render("empty", &Report::default(), &[]);
        for id in PLOT_IDS {
            assert!(page.contains(&format!("id=\"{id}\"")), "{id}");
        }
        assert!(!page.contains("class=\"mark"), "no marks without data");
        assert!(page.contains("no data"));
    }

    #[test]
    fn shortens_long_urls() {
        assert_eq!(shorten("abcdefghij", 5), "ab…ij");
        assert_eq!(shorten("abc", 5), "abc");
    }
}
