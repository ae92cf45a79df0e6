//! The state file: `{state_dir}/{account}.json` (0600, written atomically and fsynced),
//! its format (and the migration of version 1), retirement to `retired/`, and the
//! temporary files a killed writer left. The model it holds is `saved`'s.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::saved::*;
use super::{
    ensure_dir,
    lock::{try_lock, Locked},
};
use crate::account::identity::{self, CredentialsDigest, RequestIdentity};
use crate::config::{Account, Secret};
use crate::oauth::Token;
use crate::output::atomic;

const VERSION: u32 = 2;
/// Where the state of removed accounts goes.
const RETIRED: &str = "retired";

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

/// The file's form of `saved`, written for `account`: a token issued for another
/// request (the account's settings changed) is left out, since the file can name
/// only one identity and the token is never reused for this one.
fn form<'a>(saved: &'a Saved, account: &Account) -> FileOut<'a> {
    let issued_for = RequestIdentity::of(account);
    let token = saved
        .token
        .as_deref()
        .filter(|_| issued_for.digest() == saved.issued_for)
        .map(TokenOut::of);
    FileOut {
        version: VERSION,
        generation: saved.generation,
        salt: &saved.salt,
        issued_for,
        token,
        chain: saved.chain.as_deref(),
        wait: saved.wait,
        failures: saved.failures,
        refusals: saved.refusals,
        hold_key: saved.hold_key.as_deref(),
        discovered: saved.discovered.as_deref(),
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
        serde_json::to_vec(&form(saved, account)).expect("state always serializes"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;
    use std::time::{Duration, SystemTime};

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
}
