//! The seam between the refresh protocol (`coordinate`) and the store a cluster shares:
//! what one member is ([`MemberView`]) and what one shared account's place in the store
//! offers ([`AccountSeat`]): an election, a record written by compare-and-swap on where
//! it was read, a request to the leader, and a change notification. etcd (`member`) and
//! the Kubernetes API (`kubernetes`) implement both; the fencing of a refresh (a claim
//! written by compare-and-swap before the request) is the protocol's, the same on both.
//!
//! The seam is at the member level, not at a key-value store's: etcd fences a claim on
//! the lead inside the same transaction, the API server has no transactions across
//! objects, and each backend keeps its own liveness (an etcd lease, a Lease object's
//! renewals). What both guarantee is what the protocol relies on: a write lands only if
//! the record is still the one read.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::memory::Memory;
use super::record::{ClusterKey, LeaderRequest, Place, Record, SealError};
use crate::account::coordinator::ClusterStatus;
use crate::clock::Clock;

/// What a member is made of, whatever its store: the same `[cluster]` settings for
/// etcd and for the Kubernetes API.
pub struct Settings {
    pub key: ClusterKey,
    pub prefix: String,
    pub name: String,
    pub ttl: Duration,
    pub clock: Clock,
    pub memory: Memory,
}

/// One member of a cluster, whatever its store.
pub trait MemberView: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn ttl(&self) -> Duration;
    fn clock(&self) -> Clock;
    fn key(&self) -> &ClusterKey;
    fn memory(&self) -> &Memory;
    /// Whether this member's cluster key is the cluster's.
    fn key_check(&self) -> KeyCheck;
    /// What the log and status say when it is not.
    fn mismatch_message(&self) -> String;
    /// How long the store has not answered (none while it does).
    fn unreachable_for(&self) -> Option<Duration>;
    /// The store's time now (Unix milliseconds), as its answers told this member.
    fn backend_now_ms(&self) -> Option<i64>;
    /// The latest the store's time can be now (Unix milliseconds), by what its answers
    /// allow: what a record read (not seen arrive) is timed by, so that its token is
    /// never taken for younger than it is, also before the clock is known well.
    fn backend_latest_ms(&self) -> Option<i64>;
    /// Waits (a few seconds at most, at the start) until the store's clock is known well.
    fn calibration(&self) -> impl Future<Output = ()> + Send;
    fn note_provider_offset(&self, provider_minus_backend: i64);
    fn note_provider_date(&self, date: SystemTime, received: SystemTime);
    fn provider_minus_backend(&self) -> Option<i64>;
    fn skew_warning(&self) -> Option<String>;
}

/// One shared account's place in the store (SPEC §8: shared by name and identity).
pub trait AccountSeat: Send + Sync + 'static {
    type Member: MemberView;
    type Error: std::fmt::Display + Send;

    fn member(&self) -> &Self::Member;
    /// This member's place in its cluster, for readers.
    fn status(&self) -> Arc<dyn ClusterStatus>;
    /// What the record is bound to (the sealing's associated data) and remembered by.
    fn record_key(&self) -> String;
    /// When the watch brought the record write of `revision`, if it did.
    fn arrived(&self, revision: i64) -> Option<Instant>;
    /// Resolves when the account's objects may have changed.
    fn changed(&mut self) -> impl Future<Output = ()> + Send;
    /// Takes the lead if nobody holds it; says who leads.
    fn campaign(&self) -> impl Future<Output = Result<Lead, Self::Error>> + Send;
    /// The account's record as it is in the store now.
    fn read(&self) -> impl Future<Output = Result<Stored, Self::Error>> + Send;
    /// Creates the record (not yet one), if this member leads and nobody created it.
    fn create(&self) -> impl Future<Output = Result<bool, Self::Error>> + Send;
    /// Writes `record` over the one at `at` if it is still there and this member still
    /// leads: the claim of a link.
    fn claim(
        &self,
        at: Position,
        record: &Record,
    ) -> impl Future<Output = Result<Option<Position>, Self::Error>> + Send;
    /// Writes `record` over the one at `at` if it is still there, whoever leads.
    fn write(
        &self,
        at: Position,
        record: &Record,
    ) -> impl Future<Output = Result<Option<Position>, Self::Error>> + Send;
    /// The records of the other identities of this account's name (the ones that open).
    fn others(&self) -> impl Future<Output = Result<Vec<Record>, Self::Error>> + Send;
    /// The live members of this account's name that have another identity.
    fn other_identities(&self) -> BTreeSet<String>;
    /// Asks the account's leader for a refresh.
    fn ask(&self, request: &LeaderRequest) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Takes a member's request to the leader, if one waits.
    fn take_request(
        &self,
    ) -> impl Future<Output = Result<Option<(LeaderRequest, i64)>, Self::Error>> + Send;
    /// Gives up the lead, if held.
    fn resign(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

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

/// Where a record is in etcd: the revision of its last write and its place in its
/// key's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub revision: i64,
    pub place: Place,
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
