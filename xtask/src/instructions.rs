//! `cargo xtask bench --instructions`: the user-space instructions one request costs, counted by
//! callgrind in the request-cost harness (`agent/examples/request_cost.rs`: two nodes' proxies,
//! a client and a backend in one process on loopback).
//!
//! Each lane runs twice, with [`FEW`] and [`MANY`] requests after the same warm-up; the
//! difference in instructions over the difference in requests is the cost of one request,
//! without the process's start-up, certificates and TLS handshakes. Per-request counts repeat
//! to within 0.01 % between runs, where timed figures on a shared host vary by tens of
//! percent: this is how a change of a few percent in the proxy's own work is measured. What it
//! leaves out is the kernel's side (system calls, TCP, wakeups), which the timed benchmark has.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use gammaray_testkit::lanes::Lane;

const FEW: u64 = 200;
const MANY: u64 = 1200;
/// One run of the harness the report counts and the profile's training runs: a counted lane
/// of the shared table (`gammaray_testkit::lanes`), and how the harness logs: the filter, and
/// whether as JSON lines (`--log-json`).
pub struct Count {
    pub lane: Lane,
    pub rust_log: &'static str,
    pub json: bool,
}

impl Count {
    /// The run as the progress lines name it: `l7-cross (info, JSON)`.
    pub fn label(&self) -> String {
        format!("{} ({}{})", self.lane.name(), self.rust_log, if self.json { ", JSON" } else { "" })
    }

    /// Adds the harness's arguments and environment for `requests` requests on this lane to
    /// `cmd`, which runs the harness (itself, or under valgrind).
    pub fn harness_args<'c>(&self, cmd: &'c mut Command, requests: u64) -> &'c mut Command {
        cmd.args([self.lane.name(), &requests.to_string()])
            .env("RUST_LOG", self.rust_log)
            .env("GAMMARAY_LOG_JSON", if self.json { "1" } else { "0" })
    }
}

/// Every counted lane at `warn`, as the timed benchmark runs the agents (no access log), then
/// cross-node L7 with the access log as deployed (`info`), in text and in JSON. The
/// profile-guided build trains on all of them, so they are also what its profile calls hot.
pub fn counts() -> Vec<Count> {
    let mut counts: Vec<Count> =
        Lane::counted().map(|lane| Count { lane, rust_log: "warn", json: false }).collect();
    for json in [false, true] {
        counts.push(Count { lane: Lane::L7Cross, rust_log: "info", json });
    }
    counts
}

/// Counts on the profile-guided build with `pgo` (what the image ships), else on a plain
/// release build.
pub fn run(pgo: bool) -> anyhow::Result<()> {
    let version = Command::new("valgrind").arg("--version").output();
    anyhow::ensure!(
        version.is_ok_and(|v| v.status.success()),
        "valgrind (Debian's valgrind; scripts/setup.sh installs it) is needed for --instructions"
    );
    let target_dir = crate::target_dir()?;
    let (harness, build) = if pgo {
        let harness = crate::pgo::build(&target_dir)?.harness;
        (harness, "release build with profile-guided optimisation, trained on these lanes")
    } else {
        println!("bench: building the request-cost harness in release mode");
        crate::cargo_quiet(&crate::pgo::HARNESS_RELEASE_BUILD)?;
        (target_dir.join("release/examples/request_cost"), "plain release build (--no-pgo)")
    };
    let out_dir = target_dir.join("bench/callgrind");
    std::fs::create_dir_all(&out_dir)?;

    let mut rows = Vec::new();
    for count in counts() {
        let few = instructions(&harness, &out_dir, &count, FEW)?;
        let many = instructions(&harness, &out_dir, &count, MANY)?;
        anyhow::ensure!(many > few, "{}: {MANY} requests counted no more than {FEW}", count.label());
        let per_request = (many - few) / (MANY - FEW);
        println!("bench: {}: {per_request} instructions per request", count.label());
        let what = match (count.rust_log, count.json) {
            ("warn", _) => count.lane.label().to_owned(),
            (_, false) => format!("{}, access log at {} in text", count.lane.label(), count.rust_log),
            (_, true) => format!("{}, access log at {} as JSON lines", count.lane.label(), count.rust_log),
        };
        let lane = count.lane;
        rows.push(Row { lane: lane.name(), what, baseline: lane.baseline().name(), per_request });
    }
    let report = render(&rows, build);
    let path = target_dir.join("bench/instructions.md");
    std::fs::write(&path, &report)?;
    println!("\n{report}\nbench: wrote {}", path.display());
    Ok(())
}

/// Runs the debug build of the harness, which the test build made, on every lane.
pub fn check_harness() -> anyhow::Result<()> {
    let harness = crate::target_dir()?.join("debug/examples/request_cost");
    let run =
        Command::new(&harness).args(["all", "20"]).output().with_context(|| harness.display().to_string())?;
    print!("{}", String::from_utf8_lossy(&run.stdout));
    anyhow::ensure!(
        run.status.success(),
        "{}: {}\n{}",
        harness.display(),
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    Ok(())
}

/// Instructions the harness executes for `requests` requests on `lane`, start-up included.
fn instructions(harness: &Path, out_dir: &Path, count: &Count, requests: u64) -> anyhow::Result<u64> {
    let Count { lane, rust_log, json } = count;
    let name = lane.name();
    let format = if *json { "json" } else { "text" };
    let out: PathBuf = out_dir.join(format!("callgrind-{name}-{rust_log}-{format}-{requests}.out"));
    let mut valgrind = Command::new("valgrind");
    valgrind
        .args(["--tool=callgrind", "--quiet"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(harness);
    let run = count.harness_args(&mut valgrind, requests).output().context("valgrind")?;
    anyhow::ensure!(
        run.status.success(),
        "request_cost {name} {requests} under callgrind failed: {}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr).lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    summary(&std::fs::read_to_string(&out)?).with_context(|| format!("no summary line in {}", out.display()))
}

/// The total of callgrind's one event (instructions) from its output file.
fn summary(callgrind_out: &str) -> Option<u64> {
    callgrind_out
        .lines()
        .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
}

/// One lane's count, as the report shows it.
struct Row {
    lane: &'static str,
    what: String,
    baseline: &'static str,
    per_request: u64,
}

fn render(rows: &[Row], build: &str) -> String {
    let mut md = String::from("# Instructions per request (callgrind)\n\n");
    md.push_str(
        "User-space instructions of one keep-alive request or unary gRPC call (1 KiB response \
         unless the lane says otherwise), client and backend included; the last column takes \
         away the count of the same request without proxies (the lane named in brackets), \
         which leaves the proxies' own. Kernel work is not counted.\n\n",
    );
    let _ = writeln!(md, "Harness: {build}.\n");
    md.push_str("| lane | path | instructions per request | proxies' share |\n| --- | --- | ---: | ---: |\n");
    for row in rows {
        let Row { lane, what, baseline, per_request: n } = row;
        let proxies = match rows.iter().find(|r| r.lane == *baseline) {
            _ if lane == baseline => "-".to_owned(),
            Some(base) => format!("{} ({baseline})", n.saturating_sub(base.per_request)),
            None => format!("no {baseline} lane"),
        };
        let _ = writeln!(md, "| {lane} | {what} | {n} | {proxies} |");
    }
    md
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_total_from_a_callgrind_file() {
        let out = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 195143071\n\nfl=(1)\ntotals: 195143071\n";
        assert_eq!(super::summary(out), Some(195_143_071));
        assert_eq!(super::summary("events: Ir\n"), None);
    }

    #[test]
    fn the_proxies_share_is_each_lane_less_its_baseline() {
        use super::Row;
        let row = |lane, baseline, per_request| Row { lane, what: "w".into(), baseline, per_request };
        let rows = [
            row("direct", "direct", 25_000),
            row("l7-cross", "direct", 103_000),
            row("grpc-direct", "grpc-direct", 40_000),
            row("grpc-cross", "grpc-direct", 130_000),
            row("orphan", "missing", 1),
        ];
        let md = super::render(&rows, "a build");
        assert!(md.contains("Harness: a build."), "{md}");
        assert!(md.contains("| direct | w | 25000 | - |"), "{md}");
        assert!(md.contains("| l7-cross | w | 103000 | 78000 (direct) |"), "{md}");
        assert!(md.contains("| grpc-direct | w | 40000 | - |"), "{md}");
        assert!(md.contains("| grpc-cross | w | 130000 | 90000 (grpc-direct) |"), "{md}");
        assert!(md.contains("| orphan | w | 1 | no missing lane |"), "{md}");
    }

    #[test]
    fn every_count_s_baseline_is_counted_first() {
        let counts = super::counts();
        for (i, count) in counts.iter().enumerate() {
            let base = counts.iter().position(|c| c.lane == count.lane.baseline());
            assert!(
                base.is_some_and(|b| b <= i),
                "{}: its baseline comes later or not at all",
                count.label()
            );
        }
    }
}
