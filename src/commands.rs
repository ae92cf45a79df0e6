//! The one-shot commands: `check`, `once` and `jwks`. They print for a person (or, for
//! `jwks`, for a provider) and return a [`Failure`] that `main` maps to an exit code.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::account::engine::{self, Attempt, Engine, Failed, Opened, Shared};
use crate::account::persist::{self, WaitKind};
use crate::account::schedule::ErrorClass;
use crate::clock::Clock;
use crate::config::{Account, Config};
pub use crate::failure::Failure;
use crate::oauth::{HttpEndpoint, Transports};
use crate::output;

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
    let transports = Transports::default();
    // Many outputs share a directory: each is tried once (issue #11).
    let mut dirs: std::collections::HashMap<&Path, Result<(), String>> = Default::default();
    for a in &config.accounts {
        for (key, spec) in a.secrets() {
            report(match spec.read() {
                Ok(_) => Ok(format!("{}: {key} readable ({})", a.name, spec.describe())),
                Err(e) => Err(format!(
                    "{}: {key}: {}",
                    a.name,
                    crate::oauth::error_chain(&e)
                )),
            });
        }
        if let Some(ca) = &a.options.ca_file {
            report(match transports.client(a) {
                Ok(_) => Ok(format!("{}: ca_file {} loads", a.name, ca.display())),
                Err(e) => Err(format!("{}: {e}", a.name)),
            });
        }
        if let Some(line) = private_key_line(a) {
            report(line);
        }
        // An unreadable certificate or key is reported with the secrets above.
        if let Some(Ok(pem)) = a.client_cert.as_ref().map(|c| c.cert.read()) {
            report(
                crate::config::keys::certificate_info(pem.expose().as_bytes())
                    .map_err(|e| format!("{}: client_cert {e}", a.name))
                    .and_then(|info| {
                        transports
                            .client(a)
                            .map_err(|e| format!("{}: {}", a.name, crate::oauth::error_chain(&e)))?;
                        Ok(format!(
                            "{}: client_cert {} ({} certificate(s)) valid until {}, loads with its key",
                            a.name,
                            info.subject,
                            info.chain_len,
                            crate::clock::rfc3339(info.not_after)
                        ))
                    }),
            );
        }
        for o in &a.outputs {
            let dir = o.path.parent().unwrap_or(Path::new("."));
            let takes = dirs.entry(dir).or_insert_with(|| dir_takes_files(dir));
            report(match takes.clone() {
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
    if let Some(c) = &config.cluster {
        let probed = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(crate::cluster::probe(c)));
        report(match probed {
            Ok(line) => Ok(format!("cluster member {}: {line}", c.member)),
            Err(e) => Err(format!("cluster member {}: {e:#}", c.member)),
        });
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

/// The `check` line of an account's private_key_jwt key: its kind, `kid` and `alg`.
/// The config's own checks (it parses, fits `assertion_alg`, is tokend's alone) ran when
/// it was loaded; an unreadable key is reported with the other secrets.
fn private_key_line(a: &Account) -> Option<Result<String, String>> {
    let pem = a.assertion.as_ref()?.private_key.read().ok()?;
    Some(
        crate::config::keys::PrivateKey::from_pem(&pem)
            .and_then(|k| {
                let (kid, alg) = crate::oauth::assertion::kid_and_alg(a, &k)?;
                Ok(format!(
                    "{}: private_key is {}, signs {alg} assertions with kid {kid:?}",
                    a.name,
                    k.kind()
                ))
            })
            .map_err(|e| format!("{}: private_key {e}", a.name)),
    )
}

/// `tokend jwks [ACCOUNT...]`: the JSON Web Key Set (RFC 7517 §5) of the accounts'
/// private_key_jwt public keys, with `kid`, `alg` and `use`, on stdout. The same key
/// under the same `kid` is listed once; one `kid` for two different keys is an error
/// (a provider could not tell which one signed).
pub fn jwks(config: &Config, names: &[String]) -> Result<(), Failure> {
    for n in names {
        match config.accounts.iter().find(|a| &a.name == n) {
            None => {
                return Err(Failure::Usage(anyhow::anyhow!(
                    "no account named {n:?} in {}",
                    config.path.display()
                )))
            }
            Some(a) if a.assertion.is_none() => {
                return Err(Failure::Usage(anyhow::anyhow!(
                    "account {n:?} does not use client_auth = \"private_key_jwt\": it has no key to publish"
                )))
            }
            Some(_) => {}
        }
    }
    let selected: Vec<&Account> = config
        .accounts
        .iter()
        .filter(|a| a.assertion.is_some() && (names.is_empty() || names.contains(&a.name)))
        .collect();
    if selected.is_empty() {
        return Err(Failure::Usage(anyhow::anyhow!(
            "no account in {} uses client_auth = \"private_key_jwt\"",
            config.path.display()
        )));
    }
    // kid -> (the account that first used it, its JWK)
    let mut keys: Vec<(String, String, serde_json::Value)> = Vec::new();
    for a in selected {
        let spec = &a.assertion.as_ref().expect("selected for it").private_key;
        let pem = spec.read().map_err(|e| {
            Failure::Runtime(anyhow::anyhow!(
                "account {}: {}",
                a.name,
                crate::oauth::error_chain(&e)
            ))
        })?;
        let jwk = crate::config::keys::PrivateKey::from_pem(&pem)
            .and_then(|k| {
                let (kid, alg) = crate::oauth::assertion::kid_and_alg(a, &k)?;
                Ok((kid.clone(), k.public_jwk(&kid, alg)))
            })
            .map_err(|e| {
                Failure::Runtime(anyhow::anyhow!(
                    "account {}: the private key from {} {e}",
                    a.name,
                    spec.describe()
                ))
            })?;
        let (kid, jwk) = jwk;
        match keys.iter().find(|(k, _, _)| *k == kid) {
            Some((_, _, same)) if *same == jwk => {}
            Some((_, first, _)) => {
                return Err(Failure::Usage(anyhow::anyhow!(
                    "accounts {first} and {} use the kid {kid:?} for different keys; \
                     give them different key_id values, or print them one at a time",
                    a.name
                )))
            }
            None => keys.push((kid, a.name.clone(), jwk)),
        }
    }
    let set =
        serde_json::json!({ "keys": keys.into_iter().map(|(_, _, j)| j).collect::<Vec<_>>() });
    println!(
        "{}",
        serde_json::to_string_pretty(&set).expect("a JWK set serializes")
    );
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
/// Retries of a failed delivery (a local failure: no request) before `once` gives up.
const ONCE_DELIVERIES: u32 = 3;
/// The longest `once` sleeps between tries, whatever the backoff says.
const ONCE_MAX_PAUSE: Duration = Duration::from_secs(5);
/// A saved backoff this short is waited out; a longer one fails the run.
const ONCE_MAX_SAVED_BACKOFF: Duration = Duration::from_secs(10);

/// `tokend once`: a token for each selected account through the same refresh engine as
/// the daemon (locks, holds, rate limits, sharing), every output written; exit 0 only if
/// every account succeeded.
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
    let shared = Shared::new(
        config.daemon.max_concurrent_refreshes,
        Clock::System,
        config.daemon.state_dir.clone(),
    );
    let transports = Arc::new(Transports::default());
    // Cluster mode: this run is a member while it lasts (an init container beside a
    // running Deployment), and leaves when done.
    let leave = CancellationToken::new();
    let member_tasks = tokio_util::task::TaskTracker::new();
    let member = match &config.cluster {
        Some(c) => Some((
            crate::cluster::join(
                c,
                config.daemon.state_dir.as_deref(),
                Clock::System,
                leave.clone(),
                &member_tasks,
            )
            .map_err(Failure::Runtime)?,
            c.on_cluster_loss,
            c.lease_ttl,
        )),
        None => None,
    };
    let mut set = tokio::task::JoinSet::new();
    for a in config
        .accounts
        .iter()
        .filter(|a| names.is_empty() || names.contains(&a.name))
    {
        let (a, shared, transports) = (Arc::new(a.clone()), shared.clone(), transports.clone());
        let member = member.clone().filter(|_| a.cluster);
        set.spawn(async move {
            let name = a.name.clone();
            let result = match member {
                Some((m, on_loss, ttl)) => {
                    once_clustered(a, shared, &transports, &m, on_loss, ttl).await
                }
                None => once_account(a, shared, &transports, min_valid).await,
            };
            (name, result)
        });
    }
    let mut failed = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (name, result) = joined.map_err(|e| Failure::Runtime(e.into()))?;
        if let Err(e) = result {
            tracing::error!(account = %name, "{e:#}");
            failed.push(name);
        }
    }
    // Leaves the cluster: the leads this run took are released at once.
    leave.cancel();
    member_tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), member_tasks.wait()).await;
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
    shared: Shared,
    transports: &Arc<Transports>,
    min_valid: Option<Duration>,
) -> anyhow::Result<()> {
    output::clean_stale(&account);
    let endpoint = Arc::new(HttpEndpoint::new(
        account.clone(),
        Clock::System,
        transports,
    )?);
    let deadline = tokio::time::Instant::now() + account.request_timeout() + Duration::from_secs(5);
    let mut engine = loop {
        match Engine::try_open(account.clone(), endpoint.clone(), shared.clone()).await? {
            Opened::Ready(e) => break e,
            Opened::Busy { holder } => {
                // Another tokend runs this account: its token, never a second request
                // (it may hold the only valid refresh token).
                if let Some(dir) = &shared.state_dir {
                    let saved = match persist::load(dir, &account.name) {
                        persist::Loaded::Found(s) => Some(s),
                        _ => None,
                    };
                    if let Some(t) = saved.and_then(|s| {
                        s.token_valid_for(
                            &account,
                            SystemTime::now(),
                            min_valid.unwrap_or_default(),
                        )
                    }) {
                        engine::deliver(&account, t, true)
                            .await
                            .map_err(anyhow::Error::msg)?;
                        tracing::info!(account = %account.name, "{holder} runs this account: its token written to {} output(s), provider not asked", account.outputs.len());
                        return Ok(());
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "{holder} runs this account on the same state_dir and has no valid token for it (see `tokend status`); not asking the provider beside it"
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    if let Some(min) = min_valid {
        if let Some(token) = engine.saved_token(min) {
            engine
                .deliver(token, true)
                .await
                .map_err(anyhow::Error::msg)?;
            tracing::info!(account = %account.name, "saved token still valid for {}: outputs written, provider not asked", humantime::format_duration(min));
            return Ok(());
        }
    }
    let never = CancellationToken::new();
    for attempt in 1..=ONCE_ATTEMPTS {
        // A hold or a rate limit recorded by the daemon or an earlier `once` still applies:
        // a cron job or a crash-looping init container is no stream of requests.
        if let Some((until, kind)) = engine.wait() {
            let left = until.duration_since(SystemTime::now()).unwrap_or_default();
            let left_text = humantime::format_duration(Duration::from_secs(left.as_secs().max(1)));
            match kind {
                WaitKind::Hold => anyhow::bail!(
                    "the provider refused these credentials; holding for {left_text} more (change the secret, or `tokend refresh --force` on a running daemon, to try now)"
                ),
                WaitKind::RateLimit => anyhow::bail!(
                    "the provider rate-limited this account; waiting {left_text} more, until {}",
                    crate::clock::rfc3339(until)
                ),
                WaitKind::Backoff if left > ONCE_MAX_SAVED_BACKOFF => anyhow::bail!(
                    "backing off after failed requests; the next try is allowed in {left_text}"
                ),
                WaitKind::Backoff => tokio::time::sleep(left).await,
            }
        }
        let failed = match engine.attempt(&never).await {
            Attempt::Fresh(token) => {
                tracing::info!(account = %account.name, expires_in = token.lifetime().as_secs(), "token written to {} output(s)", account.outputs.len());
                return Ok(());
            }
            Attempt::Cancelled => unreachable!("nothing cancels once"),
            Attempt::Failed(f) => f,
        };
        if failed.class == ErrorClass::Local && failed.fetched.is_some() {
            return redeliver(&mut engine, failed, &never).await;
        }
        if failed.class != ErrorClass::Transient || attempt == ONCE_ATTEMPTS {
            anyhow::bail!("{}", failed.message);
        }
        let pause = failed
            .retry_in
            .clamp(Duration::from_millis(500), ONCE_MAX_PAUSE);
        tracing::warn!(account = %account.name, attempt, "{}; trying again in {pause:?}", failed.message);
        tokio::time::sleep(pause).await;
    }
    unreachable!("the last attempt returns")
}

/// `once` for an account shared in a cluster (SPEC §8, issue #22): the account runs as
/// in the daemon, coordinated with the others, until it serves a valid token: a fresh
/// shared token is adopted (no request), and the provider is asked only by the leader
/// (after its claim, so a refresh token is never sent twice). Then it stops.
async fn once_clustered(
    account: Arc<Account>,
    shared: Shared,
    transports: &Arc<Transports>,
    member: &crate::cluster::Joined,
    on_loss: crate::config::OnClusterLoss,
    lease_ttl: Duration,
) -> anyhow::Result<()> {
    use crate::account::state::Status;
    let endpoint = HttpEndpoint::new(account.clone(), Clock::System, transports)?;
    let cancel = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let handle = crate::account::spawn_coordinated(
        account.clone(),
        endpoint,
        shared,
        Some(member.coordinator(account.clone(), on_loss)),
        None,
        Default::default(),
        true,
        cancel.clone(),
        &tasks,
    );
    let mut state = handle.view.state.clone();
    // Long enough for a lead to lapse and the request to be answered.
    let limit = lease_ttl * 3 + account.request_timeout() + Duration::from_secs(5);
    let outcome = tokio::time::timeout(limit, async {
        loop {
            {
                let s = state.borrow_and_update();
                if s.status == Status::Fresh && s.valid_token(SystemTime::now()).is_some() {
                    return Ok(s.cluster().refreshed_by.clone());
                }
                if s.status == Status::Failing {
                    if let Some(e) = &s.last_error {
                        return Err(anyhow::anyhow!("{e}"));
                    }
                }
            }
            if state.changed().await.is_err() {
                anyhow::bail!("the account stopped before it had a token");
            }
        }
    })
    .await;
    handle.stop(false, Vec::new());
    cancel.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
    match outcome {
        Ok(Ok(by)) => {
            tracing::info!(account = %account.name, fetched_by = by.as_deref().unwrap_or("?"), "the cluster's token written to {} output(s)", account.outputs.len());
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => anyhow::bail!(
            "no token from the cluster within {}",
            humantime::format_duration(limit)
        ),
    }
}

/// A token was fetched but its delivery failed: retry the delivery only.
async fn redeliver(
    engine: &mut Engine<HttpEndpoint>,
    mut failed: Failed,
    never: &CancellationToken,
) -> anyhow::Result<()> {
    for _ in 0..ONCE_DELIVERIES {
        tracing::warn!(account = %engine.account().name, "{}; retrying in {:?}", failed.message, failed.retry_in);
        tokio::time::sleep(failed.retry_in.min(ONCE_MAX_PAUSE)).await;
        match engine.retry_delivery(never).await {
            Attempt::Fresh(_) => return Ok(()),
            Attempt::Failed(f) => failed = f,
            Attempt::Cancelled => break,
        }
    }
    anyhow::bail!("{}", failed.message)
}

/// `tokend reseed ACCOUNT` (SPEC §5): through the daemon that answers on `socket`; when
/// none does, in the config's `state_dir` directly, under the account's lock (the old
/// state is copied aside, never deleted).
pub async fn reseed(config: &Path, socket: &Path, account: &str) -> Result<(), Failure> {
    if crate::client::reseed(socket, account).await? {
        return Ok(());
    }
    let config = crate::config::load(config)?;
    let Some(a) = config.accounts.iter().find(|a| a.name == account) else {
        return Err(Failure::Usage(anyhow::anyhow!(
            "no account {account:?} in {}",
            config.path.display()
        )));
    };
    if !a.rotates() {
        return Err(Failure::Usage(anyhow::anyhow!(
            "account {account:?} is not of the refresh_token grant: it has no chain to re-seed"
        )));
    }
    let Some(dir) = &config.daemon.state_dir else {
        return Err(Failure::Usage(anyhow::anyhow!(
            "no [daemon] state_dir in {}: there is no saved chain to re-seed",
            config.path.display()
        )));
    };
    let (dir2, a2) = (dir.clone(), a.clone());
    let aside = tokio::task::spawn_blocking(move || persist::reseed(&dir2, &a2))
        .await
        .map_err(|e| Failure::Runtime(e.into()))?
        .map_err(|e| {
            Failure::Runtime(anyhow::anyhow!(
                "failed to re-seed {account:?} in {}: {e}",
                dir.display()
            ))
        })?;
    match aside {
        Some(old) => println!(
            "{account} re-seeded in {} (no daemon answered on {}): the next request sends the configured refresh_token; the old state is kept as {}",
            dir.display(),
            socket.display(),
            old.display()
        ),
        None => println!(
            "{account} re-seeded in {} (no daemon answered on {}): the next request sends the configured refresh_token",
            dir.display(),
            socket.display()
        ),
    }
    Ok(())
}
