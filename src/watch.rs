//! Watches the directories of the config file and of the secret files, and says when
//! something in them changed. Directories, not files: editors that write a temporary file
//! and rename it over the original, and Kubernetes ConfigMap `..data` symlink swaps,
//! replace the file's inode, which a watch on the file itself would lose.
//!
//! What changed is decided by the supervisor, which compares contents: this only wakes it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

pub struct Watcher {
    inner: notify::RecommendedWatcher,
    dirs: BTreeSet<PathBuf>,
}

impl Watcher {
    /// A watcher that sends `()` on `tx` after any change (coalesced: capacity-1 channel).
    pub fn new(tx: mpsc::Sender<()>) -> notify::Result<Self> {
        let inner = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let relevant = match &event {
                Ok(e) => !matches!(e.kind, notify::EventKind::Access(_)),
                Err(_) => true,
            };
            if relevant {
                let _ = tx.try_send(());
            }
        })?;
        Ok(Watcher {
            inner,
            dirs: BTreeSet::new(),
        })
    }

    /// Watches exactly the directories holding `files` (adding and dropping watches).
    pub fn watch_files<'a>(&mut self, files: impl IntoIterator<Item = &'a Path>) {
        let wanted: BTreeSet<PathBuf> = files
            .into_iter()
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
    }
}
