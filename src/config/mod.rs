//! Configuration: the TOML file, parsed in two stages (`raw` serde mirror, then `validate`
//! into the typed [`Config`] below), then checked against the system (`files`). Every
//! error carries file, line, column and key, and all of them are reported at once.
//!
//! Where the I/O is: [`load`] reads the file; `validate` does none (it asks a `Host` for
//! the ids of the users and groups a config names and for the host's name, the default
//! cluster `member`); `files` holds everything that touches the system: those lookups
//! (`files::System`, which [`parse_str`] and [`load`] use), the config file's mode, the
//! `state_dir`'s owner and mode, the key and certificate files, and the outputs'
//! resolved paths. Secrets are read later, through [`SecretSpec::read`], when a request
//! needs them; `keys` parses keys and certificates from what was read.
//!
//! Nothing here imports from the layers above it: the cluster key's hex
//! ([`parse_hex_key`]) and the plain-http rule ([`is_loopback`]) live here for them.

mod files;
pub mod keys;
mod raw;
mod secret;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use keys::{AssertionAlg, DpopAlg};
pub use secret::{Secret, SecretError, SecretReads, SecretSpec};
pub use validate::{is_loopback, parse_hex_key, ClusterKeyError, DEFAULT_CREDENTIAL_USERNAME};

/// Where the config is looked for when neither `-c` nor `TOKEND_CONFIG` is given.
pub const DEFAULT_PATH: &str = "/etc/tokend/config.toml";
/// The socket `get`, `status` and `refresh` use when the config names none.
pub const DEFAULT_SOCKET: &str = "/run/tokend/tokend.sock";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this was read from; relative paths inside it are relative to its directory.
    pub path: PathBuf,
    pub daemon: DaemonConfig,
    pub cluster: Option<ClusterConfig>,
    pub accounts: Vec<Account>,
}

/// `[cluster]` (SPEC §8): members that share an etcd cluster and a `prefix` share their
/// accounts, one member refreshing each.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// Where the members meet: etcd (`endpoints` and the TLS and auth below) or the
    /// Kubernetes API (`namespace`, `kubeconfig`).
    pub backend: ClusterBackend,
    pub endpoints: Vec<url::Url>,
    pub prefix: String,
    pub member: String,
    pub lease_ttl: Duration,
    /// 64 hex digits: the AEAD key of the shared records.
    pub key: SecretSpec,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<SecretSpec>,
    pub username: Option<String>,
    pub password: Option<SecretSpec>,
    pub on_cluster_loss: OnClusterLoss,
    /// Kubernetes: the namespace of the Leases and Secrets (none: the service account's).
    pub namespace: Option<String>,
    /// Kubernetes: a kubeconfig (none: the in-cluster configuration).
    pub kubeconfig: Option<PathBuf>,
}

/// `cluster.backend` (SPEC §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterBackend {
    Etcd,
    Kubernetes,
}

/// What a member does when a token is due and etcd has been unreachable for `lease_ttl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnClusterLoss {
    /// Refresh on its own (except refresh_token accounts: a second refresher would fork
    /// the chain).
    Refresh,
    /// Never refresh without etcd.
    Wait,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    pub socket: Option<PathBuf>,
    pub socket_mode: u32,
    pub socket_group: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub log_format: LogFormat,
    pub log_level: String,
    pub max_concurrent_refreshes: usize,
    pub startup_timeout: Duration,
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: None,
            socket_mode: 0o660,
            socket_group: None,
            state_dir: None,
            log_format: LogFormat::Auto,
            log_level: "info".into(),
            max_concurrent_refreshes: 16,
            startup_timeout: Duration::from_secs(30),
            metrics_listen: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Auto,
    Journald,
    Text,
    Json,
}

/// `Debug` shows no secret: secret values are [`Secret`]s, and the `token_url` is shown
/// without a user or password.
#[derive(Clone, PartialEq)]
pub struct Account {
    pub name: String,
    /// Where the token endpoint is: configured, or discovered from an issuer or a FHIR base.
    /// Shared by the accounts that name the same one (issue #11: 10,000 accounts of a few
    /// providers keep a few URLs).
    pub token_url: Arc<TokenUrl>,
    /// Plain http:// to a host other than loopback is allowed (also for a discovered
    /// token endpoint).
    pub allow_http: bool,
    pub grant: Grant,
    pub client_id: String,
    pub client_secret: Option<SecretSpec>,
    pub client_auth: ClientAuth,
    /// `client_auth = "private_key_jwt"`: how the client assertion is made.
    pub assertion: Option<Box<AssertionConfig>>,
    /// A client certificate on the account's HTTP client (`client_auth =
    /// "tls_client_auth"` needs one).
    pub client_cert: Option<Box<ClientCert>>,
    pub basic_encoding: BasicEncoding,
    pub params_in: ParamsIn,
    pub scope: Option<String>,
    /// The settings most accounts leave at their defaults or take from `[defaults]`.
    pub options: Arc<Options>,
    pub on_expiry: OnExpiry,
    pub outputs: Vec<Output>,
    /// The resource URLs the token is for (`urls`): the credential helpers of git and
    /// container tools pick the account whose URL is the longest prefix of theirs.
    pub urls: Vec<url::Url>,
    /// Shared with the cluster (when there is a `[cluster]`); `cluster = false` opts out.
    pub cluster: bool,
    /// `token_binding = "dpop"` (SPEC §9): the token is bound to a key tokend keeps.
    pub dpop: Option<Box<DpopConfig>>,
}

/// `token_binding = "dpop"` (RFC 9449): the algorithm and where the key is. `Debug`
/// shows where the key comes from, never the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DpopConfig {
    pub alg: DpopAlg,
    /// `dpop_key`; none: a key tokend makes once and keeps in `state_dir`
    /// (`NAME.dpop.pem`, mode 0600).
    pub key: Option<SecretSpec>,
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut url = self.token_url.configured().clone();
        if url.password().is_some() || !url.username().is_empty() {
            let _ = url.set_password(Some("redacted"));
            let _ = url.set_username("redacted");
        }
        f.debug_struct("Account")
            .field("name", &self.name)
            .field(self.token_url.key(), &url.as_str())
            .field("allow_http", &self.allow_http)
            .field("grant", &self.grant)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("client_auth", &self.client_auth)
            .field("assertion", &self.assertion)
            .field("client_cert", &self.client_cert)
            .field("basic_encoding", &self.basic_encoding)
            .field("params_in", &self.params_in)
            .field("scope", &self.scope)
            .field("extra_params", &self.options.extra_params)
            .field("extra_headers", &self.options.extra_headers)
            .field("ca_file", &self.options.ca_file)
            .field("proxy", &self.options.proxy)
            .field("timeout", &self.options.timeout)
            .field("refresh_token_timeout", &self.options.refresh_token_timeout)
            .field("schedule", &self.options.schedule)
            .field("on_expiry", &self.on_expiry)
            .field("on_refresh", &self.options.on_refresh)
            .field("on_refresh_signal", &self.options.on_refresh_signal)
            .field("hook_timeout", &self.options.hook_timeout)
            .field("outputs", &self.outputs)
            .field("access", &self.options.access)
            .field(
                "urls",
                &self.urls.iter().map(url::Url::as_str).collect::<Vec<_>>(),
            )
            .field("credential_username", &self.options.credential_username)
            .field("cluster", &self.cluster)
            .field("dpop", &self.dpop)
            .finish()
    }
}

/// An account's settings that most accounts leave at their defaults or take from
/// `[defaults]`: one copy shared by the accounts that have the same (issue #11: 280
/// bytes an account otherwise, for thousands of accounts that differ in name, client
/// and scope). `Debug` shows no header value and no proxy password (they are
/// [`Secret`]s).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Options {
    pub extra_params: BTreeMap<String, String>,
    /// Header values may be API keys.
    pub extra_headers: BTreeMap<String, Secret>,
    pub ca_file: Option<PathBuf>,
    /// A proxy URL may carry a password.
    pub proxy: Option<Secret>,
    pub timeout: Duration,
    /// The refresh_token grant's request timeout (SPEC §6: its answer holds the only
    /// copy of the next refresh token, so it waits longer than `timeout`).
    pub refresh_token_timeout: Duration,
    pub schedule: SchedulePolicy,
    pub on_refresh: Option<Vec<String>>,
    pub on_refresh_signal: Option<SignalHook>,
    pub hook_timeout: Duration,
    pub access: Access,
    /// The user name git and container tools send beside the token (`oauth2` unless set).
    pub credential_username: String,
}

impl Account {
    /// How long a token request may take: `refresh_token_timeout` for the refresh_token
    /// grant, `timeout` for the others.
    pub fn request_timeout(&self) -> Duration {
        match self.grant {
            Grant::RefreshToken { .. } => self.options.refresh_token_timeout,
            _ => self.options.timeout,
        }
    }

    /// Whether a request of this account may rotate a refresh token (the
    /// refresh_token grant): its answer is the only copy of the next one.
    pub fn rotates(&self) -> bool {
        matches!(self.grant, Grant::RefreshToken { .. })
    }

    /// Every secret this account reads, for `check` and for watching files.
    pub fn secrets(&self) -> Vec<(&'static str, &SecretSpec)> {
        let mut v = Vec::new();
        if let Some(s) = &self.client_secret {
            v.push(("client_secret", s));
        }
        match &self.grant {
            Grant::Password { password, .. } => v.push(("password", password)),
            Grant::RefreshToken { refresh_token } => v.push(("refresh_token", refresh_token)),
            Grant::ClientCredentials => {}
        }
        if let Some(a) = &self.assertion {
            v.push(("private_key", &a.private_key));
        }
        if let Some(c) = &self.client_cert {
            // The certificate is no secret, but it is read like one, and a new one (a
            // renewal) ends a hold like a new secret does.
            v.push(("client_cert", &c.cert));
            v.push(("client_key", &c.key));
        }
        if let Some(k) = self.dpop.as_ref().and_then(|d| d.key.as_ref()) {
            v.push(("dpop_key", k));
        }
        v
    }
}

/// Where an account's token endpoint is (SPEC §1): written in the config, or read from
/// a discovery document at start and reload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenUrl {
    /// `token_url`.
    Fixed(url::Url),
    /// `issuer`: `{issuer}/.well-known/openid-configuration`, or RFC 8414's
    /// `/.well-known/oauth-authorization-server`.
    Issuer(url::Url),
    /// `fhir_base`: `{fhir_base}/.well-known/smart-configuration` (SMART App Launch 2.x).
    FhirBase(url::Url),
}

impl TokenUrl {
    /// The URL as configured (the token endpoint itself only for [`TokenUrl::Fixed`]).
    pub fn configured(&self) -> &url::Url {
        match self {
            TokenUrl::Fixed(u) | TokenUrl::Issuer(u) | TokenUrl::FhirBase(u) => u,
        }
    }

    /// The config key it was written as.
    pub fn key(&self) -> &'static str {
        match self {
            TokenUrl::Fixed(_) => "token_url",
            TokenUrl::Issuer(_) => "issuer",
            TokenUrl::FhirBase(_) => "fhir_base",
        }
    }

    /// The configured token endpoint, when there is no discovery to do.
    pub fn fixed(&self) -> Option<&url::Url> {
        match self {
            TokenUrl::Fixed(u) => Some(u),
            _ => None,
        }
    }

    /// What identifies the endpoint in state files and the cluster: the token_url as
    /// it always was, the others with their key in front (a token from an issuer is
    /// not one from a token_url that happens to be the same).
    pub fn identity(&self) -> String {
        match self {
            TokenUrl::Fixed(u) => u.to_string(),
            other => format!("{} {}", other.key(), other.configured()),
        }
    }
}

/// `client_auth = "private_key_jwt"` (RFC 7523 §2.2): the key and the assertion's
/// settings. `Debug` shows where the key comes from, never the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AssertionConfig {
    pub private_key: SecretSpec,
    /// The JWT header's `kid`; none configured: the key's RFC 7638 thumbprint.
    pub key_id: Option<String>,
    /// None: RS384 for an RSA key, ES256 or ES384 by an EC key's curve.
    pub alg: Option<AssertionAlg>,
    /// The `aud` claim; none: the token endpoint's URL.
    pub audience: Option<String>,
    /// `exp` = `iat` + this (at most 5 minutes).
    pub lifetime: Duration,
}

/// The longest `assertion_lifetime` (SMART Backend Services: exp no more than five
/// minutes in the future).
pub const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(300);

/// A client certificate chain and its key (RFC 8705 mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientCert {
    /// PEM, the leaf first.
    pub cert: SecretSpec,
    pub key: SecretSpec,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Grant {
    ClientCredentials,
    Password {
        username: String,
        password: SecretSpec,
    },
    RefreshToken {
        refresh_token: SecretSpec,
    },
}

impl Grant {
    pub fn as_str(&self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::Password { .. } => "password",
            Grant::RefreshToken { .. } => "refresh_token",
        }
    }
}

/// Client authentication: RFC 6749 §2.3.1 (`basic`, `post`), a public client (`none`),
/// a signed assertion (RFC 7523 §2.2, `private_key_jwt`) or mutual TLS (RFC 8705 §2.1,
/// `tls_client_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientAuth {
    Basic,
    Post,
    None,
    PrivateKeyJwt,
    TlsClientAuth,
}

/// How the client id and secret go into the Basic header: `raw` as curl -u and most
/// providers' samples do, `form` as RFC 6749 §2.3.1 says (form-encoded first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BasicEncoding {
    Raw,
    Form,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamsIn {
    Body,
    Query,
}

/// `Eq` and `Hash` by value: `refresh_ratio` is a finite number (validated), never NaN.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulePolicy {
    pub refresh_ratio: f64,
    pub refresh_every: Option<Duration>,
    pub min_refresh_interval: Duration,
    pub default_lifetime: Duration,
    pub auth_failure_hold: Duration,
}

impl Eq for SchedulePolicy {}

impl std::hash::Hash for SchedulePolicy {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.refresh_ratio.to_bits().hash(state);
        self.refresh_every.hash(state);
        self.min_refresh_interval.hash(state);
        self.default_lifetime.hash(state);
        self.auth_failure_hold.hash(state);
    }
}

impl Default for SchedulePolicy {
    fn default() -> Self {
        SchedulePolicy {
            refresh_ratio: 0.8,
            refresh_every: None,
            min_refresh_interval: Duration::from_secs(30),
            default_lifetime: Duration::from_secs(3600),
            auth_failure_hold: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExpiry {
    Remove,
    Keep,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SignalHook {
    pub pid_file: PathBuf,
    pub signal: nix::sys::signal::Signal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub path: PathBuf,
    pub format: Format,
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Raw,
    Json,
    Env {
        var: String,
    },
    Header,
    /// A directory holding the token in every format (`raw`, `json`, `env`, `header`),
    /// switched all at once by a `..data` symlink swap, as kubelet does for volumes.
    Directory {
        var: String,
    },
}

/// Who may read an account over the socket, besides root and the daemon's own user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Access {
    pub users: Vec<u32>,
    pub groups: Vec<u32>,
}

/// One problem in a config file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// The key, as a path (`account.msk.output[1].mode`); empty for a syntax error.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Everything wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "invalid config ({n} error{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Parses and validates config text; `path` names the file in errors and anchors
/// relative paths. Looks up the user and group names it holds (and the host's name) on
/// this system, but checks no file (see [`load`]).
pub fn parse_str(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    validate::parse(text, path, &files::System).map(|(config, _)| config)
}

/// Reads and validates the config at `path`: what `run`, reload and `once` use.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with(path, files::Checks::Load)
}

/// [`load`], and also what changes with time (a client certificate that expired, or is
/// not for its key): `tokend check`.
pub fn load_checked(path: &Path) -> Result<Config, ConfigErrors> {
    load_with(path, files::Checks::Full)
}

fn load_with(path: &Path, checks: files::Checks) -> Result<Config, ConfigErrors> {
    // Absolute from here on (SPEC §6: reloads and secret files are watched whatever
    // path was typed; relative paths in the file are relative to its directory).
    let absolute = std::path::absolute(path);
    let path = absolute.as_deref().unwrap_or(path);
    let located = |message: String| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            key: String::new(),
            message,
        }])
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| located(format!("failed to read the config file: {e}")))?;
    let (config, located) = validate::parse(&text, path, &files::System)?;
    files::check_files(&config, located, path, checks)?;
    Ok(config)
}

/// The config path from `-c`, else `TOKEND_CONFIG` (clap reads it), else the default.
pub fn resolve_path(arg: Option<&Path>) -> PathBuf {
    arg.map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::normalized;
    use crate::config::validate::tests::MINIMAL;

    #[test]
    fn a_relative_config_path_is_made_absolute() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.toml"), MINIMAL).unwrap();
        let here = std::env::current_dir().unwrap();
        let rel = pathdiff(dir.path(), &here);
        let c = crate::config::load(&rel.join("c.toml")).unwrap();
        assert!(c.path.is_absolute(), "{}", c.path.display());
        assert_eq!(normalized(&c.path), dir.path().join("c.toml"));
    }

    /// `to` relative to `from` (both absolute), with `..` as needed.
    fn pathdiff(to: &Path, from: &Path) -> PathBuf {
        let mut up = PathBuf::new();
        let mut base = from.to_owned();
        while !to.starts_with(&base) {
            up.push("..");
            base.pop();
        }
        up.join(to.strip_prefix(&base).unwrap())
    }
}
