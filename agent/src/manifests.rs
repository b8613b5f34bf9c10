//! The manifest-directory source: every `*.yaml`/`*.yml` file of a directory, read into a
//! [`Store`], translated, and published as a new snapshot whenever the directory changes. It is
//! what runs without a cluster (one machine, the demo, tests).
//!
//! A document that cannot be read is logged with its file and name and skipped; a file that
//! cannot be read at all keeps the last good state.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use gammaray_proxy::snapshot::Snapshot;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    store::Store,
    translate::{Options, RouteStatus, translate},
};

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

/// What a configuration source publishes.
pub struct Published {
    pub snapshot: watch::Sender<Arc<Snapshot>>,
    pub statuses: watch::Sender<Arc<Vec<RouteStatus>>>,
    /// The objects themselves, for what reads them directly (enrolment, status writing).
    pub objects: watch::Sender<Arc<Store>>,
}

/// Logs each route condition that is not plainly true, with its reason.
pub fn log_conditions(statuses: &[RouteStatus]) {
    for s in statuses {
        for p in &s.parents {
            for c in p.conditions.iter().filter(|c| c.status != "True" || c.type_ == "PartiallyInvalid") {
                warn!(route = %s.route, kind = %s.kind, parent = %p.parent_ref.name, condition = c.type_, reason = c.reason, message = %c.message, "route status");
            }
        }
    }
}

/// Loads `dir` once and then re-reads it whenever a file appears, disappears or changes,
/// polling every `interval`, until the task is dropped.
pub async fn watch_dir(dir: PathBuf, options: Options, out: Published, interval: Duration) {
    let mut seen = None;
    let mut version = options.version;
    loop {
        match listing(&dir) {
            Ok(files) if seen.as_ref() != Some(&files) => match load(&dir) {
                Ok(store) => {
                    version += 1;
                    let started = std::time::Instant::now();
                    let t = translate(&store, &Options { version, ..options.clone() });
                    let rejected = t
                        .statuses
                        .iter()
                        .filter(|s| {
                            s.parents
                                .iter()
                                .any(|p| p.condition("Accepted").is_some_and(|c| c.status != "True"))
                        })
                        .count();
                    info!(
                        dir = %dir.display(),
                        version,
                        files = files.len(),
                        frontends = t.snapshot.frontends.len(),
                        routes = t.statuses.len(),
                        rejected,
                        translate_us = started.elapsed().as_micros() as u64,
                        "configuration applied"
                    );
                    log_conditions(&t.statuses);
                    out.snapshot.send_replace(Arc::new(t.snapshot));
                    out.statuses.send_replace(Arc::new(t.statuses));
                    out.objects.send_replace(Arc::new(store));
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
    use super::*;

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
        let (snapshot, mut snap_rx) = watch::channel(Arc::new(Snapshot::default()));
        let (statuses, _status_rx) = watch::channel(Arc::new(Vec::new()));
        let (objects, _objects_rx) = watch::channel(Arc::new(Store::default()));
        let task = tokio::spawn(watch_dir(
            dir.clone(),
            Options::default(),
            Published { snapshot, statuses, objects },
            Duration::from_millis(20),
        ));
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
