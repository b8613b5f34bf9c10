//! `cargo xtask test`: every test of the workspace, with one closing count.

use std::io::{BufRead as _, BufReader};

use anyhow::Context as _;
use gammaray_testkit::privileged::Gate;

use crate::agents::{Build::AlreadyBuilt, Source};

pub fn run(extra: &[String]) -> anyhow::Result<()> {
    if std::env::var("GAMMARAY_REQUIRE_PRIVILEGED").as_deref() != Ok("1") {
        eprintln!("xtask: GAMMARAY_REQUIRE_PRIVILEGED is not 1: privileged tests skip (loudly) without root");
    }
    lint()?;
    // Build first, so compile output is not mixed into the test output we count (cargo test
    // builds the examples too).
    crate::cargo(&["build", "--tests", "--bins", "--examples"])?;
    let mut cmd = crate::cargo_command();
    cmd.args(["test", "--no-fail-fast"]).args(extra);
    if std::env::var("GAMMARAY_REQUIRE_APISERVER").as_deref() != Ok("1") {
        eprintln!(
            "xtask: GAMMARAY_REQUIRE_APISERVER is not 1: tests against a real API server skip (loudly) without their binaries (KUBEBUILDER_ASSETS)"
        );
    }
    cmd.stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("cargo test")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count(rest, " passed");
            failed += count(rest, " failed");
            ignored += count(rest, " ignored");
        }
    }
    let status = child.wait()?;
    let mut counts = Counts { passed, failed, skipped: ignored };
    // The harness `cargo xtask bench --instructions` counts in, natively and briefly: it
    // checks every response, so a pass means each lane's path works.
    let what = "the request-cost harness, each lane once (loopback, no root needed)";
    println!("\nxtask: {what}");
    counts.record(what, crate::instructions::check_harness().map(|()| (1, 0, 0)));
    // The main job must keep working: run the demo once, as the README's first command would,
    // and once with a real API server as its source. Then the conformance catalogue on the real
    // data path, one count per case, both ways (with the real server, route status goes through
    // the CRDs' validation).
    for source in [Source::Manifests, Source::Real] {
        let from = from(source);
        counts.step(&format!("the demo (the README's first command), {from}"), || {
            with_source(source, || crate::demo::run(AlreadyBuilt, source).map(|()| (1, 0, 0)))
        });
    }
    for source in [Source::Manifests, Source::Real] {
        let from = from(source);
        counts.step(&format!("the GAMMA conformance catalogue on the real data path, {from}"), || {
            with_source(source, || {
                crate::conformance::run(&crate::conformance::dir(None), AlreadyBuilt, source)
                    .map(|s| (s.passed, s.failed, s.skipped))
            })
        });
    }
    // The benchmark harness must keep working; its numbers are reported, never asserted.
    counts.step("the benchmarks, quick mode (numbers reported, not asserted)", || {
        crate::bench::run(true, false, AlreadyBuilt, false, &[]).map(|()| (1, 0, 0))
    });
    let Counts { passed, failed, skipped: ignored } = counts;
    println!();
    println!("{passed} passed, {failed} failed, {ignored} skipped");
    anyhow::ensure!(status.success() && failed == 0, "tests failed");
    Ok(())
}

/// Where a step's agents read the configuration from, as its name says it.
fn from(source: Source) -> &'static str {
    match source {
        Source::Manifests => "from a manifest directory",
        Source::Real => "from a real API server",
    }
}

/// Runs a step for `source`; one needing a real API server whose binaries are missing is a loud
/// SKIP, or a failure with `GAMMARAY_REQUIRE_APISERVER=1`.
fn with_source(
    source: Source,
    run: impl FnOnce() -> anyhow::Result<(u64, u64, u64)>,
) -> anyhow::Result<(u64, u64, u64)> {
    if source == Source::Real
        && gammaray_testkit::controlplane::require_apiserver("a step with a real API server").is_none()
    {
        return Ok((0, 0, 1));
    }
    run()
}

struct Counts {
    passed: u64,
    failed: u64,
    skipped: u64,
}

impl Counts {
    /// Runs a privileged step that returns its (passed, failed, skipped) counts: an error counts
    /// as one failure; without the privileges it fails in CI and skips, loudly, elsewhere.
    fn step(&mut self, what: &str, run: impl FnOnce() -> anyhow::Result<(u64, u64, u64)>) {
        println!("\nxtask: {what}");
        match gammaray_testkit::privileged::gate(what) {
            Gate::Run => self.record(what, run()),
            Gate::Fail(msg) => {
                eprintln!("xtask: {msg}");
                self.failed += 1;
            }
            Gate::Skip(line) => {
                eprintln!("{line}");
                self.skipped += 1;
            }
        }
    }

    /// Adds a step's (passed, failed, skipped) counts; an error counts as one failure.
    fn record(&mut self, what: &str, result: anyhow::Result<(u64, u64, u64)>) {
        match result {
            Ok((p, f, s)) => {
                self.passed += p;
                self.failed += f;
                self.skipped += s;
            }
            Err(err) => {
                eprintln!("xtask: {what} failed: {err:#}");
                self.failed += 1;
            }
        }
    }
}

/// Reads the number before `label` in a libtest summary such as "ok. 7 passed; 0 failed; …".
fn count(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find(|part| part.contains(label))
        .and_then(|part| part.split_whitespace().rev().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

pub fn lint() -> anyhow::Result<()> {
    crate::cargo(&["fmt", "--all", "--check"])?;
    crate::cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_libtest_summaries() {
        let s = "ok. 7 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.60s";
        assert_eq!(super::count(s, " passed"), 7);
        assert_eq!(super::count(s, " failed"), 1);
        assert_eq!(super::count(s, " ignored"), 2);
    }
}
