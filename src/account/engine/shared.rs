//! What every account's engine shares: the refresh slots, the clock, the state
//! directory, the providers' rate limits, the cells of identical requests, the metrics.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use std::path::PathBuf;

use crate::account::identity::SiblingKey;
use crate::account::metrics::Metrics;
use crate::account::schedule::{self};
use crate::clock::{Clock, WallJumps};
use crate::config::Account;
use crate::oauth::Token;

/// What every account shares: a handle (one pointer) to [`Common`], so that each of
/// thousands of accounts holds eight bytes of it, not a copy (issue #11).
#[derive(Clone)]
pub struct Shared(Arc<Common>);

/// What every account shares, behind [`Shared`].
pub struct Common {
    /// Bounds concurrent refreshes (`max_concurrent_refreshes`), fairly between
    /// providers: a token request and the saving and writing of what it brought.
    pub slots: crate::account::slots::RefreshSlots,
    pub clock: Clock,
    /// Woken whenever any account publishes a new state (readiness, STATUS=).
    pub changed: tokio::sync::Notify,
    /// Where tokens are kept across restarts (`[daemon] state_dir`).
    pub state_dir: Option<PathBuf>,
    /// Rate limits per provider: accounts that share a `token_url` share its limit.
    pub providers: Providers,
    /// Accounts identical in what they ask for share one request.
    pub siblings: Siblings,
    pub metrics: Arc<Metrics>,
    /// refresh_token requests on the wire: shutdown waits for their answers.
    pub rotations: watch::Sender<usize>,
    /// Tells waiting accounts when the wall clock jumped (a suspend).
    pub wall_jumps: Arc<WallJumps>,
    /// Wakes parked accounts when their plans fall due.
    pub alarms: Arc<crate::account::alarms::Alarms>,
}

impl std::ops::Deref for Shared {
    type Target = Common;

    fn deref(&self) -> &Common {
        &self.0
    }
}

impl Shared {
    pub fn new(max_concurrent_refreshes: usize, clock: Clock, state_dir: Option<PathBuf>) -> Self {
        let wall_jumps = Arc::<WallJumps>::default();
        Shared(Arc::new(Common {
            slots: crate::account::slots::RefreshSlots::new(max_concurrent_refreshes),
            clock,
            changed: Default::default(),
            state_dir,
            providers: Default::default(),
            siblings: Default::default(),
            metrics: Default::default(),
            rotations: watch::Sender::new(0),
            alarms: Arc::new(crate::account::alarms::Alarms::new(
                wall_jumps.clone(),
                clock,
                max_concurrent_refreshes,
            )),
            wall_jumps,
        }))
    }
}

/// When each provider may be asked again after a rate limit.
#[derive(Default)]
pub struct Providers(Mutex<std::collections::HashMap<String, SystemTime>>);

impl Providers {
    fn key(url: &url::Url) -> String {
        crate::oauth::request::redacted_url(url)
    }

    /// The provider an account asks, as rate limits and refresh slots know it: its
    /// configured token endpoint (or issuer, or FHIR base), without credentials.
    pub fn of(account: &Account) -> String {
        Self::key(account.token_url.configured())
    }

    /// Records that the provider at `url` asked to wait until `until` (or, with no date,
    /// a short while); never longer than [`schedule::RATE_LIMIT_CAP`].
    pub fn limit(&self, url: &url::Url, until: Option<SystemTime>, now: SystemTime) {
        let until = schedule::cap_rate_limit(until.unwrap_or(now + Duration::from_secs(1)), now);
        let mut m = self
            .0
            .lock()
            .expect("never poisoned: no panics under the lock");
        let e = m.entry(Self::key(url)).or_insert(until);
        *e = (*e).max(until);
    }

    /// Until when the provider at `url` is not to be asked, if that is after `now`.
    pub fn gate(&self, url: &url::Url, now: SystemTime) -> Option<SystemTime> {
        self.0
            .lock()
            .expect("never poisoned")
            .get(&Self::key(url))
            .copied()
            .filter(|t| *t > now)
    }
}

/// The last token fetched for one distinct request, shared by identical accounts.
pub(super) type SiblingSlot = tokio::sync::Mutex<Option<Arc<Token>>>;

pub(super) type SiblingCell = Arc<SiblingSlot>;

/// The cells of the distinct requests, by the digest of their [`SiblingKey`]; each
/// engine holds its cell, the map only finds it (issue #11: not a copy of every key).
#[derive(Default)]
pub struct Siblings(Mutex<SiblingMap>);

#[derive(Default)]
struct SiblingMap {
    cells: std::collections::HashMap<[u8; 32], std::sync::Weak<SiblingSlot>>,
    /// The map's size after the last sweep of cells no engine holds any more.
    swept: usize,
}

impl Siblings {
    /// Room for `n` distinct requests, made before the accounts start (see
    /// `Metrics::prepare`).
    pub fn reserve(&self, n: usize) {
        self.0
            .lock()
            .expect("never poisoned: no panics under the lock")
            .cells
            .reserve(n);
    }

    pub(super) fn cell(&self, key: &SiblingKey) -> SiblingCell {
        let mut m = self
            .0
            .lock()
            .expect("never poisoned: no panics under the lock");
        if m.cells.len() >= 2 * m.swept.max(64) {
            m.cells.retain(|_, c| c.strong_count() > 0);
            m.swept = m.cells.len();
        }
        let slot = m.cells.entry(key.digest()).or_default();
        if let Some(c) = slot.upgrade() {
            return c;
        }
        let c = SiblingCell::default();
        *slot = Arc::downgrade(&c);
        c
    }
}
