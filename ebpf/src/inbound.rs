//! `sk_lookup`, attached to each enrolled pod's network namespace: an inbound TCP connection to
//! the pod that did not come from its node (the node proxy delivering mesh traffic, or the
//! kubelet's probes) is handed to the node proxy's listener inside the pod, which enforces the
//! pod's peer authentication and authorization policies before it connects on to the pod.
//!
//! The program runs when the kernel looks up the socket for a new connection, before any
//! listener of the pod: it picks the proxy's listener (`bpf_sk_assign`) or lets the lookup go
//! on as usual. With no proxy listener for the pod (no agent, or one starting), the connection
//! is refused unless the failure mode is `open` and the pod `permissive`.

use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use gammaray_common::{
    CONFIG_FLAG_FAIL_OPEN, COUNTER_CAPTURED, COUNTER_ERRORS, COUNTER_INBOUND_PASSED_NO_PROXY,
    COUNTER_INBOUND_REFUSED_NO_PROXY, INBOUND_FLAG_STRICT,
};

use crate::maps::{GR_INBOUND_PODS, GR_INBOUND_SOCKS, config, count};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn gr_inbound(ctx: SkLookupContext) -> u32 {
    steer(&ctx)
}

#[inline(always)]
fn steer(ctx: &SkLookupContext) -> u32 {
    // SAFETY: `lookup` is the kernel's context pointer for this invocation; the verifier checks
    // every field access against the context layout.
    let (family, protocol, local, remote) = unsafe {
        ((*ctx.lookup).family, (*ctx.lookup).protocol, (*ctx.lookup).local_ip4, (*ctx.lookup).remote_ip4)
    };
    if family != AF_INET || protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // SAFETY: a lookup in a hash map of plain values; the pointer is read at once.
    let Some(pod) = (unsafe { GR_INBOUND_PODS.get(&local) }).copied() else {
        return SK_PASS;
    };
    // The node's own connections (mesh traffic the proxy delivers, the kubelet's probes), the
    // pod's own, and loopback are never captured.
    if remote == pod.node_addr || remote == local || u32::from_be(remote) >> 24 == 127 {
        return SK_PASS;
    }
    match GR_INBOUND_SOCKS.redirect_sk_lookup(ctx, &local, 0) {
        Ok(()) => {
            count(COUNTER_CAPTURED);
            SK_PASS
        }
        Err(err) if err != -ENOENT => {
            // The pod's entry names a socket the kernel will not take: refuse rather than let
            // the connection past the proxy.
            count(COUNTER_ERRORS);
            SK_DROP
        }
        Err(_) => {
            let open = config().is_some_and(|c| c.flags & CONFIG_FLAG_FAIL_OPEN != 0);
            if open && pod.flags & INBOUND_FLAG_STRICT == 0 {
                count(COUNTER_INBOUND_PASSED_NO_PROXY);
                SK_PASS
            } else {
                count(COUNTER_INBOUND_REFUSED_NO_PROXY);
                SK_DROP
            }
        }
    }
}

const ENOENT: i32 = 2;
