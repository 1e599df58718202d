//! Live reload: watches the configuration path and swaps in a new configuration when its
//! files change.
//!
//! The watch covers the configuration path (the file's directory, or the directory itself) and
//! its parent, non-recursively, so that every way a configuration changes is seen: a file
//! written in place, a file replaced by rename (editors, `kubectl cp`), a Kubernetes
//! ConfigMap's `..data` symbolic link swapped to a new directory, and a symbolic link to the
//! whole directory swapped (envoyproxy/ratelimit's `RUNTIME_ROOT` style). Events are debounced,
//! then the whole configuration is read again; one whose content did not change is not
//! reloaded. An invalid configuration is refused: the running one stays, and the error goes to
//! the log, `/healthcheck`, `/rlconfig` and the `ratelimit_server_config_error` metric, until a
//! valid one loads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::RateLimitConfig;
use crate::service::RateLimitService;

/// How long after the last file event a reload waits, so that a burst of writes (a ConfigMap
/// update, an editor's save) reloads once, complete.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// A running watch; dropping it stops watching.
#[derive(Debug)]
pub struct ConfigWatch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ConfigWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads the configuration at `path` again and puts it in use if it is valid and differs
/// from the running one. Answers whether the running configuration changed.
pub fn reload(service: &RateLimitService, path: &Path) -> bool {
    match RateLimitConfig::load(path) {
        Ok(config) => {
            let current = service.config();
            if config.version() == current.version() && service.config_error().is_none() {
                return false;
            }
            let changed = config.version() != current.version();
            tracing::info!(
                version = config.version(),
                previous = current.version(),
                domains = config.domain_count(),
                "configuration loaded"
            );
            service.set_config(config);
            changed
        }
        Err(err) => {
            tracing::error!(error = %err, version = service.config().version(), "configuration refused; the running configuration stays");
            service.set_config_error(err.to_string());
            false
        }
    }
}

/// Starts watching `path` for `service`. Must run within Tokio.
///
/// # Errors
/// The watcher's error when the path cannot be watched.
pub fn watch(service: Arc<RateLimitService>, path: &Path) -> Result<ConfigWatch, notify::Error> {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            // A full channel already holds a wake-up: nothing is lost.
            Ok(_) => {
                let _ = tx.try_send(());
            }
            Err(err) => tracing::warn!(error = %err, "configuration watch error"),
        }
    })?;
    let path = path.to_path_buf();
    let mut dirs = watched_dirs(&path);
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    let task = tokio::spawn(async move {
        // Owned by the task: dropped, and so stopped, when the task ends.
        let mut watcher = watcher;
        while rx.recv().await.is_some() {
            // Debounce: wait until the events stop.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let service = service.clone();
            let path = path.clone();
            // Reading files blocks: keep it off the runtime's workers.
            let reloading = path.clone();
            let _ = tokio::task::spawn_blocking(move || reload(&service, &reloading)).await;
            // A swapped symbolic link may now lead to another directory: watch what the
            // path resolves to now.
            rewatch(&mut watcher, &mut dirs, &path);
        }
    });
    Ok(ConfigWatch { task })
}

fn rewatch(watcher: &mut RecommendedWatcher, dirs: &mut Vec<PathBuf>, path: &Path) {
    for dir in dirs.iter() {
        let _ = watcher.unwatch(dir);
    }
    *dirs = watched_dirs(path);
    for dir in dirs.iter() {
        if let Err(err) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %err, "cannot watch the configuration directory");
        }
    }
}

/// The directories to watch for `path`: the directory holding the configuration and its
/// parent (where a swapped symbolic link to it lives).
fn watched_dirs(path: &Path) -> Vec<PathBuf> {
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    let mut dirs = vec![dir.clone()];
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty())
        && parent.is_dir()
    {
        dirs.push(parent.to_path_buf());
    }
    dirs
}
