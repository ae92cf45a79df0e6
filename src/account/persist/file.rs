//! The state file: `{state_dir}/{account}.json` (0600, written atomically and fsynced),
//! its format (and the migration of version 1), retirement to `retired/`, and the
//! temporary files a killed writer left. The model it holds is `saved`'s.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::saved::*;
use super::{
    ensure_dir,
    lock::{try_lock, Locked},
};
use crate::account::identity::{self, CredentialsDigest, RequestIdentity, Salt};
use crate::config::{Account, Grant, Secret};
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
    salt: &'a Salt,
    issued_for: RequestIdentity,
    token: Option<TokenOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_jkt: Option<&'a str>,
    chain: Option<&'a Chain>,
    wait: Option<Wait>,
    failures: u32,
    refusals: u32,
    hold_key: Option<&'a CredentialsDigest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    discovered: Option<&'a DiscoveredEndpoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chain_lost: Option<&'a ChainLost>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_request: Option<LastRequest>,
}

/// A state file, as read.
#[derive(Deserialize)]
struct FileIn {
    generation: u64,
    salt: Salt,
    issued_for: RequestIdentity,
    token: Option<SavedToken>,
    #[serde(default)]
    token_jkt: Option<Box<str>>,
    chain: Option<Box<Chain>>,
    wait: Option<Wait>,
    failures: u32,
    refusals: u32,
    hold_key: Option<Box<CredentialsDigest>>,
    /// Absent from files written before it existed.
    #[serde(default)]
    discovered: Option<Box<DiscoveredEndpoint>>,
    #[serde(default)]
    chain_lost: Option<Box<ChainLost>>,
    #[serde(default)]
    last_request: Option<LastRequest>,
}

impl From<FileIn> for Saved {
    fn from(f: FileIn) -> Self {
        Saved {
            generation: f.generation,
            salt: f.salt,
            issued_for: f.issued_for.digest(),
            token: f.token.as_ref().map(|t| Arc::new(t.to_token())),
            token_jkt: f.token_jkt,
            chain: f.chain,
            wait: f.wait,
            failures: f.failures,
            refusals: f.refusals,
            hold_key: f.hold_key,
            discovered: f.discovered,
            chain_lost: f.chain_lost,
            last_request: f.last_request,
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
    let token_jkt = saved.token_jkt.as_deref().filter(|_| token.is_some());
    FileOut {
        version: VERSION,
        generation: saved.generation,
        salt: &saved.salt,
        issued_for,
        token,
        token_jkt,
        chain: saved.chain.as_deref(),
        wait: saved.wait,
        failures: saved.failures,
        refusals: saved.refusals,
        hold_key: saved.hold_key.as_deref(),
        discovered: saved.discovered.as_deref(),
        chain_lost: saved.chain_lost.as_deref(),
        last_request: saved.last_request,
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
        let salt = Salt::random();
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
            salt,
            issued_for: self.fingerprint.digest(),
            token: self.token.as_ref().map(|t| Arc::new(t.to_token())),
            token_jkt: None,
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
            chain_lost: None,
            last_request: None,
        }
    }
}

fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// The second copy of a state file that holds a chain (see [`save`]).
fn backup_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json.backup"))
}

fn retired_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(RETIRED).join(format!("{name}.json"))
}

fn retired_backup_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(RETIRED).join(format!("{name}.json.backup"))
}

/// What [`load`] found for an account.
pub enum Loaded {
    /// No state: the account is new (or its state_dir was emptied).
    Missing,
    Found(Saved),
    /// Its state cannot be read (damaged, truncated, unreadable, a newer format) and no
    /// good copy is left: what went wrong, to show. The damaged files were copied aside.
    Damaged(String),
    /// No state of its own, and its configured refresh token is the seed of the chain
    /// that the account named here runs now (another tokend, or this one): two
    /// accounts would spend one chain.
    ChainInUse(String),
}

/// Reads one state file: `Ok(None)` when there is none, `Err` (what is wrong, no
/// content) when it cannot be used.
fn read(file: &Path) -> Result<Option<Saved>, String> {
    let bytes = match std::fs::read(file) {
        Ok(b) => zeroize::Zeroizing::new(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("failed to read {}: {e}", file.display())),
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
            return Err(format!(
                "{} is in state format {version}, newer than this tokend's",
                file.display()
            ))
        }
        Err(e) => Err(e),
    };
    // serde_json names a position and a category, never the content.
    parsed.map(Some).map_err(|e| {
        let what = if bytes.is_empty() {
            "empty".to_owned()
        } else {
            format!(
                "unreadable ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            )
        };
        format!("{} is {what}", file.display())
    })
}

/// Copies a damaged state file aside (`NAME.json.damaged-UNIXTIME`), fsynced: the only
/// evidence of what its chain was, kept for the operator before anything overwrites it.
fn keep_aside(file: &Path) -> Option<PathBuf> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let name = file.file_name()?.to_string_lossy().into_owned();
    let mut aside = file.with_file_name(format!("{name}.damaged-{now}"));
    for n in 1..100 {
        if !aside.exists() {
            break;
        }
        aside = file.with_file_name(format!("{name}.damaged-{now}.{n}"));
    }
    let copied = std::fs::copy(file, &aside)
        .and_then(|_| File::open(&aside)?.sync_all())
        .and_then(|()| match aside.parent() {
            Some(d) => File::open(d)?.sync_all(),
            None => Ok(()),
        });
    match copied {
        Ok(()) => Some(aside),
        Err(e) => {
            tracing::error!("failed to keep the damaged {} aside: {e}", file.display());
            None
        }
    }
}

/// Reads an account's saved state, from its file or the file's copy, whichever is good
/// (of two good ones, the newer). A retired state is brought back first (the account
/// was removed and is configured again: its chain resumes). When neither is good, what
/// is there is copied aside and [`Loaded::Damaged`] says why: a chain's refresh token
/// is never guessed.
pub fn load(dir: &Path, name: &str) -> Loaded {
    let (file, copy) = (path(dir, name), backup_path(dir, name));
    if !file.exists() && !copy.exists() && retired_path(dir, name).exists() {
        let back = move_file(&retired_path(dir, name), &file).and_then(|()| {
            match retired_backup_path(dir, name) {
                b if b.exists() => move_file(&b, &copy),
                _ => Ok(()),
            }
        });
        match back {
            Ok(()) => {
                tracing::info!(account = %name, "resuming the state this account had when it was removed")
            }
            Err(e) => {
                tracing::error!(account = %name, "failed to bring back the retired state: {e}")
            }
        }
    }
    let damaged = |f: &Path, why: &str| {
        let aside = keep_aside(f).map(|p| format!(" (kept as {})", p.display()));
        format!("{why}{}", aside.unwrap_or_default())
    };
    match (read(&file), read(&copy)) {
        (Ok(Some(a)), Ok(Some(b))) => {
            Loaded::Found(if b.generation > a.generation { b } else { a })
        }
        (Ok(Some(s)), Ok(None)) => Loaded::Found(s),
        (Ok(None), Ok(Some(s))) => {
            tracing::warn!(account = %name, "{} is missing: using its copy {}", file.display(), copy.display());
            Loaded::Found(s)
        }
        (Ok(Some(s)), Err(why)) => {
            // Not inside the macro: its arguments are not evaluated when nobody logs.
            let why = damaged(&copy, &why);
            tracing::warn!(account = %name, "{why}; using {}", file.display());
            Loaded::Found(s)
        }
        (Err(why), Ok(Some(s))) => {
            let why = damaged(&file, &why);
            tracing::error!(account = %name, "{why}; using its copy {}", copy.display());
            Loaded::Found(s)
        }
        (Ok(None), Ok(None)) => Loaded::Missing,
        (a, b) => {
            // Neither is good: what is wrong with each, each kept aside.
            let mut reasons = Vec::new();
            for (f, r) in [(&file, a), (&copy, b)] {
                if let Err(why) = r {
                    reasons.push(damaged(f, &why));
                }
            }
            Loaded::Damaged(reasons.join("; "))
        }
    }
}

/// [`load`], and for an account of the refresh_token grant that has no state of its
/// own, the chain its configured seed began, wherever it is kept: under another name
/// (the account was renamed, or moved from another config) in `dir` or in `retired/`.
/// That state becomes this account's (under the other name's lock). A chain that the
/// other name runs now is [`Loaded::ChainInUse`].
pub fn load_for(dir: &Path, account: &Account) -> Loaded {
    let loaded = load(dir, &account.name);
    let (Loaded::Missing, Grant::RefreshToken { refresh_token }) = (&loaded, &account.grant) else {
        return loaded;
    };
    let Ok(seed) = refresh_token.read() else {
        return loaded;
    };
    match find_chain(dir, &seed, &account.name) {
        Some(Found::Free {
            name,
            retired,
            lock,
        }) => {
            let moved = if retired {
                move_both(
                    &retired_path(dir, &name),
                    &retired_backup_path(dir, &name),
                    dir,
                    &account.name,
                )
            } else {
                move_both(
                    &path(dir, &name),
                    &backup_path(dir, &name),
                    dir,
                    &account.name,
                )
            };
            drop(lock);
            match moved {
                Ok(()) => {
                    tracing::info!(account = %account.name, from = %name, "resuming the refresh-token chain of account {name:?}: its configured refresh_token is this account's (renamed, or moved here)");
                    load(dir, &account.name)
                }
                Err(e) => Loaded::Damaged(format!(
                    "failed to take over the refresh-token chain of account {name:?}, which this account's refresh_token began: {e}"
                )),
            }
        }
        Some(Found::Busy { name }) => Loaded::ChainInUse(name),
        None => loaded,
    }
}

/// A state whose chain began with a given seed.
enum Found {
    /// Nobody runs it: its lock, held while it is taken over.
    Free {
        name: String,
        retired: bool,
        lock: super::AccountLock,
    },
    /// Another account runs it now.
    Busy { name: String },
}

/// The state in `dir` or `retired/` (not `me`'s) whose chain began with `seed`.
fn find_chain(dir: &Path, seed: &Secret, me: &str) -> Option<Found> {
    for (folder, retired) in [(dir.to_owned(), false), (dir.join(RETIRED), true)] {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for e in entries.flatten() {
            let file = e.file_name();
            let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".json")) else {
                continue;
            };
            if name == me && !retired {
                continue;
            }
            let saved = match read(&e.path()) {
                Ok(Some(s)) => s,
                _ => match read(&folder.join(format!("{name}.json.backup"))) {
                    Ok(Some(s)) => s,
                    _ => continue,
                },
            };
            if !saved.began_with(seed) {
                continue;
            }
            return Some(match try_lock(dir, name, "run") {
                Ok(Locked::Acquired(lock)) => Found::Free {
                    name: name.to_owned(),
                    retired,
                    lock,
                },
                _ => Found::Busy {
                    name: name.to_owned(),
                },
            });
        }
    }
    None
}

/// Moves a state file and its copy (if any) to account `to`'s place in `dir`.
fn move_both(file: &Path, copy: &Path, dir: &Path, to: &str) -> std::io::Result<()> {
    if copy.exists() {
        move_file(copy, &backup_path(dir, to))?;
    }
    if file.exists() {
        move_file(file, &path(dir, to))?;
    }
    Ok(())
}

/// Saves `account`'s state atomically and durably (fsynced file and directory), 0600.
/// The state of a refresh-token chain is written twice, to a copy first and then to its
/// file (each atomically): whichever one is later damaged, the other holds the chain's
/// current link ([`load`] takes the newer of two good ones).
pub fn save(dir: &Path, account: &Account, saved: &Saved) -> std::io::Result<()> {
    let name = &account.name;
    ensure_dir(dir)?;
    let json = zeroize::Zeroizing::new(
        serde_json::to_vec(&form(saved, account)).expect("state always serializes"),
    );
    let write = |to: PathBuf| {
        atomic::write(&to, &json, 0o600, None, None).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("failed to save state to {}: {e}", to.display()),
            )
        })
    };
    if saved.keeps_chain(account) {
        write(backup_path(dir, name))?;
    }
    write(path(dir, name))
}

/// Writes a fresh state for `account` (no chain, no wait) under its lock, the damaged
/// or old state copied aside first: `tokend reseed` while no daemon runs the account.
/// Fails when another process holds the account.
pub fn reseed(dir: &Path, account: &Account) -> std::io::Result<Option<PathBuf>> {
    let _lock = match try_lock(dir, &account.name, "reseed")? {
        Locked::Acquired(l) => l,
        Locked::Busy { holder } => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!("{holder} holds the account: reseed it through that daemon's socket"),
            ))
        }
    };
    // A damaged state is copied aside by `load`; a good one is copied aside here.
    let mut fresh = match load(dir, &account.name) {
        Loaded::Found(s) => s,
        _ => Saved::new(account),
    };
    let file = path(dir, &account.name);
    let aside = if file.exists() {
        keep_aside(&file)
    } else {
        None
    };
    fresh.reseed();
    save(dir, account, &fresh)?;
    Ok(aside)
}

/// Moves an account's state to `retired/` (it was removed from the config): kept, so
/// that adding the account back resumes its refresh-token chain.
pub fn retire(dir: &Path, name: &str) -> std::io::Result<()> {
    let (from, copy) = (path(dir, name), backup_path(dir, name));
    if !from.exists() && !copy.exists() {
        return Ok(());
    }
    let to = retired_path(dir, name);
    ensure_dir(to.parent().expect("retired/NAME.json has a parent"))?;
    if copy.exists() {
        move_file(&copy, &retired_backup_path(dir, name))?;
    }
    if from.exists() {
        move_file(&from, &to)?;
    }
    tracing::info!(account = %name, "state moved to {}", to.display());
    Ok(())
}

/// Retires the state of accounts not in `keep` (removed while tokend was down), and
/// removes temporary files a killed tokend left.
pub fn retire_unknown(dir: &Path, keep: &[&str]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names = std::collections::BTreeSet::new();
    for e in entries.flatten() {
        let file = e.file_name();
        let file = file.to_string_lossy();
        let Some(name) = file
            .strip_suffix(".json")
            .or_else(|| file.strip_suffix(".json.backup"))
        else {
            continue;
        };
        if keep.contains(&name) {
            atomic::clean_stale(&e.path());
            continue;
        }
        names.insert(name.to_owned());
    }
    for name in names {
        // Another tokend (with another config on this state_dir) may run it right now.
        let _held = match try_lock(dir, &name, "run") {
            Ok(Locked::Acquired(l)) => l,
            Ok(Locked::Busy { .. }) | Err(_) => continue,
        };
        if let Err(err) = retire(dir, &name) {
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
    use super::super::fixtures::{account, rt_account, token};
    use super::*;

    use std::time::{Duration, SystemTime};

    fn found(l: Loaded) -> Saved {
        match l {
            Loaded::Found(s) => s,
            Loaded::Missing => panic!("no state"),
            Loaded::Damaged(why) => panic!("damaged: {why}"),
            Loaded::ChainInUse(by) => panic!("in use by {by}"),
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

        let back = found(load(dir.path(), "a"));
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
    fn a_token_bound_to_a_replaced_dpop_key_is_kept_on_disk_and_forgotten_for_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = account("full");
        let mut s = Saved::new(&a);
        s.record(&a, &Arc::new(token(SystemTime::now(), 3600)));
        s.bind_token(Some("jkt-old".into()));
        save(dir.path(), &a, &s).unwrap();
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("a.json")).unwrap()).unwrap();
        assert_eq!(file["token_jkt"], "jkt-old");

        let mut back = found(load(dir.path(), "a"));
        assert!(
            !back.forget_token_bound_elsewhere("jkt-old"),
            "the same key"
        );
        assert!(back.token(&a).is_some());
        let generation = back.generation();
        assert!(
            back.forget_token_bound_elsewhere("jkt-new"),
            "a replaced key"
        );
        assert!(back.token(&a).is_none() && back.generation() > generation);
        save(dir.path(), &a, &back).unwrap();
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("a.json")).unwrap()).unwrap();
        assert!(file["token"].is_null() && file.get("token_jkt").is_none());

        // A bearer token, or one saved before the key was kept: served with any key.
        let mut bearer = Saved::new(&a);
        bearer.record(&a, &Arc::new(token(SystemTime::now(), 3600)));
        assert!(!bearer.forget_token_bound_elsewhere("jkt-new"));
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
        let back = found(load(dir.path(), "gone"));
        assert_eq!(back.generation(), s.generation());
        assert!(dir.path().join("gone.json").exists());
        assert!(!dir.path().join("retired/gone.json").exists());
    }

    /// `rt_account` under another name.
    fn named(name: &str, seed: &str) -> Account {
        Account {
            name: name.into(),
            ..rt_account(seed, "x")
        }
    }

    /// A chain state for `account`, its current link `rt`, saved in `dir`.
    fn chain_saved(dir: &Path, account: &Account, rt: &str) -> Saved {
        let mut s = Saved::new(account);
        let mut t = token(SystemTime::now(), 60);
        t.refresh_token = Some(Secret::new(rt));
        s.record(account, &Arc::new(t));
        save(dir, account, &s).unwrap();
        s
    }

    fn link(l: Loaded, a: &Account) -> String {
        found(l).refresh_token(a).unwrap().expose().to_owned()
    }

    #[test]
    fn a_chain_is_written_twice_and_either_copy_alone_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = rt_account("seed", "x");
        chain_saved(dir.path(), &a, "link-1");
        let (file, copy) = (dir.path().join("a.json"), dir.path().join("a.json.backup"));
        assert_eq!(std::fs::read(&file).unwrap(), std::fs::read(&copy).unwrap());
        // The file truncated, emptied, garbage, or gone: the copy holds the link.
        for damage in [&b"{\"version\":2,\"gen"[..], b"", b"\x00\xff garbage"] {
            std::fs::write(&file, damage).unwrap();
            assert_eq!(link(load(dir.path(), "a"), &a), "link-1");
        }
        std::fs::remove_file(&file).unwrap();
        assert_eq!(link(load(dir.path(), "a"), &a), "link-1");
        // The copy damaged: the file holds it.
        chain_saved(dir.path(), &a, "link-2");
        std::fs::write(&copy, "{").unwrap();
        assert_eq!(link(load(dir.path(), "a"), &a), "link-2");
        // The damaged copies were kept aside, never overwritten.
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".damaged-")
            })
            .count();
        assert_eq!(aside, 4, "one copy aside per damaged file read");
        // Other grants keep one file.
        let plain = account("x");
        let mut s = Saved::new(&plain);
        s.record(&plain, &Arc::new(token(SystemTime::now(), 60)));
        let other = tempfile::tempdir().unwrap();
        save(other.path(), &plain, &s).unwrap();
        assert!(!other.path().join("a.json.backup").exists());
    }

    #[test]
    fn no_good_copy_is_damaged_with_the_reason_and_the_files_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let a = rt_account("seed", "x");
        chain_saved(dir.path(), &a, "link-1");
        std::fs::write(dir.path().join("a.json"), "").unwrap();
        std::fs::write(dir.path().join("a.json.backup"), "{\"version\":2,").unwrap();
        let Loaded::Damaged(why) = load(dir.path(), "a") else {
            panic!("a damaged state is not missing");
        };
        assert!(why.contains("a.json is empty"), "{why}");
        assert!(
            why.contains("a.json.backup is unreadable (Eof error"),
            "{why}"
        );
        assert!(why.contains("kept as"), "{why}");
        assert!(!why.contains("link-1"));
        std::fs::write(dir.path().join("a.json"), "{\"version\": 9}").unwrap();
        std::fs::remove_file(dir.path().join("a.json.backup")).unwrap();
        let Loaded::Damaged(why) = load(dir.path(), "a") else {
            panic!("a newer format is not missing");
        };
        assert!(why.contains("state format 9, newer"), "{why}");
    }

    #[test]
    fn a_renamed_account_resumes_its_chain_wherever_it_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let old = named("old", "seed-s3cret");
        chain_saved(dir.path(), &old, "link-7");
        // Under the old name in state_dir (moved from another config).
        let new = named("new", "seed-s3cret");
        assert_eq!(link(load_for(dir.path(), &new), &new), "link-7");
        assert!(!dir.path().join("old.json").exists());
        assert!(!dir.path().join("old.json.backup").exists());
        assert!(dir.path().join("new.json.backup").exists());
        // Retired (renamed by a reload: the old name was retired first).
        retire(dir.path(), "new").unwrap();
        let newer = named("newer", "seed-s3cret");
        assert_eq!(link(load_for(dir.path(), &newer), &newer), "link-7");
        assert!(!dir.path().join("retired/new.json").exists());
        // Another seed finds nothing; no seed's digest is in the clear.
        assert!(matches!(
            load_for(dir.path(), &named("x", "other")),
            Loaded::Missing
        ));
        let text = std::fs::read_to_string(dir.path().join("newer.json")).unwrap();
        assert!(!text.contains("seed-s3cret"));
    }

    #[test]
    fn a_chain_another_account_runs_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let old = named("old", "seed");
        chain_saved(dir.path(), &old, "link-1");
        let Locked::Acquired(_running) = try_lock(dir.path(), "old", "run").unwrap() else {
            panic!("free");
        };
        let Loaded::ChainInUse(by) = load_for(dir.path(), &named("new", "seed")) else {
            panic!("a running chain is not taken");
        };
        assert_eq!(by, "old");
        assert!(dir.path().join("old.json").exists(), "left alone");
    }

    #[test]
    fn reseed_starts_afresh_and_keeps_the_old_state_aside() {
        let dir = tempfile::tempdir().unwrap();
        let a = rt_account("seed", "x");
        chain_saved(dir.path(), &a, "link-1");
        std::fs::write(dir.path().join("a.json"), "garbage").unwrap();
        std::fs::write(dir.path().join("a.json.backup"), "garbage").unwrap();
        reseed(dir.path(), &a).unwrap();
        let s = found(load(dir.path(), "a"));
        assert!(s.refresh_token(&a).is_none(), "the configured seed is next");
        assert!(s.chain_lost(&a).is_none());
        let Locked::Acquired(_held) = try_lock(dir.path(), "a", "run").unwrap() else {
            panic!("free");
        };
        let e = reseed(dir.path(), &a).unwrap_err();
        assert!(e.to_string().contains("holds the account"), "{e}");
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
        let s = found(load(dir.path(), "a"));
        assert_eq!(s.refresh_token(&a).unwrap().expose(), "rotated-7");
    }
}
