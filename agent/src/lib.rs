//! gammaray's per-node agent: checks the node can run the mesh, loads and attaches the eBPF
//! programs, enrols pods' network namespaces, forwards the kernel's log lines, and runs the
//! node proxy in-process on its own runtime.

pub mod admin;
pub mod authz;
pub mod cli;
pub mod control;
pub mod describe;
pub mod ebpf;
pub mod enrolment;
pub mod generation;
pub mod kube_client;
pub mod kube_source;
pub mod logging;
pub mod manifests;
pub mod memory;
pub mod netns;
pub mod node_ca;
pub mod preflight;
pub mod run;
pub mod signer;
pub mod status_writer;
pub mod store;
pub mod translate;
