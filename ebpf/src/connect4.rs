//! `cgroup/connect4`: rewrite the destination of an enrolled namespace's TCP connect to the
//! node proxy, keeping the original destination by socket cookie.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_netns_cookie, generated::bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::{debug, warn};
use gammaray_common::{
    CONFIG_FLAG_FAIL_OPEN, COUNTER_ERRORS, COUNTER_PASSED_NO_PROXY, COUNTER_REDIRECTED,
    COUNTER_REFUSED_NO_PROXY, COUNTER_SKIPPED, OrigDst,
};

use crate::maps::{GR_ENROLLED, GR_SOCK_ORIG, config, count, proxy_alive};

const ALLOW: i32 = 1;
/// The connect() fails at once with EPERM.
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn gr_connect4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx)
}

/// The verdict on one connect(): refused only when the namespace is enrolled, no node proxy
/// is alive and the failure mode is `closed`.
#[inline(always)]
fn redirect(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the helper takes the program's own context, which the kernel hands us valid.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if GR_ENROLLED.get_ptr(&netns).is_none() {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    // SAFETY: `sock_addr` is the kernel's context pointer for this invocation; the verifier
    // checks every field access against the context layout.
    let (kind, protocol, dst_addr, dst_port) =
        unsafe { ((*sa).type_, (*sa).protocol, (*sa).user_ip4, (*sa).user_port as u16) };
    if kind != SOCK_STREAM || protocol != IPPROTO_TCP {
        count(COUNTER_SKIPPED);
        return ALLOW;
    }
    let Some(cfg) = config() else {
        warn!(ctx, "enrolled netns {} connects before the proxy address is configured", netns);
        count(COUNTER_SKIPPED);
        return ALLOW;
    };
    let first_octet = u32::from_be(dst_addr) >> 24;
    if first_octet == 127 || dst_addr == 0 || (dst_addr == cfg.proxy_addr && dst_port == cfg.proxy_port) {
        count(COUNTER_SKIPPED);
        return ALLOW;
    }
    if !proxy_alive(&cfg) {
        if cfg.flags & CONFIG_FLAG_FAIL_OPEN != 0 {
            count(COUNTER_PASSED_NO_PROXY);
            return ALLOW;
        }
        count(COUNTER_REFUSED_NO_PROXY);
        return REFUSE;
    }
    // SAFETY: as above; the helper reads the socket behind this context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst { addr: dst_addr, port: dst_port, _pad: 0 };
    if let Err(err) = GR_SOCK_ORIG.insert(&cookie, &orig, 0) {
        // Without a record the proxy could not route the connection: leave it alone.
        warn!(ctx, "cannot record original destination of socket {}: error {}", cookie, err);
        count(COUNTER_ERRORS);
        return ALLOW;
    }
    // SAFETY: user_ip4 and user_port are writable in connect4 programs (4-byte writes).
    unsafe {
        (*sa).user_ip4 = cfg.proxy_addr;
        (*sa).user_port = u32::from(cfg.proxy_port);
    }
    count(COUNTER_REDIRECTED);
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    debug!(
        ctx,
        "redirect pid={} dst={:i}:{} proxy={:i}:{}",
        pid,
        u32::from_be(dst_addr),
        u16::from_be(dst_port),
        u32::from_be(cfg.proxy_addr),
        u16::from_be(cfg.proxy_port)
    );
    ALLOW
}
