//! The state directory: each account's current token, the rotated refresh token of its
//! chain, and the wait before its next request (backoff, a provider's rate limit, a hold
//! after refused credentials, with the counts that make them grow), kept in
//! `{state_dir}/{account}.json` (0600, written atomically and fsynced), so that a restart
//! or a crash loop does not ask the provider again while a token is still fresh, nor
//! sooner than planned.
//!
//! Also here: the per-account lock (`{account}.lock`, an exclusive `flock`) that keeps
//! `run` and `once` from spending one refresh token twice, and retirement: the state of
//! an account that is removed is moved to `retired/`, never deleted, and comes back when
//! the account does. Only the refresh engine (`engine`) reads and writes these.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::identity::{self, CredentialsDigest, RequestIdentity};
use super::schedule::{self, MAX_LIFETIME};
use crate::config::{Account, Grant, SchedulePolicy, Secret};
use crate::oauth::Token;
use crate::output::atomic;

const VERSION: u32 = 2;
/// Where the state of removed accounts goes.
const RETIRED: &str = "retired";

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
    until: u64,
    kind: WaitKind,
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
}

impl Drop for Portable {
    fn drop(&mut self) {
        if let Some(rt) = &mut self.refresh_token {
            zeroize::Zeroize::zeroize(rt);
        }
    }
}

/// A refresh-token chain: the current (rotated) refresh token, and a digest of the
/// configured one it descends from (a new configured one starts a new chain).
#[derive(Serialize, Deserialize, Clone)]
struct Chain {
    seed: String,
    refresh_token: String,
}

/// One account's saved state. Holds credentials: `Debug` is not derived. Every account
/// keeps one of these for the daemon's life, so it is small (issue #11): what only some
/// accounts have (a chain, a hold) is boxed, the token is the one the account publishes
/// (not a copy), and what it was issued for is a digest. The file ([`FileOut`],
/// [`FileIn`]) has them whole, as it always had.
#[derive(Clone)]
pub struct Saved {
    /// Grows with every change; of two copies (memory and disk) the larger is newer.
    generation: u64,
    /// For the digests below.
    salt: Box<str>,
    /// What the token was issued for ([`RequestIdentity::digest`]): it is reused only
    /// for the same request.
    issued_for: [u8; 32],
    token: Option<Arc<Token>>,
    chain: Option<Box<Chain>>,
    wait: Option<Wait>,
    /// Transient failures in a row (backoff grows with them, also across restarts).
    pub failures: u32,
    /// Refusals in a row (the hold doubles with each).
    pub refusals: u32,
    /// The credentials that were refused; other credentials end the hold.
    hold_key: Option<Box<CredentialsDigest>>,
    /// The token endpoint last discovered (`issuer`, `fhir_base`): used while discovery
    /// fails, also after a restart.
    discovered: Option<Box<DiscoveredEndpoint>>,
}

/// A state file, as written: [`Saved`] with the identity and the token whole.
#[derive(Serialize)]
struct FileOut<'a> {
    version: u32,
    generation: u64,
    salt: &'a str,
    issued_for: RequestIdentity,
    token: Option<TokenOut<'a>>,
    chain: Option<&'a Chain>,
    wait: Option<Wait>,
    failures: u32,
    refusals: u32,
    hold_key: Option<&'a CredentialsDigest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    discovered: Option<&'a DiscoveredEndpoint>,
}

/// A state file, as read.
#[derive(Deserialize)]
struct FileIn {
    generation: u64,
    salt: Box<str>,
    issued_for: RequestIdentity,
    token: Option<SavedToken>,
    chain: Option<Box<Chain>>,
    wait: Option<Wait>,
    failures: u32,
    refusals: u32,
    hold_key: Option<Box<CredentialsDigest>>,
    /// Absent from files written before it existed.
    #[serde(default)]
    discovered: Option<Box<DiscoveredEndpoint>>,
}

impl From<FileIn> for Saved {
    fn from(f: FileIn) -> Self {
        Saved {
            generation: f.generation,
            salt: f.salt,
            issued_for: f.issued_for.digest(),
            token: f.token.as_ref().map(|t| Arc::new(t.to_token())),
            chain: f.chain,
            wait: f.wait,
            failures: f.failures,
            refusals: f.refusals,
            hold_key: f.hold_key,
            discovered: f.discovered,
        }
    }
}

/// A [`SavedToken`] as written from the token itself (no copy of its secret).
#[derive(Serialize)]
struct TokenOut<'a> {
    access_token: &'a str,
    token_type: &'a str,
    issued_at: u64,
    expires_at: u64,
    scope: Option<&'a str>,
}

impl<'a> TokenOut<'a> {
    fn of(t: &'a Token) -> Self {
        TokenOut {
            access_token: t.access_token.expose(),
            token_type: &t.token_type,
            issued_at: secs(t.issued_at),
            expires_at: secs(t.expires_at),
            scope: t.scope.as_deref(),
        }
    }
}

/// A discovered token endpoint, and what it was discovered from.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
struct DiscoveredEndpoint {
    /// [`TokenUrl::identity`](crate::config::TokenUrl::identity) of the issuer or FHIR base.
    from: String,
    token_endpoint: String,
    /// Unix seconds.
    at: u64,
}

#[derive(Serialize, Deserialize, Clone, PartialEq)]
pub struct SavedToken {
    access_token: String,
    token_type: String,
    issued_at: u64,
    expires_at: u64,
    scope: Option<String>,
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

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Unix seconds, rounded up: a wait read back is never shorter than planned.
fn secs_ceil(t: SystemTime) -> u64 {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn time(s: u64) -> SystemTime {
    // Anything a state file says fits: far-future values become about year 2200.
    SystemTime::UNIX_EPOCH + Duration::from_secs(s.min(7_258_118_400))
}

impl SavedToken {
    /// When it was issued, in Unix seconds.
    pub fn issued_at_secs(&self) -> u64 {
        self.issued_at
    }

    pub fn from_token(t: &Token) -> Self {
        SavedToken {
            access_token: t.access_token.expose().to_owned(),
            token_type: t.token_type.clone(),
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
            token_type: self.token_type.clone(),
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
            salt: identity::new_salt().into(),
            issued_for: RequestIdentity::of(account).digest(),
            token: None,
            chain: None,
            wait: None,
            failures: 0,
            refusals: 0,
            hold_key: None,
            discovered: None,
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

    /// The file's form of this state, written for `account`: a token issued for another
    /// request (the account's settings changed) is left out, since the file can name
    /// only one identity and the token is never reused for this one.
    fn file<'a>(&'a self, account: &Account) -> FileOut<'a> {
        let issued_for = RequestIdentity::of(account);
        let token = self
            .token
            .as_deref()
            .filter(|_| issued_for.digest() == self.issued_for)
            .map(TokenOut::of);
        FileOut {
            version: VERSION,
            generation: self.generation,
            salt: &self.salt,
            issued_for,
            token,
            chain: self.chain.as_deref(),
            wait: self.wait,
            failures: self.failures,
            refusals: self.refusals,
            hold_key: self.hold_key.as_deref(),
            discovered: self.discovered.as_deref(),
        }
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
        if let (Grant::RefreshToken { .. }, Some(rt), Some(chain)) =
            (&account.grant, &token.refresh_token, &mut self.chain)
        {
            chain.refresh_token = rt.expose().to_owned();
        }
        if let (Grant::RefreshToken { refresh_token }, Some(rt), None) =
            (&account.grant, &token.refresh_token, &self.chain)
        {
            // The first rotation of a chain: remember which configured token it grew from.
            if let Ok(seed) = refresh_token.read() {
                self.chain = Some(Box::new(Chain {
                    seed: identity::secret_digest(&self.salt, &seed),
                    refresh_token: rt.expose().to_owned(),
                }));
            }
        }
        self.wait = None;
        self.failures = 0;
        self.refusals = 0;
        self.hold_key = None;
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
            Ok(seed) if identity::secret_digest(&self.salt, &seed) != chain.seed => None,
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
        }
    }

    /// Takes over what another member shared: its token if it is newer than this one's,
    /// its refresh token, and its wait and refusals (a hold is the cluster's, not one
    /// member's). Returns the token if it is new here.
    pub fn adopt(&mut self, account: &Account, p: &Portable) -> Option<Arc<Token>> {
        let mine = self.token(account);
        // In whole seconds, as shared.
        let newer = p.token.as_ref().filter(|t| {
            mine.as_ref().is_none_or(|m| {
                t.issued_at >= secs(m.issued_at) && t.access_token != m.access_token.expose()
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
        if self.chain.is_some() && self.refresh_token(account).is_none() {
            tracing::info!(account = %account.name, "a new refresh_token is configured: starting a new chain from it");
            self.chain = None;
            self.generation += 1;
        }
    }
}

/// The state file of `name` as written before version 2, read for migration: an upgrade
/// must not lose a refresh-token chain.
#[derive(Deserialize)]
struct SavedV1 {
    fingerprint: RequestIdentity,
    token: Option<SavedToken>,
    refresh_token: Option<String>,
    seed_refresh_token: Option<String>,
    not_before: Option<u64>,
    hold_key: Option<u64>,
}

impl SavedV1 {
    fn migrate(self) -> Saved {
        let salt = identity::new_salt();
        let held = self.hold_key.is_some();
        Saved {
            generation: 1,
            chain: match (self.seed_refresh_token, self.refresh_token) {
                (Some(seed), Some(rt)) => Some(Box::new(Chain {
                    seed: identity::secret_digest(&salt, &Secret::new(seed)),
                    refresh_token: rt,
                })),
                _ => None,
            },
            salt: salt.into(),
            issued_for: self.fingerprint.digest(),
            token: self.token.as_ref().map(|t| Arc::new(t.to_token())),
            wait: self.not_before.map(|until| Wait {
                until,
                kind: if held {
                    WaitKind::Hold
                } else {
                    WaitKind::Backoff
                },
            }),
            failures: 0,
            refusals: u32::from(held),
            hold_key: None,
            discovered: None,
        }
    }
}

fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

fn retired_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(RETIRED).join(format!("{name}.json"))
}

/// Creates the state directory (0700) if it is missing.
fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Reads an account's saved state. A retired state is brought back first (the account
/// was removed and is configured again: its chain resumes). A missing file is none; an
/// unreadable one is logged and none (it is left in place until the next save).
pub fn load(dir: &Path, name: &str) -> Option<Saved> {
    let file = path(dir, name);
    if !file.exists() && retired_path(dir, name).exists() {
        match move_file(&retired_path(dir, name), &file) {
            Ok(()) => {
                tracing::info!(account = %name, "resuming the state this account had when it was removed")
            }
            Err(e) => {
                tracing::error!(account = %name, "failed to bring back the retired state: {e}")
            }
        }
    }
    let bytes = match std::fs::read(&file) {
        Ok(b) => zeroize::Zeroizing::new(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::error!(account = %name, "failed to read {}: {e}", file.display());
            return None;
        }
    };
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let parsed = match serde_json::from_slice::<Version>(&bytes) {
        Ok(Version { version: VERSION }) => {
            serde_json::from_slice::<FileIn>(&bytes).map(Saved::from)
        }
        Ok(Version { version: 1 }) => {
            serde_json::from_slice::<SavedV1>(&bytes).map(SavedV1::migrate)
        }
        Ok(Version { version }) => {
            tracing::warn!(account = %name, "ignoring {}: state format {version} is newer than this tokend's", file.display());
            return None;
        }
        Err(e) => Err(e),
    };
    match parsed {
        Ok(s) => Some(s),
        Err(e) => {
            // serde_json names a position and a category, never the content.
            tracing::warn!(
                account = %name,
                "ignoring unreadable state file {} ({:?} error at line {} column {})",
                file.display(),
                e.classify(),
                e.line(),
                e.column()
            );
            None
        }
    }
}

/// Saves `account`'s state atomically and durably (fsynced file and directory), 0600.
pub fn save(dir: &Path, account: &Account, saved: &Saved) -> std::io::Result<()> {
    let name = &account.name;
    ensure_dir(dir)?;
    let json = zeroize::Zeroizing::new(
        serde_json::to_vec(&saved.file(account)).expect("state always serializes"),
    );
    atomic::write(&path(dir, name), &json, 0o600, None, None).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("failed to save state to {}: {e}", path(dir, name).display()),
        )
    })
}

/// Moves an account's state to `retired/` (it was removed from the config): kept, so
/// that adding the account back resumes its refresh-token chain.
pub fn retire(dir: &Path, name: &str) -> std::io::Result<()> {
    let from = path(dir, name);
    if !from.exists() {
        return Ok(());
    }
    let to = retired_path(dir, name);
    ensure_dir(to.parent().expect("retired/NAME.json has a parent"))?;
    move_file(&from, &to)?;
    tracing::info!(account = %name, "state moved to {}", to.display());
    Ok(())
}

/// Retires the state of accounts not in `keep` (removed while tokend was down), and
/// removes temporary files a killed tokend left.
pub fn retire_unknown(dir: &Path, keep: &[&str]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let file = file.to_string_lossy();
        let Some(name) = file.strip_suffix(".json") else {
            continue;
        };
        if keep.contains(&name) {
            atomic::clean_stale(&e.path());
            continue;
        }
        // Another tokend (with another config on this state_dir) may run it right now.
        let _held = match try_lock(dir, name, "run") {
            Ok(Locked::Acquired(l)) => l,
            Ok(Locked::Busy { .. }) | Err(_) => continue,
        };
        if let Err(err) = retire(dir, name) {
            tracing::error!(account = %name, "failed to retire the state of an account no longer configured: {err}");
        }
    }
}

/// Renames `from` to `to` and makes both directories durable.
fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    for d in [to.parent(), from.parent()].into_iter().flatten() {
        File::open(d)?.sync_all()?;
    }
    Ok(())
}

/// An exclusive lock on one account in the state directory, held while its refresh
/// token may be spent: by `run` for as long as it runs the account, by `once` for its
/// attempt. Released when dropped (and by the kernel when the process dies).
pub struct AccountLock {
    _lock: nix::fcntl::Flock<File>,
}

/// The outcome of [`try_lock`].
pub enum Locked {
    Acquired(AccountLock),
    /// Another process holds the account; what it wrote about itself ("pid 123 run").
    Busy {
        holder: String,
    },
}

/// Takes the lock of account `name` without waiting. `role` ("run", "once") is written
/// into the lock file for the messages of whoever finds it busy.
pub fn try_lock(dir: &Path, name: &str, role: &str) -> std::io::Result<Locked> {
    ensure_dir(dir)?;
    let lock_path = dir.join(format!("{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("failed to open {}: {e}", lock_path.display()),
            )
        })?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            // Who holds it, for messages only; a failure to write it changes nothing.
            let _ = lock
                .set_len(0)
                .and_then(|()| writeln!(&*lock, "pid {} {role}", std::process::id()));
            Ok(Locked::Acquired(AccountLock { _lock: lock }))
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            Ok(Locked::Busy {
                holder: if holder.is_empty() {
                    "another tokend".into()
                } else {
                    format!("tokend {holder}")
                },
            })
        }
        Err((_, e)) => Err(std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!("failed to lock {}: {e}", lock_path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;

    fn account(scope: &str) -> Account {
        let text = format!(
            "[[account]]\nname = \"a\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\nclient_secret = {{ env = \"S\" }}\nscope = \"{scope}\"\n[[account.output]]\npath = \"/x\"\n"
        );
        parse_str(&text, Path::new("/c.toml"))
            .unwrap()
            .accounts
            .remove(0)
    }

    fn rt_account(seed: &str, scope: &str) -> Account {
        let text = format!(
            "[[account]]\nname = \"a\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\n\
             client_auth = \"none\"\ngrant_type = \"refresh_token\"\nrefresh_token = \"{seed}\"\nscope = \"{scope}\"\n\
             [[account.output]]\npath = \"/x\"\n"
        );
        parse_str(&text, Path::new("/c.toml"))
            .unwrap()
            .accounts
            .remove(0)
    }

    fn token(now: SystemTime, lifetime: u64) -> Token {
        Token {
            access_token: Secret::new("tok"),
            token_type: "Bearer".into(),
            issued_at: now,
            expires_at: now + Duration::from_secs(lifetime),
            scope: None,
            refresh_token: None,
            extra: Default::default(),
        }
    }

    #[test]
    fn round_trip_reuse_and_request_identity() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let a = account("full");
        let mut s = Saved::new(&a);
        let fetched = Arc::new(token(now, 3600));
        s.record(&a, &fetched);
        assert!(
            Arc::ptr_eq(&s.token(&a).unwrap(), &fetched),
            "the state keeps the token it was given, not a copy"
        );
        save(dir.path(), &a, &s).unwrap();
        let meta = std::fs::metadata(dir.path().join("a.json")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
        // The file has the identity and the token whole, as files always had.
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("a.json")).unwrap()).unwrap();
        assert_eq!(file["version"], 2);
        assert_eq!(file["issued_for"]["client_id"], "id");
        assert_eq!(file["issued_for"]["scope"], "full");
        assert_eq!(file["token"]["access_token"], "tok");
        assert_eq!(file["token"]["expires_at"], secs(now) + 3600);
        // Saved for an account whose request changed, the token is left out.
        save(dir.path(), &account("other"), &s).unwrap();
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("a.json")).unwrap()).unwrap();
        assert_eq!(file["issued_for"]["scope"], "other");
        assert!(file["token"].is_null());
        save(dir.path(), &a, &s).unwrap();

        let back = load(dir.path(), "a").unwrap();
        let t = back
            .token_valid_for(&a, now, Duration::from_secs(600))
            .unwrap();
        assert_eq!(t.access_token.expose(), "tok");
        assert!(
            back.token_valid_for(&a, now, Duration::from_secs(3601))
                .is_none(),
            "not valid long enough"
        );
        assert!(
            back.token_valid_for(&account("other"), now, Duration::ZERO)
                .is_none(),
            "other scope"
        );
    }

    #[test]
    fn retire_keeps_the_state_and_load_brings_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = account("full");
        let mut s = Saved::new(&a);
        s.record(&a, &Arc::new(token(SystemTime::now(), 3600)));
        save(dir.path(), &a, &s).unwrap();
        for name in ["gone", "busy"] {
            let other = Account {
                name: name.into(),
                ..a.clone()
            };
            save(dir.path(), &other, &s).unwrap();
        }
        let Locked::Acquired(_busy) = try_lock(dir.path(), "busy", "run").unwrap() else {
            panic!("a free lock");
        };
        retire_unknown(dir.path(), &["a"]);
        assert!(
            dir.path().join("busy.json").exists(),
            "another tokend runs it: left alone"
        );
        assert!(dir.path().join("a.json").exists());
        assert!(!dir.path().join("gone.json").exists());
        assert!(
            dir.path().join("retired/gone.json").exists(),
            "never deleted"
        );
        let back = load(dir.path(), "gone").expect("brought back");
        assert_eq!(back.generation(), s.generation());
        assert!(dir.path().join("gone.json").exists());
        assert!(!dir.path().join("retired/gone.json").exists());
    }

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
        s.prepare_chain(&reseeded);
        assert!(s.chain.is_none());
        let json = serde_json::to_string(&s.file(&reseeded)).unwrap();
        assert!(
            !json.contains("seed-1"),
            "the seed is kept as a digest only"
        );
    }

    #[test]
    fn version_1_state_is_migrated_with_its_chain() {
        let dir = tempfile::tempdir().unwrap();
        let a = rt_account("seed-1", "x");
        let v1 = serde_json::json!({
            "version": 1,
            "fingerprint": RequestIdentity::of(&a),
            "token": null,
            "refresh_token": "rotated-7",
            "seed_refresh_token": "seed-1",
            "not_before": null,
            "hold_key": null
        });
        std::fs::write(dir.path().join("a.json"), v1.to_string()).unwrap();
        let s = load(dir.path(), "a").unwrap();
        assert_eq!(s.refresh_token(&a).unwrap().expose(), "rotated-7");
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

    #[test]
    fn the_lock_is_exclusive_and_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let Locked::Acquired(held) = try_lock(dir.path(), "a", "run").unwrap() else {
            panic!("a free lock is acquired");
        };
        match try_lock(dir.path(), "a", "once").unwrap() {
            Locked::Busy { holder } => {
                assert_eq!(holder, format!("tokend pid {} run", std::process::id()))
            }
            Locked::Acquired(_) => panic!("the lock is exclusive"),
        }
        assert!(matches!(
            try_lock(dir.path(), "b", "once").unwrap(),
            Locked::Acquired(_)
        ));
        drop(held);
        assert!(matches!(
            try_lock(dir.path(), "a", "once").unwrap(),
            Locked::Acquired(_)
        ));
    }
}
