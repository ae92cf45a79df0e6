//! `tokend credential git get|store|erase`: a git credential helper (gitcredentials(7);
//! `git config credential.helper "/usr/bin/tokend credential git"`).
//!
//! git writes `key=value` lines (`protocol`, `host`, `path` with `credential.useHttpPath`,
//! `capability[]`); `get` answers for the account whose `urls` hold the longest prefix of
//! `protocol://host/path`: `authtype=Bearer` and `credential=<token>` when git offered
//! `capability[]=authtype` (git 2.46 and later), else `username=<credential_username>`
//! and `password=<token>` (HTTP Basic), and always `password_expiry_utc`. `erase` is git
//! saying the server refused the credential: when it was this account's current token,
//! the daemon is asked for a refresh (no sooner than `min_refresh_interval`). `store`
//! keeps nothing (the daemon has the token). Other actions are ignored, as the protocol
//! asks, leaving room for new ones.
//!
//! No account for the URL: no answer, exit 0, and git asks its next helper (or the user).
//! A failure (the daemon not running, no valid token) is one line on stderr and exit 1;
//! git shows the line, ignores the status and goes on the same way.

use std::path::Path;
use std::time::SystemTime;

use super::{best, read_stdin, unix_seconds, Daemon, Error, Target};
use crate::config::Secret;
use crate::failure::Failure;

/// What git asked, as far as a helper cares.
#[derive(Debug, Default)]
pub struct Request {
    protocol: Option<String>,
    host: Option<String>,
    path: Option<String>,
    /// `capability[]`: what this git understands (`authtype`: Bearer credentials).
    capabilities: Vec<String>,
    /// The secret git used (`password`, or `credential` with `authtype`): for `erase`,
    /// the one the server refused.
    secret: Option<Secret>,
}

impl Request {
    /// Parses git's `key=value` lines, up to a blank line or the end. Unknown keys are
    /// ignored, as the protocol asks; `url=` is split into its parts, as `git credential`
    /// does (handy when a person feeds the helper by hand).
    pub fn parse(text: &str) -> Request {
        let mut r = Request::default();
        for line in text.lines() {
            if line.is_empty() {
                break;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "protocol" => r.protocol = Some(value.to_owned()),
                "host" => r.host = Some(value.to_owned()),
                "path" => r.path = Some(value.to_owned()),
                "password" | "credential" => r.secret = Some(Secret::new(value)),
                "capability[]" if value.is_empty() => r.capabilities.clear(),
                "capability[]" => r.capabilities.push(value.to_owned()),
                "url" => {
                    if let Ok(u) = url::Url::parse(value) {
                        r.protocol = Some(u.scheme().to_owned());
                        r.host = u.host_str().map(|h| match u.port() {
                            Some(p) => format!("{h}:{p}"),
                            None => h.to_owned(),
                        });
                        let path = u.path().trim_start_matches('/');
                        r.path = (!path.is_empty()).then(|| path.to_owned());
                    }
                }
                _ => {}
            }
        }
        r
    }

    /// The URL git asks about: `protocol://host/path` (no path without
    /// `credential.useHttpPath`: then only a URL for the whole host matches).
    pub fn target(&self) -> Option<Target> {
        let (protocol, host) = (self.protocol.as_deref()?, self.host.as_deref()?);
        let path = self.path.as_deref().unwrap_or_default();
        Target::url(url::Url::parse(&format!("{protocol}://{host}/{path}")).ok()?)
    }

    fn offers_authtype(&self) -> bool {
        self.capabilities.iter().any(|c| c == "authtype")
    }
}

/// Why a token cannot go into git's protocol: one `key=value` a line, no quoting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the account's token holds a line break or NUL, which git's credential protocol cannot carry"
)]
pub struct Unsendable;

/// The answer to `get`: a Bearer credential where git understands one, else a user name
/// and the token as the password; and when the token expires, so git does not use it
/// past that (git 2.41 and later).
pub fn answer(
    req: &Request,
    username: &str,
    token: &str,
    expires_at: SystemTime,
) -> Result<String, Unsendable> {
    if token.contains(['\n', '\r', '\0']) {
        return Err(Unsendable);
    }
    let mut out = String::new();
    if req.offers_authtype() {
        // `ephemeral`: other helpers (credential-cache, -store) do not keep it.
        out.push_str("capability[]=authtype\nauthtype=Bearer\n");
        out.push_str(&format!("credential={token}\nephemeral=true\n"));
    } else {
        out.push_str(&format!("username={username}\npassword={token}\n"));
    }
    out.push_str(&format!(
        "password_expiry_utc={}\n",
        unix_seconds(expires_at)
    ));
    Ok(out)
}

/// `tokend credential git ACTION`: reads git's request on stdin, answers on stdout.
pub async fn run(socket: &Path, action: &str) -> Result<(), Failure> {
    let input = read_stdin().map_err(runtime)?;
    let req = Request::parse(&input);
    match action {
        "get" => get(&Daemon::new(socket), &req).await,
        "erase" => erase(&Daemon::new(socket), &req).await,
        // `store`: the daemon holds the token; anything else: a newer git's action.
        _ => Ok(()),
    }
}

/// The account for git's URL, `None` when no readable account's `urls` match it.
async fn account(daemon: &Daemon, req: &Request) -> Result<Option<(String, String)>, Failure> {
    let Some(target) = req.target() else {
        return Ok(None);
    };
    let accounts = daemon.accounts().await.map_err(runtime)?;
    Ok(best(&accounts, &target).map(|a| (a.account.clone(), a.credential_username.clone())))
}

async fn get(daemon: &Daemon, req: &Request) -> Result<(), Failure> {
    let Some((name, username)) = account(daemon, req).await? else {
        return Ok(());
    };
    let issued = daemon.token(&name, None).await.map_err(runtime)?;
    let text = answer(req, &username, issued.token.expose(), issued.expires_at)
        .map_err(|e| Failure::Runtime(anyhow::anyhow!("account {name}: {e}")))?;
    let text = Secret::new(text);
    super::print(text.expose())
}

/// The server refused a credential: if it is this account's current token (or git did
/// not say which), ask for a new one. A refused credential of another helper's is none
/// of tokend's business.
async fn erase(daemon: &Daemon, req: &Request) -> Result<(), Failure> {
    let Some((name, _)) = account(daemon, req).await? else {
        return Ok(());
    };
    let current = match daemon.token(&name, None).await {
        Ok(issued) => Some(issued.token),
        // No valid token: a refresh is what git's next try needs all the more.
        Err(Error::Answered(_)) => None,
        Err(e) => return Err(runtime(e)),
    };
    let ours = match (&req.secret, &current) {
        (Some(refused), Some(token)) => refused.expose() == token.expose(),
        _ => true,
    };
    if ours {
        daemon.refresh(&name).await.map_err(runtime)?;
    }
    Ok(())
}

fn runtime(e: Error) -> Failure {
    Failure::Runtime(e.into())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const EXPIRES: u64 = 1_800_000_000;

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(EXPIRES)
    }

    #[test]
    fn a_request_as_git_sends_it() {
        let r = Request::parse(
            "capability[]=authtype\ncapability[]=state\nprotocol=https\nhost=git.example.org:8443\n\
             path=team/app.git\nwwwauth[]=Bearer realm=\"x\"\n\nprotocol=ignored\n",
        );
        assert_eq!(
            r.target().unwrap().url.as_str(),
            "https://git.example.org:8443/team/app.git"
        );
        assert!(r.offers_authtype());
        assert!(r.secret.is_none());
        // Without credential.useHttpPath there is no path: the host's root.
        let r = Request::parse("protocol=http\nhost=127.0.0.1:9418\n");
        assert_eq!(r.target().unwrap().url.as_str(), "http://127.0.0.1:9418/");
        assert!(!r.offers_authtype());
        // An empty capability[] clears the list; url= is split up.
        let r =
            Request::parse("capability[]=authtype\ncapability[]=\nurl=https://h.example/a/b.git\n");
        assert!(!r.offers_authtype());
        assert_eq!(
            r.target().unwrap().url.as_str(),
            "https://h.example/a/b.git"
        );
        // Not a URL git could use a token for.
        assert!(Request::parse("protocol=cert\npath=/etc/x.pem\n")
            .target()
            .is_none());
        assert!(Request::parse("host=h.example\n").target().is_none());
    }

    #[test]
    fn the_secret_git_sends_stays_out_of_debug() {
        let r = Request::parse("protocol=https\nhost=h\nusername=oauth2\npassword=hunter2\n");
        assert_eq!(r.secret.as_ref().unwrap().expose(), "hunter2");
        assert!(!format!("{r:?}").contains("hunter2"));
    }

    #[test]
    fn bearer_where_git_understands_it_else_basic() {
        let basic = Request::parse("protocol=https\nhost=h\n");
        assert_eq!(
            answer(&basic, "oauth2", "tok", at()).unwrap(),
            format!("username=oauth2\npassword=tok\npassword_expiry_utc={EXPIRES}\n")
        );
        let bearer = Request::parse("capability[]=authtype\nprotocol=https\nhost=h\n");
        assert_eq!(
            answer(&bearer, "oauth2", "tok", at()).unwrap(),
            format!(
                "capability[]=authtype\nauthtype=Bearer\ncredential=tok\nephemeral=true\n\
                 password_expiry_utc={EXPIRES}\n"
            )
        );
        for bad in ["a\nhost=evil", "a\rb", "a\0b"] {
            assert_eq!(answer(&basic, "oauth2", bad, at()), Err(Unsendable));
        }
    }
}
