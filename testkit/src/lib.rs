//! The simulated cluster that gammaray's tests, demo and conformance runner stand on: nodes and
//! pods as network namespaces joined by veth, a cgroup per pod laid out as the kubelet lays it
//! out, processes started inside pods, and guards that remove everything even on panic.
//!
//! Every network namespace is named `gammaray-<pid>-<n>-…` and every cgroup
//! `gammaray-<pid>-<n>`, where `<pid>` is the creating process: [`sweep`] removes those whose
//! creator is gone, so a crashed run never poisons the next one.
#![forbid(unsafe_code)]

pub mod agent;
pub mod apiserver;
pub mod bpffs;
pub mod catalogue;
pub mod cgroup;
pub mod cluster;
pub mod controllers;
pub mod controlplane;
pub mod echo;
pub mod eventually;
pub mod http;
pub mod istio_echo;
pub mod lanes;
pub mod names;
pub mod netns;
pub mod objects;
pub mod privileged;
pub mod process;
pub mod scenarios;
pub mod signer;
pub mod sweep;

pub use cluster::{Cluster, Node, Pod};
pub use eventually::assert_eventually;
pub use privileged::require_privileged;

/// Errors from building the simulated cluster; each says which command or path failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot enter network namespace {name}: {source}")]
    Setns { name: String, source: nix::Error },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
