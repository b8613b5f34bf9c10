//! cgroup2 directories for pods and nodes, emptied and removed when their guard drops.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{Error, Result};

/// The cgroup2 mount that shows the whole hierarchy (root `/` in mountinfo):
/// /sys/fs/cgroup/unified on hybrid hosts, /sys/fs/cgroup on pure v2.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| Error::Io { path: "/proc/self/mountinfo".into(), source })?;
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut fields = left.split_whitespace().skip(3);
            let (root, mount_point) = (fields.next()?, fields.next()?);
            (right.split_whitespace().next()? == "cgroup2" && root == "/").then(|| PathBuf::from(mount_point))
        })
        .next()
        .ok_or_else(|| Error::Other("no cgroup2 file system is mounted".into()))
}

/// A cgroup directory this process created, with everything below it.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `path` and any missing parents.
    pub fn create(path: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file a process writes its pid to, to join this cgroup.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Creates a child cgroup that is removed together with this one.
    pub fn child(&self, relative: &str) -> Result<PathBuf> {
        let path = self.path.join(relative);
        std::fs::create_dir_all(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        Ok(path)
    }
}

/// Kills every process below `path` and removes the directories, deepest first.
pub fn remove_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let kill = path.join("cgroup.kill");
    if kill.exists() {
        let _ = std::fs::write(&kill, "1");
    } else {
        kill_procs(path);
    }
    let mut dirs = Vec::new();
    collect_dirs(path, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    let deadline = Instant::now() + Duration::from_secs(5);
    for dir in dirs {
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // EBUSY while killed processes are still exiting.
                Err(_) if Instant::now() < deadline => {
                    kill_procs(&dir);
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => return Err(Error::Io { path: dir, source }),
            }
        }
    }
    Ok(())
}

fn kill_procs(dir: &Path) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn collect_dirs(path: &Path, out: &mut Vec<PathBuf>) {
    out.push(path.to_owned());
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(err) = remove_tree(&self.path) {
            eprintln!("testkit: cannot remove cgroup {}: {err}", self.path.display());
        }
    }
}
