//! `sockops`: when a redirected connection reaches ESTABLISHED on the client side, move its
//! original destination from the socket-cookie map to the (client ip, client port) map, which
//! is what the proxy can compute from `accept()`. The client side reaches ESTABLISHED before
//! it sends the final ACK, so the entry exists before the proxy can accept the connection.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::warn;
use gammaray_common::{COUNTER_ERRORS, COUNTER_LOOKUP_MISSES, ClientKey};

use crate::maps::{GR_CLIENT_ORIG, GR_ENROLLED, GR_SOCK_ORIG, config, count};

const ALLOW: u32 = 1;
const AF_INET: u32 = 2;

#[sock_ops]
pub fn gr_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && ctx.family() == AF_INET {
        rekey(&ctx);
    }
    ALLOW
}

#[inline(always)]
fn rekey(ctx: &SockOpsContext) {
    let Some(cfg) = config() else { return };
    // sock_ops exposes the remote port in network byte order in the upper 16 bits.
    let remote_port = (ctx.remote_port() >> 16) as u16;
    if ctx.remote_ip4() != cfg.proxy_addr || remote_port != cfg.proxy_port {
        return;
    }
    // SAFETY: the helpers take the program's own context, which the kernel hands us valid.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if GR_ENROLLED.get_ptr(&netns).is_none() {
        return;
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = GR_SOCK_ORIG.get_ptr(&cookie) else {
        // A pod dialling the proxy address itself lands here too; both are worth a look.
        warn!(ctx, "established socket {} to the proxy has no original destination", cookie);
        count(COUNTER_LOOKUP_MISSES);
        return;
    };
    // SAFETY: the pointer comes from a successful lookup and is read before any map update.
    let orig = unsafe { *orig };
    // local_port is in host byte order in sock_ops; the key holds network byte order.
    let key = ClientKey { addr: ctx.local_ip4(), port: (ctx.local_port() as u16).to_be(), _pad: 0 };
    if let Err(err) = GR_CLIENT_ORIG.insert(&key, &orig, 0) {
        warn!(ctx, "cannot re-key original destination of socket {}: error {}", cookie, err);
        count(COUNTER_ERRORS);
    }
    let _ = GR_SOCK_ORIG.remove(&cookie);
}
