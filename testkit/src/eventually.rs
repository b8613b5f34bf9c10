//! Waiting for a condition instead of sleeping a fixed time.

use std::time::{Duration, Instant};

/// Polls `check` every 20 ms until it returns `Ok`, for at most `timeout`; panics with the
/// last error and `what` otherwise.
#[track_caller]
pub fn assert_eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: still not true after {timeout:?}: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
