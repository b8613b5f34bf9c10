//! Privileged end-to-end tests: real network namespaces as nodes and pods, the real eBPF
//! programs loaded into this kernel by real agent processes. They need root; with
//! GAMMARAY_REQUIRE_PRIVILEGED=1 (CI) they fail instead of skipping.

mod authz;
mod hostile;
mod identity;
mod kubernetes;
mod lifecycle;
mod mtls;
mod redirect;
mod routing;
mod support;
mod upgrade;
