//! Every map of the eBPF object, declared once. Names, keys and values come from
//! `gammaray-common`; the statics are named like the map names it exports.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
};
use gammaray_common::{
    COUNTERS_LEN, ClientKey, Config, ENROLLED_MAX_ENTRIES, Enrolled, InboundPod, ORIG_MAX_ENTRIES, OrigDst,
};

#[map]
pub static GR_ENROLLED: HashMap<u64, Enrolled> = HashMap::with_max_entries(ENROLLED_MAX_ENTRIES, 0);

#[map]
pub static GR_SOCK_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(ORIG_MAX_ENTRIES, 0);

#[map]
pub static GR_CLIENT_ORIG: LruHashMap<ClientKey, OrigDst> = LruHashMap::with_max_entries(ORIG_MAX_ENTRIES, 0);

#[map]
pub static GR_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
pub static GR_HEARTBEAT: Array<u64> = Array::with_max_entries(1, 0);

#[map]
pub static GR_INBOUND_PODS: HashMap<u32, InboundPod> = HashMap::with_max_entries(ENROLLED_MAX_ENTRIES, 0);

#[map]
pub static GR_INBOUND_SOCKS: SockHash<u32> = SockHash::with_max_entries(ENROLLED_MAX_ENTRIES, 0);

#[map]
pub static GR_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// Adds one to a per-CPU counter. Per-CPU slots need no atomics.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = GR_COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful lookup of this CPU's slot, which lives as
        // long as the map; no other CPU writes it and a program is not preempted on its CPU.
        unsafe { *slot += 1 };
    }
}

/// The node proxy's address, once the agent has written it.
#[inline(always)]
pub fn config() -> Option<Config> {
    let cfg = GR_CONFIG.get(0)?;
    if cfg.flags & gammaray_common::CONFIG_FLAG_ACTIVE == 0 {
        return None;
    }
    Some(*cfg)
}

/// Whether a node proxy said it was serving within the config's liveness window.
#[inline(always)]
pub fn proxy_alive(cfg: &Config) -> bool {
    let Some(beat) = GR_HEARTBEAT.get(0) else { return false };
    // SAFETY: the helper reads the kernel's monotonic clock and takes no arguments.
    let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_ns() };
    *beat != 0 && now.wrapping_sub(*beat) <= cfg.liveness_ns
}
