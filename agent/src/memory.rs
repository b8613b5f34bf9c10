//! Memory the agent has freed goes back to the kernel. glibc keeps freed heap for reuse, so
//! after a configuration rebuild, or a burst of connections or large responses, the agent's
//! RSS would stay at its high-water mark. The sources hand it back after each rebuild; a task
//! watches how much freed heap glibc holds and hands it back when that has grown well past what
//! it held after the last time.

use std::time::Duration;

/// Hands freed heap back to the kernel.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap bookkeeping; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How far the freed heap may grow past its level after the last trim before the next one.
const SLACK: u64 = 8 << 20;

/// Whether to trim now, with `now` bytes of freed heap held and `after_last` held after the last
/// trim.
fn should_trim(now: u64, after_last: u64) -> bool {
    now > after_last.saturating_add(SLACK)
}

/// The bytes glibc holds freed, in every arena (trimmed pages count too: they stay on its free
/// lists, not resident).
fn freed_heap() -> u64 {
    // SAFETY: mallinfo2 only reads glibc's heap bookkeeping; it has no preconditions.
    let info = unsafe { libc::mallinfo2() };
    info.fordblks as u64
}

/// Every `interval`, trims when the freed heap has grown more than [`SLACK`] past its level after
/// the last trim, until the task is dropped. Watching the freed heap, not RSS, is what catches the
/// end of a burst: while connections are held the heap is in use and RSS is high; when they close
/// RSS stays where it was and only the freed heap grows. Trimming while the burst still runs
/// returns little; the next look, after it ends, returns the rest.
pub async fn trim_after_bursts(interval: Duration) {
    let mut after_last = freed_heap();
    loop {
        tokio::time::sleep(interval).await;
        let now = freed_heap();
        if should_trim(now, after_last) {
            release_freed_memory();
            after_last = freed_heap();
            tracing::debug!(freed_before = now, freed_after = after_last, "freed heap handed back");
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
    fn sees_the_freed_heap_grow_when_a_burst_ends() {
        let before = super::freed_heap();
        // 32 MiB in pieces below glibc's mmap threshold; freeing every other one leaves 16 MiB of
        // holes that cannot coalesce into the top of the heap and be trimmed at once.
        let mut pieces: Vec<Option<Vec<u8>>> = (0..4096).map(|_| Some(vec![1u8; 8 << 10])).collect();
        for piece in pieces.iter_mut().step_by(2) {
            *piece = None;
        }
        let freed = super::freed_heap();
        assert!(freed >= before + (12 << 20), "freed heap {before} → {freed} bytes");
        drop(pieces);
    }
}
