//! Watches the directories of the config file and of the secret files, and says when
//! something in them changed. Directories, not files: editors that write a temporary file
//! and rename it over the original, and Kubernetes ConfigMap `..data` symlink swaps,
//! replace the file's inode, which a watch on the file itself would lose.
//!
//! What changed is decided by the supervisor, which compares contents: this only wakes it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::{RecursiveMode, Watcher as _};

pub struct Watcher {
    inner: notify::RecommendedWatcher,
    dirs: BTreeSet<PathBuf>,
    /// The files that matter; events about other files in their directories (token
    /// outputs written next to the config, say) are ignored.
    files: Arc<Mutex<BTreeSet<PathBuf>>>,
}

impl Watcher {
    /// A watcher that calls `on_change` after any change of a watched file (from the
    /// watcher's thread: it must not block).
    pub fn new(on_change: impl Fn() + Send + 'static) -> notify::Result<Self> {
        let files: Arc<Mutex<BTreeSet<PathBuf>>> = Arc::default();
        let inner = notify::recommended_watcher({
            let files = files.clone();
            move |event: notify::Result<notify::Event>| {
                let relevant = match &event {
                    Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => false,
                    Ok(e) => {
                        let files = files
                            .lock()
                            .expect("never poisoned: no panics under the lock");
                        e.paths
                            .iter()
                            .any(|p| files.contains(p) || is_atomic_swap(p))
                    }
                    // Lost events (queue overflow): look at everything again.
                    Err(_) => true,
                };
                if relevant {
                    on_change();
                }
            }
        })?;
        Ok(Watcher {
            inner,
            dirs: BTreeSet::new(),
            files,
        })
    }

    /// Watches exactly the directories holding `files` (adding and dropping watches).
    pub fn watch_files<'a>(&mut self, files: impl IntoIterator<Item = &'a Path>) {
        let files: BTreeSet<PathBuf> = files.into_iter().map(Path::to_owned).collect();
        let wanted: BTreeSet<PathBuf> = files
            .iter()
            .map(|f| match f.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                _ => PathBuf::from("."),
            })
            .collect();
        for gone in self.dirs.difference(&wanted) {
            let _ = self.inner.unwatch(gone);
        }
        let mut watching = BTreeSet::new();
        for dir in wanted {
            if self.dirs.contains(&dir) {
                watching.insert(dir);
                continue;
            }
            match self.inner.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watching.insert(dir);
                }
                Err(e) => tracing::warn!("failed to watch {} for changes: {e}", dir.display()),
            }
        }
        self.dirs = watching;
        *self.files.lock().expect("never poisoned") = files;
    }
}

impl Watcher {
    /// Watches every directory afresh. A directory reached through a symlink (a
    /// Kubernetes projected volume's `secrets -> ..data/secrets`) is a new directory
    /// after each swap, and the old watch sees nothing more.
    pub fn rewatch(&mut self) {
        for dir in &self.dirs {
            let _ = self.inner.unwatch(dir);
            if let Err(e) = self.inner.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!("failed to watch {} for changes: {e}", dir.display());
            }
        }
    }
}

/// Kubernetes (and other atomic writers) swap a `..data` symlink or `..2024_...`
/// directory beside the files, which themselves are links that never change.
fn is_atomic_swap(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(".."))
}
