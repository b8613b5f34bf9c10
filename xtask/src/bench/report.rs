//! The report: rows of figures with their baselines and typed targets, the markdown table that
//! marks each target met or not, and the latency chart.

use std::collections::BTreeMap;

use gammaray_testkit::lanes::Lane;

use super::{
    measure::median,
    world::{Plan, log_filter},
};
use crate::agents::Build;

/// A target a figure is held to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Target {
    /// The figure over its baseline, at least this.
    RatioAtLeast(f64),
    /// The figure over its baseline, at most this.
    RatioAtMost(f64),
    /// The figure itself, at most this (in its unit).
    AtMost(f64),
    /// The figure less its baseline, at most this (in its unit).
    AddedAtMost(f64),
}

impl Target {
    /// Whether `row` meets it; `None` when the row lacks the baseline it needs.
    fn met(self, row: &Row) -> Option<bool> {
        let ratio = || row.baseline.map(|b| row.value / b);
        match self {
            Target::RatioAtLeast(x) => ratio().map(|r| r >= x),
            Target::RatioAtMost(x) => ratio().map(|r| r <= x),
            Target::AtMost(x) => Some(row.value <= x),
            Target::AddedAtMost(x) => row.baseline.map(|b| row.value - b <= x),
        }
    }

    fn describe(self, unit: &str) -> String {
        match self {
            Target::RatioAtLeast(x) => format!("≥ {x}×"),
            Target::RatioAtMost(x) => format!("≤ {x}×"),
            Target::AtMost(x) => format!("≤ {x} {unit}"),
            Target::AddedAtMost(x) => format!("≤ +{x} {unit}"),
        }
    }
}

/// One row of the report.
pub(super) struct Row {
    pub figure: String,
    pub baseline: Option<f64>,
    pub value: f64,
    pub unit: &'static str,
    pub targets: Vec<Target>,
    /// The ratio to the baseline in each round, where the figure and its baseline were measured
    /// in turn: the report gives their range next to the ratio of the medians.
    pub ratios: Vec<f64>,
}

impl Row {
    /// A figure measured once, or whose baseline was not measured in turn with it.
    pub(super) fn new(figure: String, baseline: Option<f64>, value: f64, unit: &'static str) -> Row {
        Row { figure, baseline, value, unit, targets: Vec::new(), ratios: Vec::new() }
    }

    /// A figure and its baseline measured once per round: medians, and the ratio of each round.
    pub(super) fn of_rounds(figure: String, baseline: &[f64], value: &[f64], unit: &'static str) -> Row {
        Row {
            figure,
            baseline: Some(median(baseline.to_vec())),
            value: median(value.to_vec()),
            unit,
            targets: Vec::new(),
            ratios: baseline.iter().zip(value).map(|(b, v)| v / b).collect(),
        }
    }

    /// The row, held to `target` as well.
    pub(super) fn target(mut self, target: Target) -> Row {
        self.targets.push(target);
        self
    }

    /// The targets and whether the row meets them all: `≥ 0.5×: met`, `≤ 1.5×, ≤ +0.15 ms: not
    /// met`; empty without targets.
    fn verdict(&self) -> String {
        if self.targets.is_empty() {
            return String::new();
        }
        let wanted: Vec<String> = self.targets.iter().map(|t| t.describe(self.unit)).collect();
        let met: Option<bool> = self
            .targets
            .iter()
            .map(|t| t.met(self))
            .collect::<Option<Vec<bool>>>()
            .map(|m| m.iter().all(|&x| x));
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "not met",
            None => "no baseline",
        };
        format!("{}: {verdict}", wanted.join(", "))
    }
}

pub(super) fn render(rows: &[Row], quick: bool, build: Build, plan: &Plan, agent_build: &str) -> String {
    let mut s = String::from("# gammaray benchmarks\n\n");
    if build == Build::AlreadyBuilt {
        s.push_str(
            "**Debug build**: this run checked that the harness works (`cargo xtask test`). Its \
             figures say nothing about the mesh's speed; `cargo xtask bench` measures release builds.\n\n",
        );
    }
    s.push_str(&format!(
        "Mode: {}. oha at a fixed 1000 req/s over 16 connections for {} s, at saturation for {} s, \
         1 KiB responses, HTTP/1.1 keep-alive (the gRPC lanes: unary calls over HTTP/2); iperf3 for {} s; medians of {} round(s), each of \
         which measures every path in turn. Ratios are to the direct path of the same run (same \
         node or cross node): the ratio of the medians, and in brackets the range of the rounds' \
         own ratios. Two cores run everything: \
         load generator, backend and both proxies. The floor rows send the cross-node requests \
         through two plain TCP relays in the proxies' places (the proxy's runtime and copy loop, \
         no TLS, no HTTP): what two proxies cost on this machine before any work of their own. The agents log at \
         `{}`{}.\n\n",
        if quick { "quick (keeps the harness working; numbers are noisy)" } else { "full" },
        plan.fixed.as_secs_f64(),
        plan.saturate.as_secs_f64(),
        plan.bulk_secs,
        plan.runs,
        log_filter(),
        if log_filter().contains("info") {
            ""
        } else {
            " (no access-log line per request; the deployed default, `info`, writes one)"
        }
    ));
    s.push_str(&format!("Agent: {agent_build}.\n\n"));
    s.push_str("| figure | direct | measured | ratio | target |\n| --- | ---: | ---: | ---: | --- |\n");
    let mut verdicts = Vec::new();
    for r in rows {
        let (base, ratio) = match r.baseline {
            // A ratio to nothing (failed requests against none) says nothing: a dash.
            Some(b) if b == 0.0 => (format!("{} {}", fmt(b), r.unit), "—".into()),
            Some(b) => {
                let mut ratio = format!("{:.2}×", r.value / b);
                if r.ratios.len() > 1 {
                    let lo = r.ratios.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = r.ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    ratio.push_str(&format!(" ({lo:.2}–{hi:.2})"));
                }
                (format!("{} {}", fmt(b), r.unit), ratio)
            }
            None => ("".into(), "".into()),
        };
        let target = r.verdict();
        if !r.targets.is_empty() {
            verdicts.push((r.figure.as_str(), target.clone()));
        }
        s.push_str(&format!(
            "| {} | {base} | {} {} | {ratio} | {target} |\n",
            r.figure,
            fmt(r.value),
            r.unit
        ));
    }
    if !verdicts.is_empty() {
        let met = verdicts.iter().filter(|(_, v)| v.ends_with(": met")).count();
        s.push_str(&format!("\nTargets: {met} of {} met.\n", verdicts.len()));
        for (figure, verdict) in verdicts.iter().filter(|(_, v)| !v.ends_with(": met")) {
            s.push_str(&format!("- not met: {figure} ({verdict})\n"));
        }
    }
    s.push_str("\n![latency percentiles](latency.svg)\n");
    s
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Grouped bars of p50/p90/p99 per path, as SVG.
pub(super) fn chart(latency: &BTreeMap<Lane, (f64, f64, f64)>) -> String {
    let max = latency.values().map(|l| l.2).fold(0.0f64, f64::max).max(0.001);
    let (h, left, bottom) = (320.0, 60.0, 60.0);
    // Room for each path's label under its bars.
    let w = (left + 20.0 + 95.0 * latency.len() as f64).max(760.0);
    let plot_h = h - bottom - 20.0;
    let group = (w - left - 20.0) / latency.len() as f64;
    let bar = group / 4.0;
    let colors = ["#4c78a8", "#f58518", "#e45756"];
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='11'>\n<rect width='100%' height='100%' fill='white'/>\n<text x='{left}' y='14' font-size='13'>latency at 1000 req/s, 16 connections (ms): p50, p90, p99</text>\n"
    );
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let y = h - bottom - plot_h * i as f64 / 4.0;
        s.push_str(&format!(
            "<line x1='{left}' x2='{}' y1='{y:.1}' y2='{y:.1}' stroke='#ddd'/><text x='{}' y='{:.1}' text-anchor='end'>{v:.2}</text>\n",
            w - 20.0,
            left - 4.0,
            y + 4.0
        ));
    }
    for (g, (path, l)) in latency.iter().enumerate() {
        let x0 = left + g as f64 * group + bar / 2.0;
        for (i, v) in [l.0, l.1, l.2].into_iter().enumerate() {
            let bh = if v.is_finite() { plot_h * v / max } else { 0.0 };
            s.push_str(&format!(
                "<rect x='{:.1}' y='{:.1}' width='{:.1}' height='{bh:.1}' fill='{}'/>\n",
                x0 + i as f64 * bar,
                h - bottom - bh,
                bar * 0.9,
                colors[i]
            ));
        }
        s.push_str(&format!(
            "<text x='{:.1}' y='{:.1}' text-anchor='middle'>{}</text>\n",
            x0 + bar * 1.5,
            h - bottom + 16.0,
            path.name()
        ));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::{Row, Target, render};
    use crate::bench::world::FULL;

    #[test]
    fn a_row_of_rounds_gives_the_ratio_of_the_medians_and_the_range_of_the_rounds_ratios() {
        // Round 2 is slow on both sides: its own ratio is ordinary, the medians' ratio too.
        let row = Row::of_rounds("x".into(), &[10.0, 40.0, 12.0], &[5.0, 18.0, 7.0], "req/s");
        assert_eq!((row.baseline, row.value), (Some(12.0), 7.0));
        let md = render(&[row], false, crate::agents::Build::Now, &FULL, "a build");
        assert!(md.contains("| x | 12.00 req/s | 7.00 req/s | 0.58× (0.45–0.58) |  |"), "{md}");
        // One round: no range.
        let one = Row::of_rounds("y".into(), &[10.0], &[5.0], "ms");
        let md = render(&[one], true, crate::agents::Build::Now, &FULL, "a build");
        assert!(md.contains("| y | 10.00 ms | 5.00 ms | 0.50× |  |"), "{md}");
        // A baseline of zero gives no ratio, not NaN× or inf×.
        let none = Row::new("z".into(), Some(0.0), 0.0, "requests");
        let some = Row::new("w".into(), Some(0.0), 2.0, "requests");
        let md = render(&[none, some], true, crate::agents::Build::Now, &FULL, "a build");
        assert!(md.contains("| z | 0.000 requests | 0.000 requests | — |  |"), "{md}");
        assert!(md.contains("| w | 0.000 requests | 2.00 requests | — |  |"), "{md}");
        assert!(!md.contains("NaN×") && !md.contains("inf×"), "{md}");
    }

    #[test]
    fn the_report_marks_each_target_met_or_not_and_lists_those_not_met() {
        let rows = [
            Row::of_rounds("rate".into(), &[100.0], &[60.0], "req/s").target(Target::RatioAtLeast(0.5)),
            Row::of_rounds("p90".into(), &[0.1], &[0.2], "ms")
                .target(Target::RatioAtMost(1.5))
                .target(Target::AddedAtMost(0.15)),
            Row::new("rss".into(), None, 15.0, "MiB").target(Target::AtMost(20.0)),
            Row::new("orphan".into(), None, 1.0, "x").target(Target::RatioAtLeast(1.0)),
            Row::new("plain".into(), None, 3.0, "ms"),
        ];
        let md = render(&rows, false, crate::agents::Build::Now, &FULL, "a build");
        assert!(md.contains("| ≥ 0.5×: met |"), "{md}");
        assert!(md.contains("| ≤ 1.5×, ≤ +0.15 ms: not met |"), "{md}");
        assert!(md.contains("| ≤ 20 MiB: met |"), "{md}");
        assert!(md.contains("| ≥ 1×: no baseline |"), "{md}");
        assert!(md.contains("| plain |  | 3.00 ms |  |  |"), "{md}");
        assert!(md.contains("Targets: 2 of 4 met."), "{md}");
        assert!(md.contains("- not met: p90 (≤ 1.5×, ≤ +0.15 ms: not met)"), "{md}");
        assert!(md.contains("- not met: orphan"), "{md}");
    }
}
