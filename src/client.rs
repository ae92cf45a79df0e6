//! `tokend get`, `tokend status` and `tokend refresh`: a small HTTP/1.1 client (hyper) for the daemon's
//! Unix socket, using the wire types of [`crate::server::api`], and what a person sees,
//! including when the daemon is not running or the socket refuses them.

use std::io::{IsTerminal as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::config::{DEFAULT_PATH, DEFAULT_SOCKET};
use crate::failure::Failure;
use crate::server::api::{self, AccountInfo, AccountList, ErrorBody, RefreshAccepted};

/// How long a plain request may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `min_valid` request may take: the daemon waits up to a minute for a
/// refresh.
const MIN_VALID_TIMEOUT: Duration = Duration::from_secs(75);
/// The largest answer read (tokens can exceed 1000 characters; lists are small).
const MAX_ANSWER: usize = 4 << 20;

/// Why a request to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tokend is not running: nothing answers on {} ({reason})", socket.display())]
    NotRunning { socket: PathBuf, reason: String },
    #[error("permission denied on {}{hint}", socket.display())]
    Denied { socket: PathBuf, hint: String },
    #[error("no answer from tokend on {} within {after:?}", socket.display())]
    Timeout { socket: PathBuf, after: Duration },
    #[error("failed to talk to tokend on {}: {reason}", socket.display())]
    Protocol { socket: PathBuf, reason: String },
}

/// An answer from the daemon.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    /// The daemon's error message, or the status line when the body is not one.
    pub fn message(&self) -> String {
        match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(e) => e.message,
            Err(_) => format!("HTTP {}", self.status),
        }
    }
}

/// Talks to the daemon on one socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
        }
    }

    /// One request on its own connection.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        timeout: Duration,
    ) -> Result<Answer, Error> {
        tokio::time::timeout(timeout, self.exchange(method, path, Empty::<Bytes>::new()))
            .await
            .map_err(|_| Error::Timeout {
                socket: self.socket.clone(),
                after: timeout,
            })?
    }

    /// One `POST` with a JSON body on its own connection.
    pub async fn post_json(
        &self,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Answer, Error> {
        let body = http_body_util::Full::new(Bytes::from(body));
        tokio::time::timeout(timeout, self.exchange(Method::POST, path, body))
            .await
            .map_err(|_| Error::Timeout {
                socket: self.socket.clone(),
                after: timeout,
            })?
    }

    async fn exchange<B>(&self, method: Method, path: &str, body: B) -> Result<Answer, Error>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = self.connect().await?;
        let protocol = |e: &dyn std::fmt::Display| Error::Protocol {
            socket: self.socket.clone(),
            reason: e.to_string(),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| protocol(&e))?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .uri(path)
            .header(hyper::header::HOST, "tokend");
        if method == Method::POST {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req.method(method).body(body).map_err(|e| protocol(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| protocol(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| protocol(&*e))?
            .to_bytes();
        conn.abort();
        Ok(Answer { status, body })
    }

    /// Connects, waiting (within the caller's timeout) while the socket's queue of
    /// pending connections is full: another local user may flood it, and the daemon
    /// drains it as fast as it answers; a blocking connect would wait the same way.
    async fn connect(&self) -> Result<tokio::net::UnixStream, Error> {
        let mut pause = Duration::from_millis(2);
        loop {
            match tokio::net::UnixStream::connect(&self.socket).await {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(e) => return Err(self.connect_error(e)),
            }
        }
    }

    fn connect_error(&self, e: std::io::Error) -> Error {
        let socket = self.socket.clone();
        match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotRunning {
                socket,
                reason: "no socket file".into(),
            },
            std::io::ErrorKind::ConnectionRefused => Error::NotRunning {
                socket,
                reason: "a stale socket file, nobody listening".into(),
            },
            std::io::ErrorKind::PermissionDenied => Error::Denied {
                hint: denied_hint(&socket),
                socket,
            },
            _ => Error::Protocol {
                socket,
                reason: format!("failed to connect: {e}"),
            },
        }
    }
}

/// Says who may connect to `socket`, as far as its metadata tells.
fn denied_hint(socket: &Path) -> String {
    let Ok(m) = std::fs::metadata(socket) else {
        return ": its directory is closed to you".into();
    };
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(m.gid()))
        .ok()
        .flatten()
        .map_or_else(|| m.gid().to_string(), |g| g.name);
    format!(
        " (mode {:04o}, group {group}): connecting takes write permission; ask to be added to group {group}",
        m.permissions().mode() & 0o7777
    )
}

/// The socket to use: `--socket`, else the config's `[daemon] socket`, else
/// [`DEFAULT_SOCKET`]. Only `[daemon] socket` is read from the config, so a client
/// needs neither the secrets nor a valid account list, and a config the caller may not
/// read is no error unless it was named explicitly.
pub fn resolve_socket(socket: Option<&Path>, config: Option<&Path>) -> Result<PathBuf, Failure> {
    if let Some(s) = socket {
        return Ok(s.to_owned());
    }
    let (path, explicit) = match config {
        Some(p) => (p, true),
        None => (Path::new(DEFAULT_PATH), false),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e)
            if !explicit
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
        {
            return Ok(PathBuf::from(DEFAULT_SOCKET));
        }
        Err(e) => {
            return Err(Failure::Usage(anyhow::anyhow!(
                "failed to read {} for [daemon] socket: {e} (or pass --socket)",
                path.display()
            )))
        }
    };
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        // Not `{e}`: toml's Display quotes the offending line, which may hold a secret.
        let at = e.span().map_or(0, |s| s.start);
        let line = text.as_bytes()[..at.min(text.len())]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1;
        Failure::Usage(anyhow::anyhow!(
            "failed to parse {} for [daemon] socket: line {line}: {} (run `tokend check`, or pass --socket)",
            path.display(),
            e.message()
        ))
    })?;
    let socket = table
        .get("daemon")
        .and_then(|d| d.get("socket"))
        .and_then(|s| s.as_str());
    Ok(match socket {
        Some(s) => path.parent().unwrap_or(Path::new(".")).join(s),
        None => PathBuf::from(DEFAULT_SOCKET),
    })
}

fn runtime_error(e: Error) -> Failure {
    Failure::Runtime(e.into())
}

/// `tokend get ACCOUNT`: prints the token (raw: no newline unless stdout is a terminal;
/// `--json`: the json output format).
/// `tokend get ACCOUNT --dpop METHOD URL [--nonce N]` (SPEC §5, §9): the two header
/// lines of one request with a DPoP-bound token, for `curl -H @-`.
pub async fn get_dpop(
    socket: &Path,
    account: &str,
    method: &str,
    url: &str,
    nonce: Option<&str>,
) -> Result<(), Failure> {
    let body = serde_json::to_vec(&api::DpopRequest {
        method: method.to_owned(),
        url: url.to_owned(),
        nonce: nonce.map(str::to_owned),
    })
    .expect("a request always serializes");
    let answer = Client::new(socket)
        .post_json(&api::dpop_path(account), body, TIMEOUT)
        .await
        .map_err(runtime_error)?;
    match answer.status {
        StatusCode::OK => {
            let proof: api::DpopProof = serde_json::from_slice(&answer.body).map_err(|e| {
                Failure::Runtime(anyhow::anyhow!("the daemon's answer is not a proof: {e}"))
            })?;
            let lines = zeroize::Zeroizing::new(format!(
                "Authorization: {}\nDPoP: {}\n",
                proof.authorization, proof.dpop
            ));
            let mut out = std::io::stdout().lock();
            out.write_all(lines.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| Failure::Runtime(anyhow::anyhow!("failed to write the headers: {e}")))
        }
        StatusCode::NOT_FOUND => Err(no_account(socket, account)),
        _ => Err(Failure::Runtime(anyhow::anyhow!("{}", answer.message()))),
    }
}

pub async fn get(
    socket: &Path,
    account: &str,
    json: bool,
    min_valid: Option<Duration>,
) -> Result<(), Failure> {
    let mut path = if json {
        api::token_path(account)
    } else {
        api::raw_path(account)
    };
    let mut timeout = TIMEOUT;
    if let Some(m) = min_valid {
        path.push_str(&format!("?{}={}", api::MIN_VALID, m.as_secs()));
        timeout = MIN_VALID_TIMEOUT;
    }
    let answer = Client::new(socket)
        .request(Method::GET, &path, timeout)
        .await
        .map_err(runtime_error)?;
    match answer.status {
        StatusCode::OK => {
            let mut out = std::io::stdout().lock();
            let tty = std::io::stdout().is_terminal();
            let newline = tty && !answer.body.ends_with(b"\n");
            out.write_all(&answer.body)
                .and_then(|()| {
                    if newline {
                        out.write_all(b"\n")
                    } else {
                        Ok(())
                    }
                })
                .and_then(|()| out.flush())
                .map_err(|e| Failure::Runtime(anyhow::anyhow!("failed to write the token: {e}")))
        }
        StatusCode::NOT_FOUND => Err(no_account(socket, account)),
        _ => Err(Failure::Runtime(anyhow::anyhow!("{}", answer.message()))),
    }
}

/// What a 404 for `account` means to the person who asked.
fn no_account(socket: &Path, account: &str) -> Failure {
    Failure::Runtime(anyhow::anyhow!(
        "no account {account:?} that you (uid {}) may read on {}: it does not exist, or its \
         [account.access] names neither your user nor one of your groups",
        nix::unistd::getuid(),
        socket.display()
    ))
}

/// `tokend refresh ACCOUNT [--force]`: asks the daemon for a refresh now and says so in
/// one line; the refresh itself happens in the background (`tokend status` shows it).
pub async fn refresh(socket: &Path, account: &str, force: bool) -> Result<(), Failure> {
    let mut path = api::refresh_path(account);
    if force {
        path.push_str(&format!("?{}=true", api::FORCE));
    }
    let answer = Client::new(socket)
        .request(Method::POST, &path, TIMEOUT)
        .await
        .map_err(runtime_error)?;
    match answer.status {
        StatusCode::ACCEPTED => {
            // The body says nothing the status did not; it is checked all the same, so
            // that an answer from something that is not tokend is not taken for one.
            serde_json::from_slice::<RefreshAccepted>(&answer.body).map_err(|e| {
                Failure::Runtime(anyhow::anyhow!("tokend answered an unexpected body: {e}"))
            })?;
            println!("{}", refresh_requested(account, force));
            Ok(())
        }
        StatusCode::NOT_FOUND => Err(no_account(socket, account)),
        _ => Err(Failure::Runtime(anyhow::anyhow!("{}", answer.message()))),
    }
}

/// `tokend reseed ACCOUNT` through the running daemon: `Ok(false)` when no daemon
/// answers on `socket` (the caller then reseeds in `state_dir` itself).
pub async fn reseed(socket: &Path, account: &str) -> Result<bool, Failure> {
    let path = format!("{}/{}/reseed", api::TOKENS, account);
    let answer = match Client::new(socket)
        .request(Method::POST, &path, TIMEOUT)
        .await
    {
        Ok(a) => a,
        Err(Error::NotRunning { .. }) => return Ok(false),
        Err(e) => return Err(runtime_error(e)),
    };
    match answer.status {
        StatusCode::ACCEPTED => {
            serde_json::from_slice::<RefreshAccepted>(&answer.body).map_err(|e| {
                Failure::Runtime(anyhow::anyhow!("tokend answered an unexpected body: {e}"))
            })?;
            println!("{account} re-seeded: its refresh-token chain starts again from the configured refresh_token, now (tokend status shows how it went)");
            Ok(true)
        }
        StatusCode::NOT_FOUND => Err(no_account(socket, account)),
        _ => Err(Failure::Runtime(anyhow::anyhow!("{}", answer.message()))),
    }
}

/// The line `tokend refresh` prints on success.
fn refresh_requested(account: &str, force: bool) -> String {
    if force {
        format!(
            "forced refresh of {account} requested: a hold or rate-limit wait is ended for one attempt"
        )
    } else {
        format!("refresh of {account} requested")
    }
}

/// `tokend status`: a table of the accounts the caller may read, or the JSON list.
pub async fn status(socket: &Path, json: bool) -> Result<(), Failure> {
    let answer = Client::new(socket)
        .request(Method::GET, api::TOKENS, TIMEOUT)
        .await
        .map_err(runtime_error)?;
    if answer.status != StatusCode::OK {
        return Err(Failure::Runtime(anyhow::anyhow!("{}", answer.message())));
    }
    if json {
        std::io::stdout()
            .write_all(&answer.body)
            .map_err(|e| Failure::Runtime(e.into()))?;
        return Ok(());
    }
    let list: AccountList = serde_json::from_slice(&answer.body).map_err(|e| {
        Failure::Runtime(anyhow::anyhow!("tokend answered an unexpected list: {e}"))
    })?;
    if list.accounts.is_empty() {
        println!(
            "no accounts that you (uid {}) may read",
            nix::unistd::getuid()
        );
        return Ok(());
    }
    print!("{}", table(&list.accounts, SystemTime::now()));
    // The daemon's own line, for whoever may see it (root, the daemon's user).
    if let Ok(answer) = Client::new(socket)
        .request(Method::GET, api::DAEMON, TIMEOUT)
        .await
    {
        if let Ok(info) = serde_json::from_slice::<api::DaemonInfo>(&answer.body) {
            print!("{}", daemon_line(&info));
        }
    }
    Ok(())
}

/// The lines `tokend status` prints about the daemon itself: its config and
/// generation, and a refused reload with its errors.
pub fn daemon_line(d: &api::DaemonInfo) -> String {
    let mut out = format!(
        "\nconfig {} (generation {}, loaded {})",
        d.config, d.generation, d.loaded_at
    );
    match &d.last_reload {
        Some(r) if r.result != "ok" => {
            out.push_str(&format!(
                "\nlast reload at {} REFUSED, still running generation {}:",
                r.at, d.generation
            ));
            for e in &r.errors {
                out.push_str(&format!("\n  {e}"));
            }
        }
        Some(r) => out.push_str(&format!("; last reload at {} ok", r.at)),
        None => {}
    }
    out.push('\n');
    out
}

/// The `status` table: account, status, expires in, last refresh, last error.
pub fn table(accounts: &[AccountInfo], now: SystemTime) -> String {
    let mut rows = vec![[
        "ACCOUNT".to_owned(),
        "STATUS".to_owned(),
        "EXPIRES IN".to_owned(),
        "LAST REFRESH".to_owned(),
        "LAST ERROR".to_owned(),
    ]];
    for a in accounts {
        let expires = match a.expires_at.as_deref().and_then(parse_time) {
            Some(t) => match t.duration_since(now) {
                Ok(left) if a.valid => human(left),
                _ => "expired".to_owned(),
            },
            None => "-".to_owned(),
        };
        let last = match a.last_refresh.as_deref().and_then(parse_time) {
            Some(t) => format!("{} ago", human(now.duration_since(t).unwrap_or_default())),
            None => "never".to_owned(),
        };
        // Cluster mode: who refreshes it, or that this member is cut off.
        let status = match (&a.leader, a.degraded) {
            (_, true) => format!("{}, degraded", a.status.as_str()),
            (Some(l), false) => format!("{}, led by {l}", a.status.as_str()),
            (None, false) => a.status.as_str().to_owned(),
        };
        rows.push([
            a.account.clone(),
            status,
            expires,
            last,
            match (&a.last_error, &a.cluster_warning) {
                (Some(e), Some(w)) => format!("{e}; cluster: {w}"),
                (Some(e), None) => e.clone(),
                (None, Some(w)) => format!("cluster: {w}"),
                (None, None) => "-".to_owned(),
            },
        ]);
    }
    let mut widths = [0usize; 4];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        for (w, cell) in widths.iter().zip(row) {
            out.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(&row[4]);
        out.push('\n');
    }
    out
}

fn parse_time(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// A duration in its two largest units: `2d 3h`, `52m 10s`, `9s`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::Status;

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(9)), "9s");
        assert_eq!(human(Duration::from_secs(3130)), "52m 10s");
        assert_eq!(human(Duration::from_secs(3 * 3600 + 120 + 5)), "3h 2m");
        assert_eq!(human(Duration::from_secs(2 * 86_400 + 3 * 3600)), "2d 3h");
    }

    #[test]
    fn status_table() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = |secs: i64| {
            crate::clock::rfc3339(if secs >= 0 {
                now + Duration::from_secs(secs as u64)
            } else {
                now - Duration::from_secs((-secs) as u64)
            })
        };
        let accounts = vec![
            AccountInfo {
                account: "msk".into(),
                status: Status::Fresh,
                valid: true,
                expires_at: Some(at(3130)),
                last_refresh: Some(at(-470)),
                last_error: None,
                next_refresh: Some(at(2400)),
                leader: None,
                refreshed_by: None,
                degraded: false,
                cluster_warning: None,
                urls: Vec::new(),
                credential_username: "oauth2".into(),
            },
            AccountInfo {
                account: "cibmtr".into(),
                status: Status::Failing,
                valid: false,
                expires_at: Some(at(-60)),
                last_refresh: None,
                last_error: Some("token endpoint answered HTTP 401: invalid_client".into()),
                next_refresh: None,
                leader: None,
                refreshed_by: None,
                degraded: false,
                cluster_warning: None,
                urls: Vec::new(),
                credential_username: "oauth2".into(),
            },
        ];
        assert_eq!(
            table(&accounts, now),
            "ACCOUNT  STATUS   EXPIRES IN  LAST REFRESH  LAST ERROR\n\
             msk      fresh    52m 10s     7m 50s ago    -\n\
             cibmtr   failing  expired     never         token endpoint answered HTTP 401: invalid_client\n"
        );
    }

    #[test]
    fn socket_from_flag_config_or_default() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(
            &cfg,
            "[daemon]\nsocket = \"run/t.sock\"\n[[account]]\nbogus = 1\n",
        )
        .unwrap();
        assert_eq!(
            resolve_socket(Some(Path::new("/x.sock")), Some(&cfg)).unwrap(),
            PathBuf::from("/x.sock")
        );
        // Relative to the config's directory, as the daemon reads it; the rest of the
        // config is not validated.
        assert_eq!(
            resolve_socket(None, Some(&cfg)).unwrap(),
            dir.path().join("run/t.sock")
        );
        std::fs::write(&cfg, "[daemon]\nlog_level = \"debug\"\n").unwrap();
        assert_eq!(
            resolve_socket(None, Some(&cfg)).unwrap(),
            PathBuf::from(DEFAULT_SOCKET)
        );
        // A config named explicitly must be readable.
        let err = resolve_socket(None, Some(&dir.path().join("missing.toml"))).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
