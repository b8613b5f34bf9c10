//! gammaray's kernel side. `connect4` steers the outbound TCP connections of enrolled network
//! namespaces to the node proxy and remembers where they were going (or, when no proxy is
//! alive, refuses them or lets them through, as the failure mode says); `sockops` re-keys that
//! memory by the client's address once the connection is established, so the proxy can find it
//! from `accept()`'s peer address. Every program returns "allow" on every other path: a fault in
//! the mesh (a full map, a missing config) must never become an error for a pod's `connect()`;
//! only the `closed` failure mode refuses, and only while no proxy is alive.
#![no_std]
#![no_main]

mod connect4;
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
