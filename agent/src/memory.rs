//! Memory the agent has freed goes back to the kernel. glibc keeps freed heap for reuse, so
//! after a configuration rebuild, or a burst of connections or large responses, the agent's
//! RSS would stay at its high-water mark. The sources hand it back after each rebuild; a task
//! watches RSS and hands it back when it has grown well past what it was after the last time.

use std::time::Duration;

/// Hands freed heap back to the kernel.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap bookkeeping; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How far RSS may grow past its level after the last trim before the next one.
const SLACK: u64 = 8 << 20;

/// Whether to trim now, with RSS at `now` and `after_last` after the last trim (bytes).
fn should_trim(now: u64, after_last: u64) -> bool {
    now > after_last.saturating_add(SLACK)
}

/// This process's resident set, in bytes, from /proc.
fn rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Every `interval`, trims when RSS has grown more than [`SLACK`] past its level after the last
/// trim (a burst that has ended leaves that much free heap), until the task is dropped. Trimming
/// while the burst still runs costs a walk of the heap and returns little; the next look, after
/// it ends, returns the rest.
pub async fn trim_after_bursts(interval: Duration) {
    let mut after_last = rss().unwrap_or(0);
    loop {
        tokio::time::sleep(interval).await;
        let Some(now) = rss() else { return };
        if should_trim(now, after_last) {
            release_freed_memory();
            after_last = rss().unwrap_or(now);
            tracing::debug!(before = now, after = after_last, "freed heap handed back");
        } else {
            after_last = after_last.min(now);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn trims_only_after_growth_past_the_slack() {
        let mib = 1 << 20;
        assert!(!super::should_trim(20 * mib, 20 * mib));
        assert!(!super::should_trim(28 * mib, 20 * mib), "within the slack");
        assert!(super::should_trim(29 * mib, 20 * mib));
    }

    #[test]
    fn reads_its_own_rss() {
        let rss = super::rss().expect("/proc/self/statm");
        assert!(rss > 1 << 20, "a running test process holds more than a MiB: {rss}");
    }
}
