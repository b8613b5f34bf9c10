//! Profile-guided release builds of the agent: `cargo xtask release`, and what `cargo xtask
//! bench` measures unless told `--no-pgo`.
//!
//! The agent is built twice. The first build is instrumented (`-Cprofile-generate`), and its
//! request-cost harness (`agent/examples/request_cost.rs`: two nodes' proxies, a client and a
//! backend in one process on loopback) runs every lane that `--instructions` counts: a pod on
//! the same node and on another one, L4 and L7, with no access log and with it in text and in
//! JSON, 64 KiB responses, unary gRPC over h2c, POSTs with 16 KiB bodies, and a route with a
//! path rewrite and header filters. That records which branches and calls the
//! data path takes. The toolchain's llvm-profdata (the llvm-tools component, which
//! scripts/setup.sh installs) merges the records, and the second build (`-Cprofile-use`)
//! inlines and lays out the code by them: hot paths together, cold ones out of the way.
//!
//! The training needs no privileges and sends traffic only on loopback, so the image build
//! (deploy/Dockerfile) runs it too. Each build has a target directory of its own under
//! target/pgo: their compiler flags differ from the plain release build's, and sharing one
//! directory would rebuild every crate at each switch.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::instructions::counts;

/// Requests per lane in the training run: enough for the steady state to outweigh start-up
/// (certificates, handshakes), which the profile would otherwise overstate.
const TRAINING_REQUESTS: u64 = 3000;

/// Cargo's arguments for a release build of the agent's binary.
pub const AGENT_RELEASE_BUILD: [&str; 6] =
    ["build", "--release", "-p", "gammaray-agent", "--bin", "gammaray-agent"];

/// Cargo's arguments for a release build of the request-cost harness.
pub const HARNESS_RELEASE_BUILD: [&str; 6] =
    ["build", "--release", "-p", "gammaray-agent", "--example", "request_cost"];

/// The binaries of a profile-guided build.
pub struct Built {
    pub agent: PathBuf,
    pub harness: PathBuf,
}

/// Builds the agent and the request-cost harness with profile-guided optimisation, under
/// `target_dir`/pgo.
pub fn build(target_dir: &Path) -> anyhow::Result<Built> {
    let root = target_dir.join("pgo");
    let profiles = root.join("profiles");
    let profdata = llvm_profdata()?;

    println!("pgo: building the instrumented request-cost harness (release)");
    let generate = format!("-Cprofile-generate={}", profiles.display());
    cargo_with_flags(&root.join("generate"), &generate, &HARNESS_RELEASE_BUILD)?;
    let harness = root.join("generate/release/examples/request_cost");

    // The profile is named by what it comes from: the instrumented harness and the training
    // plan. The same pair gives the same file, so a later run trains nothing and rebuilds
    // nothing; a new pair is a new file, so a change of flags, which cargo rebuilds every crate
    // for: none keeps the layout of an older profile.
    let profile = root.join(format!("profile-{:016x}.profdata", training_key(&std::fs::read(&harness)?)));
    if profile.exists() {
        println!("pgo: {} was trained on this harness already", profile.display());
    } else {
        train(&harness, &profiles, &profdata, &profile)?;
    }
    for entry in std::fs::read_dir(&root)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "profdata") && path != profile {
            std::fs::remove_file(path)?;
        }
    }

    println!("pgo: building the agent and the harness with the profile (release)");
    let using = format!("-Cprofile-use={}", profile.display());
    cargo_with_flags(
        &root.join("use"),
        &using,
        // The agent's build arguments and the harness's target (`--example request_cost`).
        &[&AGENT_RELEASE_BUILD[..], &HARNESS_RELEASE_BUILD[4..]].concat(),
    )?;
    let built = Built {
        agent: root.join("use/release/gammaray-agent"),
        harness: root.join("use/release/examples/request_cost"),
    };
    for bin in [&built.agent, &built.harness] {
        anyhow::ensure!(bin.exists(), "{} is missing after the build", bin.display());
    }
    Ok(built)
}

/// A hash of the instrumented harness's bytes and of the training plan (lanes, log settings,
/// requests per lane).
fn training_key(harness: &[u8]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::hash::DefaultHasher::new();
    harness.hash(&mut hasher);
    TRAINING_REQUESTS.hash(&mut hasher);
    for count in counts() {
        (count.lane.name(), count.rust_log, count.json).hash(&mut hasher);
    }
    hasher.finish()
}

/// Runs the instrumented `harness` on every lane and merges the records into `profile`.
fn train(harness: &Path, profiles: &Path, profdata: &Path, profile: &Path) -> anyhow::Result<()> {
    // The build scripts were instrumented too and wrote their records here while they ran.
    if profiles.exists() {
        std::fs::remove_dir_all(profiles)?;
    }
    std::fs::create_dir_all(profiles)?;
    for count in counts() {
        println!("pgo: training on {}", count.label());
        let mut run = Command::new(harness);
        count.harness_args(&mut run, TRAINING_REQUESTS);
        run_checked(run, &format!("training run request_cost {}", count.label()))?;
    }
    let records = std::fs::read_dir(profiles)?.count();
    anyhow::ensure!(records > 0, "the training runs wrote no profile into {}", profiles.display());

    // Merged under a temporary name and renamed, so that an interrupted merge leaves no file
    // that a later run would take for a finished profile.
    let merged = profile.with_extension("merging");
    let mut merge = Command::new(profdata);
    merge.arg("merge").arg("-o").arg(&merged).arg(profiles);
    run_checked(merge, "llvm-profdata merge")?;
    std::fs::rename(&merged, profile)?;
    Ok(())
}

/// Runs `cmd` to its end, failing with `what` and its error output if it fails.
fn run_checked(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("{what}: {}", cmd.get_program().display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Runs cargo with `args` into `target_dir`, every crate compiled with `rustflags`.
fn cargo_with_flags(target_dir: &Path, rustflags: &str, args: &[&str]) -> anyhow::Result<()> {
    crate::cargo_quiet_with(
        args,
        &[("CARGO_TARGET_DIR", target_dir.as_os_str()), ("RUSTFLAGS", OsStr::new(rustflags))],
    )
}

/// The toolchain's own llvm-profdata: its profile format must be the one its LLVM reads.
fn llvm_profdata() -> anyhow::Result<PathBuf> {
    let rustc = |arg: &str| -> anyhow::Result<String> {
        let out = Command::new("rustc").arg(arg).output().context("rustc")?;
        anyhow::ensure!(out.status.success(), "rustc {arg}: {}", out.status);
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let sysroot = rustc("--print=sysroot")?;
    let version = rustc("-vV")?;
    let host =
        version.lines().find_map(|l| l.strip_prefix("host: ")).context("no host line in `rustc -vV`")?;
    let path = Path::new(sysroot.trim()).join("lib/rustlib").join(host.trim()).join("bin/llvm-profdata");
    anyhow::ensure!(
        path.exists(),
        "{} is missing: the toolchain's llvm-tools component is needed for a profile-guided build \
         (scripts/setup.sh installs it; `cargo xtask bench --no-pgo` builds without it)",
        path.display()
    );
    Ok(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_profile_key_follows_the_harness() {
        let key = super::training_key;
        assert_eq!(key(b"harness"), key(b"harness"), "the same harness finds its profile again");
        assert_ne!(key(b"harness"), key(b"harness, rebuilt"), "a changed harness trains anew");
    }
}
