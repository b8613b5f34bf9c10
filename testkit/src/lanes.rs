//! The paths a request takes that gammaray measures, in one table: the timed benchmark
//! (`cargo xtask bench`) runs the lanes marked `timed` on the simulated cluster, and the
//! request-cost harness (`agent/examples/request_cost.rs`) runs those marked `counted`, for the
//! instruction counts (`cargo xtask bench --instructions`) and the profile-guided build's
//! training. A lane is named the same everywhere, and each is measured against its baseline:
//! the same requests without the proxies.

/// One path of requests.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Hash)]
pub enum Lane {
    DirectSame,
    L4Same,
    L7Same,
    DirectCross,
    L4Cross,
    L7Cross,
    FloorCross,
    GrpcDirect,
    GrpcCross,
    Direct64k,
    L7Cross64k,
    DirectPost,
    L7CrossPost,
    L7CrossFilters,
}

/// What the table says of a lane.
#[derive(Debug)]
pub struct Spec {
    pub lane: Lane,
    /// The lane's name on command lines, in reports and in the profile's training plan.
    pub name: &'static str,
    /// What the lane is, in the reports.
    pub label: &'static str,
    /// The same requests without the proxies, which this lane's figures are read against
    /// (itself for a baseline).
    pub baseline: Lane,
    /// Run by the timed benchmark.
    pub timed: bool,
    /// Run by the request-cost harness: counted and trained on.
    pub counted: bool,
}

/// Every lane; a baseline comes before the lanes measured against it.
pub const LANES: [Spec; 14] = [
    Spec {
        lane: Lane::DirectSame,
        name: "direct-same",
        label: "direct, same node",
        baseline: Lane::DirectSame,
        timed: true,
        counted: true,
    },
    Spec {
        lane: Lane::L4Same,
        name: "l4-same",
        label: "mesh L4, same node",
        baseline: Lane::DirectSame,
        timed: true,
        counted: false,
    },
    Spec {
        lane: Lane::L7Same,
        name: "l7-same",
        label: "mesh L7 (HTTPRoute), same node",
        baseline: Lane::DirectSame,
        timed: true,
        counted: true,
    },
    Spec {
        lane: Lane::DirectCross,
        name: "direct",
        label: "direct, cross node",
        baseline: Lane::DirectCross,
        timed: true,
        counted: true,
    },
    Spec {
        lane: Lane::L4Cross,
        name: "l4-cross",
        label: "mesh L4, cross node (mTLS)",
        baseline: Lane::DirectCross,
        timed: true,
        counted: true,
    },
    Spec {
        lane: Lane::L7Cross,
        name: "l7-cross",
        label: "mesh L7 (HTTPRoute 50/50), cross node (mTLS)",
        baseline: Lane::DirectCross,
        timed: true,
        counted: true,
    },
    Spec {
        lane: Lane::FloorCross,
        name: "floor",
        label: "floor: two plain TCP relays, cross node (no TLS, no HTTP)",
        baseline: Lane::DirectCross,
        timed: true,
        counted: false,
    },
    Spec {
        lane: Lane::GrpcDirect,
        name: "grpc-direct",
        label: "direct gRPC (h2c), cross node",
        baseline: Lane::GrpcDirect,
        timed: true,
        counted: true,
    },
    Spec {
        lane: Lane::GrpcCross,
        name: "grpc-cross",
        label: "mesh gRPC (GRPCRoute 50/50), cross node (mTLS)",
        baseline: Lane::GrpcDirect,
        timed: true,
        counted: true,
    },
    Spec {
        lane: Lane::Direct64k,
        name: "direct-64k",
        label: "direct, cross node, 64 KiB responses",
        baseline: Lane::Direct64k,
        timed: false,
        counted: true,
    },
    Spec {
        lane: Lane::L7Cross64k,
        name: "l7-cross-64k",
        label: "mesh L7 (HTTPRoute 50/50), cross node, 64 KiB responses",
        baseline: Lane::Direct64k,
        timed: false,
        counted: true,
    },
    Spec {
        lane: Lane::DirectPost,
        name: "direct-post",
        label: "direct, cross node, POSTs of a 16 KiB body",
        baseline: Lane::DirectPost,
        timed: false,
        counted: true,
    },
    Spec {
        lane: Lane::L7CrossPost,
        name: "l7-cross-post",
        label: "mesh L7 (HTTPRoute 50/50), cross node, POSTs of a 16 KiB body",
        baseline: Lane::DirectPost,
        timed: false,
        counted: true,
    },
    Spec {
        lane: Lane::L7CrossFilters,
        name: "l7-cross-filters",
        label: "mesh L7, cross node, a route matching path and header with a path rewrite and header filters",
        baseline: Lane::DirectCross,
        timed: false,
        counted: true,
    },
];

impl Lane {
    pub fn spec(self) -> &'static Spec {
        LANES.iter().find(|s| s.lane == self).expect("every lane is in the table")
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    pub fn label(self) -> &'static str {
        self.spec().label
    }

    pub fn baseline(self) -> Lane {
        self.spec().baseline
    }

    /// A lane without proxies (or relays), which others are measured against.
    pub fn is_direct(self) -> bool {
        self.baseline() == self
    }

    /// Through the floor's plain relays rather than the proxies.
    pub fn is_floor(self) -> bool {
        self == Lane::FloorCross
    }

    /// Through the node proxies.
    pub fn is_mesh(self) -> bool {
        !self.is_direct() && !self.is_floor()
    }

    /// Unary gRPC calls over HTTP/2 rather than HTTP/1.1 requests.
    pub fn is_grpc(self) -> bool {
        self.baseline() == Lane::GrpcDirect
    }

    /// The lanes the timed benchmark runs, in the table's order.
    pub fn timed() -> impl Iterator<Item = Lane> {
        LANES.iter().filter(|s| s.timed).map(|s| s.lane)
    }

    /// The lanes the request-cost harness runs, in the table's order.
    pub fn counted() -> impl Iterator<Item = Lane> {
        LANES.iter().filter(|s| s.counted).map(|s| s.lane)
    }

    /// The lane named `name`.
    pub fn parse(name: &str) -> Option<Lane> {
        LANES.iter().find(|s| s.name == name).map(|s| s.lane)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_whole_and_consistent() {
        for (i, spec) in LANES.iter().enumerate() {
            assert_eq!(Lane::parse(spec.name), Some(spec.lane), "{} is found by its name", spec.name);
            let baseline = spec.baseline.spec();
            assert!(baseline.baseline == baseline.lane, "{}'s baseline is a baseline", spec.name);
            let at = LANES.iter().position(|s| s.lane == spec.baseline).expect("baseline in the table");
            assert!(at <= i, "{}'s baseline comes first", spec.name);
            assert!(!spec.timed || baseline.timed, "{}: a timed lane's baseline is timed", spec.name);
            assert!(!spec.counted || baseline.counted, "{}: a counted lane's baseline is counted", spec.name);
            assert!(LANES.iter().filter(|s| s.name == spec.name).count() == 1, "{} is named once", spec.name);
        }
    }
}
