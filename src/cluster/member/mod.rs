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
//!
//! The parts, each in its own file: the key check, the lease and this member's
//! `members/` keys (`lease`); the prefix watch and its progress check (`prefix_watch`); an
//! account's [`Seat`] and its [`AccountSeat`](super::backend::AccountSeat)
//! implementation (`seat`); this member's clock against etcd's and the provider's
//! (`clocks`). This file holds the [`Member`] itself, its start, what it answers of
//! itself, and the key layout shared by the parts.

mod clocks;
mod lease;
mod prefix_watch;
mod seat;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use super::backend::Settings;
use super::etcd::Etcd;
use super::memory::Memory;
use super::record::ClusterKey;
use crate::clock::Clock;

pub use super::backend::{KeyCheck, Lead, Position, Stored};
use clocks::ProviderClock;
pub use clocks::SKEW_LIMIT;
pub use seat::Seat;

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

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
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
    fn backend_latest_ms(&self) -> Option<i64> {
        self.etcd.backend_clock().latest_ms(self.clock)
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
