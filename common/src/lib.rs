//! The kernel/user ABI of gammaray: the only definition of the eBPF maps' keys, values and
//! names, shared by the `no_std` eBPF programs and the agent that loads them.
//!
//! Every type is `#[repr(C)]`, `Copy`, made of fixed-width integers with explicit padding, and
//! has its size checked at compile time, so both sides agree byte for byte.
#![no_std]
#![cfg_attr(not(feature = "user"), forbid(unsafe_code))]

use core::mem::size_of;

/// Map of enrolled network namespaces: netns cookie (`u64`) → [`Enrolled`].
pub const MAP_ENROLLED: &str = "GR_ENROLLED";
/// LRU map: socket cookie (`u64`) → [`OrigDst`], written at connect(), read at ESTABLISHED.
pub const MAP_SOCK_ORIG: &str = "GR_SOCK_ORIG";
/// LRU map: [`ClientKey`] → [`OrigDst`], written at ESTABLISHED, deleted by the proxy on lookup.
pub const MAP_CLIENT_ORIG: &str = "GR_CLIENT_ORIG";
/// Array of one [`Config`].
pub const MAP_CONFIG: &str = "GR_CONFIG";
/// Per-CPU array of `u64` counters, indexed by the `COUNTER_*` constants.
pub const MAP_COUNTERS: &str = "GR_COUNTERS";
/// Array of one `u64`: the `CLOCK_MONOTONIC` time, in nanoseconds, at which a node proxy last
/// said it was serving. Every agent on the node writes it while its proxy accepts.
pub const MAP_HEARTBEAT: &str = "GR_HEARTBEAT";

/// Hash map: an enrolled pod's IPv4 address (`u32`, network byte order) → [`InboundPod`]:
/// which inbound connections to it the node proxy captures.
pub const MAP_INBOUND_PODS: &str = "GR_INBOUND_PODS";
/// Socket hash: an enrolled pod's IPv4 address (`u32`, network byte order) → the node proxy's
/// listening socket inside that pod's network namespace. An entry goes when its socket closes.
pub const MAP_INBOUND_SOCKS: &str = "GR_INBOUND_SOCKS";

/// Every map of the object, in the order the agent pins them.
pub const MAPS: [&str; 8] = [
    MAP_ENROLLED,
    MAP_SOCK_ORIG,
    MAP_CLIENT_ORIG,
    MAP_CONFIG,
    MAP_COUNTERS,
    MAP_HEARTBEAT,
    MAP_INBOUND_PODS,
    MAP_INBOUND_SOCKS,
];

/// The version of this ABI: the maps' names, types, keys and values. Pinned maps live in a
/// directory named after it, so an agent of another version never opens them; bump it with
/// any change to a map or to what a value means.
pub const ABI_VERSION: u32 = 3;

/// Program names as the object file names them (the functions in the eBPF crate).
pub const PROG_CONNECT4: &str = "gr_connect4";
pub const PROG_SOCKOPS: &str = "gr_sockops";
/// The `sk_lookup` program, attached to each enrolled pod's network namespace.
pub const PROG_INBOUND: &str = "gr_inbound";

/// Capacity of the enrolled-netns map: pods per node, with room.
pub const ENROLLED_MAX_ENTRIES: u32 = 4096;
/// Capacity of the two original-destination maps. Entries live from connect() until the proxy
/// accepts, so this bounds connections in flight, not connections open.
pub const ORIG_MAX_ENTRIES: u32 = 65536;

/// Connections whose destination was rewritten to the node proxy.
pub const COUNTER_REDIRECTED: u32 = 0;
/// Connections from enrolled namespaces left alone (loopback, the proxy itself, not TCP).
pub const COUNTER_SKIPPED: u32 = 1;
/// Established redirected sockets whose original destination was not found by socket cookie.
pub const COUNTER_LOOKUP_MISSES: u32 = 2;
/// Map updates that failed in the kernel (the connection goes on unredirected or unrecorded).
pub const COUNTER_ERRORS: u32 = 3;
/// Connections of enrolled namespaces refused because no node proxy was alive (failure mode
/// `closed`).
pub const COUNTER_REFUSED_NO_PROXY: u32 = 4;
/// Connections of enrolled namespaces let through directly because no node proxy was alive
/// (failure mode `open`).
pub const COUNTER_PASSED_NO_PROXY: u32 = 5;
/// Inbound connections to enrolled pods handed to the node proxy's listener in the pod.
pub const COUNTER_CAPTURED: u32 = 6;
/// Inbound connections to enrolled pods refused because no node proxy listened in the pod
/// (failure mode `closed`, or the pod's peer authentication is `strict`).
pub const COUNTER_INBOUND_REFUSED_NO_PROXY: u32 = 7;
/// Inbound connections to enrolled pods let through uncaptured because no node proxy listened
/// in the pod (failure mode `open` and the pod `permissive`).
pub const COUNTER_INBOUND_PASSED_NO_PROXY: u32 = 8;
pub const COUNTERS_LEN: u32 = 9;

/// `Config::flags`: the config has been written (an all-zero array slot means "not yet").
pub const CONFIG_FLAG_ACTIVE: u32 = 1;
/// `Config::flags`: with no live node proxy, enrolled connections go directly (`open`)
/// instead of being refused (`closed`, the flag unset).
pub const CONFIG_FLAG_FAIL_OPEN: u32 = 2;

/// Value of the enrolled map. The key is the netns cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enrolled {
    /// Reserved for per-namespace options; zero today.
    pub flags: u32,
    pub _pad: u32,
}

/// `InboundPod::flags`: the pod's peer authentication is `strict`.
pub const INBOUND_FLAG_STRICT: u32 = 1;

/// Value of the inbound-pods map. The key is the pod's IPv4 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundPod {
    /// The address the node's own connections to the pod come from (the node proxy's and the
    /// kubelet's probes), network byte order: never captured.
    pub node_addr: u32,
    /// `INBOUND_FLAG_*` bits.
    pub flags: u32,
}

/// A TCP/IPv4 destination as the kernel sees it: both fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigDst {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// The client end of a redirected connection as the proxy sees it on accept: both fields in
/// network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// The one entry of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The node proxy's outbound listener, network byte order.
    pub proxy_addr: u32,
    /// Its port, network byte order.
    pub proxy_port: u16,
    pub _pad: u16,
    /// `CONFIG_FLAG_*` bits.
    pub flags: u32,
    pub _pad2: u32,
    /// A heartbeat older than this many nanoseconds means no node proxy is alive.
    pub liveness_ns: u64,
}

const _: () = assert!(size_of::<Enrolled>() == 8);
const _: () = assert!(size_of::<OrigDst>() == 8);
const _: () = assert!(size_of::<ClientKey>() == 8);
const _: () = assert!(size_of::<Config>() == 24);
const _: () = assert!(size_of::<InboundPod>() == 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers with explicit padding
    // fields, so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::Enrolled {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClientKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InboundPod {}
}
