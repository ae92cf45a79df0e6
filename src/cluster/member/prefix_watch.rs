//! The one watch on the cluster's prefix and its progress check: every change bumps
//! the counter of the seat it belongs to, keeps the live members of each identity and
//! the arrival of each record write; the watch's endpoint must answer a quorum read
//! every quarter of the lease's time to live, else the watch moves on. Not what a seat
//! reads or writes (`seat`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::etcd::{Event, Kv, WatchEnd};

use super::{name_of, split_key, Member};

impl Member {
    /// One watch on the whole prefix; each change bumps the counter of the seat it
    /// belongs to. Beside it, every quarter of the lease's time to live, the watch's
    /// endpoint must answer a read of the prefix: a member that hangs (stopped, or cut
    /// from its quorum) is left for another, and the watch goes on from the last
    /// revision it saw. After an interruption every seat is bumped (it reads again).
    pub(super) async fn watch_prefix(self: Arc<Self>, cancel: CancellationToken) {
        let root = format!("{}/accounts/", self.prefix);
        let check = (self.ttl / 4).max(Duration::from_millis(250));
        // The next revision to watch from; 0: read everything first.
        let mut from = 0i64;
        loop {
            if from == 0 {
                match self.etcd.get_prefix(&root).await {
                    Ok((kvs, rev)) => {
                        self.contact();
                        self.rebuild_presence(&root, &kvs);
                        from = rev + 1;
                    }
                    Err(_) => {
                        self.no_answer();
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(check) => continue,
                        }
                    }
                }
            }
            self.bump_all();
            let idx = self.etcd.current();
            let (tx, mut rx) = mpsc::channel(64);
            let watching = tokio::spawn({
                let (etcd, root) = (self.etcd.clone(), root.clone());
                async move { etcd.watch(idx, &root, from, &tx).await }
            });
            let mut ticker = tokio::time::interval_at(Instant::now() + check, check);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Checks in a row that found a key newer than the watch told.
            let mut behind = 0;
            let ended = loop {
                tokio::select! {
                    _ = cancel.cancelled() => {
                        watching.abort();
                        return;
                    }
                    ev = rx.recv() => match ev {
                        Some(ev) => {
                            self.contact();
                            from = from.max(self.on_event(&root, &ev) + 1);
                        }
                        None => break None,
                    },
                    _ = ticker.tick() => match self.etcd.progress(idx, &root, from).await {
                        Ok(missed) => {
                            self.contact();
                            behind = if missed > 0 { behind + 1 } else { 0 };
                            if behind >= 2 {
                                tracing::warn!(member = %self.name, "the cluster watch fell behind etcd: watching again from revision {from}");
                                break Some(false);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(member = %self.name, "etcd stopped answering the cluster watch's endpoint ({e}): watching through another from revision {from}");
                            self.etcd.avoid(idx);
                            break Some(true);
                        }
                    },
                }
            };
            watching.abort();
            if ended.is_some() {
                continue;
            }
            match watching.await {
                Ok(Ok(WatchEnd::Ended { last })) => from = from.max(last + 1),
                Ok(Ok(WatchEnd::Compacted { compact_revision })) => {
                    // What happened before it is gone: every seat reads again (the bump
                    // above), and the presence of members is read again.
                    tracing::info!(member = %self.name, "etcd compacted the watched revisions: going on from revision {compact_revision}");
                    if let Ok((kvs, _)) = self.etcd.get_prefix(&root).await {
                        self.rebuild_presence(&root, &kvs);
                    }
                    from = compact_revision;
                }
                Ok(Err(e)) => {
                    tracing::debug!(member = %self.name, "cluster watch: {e}");
                    self.etcd.avoid(idx);
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Handles one watched change; its revision.
    fn on_event(&self, root: &str, ev: &Event) -> i64 {
        let (key, rev, put) = match ev {
            Event::Put(kv) => (&kv.key, kv.mod_revision, true),
            Event::Delete { key, mod_revision } => (key, *mod_revision, false),
        };
        if let Some((path, rest)) = split_key(root, key) {
            if let Some(who) = rest.strip_prefix("members/") {
                let mut p = self.presence.lock().expect("never poisoned");
                let set = p.entry(path.to_owned()).or_default();
                if put {
                    set.insert(who.to_owned());
                } else {
                    set.remove(who);
                }
                drop(p);
                // Every identity under this account's name learns of it.
                self.bump_name(root, path);
            } else {
                if put && rest == "record" {
                    self.arrivals
                        .lock()
                        .expect("never poisoned")
                        .insert(path.to_owned(), (rev, Instant::now()));
                }
                self.bump(path);
            }
        }
        rev
    }

    fn rebuild_presence(&self, root: &str, kvs: &[Kv]) {
        let mut p = self.presence.lock().expect("never poisoned");
        p.clear();
        for kv in kvs {
            if let Some((path, rest)) = split_key(root, &kv.key) {
                if let Some(who) = rest.strip_prefix("members/") {
                    p.entry(path.to_owned()).or_default().insert(who.to_owned());
                }
            }
        }
    }

    fn bump(&self, path: &str) {
        if let Some(tx) = self.seats.lock().expect("never poisoned").get(path) {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// Bumps every seat of the account name `path` belongs to.
    fn bump_name(&self, root: &str, path: &str) {
        let name = name_of(root, path);
        for (p, tx) in self.seats.lock().expect("never poisoned").iter() {
            if name_of(root, p) == name {
                tx.send_modify(|n| *n += 1);
            }
        }
    }

    pub(super) fn bump_all(&self) {
        for tx in self.seats.lock().expect("never poisoned").values() {
            tx.send_modify(|n| *n += 1);
        }
    }
}
