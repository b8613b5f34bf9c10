//! gammaray's kernel side. `connect4` steers the outbound TCP connections of enrolled network
//! namespaces to the node proxy and remembers where they were going (or, when no proxy is
//! alive, refuses them or lets them through, as the failure mode says); `sockops` re-keys that
//! memory by the client's address once the connection is established, so the proxy can find it
//! from `accept()`'s peer address; `inbound` hands the connections to an enrolled pod that did
//! not come from its node to the node proxy's listener inside the pod.
//!
//! Outbound, every path but the `closed` failure mode's allows: a fault in the mesh (a full
//! map, a missing config) never becomes an error for a pod's `connect()`. Inbound, a connection
//! the proxy should see but cannot is refused unless the pod is `permissive` and the failure
//! mode `open`: a fault never lets a connection past the pod's policies.
#![no_std]
#![no_main]

mod connect4;
mod inbound;
mod maps;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never entered at run time.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
