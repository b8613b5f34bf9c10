//! gammaray's node proxy. Connections that the eBPF program steers here arrive on the outbound
//! listener; the proxy recovers where each one was going through an [`orig_dst::OrigDstLookup`]
//! (the agent implements it over the kernel's map) and carries it there.
//!
//! Routing is decided by [`route`], a pure module over an immutable [`snapshot::Snapshot`]
//! that the agent's translation builds from Kubernetes objects.
#![forbid(unsafe_code)]

mod cork;
pub mod hbone;
pub mod http;
pub mod identity;
pub mod local;
pub mod logfmt;
pub mod orig_dst;
pub mod outbound;
mod readahead;
pub mod route;
pub mod snapshot;
pub mod stats;
pub mod upstream;
