//! `docker-credential-tokend get|store|erase|list`: the container tools' credential-helper
//! protocol (docker-credential-helpers; docker, podman, buildah and skopeo run it for a
//! registry named in `credHelpers`, or for every registry with `credsStore`). The same
//! binary as `tokend`, called by that name: the packages install the link, and `main`
//! turns the call into `tokend credential docker ACTION`.
//!
//! `get` reads the registry (`host[:port]`, or a URL) on stdin and prints
//! `{"ServerURL","Username","Secret"}` for the account whose `urls` match it best, with
//! its `credential_username` and token. `list` prints `{URL: user name}` for every URL of
//! every account the caller may read. `store` keeps nothing (the daemon holds the token);
//! `erase` (`docker logout`) asks the daemon for a refresh, within `min_refresh_interval`.
//!
//! Failures are answered as the protocol wants: the message on stdout and exit 1; no
//! account for the registry (or none the caller may read) is the protocol's own
//! "credentials not found in native keychain", after which the tool goes on without
//! credentials. A daemon that is not running or has no valid token is an error the tool
//! shows, not "not found": a pull would fail later with a less useful 401.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::{best, read_stdin, Daemon, Error, Target};
use crate::config::Secret;
use crate::failure::Failure;

/// The protocol's "no credentials for this server" (docker-credential-helpers'
/// `errCredentialsNotFoundMessage`): the tools compare stdout with it.
pub const NOT_FOUND: &str = "credentials not found in native keychain";

/// `get`'s answer.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Credentials<'a> {
    #[serde(rename = "ServerURL")]
    server_url: &'a str,
    username: &'a str,
    secret: &'a str,
}

/// Why a docker helper call gives no credentials.
#[derive(Debug, thiserror::Error)]
enum DockerError {
    /// No readable account for the registry: the protocol's own message.
    #[error("{NOT_FOUND}")]
    NotFound,
    #[error(transparent)]
    Daemon(#[from] Error),
    #[error("unknown credential action {0:?}: get, store, erase or list")]
    Action(String),
}

/// `docker-credential-tokend ACTION`: the request on stdin, the answer (or the error
/// message) on stdout.
pub async fn run(socket: Result<PathBuf, Failure>, action: &str) -> Result<(), Failure> {
    let socket = match socket {
        Ok(s) => s,
        Err(Failure::Usage(e) | Failure::Runtime(e)) => {
            super::print(&format!("tokend: {e:#}\n"))?;
            return Err(Failure::Reported);
        }
        Err(f) => return Err(f),
    };
    let daemon = Daemon::new(&socket);
    let answer = match action {
        "get" => get(&daemon).await,
        "list" => list(&daemon).await,
        "erase" => erase(&daemon).await,
        "store" => read_stdin()
            .map(|_| Secret::new(""))
            .map_err(DockerError::from),
        other => Err(DockerError::Action(other.to_owned())),
    };
    match answer {
        Ok(text) => super::print(text.expose()),
        Err(e) => {
            // The tools read the message from stdout; stderr they throw away.
            super::print(&format!("{e}\n"))?;
            Err(Failure::Reported)
        }
    }
}

/// The account for the registry on stdin, and the registry as the tool named it.
async fn account(daemon: &Daemon) -> Result<(String, String, String), DockerError> {
    let server = read_stdin()?.trim().to_owned();
    let target = Target::loose(&server).ok_or(DockerError::NotFound)?;
    let accounts = daemon.accounts().await?;
    let a = best(&accounts, &target).ok_or(DockerError::NotFound)?;
    Ok((server, a.account.clone(), a.credential_username.clone()))
}

async fn get(daemon: &Daemon) -> Result<Secret, DockerError> {
    let (server, name, username) = account(daemon).await?;
    let issued = match daemon.token(&name, None).await {
        // Listed a moment ago, gone now (a reload): as if it never was.
        Err(Error::NoAccount { .. }) => return Err(DockerError::NotFound),
        other => other?,
    };
    let json = serde_json::to_string(&Credentials {
        server_url: &server,
        username: &username,
        secret: issued.token.expose(),
    })
    .expect("strings serialize");
    Ok(Secret::new(json + "\n"))
}

async fn list(daemon: &Daemon) -> Result<Secret, DockerError> {
    let mut urls: BTreeMap<&str, &str> = BTreeMap::new();
    let accounts = daemon.accounts().await?;
    for a in &accounts {
        for u in &a.urls {
            urls.entry(u).or_insert(&a.credential_username);
        }
    }
    let json = serde_json::to_string(&urls).expect("strings serialize");
    Ok(Secret::new(json + "\n"))
}

async fn erase(daemon: &Daemon) -> Result<Secret, DockerError> {
    match account(daemon).await {
        Ok((_, name, _)) => daemon.refresh(&name).await?,
        // Nothing of tokend's to forget.
        Err(DockerError::NotFound) => {}
        Err(e) => return Err(e),
    }
    Ok(Secret::new(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_named_as_docker_reads_them() {
        let c = Credentials {
            server_url: "127.0.0.1:5000",
            username: "oauth2",
            secret: "tok",
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"ServerURL":"127.0.0.1:5000","Username":"oauth2","Secret":"tok"}"#
        );
        assert_eq!(
            DockerError::NotFound.to_string(),
            "credentials not found in native keychain"
        );
    }
}
