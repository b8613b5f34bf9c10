//! Unique names for everything a test creates.

use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every network namespace and cgroup the testkit creates.
pub const PREFIX: &str = "gammaray";
/// Prefix of every veth the testkit creates (interface names are limited to 15 bytes).
pub const VETH_PREFIX: &str = "gr";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique on this machine while this process lives: `gammaray-<pid>-<n>`.
pub fn unique_run() -> String {
    format!("{PREFIX}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The Kubernetes "safe" alphabet of generated names (no vowels, no look-alikes).
pub const SAFE: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// A deterministic generated-name part of `len` characters from `seed` and `salt`, shaped like
/// the hashes and suffixes a cluster's controllers put in pod names.
pub fn generated(seed: &[u8], salt: u64, len: usize) -> String {
    let mut n = seed
        .iter()
        .fold(0xcbf2_9ce4_8422_2325 ^ salt, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    (0..len)
        .map(|_| {
            let c = SAFE[(n % SAFE.len() as u64) as usize];
            n /= SAFE.len() as u64;
            c as char
        })
        .collect()
}

/// The creating pid encoded in a testkit name, if it is one.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    rest.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_carry_their_creator() {
        let name = super::unique_run();
        assert_eq!(super::owner_pid(&name), Some(std::process::id()));
        assert_eq!(super::owner_pid(&format!("{name}-node1-pod3")), Some(std::process::id()));
        assert_eq!(super::owner_pid("cni-1234"), None);
        assert_ne!(super::unique_run(), super::unique_run());
    }
}
