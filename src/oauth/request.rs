//! Building a token request from an account (grant x client_auth x params_in x
//! basic_encoding, a pure function) and sending it ([`HttpEndpoint`]), to the configured
//! token endpoint or to the one discovered (`discovery`), with a client assertion
//! (`assertion`) or a client certificate (`transport`) where the account says so.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use url::form_urlencoded;
use zeroize::Zeroizing;

use super::dpop::DpopKey;
pub use super::redact::redacted_url;
use super::response::{self, Token};
use super::{assertion, discovery, error_chain, Endpoint, Error, Transports};
use crate::clock::Clock;
use crate::config::{Account, BasicEncoding, ClientAuth, Grant, ParamsIn, Secret, SecretSpec};

/// The largest token response read; a larger one is an error, not an allocation.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// The secrets a request needs, read just before it is built.
#[derive(Debug, Default, Clone)]
pub struct Credentials {
    pub client_secret: Option<Secret>,
    pub password: Option<Secret>,
    pub refresh_token: Option<Secret>,
    /// `private_key_jwt`: the key (PEM), read for every request (key rotation needs no
    /// restart)...
    pub private_key: Option<Secret>,
    /// ...and the assertion signed with it for this request.
    pub client_assertion: Option<Secret>,
}

impl Credentials {
    /// Reads every secret of `account` now.
    pub fn read(account: &Account) -> Result<Self, Error> {
        let read = |what: &'static str, spec: &SecretSpec| {
            spec.read().map_err(|source| Error::Secret { what, source })
        };
        let mut c = Credentials::default();
        if let Some(s) = &account.client_secret {
            c.client_secret = Some(read("client secret", s)?);
        }
        match &account.grant {
            Grant::Password { password, .. } => c.password = Some(read("password", password)?),
            Grant::RefreshToken { refresh_token } => {
                c.refresh_token = Some(read("refresh token", refresh_token)?)
            }
            Grant::ClientCredentials => {}
        }
        if let Some(a) = &account.assertion {
            c.private_key = Some(read("private key", &a.private_key)?);
        }
        Ok(c)
    }
}

/// A token request, ready to send. `Debug` shows no secret.
#[derive(Clone)]
pub struct TokenRequest {
    /// The endpoint, with the form fields in its query when `params_in = "query"`.
    pub url: url::Url,
    pub headers: HeaderMap,
    /// `application/x-www-form-urlencoded`; empty when the fields went into the query.
    /// Zeroed when dropped: it carries the secrets.
    pub body: Zeroizing<String>,
}

impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRequest")
            .field("url", &redacted_url(&self.url))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .finish()
    }
}

/// Builds the request for `account` to `token_url` with `creds` (RFC 6749 §4.3, §4.4, §6,
/// §2.3.1; RFC 7523 §2.2; RFC 8705 §2.1).
pub fn build(account: &Account, token_url: &url::Url, creds: &Credentials) -> TokenRequest {
    let mut form: Vec<(&str, &str)> = vec![("grant_type", account.grant.as_str())];
    match &account.grant {
        Grant::ClientCredentials => {}
        Grant::Password { username, .. } => {
            form.push(("username", username));
            form.push((
                "password",
                creds.password.as_ref().map_or("", |p| p.expose()),
            ));
        }
        Grant::RefreshToken { .. } => {
            form.push((
                "refresh_token",
                creds.refresh_token.as_ref().map_or("", |p| p.expose()),
            ));
        }
    }
    if let Some(scope) = &account.scope {
        form.push(("scope", scope));
    }
    for (k, v) in &account.options.extra_params {
        form.push((k, v));
    }

    let mut headers = HeaderMap::new();
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    authenticate(account, creds, &mut form, &mut headers);
    for (k, v) in &account.options.extra_headers {
        // Names were checked when the config was validated; a value that is not a valid
        // header value is dropped rather than sent mangled.
        if let (Ok(name), Ok(mut value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v.expose()),
        ) {
            value.set_sensitive(true);
            headers.insert(name, value);
        }
    }

    let encoded = Zeroizing::new(
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&form)
            .finish(),
    );
    let mut url = token_url.clone();
    let body = match account.params_in {
        ParamsIn::Body => {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            );
            encoded
        }
        ParamsIn::Query => {
            let query = Zeroizing::new(match url.query() {
                Some(q) if !q.is_empty() => format!("{q}&{}", *encoded),
                _ => encoded.to_string(),
            });
            url.set_query(Some(&query));
            Zeroizing::new(String::new())
        }
    };
    TokenRequest { url, headers, body }
}

/// The client's authentication (RFC 6749 §2.3.1, RFC 7523 §2.2, RFC 8705 §2.1): a Basic
/// header, or fields of the form.
fn authenticate<'a>(
    account: &'a Account,
    creds: &'a Credentials,
    form: &mut Vec<(&'a str, &'a str)>,
    headers: &mut HeaderMap,
) {
    let secret = creds.client_secret.as_ref().map_or("", |s| s.expose());
    match account.client_auth {
        ClientAuth::Basic => {
            let pair = Zeroizing::new(match account.basic_encoding {
                BasicEncoding::Raw => format!("{}:{}", account.client_id, secret),
                BasicEncoding::Form => format!(
                    "{}:{}",
                    form_encode(&account.client_id),
                    form_encode(secret)
                ),
            });
            let value = Zeroizing::new(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
            ));
            let mut value = HeaderValue::from_str(&value).expect("base64 is a valid header value");
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        ClientAuth::Post => {
            form.push(("client_id", &account.client_id));
            form.push(("client_secret", secret));
        }
        // RFC 8705 §2.1: the certificate authenticates; client_id says whose it is.
        ClientAuth::None | ClientAuth::TlsClientAuth => {
            form.push(("client_id", &account.client_id))
        }
        // RFC 7523 §2.2. client_id is optional beside an assertion (RFC 7523 §3.1), and
        // some servers (Azure AD) want it.
        ClientAuth::PrivateKeyJwt => {
            form.push(("client_id", &account.client_id));
            form.push(("client_assertion_type", assertion::ASSERTION_TYPE));
            form.push((
                "client_assertion",
                creds.client_assertion.as_ref().map_or("", |a| a.expose()),
            ));
        }
    }
}

fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Fetches tokens for one account over HTTP(S).
pub struct HttpEndpoint {
    account: Arc<Account>,
    transports: Arc<Transports>,
    clock: Clock,
    /// One lock for all of it (every account holds an endpoint, issue #11); never held
    /// across an await or while another lock is taken.
    current: std::sync::Mutex<Current>,
}

/// What an endpoint's requests use that changes between them.
struct Current {
    /// Shared with the accounts that connect the same way ([`Transports`]); replaced
    /// when the account's client certificate or key file changes.
    client: Arc<reqwest::Client>,
    /// The refresh_token grant's current refresh token, as the refresh engine set it;
    /// the configured one when none.
    refresh_token: Option<Secret>,
    /// `issuer` / `fhir_base`: the token endpoint as last discovered (or known from the
    /// state directory), and whether it is to be discovered again before the next request.
    discovered: Discovered,
    /// The `Date` of the last answer and when it came (cluster mode compares clocks).
    date: Option<(SystemTime, SystemTime)>,
    /// `token_binding = "dpop"`: the key every request proves itself with, as the
    /// refresh engine set it.
    dpop: Option<Arc<DpopKey>>,
}

#[derive(Default)]
struct Discovered {
    /// Boxed: most accounts have a fixed `token_url` (issue #11: 80 bytes each).
    url: Option<Box<url::Url>>,
    /// The [`Transports::discovery_epoch`] of the last discovery; `None`: discover first.
    epoch: Option<u64>,
}

impl HttpEndpoint {
    /// An endpoint for `account` whose HTTP client comes from `transports`: shared with
    /// every account that connects the same way. Fails if the client cannot be built
    /// (a bad `ca_file`, client certificate or key).
    pub fn new(
        account: Arc<Account>,
        clock: Clock,
        transports: &Arc<Transports>,
    ) -> Result<Self, Error> {
        let client = match transports.client(&account) {
            Ok(c) => c,
            // A certificate or key not there (yet): the account starts, and each request
            // fails with the read error until it is there. One that is there but does not
            // load (a bad ca_file, a key that is not the certificate's) stops it here.
            Err(Error::Secret { .. }) => transports.client_without_identity(&account)?,
            Err(e) => return Err(e),
        };
        Ok(HttpEndpoint {
            account,
            transports: transports.clone(),
            clock,
            current: std::sync::Mutex::new(Current {
                client,
                refresh_token: None,
                discovered: Discovered::default(),
                date: None,
                dpop: None,
            }),
        })
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current
            .lock()
            .expect("never poisoned: no panics under the lock")
    }

    /// The client for this request: with a client certificate, the one for the
    /// certificate and key in their files now (a renewed certificate needs no restart).
    fn client(&self) -> Result<Arc<reqwest::Client>, Error> {
        if self.account.client_cert.is_none() {
            return Ok(self.current().client.clone());
        }
        // The files are read and the transports' lock taken with this endpoint's lock
        // not held (a slow file system holds up nothing else of the account's).
        let now = self.transports.client(&self.account)?;
        let before = std::mem::replace(&mut self.current().client, now.clone());
        if !Arc::ptr_eq(&now, &before) {
            tracing::info!(account = %self.account.name, "using the new client certificate");
            drop(before);
            self.transports.prune();
        }
        Ok(now)
    }

    /// Where to send the request: the configured token_url, or the discovered one
    /// (discovered again after a start, a reload or a failed request). While discovery
    /// fails, an endpoint known from before is used; without one, the failure is the
    /// attempt's (transient).
    async fn token_url(&self, client: &reqwest::Client) -> Result<url::Url, Error> {
        if let Some(u) = self.account.token_url.fixed() {
            return Ok(u.clone());
        }
        let epoch = self.transports.discovery_epoch();
        let known = {
            let d = &self.current().discovered;
            if d.epoch == Some(epoch) {
                if let Some(u) = &d.url {
                    return Ok((**u).clone());
                }
            }
            d.url.as_deref().cloned()
        };
        let found = discovery::discover(
            client,
            &self.account.token_url,
            self.account.allow_http,
            self.account.options.timeout,
            self.account.client_cert.is_some(),
        )
        .await;
        let mut current = self.current();
        let d = &mut current.discovered;
        match found {
            Ok(url) => {
                if d.url.as_deref() != Some(&url) {
                    tracing::info!(account = %self.account.name, token_endpoint = %redacted_url(&url), "discovered the token endpoint");
                }
                d.url = Some(Box::new(url.clone()));
                d.epoch = Some(epoch);
                Ok(url)
            }
            Err(e) => match known {
                Some(url) => {
                    tracing::warn!(account = %self.account.name, "{}; using the token endpoint found before, {}", error_chain(&e), redacted_url(&url));
                    Ok(url)
                }
                None => Err(e),
            },
        }
    }

    async fn send(
        &self,
        client: &reqwest::Client,
        req: TokenRequest,
        token_url: &url::Url,
    ) -> Result<Token, Error> {
        let url = redacted_url(&req.url);
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                Error::Timeout {
                    url: url.clone(),
                    after: self.account.request_timeout(),
                }
            } else {
                let why = error_chain(&e.without_url());
                let hint = super::transport::tls_hint(self.account.client_cert.is_some(), &why);
                Error::Transport {
                    url: url.clone(),
                    reason: format!("{why}{hint}"),
                }
            }
        };
        let mut resp = client
            .post(req.url)
            .timeout(self.account.request_timeout())
            .headers(req.headers)
            // reqwest takes its own copy, which it does not zero: ours is.
            .body(req.body.as_bytes().to_vec())
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        if self.account.dpop.is_some() {
            // RFC 9449 §8: the newest nonce, from an error or a success alike.
            if let Some(n) = headers.get("dpop-nonce").and_then(|n| n.to_str().ok()) {
                self.transports.set_dpop_nonce(token_url, n);
            }
        }
        if let Some(date) = headers
            .get(reqwest::header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| httpdate::parse_http_date(d).ok())
        {
            self.current().date = Some((date, self.clock.now()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(Error::Malformed {
                    status,
                    reason: format!("response larger than {} KiB", MAX_RESPONSE_BYTES / 1024),
                    rotated: None,
                });
            }
            body.extend_from_slice(&chunk);
        }
        let now = self.clock.now();
        if (200..300).contains(&status) {
            response::parse_success(
                status,
                &body,
                now,
                self.account.options.schedule.default_lifetime,
            )
        } else {
            Err(response::parse_error(status, &headers, &body, now))
        }
    }
}

impl HttpEndpoint {
    /// One request: a fresh client assertion (its `jti` is new each time) and, for a
    /// DPoP account, a fresh proof with the provider's newest nonce.
    async fn try_once(
        &self,
        client: &reqwest::Client,
        token_url: &url::Url,
        creds: &mut Credentials,
        dpop: Option<&DpopKey>,
    ) -> Result<Token, Error> {
        let now = self.clock.now();
        if let Some(pem) = &creds.private_key {
            let signed = assertion::client_assertion(&self.account, pem, token_url, now).map_err(
                |source| Error::Key {
                    what: "private key",
                    from: self
                        .account
                        .assertion
                        .as_ref()
                        .map_or_else(String::new, |a| a.private_key.describe()),
                    source,
                },
            )?;
            creds.client_assertion = Some(signed);
        }
        let mut req = build(&self.account, token_url, creds);
        if let Some(key) = dpop {
            let nonce = self.transports.dpop_nonce(token_url);
            let proof = key
                .proof("POST", token_url, None, nonce.as_deref(), now)
                .map_err(|source| Error::Key {
                    what: "DPoP key",
                    from: "dpop_key".into(),
                    source,
                })?;
            let mut value =
                HeaderValue::from_str(proof.expose()).expect("a JWS is a valid header value");
            value.set_sensitive(true);
            req.headers.insert(HeaderName::from_static("dpop"), value);
        }
        self.send(client, req, token_url).await
    }
}

impl Endpoint for HttpEndpoint {
    async fn fetch(&self) -> Result<Token, Error> {
        let mut creds = Credentials::read(&self.account)?;
        let rotated = self.current().refresh_token.clone();
        if rotated.is_some() {
            creds.refresh_token = rotated;
        }
        let client = self.client()?;
        let token_url = self.token_url(&client).await?;
        let dpop = self.current().dpop.clone();
        if self.account.dpop.is_some() && dpop.is_none() {
            return Err(Error::Key {
                what: "DPoP key",
                from: "the refresh engine".into(),
                source: crate::config::keys::KeyError::Unsupported("no key yet".into()),
            });
        }
        // RFC 9449 §8: a server that wants a nonce answers `use_dpop_nonce` with one;
        // the request is made again at once with it, once (not a failure).
        let mut result = self
            .try_once(&client, &token_url, &mut creds, dpop.as_deref())
            .await;
        if let (Some(_), Err(e)) = (&dpop, &result) {
            if e.oauth_code() == Some("use_dpop_nonce") {
                tracing::debug!(account = %self.account.name, "the token endpoint asked for a DPoP nonce; asking again with it");
                result = self
                    .try_once(&client, &token_url, &mut creds, dpop.as_deref())
                    .await;
            }
        }
        if let (Some(_), Ok(token)) = (&dpop, &result) {
            if !token.token_type.eq_ignore_ascii_case("DPoP") {
                return Err(Error::Malformed {
                    status: 200,
                    reason: format!(
                        "token_type is {:?}, not \"DPoP\": the server ignored the DPoP proof and issued an unbound token (turn DPoP on for this client at the provider, or set token_binding = \"bearer\")",
                        token.token_type
                    ),
                    rotated: token.refresh_token.clone(),
                });
            }
        }
        if let Err(e) = &result {
            // The endpoint may have moved: discover again before the next request. Not
            // for an answer of the server's own (a refusal, a rate limit, an OAuth error).
            if e.oauth_code().is_none() && !matches!(e.status(), Some(400 | 401 | 403 | 429)) {
                self.current().discovered.epoch = None;
            }
        }
        result
    }

    fn use_refresh_token(&self, rt: Option<Secret>) {
        self.current().refresh_token = rt;
    }

    fn use_known_token_url(&self, url: url::Url) {
        let mut current = self.current();
        let d = &mut current.discovered;
        // Held to today's allow_http, whatever it was when the endpoint was found.
        if d.url.is_none()
            && self.account.token_url.fixed().is_none()
            && discovery::allowed(&url, self.account.allow_http)
        {
            d.url = Some(Box::new(url));
        }
    }

    fn provider_date(&self) -> Option<(SystemTime, SystemTime)> {
        self.current().date
    }

    fn use_dpop_key(&self, key: Option<Arc<DpopKey>>) {
        self.current().dpop = key;
    }

    fn discovered_token_url(&self) -> Option<url::Url> {
        if self.account.token_url.fixed().is_some() {
            return None;
        }
        self.current().discovered.url.as_deref().cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;
    use std::path::Path;

    fn account(extra: &str) -> Account {
        let text = format!(
            "[daemon]\nstate_dir = \"/s\"\n[[account]]\nname = \"a\"\ntoken_url = \"https://idp.example/t?tenant=x\"\nclient_id = \"my id\"\n{extra}\n[[account.output]]\npath = \"/x\"\n"
        );
        parse_str(&text, Path::new("/c.toml"))
            .unwrap()
            .accounts
            .remove(0)
    }

    fn creds() -> Credentials {
        Credentials {
            client_secret: Some(Secret::new("s&cret:1")),
            password: Some(Secret::new("p@ss word")),
            refresh_token: Some(Secret::new("rt-1")),
            ..Default::default()
        }
    }

    fn form(body: &str) -> Vec<(String, String)> {
        form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect()
    }

    fn basic(req: &TokenRequest) -> Option<String> {
        let v = req.headers.get(AUTHORIZATION)?.to_str().unwrap();
        let b = base64::engine::general_purpose::STANDARD
            .decode(v.strip_prefix("Basic ").unwrap())
            .unwrap();
        Some(String::from_utf8(b).unwrap())
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn every_grant_with_every_client_auth() {
        let grants = [
            ("", vec![("grant_type", "client_credentials")]),
            (
                "grant_type = \"password\"\nusername = \"alice\"\npassword = { env = \"X\" }",
                vec![
                    ("grant_type", "password"),
                    ("username", "alice"),
                    ("password", "p@ss word"),
                ],
            ),
            (
                "grant_type = \"refresh_token\"\nrefresh_token = { env = \"X\" }",
                vec![("grant_type", "refresh_token"), ("refresh_token", "rt-1")],
            ),
        ];
        for (grant, fields) in grants {
            for auth in ["basic", "post", "none"] {
                let secret = if auth == "none" {
                    ""
                } else {
                    "client_secret = { env = \"S\" }"
                };
                let a = account(&format!(
                    "{grant}\nclient_auth = \"{auth}\"\n{secret}\nscope = \"full read\""
                ));
                let req = build(&a, a.token_url.fixed().unwrap(), &creds());
                let mut want = pairs(&fields);
                want.push(("scope".into(), "full read".into()));
                match auth {
                    "basic" => assert_eq!(basic(&req).as_deref(), Some("my id:s&cret:1")),
                    "post" => {
                        assert_eq!(basic(&req), None);
                        want.push(("client_id".into(), "my id".into()));
                        want.push(("client_secret".into(), "s&cret:1".into()));
                    }
                    _ => {
                        assert_eq!(basic(&req), None);
                        want.push(("client_id".into(), "my id".into()));
                    }
                }
                assert_eq!(form(&req.body), want, "{grant} / {auth}");
                assert_eq!(req.headers[ACCEPT], "application/json");
                assert_eq!(
                    req.headers[CONTENT_TYPE],
                    "application/x-www-form-urlencoded"
                );
                assert_eq!(req.url.as_str(), "https://idp.example/t?tenant=x");
            }
        }
    }

    #[test]
    fn basic_encoding_form_encodes_first() {
        let a = account("client_secret = { env = \"S\" }\nbasic_encoding = \"form\"");
        assert_eq!(
            basic(&build(&a, a.token_url.fixed().unwrap(), &creds())).as_deref(),
            Some("my+id:s%26cret%3A1")
        );
    }

    #[test]
    fn params_in_query_moves_fields_to_the_url() {
        let a = account("client_secret = { env = \"S\" }\nclient_auth = \"post\"\nparams_in = \"query\"\nextra_params = { audience = \"api\" }");
        let req = build(&a, a.token_url.fixed().unwrap(), &creds());
        assert!(req.body.is_empty());
        assert!(req.headers.get(CONTENT_TYPE).is_none());
        let q: Vec<_> = req.url.query_pairs().into_owned().collect();
        assert_eq!(
            q,
            pairs(&[
                ("tenant", "x"),
                ("grant_type", "client_credentials"),
                ("audience", "api"),
                ("client_id", "my id"),
                ("client_secret", "s&cret:1"),
            ])
        );
        let dbg = format!("{req:?}");
        assert!(
            !dbg.contains("s&cret") && !dbg.contains("s%26cret"),
            "{dbg}"
        );
        assert_eq!(redacted_url(&req.url), "https://idp.example/t");
    }

    #[test]
    fn an_unreadable_secret_names_its_file_and_the_os_error_once() {
        let a = account("client_secret = { file = \"/nonexistent/tokend-secret\" }");
        let e = Credentials::read(&a).unwrap_err();
        assert_eq!(
            error_chain(&e),
            "failed to read the client secret: failed to read secret file \
             /nonexistent/tokend-secret: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn extra_headers_are_sent() {
        let a =
            account("client_secret = { env = \"S\" }\nextra_headers = { \"X-Api-Key\" = \"k\" }");
        assert_eq!(
            build(&a, a.token_url.fixed().unwrap(), &creds()).headers["x-api-key"],
            "k"
        );
    }

    #[tokio::test]
    async fn an_account_whose_client_key_is_not_there_yet_starts_and_fails_locally() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, include_str!("../../tests/keys/p256-cert.pem")).unwrap();
        let key = dir.path().join("k.pem");
        let a = Arc::new(account(&format!(
            "client_cert = {{ file = \"{}\" }}\nclient_key = {{ file = \"{}\" }}",
            cert.display(),
            key.display()
        )));
        let transports = Arc::new(Transports::default());
        let endpoint = HttpEndpoint::new(a.clone(), Clock::System, &transports).unwrap();
        let e = endpoint.fetch().await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::Secret {
                    what: "client key",
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            crate::account::schedule::classify(&e),
            crate::account::schedule::ErrorClass::Local
        );
        // A key that is there but not the certificate's stops the account from starting
        // (a reload with it is refused).
        std::fs::write(&key, include_str!("../../tests/keys/rsa-pkcs8.pem")).unwrap();
        assert!(HttpEndpoint::new(a, Clock::System, &transports).is_err());
    }

    #[test]
    fn a_renewed_client_certificate_is_used_by_the_next_request_and_the_old_client_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, include_str!("../../tests/keys/p256-cert.pem")).unwrap();
        std::fs::write(&key, include_str!("../../tests/keys/p256-sec1.pem")).unwrap();
        let a = Arc::new(account(&format!(
            "client_cert = {{ file = \"{}\" }}\nclient_key = {{ file = \"{}\" }}",
            cert.display(),
            key.display()
        )));
        let transports = Arc::new(Transports::default());
        let endpoint = HttpEndpoint::new(a, Clock::System, &transports).unwrap();
        let first = endpoint.client().unwrap();
        assert!(
            Arc::ptr_eq(&first, &endpoint.client().unwrap()),
            "unchanged files"
        );
        assert_eq!(transports.built(), 1);
        let old = Arc::downgrade(&first);
        drop(first);
        // Renewed: another certificate and key in the same files.
        std::fs::write(&cert, include_str!("../../tests/keys/rsa-cert.pem")).unwrap();
        std::fs::write(&key, include_str!("../../tests/keys/rsa-pkcs8.pem")).unwrap();
        let renewed = endpoint.client().unwrap();
        assert_eq!(transports.built(), 2);
        assert!(Arc::ptr_eq(&renewed, &endpoint.client().unwrap()));
        assert!(
            old.upgrade().is_none(),
            "the old client is neither the endpoint's nor the transports' any more"
        );
    }
}
