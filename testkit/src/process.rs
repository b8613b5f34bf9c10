//! Processes started inside a pod or node: they join the cgroup first, then the network
//! namespace (with `nsenter --net`, which, unlike `ip netns exec`, leaves /sys and so the
//! cgroup2 mount visible).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{Error, Result};

/// A running process; SIGTERM, then SIGKILL after 5 s, when dropped.
#[derive(Debug)]
pub struct Process {
    child: Option<Child>,
    name: String,
}

/// Where a process runs.
pub struct Placement<'a> {
    pub netns: &'a Path,
    pub cgroup_procs: &'a Path,
}

impl Process {
    /// Starts `program args…` in `placement`, with `env` added, stdout and stderr to `log`
    /// (appended) or inherited.
    pub fn spawn(
        name: &str,
        placement: Placement<'_>,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: Option<&Path>,
    ) -> Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0" && ns="$1" && shift && exec nsenter --net="$ns" -- "$@""#)
            .arg(placement.cgroup_procs)
            .arg(placement.netns)
            .arg(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        if let Some(log) = log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|source| Error::Io { path: log.to_owned(), source })?;
            let file2 = file.try_clone().map_err(|source| Error::Io { path: log.to_owned(), source })?;
            cmd.stdout(file).stderr(file2);
        }
        let child = cmd.spawn().map_err(|e| Error::Command {
            command: format!("{} {}", program.display(), args.join(" ")),
            detail: e.to_string(),
        })?;
        Ok(Self { child: Some(child), name: name.to_owned() })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process has exited (and with what).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends SIGTERM, without waiting.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
    }

    /// SIGKILL, as an OOM kill or a crash ends a process: no clean-up of its own runs. Returns
    /// once it has exited.
    pub fn kill(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// Waits up to `timeout` for the process to exit: its status, or `None` if it still runs
    /// (it is then still this handle's to stop).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("testkit: {} did not stop within {grace:?}; killing it", self.name);
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The path of a binary built by cargo next to the running test binary (target/<profile>/).
pub fn cargo_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let dir = if dir.ends_with("deps") { dir.parent().expect("profile dir") } else { dir };
    dir.join(name)
}
