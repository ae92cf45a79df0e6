//! What an account's task publishes (through a `watch` channel) for readers: the socket
//! server, `status`, readiness. Readers never lock what the task holds.

use std::sync::Arc;
use std::time::SystemTime;

use crate::oauth::Token;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// No token yet, and no failure yet.
    Pending,
    /// A request is under way.
    Refreshing,
    /// A valid token, and the last request succeeded.
    Fresh,
    /// The last request failed; a token may still be valid.
    Failing,
    /// The token expired and was not renewed.
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Refreshing => "refreshing",
            Status::Fresh => "fresh",
            Status::Failing => "failing",
            Status::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenState {
    pub status: Status,
    pub token: Option<Arc<Token>>,
    /// When the last successful refresh happened.
    pub last_refresh: Option<SystemTime>,
    /// The last failure, as a message safe to show (no secret, no token).
    pub last_error: Option<String>,
    /// When the next request is planned.
    pub next_attempt: Option<SystemTime>,
    /// Failed requests in a row.
    pub failures: u32,
    /// Whether the account has had its first try (for readiness).
    pub attempted: bool,
    /// Cluster mode: the member that refreshes the account now, if known.
    pub leader: Option<String>,
    /// Cluster mode: the member that fetched the token served.
    pub refreshed_by: Option<String>,
    /// Cluster mode: cut off from the cluster (refreshing alone, or waiting for it).
    pub degraded: bool,
}

impl Default for TokenState {
    fn default() -> Self {
        TokenState {
            status: Status::Pending,
            token: None,
            last_refresh: None,
            last_error: None,
            next_attempt: None,
            failures: 0,
            attempted: false,
            leader: None,
            refreshed_by: None,
            degraded: false,
        }
    }
}

impl TokenState {
    /// The token, if one is held and still valid at `now`.
    pub fn valid_token(&self, now: SystemTime) -> Option<&Arc<Token>> {
        self.token.as_ref().filter(|t| t.is_valid_at(now))
    }
}
