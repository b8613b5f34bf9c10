//! The agent's behaviour through its public API, one test binary: the node proxy in-process on
//! 127.0.0.1, the Kubernetes wiring against testkit's fake API server and a real kube-apiserver, `deploy/`'s manifests, and the
//! privileged end-to-end tests on the simulated cluster.

mod apiserver;
mod deploy;
mod hbone;
mod privileged;
mod proxy;
mod rbac;
mod signer;
