//! The one-shot commands: `check` and `once`. They print for a person and return a
//! [`Failure`] that `main` maps to an exit code.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;

use tokio::sync::Semaphore;

use crate::account::persist;
use crate::account::schedule::{self, ErrorClass};
use crate::clock::Clock;
use crate::config::{Account, Config, ConfigErrors};
use crate::oauth::{Endpoint, HttpEndpoint};
use crate::output;

/// Why a command failed, and so its exit status.
#[derive(Debug)]
pub enum Failure {
    /// Bad usage or configuration: exit 2 (systemd's RestartPreventExitStatus=2).
    Usage(anyhow::Error),
    /// Anything else: exit 1.
    Runtime(anyhow::Error),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Runtime(_) => 1,
        }
    }
}

impl From<ConfigErrors> for Failure {
    fn from(e: ConfigErrors) -> Self {
        Failure::Usage(e.into())
    }
}

/// `tokend check`: the config is valid (already, when this runs), every secret reads,
/// every output directory and the state directory take a file. Prints one line per
/// check; fails if any did.
pub fn check(config: &Config) -> Result<(), Failure> {
    let mut problems = 0usize;
    let mut report = |ok: Result<String, String>| match ok {
        Ok(line) => println!("ok    {line}"),
        Err(line) => {
            problems += 1;
            println!("FAIL  {line}");
        }
    };
    report(Ok(format!(
        "config {} ({} accounts)",
        config.path.display(),
        config.accounts.len()
    )));
    for a in &config.accounts {
        for (key, spec) in a.secrets() {
            report(match spec.read() {
                Ok(_) => Ok(format!("{}: {key} readable ({})", a.name, spec.describe())),
                Err(e) => Err(format!("{}: {key}: {e}", a.name)),
            });
        }
        if let Some(ca) = &a.ca_file {
            report(
                match HttpEndpoint::new(Arc::new(a.clone()), Clock::System) {
                    Ok(_) => Ok(format!("{}: ca_file {} loads", a.name, ca.display())),
                    Err(e) => Err(format!("{}: {e}", a.name)),
                },
            );
        }
        for o in &a.outputs {
            let dir = o.path.parent().unwrap_or(Path::new("."));
            report(match dir_takes_files(dir) {
                Ok(()) => Ok(format!(
                    "{}: output directory {} writable",
                    a.name,
                    dir.display()
                )),
                Err(e) => Err(format!("{}: output {}: {e}", a.name, o.path.display())),
            });
            if (o.owner.is_some() || o.group.is_some()) && !nix::unistd::geteuid().is_root() {
                println!(
                    "note  {}: output {} sets owner/group: needs root or CAP_CHOWN",
                    a.name,
                    o.path.display()
                );
            }
        }
    }
    if let Some(dir) = &config.daemon.state_dir {
        report(match dir_takes_files(dir) {
            Ok(()) => Ok(format!("state_dir {} writable", dir.display())),
            Err(e) => Err(format!("state_dir {}: {e}", dir.display())),
        });
    }
    if problems > 0 {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "{problems} check(s) failed"
        )));
    }
    Ok(())
}

/// Whether a file can be created in `dir`, or in the nearest existing ancestor when
/// `dir` does not exist yet (the daemon creates it).
fn dir_takes_files(dir: &Path) -> Result<(), String> {
    let mut d = dir;
    while !d.exists() {
        d = match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
    }
    if !d.is_dir() {
        return Err(format!("{} is not a directory", d.display()));
    }
    tempfile::Builder::new()
        .prefix(".tokend-check.")
        .tempfile_in(d)
        .map(drop)
        .map_err(|e| format!("cannot create a file in {}: {e}", d.display()))
}

/// Attempts `once` makes for an account before it gives up on transient failures.
const ONCE_ATTEMPTS: u32 = 3;

/// `tokend once`: fetch a token for each selected account, write its outputs; exit 0
/// only if every account succeeded.
pub async fn once(
    config: &Config,
    names: &[String],
    min_valid: Option<Duration>,
) -> Result<(), Failure> {
    if min_valid.is_some() && config.daemon.state_dir.is_none() {
        tracing::warn!(
            "--min-valid needs [daemon] state_dir to find saved tokens; asking the providers"
        );
    }
    for n in names {
        if !config.accounts.iter().any(|a| &a.name == n) {
            return Err(Failure::Usage(anyhow::anyhow!(
                "no account named {n:?} in {}",
                config.path.display()
            )));
        }
    }
    let selected: Vec<Account> = config
        .accounts
        .iter()
        .filter(|a| names.is_empty() || names.contains(&a.name))
        .cloned()
        .collect();
    let semaphore = Arc::new(Semaphore::new(config.daemon.max_concurrent_refreshes));
    let mut set = tokio::task::JoinSet::new();
    for a in selected {
        let semaphore = semaphore.clone();
        let state_dir = config.daemon.state_dir.clone();
        set.spawn(async move {
            let _permit = semaphore
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let name = a.name.clone();
            (name, once_account(Arc::new(a), state_dir, min_valid).await)
        });
    }
    let mut failed = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (name, result) = joined.map_err(|e| Failure::Runtime(e.into()))?;
        match result {
            Ok(()) => {}
            Err(e) => {
                tracing::error!(account = %name, "{e}");
                failed.push(name);
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        failed.sort();
        Err(Failure::Runtime(anyhow::anyhow!(
            "no token for: {}",
            failed.join(", ")
        )))
    }
}

async fn once_account(
    account: Arc<Account>,
    state_dir: Option<PathBuf>,
    min_valid: Option<Duration>,
) -> anyhow::Result<()> {
    output::clean_stale(&account);
    let saved = state_dir
        .as_deref()
        .and_then(|d| persist::load(d, &account.name));
    let (mut saved, refresh_token) = persist::prepare(&account, saved);
    if let Some(min) = min_valid {
        if let Some(token) = saved.token_valid_for(&account, SystemTime::now(), min) {
            let a = account.clone();
            tokio::task::spawn_blocking(move || output::write_all(&a, &token)).await??;
            tracing::info!(account = %account.name, "saved token still valid for {}: outputs written, provider not asked", humantime::format_duration(min));
            return Ok(());
        }
    }
    // A hold after refused credentials (kept by the daemon or an earlier `once`) still
    // applies: a cron job must not turn a wrong password into a stream of logins.
    if let (Some(until), Some(_)) = (saved.not_before(), saved.hold_key) {
        if let Ok(left) = until.duration_since(SystemTime::now()) {
            anyhow::bail!(
                "the provider refused these credentials; holding for {} more (change the secret to try now)",
                humantime::format_duration(Duration::from_secs(left.as_secs()))
            );
        }
    }
    let endpoint =
        HttpEndpoint::new(account.clone(), Clock::System)?.with_refresh_token(refresh_token);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
    let mut attempt = 0;
    let token = loop {
        attempt += 1;
        match endpoint.fetch().await {
            Ok(t) => break t,
            Err(e) => {
                let class = schedule::classify(&e);
                if class == ErrorClass::Rejected {
                    if let Some(dir) = &state_dir {
                        let hold = account.schedule.auth_failure_hold;
                        saved.set_not_before(Some(SystemTime::now() + hold));
                        saved.hold_key = Some(persist::credentials_key(&account));
                        let (dir, name, held) = (dir.clone(), account.name.clone(), saved.clone());
                        tokio::task::spawn_blocking(move || persist::save(&dir, &name, &held))
                            .await??;
                    }
                }
                if class != ErrorClass::Transient || attempt >= ONCE_ATTEMPTS {
                    return Err(e.into());
                }
                let wait = schedule::backoff(attempt + 1, &mut rng).max(Duration::from_millis(500));
                tracing::warn!(account = %account.name, attempt, "{e}; trying again in {wait:?}");
                tokio::time::sleep(wait).await;
            }
        }
    };
    if let Some(dir) = state_dir {
        saved.record(&account, &token);
        let name = account.name.clone();
        tokio::task::spawn_blocking(move || persist::save(&dir, &name, &saved)).await??;
    }
    let a = account.clone();
    let t = token.clone();
    tokio::task::spawn_blocking(move || output::write_all(&a, &t)).await??;
    crate::account::hooks::run(&account).await;
    let secs = token.lifetime().as_secs();
    tracing::info!(account = %account.name, expires_in = secs, "token written to {} output(s)", account.outputs.len());
    Ok(())
}
