//! Named network namespaces (`/run/netns/NAME`), removed when their guard drops.

use std::{os::fd::AsFd as _, path::PathBuf, process::Command};

use nix::sched::{CloneFlags, setns};

use crate::{Error, Result};

/// Runs `ip ARGS`, turning a failure into an error that shows the command and its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

pub(crate) fn run(program: &str, args: &[&str]) -> Result<()> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Error::Command { command: command.clone(), detail: e.to_string() })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command { command, detail: String::from_utf8_lossy(&out.stderr).trim().to_owned() })
    }
}

/// A network namespace this process created; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `/run/netns/NAME` with loopback up.
    pub fn create(name: &str) -> Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.to_owned() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle on a namespace someone else created and will delete (never deleted by this
    /// handle).
    pub fn existing(name: &str) -> Borrowed {
        Borrowed(std::mem::ManuallyDrop::new(Self { name: name.to_owned() }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread inside this namespace and returns its result. Sockets created by
    /// `f` stay in this namespace wherever they are used afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file =
            std::fs::File::open(self.path()).map_err(|source| Error::Io { path: self.path(), source })?;
        let name = self.name.clone();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                        .map_err(|source| Error::Setns { name, source })?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Sets a sysctl inside this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value).map_err(|source| Error::Io { path: path.clone(), source }))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = ip(&["netns", "del", &self.name]) {
            eprintln!("testkit: cannot delete network namespace {}: {err}", self.name);
        }
    }
}

/// A namespace this handle does not own: it is not deleted when the handle drops.
pub struct Borrowed(std::mem::ManuallyDrop<Netns>);

impl std::ops::Deref for Borrowed {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.0
    }
}
