//! The credential helpers (SPEC §5, issue 24): kubectl's exec plugin ([`kubectl`]), git's
//! `credential.helper` ([`git`]) and the container tools' `credHelpers`
//! (`docker-credential-tokend`, [`docker`]). Each speaks its tool's protocol on stdin and
//! stdout and asks the running daemon over its socket, so it holds no secret and obeys
//! the socket's access rules: a reader gets only the accounts it may read.
//!
//! Here: what the three share. [`Daemon`] asks for the account list (with each account's
//! `urls` and `credential_username`), a token, or a refresh; [`Target`] and [`best`] pick
//! the account whose URL is the longest prefix of the one a tool asks for. What each
//! tool's protocol looks like lives in its own file; how a failure reaches the person
//! (an exit code, a line on stderr) is `main`'s, through [`crate::failure::Failure`].
//!
//! Cost: kubectl runs its plugin on every command, so `credential kubectl` is one socket
//! round trip (the token, by name); git and container tools look an account up by URL,
//! which is two (the list, then the token).

pub mod docker;
pub mod git;
pub mod kubectl;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hyper::{Method, StatusCode};
use serde::Deserialize;

use crate::client::{self, Client};
use crate::config::Secret;
use crate::failure::Failure;
use crate::server::api::{self, AccountInfo, AccountList, RefreshAccepted};

/// How long one question to the daemon may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `min_valid` question may take: the daemon waits up to a minute for a
/// refresh.
const MIN_VALID_TIMEOUT: Duration = Duration::from_secs(75);
/// The most a tool's request on stdin may hold (git's and docker's are a few lines).
const MAX_INPUT: u64 = 64 * 1024;

/// Why a helper got no credential from the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon could not be asked: not running, the socket closed to the caller, no
    /// answer in time, or an answer that is no HTTP.
    #[error(transparent)]
    Daemon(#[from] client::Error),
    /// 404: no account by that name, or one the caller may not read (the daemon answers
    /// both alike, so names cannot be probed).
    #[error("no account {account:?} that you (uid {uid}) may read on {}: it does not exist, or its [account.access] names neither your user nor one of your groups", socket.display())]
    NoAccount {
        account: String,
        uid: u32,
        socket: PathBuf,
    },
    /// The daemon's own answer: no valid token (503, with why), or anything else.
    #[error("{0}")]
    Answered(String),
    /// The tool's request on stdin could not be read.
    #[error("failed to read the request on stdin: {0}")]
    Input(std::io::Error),
}

/// A token as a helper hands it on: the token and when it expires.
pub struct Issued {
    pub token: Secret,
    pub expires_at: SystemTime,
}

/// The part of `GET /v1/tokens/{account}` (the json output format) a helper uses.
#[derive(Deserialize)]
struct TokenBody {
    access_token: Secret,
    expires_at: String,
}

/// The running daemon, asked on its socket.
pub struct Daemon {
    client: Client,
    socket: PathBuf,
}

impl Daemon {
    pub fn new(socket: &Path) -> Self {
        Daemon {
            client: Client::new(socket),
            socket: socket.to_owned(),
        }
    }

    /// The accounts the caller may read, in name order, with their `urls`.
    pub async fn accounts(&self) -> Result<Vec<AccountInfo>, Error> {
        let answer = self
            .client
            .request(Method::GET, api::TOKENS, TIMEOUT)
            .await?;
        if answer.status != StatusCode::OK {
            return Err(Error::Answered(one_line(&answer.message())));
        }
        serde_json::from_slice::<AccountList>(&answer.body)
            .map(|l| l.accounts)
            .map_err(|e| Error::Answered(format!("tokend answered an unexpected list: {e}")))
    }

    /// The account's token; with `min_valid`, one that stays valid that long (the daemon
    /// refreshes first if it must, no sooner than `min_refresh_interval` allows).
    pub async fn token(&self, account: &str, min_valid: Option<Duration>) -> Result<Issued, Error> {
        let mut path = api::token_path(account);
        let mut timeout = TIMEOUT;
        if let Some(m) = min_valid {
            path.push_str(&format!("?{}={}", api::MIN_VALID, m.as_secs()));
            timeout = MIN_VALID_TIMEOUT;
        }
        let answer = self.client.request(Method::GET, &path, timeout).await?;
        match answer.status {
            StatusCode::OK => {
                let body: TokenBody = serde_json::from_slice(&answer.body).map_err(|e| {
                    Error::Answered(format!("tokend answered an unexpected token body: {e}"))
                })?;
                let expires_at = parse_time(&body.expires_at).ok_or_else(|| {
                    Error::Answered(format!(
                        "tokend answered an expiry that is no RFC 3339 time: {:?}",
                        body.expires_at
                    ))
                })?;
                Ok(Issued {
                    token: body.access_token,
                    expires_at,
                })
            }
            StatusCode::NOT_FOUND => Err(self.no_account(account)),
            _ => Err(Error::Answered(one_line(&answer.message()))),
        }
    }

    /// Asks for a refresh of the account now (202), which the daemon makes no sooner than
    /// its `min_refresh_interval` after the last request to the provider.
    pub async fn refresh(&self, account: &str) -> Result<(), Error> {
        let answer = self
            .client
            .request(Method::POST, &api::refresh_path(account), TIMEOUT)
            .await?;
        match answer.status {
            StatusCode::ACCEPTED => serde_json::from_slice::<RefreshAccepted>(&answer.body)
                .map(drop)
                .map_err(|e| Error::Answered(format!("tokend answered an unexpected body: {e}"))),
            StatusCode::NOT_FOUND => Err(self.no_account(account)),
            _ => Err(Error::Answered(one_line(&answer.message()))),
        }
    }

    fn no_account(&self, account: &str) -> Error {
        Error::NoAccount {
            account: account.to_owned(),
            uid: nix::unistd::getuid().as_raw(),
            socket: self.socket.clone(),
        }
    }
}

/// The daemon's message on one line: it may quote a provider's `error_description`, and
/// each tool shows a helper's failure as one line.
fn one_line(message: &str) -> String {
    message
        .split(char::is_control)
        .filter(|part| !part.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_time(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// Seconds since 1970 (git's `password_expiry_utc`).
fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The tool's whole request on stdin (bounded), read before anything is asked: git
/// writes it all and may not expect the helper to leave early.
fn read_stdin() -> Result<String, Error> {
    let mut text = String::new();
    std::io::stdin()
        .lock()
        .take(MAX_INPUT)
        .read_to_string(&mut text)
        .map_err(Error::Input)?;
    Ok(text)
}

/// Writes a helper's answer to stdout.
fn print(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::Runtime(anyhow::anyhow!("failed to write the answer: {e}")))
}

/// The URL a tool asks a credential for, to match against the accounts' `urls`.
#[derive(Debug)]
pub struct Target {
    url: url::Url,
    /// False for a bare `host[:port]` (container tools name a registry so): then any
    /// scheme matches, and the port as written.
    scheme_known: bool,
}

impl Target {
    /// A full URL, as git's `protocol`, `host` and `path` make one.
    pub fn url(url: url::Url) -> Option<Target> {
        (matches!(url.scheme(), "http" | "https") && url.has_host()).then_some(Target {
            url,
            scheme_known: true,
        })
    }

    /// What container tools send: a URL (`https://index.docker.io/v1/`), or a registry's
    /// `host[:port][/path]` without a scheme.
    pub fn loose(text: &str) -> Option<Target> {
        let text = text.trim();
        if text.contains("://") {
            return Target::url(url::Url::parse(text).ok()?);
        }
        let url = url::Url::parse(&format!("https://{text}")).ok()?;
        (url.has_host() && url.username().is_empty() && url.password().is_none()).then_some(
            Target {
                url,
                scheme_known: false,
            },
        )
    }

    /// How long a prefix of this target `prefix` is (the length of its path, without a
    /// trailing `/`), if it is one: the same scheme, host and port (a target without a
    /// scheme: the same host and the same port as written), and its path a prefix of the
    /// target's on a segment boundary (`/team` is one of `/team/app`, not of `/teamwork`).
    fn prefix_len(&self, prefix: &url::Url) -> Option<usize> {
        if prefix.host_str() != self.url.host_str() {
            return None;
        }
        let same_port = if self.scheme_known {
            prefix.scheme() == self.url.scheme()
                && prefix.port_or_known_default() == self.url.port_or_known_default()
        } else {
            prefix.port() == self.url.port()
        };
        if !same_port {
            return None;
        }
        let p = prefix.path().trim_end_matches('/');
        let path = self.url.path();
        let under = path == p
            || path
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/'));
        under.then_some(p.len())
    }
}

/// The account whose `urls` hold the longest prefix of `target`; of two with the same
/// prefix, the first in the list (the daemon lists accounts in name order).
pub fn best<'a>(accounts: &'a [AccountInfo], target: &Target) -> Option<&'a AccountInfo> {
    let mut found: Option<(&AccountInfo, usize)> = None;
    for a in accounts {
        for u in &a.urls {
            let Ok(prefix) = url::Url::parse(u) else {
                continue;
            };
            if let Some(len) = target.prefix_len(&prefix) {
                if found.is_none_or(|(_, best)| len > best) {
                    found = Some((a, len));
                }
            }
        }
    }
    found.map(|(a, _)| a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::Status;

    pub(crate) fn account(name: &str, urls: &[&str]) -> AccountInfo {
        AccountInfo {
            account: name.into(),
            status: Status::Fresh,
            valid: true,
            expires_at: None,
            last_refresh: None,
            last_error: None,
            next_refresh: None,
            leader: None,
            refreshed_by: None,
            degraded: false,
            cluster_warning: None,
            urls: urls
                .iter()
                .map(|u| url::Url::parse(u).unwrap().to_string())
                .collect(),
            credential_username: "oauth2".into(),
        }
    }

    fn pick(accounts: &[AccountInfo], target: Option<Target>) -> Option<&str> {
        best(accounts, &target.expect("a target")).map(|a| a.account.as_str())
    }

    fn url(u: &str) -> Option<Target> {
        Target::url(url::Url::parse(u).unwrap())
    }

    #[test]
    fn the_longest_prefix_on_a_segment_boundary_wins() {
        let accounts = [
            account("host", &["https://git.example.org/"]),
            account("team", &["https://git.example.org/team"]),
            account(
                "app",
                &[
                    "https://git.example.org/team/app/",
                    "https://other.example/",
                ],
            ),
        ];
        assert_eq!(
            pick(&accounts, url("https://git.example.org/x.git")),
            Some("host")
        );
        assert_eq!(
            pick(&accounts, url("https://git.example.org/team/y.git")),
            Some("team")
        );
        assert_eq!(
            pick(&accounts, url("https://git.example.org/team")),
            Some("team")
        );
        assert_eq!(
            pick(&accounts, url("https://git.example.org/teamwork/z")),
            Some("host")
        );
        assert_eq!(
            pick(&accounts, url("https://git.example.org/team/app")),
            Some("app")
        );
        assert_eq!(
            pick(&accounts, url("https://GIT.example.org:443/team/app/a.git")),
            Some("app")
        );
        assert_eq!(
            pick(&accounts, url("https://other.example/anything")),
            Some("app")
        );
        // Another scheme, port or host is another place.
        assert_eq!(pick(&accounts, url("http://git.example.org/x.git")), None);
        assert_eq!(
            pick(&accounts, url("https://git.example.org:8443/x.git")),
            None
        );
        assert_eq!(pick(&accounts, url("https://example.org/x.git")), None);
        assert!(Target::url(url::Url::parse("cert:///etc/x.pem").unwrap()).is_none());
    }

    #[test]
    fn the_daemons_message_is_one_line() {
        assert_eq!(
            one_line(
                "account \"a\" has no valid token (failing: invalid_grant: no\r\nmore\ttries)"
            ),
            "account \"a\" has no valid token (failing: invalid_grant: no more tries)"
        );
    }

    #[test]
    fn ties_go_to_the_first_account_in_the_list() {
        let accounts = [
            account("a", &["https://r.example/"]),
            account("b", &["https://r.example/"]),
        ];
        assert_eq!(pick(&accounts, url("https://r.example/v2/")), Some("a"));
    }

    #[test]
    fn a_registry_without_a_scheme_matches_by_host_and_port_as_written() {
        let accounts = [
            account("plain", &["http://127.0.0.1:5000/"]),
            account("hub", &["https://index.docker.io/v1/"]),
            account("corp", &["https://registry.example.org"]),
        ];
        let loose = Target::loose;
        assert_eq!(pick(&accounts, loose("127.0.0.1:5000\n")), Some("plain"));
        assert_eq!(pick(&accounts, loose("127.0.0.1:5001")), None);
        assert_eq!(pick(&accounts, loose("registry.example.org")), Some("corp"));
        assert_eq!(
            pick(&accounts, loose("registry.example.org/team")),
            Some("corp")
        );
        assert_eq!(pick(&accounts, loose("registry.example.org:5000")), None);
        assert_eq!(
            pick(&accounts, loose("https://index.docker.io/v1/")),
            Some("hub")
        );
        assert_eq!(pick(&accounts, loose("index.docker.io")), None);
        assert!(Target::loose("").is_none());
        assert!(Target::loose("user:pw@registry.example.org").is_none());
    }
}
