//! The Kubernetes backend of cluster mode (SPEC §8, "The Kubernetes backend"): this
//! member on the API server, and each shared account's [`KubeSeat`].
//!
//! Per shared account (a seat `tokend-{digest}`, the digest keyed by the cluster key over
//! the prefix, name and identity: no account name, URL or client id in the clear):
//! - a `coordination.k8s.io/v1` Lease elects the member that refreshes: `holderIdentity`
//!   is the member, renewed every third of `lease_ttl`; another member takes it over
//!   only after it saw the Lease unchanged for `leaseDurationSeconds` on its own
//!   monotonic clock (as client-go's leader election does: no two clocks compared), and
//!   a member that stops releases it (an empty holder: the others take it at once);
//! - a Secret holds the sealed record (the same AEAD record as on etcd), bound to the
//!   Secret's name, its `uid` and a version counter in an annotation; every write is an
//!   update conditional on the `resourceVersion` read, so a 409 means another member
//!   wrote first: the protocol re-reads and adopts, and never overwrites a newer record;
//! - a second Secret, `tokend-{digest}-ask`, carries a member's sealed request to the
//!   leader.
//!
//! The fencing of a refresh is the protocol's (`coordinate`): the claim of a link is a
//! conditional update of the record Secret made before the request, so of two members
//! that both believe they lead (a Lease taken over from a member cut off) only one
//! claim lands, and the other waits for its answer. The Lease only spares the others
//! the attempt. All objects carry `app.kubernetes.io/managed-by: tokend`; the member
//! watches Secrets and Leases by that label (from the last resourceVersion seen, listing
//! again after 410 Gone) and tells each seat when its objects changed, and a timer tells
//! a seat when its leader's Lease has gone unrenewed for its duration.

pub mod client;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::client::{
    micro_time, Kube, KubeError, Lease, LeaseSpec, ObjectMeta, Resource, SecretObject, WatchEnd,
    WatchEvent, MANAGED_BY,
};
use super::backend::{AccountSeat, MemberView};
use super::member::{KeyCheck, Lead, Position, Stored};
use super::memory::Memory;
use super::record::{ClusterKey, LeaderRequest, Place, Record};
use crate::account::coordinator::ClusterStatus;
use crate::account::identity::RequestIdentity;
use crate::clock::Clock;

/// The label that ties a seat's objects together (its digest).
const SEAT_LABEL: &str = "tokend.dev/seat";
/// The label of every seat of one account name (a keyed digest of it).
const NAME_LABEL: &str = "tokend.dev/account";
/// The annotation that counts the record Secret's writes (part of what a record is
/// sealed to: a record copied from another write does not open).
const VERSION: &str = "tokend.dev/version";
/// The record Secret's data key.
const RECORD: &str = "record";
/// The value of a record Secret created and not written yet.
const NEW: &[u8] = b"new";

/// What this member knows of one seat's Lease.
#[derive(Default)]
struct LeaseView {
    /// Held by this member: the Lease as last written, and until when it surely holds
    /// (from the sending of the write that renewed it).
    mine: Option<(Lease, Instant)>,
    /// Held by another: (holder, resourceVersion) as last seen, when first seen so,
    /// and the duration it claims; whether the seat was told it lapsed.
    other: Option<(String, String, Instant, Duration, bool)>,
}

struct SeatState {
    changed: watch::Sender<u64>,
    lease: LeaseView,
    /// The record write the watch brought last: its resourceVersion and arrival.
    arrival: Option<(i64, Instant)>,
    /// The request last taken from the `-ask` Secret (its resourceVersion).
    taken: Option<String>,
}

pub struct KubeMember {
    kube: Kube,
    key: ClusterKey,
    prefix: String,
    name: String,
    ttl: Duration,
    clock: Clock,
    memory: Memory,
    key_check: watch::Sender<KeyCheck>,
    last_contact: Mutex<Instant>,
    /// What an operator must fix, by (verb, resource): cleared when that call succeeds.
    problems: Mutex<BTreeMap<String, String>>,
    seats: Mutex<HashMap<String, SeatState>>,
    calibration: watch::Sender<bool>,
    /// The provider's clock minus this member's (milliseconds), from a `Date` it received.
    provider: Mutex<Option<i64>>,
}

impl std::fmt::Debug for KubeMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeMember")
            .field("name", &self.name)
            .field("namespace", &self.kube.namespace())
            .finish_non_exhaustive()
    }
}

/// What a member is made of, besides the client.
pub struct Settings {
    pub key: ClusterKey,
    pub prefix: String,
    pub name: String,
    pub ttl: Duration,
    pub clock: Clock,
    pub memory: Memory,
}

fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
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
    fn keycheck_name(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, self.prefix.as_bytes());
        format!("tokend-keycheck-{}", &hex(d.as_ref())[..16])
    }

    fn labels(&self, seat: Option<&str>, name: Option<&str>) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned())]);
        if let Some(s) = seat {
            l.insert(SEAT_LABEL.into(), s.to_owned());
        }
        if let Some(n) = name {
            l.insert(NAME_LABEL.into(), n.to_owned());
        }
        l
    }

    fn contact(&self) {
        *self.last_contact.lock().expect("never poisoned") = Instant::now();
    }

    /// Notes the outcome of a call: an error an operator must act on is kept (and
    /// logged once) until the same call succeeds.
    fn outcome<T>(&self, what: &str, r: Result<T, KubeError>) -> Result<T, KubeError> {
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

    fn mismatch(&self) -> String {
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

    /// Renews every Lease this member holds.
    async fn renew_all(&self) {
        let held: Vec<(String, Lease)> = {
            let seats = self.seats.lock().expect("never poisoned");
            seats
                .iter()
                .filter_map(|(id, s)| s.lease.mine.as_ref().map(|(l, _)| (id.clone(), l.clone())))
                .collect()
        };
        for (id, mut l) in held {
            l.spec.renew_time = Some(micro_time(self.clock.now()));
            let sent = Instant::now();
            let r = self.outcome(
                "update leases",
                self.kube
                    .update(Resource::Leases, &lease_name(&id), &l)
                    .await,
            );
            let mut seats = self.seats.lock().expect("never poisoned");
            let Some(s) = seats.get_mut(&id) else {
                continue;
            };
            match r {
                Ok(Some(new)) => {
                    if s.lease.mine.is_some() {
                        s.lease.mine = Some((new, sent + self.ttl));
                    }
                }
                Ok(None) => {
                    tracing::warn!(member = %self.name, seat = %id, "the account's Lease changed under this member: its lead is lost");
                    s.lease.mine = None;
                    s.changed.send_modify(|n| *n += 1);
                }
                Err(_) => {
                    if s.lease
                        .mine
                        .as_ref()
                        .is_some_and(|(_, until)| Instant::now() >= *until)
                    {
                        tracing::warn!(member = %self.name, seat = %id, "the API server did not renew the account's Lease within its time to live: the lead is lost");
                        s.lease.mine = None;
                        s.changed.send_modify(|n| *n += 1);
                    }
                }
            }
        }
    }

    /// Tells each seat whose leader's Lease went unrenewed for its duration.
    fn lapse_others(&self) {
        let mut seats = self.seats.lock().expect("never poisoned");
        for s in seats.values_mut() {
            if let Some((_, _, seen, dur, told)) = &mut s.lease.other {
                if !*told && seen.elapsed() >= *dur {
                    *told = true;
                    s.changed.send_modify(|n| *n += 1);
                }
            }
        }
    }

    async fn release(&self, id: &str, mut l: Lease) {
        l.spec.holder_identity = None;
        l.spec.lease_duration_seconds = Some(1);
        l.spec.renew_time = Some(micro_time(self.clock.now()));
        match self
            .kube
            .update(Resource::Leases, &lease_name(id), &l)
            .await
        {
            Ok(_) => {
                tracing::debug!(member = %self.name, seat = %id, "released the account's Lease")
            }
            Err(e) => tracing::warn!(member = %self.name, "failed to release a Lease: {e}"),
        }
    }

    /// One watch on `r` by tokend's label: each event tells the seat it belongs to.
    /// Resumes from the last resourceVersion seen; lists again after 410 Gone.
    async fn watch_objects(self: Arc<Self>, r: Resource, cancel: CancellationToken) {
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

    fn bump_all(&self) {
        for s in self.seats.lock().expect("never poisoned").values() {
            s.changed.send_modify(|n| *n += 1);
        }
    }

    /// This member's seat for account `name` with `identity`.
    pub fn seat(self: &Arc<Self>, name: &str, identity: &RequestIdentity) -> KubeSeat {
        let path = self.key.account_path(&self.prefix, name, identity);
        let id = self
            .key
            .seed_digest(&format!("tokend-kubernetes-seat\0{path}"));
        let name_id = self
            .key
            .seed_digest(&format!("tokend-kubernetes-name\0{}\0{name}", self.prefix));
        let changed = self
            .seats
            .lock()
            .expect("never poisoned")
            .entry(id.clone())
            .or_insert_with(|| SeatState {
                changed: watch::Sender::new(0),
                lease: LeaseView::default(),
                arrival: None,
                taken: None,
            })
            .changed
            .subscribe();
        KubeSeat {
            member: self.clone(),
            id,
            name_id,
            changed,
        }
    }

    fn with_seat<T>(&self, id: &str, f: impl FnOnce(&mut SeatState) -> T) -> Option<T> {
        self.seats
            .lock()
            .expect("never poisoned")
            .get_mut(id)
            .map(f)
    }
}

fn lease_name(id: &str) -> String {
    format!("tokend-{id}")
}

fn secret_name(id: &str) -> String {
    format!("tokend-{id}")
}

fn ask_name(id: &str) -> String {
    format!("tokend-{id}-ask")
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
    async fn calibration(&self) {
        let mut rx = self.calibration.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }
    fn note_provider_offset(&self, _provider_minus_backend: i64) {}
    fn note_provider_date(&self, date: SystemTime, received: SystemTime) {
        *self.provider.lock().expect("never poisoned") =
            Some(unix_ms(date) + 500 - unix_ms(received));
    }
    fn provider_minus_backend(&self) -> Option<i64> {
        let direct = (*self.provider.lock().expect("never poisoned"))?;
        Some(direct - self.kube.backend_clock().offset_ms()?)
    }
    fn skew_warning(&self) -> Option<String> {
        let off = (*self.provider.lock().expect("never poisoned"))?;
        (off.unsigned_abs() > super::member::SKEW_LIMIT.as_millis() as u64).then(|| {
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

/// One shared account's Lease and Secrets.
pub struct KubeSeat {
    member: Arc<KubeMember>,
    /// The keyed digest that names its objects.
    id: String,
    /// The keyed digest of the account's name (its label).
    name_id: String,
    changed: watch::Receiver<u64>,
}

impl KubeSeat {
    fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name,
            labels: self.member.labels(Some(&self.id), Some(&self.name_id)),
            ..ObjectMeta::default()
        }
    }

    /// Whether this member surely holds the Lease now (with a tenth of its time to live
    /// to spare for the request that relies on it).
    fn leads(&self) -> bool {
        let ttl = self.member.ttl;
        self.member
            .with_seat(&self.id, |s| {
                s.lease
                    .mine
                    .as_ref()
                    .is_some_and(|(_, until)| Instant::now() + ttl / 10 < *until)
            })
            .unwrap_or(false)
    }

    fn spec(&self, transitions: i64) -> LeaseSpec {
        let now = micro_time(self.member.clock.now());
        LeaseSpec {
            holder_identity: Some(self.member.name.clone()),
            lease_duration_seconds: Some(self.member.ttl.as_secs().max(1) as i64),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
        }
    }

    fn hold(&self, l: Lease, sent: Instant) {
        let until = sent + self.member.ttl;
        self.member.with_seat(&self.id, |s| {
            s.lease.mine = Some((l, until));
            s.lease.other = None;
        });
    }

    fn position(s: &SecretObject) -> Option<Position> {
        let revision = s.metadata.resource_version.as_deref()?.parse().ok()?;
        let uid = s.metadata.uid.as_deref().unwrap_or_default();
        let d = ring::digest::digest(&ring::digest::SHA256, uid.as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&d.as_ref()[..8]);
        Some(Position {
            revision,
            place: Place {
                create_revision: i64::from_be_bytes(b) & i64::MAX,
                version: s
                    .metadata
                    .annotations
                    .get(VERSION)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            },
        })
    }

    fn judge(&self, at: &str, s: &SecretObject) -> Stored {
        let Some(pos) = Self::position(s) else {
            return Stored::Absent;
        };
        let value = s.get(RECORD).unwrap_or_default();
        if value == NEW {
            return Stored::New(pos);
        }
        match self.member.key.open(at, pos.place, &value) {
            Ok(r) => Stored::Sealed(Box::new(r), pos),
            Err(e) => Stored::Refused(e, pos),
        }
    }

    async fn swap(
        &self,
        at: Position,
        record: &Record,
        lead: bool,
    ) -> Result<Option<Position>, KubeError> {
        if lead && !self.leads() {
            return Ok(None);
        }
        let name = secret_name(&self.id);
        let place = Place {
            create_revision: at.place.create_revision,
            version: at.place.version + 1,
        };
        let mut s = SecretObject::new(self.meta(name.clone()));
        s.metadata.resource_version = Some(at.revision.to_string());
        s.metadata
            .annotations
            .insert(VERSION.into(), place.version.to_string());
        s.set(
            RECORD,
            &self.member.key.seal(&self.record_key(), place, record),
        );
        let r = self.member.outcome(
            "update secrets",
            self.member.kube.update(Resource::Secrets, &name, &s).await,
        )?;
        Ok(r.and_then(|s| Self::position(&s))
            .filter(|p| p.place == place))
    }
}

impl AccountSeat for KubeSeat {
    type Member = KubeMember;
    type Error = KubeError;

    fn member(&self) -> &KubeMember {
        &self.member
    }

    fn status(&self) -> Arc<dyn ClusterStatus> {
        self.member.clone()
    }

    fn record_key(&self) -> String {
        format!(
            "kubernetes:{}/secrets/{}",
            self.member.namespace(),
            secret_name(&self.id)
        )
    }

    fn arrived(&self, revision: i64) -> Option<Instant> {
        self.member
            .with_seat(&self.id, |s| s.arrival)
            .flatten()
            .filter(|(r, _)| *r == revision)
            .map(|(_, at)| at)
    }

    async fn changed(&mut self) {
        if self.changed.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    async fn campaign(&self) -> Result<Lead, KubeError> {
        if self.member.key_check.borrow().clone() != KeyCheck::Ok {
            return Ok(Lead::Unknown);
        }
        if self.leads() {
            return Ok(Lead::Me);
        }
        let m = &self.member;
        let name = lease_name(&self.id);
        for _ in 0..2 {
            let sent = Instant::now();
            let current: Option<Lease> =
                m.outcome("get leases", m.kube.get(Resource::Leases, &name).await)?;
            let Some(mut l) = current else {
                let new = Lease::new(self.meta(name.clone()), self.spec(0));
                match m.outcome("create leases", m.kube.create(Resource::Leases, &new).await)? {
                    Some(l) => {
                        self.hold(l, sent);
                        return Ok(Lead::Me);
                    }
                    None => continue,
                }
            };
            let holder = l.spec.holder_identity.clone().unwrap_or_default();
            let rv = l.metadata.resource_version.clone().unwrap_or_default();
            let dur = Duration::from_secs(l.spec.lease_duration_seconds.unwrap_or(1).max(1) as u64);
            let free = if holder.is_empty() || holder == m.name {
                true
            } else {
                // Lapsed when this member saw it unchanged for its duration.
                let seen = m
                    .with_seat(&self.id, |s| match &s.lease.other {
                        Some((h, r, at, _, _)) if *h == holder && *r == rv => Some(*at),
                        _ => {
                            s.lease.other =
                                Some((holder.clone(), rv.clone(), Instant::now(), dur, false));
                            None
                        }
                    })
                    .flatten();
                seen.is_some_and(|at| at.elapsed() >= dur)
            };
            if !free {
                return Ok(Lead::Other(holder));
            }
            let transitions = l.spec.lease_transitions.unwrap_or(0) + i64::from(holder != m.name);
            let mut spec = self.spec(transitions);
            if holder == m.name {
                spec.acquire_time = l.spec.acquire_time.clone();
            }
            l.spec = spec;
            l.metadata.labels = self.meta(String::new()).labels;
            match m.outcome(
                "update leases",
                m.kube.update(Resource::Leases, &name, &l).await,
            )? {
                Some(l) => {
                    if holder != m.name {
                        tracing::info!(member = %m.name, seat = %self.id, previous = %holder, "took over the account's Lease");
                    }
                    self.hold(l, sent);
                    return Ok(Lead::Me);
                }
                None => continue,
            }
        }
        Ok(Lead::Unknown)
    }

    async fn read(&self) -> Result<Stored, KubeError> {
        let m = &self.member;
        let s: Option<SecretObject> = m.outcome(
            "get secrets",
            m.kube.get(Resource::Secrets, &secret_name(&self.id)).await,
        )?;
        Ok(match s {
            None => Stored::Absent,
            Some(s) => self.judge(&self.record_key(), &s),
        })
    }

    async fn create(&self) -> Result<bool, KubeError> {
        if !self.leads() {
            return Ok(false);
        }
        let mut s = SecretObject::new(self.meta(secret_name(&self.id)));
        s.metadata.annotations.insert(VERSION.into(), "1".into());
        s.set(RECORD, NEW);
        let m = &self.member;
        Ok(
            m.outcome("create secrets", m.kube.create(Resource::Secrets, &s).await)?
                .is_some(),
        )
    }

    async fn claim(&self, at: Position, record: &Record) -> Result<Option<Position>, KubeError> {
        self.swap(at, record, true).await
    }

    async fn write(&self, at: Position, record: &Record) -> Result<Option<Position>, KubeError> {
        self.swap(at, record, false).await
    }

    async fn others(&self) -> Result<Vec<Record>, KubeError> {
        let m = &self.member;
        let selector = format!(
            "{}={},{NAME_LABEL}={}",
            MANAGED_BY.0, MANAGED_BY.1, self.name_id
        );
        let (items, _) = m.outcome(
            "list secrets",
            m.kube
                .list::<SecretObject>(Resource::Secrets, &selector)
                .await,
        )?;
        let mine = secret_name(&self.id);
        Ok(items
            .iter()
            .filter(|s| s.metadata.name != mine && !s.metadata.name.ends_with("-ask"))
            .filter_map(|s| {
                let at = format!("kubernetes:{}/secrets/{}", m.namespace(), s.metadata.name);
                match self.judge(&at, s) {
                    Stored::Sealed(r, _) => Some(*r),
                    _ => None,
                }
            })
            .collect())
    }

    fn other_identities(&self) -> BTreeSet<String> {
        // Presence is not tracked on this backend (a Lease per member and account would
        // double the objects): the records of other identities still guard the seed.
        BTreeSet::new()
    }

    async fn ask(&self, request: &LeaderRequest) -> Result<(), KubeError> {
        let m = &self.member;
        let name = ask_name(&self.id);
        let at = format!("kubernetes:{}/secrets/{name}", m.namespace());
        let value = m.key.seal_request(&at, request);
        for _ in 0..3 {
            let current: Option<SecretObject> =
                m.outcome("get secrets", m.kube.get(Resource::Secrets, &name).await)?;
            let done = match current {
                None => {
                    let mut s = SecretObject::new(self.meta(name.clone()));
                    s.set("request", &value);
                    m.outcome("create secrets", m.kube.create(Resource::Secrets, &s).await)?
                        .is_some()
                }
                Some(mut s) => {
                    s.set("request", &value);
                    m.outcome(
                        "update secrets",
                        m.kube.update(Resource::Secrets, &name, &s).await,
                    )?
                    .is_some()
                }
            };
            if done {
                return Ok(());
            }
        }
        Err(KubeError::Unreachable(
            "the request to the leader kept changing under this member".into(),
        ))
    }

    async fn take_request(&self) -> Result<Option<(LeaderRequest, i64)>, KubeError> {
        let m = &self.member;
        let name = ask_name(&self.id);
        let Some(mut s) = m.kube.get::<SecretObject>(Resource::Secrets, &name).await? else {
            return Ok(None);
        };
        let Some(value) = s.get("request").filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let rv = s.metadata.resource_version.clone().unwrap_or_default();
        if m.with_seat(&self.id, |st| st.taken.as_ref() == Some(&rv))
            .unwrap_or(false)
        {
            return Ok(None);
        }
        s.data.remove("request");
        let Some(cleared) = m.outcome(
            "update secrets",
            m.kube.update(Resource::Secrets, &name, &s).await,
        )?
        else {
            // Someone wrote a newer request meanwhile: it is taken next time.
            return Ok(None);
        };
        m.with_seat(&self.id, |st| {
            st.taken = cleared.metadata.resource_version.clone()
        });
        let at = format!("kubernetes:{}/secrets/{name}", m.namespace());
        Ok(m.key
            .open_request(&at, &value)
            .ok()
            .map(|r| (r, rv.parse().unwrap_or(0))))
    }

    async fn resign(&self) -> Result<(), KubeError> {
        let held = self
            .member
            .with_seat(&self.id, |s| s.lease.mine.take().map(|(l, _)| l))
            .flatten();
        if let Some(l) = held {
            self.member.release(&self.id, l).await;
        }
        Ok(())
    }
}
