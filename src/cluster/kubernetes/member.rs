//! This member on the API server ([`KubeMember`]): what it is made of, joining, the key
//! check, its loops (the key check and the renewal of its Leases, the calibration of the
//! API server's clock), the notes of what an operator must fix, and what it knows of each
//! seat; [`MemberView`] and [`ClusterStatus`] for it.
//!
//! Not here: the election on Leases (`lease`), the watches (`watch`), the seats it hands
//! out, their records and requests (`seat`), the API calls (`client`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{Kube, KubeError, Lease, ObjectMeta, Resource, SecretObject, MANAGED_BY};
use super::names::{NAME_LABEL, SEAT_LABEL};
use crate::account::coordinator::ClusterStatus;
use crate::clock::Clock;
use crate::cluster::backend::{MemberView, Settings};
use crate::cluster::member::KeyCheck;
use crate::cluster::memory::Memory;
use crate::cluster::record::ClusterKey;
use crate::hex::hex;

/// What this member knows of one seat's Lease.
#[derive(Default)]
pub(super) struct LeaseView {
    /// Held by this member: the Lease as last written, and until when it surely holds
    /// (from the sending of the write that renewed it).
    pub(super) mine: Option<(Lease, Instant)>,
    /// Held by another: (holder, resourceVersion) as last seen, when first seen so,
    /// and the duration it claims; whether the seat was told it lapsed.
    pub(super) other: Option<(String, String, Instant, Duration, bool)>,
}

pub(super) struct SeatState {
    pub(super) changed: watch::Sender<u64>,
    pub(super) lease: LeaseView,
    /// The record write the watch brought last: its resourceVersion and arrival.
    pub(super) arrival: Option<(i64, Instant)>,
    /// The request last taken from the `-ask` Secret (its resourceVersion).
    pub(super) taken: Option<String>,
}

pub struct KubeMember {
    pub(super) kube: Kube,
    pub(super) key: ClusterKey,
    pub(super) prefix: String,
    pub(super) name: String,
    pub(super) ttl: Duration,
    pub(super) clock: Clock,
    pub(super) memory: Memory,
    pub(super) key_check: watch::Sender<KeyCheck>,
    pub(super) last_contact: Mutex<Instant>,
    /// What an operator must fix, by (verb, resource): cleared when that call succeeds.
    pub(super) problems: Mutex<BTreeMap<String, String>>,
    pub(super) seats: Mutex<HashMap<String, SeatState>>,
    pub(super) calibration: watch::Sender<bool>,
    /// The provider's clock minus this member's (milliseconds), from a `Date` it received.
    pub(super) provider: Mutex<Option<i64>>,
}

impl std::fmt::Debug for KubeMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeMember")
            .field("name", &self.name)
            .field("namespace", &self.kube.namespace())
            .finish_non_exhaustive()
    }
}

impl KubeMember {
    /// Joins: checks the key, keeps its Leases renewed and watches the namespace's
    /// objects of tokend, until `cancel` (then releases its Leases), on `tracker`.
    /// Returns at once; the API server may be out of reach for now.
    pub fn start(
        kube: Kube,
        settings: Settings,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Arc<KubeMember> {
        let m = Arc::new(KubeMember {
            kube,
            key: settings.key,
            prefix: settings.prefix.trim_end_matches('/').to_owned(),
            name: settings.name,
            ttl: settings.ttl,
            clock: settings.clock,
            memory: settings.memory,
            key_check: watch::Sender::new(KeyCheck::Unknown),
            last_contact: Mutex::new(Instant::now()),
            problems: Mutex::new(BTreeMap::new()),
            seats: Mutex::new(HashMap::new()),
            calibration: watch::Sender::new(false),
            provider: Mutex::new(None),
        });
        tracker.spawn(m.clone().keep_alive(cancel.clone()));
        tracker.spawn(m.clone().watch_objects(Resource::Secrets, cancel.clone()));
        tracker.spawn(m.clone().watch_objects(Resource::Leases, cancel.clone()));
        tracker.spawn(m.clone().calibrate(cancel));
        m
    }

    pub fn namespace(&self) -> &str {
        self.kube.namespace()
    }

    /// The name of the Secret that holds the key check of this prefix (not keyed: a
    /// member with another key must find it to learn that).
    pub(super) fn keycheck_name(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, self.prefix.as_bytes());
        format!("tokend-keycheck-{}", &hex(d.as_ref())[..16])
    }

    pub(super) fn labels(
        &self,
        seat: Option<&str>,
        name: Option<&str>,
    ) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned())]);
        if let Some(s) = seat {
            l.insert(SEAT_LABEL.into(), s.to_owned());
        }
        if let Some(n) = name {
            l.insert(NAME_LABEL.into(), n.to_owned());
        }
        l
    }

    pub(super) fn contact(&self) {
        *self.last_contact.lock().expect("never poisoned") = Instant::now();
    }

    /// Notes the outcome of a call: an error an operator must act on is kept (and
    /// logged once) until the same call succeeds.
    pub(super) fn outcome<T>(&self, what: &str, r: Result<T, KubeError>) -> Result<T, KubeError> {
        match &r {
            Ok(_) => {
                self.contact();
                let mut p = self.problems.lock().expect("never poisoned");
                if p.remove(what).is_some() {
                    tracing::info!(member = %self.name, "the API server allows {what} again");
                }
            }
            Err(e) if e.needs_operator() => {
                // The API server answered: it is reachable.
                self.contact();
                let msg = e.to_string();
                let mut p = self.problems.lock().expect("never poisoned");
                if p.get(what) != Some(&msg) {
                    tracing::error!(member = %self.name, "cluster: {msg}");
                    p.insert(what.to_owned(), msg);
                }
            }
            Err(e) => tracing::debug!(member = %self.name, "cluster: {e}"),
        }
        r
    }

    /// Learns the API server's clock at the start (see the etcd member's `calibrate`).
    async fn calibrate(self: Arc<Self>, cancel: CancellationToken) {
        let name = self.keycheck_name();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3)
            && self
                .kube
                .backend_clock()
                .uncertainty_ms()
                .is_none_or(|u| u > 150)
        {
            let _ = self
                .kube
                .get::<SecretObject>(Resource::Secrets, &name)
                .await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(137)) => {}
            }
        }
        self.calibration.send_replace(true);
    }

    /// The key check: creates the key check Secret sealed under this member's key if it
    /// is not there, else opens it.
    async fn check_key(&self) -> Result<KeyCheck, KubeError> {
        let name = self.keycheck_name();
        let existing: Option<SecretObject> =
            self.outcome("get secrets", self.kube.get(Resource::Secrets, &name).await)?;
        let s = match existing {
            Some(s) => s,
            None => {
                let mut s = SecretObject::new(ObjectMeta {
                    name: name.clone(),
                    labels: self.labels(None, None),
                    ..ObjectMeta::default()
                });
                s.set("check", &self.key.seal_check(&self.prefix));
                let created = self.outcome(
                    "create secrets",
                    self.kube.create(Resource::Secrets, &s).await,
                )?;
                if created.is_some() {
                    tracing::info!(member = %self.name, namespace = %self.namespace(), "sealed the cluster's key check: this member's key is the cluster's");
                    return Ok(KeyCheck::Ok);
                }
                match self
                    .kube
                    .get::<SecretObject>(Resource::Secrets, &name)
                    .await?
                {
                    Some(s) => s,
                    None => return Ok(KeyCheck::Unknown),
                }
            }
        };
        Ok(match s.get("check") {
            Some(v) if self.key.opens_check(&self.prefix, &v) => KeyCheck::Ok,
            _ => KeyCheck::Mismatch,
        })
    }

    pub(super) fn mismatch(&self) -> String {
        format!(
            "the cluster key does not open the key check in Secret {}/{}: the members of this prefix use another cluster.key; this member takes no part (it refreshes no shared account and starts no shared chain) until its key is theirs",
            self.namespace(),
            self.keycheck_name()
        )
    }

    /// Renews this member's Leases every third of `lease_ttl`, and tells a seat when
    /// another member's Lease went unrenewed for its duration; the key check first. On
    /// `cancel` releases every Lease it holds: the others take over at once.
    async fn keep_alive(self: Arc<Self>, cancel: CancellationToken) {
        let tick = Duration::from_millis(200).min(self.ttl / 4);
        let renew_every = self.ttl / 3;
        let mut last_renewal = Instant::now();
        let mut checks = 0u32;
        loop {
            let check = self.key_check.borrow().clone();
            if check != KeyCheck::Ok && (check == KeyCheck::Unknown || checks % 75 == 0) {
                match self.check_key().await {
                    Ok(now) => {
                        if now == KeyCheck::Mismatch && check != KeyCheck::Mismatch {
                            tracing::error!(member = %self.name, "{}", self.mismatch());
                        }
                        self.key_check.send_replace(now);
                        self.bump_all();
                    }
                    Err(e) => tracing::debug!(member = %self.name, "cluster: {e}"),
                }
            }
            checks = checks.wrapping_add(1);
            if last_renewal.elapsed() >= renew_every {
                last_renewal = Instant::now();
                self.renew_all().await;
                // A member that holds nothing and hears nothing still knows whether the
                // API server answers (a quiet namespace is no outage).
                let quiet = self.last_contact.lock().expect("never poisoned").elapsed();
                if quiet >= renew_every {
                    let r = self
                        .kube
                        .get::<SecretObject>(Resource::Secrets, &self.keycheck_name())
                        .await;
                    let _ = self.outcome("get secrets", r);
                }
            }
            self.lapse_others();
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(tick) => {}
            }
        }
        // SIGTERM: hand over at once.
        let held: Vec<(String, Lease)> = {
            let mut seats = self.seats.lock().expect("never poisoned");
            seats
                .iter_mut()
                .filter_map(|(id, s)| s.lease.mine.take().map(|(l, _)| (id.clone(), l)))
                .collect()
        };
        let releases = held.into_iter().map(|(id, l)| {
            let me = self.clone();
            async move { me.release(&id, l).await }
        });
        let all = futures_util::future::join_all(releases);
        if tokio::time::timeout(Duration::from_secs(1), all)
            .await
            .is_err()
        {
            tracing::warn!(member = %self.name, "failed to release the cluster's Leases in time; they lapse within the lease's time to live");
        }
    }

    pub(super) fn bump_all(&self) {
        for s in self.seats.lock().expect("never poisoned").values() {
            s.changed.send_modify(|n| *n += 1);
        }
    }

    pub(super) fn with_seat<T>(&self, id: &str, f: impl FnOnce(&mut SeatState) -> T) -> Option<T> {
        self.seats
            .lock()
            .expect("never poisoned")
            .get_mut(id)
            .map(f)
    }
}

impl MemberView for KubeMember {
    fn name(&self) -> &str {
        &self.name
    }
    fn ttl(&self) -> Duration {
        self.ttl
    }
    fn clock(&self) -> Clock {
        self.clock
    }
    fn key(&self) -> &ClusterKey {
        &self.key
    }
    fn memory(&self) -> &Memory {
        &self.memory
    }
    fn key_check(&self) -> KeyCheck {
        self.key_check.borrow().clone()
    }
    fn mismatch_message(&self) -> String {
        self.mismatch()
    }
    fn unreachable_for(&self) -> Option<Duration> {
        let t = *self.last_contact.lock().expect("never poisoned");
        (t.elapsed() >= self.ttl).then(|| t.elapsed())
    }
    fn backend_now_ms(&self) -> Option<i64> {
        self.kube.backend_clock().now_ms(self.clock)
    }
    fn backend_latest_ms(&self) -> Option<i64> {
        self.kube.backend_clock().latest_ms(self.clock)
    }
    async fn calibration(&self) {
        let mut rx = self.calibration.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }
    fn note_provider_offset(&self, _provider_minus_backend: i64) {}
    fn note_provider_date(&self, date: SystemTime, received: SystemTime) {
        *self.provider.lock().expect("never poisoned") =
            Some(crate::clock::unix_ms(date) + 500 - crate::clock::unix_ms(received));
    }
    fn provider_minus_backend(&self) -> Option<i64> {
        let direct = (*self.provider.lock().expect("never poisoned"))?;
        Some(direct - self.kube.backend_clock().offset_ms()?)
    }
    fn skew_warning(&self) -> Option<String> {
        let off = (*self.provider.lock().expect("never poisoned"))?;
        (off.unsigned_abs() > crate::cluster::member::SKEW_LIMIT.as_millis() as u64).then(|| {
            format!(
                "this member's clock is {}s {} the provider's clock: tokens are timed by the lifetime they have left, not by it",
                (off.unsigned_abs() + 500) / 1000,
                if off < 0 { "ahead of" } else { "behind" }
            )
        })
    }
}

impl ClusterStatus for KubeMember {
    fn member(&self) -> &str {
        &self.name
    }

    fn reachable(&self) -> bool {
        self.unreachable_for().is_none()
    }

    fn problem(&self) -> Option<String> {
        let mut parts: Vec<String> = Vec::new();
        if *self.key_check.borrow() == KeyCheck::Mismatch {
            parts.push(self.mismatch());
        }
        parts.extend(
            self.problems
                .lock()
                .expect("never poisoned")
                .values()
                .cloned(),
        );
        parts.extend(self.skew_warning());
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}
