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

/// Program names as the object file names them (the functions in the eBPF crate).
pub const PROG_CONNECT4: &str = "gr_connect4";
pub const PROG_SOCKOPS: &str = "gr_sockops";

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
pub const COUNTERS_LEN: u32 = 4;

/// `Config::flags`: the config has been written (an all-zero array slot means "not yet").
pub const CONFIG_FLAG_ACTIVE: u32 = 1;

/// Value of the enrolled map. The key is the netns cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enrolled {
    /// Reserved for per-namespace options; zero today.
    pub flags: u32,
    pub _pad: u32,
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
}

const _: () = assert!(size_of::<Enrolled>() == 8);
const _: () = assert!(size_of::<OrigDst>() == 8);
const _: () = assert!(size_of::<ClientKey>() == 8);
const _: () = assert!(size_of::<Config>() == 16);

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
}
