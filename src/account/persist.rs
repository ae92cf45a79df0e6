//! The state directory: each account's current token, expiry, rotated refresh token and
//! earliest next request, kept in `{state_dir}/{account}.json` (0600, written
//! atomically), so that a restart, or a crash loop, does not ask the provider again
//! while a token is still fresh, and does not retry sooner than planned.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::{Account, Grant, Secret};
use crate::oauth::Token;
use crate::output::atomic;

const VERSION: u32 = 1;

/// What a token was issued for. A saved token is reused only for the same request: a
/// changed client, user, scope or endpoint asks anew.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone)]
pub struct Fingerprint {
    token_url: String,
    grant_type: String,
    client_id: String,
    username: Option<String>,
    scope: Option<String>,
    extra_params: Vec<(String, String)>,
}

impl Fingerprint {
    pub fn of(a: &Account) -> Self {
        Fingerprint {
            token_url: a.token_url.to_string(),
            grant_type: a.grant.as_str().to_owned(),
            client_id: a.client_id.clone(),
            username: match &a.grant {
                Grant::Password { username, .. } => Some(username.clone()),
                _ => None,
            },
            scope: a.scope.clone(),
            extra_params: a
                .extra_params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// One account's saved state. Holds credentials: `Debug` is not derived.
#[derive(Serialize, Deserialize, Clone)]
pub struct Saved {
    version: u32,
    pub fingerprint: Fingerprint,
    pub token: Option<SavedToken>,
    /// The refresh_token grant's current (rotated) refresh token, and the configured one
    /// it descends from: a new configured refresh token starts a new chain.
    pub refresh_token: Option<String>,
    pub seed_refresh_token: Option<String>,
    /// No request before this (backoff, rate limit, refused credentials), in Unix seconds.
    pub not_before: Option<u64>,
    /// Set when `not_before` is a hold after refused credentials: the
    /// [`credentials_key`] they were refused with. Other credentials end the hold.
    #[serde(default)]
    pub hold_key: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone)]
pub struct SavedToken {
    access_token: String,
    token_type: String,
    issued_at: u64,
    expires_at: u64,
    scope: Option<String>,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn time(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(s)
}

impl SavedToken {
    pub fn from_token(t: &Token) -> Self {
        SavedToken {
            access_token: t.access_token.expose().to_owned(),
            token_type: t.token_type.clone(),
            issued_at: secs(t.issued_at),
            expires_at: secs(t.expires_at),
            scope: t.scope.clone(),
        }
    }

    pub fn to_token(&self) -> Token {
        Token {
            access_token: Secret::new(self.access_token.clone()),
            token_type: self.token_type.clone(),
            issued_at: time(self.issued_at),
            expires_at: time(self.expires_at),
            scope: self.scope.clone(),
            refresh_token: None,
            extra: Default::default(),
        }
    }
}

impl Saved {
    pub fn new(account: &Account) -> Self {
        Saved {
            version: VERSION,
            fingerprint: Fingerprint::of(account),
            token: None,
            refresh_token: None,
            seed_refresh_token: None,
            not_before: None,
            hold_key: None,
        }
    }

    /// The saved token, if it was issued for this account as configured now and is
    /// valid for at least `min_valid` more at `now`.
    pub fn token_valid_for(
        &self,
        account: &Account,
        now: SystemTime,
        min_valid: Duration,
    ) -> Option<Token> {
        if self.fingerprint != Fingerprint::of(account) {
            return None;
        }
        let t = self.token.as_ref()?.to_token();
        (t.expires_at > now + min_valid).then_some(t)
    }

    /// Records a newly fetched token: the token, the rotated refresh token of the
    /// refresh_token grant, and no more waiting.
    pub fn record(&mut self, account: &Account, token: &Token) {
        self.token = Some(SavedToken::from_token(token));
        if let (Grant::RefreshToken { .. }, Some(rt)) = (&account.grant, &token.refresh_token) {
            self.refresh_token = Some(rt.expose().to_owned());
        }
        self.not_before = None;
        self.hold_key = None;
    }

    pub fn not_before(&self) -> Option<SystemTime> {
        self.not_before.map(time)
    }

    pub fn set_not_before(&mut self, t: Option<SystemTime>) {
        self.not_before = t.map(secs);
    }

    /// The refresh token to use: the rotated one, unless the configured one changed.
    pub fn refresh_token_for(&self, configured: &Secret) -> Option<Secret> {
        (self.seed_refresh_token.as_deref() == Some(configured.expose()))
            .then(|| self.refresh_token.clone().map(Secret::new))
            .flatten()
    }
}

/// The state to start `account` from, given what was saved (if anything), and the
/// refresh token to start with for the refresh_token grant: the saved rotated one, unless
/// the configured one changed since that chain began.
pub fn prepare(account: &Account, saved: Option<Saved>) -> (Saved, Option<Secret>) {
    let mut s = saved
        .filter(|s| s.fingerprint == Fingerprint::of(account))
        .unwrap_or_else(|| Saved::new(account));
    if s.hold_key.is_some() && s.hold_key != Some(credentials_key(account)) {
        // Refused credentials were replaced while tokend was down: ask again now.
        s.hold_key = None;
        s.not_before = None;
    }
    let Grant::RefreshToken {
        refresh_token: spec,
    } = &account.grant
    else {
        s.refresh_token = None;
        s.seed_refresh_token = None;
        return (s, None);
    };
    match spec.read() {
        Ok(configured) => match s.refresh_token_for(&configured) {
            Some(rt) => (s, Some(rt)),
            None => {
                s.seed_refresh_token = Some(configured.expose().to_owned());
                s.refresh_token = None;
                (s, None)
            }
        },
        // Unreadable now: keep the saved chain; the request will report the file.
        Err(_) => {
            let rt = s.refresh_token.clone().map(Secret::new);
            (s, rt)
        }
    }
}

/// A digest of an account's settings and current secret values, to tell whether the
/// credentials a provider refused have changed since. Kept only in the 0600 state file.
pub fn credentials_key(account: &Account) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{account:?}").hash(&mut h);
    for (_, spec) in account.secrets() {
        spec.read().ok().map(|s| s.expose().to_owned()).hash(&mut h);
    }
    h.finish()
}

fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// Reads an account's saved state; a missing, unreadable or foreign file is none.
pub fn load(dir: &Path, name: &str) -> Option<Saved> {
    let bytes = std::fs::read(path(dir, name)).ok()?;
    match serde_json::from_slice::<Saved>(&bytes) {
        Ok(s) if s.version == VERSION => Some(s),
        _ => {
            tracing::warn!(account = %name, "ignoring unreadable state file in {}", dir.display());
            None
        }
    }
}

/// Saves an account's state atomically, mode 0600.
pub fn save(dir: &Path, name: &str, saved: &Saved) -> std::io::Result<()> {
    let json = serde_json::to_vec(saved).expect("state always serializes");
    atomic::write(&path(dir, name), &json, 0o600, None, None)
}

/// Removes the state of accounts not in `keep`, and stale temporary files.
pub fn clean(dir: &Path, keep: &[&str]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let file = file.to_string_lossy();
        let Some(name) = file.strip_suffix(".json") else {
            continue;
        };
        if !keep.contains(&name) {
            if std::fs::remove_file(e.path()).is_ok() {
                tracing::info!(account = %name, "removed the state of an account no longer configured");
            }
        } else {
            atomic::clean_stale(&e.path());
        }
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
    fn round_trip_reuse_and_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let a = account("full");
        let mut s = Saved::new(&a);
        s.token = Some(SavedToken::from_token(&token(now, 3600)));
        save(dir.path(), "a", &s).unwrap();
        let meta = std::fs::metadata(dir.path().join("a.json")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );

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
    fn clean_removes_unknown_accounts() {
        let dir = tempfile::tempdir().unwrap();
        let a = account("full");
        save(dir.path(), "a", &Saved::new(&a)).unwrap();
        save(dir.path(), "gone", &Saved::new(&a)).unwrap();
        clean(dir.path(), &["a"]);
        assert!(dir.path().join("a.json").exists());
        assert!(!dir.path().join("gone.json").exists());
    }

    #[test]
    fn a_new_configured_refresh_token_starts_a_new_chain() {
        let mut s = Saved::new(&account("x"));
        s.seed_refresh_token = Some("seed-1".into());
        s.refresh_token = Some("rotated-5".into());
        assert_eq!(
            s.refresh_token_for(&Secret::new("seed-1"))
                .unwrap()
                .expose(),
            "rotated-5"
        );
        assert!(s.refresh_token_for(&Secret::new("seed-2")).is_none());
    }
}
