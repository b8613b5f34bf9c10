//! Removal of what crashed runs left behind: network namespaces and cgroups named
//! `gammaray-<pid>-…` whose creating process is gone, and their bpf file systems.

use crate::{cgroup, names, netns::ip};

/// Removes leftovers of dead runs; returns how many namespaces and cgroups it removed.
pub fn sweep() -> usize {
    let mut removed = 0;
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_orphan(&name) && ip(&["netns", "del", &name]).is_ok() {
                removed += 1;
            }
        }
    }
    if let Ok(root) = cgroup::cgroup2_root()
        && let Ok(entries) = std::fs::read_dir(&root)
    {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_orphan(&name) && cgroup::remove_tree(&entry.path()).is_ok() {
                removed += 1;
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(crate::bpffs::ROOT) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_orphan(&name) && crate::bpffs::unmount(&entry.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed + crate::controlplane::sweep()
}

fn is_orphan(name: &str) -> bool {
    names::owner_pid(name).is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
}

/// Testkit namespaces and cgroups that exist now whose name starts with `prefix`.
pub fn leftovers(prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        found.extend(
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix)),
        );
    }
    if let Ok(root) = cgroup::cgroup2_root()
        && let Ok(entries) = std::fs::read_dir(&root)
    {
        found.extend(
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .map(|n| format!("cgroup {n}")),
        );
    }
    if let Ok(entries) = std::fs::read_dir(crate::bpffs::ROOT) {
        found.extend(
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .map(|n| format!("bpffs {n}")),
        );
    }
    found
}
