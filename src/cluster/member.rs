//! This tokend as a member of a cluster (SPEC §8): its lease on etcd (kept alive; when it
//! lapses every lead it held lapses with it), one watch on the cluster's prefix that
//! tells each account's [`Seat`] when its record or its leader changed, and per account
//! the election (a leader key created under the member's lease, in a transaction that
//! fails if someone holds it) and the guarded write of the sealed record (a transaction
//! that fails once this member no longer leads).
//!
//! What a leader or a follower does with it lives with the refresh engine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::etcd::{Compare, Etcd, EtcdError, Event, Op};
use super::record::{ClusterKey, Record};
use crate::account::identity::RequestIdentity;

/// Who leads an account, as this member last learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lead {
    /// This member.
    Me,
    /// Another member, by name.
    Other(String),
    /// Nobody (the key is free), or not known (etcd unreachable).
    Unknown,
}

pub struct Member {
    etcd: Arc<Etcd>,
    key: ClusterKey,
    prefix: String,
    name: String,
    ttl: Duration,
    /// The member's lease; none until granted, and after it lapsed.
    lease: watch::Sender<Option<i64>>,
    /// When etcd last answered.
    last_contact: Mutex<Option<Instant>>,
    /// Each seat's change counter, by its path.
    seats: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Member {
    /// Joins the cluster at `prefix` as `name`: keeps a lease of `ttl` alive and watches
    /// the prefix, until `cancel` (then hands its leads over), on `tracker`. Returns at
    /// once; etcd may be unreachable for now.
    pub fn start(
        etcd: Etcd,
        key: ClusterKey,
        prefix: &str,
        name: &str,
        ttl: Duration,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Arc<Member> {
        let m = Arc::new(Member {
            etcd: Arc::new(etcd),
            key,
            prefix: prefix.trim_end_matches('/').to_owned(),
            name: name.to_owned(),
            ttl,
            lease: watch::Sender::new(None),
            last_contact: Mutex::new(None),
            seats: Mutex::new(HashMap::new()),
        });
        tracker.spawn(m.clone().keep_alive(cancel.clone()));
        tracker.spawn(m.clone().watch_prefix(cancel));
        m
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether etcd answered within the lease's time to live.
    pub fn reachable(&self) -> bool {
        self.last_contact
            .lock()
            .expect("never poisoned")
            .is_some_and(|t| t.elapsed() < self.ttl)
    }

    /// How long etcd has not answered (zero while it does).
    pub fn unreachable_for(&self) -> Option<Duration> {
        match *self.last_contact.lock().expect("never poisoned") {
            Some(t) if t.elapsed() < self.ttl => None,
            Some(t) => Some(t.elapsed()),
            None => Some(Duration::MAX),
        }
    }

    fn contact(&self) {
        *self.last_contact.lock().expect("never poisoned") = Some(Instant::now());
    }

    /// Waits until this member holds a lease (or `cancel`).
    pub async fn wait_for_lease(&self, cancel: &CancellationToken) -> Option<i64> {
        let mut rx = self.lease.subscribe();
        tokio::select! {
            _ = cancel.cancelled() => None,
            r = rx.wait_for(Option::is_some) => r.ok().and_then(|l| *l),
        }
    }

    /// Keeps the member's lease alive (a renewal every third of its time to live), and
    /// grants a new one when it lapsed: a member cut off for longer than `ttl` has lost
    /// every lead, and must not act as if it had not.
    async fn keep_alive(self: Arc<Self>, cancel: CancellationToken) {
        let tick = (self.ttl / 3).max(Duration::from_millis(200));
        loop {
            let current = *self.lease.borrow();
            let result = match current {
                None => self.etcd.grant(self.ttl).await.map(|id| {
                    tracing::info!(member = %self.name, "cluster lease granted");
                    self.lease.send_replace(Some(id));
                }),
                Some(id) => self.etcd.keepalive(id).await.map(|alive| {
                    if !alive {
                        tracing::warn!(member = %self.name, "cluster lease lapsed: every lead it held is lost");
                        self.lease.send_replace(None);
                    }
                }),
            };
            match result {
                Ok(()) => self.contact(),
                Err(e) => {
                    tracing::debug!(member = %self.name, "cluster: {e}");
                    if current.is_some() && self.unreachable_for().is_some() {
                        tracing::warn!(member = %self.name, "etcd unreachable for the lease's time to live: its leads are lost");
                        self.lease.send_replace(None);
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(tick) => {}
            }
        }
        // SIGTERM: hand over at once. Revoking the lease deletes every leader key this
        // member holds; the others see it on their watch.
        if let Some(id) = self.lease.send_replace(None) {
            let revoked = tokio::time::timeout(Duration::from_secs(1), self.etcd.revoke(id)).await;
            if !matches!(revoked, Ok(Ok(()))) {
                tracing::warn!(member = %self.name, "failed to hand over the cluster leads; they lapse within the lease's time to live");
            }
        }
    }

    /// One watch on the whole prefix; each change bumps the counter of the seat it
    /// belongs to. After an interruption every seat is bumped (it re-reads).
    async fn watch_prefix(self: Arc<Self>, cancel: CancellationToken) {
        let root = format!("{}/accounts/", self.prefix);
        let mut from = 0i64;
        loop {
            if from == 0 {
                match self.etcd.get_prefix(&root).await {
                    Ok((_, rev)) => {
                        self.contact();
                        from = rev + 1;
                    }
                    Err(_) => {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        }
                    }
                }
            }
            self.bump_all();
            let (tx, mut rx) = mpsc::channel(64);
            let etcd = self.etcd.clone();
            let root2 = root.clone();
            let watching = tokio::spawn(async move { etcd.watch(&root2, from, &tx).await });
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => {
                        watching.abort();
                        return;
                    }
                    ev = rx.recv() => match ev {
                        Some(ev) => {
                            self.contact();
                            let (key, rev) = match &ev {
                                Event::Put(kv) => (kv.key.clone(), kv.mod_revision),
                                Event::Delete { key, mod_revision } => (key.clone(), *mod_revision),
                            };
                            from = from.max(rev + 1);
                            if let Some((path, _)) = key.rsplit_once('/') {
                                self.bump(path);
                            }
                        }
                        None => break,
                    }
                }
            }
            match watching.await {
                Ok(Ok(last)) => from = from.max(last + 1),
                _ => {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    fn bump(&self, path: &str) {
        if let Some(tx) = self.seats.lock().expect("never poisoned").get(path) {
            tx.send_modify(|n| *n += 1);
        }
    }

    fn bump_all(&self) {
        for tx in self.seats.lock().expect("never poisoned").values() {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// This member's seat for account `name` with `identity` (SPEC §8: shared by name
    /// and identity).
    pub fn seat(self: &Arc<Self>, name: &str, identity: &RequestIdentity) -> Seat {
        let path = self.key.account_path(&self.prefix, name, identity);
        let changed = self
            .seats
            .lock()
            .expect("never poisoned")
            .entry(path.clone())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe();
        Seat {
            member: self.clone(),
            path,
            changed,
        }
    }
}

impl crate::account::coordinator::ClusterStatus for Member {
    fn member(&self) -> &str {
        &self.name
    }

    fn reachable(&self) -> bool {
        Member::reachable(self)
    }
}

/// One account's place in the cluster.
pub struct Seat {
    member: Arc<Member>,
    path: String,
    changed: watch::Receiver<u64>,
}

impl Seat {
    pub fn member(&self) -> &Arc<Member> {
        &self.member
    }

    fn leader_key(&self) -> String {
        format!("{}/leader", self.path)
    }

    fn record_key(&self) -> String {
        format!("{}/record", self.path)
    }

    /// Waits until the account's record or leader may have changed.
    pub async fn changed(&mut self) {
        if self.changed.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Takes the lead if nobody holds it; says who leads.
    pub async fn campaign(&self) -> Result<Lead, EtcdError> {
        let Some(lease) = *self.member.lease.borrow() else {
            return Ok(Lead::Unknown);
        };
        let key = self.leader_key();
        let me = self.member.name.as_bytes().to_vec();
        let r = self
            .member
            .etcd
            .txn(
                &[Compare::CreateRevision(key.clone(), 0)],
                &[Op::Put {
                    key: key.clone(),
                    value: me,
                    lease,
                }],
                &[Op::Get(key)],
            )
            .await?;
        self.member.contact();
        if r.succeeded {
            return Ok(Lead::Me);
        }
        Ok(match r.kvs.first() {
            Some(kv) if kv.lease == lease => Lead::Me,
            Some(kv) => Lead::Other(String::from_utf8_lossy(&kv.value).into_owned()),
            None => Lead::Unknown,
        })
    }

    /// Writes `record`, sealed, if this member still leads; false if it does not.
    pub async fn publish(&self, record: &Record) -> Result<bool, EtcdError> {
        let Some(lease) = *self.member.lease.borrow() else {
            return Ok(false);
        };
        let at = self.record_key();
        let sealed = self.member.key.seal(&at, record);
        let r = self
            .member
            .etcd
            .txn(
                &[Compare::Lease(self.leader_key(), lease)],
                &[Op::Put {
                    key: at,
                    value: sealed.into_bytes(),
                    lease: 0,
                }],
                &[],
            )
            .await?;
        self.member.contact();
        Ok(r.succeeded)
    }

    /// The account's shared record, if there is one that opens with the cluster key.
    pub async fn read(&self) -> Result<Option<Record>, EtcdError> {
        let at = self.record_key();
        let Some(kv) = self.member.etcd.get(&at).await? else {
            self.member.contact();
            return Ok(None);
        };
        self.member.contact();
        let bytes = match base64::engine::general_purpose::STANDARD.decode(&kv.value) {
            Ok(b) => b,
            Err(_) => {
                tracing::warn!(member = %self.member.name, "ignoring a shared record that is not base64");
                return Ok(None);
            }
        };
        match self.member.key.open(&at, &bytes) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                tracing::warn!(member = %self.member.name, "ignoring a shared record: {e}");
                Ok(None)
            }
        }
    }

    /// Gives up the lead, if held (the account stops here, or the member leaves).
    pub async fn resign(&self) -> Result<(), EtcdError> {
        let Some(lease) = *self.member.lease.borrow() else {
            return Ok(());
        };
        self.member
            .etcd
            .txn(
                &[Compare::Lease(self.leader_key(), lease)],
                &[Op::Delete(self.leader_key())],
                &[],
            )
            .await
            .map(drop)
    }
}
