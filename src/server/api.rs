//! The socket API's wire format (SPEC §4): paths and the JSON bodies, shared by the
//! server and the `get`/`status`/`refresh` client. A token itself is served in the json output
//! format, [`crate::output::render::TokenJson`], or as plain text.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::account::Status;

/// `GET` lists the accounts the caller may read: [`AccountList`].
pub const TOKENS: &str = "/v1/tokens";
/// `GET`: 200 when every account holds a valid token, else 503: [`Health`].
pub const HEALTH: &str = "/v1/health";
pub const CLUSTER: &str = "/v1/cluster";
/// `GET` (root or the daemon's own user): [`DaemonInfo`].
pub const DAEMON: &str = "/v1/daemon";

/// `GET /v1/daemon`: the config the daemon runs, its generation, when it was loaded,
/// and how the last reload went. Times are RFC 3339 UTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub config: String,
    /// 1 at start, one more for each reload that was applied.
    pub generation: u64,
    pub loaded_at: String,
    /// None until a reload was asked for.
    pub last_reload: Option<ReloadInfo>,
}

/// How the last reload went: `result` is `ok` or `refused` (then `errors`, one line each
/// as `tokend check` prints them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadInfo {
    pub at: String,
    pub result: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl DaemonInfo {
    pub fn of(d: &crate::daemon::DaemonState) -> Self {
        DaemonInfo {
            config: d.config.display().to_string(),
            generation: d.generation,
            loaded_at: crate::clock::rfc3339(d.loaded_at),
            last_reload: d.last_reload.as_ref().map(|r| ReloadInfo {
                at: crate::clock::rfc3339(r.at),
                result: if r.errors.is_empty() { "ok" } else { "refused" }.into(),
                errors: r.errors.clone(),
            }),
        }
    }
}
/// `GET`: OpenMetrics text.
pub const METRICS: &str = "/metrics";

/// `GET /v1/tokens/{account}`: the json output format.
pub fn token_path(account: &str) -> String {
    format!("{TOKENS}/{account}")
}

/// `GET /v1/tokens/{account}/raw`: the token as `text/plain`.
pub fn raw_path(account: &str) -> String {
    format!("{TOKENS}/{account}/raw")
}

/// `POST /v1/tokens/{account}/refresh`: 202, [`RefreshAccepted`].
pub fn refresh_path(account: &str) -> String {
    format!("{TOKENS}/{account}/refresh")
}

/// `POST /v1/tokens/{account}/dpop` (SPEC §9): a [`DpopRequest`] in, a [`DpopProof`]
/// out.
pub fn dpop_path(account: &str) -> String {
    format!("{TOKENS}/{account}/dpop")
}

/// What a reader is about to send with a DPoP-bound token: the method, the URL (under
/// one of the account's `urls`), and the resource server's `DPoP-Nonce`, if it sent one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpopRequest {
    pub method: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// The two headers of one request: `Authorization` (`DPoP <token>`) and `DPoP` (the
/// proof, for that method and URL only, with a `jti` of its own); `expires_at` is the
/// token's, RFC 3339 UTC. No `Debug`: both are credentials.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DpopProof {
    pub authorization: String,
    pub dpop: String,
    pub expires_at: String,
}

/// The query parameter of the refresh `POST`: `force=true` also ends a hold or a
/// rate-limit wait, for one attempt. Only root or the daemon's own user may ask for it
/// (else 403, [`code::FORBIDDEN`]).
pub const FORCE: &str = "force";

/// Parses a `force` value: `true` or `false`, nothing else.
pub fn parse_force(v: &str) -> Option<bool> {
    match v {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// The query parameter of the two token `GET`s: the token must stay valid at least this
/// long (seconds, or a duration like `5m`); the daemon refreshes first if it would not.
pub const MIN_VALID: &str = "min_valid";

/// Parses a `min_valid` value: whole seconds, or a humantime duration (`90s`, `5m`).
pub fn parse_min_valid(v: &str) -> Option<Duration> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v.parse().ok().map(Duration::from_secs);
    }
    humantime::parse_duration(v).ok()
}

/// Every error answer: `{"error": "...", "message": "..."}`; `error` is one of the
/// constants in [`code`], `message` is for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

/// The `error` values of [`ErrorBody`].
pub mod code {
    /// 400: a malformed request (a bad `min_valid` or `force`).
    pub const BAD_REQUEST: &str = "bad_request";
    /// 403: the caller may read the account but not do what it asked (`force=true`
    /// takes root or the daemon's own user).
    pub const FORBIDDEN: &str = "forbidden";
    /// 404: no such endpoint, or no account by that name that the caller may read.
    pub const NOT_FOUND: &str = "not_found";
    /// 409: the account cannot do what was asked (a reseed of an account that has no
    /// refresh-token chain).
    pub const CONFLICT: &str = "conflict";
    /// 405: the endpoint exists, for another method (see `Allow`).
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// 408: the request body did not arrive in time.
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    /// 413: a request body larger than the API takes.
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// 503: the account holds no valid token (see `Retry-After`).
    pub const NO_TOKEN: &str = "no_token";
    /// 503: the token expires sooner than `min_valid`, and no newer one could be had
    /// yet (see `Retry-After`).
    pub const EXPIRES_TOO_SOON: &str = "expires_too_soon";
    /// 503: too many connections; try again.
    pub const BUSY: &str = "busy";
}

/// `GET /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountList {
    pub accounts: Vec<AccountInfo>,
}

/// One account's state, without its token. Times are RFC 3339 UTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountInfo {
    pub account: String,
    pub status: Status,
    /// Whether it holds a token that has not expired (`failing` accounts may).
    pub valid: bool,
    pub expires_at: Option<String>,
    pub last_refresh: Option<String>,
    pub last_error: Option<String>,
    pub next_refresh: Option<String>,
    /// Cluster mode: the member that refreshes the account now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Cluster mode: the member that fetched the token served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreshed_by: Option<String>,
    /// Cluster mode: this member is cut off from the cluster (it serves its last token,
    /// and refreshes alone only as `on_cluster_loss` allows).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub degraded: bool,
    /// Cluster mode: what is wrong with this member's place in the cluster for this
    /// account (another cluster key, another identity under its name, a shared record
    /// refused, a clock that is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_warning: Option<String>,
    /// The resource URLs the token is for (`urls`): the credential helpers of git and
    /// container tools pick an account by them, from this list, in the same round trip.
    #[serde(default)]
    pub urls: Vec<String>,
    /// The user name those helpers send beside the token (`credential_username`).
    #[serde(default)]
    pub credential_username: String,
}

/// `GET /v1/cluster` (cluster mode only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// This member's name.
    pub member: String,
    /// Whether it reaches etcd.
    pub reachable: bool,
    /// Why it takes no part (another cluster key), or that its clock is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Its clock against the provider's (or etcd's), in seconds: positive when ahead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_skew_seconds: Option<i64>,
    /// The accounts the caller may read that this member shares with the cluster.
    pub accounts: Vec<ClusterAccount>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterAccount {
    pub account: String,
    /// The member that refreshes it now, if known.
    pub leader: Option<String>,
    /// The member that fetched the token served.
    pub refreshed_by: Option<String>,
    pub degraded: bool,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` (HTTP 200) or `unhealthy` (HTTP 503).
    pub status: String,
    /// Accounts without a valid token (on the socket, those the caller may read).
    pub not_ready: Vec<NotReady>,
    /// Cluster mode: accounts for which this member is cut off from the cluster (it
    /// serves its last token; healthy while that is valid).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotReady {
    pub account: String,
    pub status: Status,
    /// Only on the socket: the TCP listener shows no error messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// `POST /v1/tokens/{account}/refresh`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshAccepted {
    pub account: String,
    /// Always `accepted`: the refresh happens in the background, no sooner than
    /// `min_refresh_interval` after the previous request to the provider.
    pub status: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_valid_takes_seconds_or_durations() {
        assert_eq!(parse_min_valid("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_min_valid("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_min_valid("1h 30s"), Some(Duration::from_secs(3630)));
        assert_eq!(parse_min_valid(""), None);
        assert_eq!(parse_min_valid("-1"), None);
        assert_eq!(parse_min_valid("soon"), None);
    }

    #[test]
    fn force_is_true_or_false() {
        assert_eq!(parse_force("true"), Some(true));
        assert_eq!(parse_force("false"), Some(false));
        for bad in ["", "maybe", "1", "TRUE", "yes"] {
            assert_eq!(parse_force(bad), None, "{bad:?}");
        }
    }
}
