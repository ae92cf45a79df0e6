//! This tokend as a member of a cluster (SPEC §8), on etcd:
//! - the key check: `{prefix}/keycheck` holds a value sealed under the cluster key (the
//!   first member writes it); a member whose key cannot open it takes no part;
//! - its lease (kept alive every third of its time to live; when it lapses every lead it
//!   held lapses with it), and what it knows of the lease's end on its own monotonic clock;
//! - one watch on the cluster's prefix that tells each account's [`Seat`] when its keys
//!   changed, checked beside it: every quarter of the lease's time to live the watch's
//!   endpoint must answer a read with a quorum behind it, else the watch moves to another
//!   endpoint, from the last revision it saw (and from the compaction's revision, with
//!   everything read again, when that is gone);
//! - per account (a [`Seat`]: `{prefix}/accounts/{name}/{digest}/`): the election (a
//!   `leader` key created under the member's lease), the sealed `record` written by
//!   compare-and-swap on its revision, the live members of each identity (`members/`
//!   keys under their leases) and a member's request to the leader (`request`);
//! - this member's clock against etcd's and the provider's.
//!
//! The protocol built on these (claims, the link in flight, generations) lives in
//! `coordinate`; the wire in `etcd`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::etcd::{Compare, Etcd, EtcdError, Event, Kv, Op, WatchEnd};
use super::memory::Memory;
use super::record::{ClusterKey, LeaderRequest, Place, Record, SealError};
use crate::account::identity::RequestIdentity;
use crate::clock::Clock;

/// Who leads an account, as this member last learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lead {
    /// This member.
    Me,
    /// Another member, by name.
    Other(String),
    /// Nobody (the key is free), or not known (etcd unreachable, or this member takes
    /// no part).
    Unknown,
}

/// Whether this member's cluster key is the cluster's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// Not known yet (etcd not reached yet).
    Unknown,
    Ok,
    /// Another key sealed the cluster's key check: this member takes no part.
    Mismatch,
}

/// The value of a record key that was created and not written yet.
const NEW: &[u8] = b"new";

/// How well etcd's clock is to be known before a record read is timed by it.
const CALIBRATED: Duration = Duration::from_millis(150);

/// How far apart two clocks may be before it is said (issue #20).
pub const SKEW_LIMIT: Duration = Duration::from_secs(30);

/// A lease of this member's, and until when it is surely alive (on the monotonic clock:
/// from the sending of the request that granted or renewed it).
#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    until: Instant,
}

pub struct Member {
    etcd: Arc<Etcd>,
    key: ClusterKey,
    prefix: String,
    name: String,
    ttl: Duration,
    clock: Clock,
    memory: Memory,
    /// The member's lease; none until granted, and after it lapsed.
    lease: watch::Sender<Option<Lease>>,
    key_check: watch::Sender<KeyCheck>,
    /// Since when etcd has not answered a call this member made (none while it
    /// answers): out of reach is counted from a call that failed, not from the last
    /// answer, so a member that was stopped (SIGSTOP, a VM migrated) is not cut off
    /// before it even asked again.
    unanswered: Mutex<Option<Instant>>,
    /// Each seat's change counter, by its path.
    seats: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// The live members of each account identity (by path), from their `members/` keys.
    presence: Mutex<HashMap<String, BTreeSet<String>>>,
    /// The provider's clock as this member learned it.
    provider: Mutex<ProviderClock>,
    /// When the watch brought each account's latest record write (by path): its
    /// revision and arrival, which times a record better than any clock.
    arrivals: Mutex<HashMap<String, (i64, Instant)>>,
    /// Whether the start's calibration of etcd's clock is over.
    calibration: watch::Sender<bool>,
}

/// What this member knows of the provider's clock.
#[derive(Debug, Default)]
struct ProviderClock {
    /// The provider's clock minus this member's (milliseconds), from a `Date` this
    /// member received itself, and when.
    direct: Option<(i64, Instant)>,
    /// The provider's clock minus the backend's (milliseconds), as the latest record
    /// said (measured by its writer).
    via_record: Option<i64>,
    /// Whether the skew was said to be over the limit (it is logged when that changes).
    told: bool,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// What a member is made of, besides etcd.
pub struct Settings {
    pub key: ClusterKey,
    pub prefix: String,
    pub name: String,
    pub ttl: Duration,
    pub clock: Clock,
    pub memory: Memory,
}

impl Member {
    /// Joins the cluster: checks the key, keeps a lease alive and watches the prefix,
    /// until `cancel` (then hands its leads over), on `tracker`. Returns at once; etcd
    /// may be unreachable for now.
    pub fn start(
        etcd: Etcd,
        settings: Settings,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Arc<Member> {
        let m = Arc::new(Member {
            etcd: Arc::new(etcd),
            key: settings.key,
            prefix: settings.prefix.trim_end_matches('/').to_owned(),
            name: settings.name,
            ttl: settings.ttl,
            clock: settings.clock,
            memory: settings.memory,
            lease: watch::Sender::new(None),
            key_check: watch::Sender::new(KeyCheck::Unknown),
            // Out of reach counts from the start: a member that just started has not
            // been cut off for a lease's time yet.
            unanswered: Mutex::new(None),
            seats: Mutex::new(HashMap::new()),
            presence: Mutex::new(HashMap::new()),
            provider: Mutex::new(ProviderClock::default()),
            arrivals: Mutex::new(HashMap::new()),
            calibration: watch::Sender::new(false),
        });
        tracker.spawn(m.clone().keep_alive(cancel.clone()));
        tracker.spawn(m.clone().watch_prefix(cancel.clone()));
        tracker.spawn(m.clone().calibrate(cancel));
        m
    }

    /// Learns etcd's clock well at the start: reads spread over a second (each
    /// answer's `Date` bounds the offset to its second; answers at many points of a
    /// second narrow it to tens of milliseconds), until the bounds are within
    /// [`CALIBRATED`] or a few seconds passed. A record read at the start (not seen
    /// as it was written) is timed by it.
    async fn calibrate(self: Arc<Self>, cancel: CancellationToken) {
        let at = format!("{}/keycheck", self.prefix);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) && !self.calibrated() {
            let _ = self.etcd.get(&at).await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                // Not a divisor of a second: the reads land at ever other points of it.
                _ = tokio::time::sleep(Duration::from_millis(137)) => {}
            }
        }
        self.calibration.send_replace(true);
    }

    /// Whether etcd's clock is known well enough to time records read (not watched).
    fn calibrated(&self) -> bool {
        self.etcd
            .backend_clock()
            .uncertainty_ms()
            .is_some_and(|u| u <= CALIBRATED.as_millis() as i64)
    }

    /// Waits (a few seconds at most, at the start) until etcd's clock is known well.
    pub async fn calibration(&self) {
        let mut rx = self.calibration.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    pub fn key(&self) -> &ClusterKey {
        &self.key
    }

    pub fn memory(&self) -> &Memory {
        &self.memory
    }

    /// The key check's outcome so far.
    pub fn key_check(&self) -> KeyCheck {
        self.key_check.borrow().clone()
    }

    /// etcd's time now (Unix milliseconds), as its answers told this member.
    pub fn backend_now_ms(&self) -> Option<i64> {
        self.etcd.backend_clock().now_ms(self.clock)
    }

    /// Whether etcd answered this member's calls within the lease's time to live of
    /// the first that failed.
    pub fn reachable(&self) -> bool {
        self.unreachable_for().is_none()
    }

    /// How long etcd has not answered this member's calls, once that is the lease's
    /// time to live or more (none before).
    pub fn unreachable_for(&self) -> Option<Duration> {
        let since = (*self.unanswered.lock().expect("never poisoned"))?;
        Some(since.elapsed()).filter(|d| *d >= self.ttl)
    }

    fn contact(&self) {
        *self.unanswered.lock().expect("never poisoned") = None;
    }

    /// A call to etcd failed (no endpoint answered).
    fn no_answer(&self) {
        self.unanswered
            .lock()
            .expect("never poisoned")
            .get_or_insert_with(Instant::now);
    }

    /// The member's lease, if it is surely alive now (with a margin of a tenth of its
    /// time to live for the request that relies on it).
    fn live_lease(&self) -> Option<i64> {
        let l = (*self.lease.borrow())?;
        (Instant::now() + self.ttl / 10 < l.until).then_some(l.id)
    }

    /// Waits until this member holds a lease (or `cancel`).
    pub async fn wait_for_lease(&self, cancel: &CancellationToken) -> Option<i64> {
        let mut rx = self.lease.subscribe();
        tokio::select! {
            _ = cancel.cancelled() => None,
            r = rx.wait_for(Option::is_some) => r.ok().and_then(|l| l.map(|l| l.id)),
        }
    }

    /// Records the provider's `Date` on an answer received at `received` (this
    /// member's clock).
    pub fn note_provider_date(&self, date: SystemTime, received: SystemTime) {
        // A Date has whole seconds: the middle of the second it names.
        let offset = unix_ms(date) + 500 - unix_ms(received);
        self.provider.lock().expect("never poisoned").direct = Some((offset, Instant::now()));
        self.tell_skew();
    }

    /// Records the provider's clock against etcd's, as a record's writer measured it.
    pub fn note_provider_offset(&self, provider_minus_backend: i64) {
        self.provider.lock().expect("never poisoned").via_record = Some(provider_minus_backend);
        self.tell_skew();
    }

    /// The provider's clock minus the backend's (milliseconds), as this member
    /// measured it, for the records it writes.
    pub fn provider_minus_backend(&self) -> Option<i64> {
        let p = self.provider.lock().expect("never poisoned");
        let (direct, _) = p.direct?;
        Some(direct - self.etcd.backend_clock().offset_ms()?)
    }

    /// This member's clock against the provider's (positive: this member is ahead),
    /// and what it was compared with: the provider's `Date` (seen here, or by the
    /// record's writer through etcd's clock), else etcd's.
    pub fn clock_skew(&self) -> Option<(Duration, bool, &'static str)> {
        let backend = self.etcd.backend_clock().offset_ms();
        let p = self.provider.lock().expect("never poisoned");
        let fresh_direct = p
            .direct
            .filter(|(_, at)| at.elapsed() < Duration::from_secs(3600))
            .map(|(o, _)| o);
        let (other_minus_me, against) = match (fresh_direct, p.via_record, backend) {
            (Some(d), _, _) => (d, "the provider's"),
            (None, Some(r), Some(b)) => (r + b, "the provider's"),
            (None, _, Some(b)) => (b, "etcd's"),
            (None, _, None) => return None,
        };
        let ahead = other_minus_me < 0;
        Some((
            Duration::from_millis(other_minus_me.unsigned_abs()),
            ahead,
            against,
        ))
    }

    /// A sentence on this member's clock when it is off by more than [`SKEW_LIMIT`].
    pub fn skew_warning(&self) -> Option<String> {
        let (by, ahead, against) = self.clock_skew()?;
        (by > SKEW_LIMIT).then(|| {
            format!(
                "this member's clock is {} {} {against} clock: tokens are timed by the lifetime they have left, not by it",
                // Whole seconds: a `Date` tells no more.
                humantime::format_duration(Duration::from_secs((by.as_millis() as u64 + 500) / 1000)),
                if ahead { "ahead of" } else { "behind" },
            )
        })
    }

    /// Logs the clock's skew when it crosses the limit.
    fn tell_skew(&self) {
        let warning = self.skew_warning();
        let mut p = self.provider.lock().expect("never poisoned");
        match (&warning, p.told) {
            (Some(w), false) => {
                tracing::warn!(member = %self.name, "{w}");
                p.told = true;
            }
            (None, true) => {
                tracing::info!(member = %self.name, "this member's clock agrees with the provider's again");
                p.told = false;
            }
            _ => {}
        }
    }

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
    async fn keep_alive(self: Arc<Self>, cancel: CancellationToken) {
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
    async fn announce(&self, path: &str) {
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

    /// One watch on the whole prefix; each change bumps the counter of the seat it
    /// belongs to. Beside it, every quarter of the lease's time to live, the watch's
    /// endpoint must answer a read of the prefix: a member that hangs (stopped, or cut
    /// from its quorum) is left for another, and the watch goes on from the last
    /// revision it saw. After an interruption every seat is bumped (it reads again).
    async fn watch_prefix(self: Arc<Self>, cancel: CancellationToken) {
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
        let seat = Seat {
            member: self.clone(),
            path: path.clone(),
            name: name.to_owned(),
            changed,
        };
        let me = self.clone();
        tokio::spawn(async move { me.announce(&path).await });
        seat
    }
}

/// What the log, `status` and `check` say of a member whose key is not the cluster's.
pub fn mismatch_message(prefix: &str) -> String {
    format!(
        "the cluster key does not open the key check at {prefix}/keycheck: the members of this prefix use another cluster.key; this member takes no part (it refreshes no shared account and starts no shared chain) until its key is theirs"
    )
}

/// `(path, rest)` of a key under `root`: `{root}{name}/{digest}` and what follows it.
fn split_key<'a>(root: &str, key: &'a str) -> Option<(&'a str, &'a str)> {
    let rel = key.strip_prefix(root)?;
    let mut parts = rel.splitn(3, '/');
    let (name, digest, rest) = (parts.next()?, parts.next()?, parts.next()?);
    let len = root.len() + name.len() + 1 + digest.len();
    Some((&key[..len], rest))
}

fn name_of<'a>(root: &str, path: &'a str) -> &'a str {
    path.strip_prefix(root)
        .and_then(|r| r.split('/').next())
        .unwrap_or_default()
}

fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

impl crate::account::coordinator::ClusterStatus for Member {
    fn member(&self) -> &str {
        &self.name
    }

    fn reachable(&self) -> bool {
        Member::reachable(self)
    }

    fn problem(&self) -> Option<String> {
        match self.key_check() {
            KeyCheck::Mismatch => Some(mismatch_message(&self.prefix)),
            _ => self.skew_warning(),
        }
    }

    fn clock_skew_seconds(&self) -> Option<f64> {
        let (by, ahead, _) = self.clock_skew()?;
        let s = by.as_secs_f64();
        Some(if ahead { s } else { -s })
    }
}

/// Where a record is in etcd: the revision of its last write and its place in its
/// key's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub revision: i64,
    pub place: Place,
}

impl Position {
    fn of(kv: &Kv) -> Self {
        Position {
            revision: kv.mod_revision,
            place: Place {
                create_revision: kv.create_revision,
                version: kv.version,
            },
        }
    }

    /// Where the next write puts the record.
    fn next(self) -> Place {
        Place {
            create_revision: self.place.create_revision,
            version: self.place.version + 1,
        }
    }
}

/// An account's record key, as read.
pub enum Stored {
    /// No record key.
    Absent,
    /// Created, not written yet.
    New(Position),
    Sealed(Box<Record>, Position),
    /// There, but it does not open here (another key, altered, put back).
    Refused(SealError, Position),
}

/// One account's place in the cluster.
pub struct Seat {
    member: Arc<Member>,
    path: String,
    name: String,
    changed: watch::Receiver<u64>,
}

impl Seat {
    pub fn member(&self) -> &Arc<Member> {
        &self.member
    }

    /// `{prefix}/accounts/{name}/{digest}`.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn leader_key(&self) -> String {
        format!("{}/leader", self.path)
    }

    pub fn record_key(&self) -> String {
        format!("{}/record", self.path)
    }

    fn request_key(&self) -> String {
        format!("{}/request", self.path)
    }

    /// When the watch brought the record write of `revision`, if it did (a write seen
    /// as it happened: its age is known to a few milliseconds).
    pub fn arrived(&self, revision: i64) -> Option<Instant> {
        self.member
            .arrivals
            .lock()
            .expect("never poisoned")
            .get(&self.path)
            .filter(|(r, _)| *r == revision)
            .map(|(_, at)| *at)
    }

    /// Waits until the account's keys may have changed.
    pub async fn changed(&mut self) {
        if self.changed.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Takes the lead if nobody holds it; says who leads.
    pub async fn campaign(&self) -> Result<Lead, EtcdError> {
        if self.member.key_check() != KeyCheck::Ok {
            return Ok(Lead::Unknown);
        }
        let Some(lease) = self.member.live_lease() else {
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

    /// The account's record as it is in etcd now.
    pub async fn read(&self) -> Result<Stored, EtcdError> {
        let at = self.record_key();
        let kv = self.member.etcd.get(&at).await?;
        self.member.contact();
        Ok(self.judge(&at, kv))
    }

    fn judge(&self, at: &str, kv: Option<Kv>) -> Stored {
        let Some(kv) = kv else {
            return Stored::Absent;
        };
        let pos = Position::of(&kv);
        if kv.value == NEW {
            return Stored::New(pos);
        }
        match self.member.key.open(at, pos.place, &kv.value) {
            Ok(r) => Stored::Sealed(Box::new(r), pos),
            Err(e) => Stored::Refused(e, pos),
        }
    }

    /// Creates the record key (not yet a record), if this member still leads and
    /// nobody created it: a sealed record is bound to the revision that created its key.
    pub async fn create(&self) -> Result<bool, EtcdError> {
        let Some(lease) = self.member.live_lease() else {
            return Ok(false);
        };
        let at = self.record_key();
        let r = self
            .member
            .etcd
            .txn(
                &[
                    Compare::Lease(self.leader_key(), lease),
                    Compare::CreateRevision(at.clone(), 0),
                ],
                &[Op::Put {
                    key: at,
                    value: NEW.to_vec(),
                    lease: 0,
                }],
                &[],
            )
            .await?;
        self.member.contact();
        Ok(r.succeeded)
    }

    /// Writes `record` over the one at `at` if it is still there and this member still
    /// holds the lead: the claim of a link. Where the record is then.
    pub async fn claim(
        &self,
        at: Position,
        record: &Record,
    ) -> Result<Option<Position>, EtcdError> {
        let Some(lease) = self.member.live_lease() else {
            return Ok(None);
        };
        self.swap(at, record, Some(lease)).await
    }

    /// Writes `record` over the one at `at` if it is still there (whoever leads): the
    /// answer to a claimed link. Where the record is then.
    pub async fn write(
        &self,
        at: Position,
        record: &Record,
    ) -> Result<Option<Position>, EtcdError> {
        self.swap(at, record, None).await
    }

    async fn swap(
        &self,
        at: Position,
        record: &Record,
        lease: Option<i64>,
    ) -> Result<Option<Position>, EtcdError> {
        let key = self.record_key();
        let place = at.next();
        let sealed = self.member.key.seal(&key, place, record);
        let mut compare = vec![Compare::ModRevision(key.clone(), at.revision)];
        if let Some(lease) = lease {
            compare.push(Compare::Lease(self.leader_key(), lease));
        }
        let r = self
            .member
            .etcd
            .txn(
                &compare,
                &[Op::Put {
                    key,
                    value: sealed,
                    lease: 0,
                }],
                &[],
            )
            .await?;
        self.member.contact();
        Ok(r.succeeded.then_some(Position {
            revision: r.revision,
            place,
        }))
    }

    /// The records of the other identities of this account's name (the ones that open).
    pub async fn others(&self) -> Result<Vec<Record>, EtcdError> {
        let root = format!("{}/accounts/{}/", self.member.prefix, self.name);
        let (kvs, _) = self.member.etcd.get_prefix(&root).await?;
        self.member.contact();
        Ok(kvs
            .into_iter()
            .filter(|kv| kv.key.ends_with("/record") && !kv.key.starts_with(&self.path))
            .filter_map(|kv| {
                let key = kv.key.clone();
                match self.judge(&key, Some(kv)) {
                    Stored::Sealed(r, _) => Some(*r),
                    _ => None,
                }
            })
            .collect())
    }

    /// The live members of this account's name that have another identity.
    pub fn other_identities(&self) -> BTreeSet<String> {
        let root = format!("{}/accounts/", self.member.prefix);
        let p = self.member.presence.lock().expect("never poisoned");
        p.iter()
            .filter(|(path, _)| **path != self.path && name_of(&root, path) == self.name)
            .flat_map(|(_, members)| members.iter().cloned())
            .collect()
    }

    /// Asks the account's leader for a refresh.
    pub async fn ask(&self, request: &LeaderRequest) -> Result<(), EtcdError> {
        let at = self.request_key();
        let value = self.member.key.seal_request(&at, request);
        self.member
            .etcd
            .txn(
                &[],
                &[Op::Put {
                    key: at,
                    value,
                    lease: 0,
                }],
                &[],
            )
            .await?;
        self.member.contact();
        Ok(())
    }

    /// Takes a member's request to the leader, if one waits: it is removed (if nobody
    /// wrote a newer one meanwhile). The request and the revision it was written at.
    pub async fn take_request(&self) -> Result<Option<(LeaderRequest, i64)>, EtcdError> {
        let at = self.request_key();
        let Some(kv) = self.member.etcd.get(&at).await? else {
            return Ok(None);
        };
        self.member
            .etcd
            .txn(
                &[Compare::ModRevision(at.clone(), kv.mod_revision)],
                &[Op::Delete(at.clone())],
                &[],
            )
            .await?;
        self.member.contact();
        Ok(self
            .member
            .key
            .open_request(&at, &kv.value)
            .ok()
            .map(|r| (r, kv.mod_revision)))
    }

    /// Gives up the lead, if held (the account stops here, or the member leaves).
    pub async fn resign(&self) -> Result<(), EtcdError> {
        let Some(l) = *self.member.lease.borrow() else {
            return Ok(());
        };
        let members = format!("{}/members/{}", self.path, self.member.name);
        self.member
            .etcd
            .txn(
                &[Compare::Lease(self.leader_key(), l.id)],
                &[Op::Delete(self.leader_key()), Op::Delete(members.clone())],
                &[Op::Delete(members)],
            )
            .await
            .map(drop)
    }
}

impl super::backend::MemberView for Member {
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
        Member::key_check(self)
    }
    fn mismatch_message(&self) -> String {
        mismatch_message(&self.prefix)
    }
    fn unreachable_for(&self) -> Option<Duration> {
        Member::unreachable_for(self)
    }
    fn backend_now_ms(&self) -> Option<i64> {
        Member::backend_now_ms(self)
    }
    fn calibration(&self) -> impl std::future::Future<Output = ()> + Send {
        Member::calibration(self)
    }
    fn note_provider_offset(&self, provider_minus_backend: i64) {
        Member::note_provider_offset(self, provider_minus_backend)
    }
    fn note_provider_date(&self, date: SystemTime, received: SystemTime) {
        Member::note_provider_date(self, date, received)
    }
    fn provider_minus_backend(&self) -> Option<i64> {
        Member::provider_minus_backend(self)
    }
    fn skew_warning(&self) -> Option<String> {
        Member::skew_warning(self)
    }
}

impl super::backend::AccountSeat for Seat {
    type Member = Member;
    type Error = EtcdError;

    fn member(&self) -> &Member {
        &self.member
    }
    fn status(&self) -> Arc<dyn crate::account::coordinator::ClusterStatus> {
        self.member.clone()
    }
    fn record_key(&self) -> String {
        Seat::record_key(self)
    }
    fn arrived(&self, revision: i64) -> Option<Instant> {
        Seat::arrived(self, revision)
    }
    fn changed(&mut self) -> impl std::future::Future<Output = ()> + Send {
        Seat::changed(self)
    }
    fn campaign(&self) -> impl std::future::Future<Output = Result<Lead, EtcdError>> + Send {
        Seat::campaign(self)
    }
    fn read(&self) -> impl std::future::Future<Output = Result<Stored, EtcdError>> + Send {
        Seat::read(self)
    }
    fn create(&self) -> impl std::future::Future<Output = Result<bool, EtcdError>> + Send {
        Seat::create(self)
    }
    fn claim(
        &self,
        at: Position,
        record: &Record,
    ) -> impl std::future::Future<Output = Result<Option<Position>, EtcdError>> + Send {
        Seat::claim(self, at, record)
    }
    fn write(
        &self,
        at: Position,
        record: &Record,
    ) -> impl std::future::Future<Output = Result<Option<Position>, EtcdError>> + Send {
        Seat::write(self, at, record)
    }
    fn others(&self) -> impl std::future::Future<Output = Result<Vec<Record>, EtcdError>> + Send {
        Seat::others(self)
    }
    fn other_identities(&self) -> BTreeSet<String> {
        Seat::other_identities(self)
    }
    fn ask(
        &self,
        request: &LeaderRequest,
    ) -> impl std::future::Future<Output = Result<(), EtcdError>> + Send {
        Seat::ask(self, request)
    }
    fn take_request(
        &self,
    ) -> impl std::future::Future<Output = Result<Option<(LeaderRequest, i64)>, EtcdError>> + Send
    {
        Seat::take_request(self)
    }
    fn resign(&self) -> impl std::future::Future<Output = Result<(), EtcdError>> + Send {
        Seat::resign(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_the_account_path_and_what_follows() {
        let root = "/p/accounts/";
        assert_eq!(
            split_key(root, "/p/accounts/a/00ff/members/m1"),
            Some(("/p/accounts/a/00ff", "members/m1"))
        );
        assert_eq!(
            split_key(root, "/p/accounts/a/00ff/record"),
            Some(("/p/accounts/a/00ff", "record"))
        );
        assert_eq!(split_key(root, "/p/accounts/a/00ff"), None);
        assert_eq!(split_key(root, "/p/keycheck"), None);
        assert_eq!(name_of(root, "/p/accounts/a/00ff"), "a");
    }
}
