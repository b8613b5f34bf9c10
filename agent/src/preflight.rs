//! What the node must offer before the agent can load anything, each checked with an error
//! that names what is missing and what to do.

use std::path::{Path, PathBuf};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "missing privilege: {missing} (the agent loads eBPF programs and attaches them to cgroups); \
         run as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN"
    )]
    Privilege { missing: String },
    #[error(
        "missing kernel BTF: {path} does not exist; the kernel must be built with \
         CONFIG_DEBUG_INFO_BTF=y"
    )]
    Btf { path: PathBuf },
    #[error(
        "missing cgroup2: no cgroup2 file system is mounted (looked in {mountinfo}); mount one, e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup/unified`, or pass --cgroup-root"
    )]
    NoCgroup2 { mountinfo: PathBuf },
    #[error("missing cgroup2: {path} is not a cgroup2 mount ({reason})")]
    NotCgroup2 { path: PathBuf, reason: String },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// Effective capabilities of this process, from /proc/self/status.
fn effective_caps() -> Result<u64, PreflightError> {
    let path = PathBuf::from("/proc/self/status");
    let status = std::fs::read_to_string(&path).map_err(|source| PreflightError::Read { path, source })?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0))
}

/// The capabilities the agent needs: CAP_BPF to load, CAP_NET_ADMIN for the socket programs,
/// CAP_SYS_ADMIN to enter network namespaces when enrolling them.
pub fn check_privileges() -> Result<(), PreflightError> {
    let caps = effective_caps()?;
    let missing: Vec<&str> =
        [(CAP_BPF, "CAP_BPF"), (CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")]
            .into_iter()
            .filter(|(bit, _)| caps & (1u64 << bit) == 0)
            .map(|(_, name)| name)
            .collect();
    if missing.is_empty() { Ok(()) } else { Err(PreflightError::Privilege { missing: missing.join(", ") }) }
}

pub fn check_btf(path: &Path) -> Result<(), PreflightError> {
    if path.exists() { Ok(()) } else { Err(PreflightError::Btf { path: path.to_owned() }) }
}

/// Finds the cgroup2 mount to attach at: one that shows the whole hierarchy (its root within
/// the file system is `/`, unlike a bind mount of a subtree), preferring the well-known places:
/// /sys/fs/cgroup/unified on a hybrid host, /sys/fs/cgroup on a pure v2 host.
pub fn detect_cgroup2(mountinfo: &Path) -> Result<PathBuf, PreflightError> {
    let text = std::fs::read_to_string(mountinfo)
        .map_err(|source| PreflightError::Read { path: mountinfo.to_owned(), source })?;
    let mounts = cgroup2_mounts(&text);
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .find_map(|w| mounts.iter().find(|m| m.as_path() == Path::new(w)))
        .or_else(|| mounts.first())
        .cloned()
        .ok_or_else(|| PreflightError::NoCgroup2 { mountinfo: mountinfo.to_owned() })
}

/// Mount points of whole cgroup2 hierarchies listed in a mountinfo text (proc(5) format).
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mut fields = left.split_whitespace().skip(3);
            let (root, mount_point) = (fields.next()?, fields.next()?);
            (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(mount_point.replace("\\040", " ")))
        })
        .collect()
}

/// Checks that a path given with --cgroup-root is a cgroup2 directory.
pub fn check_cgroup2(path: &Path) -> Result<(), PreflightError> {
    let controllers = path.join("cgroup.controllers");
    if controllers.exists() {
        Ok(())
    } else {
        Err(PreflightError::NotCgroup2 {
            path: path.to_owned(),
            reason: "it has no cgroup.controllers file".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
26 25 0:23 / /sys/fs/cgroup ro shared:8 - tmpfs tmpfs ro,mode=755
27 26 0:24 / /sys/fs/cgroup/unified rw shared:9 - cgroup2 cgroup2 rw
28 26 0:25 / /sys/fs/cgroup/cpu rw shared:10 - cgroup cgroup rw,cpu
";
    const PURE_V2: &str = "\
25 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
26 25 0:23 / /sys/fs/cgroup rw shared:8 - cgroup2 cgroup2 rw,nsdelegate
40 26 0:23 /kubepods /var/lib/x/cg rw shared:8 - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_unified_mount_on_a_hybrid_host() {
        assert_eq!(cgroup2_mounts(HYBRID), vec![PathBuf::from("/sys/fs/cgroup/unified")]);
    }

    #[test]
    fn finds_the_whole_hierarchy_on_a_pure_v2_host_not_a_bind_mount_of_a_subtree() {
        let dir = std::env::temp_dir().join(format!("gammaray-mountinfo-{}", std::process::id()));
        std::fs::write(&dir, PURE_V2).expect("write mountinfo");
        let found = detect_cgroup2(&dir).expect("a cgroup2 mount");
        std::fs::remove_file(&dir).expect("remove mountinfo");
        assert_eq!(found, PathBuf::from("/sys/fs/cgroup"));
    }

    #[test]
    fn no_cgroup2_names_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("gammaray-mountinfo-v1-{}", std::process::id()));
        std::fs::write(&dir, "28 26 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")
            .expect("write mountinfo");
        let err = detect_cgroup2(&dir).expect_err("no cgroup2 mount");
        std::fs::remove_file(&dir).expect("remove mountinfo");
        assert!(err.to_string().contains("missing cgroup2"), "{err}");
    }

    #[test]
    fn missing_btf_names_the_kernel_option() {
        let err = check_btf(Path::new("/nonexistent/vmlinux")).expect_err("no BTF");
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }
}
