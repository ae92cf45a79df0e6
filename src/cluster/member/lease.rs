//! The key check and this member's lease: `{prefix}/keycheck` sealed or opened, the
//! lease kept alive every third of its time to live (granted again when it lapsed),
//! and this member's `members/` keys under it. Not the elections held under the lease
//! (`seat`), nor the watch that sees the others' keys (`prefix_watch`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::etcd::{Compare, EtcdError, Op};

use super::{mismatch_message, KeyCheck, Lease, Member};

impl Member {
    /// The key check: creates `{prefix}/keycheck` sealed under this member's key if it
    /// is not there, else opens it.
    async fn check_key(&self) -> Result<KeyCheck, EtcdError> {
        let at = format!("{}/keycheck", self.prefix);
        let r = self
            .etcd
            .txn(
                &[Compare::CreateRevision(at.clone(), 0)],
                &[Op::Put {
                    key: at.clone(),
                    value: self.key.seal_check(&self.prefix),
                    lease: 0,
                }],
                &[Op::Get(at)],
            )
            .await?;
        self.contact();
        if r.succeeded {
            tracing::info!(member = %self.name, prefix = %self.prefix, "sealed the cluster's key check: this member's key is the cluster's");
            return Ok(KeyCheck::Ok);
        }
        Ok(match r.kvs.first() {
            Some(kv) if self.key.opens_check(&self.prefix, &kv.value) => KeyCheck::Ok,
            Some(_) => KeyCheck::Mismatch,
            None => KeyCheck::Unknown,
        })
    }

    /// Keeps the member's lease alive (a renewal every third of its time to live), and
    /// grants a new one when it lapsed: a member cut off for longer than `ttl` has lost
    /// every lead, and must not act as if it had not. The key check comes first: a
    /// member whose key is not the cluster's holds no lease.
    pub(super) async fn keep_alive(self: Arc<Self>, cancel: CancellationToken) {
        let tick = (self.ttl / 3).max(Duration::from_millis(200));
        let mut checks = 0u32;
        loop {
            let check = self.key_check();
            // A mismatch is looked at again now and then: the operator may fix it.
            if check != KeyCheck::Ok && (check == KeyCheck::Unknown || checks % 15 == 0) {
                match self.check_key().await {
                    Ok(now) => {
                        if now == KeyCheck::Mismatch && check != KeyCheck::Mismatch {
                            tracing::error!(member = %self.name, prefix = %self.prefix, "{}", mismatch_message(&self.prefix));
                        }
                        if now == KeyCheck::Ok && check == KeyCheck::Mismatch {
                            tracing::info!(member = %self.name, "the cluster's key check opens with this member's key now: taking part");
                        }
                        self.key_check.send_replace(now);
                        self.bump_all();
                    }
                    Err(e) => {
                        self.no_answer();
                        tracing::debug!(member = %self.name, "cluster: {e}");
                    }
                }
            }
            checks = checks.wrapping_add(1);
            if self.key_check() == KeyCheck::Ok {
                self.renew().await;
            }
            // A little jitter: renewals land at ever other points of a second, which
            // keeps etcd's clock known well (see `calibrate`).
            let jitter = tick.mul_f64(rand::random::<f64>() * 0.1);
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(tick - jitter) => {}
            }
        }
        // SIGTERM: hand over at once. Revoking the lease deletes every leader key this
        // member holds; the others see it on their watch.
        if let Some(l) = self.lease.send_replace(None) {
            let revoked =
                tokio::time::timeout(Duration::from_secs(1), self.etcd.revoke(l.id)).await;
            if !matches!(revoked, Ok(Ok(()))) {
                tracing::warn!(member = %self.name, "failed to hand over the cluster leads; they lapse within the lease's time to live");
            }
        }
    }

    /// One renewal (or grant) of the lease.
    async fn renew(&self) {
        let current = *self.lease.borrow();
        let sent = Instant::now();
        match current {
            None => match self.etcd.grant(self.ttl).await {
                Ok((id, ttl)) => {
                    self.contact();
                    tracing::info!(member = %self.name, "cluster lease granted");
                    self.lease.send_replace(Some(Lease {
                        id,
                        until: sent + ttl,
                    }));
                    self.announce_all().await;
                }
                Err(e) => {
                    self.no_answer();
                    tracing::debug!(member = %self.name, "cluster: {e}");
                }
            },
            Some(l) => match self.etcd.keepalive(l.id).await {
                Ok(Some(ttl)) => {
                    self.contact();
                    self.lease.send_replace(Some(Lease {
                        id: l.id,
                        until: sent + ttl,
                    }));
                }
                Ok(None) => {
                    self.contact();
                    tracing::warn!(member = %self.name, "cluster lease lapsed: every lead it held is lost");
                    self.lease.send_replace(None);
                    self.bump_all();
                }
                Err(e) => {
                    self.no_answer();
                    tracing::debug!(member = %self.name, "cluster: {e}");
                    if Instant::now() >= l.until {
                        tracing::warn!(member = %self.name, "etcd unreachable for the lease's time to live: its leads are lost");
                        self.lease.send_replace(None);
                        self.bump_all();
                    }
                }
            },
        }
    }

    /// Puts this member's presence under every seat (with its new lease).
    async fn announce_all(&self) {
        let paths: Vec<String> = self
            .seats
            .lock()
            .expect("never poisoned")
            .keys()
            .cloned()
            .collect();
        for p in paths {
            self.announce(&p).await;
        }
    }

    /// Puts `{path}/members/{name}` under this member's lease: the account's identity
    /// has a live member here.
    pub(super) async fn announce(&self, path: &str) {
        let Some(lease) = self.live_lease() else {
            return;
        };
        let key = format!("{path}/members/{}", self.name);
        let put = self
            .etcd
            .txn(
                &[],
                &[Op::Put {
                    key,
                    value: self.name.as_bytes().to_vec(),
                    lease,
                }],
                &[],
            )
            .await;
        if let Err(e) = put {
            tracing::debug!(member = %self.name, "cluster: {e}");
        }
    }
}
