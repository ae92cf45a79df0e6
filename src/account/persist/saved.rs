//! The saved state of one account, as the refresh engine keeps it in memory: its
//! token, the refresh-token chain, the wait before its next request and the counts that
//! make it grow, the token endpoint it discovered. Pure data and the rules that change
//! it; reading and writing it is `file`'s, and the lock `lock`'s.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::account::identity::{self, CredentialsDigest, RequestIdentity, Salt};
use crate::account::schedule::{self, MAX_LIFETIME};
use crate::config::{Account, Grant, SchedulePolicy, Secret};
use crate::oauth::Token;

/// Why the next request waits.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum WaitKind {
    /// Backoff after a transient failure.
    Backoff,
    /// The provider asked to wait (429, 503 + Retry-After).
    RateLimit,
    /// The provider refused the credentials.
    Hold,
}

impl WaitKind {
    /// The longest this kind of wait is obeyed, also when read back from disk.
    fn cap(self, policy: &SchedulePolicy) -> Duration {
        match self {
            WaitKind::Backoff => schedule::BACKOFF_CAP,
            WaitKind::RateLimit => schedule::RATE_LIMIT_CAP,
            WaitKind::Hold => schedule::hold_cap(policy),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Wait {
    /// Unix seconds.
    pub(super) until: u64,
    pub(super) kind: WaitKind,
}

/// What of an account's state travels between cluster members (SPEC §8): the token,
/// the chain's current refresh token, and the wait with the refusals that make a hold
/// grow. Never the salt or the seed's digest, which are each member's own. Holds
/// credentials: `Debug` is not derived.
#[derive(Serialize, Deserialize, Clone, PartialEq, Default)]
pub struct Portable {
    pub token: Option<SavedToken>,
    pub refresh_token: Option<String>,
    pub wait: Option<Wait>,
    pub refusals: u32,
    /// Why the last request failed, if it did (safe to show: no secret, no token).
    #[serde(default)]
    pub last_error: Option<String>,
    /// `token_binding = "dpop"`: the PEM of the key the token is bound to, so that every
    /// member mints proofs for the shared token (SPEC §9). Only ever in the sealed record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpop_key: Option<String>,
}

impl Drop for Portable {
    fn drop(&mut self) {
        if let Some(rt) = &mut self.refresh_token {
            zeroize::Zeroize::zeroize(rt);
        }
        if let Some(k) = &mut self.dpop_key {
            zeroize::Zeroize::zeroize(k);
        }
    }
}

/// A refresh-token chain: the current (rotated) refresh token, and a digest of the
/// configured one it descends from (a new configured one starts a new chain; an empty
/// digest, the seed unreadable when the chain began, is matched by no seed: only
/// `tokend reseed` ends such a chain).
#[derive(Serialize, Deserialize, Clone)]
pub(super) struct Chain {
    pub(super) seed: String,
    pub(super) refresh_token: String,
}

/// Why an account's chain cannot go on from what is saved: its state file was damaged
/// with no good copy left, or its seed is the seed of a chain another account runs.
/// The seed is never replayed on a guess (a spent one revokes the family): the account
/// is held until the operator re-seeds (`tokend reseed`) or configures a new seed.
#[derive(Serialize, Deserialize, Clone)]
pub(super) struct ChainLost {
    /// The digest of the seed configured when it was found; `None` if it could not be
    /// read then (every seed is held then).
    pub(super) seed: Option<String>,
    /// What happened, for the status and the log (no secret in it).
    pub(super) reason: String,
    /// Unix seconds.
    pub(super) since: u64,
}

/// One account's saved state. Holds credentials: `Debug` is not derived. Every account
/// keeps one of these for the daemon's life, so it is small (issue #11): what only some
/// accounts have (a chain, a hold) is boxed, the token is the one the account publishes
/// (not a copy), and what it was issued for is a digest. The file ([`FileOut`],
/// [`FileIn`]) has them whole, as it always had.
#[derive(Clone)]
pub struct Saved {
    /// Grows with every change; of two copies (memory and disk) the larger is newer.
    pub(super) generation: u64,
    /// For the digests below.
    pub(super) salt: Salt,
    /// What the token was issued for ([`RequestIdentity::digest`]): it is reused only
    /// for the same request.
    pub(super) issued_for: [u8; 32],
    pub(super) token: Option<Arc<Token>>,
    /// `token_binding = "dpop"`: the RFC 7638 thumbprint of the key `token` is bound
    /// to. A token bound to another key than the account's now (`dpop_key` replaced) is
    /// not served: no proof of the new key would pass. None for a bearer token, and in
    /// files written before it was kept (taken as the account's key).
    pub(super) token_jkt: Option<Box<str>>,
    pub(super) chain: Option<Box<Chain>>,
    pub(super) wait: Option<Wait>,
    /// Transient failures in a row (backoff grows with them, also across restarts).
    pub failures: u32,
    /// Refusals in a row (the hold doubles with each).
    pub refusals: u32,
    /// The credentials that were refused; other credentials end the hold.
    pub(super) hold_key: Option<Box<CredentialsDigest>>,
    /// The token endpoint last discovered (`issuer`, `fhir_base`): used while discovery
    /// fails, also after a restart.
    pub(super) discovered: Option<Box<DiscoveredEndpoint>>,
    /// The chain cannot go on (see [`ChainLost`]).
    pub(super) chain_lost: Option<Box<ChainLost>>,
    /// When the provider was last asked (Unix seconds), and whether because the
    /// request changed (a reload): a config that flaps between two requests does not
    /// ask again sooner than `min_refresh_interval`.
    pub(super) last_request: Option<LastRequest>,
}

/// When the provider was last asked, and whether because its request had changed.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct LastRequest {
    /// Unix seconds.
    pub(super) at: u64,
    /// The request was new to this account (it changed on a reload).
    pub(super) changed: bool,
}

/// A discovered token endpoint, and what it was discovered from.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub(super) struct DiscoveredEndpoint {
    /// [`TokenUrl::identity`](crate::config::TokenUrl::identity) of the issuer or FHIR base.
    pub(super) from: String,
    pub(super) token_endpoint: String,
    /// Unix seconds.
    pub(super) at: u64,
}

#[derive(Serialize, Deserialize, Clone, PartialEq)]
pub struct SavedToken {
    pub(super) access_token: String,
    pub(super) token_type: String,
    pub(super) issued_at: u64,
    pub(super) expires_at: u64,
    pub(super) scope: Option<String>,
}

impl Drop for SavedToken {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.access_token);
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.refresh_token);
    }
}

pub(super) fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Unix seconds, rounded up: a wait read back is never shorter than planned.
pub(super) fn secs_ceil(t: SystemTime) -> u64 {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

pub(super) fn time(s: u64) -> SystemTime {
    // Anything a state file says fits: far-future values become about year 2200.
    SystemTime::UNIX_EPOCH + Duration::from_secs(s.min(7_258_118_400))
}

impl SavedToken {
    pub fn from_token(t: &Token) -> Self {
        SavedToken {
            access_token: t.access_token.expose().to_owned(),
            token_type: t.token_type.clone().into_owned(),
            issued_at: secs(t.issued_at),
            expires_at: secs(t.expires_at),
            scope: t.scope.clone(),
        }
    }

    /// The token, its lifetime capped at [`MAX_LIFETIME`] whatever the file says.
    pub fn to_token(&self) -> Token {
        let issued_at = time(self.issued_at);
        Token {
            access_token: Secret::new(self.access_token.clone()),
            token_type: crate::oauth::response::token_type(self.token_type.clone()),
            issued_at,
            expires_at: time(self.expires_at).min(issued_at + MAX_LIFETIME),
            scope: self.scope.clone(),
            refresh_token: None,
            extra: Default::default(),
        }
    }
}

impl Saved {
    pub fn new(account: &Account) -> Self {
        Saved {
            generation: 0,
            salt: Salt::random(),
            issued_for: RequestIdentity::of(account).digest(),
            token: None,
            token_jkt: None,
            chain: None,
            wait: None,
            failures: 0,
            refusals: 0,
            hold_key: None,
            discovered: None,
            chain_lost: None,
            last_request: None,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The saved token, if it was issued for this account's request as configured now.
    pub fn token(&self, account: &Account) -> Option<Arc<Token>> {
        if self.issued_for != RequestIdentity::of(account).digest() {
            return None;
        }
        self.token.clone()
    }

    /// [`Saved::token`], if valid for at least `min_valid` more at `now`.
    pub fn token_valid_for(
        &self,
        account: &Account,
        now: SystemTime,
        min_valid: Duration,
    ) -> Option<Arc<Token>> {
        self.token(account)
            .filter(|t| t.expires_at > now + min_valid)
    }

    /// Records a newly fetched token: the token, the rotated refresh token of the
    /// refresh_token grant, and no more waiting.
    pub fn record(&mut self, account: &Account, token: &Arc<Token>) {
        self.generation += 1;
        self.issued_for = RequestIdentity::of(account).digest();
        self.token = Some(token.clone());
        if let Some(rt) = &token.refresh_token {
            self.record_rotation(account, rt);
        }
        self.wait = None;
        self.failures = 0;
        self.refusals = 0;
        self.hold_key = None;
    }

    /// Notes which DPoP key (by thumbprint) the token held is bound to; none for a
    /// bearer token.
    pub fn bind_token(&mut self, jkt: Option<String>) {
        self.token_jkt = jkt.map(Into::into);
    }

    /// Forgets a token bound to another DPoP key than the one of thumbprint `jkt` (the
    /// account's key was replaced); whether there was one.
    pub fn forget_token_bound_elsewhere(&mut self, jkt: &str) -> bool {
        if self.token.is_none() || self.token_jkt.as_deref().is_none_or(|t| t == jkt) {
            return false;
        }
        self.token = None;
        self.token_jkt = None;
        self.generation += 1;
        true
    }

    /// Records the refresh token a provider rotated the chain to (refresh_token grant
    /// only; other grants' refresh tokens are not kept). Done before anything else about
    /// the answer is judged: the one it replaced is spent. Whether it was recorded.
    pub fn record_rotation(&mut self, account: &Account, rt: &Secret) -> bool {
        let Grant::RefreshToken { refresh_token } = &account.grant else {
            return false;
        };
        match &mut self.chain {
            Some(chain) => chain.refresh_token = rt.expose().to_owned(),
            None => {
                // The first rotation: remember which configured token it grew from.
                let seed = refresh_token
                    .read()
                    .map(|seed| identity::secret_digest(&self.salt, &seed))
                    .unwrap_or_default();
                self.chain = Some(Box::new(Chain {
                    seed,
                    refresh_token: rt.expose().to_owned(),
                }));
            }
        }
        self.generation += 1;
        true
    }

    /// Why the chain cannot go on, if it cannot (see [`ChainLost`]): none once a seed
    /// other than the one configured when it was found is configured.
    pub fn chain_lost(&self, account: &Account) -> Option<&str> {
        let lost = self.chain_lost.as_ref()?;
        let Grant::RefreshToken { refresh_token } = &account.grant else {
            return None;
        };
        match (&lost.seed, refresh_token.read()) {
            (Some(then), Ok(now)) if *then != identity::secret_digest(&self.salt, &now) => None,
            _ => Some(&lost.reason),
        }
    }

    /// Records that the chain cannot go on (see [`ChainLost`]), for `reason`.
    pub fn lose_chain(&mut self, account: &Account, reason: String, now: SystemTime) {
        let Grant::RefreshToken { refresh_token } = &account.grant else {
            return;
        };
        let seed = refresh_token
            .read()
            .ok()
            .map(|seed| identity::secret_digest(&self.salt, &seed));
        self.chain_lost = Some(Box::new(ChainLost {
            seed,
            reason,
            since: secs(now),
        }));
        self.generation += 1;
    }

    /// Whether this state's chain began with `seed`.
    pub fn began_with(&self, seed: &Secret) -> bool {
        self.chain.as_ref().is_some_and(|c| {
            !c.seed.is_empty() && identity::secret_digest(&self.salt, seed) == c.seed
        })
    }

    /// Whether the state is worth two copies on disk: it holds a chain, or it is an
    /// account of the refresh_token grant (whose next answer may begin one).
    pub fn keeps_chain(&self, account: &Account) -> bool {
        matches!(account.grant, Grant::RefreshToken { .. })
            || self.chain.is_some()
            || self.chain_lost.is_some()
    }

    /// The operator's `tokend reseed`: the chain (and any hold or wait) ends; the seed
    /// configured now is used by the next request.
    pub fn reseed(&mut self) {
        self.chain = None;
        self.chain_lost = None;
        self.wait = None;
        self.failures = 0;
        self.refusals = 0;
        self.hold_key = None;
        self.generation += 1;
    }

    /// Records that the provider is asked now for `account`'s request.
    pub fn record_request(&mut self, account: &Account, now: SystemTime) {
        let changed =
            self.token.is_some() && self.issued_for != RequestIdentity::of(account).digest();
        self.last_request = Some(LastRequest {
            at: secs(now),
            changed,
        });
    }

    /// When a request that is new to the account (its settings changed on a reload)
    /// may be made: at once, unless the last request was one too, less than
    /// `min_refresh_interval` ago (a config that flaps between two requests).
    pub fn changed_request_not_before(&self, account: &Account) -> Option<SystemTime> {
        let last = self.last_request?;
        let new = self.token.is_some() && self.issued_for != RequestIdentity::of(account).digest();
        (new && last.changed).then(|| time(last.at) + account.options.schedule.min_refresh_interval)
    }

    /// The token endpoint discovered before for `account`'s issuer or FHIR base, if any.
    pub fn known_token_url(&self, account: &Account) -> Option<url::Url> {
        let d = self.discovered.as_ref()?;
        if d.from != account.token_url.identity() || account.token_url.fixed().is_some() {
            return None;
        }
        url::Url::parse(&d.token_endpoint)
            .ok()
            .filter(|u| matches!(u.scheme(), "https" | "http"))
    }

    /// Records the token endpoint discovered for `account`; whether that is news.
    pub fn record_token_url(&mut self, account: &Account, url: &url::Url, now: SystemTime) -> bool {
        if self.known_token_url(account).as_ref() == Some(url) {
            return false;
        }
        self.discovered = Some(Box::new(DiscoveredEndpoint {
            from: account.token_url.identity(),
            token_endpoint: url.to_string(),
            at: secs(now),
        }));
        self.generation += 1;
        true
    }

    /// Records a failed request and the wait it leads to.
    pub fn record_wait(&mut self, kind: WaitKind, until: SystemTime, account: &Account) {
        self.generation += 1;
        self.wait = Some(Wait {
            until: secs_ceil(until),
            kind,
        });
        self.hold_key = (kind == WaitKind::Hold).then(|| Box::new(CredentialsDigest::of(account)));
    }

    /// The wait before the next request, if it is not over at `now`; each kind capped
    /// (a state file cannot silence an account for longer than the provider could).
    pub fn wait(&self, now: SystemTime, policy: &SchedulePolicy) -> Option<(SystemTime, WaitKind)> {
        let w = self.wait?;
        let until = time(w.until).min(now + w.kind.cap(policy));
        (until > now).then_some((until, w.kind))
    }

    /// Ends a hold after refused credentials (they changed, or the operator forced a
    /// try); the refusal count starts again.
    pub fn end_hold(&mut self) {
        if self.wait.is_some_and(|w| w.kind == WaitKind::Hold) {
            self.wait = None;
        }
        self.refusals = 0;
        self.hold_key = None;
        self.generation += 1;
    }

    /// Whether a hold is in place for credentials other than `account`'s now.
    pub fn held_for_other_credentials(&self, account: &Account) -> bool {
        self.hold_key.as_ref().is_some_and(|k| !k.matches(account))
    }

    /// The refresh token to use for the refresh_token grant: the chain's current one,
    /// unless the configured one changed since the chain began (then none: the
    /// configured one starts a new chain). Other settings changing keeps the chain.
    pub fn refresh_token(&self, account: &Account) -> Option<Secret> {
        let Grant::RefreshToken { refresh_token } = &account.grant else {
            return None;
        };
        let chain = self.chain.as_ref()?;
        match refresh_token.read() {
            Ok(seed)
                if !chain.seed.is_empty()
                    && identity::secret_digest(&self.salt, &seed) != chain.seed =>
            {
                None
            }
            // The same seed, or unreadable now: the chain goes on.
            _ => Some(Secret::new(chain.refresh_token.clone())),
        }
    }

    /// What another cluster member may take over from this state.
    pub fn portable(&self) -> Portable {
        Portable {
            token: self.token.as_deref().map(SavedToken::from_token),
            refresh_token: self.chain.as_ref().map(|c| c.refresh_token.clone()),
            wait: self.wait,
            refusals: self.refusals,
            last_error: None,
            dpop_key: None,
        }
    }

    /// Takes over what another member shared: its token if it is newer than this one's
    /// (`ordered_newer`: the cluster says so, by its records' order; else by `issued_at`),
    /// its refresh token, and its wait and refusals (a hold is the cluster's, not one
    /// member's). Returns the token if it is new here.
    pub fn adopt(
        &mut self,
        account: &Account,
        p: &Portable,
        ordered_newer: bool,
    ) -> Option<Arc<Token>> {
        let mine = self.token(account);
        // In whole seconds, as shared.
        let newer = p.token.as_ref().filter(|t| {
            mine.as_ref().is_none_or(|m| {
                (ordered_newer || t.issued_at >= secs(m.issued_at))
                    && t.access_token != m.access_token.expose()
            })
        });
        let mut taken = None;
        if let Some(t) = newer {
            let token = Arc::new(t.to_token());
            self.token = Some(token.clone());
            self.issued_for = RequestIdentity::of(account).digest();
            taken = Some(token);
            if let (Grant::RefreshToken { refresh_token }, Some(rt)) =
                (&account.grant, &p.refresh_token)
            {
                match &mut self.chain {
                    Some(c) => c.refresh_token = rt.clone(),
                    None => {
                        if let Ok(seed) = refresh_token.read() {
                            self.chain = Some(Box::new(Chain {
                                seed: identity::secret_digest(&self.salt, &seed),
                                refresh_token: rt.clone(),
                            }));
                        }
                    }
                }
            }
            self.failures = 0;
        }
        if newer.is_some() || p.wait.is_some() || p.refusals > 0 {
            self.wait = p.wait;
            self.refusals = p.refusals;
            self.hold_key = (p.wait.is_some_and(|w| w.kind == WaitKind::Hold))
                .then(|| Box::new(CredentialsDigest::of(account)));
            self.generation += 1;
        }
        taken
    }

    /// Drops a chain whose configured seed was replaced: the new seed starts anew.
    pub fn prepare_chain(&mut self, account: &Account) {
        if self.chain_lost.is_some() && self.chain_lost(account).is_none() {
            tracing::info!(account = %account.name, "a new refresh_token is configured: the chain that could not go on is replaced by a new one from it");
            self.chain_lost = None;
            self.chain = None;
            self.generation += 1;
        }
        if self.chain.is_some() && self.refresh_token(account).is_none() {
            tracing::info!(account = %account.name, "a new refresh_token is configured: starting a new chain from it");
            self.chain = None;
            self.generation += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{account, rt_account, token};
    use super::*;

    #[test]
    fn a_chain_survives_other_changes_and_ends_only_with_a_new_seed() {
        let a = rt_account("seed-1", "x");
        let mut s = Saved::new(&a);
        let mut t = token(SystemTime::now(), 60);
        t.refresh_token = Some(Secret::new("rotated-1"));
        s.record(&a, &Arc::new(t.clone()));
        t.refresh_token = Some(Secret::new("rotated-2"));
        s.record(&a, &Arc::new(t));
        assert_eq!(s.refresh_token(&a).unwrap().expose(), "rotated-2");
        let rescoped = rt_account("seed-1", "y");
        assert_eq!(
            s.refresh_token(&rescoped).unwrap().expose(),
            "rotated-2",
            "a new scope keeps the chain"
        );
        assert!(s.token(&rescoped).is_none(), "but not the token");
        let reseeded = rt_account("seed-2", "x");
        assert!(s.refresh_token(&reseeded).is_none());
        let json = serde_json::to_string(&s.chain).unwrap();
        s.prepare_chain(&reseeded);
        assert!(s.chain.is_none());
        assert!(
            !json.contains("seed-1"),
            "the seed is kept as a digest only"
        );
    }

    #[test]
    fn a_token_the_cluster_orders_newer_is_taken_whatever_its_issued_at_says() {
        let a = account("x");
        let now = SystemTime::now();
        let mut s = Saved::new(&a);
        s.record(&a, &Arc::new(token(now, 60)));
        // This member's clock was set back two minutes since it took its token: the
        // cluster's next token looks issued before it.
        let mut theirs = token(now - Duration::from_secs(120), 60);
        theirs.access_token = Secret::new("the cluster's next token");
        let mut shared = s.portable();
        shared.token = Some(SavedToken::from_token(&theirs));
        assert!(
            s.clone().adopt(&a, &shared, false).is_none(),
            "by issued_at: older"
        );
        let taken = s.adopt(&a, &shared, true).expect("ordered newer: taken");
        assert_eq!(taken.access_token.expose(), "the cluster's next token");
        assert!(
            taken.issued_at <= taken.expires_at,
            "its times as the record timed them"
        );
        assert_eq!(
            s.token(&a).unwrap().access_token.expose(),
            "the cluster's next token"
        );
    }

    #[test]
    fn a_rotation_is_recorded_alone_and_a_lost_chain_holds_until_a_new_seed() {
        let a = rt_account("seed-1", "x");
        let mut s = Saved::new(&a);
        assert!(s.record_rotation(&a, &Secret::new("rotated-1")));
        assert_eq!(s.refresh_token(&a).unwrap().expose(), "rotated-1");
        assert!(s.token(&a).is_none(), "no token came with it");
        assert!(
            !s.record_rotation(&account("x"), &Secret::new("x")),
            "other grants keep none"
        );
        s.lose_chain(&a, "damaged".into(), SystemTime::now());
        assert_eq!(s.chain_lost(&a), Some("damaged"));
        let mut reseeded = s.clone();
        reseeded.reseed();
        assert!(reseeded.chain_lost(&a).is_none());
        assert!(reseeded.refresh_token(&a).is_none(), "the seed goes next");
        let new_seed = rt_account("seed-2", "x");
        assert!(
            s.chain_lost(&new_seed).is_none(),
            "a new seed is a new chain"
        );
        s.prepare_chain(&new_seed);
        assert!(s.chain_lost.is_none() && s.chain.is_none());
    }

    #[test]
    fn a_flapping_request_waits_for_min_refresh_interval() {
        let (x, y) = (rt_account("s", "x"), rt_account("s", "y"));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut s = Saved::new(&x);
        s.record_request(&x, now);
        s.record(&x, &Arc::new(token(now, 3600)));
        assert_eq!(s.changed_request_not_before(&x), None, "the same request");
        assert_eq!(
            s.changed_request_not_before(&y),
            None,
            "the first change: at once"
        );
        s.record_request(&y, now + Duration::from_secs(5));
        s.record(&y, &Arc::new(token(now, 3600)));
        assert_eq!(
            s.changed_request_not_before(&x),
            Some(now + Duration::from_secs(35)),
            "changed back within min_refresh_interval (30 s)"
        );
    }

    #[test]
    fn waits_read_back_are_capped() {
        let a = account("x");
        let policy = SchedulePolicy::default();
        let now = SystemTime::now();
        let mut s = Saved::new(&a);
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
        s.record_wait(WaitKind::RateLimit, far, &a);
        assert_eq!(
            s.wait(now, &policy),
            Some((now + schedule::RATE_LIMIT_CAP, WaitKind::RateLimit)),
            "a year-9999 rate limit is read back as an hour"
        );
        s.record_wait(WaitKind::Hold, far, &a);
        let (until, kind) = s.wait(now, &policy).unwrap();
        assert_eq!(kind, WaitKind::Hold);
        assert_eq!(until, now + schedule::HOLD_CAP);
        let mut absurd = Saved::new(&a);
        absurd.token = Some(Arc::new(
            SavedToken {
                access_token: "t".into(),
                token_type: "Bearer".into(),
                issued_at: secs(now),
                expires_at: u64::MAX,
                scope: None,
            }
            .to_token(),
        ));
        let t = absurd.token(&a).unwrap();
        assert!(t.expires_at <= now + MAX_LIFETIME + Duration::from_secs(1));
    }
}
