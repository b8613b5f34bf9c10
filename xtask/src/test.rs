//! `cargo xtask test`: every test of the workspace, with one closing count.

use std::io::{BufRead as _, BufReader};

use anyhow::Context as _;

pub fn run(extra: &[String]) -> anyhow::Result<()> {
    if std::env::var("GAMMARAY_REQUIRE_PRIVILEGED").as_deref() != Ok("1") {
        eprintln!("xtask: GAMMARAY_REQUIRE_PRIVILEGED is not 1: privileged tests skip (loudly) without root");
    }
    lint()?;
    // Build first, so compile output is not mixed into the test output we count.
    crate::cargo(&["build", "--tests", "--bins"])?;
    let mut cmd = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["test", "--no-fail-fast"]).args(extra);
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
    // The main job must keep working: run the demo once, as the README's first command would.
    println!("\nxtask: the demo (the README's first command) as a smoke test");
    if crate::agents::is_root() {
        match crate::demo::run() {
            Ok(()) => passed += 1,
            Err(err) => {
                eprintln!("xtask: the demo failed: {err:#}");
                failed += 1;
            }
        }
    } else if std::env::var("GAMMARAY_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("xtask: the demo needs root and GAMMARAY_REQUIRE_PRIVILEGED=1");
        failed += 1;
    } else {
        eprintln!("\n!!!!!!!! SKIP: the demo needs root !!!!!!!!\n");
        ignored += 1;
    }
    // The conformance catalogue on the real data path, one count per case.
    println!("\nxtask: the GAMMA conformance catalogue on the real data path");
    if crate::agents::is_root() {
        match crate::conformance::run(&crate::conformance::dir(None)) {
            Ok(s) => {
                passed += s.passed;
                failed += s.failed;
                ignored += s.skipped;
            }
            Err(err) => {
                eprintln!("xtask: the conformance run failed: {err:#}");
                failed += 1;
            }
        }
    } else if std::env::var("GAMMARAY_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("xtask: the conformance runner needs root and GAMMARAY_REQUIRE_PRIVILEGED=1");
        failed += 1;
    } else {
        eprintln!("\n!!!!!!!! SKIP: the conformance runner needs root !!!!!!!!\n");
        ignored += 1;
    }
    // The benchmark harness, in its quick mode: it must keep working; its numbers are reported,
    // never asserted.
    println!("\nxtask: the benchmarks, quick mode (numbers reported, not asserted)");
    if crate::agents::is_root() {
        match crate::bench::run(true, false) {
            Ok(()) => passed += 1,
            Err(err) => {
                eprintln!("xtask: the benchmark harness failed: {err:#}");
                failed += 1;
            }
        }
    } else if std::env::var("GAMMARAY_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("xtask: the benchmarks need root and GAMMARAY_REQUIRE_PRIVILEGED=1");
        failed += 1;
    } else {
        eprintln!("\n!!!!!!!! SKIP: the benchmarks need root !!!!!!!!\n");
        ignored += 1;
    }
    println!();
    println!("{passed} passed, {failed} failed, {ignored} skipped");
    anyhow::ensure!(status.success() && failed == 0, "tests failed");
    Ok(())
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
