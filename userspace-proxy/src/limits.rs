//! How many connections the proxy holds at once: in all, and from one source address. A pod
//! that opens connections without end is refused past its share, so the node's other pods, and
//! the agent's own work, keep the descriptors they need.
//!
//! A connection is admitted with a [`Slot`], which gives its place back when it is dropped. A
//! refusal is counted by reason and source workload, and logged at most once a second per
//! reason.

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Instant,
};

use tracing::warn;

use crate::snapshot::FastMap;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The proxy holds its most connections.
    NodeLimit,
    /// The source address holds its most connections.
    SourceLimit,
}

impl Refusal {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::NodeLimit => "node_limit",
            Refusal::SourceLimit => "source_limit",
        }
    }
}

/// The counts one listener admits connections against.
#[derive(Debug)]
pub(crate) struct ConnLimits {
    max_total: usize,
    max_per_source: usize,
    total: AtomicUsize,
    per_source: Mutex<FastMap<IpAddr, usize>>,
    /// When a refusal was last logged, per reason.
    logged: [EverySecond; 2],
}

/// Says yes at most once a second: for log lines that a flood would otherwise repeat.
#[derive(Debug)]
pub(crate) struct EverySecond {
    /// Milliseconds since `started`, plus a second, when it last said yes (0: never).
    last: AtomicU64,
    started: Instant,
}

impl EverySecond {
    pub(crate) fn new() -> Self {
        Self { last: AtomicU64::new(0), started: Instant::now() }
    }

    pub(crate) fn should_log(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64 + 1000;
        let before = self.last.load(Relaxed);
        now.saturating_sub(before) >= 1000
            && self.last.compare_exchange(before, now, Relaxed, Relaxed).is_ok()
    }
}

impl ConnLimits {
    pub(crate) fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_source,
            total: AtomicUsize::new(0),
            per_source: Mutex::new(FastMap::default()),
            logged: [EverySecond::new(), EverySecond::new()],
        })
    }

    /// A place for a connection from `source`, or why there is none.
    pub(crate) fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Slot, Refusal> {
        if self.total.fetch_add(1, Relaxed) >= self.max_total {
            self.total.fetch_sub(1, Relaxed);
            return Err(Refusal::NodeLimit);
        }
        let mut per_source = self.per_source.lock().expect("limits lock");
        let held = per_source.entry(source).or_insert(0);
        if *held >= self.max_per_source {
            drop(per_source);
            self.total.fetch_sub(1, Relaxed);
            return Err(Refusal::SourceLimit);
        }
        *held += 1;
        Ok(Slot { limits: self.clone(), source })
    }

    /// Whether a refusal for `reason` should be logged now: at most once a second per reason,
    /// so a flood of refusals costs a line a second, not a line each.
    pub(crate) fn should_log(&self, refusal: Refusal) -> bool {
        self.logged[refusal as usize].should_log()
    }

    /// Connections held now.
    pub(crate) fn held(&self) -> usize {
        self.total.load(Relaxed)
    }
}

/// One admitted connection's place; dropping it frees the place.
pub(crate) struct Slot {
    limits: Arc<ConnLimits>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_source = self.limits.per_source.lock().expect("limits lock");
        if let Some(held) = per_source.get_mut(&self.source) {
            *held -= 1;
            if *held == 0 {
                per_source.remove(&self.source);
            }
        }
        drop(per_source);
        self.limits.total.fetch_sub(1, Relaxed);
    }
}

/// Logs a refusal, at most once a second per reason.
/// Counts a connection refused at a limit (`gammaray_limited{listener, reason, source}`,
/// `source` naming the client's workload) and logs it, at most once a second per reason.
pub(crate) fn refused(
    stats: &crate::stats::OutboundStats,
    limits: &ConnLimits,
    refusal: Refusal,
    peer: IpAddr,
    listener: &'static str,
    source: String,
) {
    stats
        .limited
        .get_or_create(&crate::stats::LimitLabels { listener, reason: refusal.reason(), source })
        .inc();
    if limits.should_log(refusal) {
        warn!(source = %peer, listener, reason = refusal.reason(), held = limits.held(), "connection refused at its limit (logged at most once a second)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_share_and_the_node_its_total_and_places_come_back() {
        let limits = ConnLimits::new(5, 3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"));
        let mut held: Vec<Slot> = (0..3).map(|_| limits.admit(a).expect("within a's share")).collect();
        assert_eq!(limits.admit(a).err(), Some(Refusal::SourceLimit));
        held.push(limits.admit(b).expect("b has its own share"));
        held.push(limits.admit(b).expect("b has its own share"));
        assert_eq!(limits.admit(b).err(), Some(Refusal::NodeLimit), "five in all");
        assert_eq!(limits.held(), 5);
        held.truncate(2);
        assert_eq!(limits.held(), 2, "dropped slots give their places back");
        assert!(limits.admit(a).is_ok(), "a has room again");
        drop(held);
        assert!(limits.per_source.lock().expect("lock").len() <= 1, "emptied sources are forgotten");
    }

    #[test]
    fn refusals_are_logged_at_most_once_a_second_per_reason() {
        let limits = ConnLimits::new(1, 1);
        assert!(limits.should_log(Refusal::NodeLimit));
        assert!(!limits.should_log(Refusal::NodeLimit), "not again within the second");
        assert!(limits.should_log(Refusal::SourceLimit), "each reason on its own");
    }
}
