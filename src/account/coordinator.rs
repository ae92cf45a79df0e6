//! The seam through which another layer coordinates an account's refreshes with other
//! tokend instances (cluster mode, SPEC §8), without the account layer knowing how: the
//! schedule (`task`) asks whose turn it is, claims the link it is about to send right
//! before the engine sends it, hands over what it fetched, adopts what others fetched,
//! and passes on refresh requests to whoever leads. The cluster layer implements it.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::persist::Portable;
use crate::config::Account;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Whether this instance may ask the provider now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turn {
    /// It leads the account: it refreshes (after a claim), and shares what it got.
    Lead,
    /// Another instance leads (by name): it waits for what that one shares.
    Follow(String),
    /// Cut off from the others for long enough, and allowed to refresh on its own.
    Alone,
    /// Cut off, and not allowed to refresh on its own (or not yet).
    Wait,
}

/// The answer to a claim of the link a leader is about to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Send it now. `after`: the member whose request with this link died mid-way: the
    /// link is sent once more, and a refusal means that member spent it.
    Go { after: Option<String> },
    /// Do not send: another member's request with the link may still be answered.
    /// Look again at `until`.
    Wait { until: Instant, why: String },
    /// Do not send: the shared state moved on (or the lead was lost). Take what is
    /// shared, then look again.
    Lost,
    /// Never send: why (the account is held until an operator acts).
    Refuse(String),
}

/// What others shared about the account, in this instance's clock.
pub struct Shared {
    pub state: Portable,
    /// The instance that fetched the token.
    pub fetched_by: String,
    /// The token's `(issued_at, expires_at)` on this instance's clock, to the
    /// millisecond (`state` keeps whole seconds).
    pub times: Option<(SystemTime, SystemTime)>,
    /// The token was not taken from the others before: by the cluster's order (not by
    /// this instance's wall clock, which may have been set since) it is newer than any
    /// it took before.
    pub newer: bool,
}

pub trait Coordinator: Send + Sync + 'static {
    /// Resolves when what others shared, or who leads, may have changed.
    fn changed(&mut self) -> BoxFuture<'_, ()>;
    /// Claims the lead if nobody holds it, and says whose turn it is.
    fn turn(&self) -> BoxFuture<'_, Turn>;
    /// The latest shared state, if any (and acceptable).
    fn shared(&self) -> BoxFuture<'_, Option<Shared>>;
    /// Right before a leader's request: claims the link `state` would send (its
    /// refresh token; none: the configured seed) in the shared state, so that nobody
    /// else sends it.
    fn claim(&self, state: Portable) -> BoxFuture<'_, Claim>;
    /// After the claimed request: shares this instance's state (`fresh`: with a token
    /// it just fetched; `expires_at`: the token's expiry to the millisecond, `state`
    /// keeps whole seconds). False if the shared state moved on meanwhile (nothing
    /// written).
    fn share(
        &self,
        state: Portable,
        fresh: bool,
        expires_at: Option<SystemTime>,
    ) -> BoxFuture<'_, bool>;
    /// A member that does not lead asks the leader for a refresh (`force`: ending a
    /// hold for one attempt).
    fn ask_leader(&self, force: bool) -> BoxFuture<'_, bool>;
    /// The leader: a refresh another member asked for and no refresh since answered;
    /// `Some(force)` once per request.
    fn asked(&self) -> BoxFuture<'_, Option<bool>>;
    /// The times of `token` on this instance's clock now, if the cluster timed it (by
    /// the lifetime it had left, on the monotonic clock): what it is served with after
    /// this instance's wall clock was set. No call to the others.
    fn timed(&self, token: &crate::oauth::Token) -> Option<(SystemTime, SystemTime)>;
    /// The provider's `Date` on an answer this instance received at `received`.
    fn provider_date(&self, date: SystemTime, received: SystemTime);
    /// What is wrong with this account's place in the cluster, if anything (another
    /// key, another identity under its name, a record refused, a clock that is off).
    fn warning(&self) -> Option<String>;
    /// Gives up the lead, if held (the account stops here).
    fn resign(&self) -> BoxFuture<'_, ()>;
    /// This instance's name, for `refreshed_by`.
    fn me(&self) -> &str;
    /// This instance's place in its cluster, for readers.
    fn status(&self) -> std::sync::Arc<dyn ClusterStatus>;
}

/// What readers may know about this instance's place in its cluster (`/v1/cluster`).
pub trait ClusterStatus: Send + Sync + 'static {
    /// This member's name.
    fn member(&self) -> &str;
    /// Whether etcd answered within the lease's time to live.
    fn reachable(&self) -> bool;
    /// Why this member does not take part, or a clock that is off.
    fn problem(&self) -> Option<String> {
        None
    }
    /// This member's clock against the provider's (or etcd's), in seconds: positive
    /// when it is ahead.
    fn clock_skew_seconds(&self) -> Option<f64> {
        None
    }
}

/// How long a request of `account` may be on the wire (`refresh_token_timeout` for the
/// refresh_token grant): what a new leader waits for, plus the lease's time to live,
/// before it takes over the link of a member that died mid-request.
pub fn request_timeout(account: &Account) -> Duration {
    account.request_timeout()
}
