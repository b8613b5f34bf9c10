//! The manifest-directory source: every `*.yaml`/`*.yml` file of a directory, read into a
//! [`Store`], translated, and published as a new snapshot whenever the directory changes. It is
//! what runs without a cluster (one machine, the demo, tests).
//!
//! A document that cannot be read is logged with its file and name and skipped; a file that
//! cannot be read at all keeps the last good state.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tracing::{debug, warn};

use crate::{generation::Publisher, store::Store};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {path}: {source}")]
    ReadDir { path: PathBuf, source: std::io::Error },
    #[error("cannot read manifest file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// The YAML files of `dir` with their modification times and sizes, sorted by name.
fn listing(dir: &Path) -> Result<Vec<(PathBuf, SystemTime, u64)>, ManifestError> {
    let entries =
        std::fs::read_dir(dir).map_err(|source| ManifestError::ReadDir { path: dir.to_owned(), source })?;
    let mut files: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .filter_map(|p| {
            let meta = std::fs::metadata(&p).ok()?;
            meta.is_file().then(|| (p, meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len()))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every manifest of `dir` into a fresh store.
pub fn load(dir: &Path) -> Result<Store, ManifestError> {
    let mut store = Store::default();
    for (path, _, _) in listing(dir)? {
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ManifestError::Read { path: path.clone(), source })?;
        let applied = store.apply_yaml(&text);
        for err in &applied.errors {
            warn!(file = %path.display(), error = %err, "manifest skipped");
        }
    }
    Ok(store)
}

/// Loads `dir` once and then re-reads it whenever a file appears, disappears or changes,
/// polling every `interval`, until the task is dropped.
pub async fn watch_dir(dir: PathBuf, mut out: Publisher, interval: Duration) {
    let mut seen = None;
    loop {
        match listing(&dir) {
            Ok(files) if seen.as_ref() != Some(&files) => match load(&dir) {
                Ok(store) => {
                    debug!(dir = %dir.display(), files = files.len(), "manifests read");
                    out.publish(store, "manifests");
                    seen = Some(files);
                }
                Err(err) => warn!(error = %err, "keeping the last good configuration"),
            },
            Ok(_) => {}
            Err(err) => warn!(error = %err, "keeping the last good configuration"),
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use gammaray_proxy::snapshot::Snapshot;
    use tokio::sync::watch;

    use super::*;
    use crate::translate::Options;

    /// Removes the test's directory, even when the test panics.
    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Waits for the next snapshot, failing the test after 10 s instead of hanging.
    async fn next(rx: &mut watch::Receiver<Arc<Snapshot>>, what: &str) {
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .unwrap_or_else(|_| panic!("no {what} within 10 s"))
            .expect("the watcher is running");
    }

    #[tokio::test]
    async fn a_changed_file_becomes_a_new_snapshot_and_a_bad_document_is_skipped() {
        let guard = TempDir(std::env::temp_dir().join(format!("gammaray-manifests-{}", std::process::id())));
        let dir = guard.0.clone();
        std::fs::create_dir_all(&dir).expect("dir");
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec: {clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}\n";
        std::fs::write(dir.join("a.yaml"), format!("{svc}---\nkind: [broken\n")).expect("write");
        let (publisher, sub) = Publisher::new(Options::default());
        let mut snap_rx = sub.snapshot;
        let task = tokio::spawn(watch_dir(dir.clone(), publisher, Duration::from_millis(20)));
        next(&mut snap_rx, "first snapshot").await;
        assert_eq!(snap_rx.borrow().frontends.len(), 1, "the good document applied");
        let first = snap_rx.borrow().version;

        std::fs::write(dir.join("b.yaml"), svc.replace("web", "api").replace("10.96.0.1", "10.96.0.2"))
            .expect("write");
        next(&mut snap_rx, "second snapshot").await;
        assert_eq!(snap_rx.borrow().frontends.len(), 2);
        assert!(snap_rx.borrow().version > first);
        task.abort();
    }
}
