//! The member's watches of the namespace's Secrets and Leases by tokend's label: listing,
//! watching from the last resourceVersion seen (listing again after 410 Gone), and
//! telling each seat when its objects changed (a Lease renewal by the holder it knows
//! of only restarts the lapse timer).
//!
//! Not here: the HTTP watch itself (`client`), what a seat does when told (`seat`,
//! `lease`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{Lease, Resource, SecretObject, WatchEnd, WatchEvent, MANAGED_BY};
use super::member::KubeMember;
use super::names::{secret_name, SEAT_LABEL};
use crate::cluster::member::KeyCheck;

impl KubeMember {
    /// One watch on `r` by tokend's label: each event tells the seat it belongs to.
    /// Resumes from the last resourceVersion seen; lists again after 410 Gone.
    pub(super) async fn watch_objects(self: Arc<Self>, r: Resource, cancel: CancellationToken) {
        let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
        let retry = (self.ttl / 4).max(Duration::from_millis(250));
        let what = match r {
            Resource::Secrets => "watch secrets",
            Resource::Leases => "watch leases",
        };
        let mut from: Option<String> = None;
        loop {
            if from.is_none() {
                let listed = match r {
                    Resource::Secrets => self
                        .kube
                        .list::<SecretObject>(r, &selector)
                        .await
                        .map(|(_, rv)| rv),
                    Resource::Leases => self
                        .kube
                        .list::<Lease>(r, &selector)
                        .await
                        .map(|(_, rv)| rv),
                };
                match self.outcome(
                    if matches!(r, Resource::Secrets) {
                        "list secrets"
                    } else {
                        "list leases"
                    },
                    listed,
                ) {
                    Ok(rv) => from = Some(rv),
                    Err(_) => {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(retry) => continue,
                        }
                    }
                }
                self.bump_all();
            }
            let start = from.clone().expect("listed above");
            let (tx, mut rx) = mpsc::channel(64);
            let watching = {
                let me = self.clone();
                let selector = selector.clone();
                tokio::spawn(async move {
                    me.kube
                        .watch(r, &selector, &start, Duration::from_secs(290), &tx)
                        .await
                })
            };
            let mut watching = watching;
            let end = loop {
                tokio::select! {
                    _ = cancel.cancelled() => {
                        watching.abort();
                        return;
                    }
                    ev = rx.recv() => match ev {
                        Some(ev) => {
                            let _ = self.outcome(what, Ok(()));
                            if let Some(rv) = self.on_event(r, ev) {
                                from = Some(rv);
                            }
                        }
                        None => break (&mut watching).await.unwrap_or(WatchEnd::Closed),
                    },
                }
            };
            match end {
                WatchEnd::Closed => {}
                WatchEnd::Gone => {
                    tracing::info!(member = %self.name, "the cluster watch's resourceVersion is gone (410): listing again");
                    from = None;
                }
                WatchEnd::Failed(e) => {
                    let _ = self.outcome::<()>(what, Err(e));
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                }
            }
        }
    }

    /// Tells the seat an event belongs to; the event's resourceVersion.
    fn on_event(&self, r: Resource, ev: WatchEvent) -> Option<String> {
        match ev {
            WatchEvent::Bookmark(rv) => Some(rv),
            WatchEvent::Changed {
                name,
                labels,
                resource_version,
                deleted,
                holder,
            } => {
                let seat = labels.get(SEAT_LABEL);
                let mut seats = self.seats.lock().expect("never poisoned");
                if let Some(s) = seat.and_then(|id| seats.get_mut(id)) {
                    if matches!(r, Resource::Leases) && !deleted {
                        // A renewal by the holder this member knows of (or by itself) is
                        // no news: it restarts the lapse timer, without a read.
                        let holder = holder.unwrap_or_default();
                        let renewal = match &mut s.lease.other {
                            Some((h, rv, seen, _, told)) if *h == holder && !holder.is_empty() => {
                                *rv = resource_version.clone();
                                *seen = Instant::now();
                                *told = false;
                                true
                            }
                            _ => false,
                        };
                        if renewal || (holder == self.name && s.lease.mine.is_some()) {
                            return Some(resource_version);
                        }
                    }
                    if matches!(r, Resource::Secrets)
                        && Some(&name) == seat.map(|id| secret_name(id)).as_ref()
                    {
                        if let Ok(rv) = resource_version.parse() {
                            s.arrival = Some((rv, Instant::now()));
                        }
                    }
                    s.changed.send_modify(|n| *n += 1);
                } else if seat.is_none() {
                    // The key check changed: look again.
                    drop(seats);
                    if self.key_check.borrow().clone() != KeyCheck::Ok {
                        self.key_check.send_replace(KeyCheck::Unknown);
                    }
                }
                Some(resource_version)
            }
        }
    }
}
