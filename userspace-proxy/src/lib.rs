//! gammaray's node proxy. Connections that the eBPF program steers here arrive on the outbound
//! listener; the proxy recovers where each one was going through an [`orig_dst::OrigDstLookup`]
//! (the agent implements it over the kernel's map) and carries it there.
//!
//! [`Proxy::start`] is the one way to run it, from a [`ProxyConfig`]. Routing is decided by
//! [`route`], a pure module over an immutable [`snapshot::Snapshot`] that the agent's
//! translation builds from Kubernetes objects.
#![forbid(unsafe_code)]

pub mod authz;
mod capture;
mod config;
mod cork;
mod hbone;
mod http;
pub mod identity;
mod limits;
mod local;
mod logfmt;
pub mod orig_dst;
mod outbound;
mod proxy;
mod readahead;
pub mod route;
pub mod snapshot;
pub mod stats;
mod upstream;

pub use config::{DEFAULT_HBONE_PORT, H2Config, ProxyConfig};
pub use proxy::{Capture, Drained, Inputs, Proxy, ProxyError};
