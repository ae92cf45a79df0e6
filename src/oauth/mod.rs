//! Talking to a token endpoint: building the request (`request`), reading the answer
//! (`response`), and the [`Endpoint`] seam the account task fetches through, so that
//! scheduling tests can script answers without sockets.

pub mod assertion;
pub mod caps;
pub mod discovery;
pub mod dpop;
pub mod redact;
pub mod request;
pub mod response;
pub mod transport;

use std::future::Future;
use std::time::{Duration, SystemTime};

pub use response::Token;

use crate::config::keys::KeyError;
use crate::config::SecretError;

/// Why a token request failed. Messages never hold a secret or a token: only the
/// endpoint's URL without its query, the HTTP status, and RFC 6749 §5.2 `error` and
/// `error_description`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cause names the source (file, variable, credential) and the OS error; show
    /// it with [`error_chain`].
    #[error("failed to read the {what}")]
    Secret {
        what: &'static str,
        #[source]
        source: SecretError,
    },
    /// A private key that was read but cannot sign (the cause says why, never the key).
    #[error("failed to use the {what} from {from}")]
    Key {
        what: &'static str,
        from: String,
        #[source]
        source: KeyError,
    },
    /// No discovery document named a usable token endpoint, and none is known.
    #[error("failed to discover the token endpoint ({from}): {reason}")]
    Discovery { from: &'static str, reason: String },
    #[error("failed to reach {url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("token request to {url} timed out after {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("token endpoint answered HTTP {status}: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    OAuth {
        status: u16,
        error: String,
        description: Option<String>,
        retry_after: Option<SystemTime>,
    },
    #[error("token endpoint answered HTTP {status}")]
    Http {
        status: u16,
        retry_after: Option<SystemTime>,
    },
    /// A 2xx answer that is no usable token. `rotated` is the refresh token it carried,
    /// if it carried one: the provider may have rotated the chain with this answer, so
    /// the engine saves it whatever else is wrong (SPEC §6). Never displayed.
    #[error("malformed token response (HTTP {status}): {reason}")]
    Malformed {
        status: u16,
        reason: String,
        rotated: Option<crate::config::Secret>,
    },
    #[error("failed to set up the HTTP client: {0}")]
    Client(String),
}

impl Error {
    /// When the provider asked us to come back (429 `Retry-After`, Okta's
    /// `X-Rate-Limit-Reset`), if it did.
    pub fn retry_after(&self) -> Option<SystemTime> {
        match self {
            Error::OAuth { retry_after, .. } | Error::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Error::OAuth { status, .. }
            | Error::Http { status, .. }
            | Error::Malformed { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The refresh token a malformed 2xx answer carried (see [`Error::Malformed`]).
    pub fn rotated_refresh_token(&self) -> Option<&crate::config::Secret> {
        match self {
            Error::Malformed { rotated, .. } => rotated.as_ref(),
            _ => None,
        }
    }

    /// The RFC 6749 §5.2 error code, if the provider sent one.
    pub fn oauth_code(&self) -> Option<&str> {
        match self {
            Error::OAuth { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Something that hands out tokens for one account. The daemon uses [`HttpEndpoint`];
/// tests script their own.
pub trait Endpoint: Send + Sync + 'static {
    fn fetch(&self) -> impl Future<Output = Result<Token, Error>> + Send;

    /// The refresh token the next [`Endpoint::fetch`] presents (refresh_token grant):
    /// the refresh engine owns the chain and sets it before every request; `None`
    /// means the configured one.
    fn use_refresh_token(&self, _rt: Option<crate::config::Secret>) {}

    /// A token endpoint discovered before (kept in the state directory by the refresh
    /// engine): used while discovery fails. The engine sets it before every request.
    fn use_known_token_url(&self, _url: url::Url) {}

    /// The token endpoint discovered last, for the engine to keep; `None` when the
    /// account configures its `token_url` or nothing was discovered yet.
    fn discovered_token_url(&self) -> Option<url::Url> {
        None
    }

    /// The DPoP key the next [`Endpoint::fetch`] proves its requests with
    /// (`token_binding = "dpop"`): the refresh engine keeps it and sets it.
    fn use_dpop_key(&self, _key: Option<std::sync::Arc<dpop::DpopKey>>) {}

    /// The `Date` header of the provider's last answer, and when it was received (this
    /// host's clock): cluster mode compares the clocks (issue #20).
    fn provider_date(&self) -> Option<(SystemTime, SystemTime)> {
        None
    }
}

pub use request::HttpEndpoint;
pub use transport::Transports;

/// An error and its causes, "a: b: c", each cause once (some errors repeat their
/// source's message in their own). What logs, status and `once` show.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}
