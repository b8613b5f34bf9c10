//! Gate for tests that need root: they fail in CI (GAMMARAY_REQUIRE_PRIVILEGED=1) and print a
//! loud SKIP line elsewhere.

/// Whether a privileged step may run here.
pub enum Gate {
    Run,
    /// It cannot, and nothing requires it: the reason, for a loud SKIP line.
    Skip(String),
    /// It cannot, and CI (GAMMARAY_REQUIRE_PRIVILEGED=1) requires it: the reason.
    Fail(String),
}

/// The gate for the privileged step `name` (a test, the demo, the conformance run…).
pub fn gate(name: &str) -> Gate {
    let missing = missing_privileges();
    if missing.is_empty() {
        return Gate::Run;
    }
    let msg = format!("{name} cannot run: {}", missing.join("; "));
    if std::env::var("GAMMARAY_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
        Gate::Fail(format!("{msg} (GAMMARAY_REQUIRE_PRIVILEGED=1)"))
    } else {
        Gate::Skip(format!(
            "\n!!!!!!!! SKIP: {msg}. Run as root, or set GAMMARAY_REQUIRE_PRIVILEGED=1 to fail instead. !!!!!!!!\n"
        ))
    }
}

/// Returns whether the privileged test `name` can run. Panics when it cannot but CI requires
/// it; otherwise prints a SKIP line and returns false.
pub fn require_privileged(name: &str) -> bool {
    match gate(&format!("privileged test {name}")) {
        Gate::Run => true,
        Gate::Skip(line) => {
            eprintln!("{line}");
            false
        }
        Gate::Fail(msg) => panic!("{msg}"),
    }
}

/// What this machine lacks for the privileged parts (root, BTF, cgroup2, iproute2 and
/// nsenter); empty when nothing.
pub fn missing_privileges() -> Vec<String> {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("not root (needs CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)".to_owned());
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push("kernel BTF (/sys/kernel/btf/vmlinux) missing".to_owned());
    }
    if crate::cgroup::cgroup2_root().is_err() {
        missing.push("no cgroup2 mount".to_owned());
    }
    if which("ip").is_none() || which("nsenter").is_none() {
        missing.push("`ip` (iproute2) or `nsenter` (util-linux) not on PATH".to_owned());
    }
    missing
}

pub(crate) fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|p| p.is_file())
}
