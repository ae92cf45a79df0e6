//! HTTP clients shared by every account with the same transport settings (issue #11).
//!
//! A `reqwest::Client` carries its own TLS configuration (the system's root store, read
//! and parsed when it is built: most of its memory) and its own connection pool. One per
//! account cost about 130 KiB each and a TLS handshake per account; accounts that agree
//! on everything that shapes a connection now share one client, so thousands of accounts
//! on one provider hold one root store and one small pool. What differs per request
//! (headers, body, the request timeout) is set on the request, not on the client.
//!
//! A client certificate (RFC 8705 mutual TLS) is part of a connection: accounts with
//! different certificates or keys never share a client. The key of the cache holds a
//! digest of the certificate and key, never the key itself; the key lives only in the
//! client built with it.
//!
//! Also here, because every endpoint shares it: the discovery epoch, which a reload
//! moves on so that each `issuer` / `fhir_base` account discovers its token endpoint
//! again before its next request.
//!
//! Owned by whoever starts endpoints (the daemon, `once`, `check`) and handed to
//! [`HttpEndpoint::new`](super::HttpEndpoint::new); nothing here is global.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{error_chain, Error};
use crate::config::{Account, Secret};

/// Everything that shapes a connection. Two accounts with equal keys share a client.
#[derive(Clone, PartialEq, Eq, Hash)]
struct TransportKey {
    /// The `ca_file`'s content, not its path: a reload after the file changed builds a
    /// new client for the accounts that restart, and the others keep theirs.
    ca_pem: Option<Vec<u8>>,
    /// May hold the proxy's password; this type has no `Debug`.
    proxy: Option<Secret>,
    connect_timeout: Duration,
    /// SHA-256 of the client certificate chain and key (RFC 8705): another certificate
    /// or key, another client.
    identity: Option<[u8; 32]>,
}

/// The clients built so far, by transport settings.
#[derive(Default)]
pub struct Transports {
    clients: Mutex<HashMap<TransportKey, Arc<reqwest::Client>>>,
    built: AtomicUsize,
    discovery_epoch: AtomicU64,
    /// The newest `DPoP-Nonce` each token endpoint sent (RFC 9449 §8), by its URL
    /// without query: every DPoP account of that provider proves with it.
    dpop_nonces: Mutex<HashMap<String, String>>,
}

/// A client certificate chain and its key, as PEM, read for one client; zeroed when
/// dropped.
struct Identity(zeroize::Zeroizing<String>);

impl Identity {
    fn read(account: &Account) -> Result<Option<Self>, Error> {
        let Some(c) = &account.client_cert else {
            return Ok(None);
        };
        let read = |what: &'static str, spec: &crate::config::SecretSpec| {
            spec.read().map_err(|source| Error::Secret { what, source })
        };
        let cert = read("client certificate", &c.cert)?;
        let key = read("client key", &c.key)?;
        Ok(Some(Identity(zeroize::Zeroizing::new(format!(
            "{}\n{}\n",
            cert.expose(),
            key.expose()
        )))))
    }

    fn digest(&self) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes());
        d.as_ref().try_into().expect("SHA-256 is 32 bytes")
    }
}

impl Transports {
    /// The client for `account`'s transport settings: a shared one if another account
    /// with the same settings has one, else a new one. Reads `ca_file`, and the client
    /// certificate and key (small; their content is part of the key).
    pub fn client(&self, account: &Account) -> Result<Arc<reqwest::Client>, Error> {
        self.client_with(account, true)
    }

    /// [`Transports::client`] without the client certificate: what an account whose
    /// certificate or key cannot be read yet starts with (its requests fail, locally,
    /// until they can be read, like those of an account whose secret is missing).
    pub fn client_without_identity(
        &self,
        account: &Account,
    ) -> Result<Arc<reqwest::Client>, Error> {
        self.client_with(account, false)
    }

    fn client_with(
        &self,
        account: &Account,
        identity: bool,
    ) -> Result<Arc<reqwest::Client>, Error> {
        let ca_pem = match &account.options.ca_file {
            Some(ca) => Some(std::fs::read(ca).map_err(|e| {
                Error::Client(format!("failed to read ca_file {}: {e}", ca.display()))
            })?),
            None => None,
        };
        let identity = if identity {
            Identity::read(account)?
        } else {
            None
        };
        let key = TransportKey {
            ca_pem,
            proxy: account.options.proxy.clone(),
            connect_timeout: connect_timeout(account.options.timeout),
            identity: identity.as_ref().map(Identity::digest),
        };
        let mut clients = self
            .clients
            .lock()
            .expect("never poisoned: no panics under the lock");
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let client = Arc::new(build(&key, account, identity.as_ref())?);
        self.built.fetch_add(1, Ordering::Relaxed);
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Moves the discovery epoch on (a reload): every endpoint discovers its token
    /// endpoint again before its next request.
    pub fn rediscover(&self) {
        self.discovery_epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// The newest `DPoP-Nonce` the token endpoint at `url` sent, if any.
    pub fn dpop_nonce(&self, url: &url::Url) -> Option<String> {
        let key = super::dpop::htu(url);
        self.dpop_nonces
            .lock()
            .expect("never poisoned")
            .get(&key)
            .cloned()
    }

    /// Keeps `nonce` as the newest the token endpoint at `url` sent.
    pub fn set_dpop_nonce(&self, url: &url::Url, nonce: &str) {
        let key = super::dpop::htu(url);
        self.dpop_nonces
            .lock()
            .expect("never poisoned")
            .insert(key, nonce.to_owned());
    }

    /// The current discovery epoch (see [`Transports::rediscover`]).
    pub fn discovery_epoch(&self) -> u64 {
        self.discovery_epoch.load(Ordering::Relaxed)
    }

    /// How many clients were built (tests: sharing works).
    pub fn built(&self) -> usize {
        self.built.load(Ordering::Relaxed)
    }

    /// Forgets clients no endpoint uses any more (after a reload changed settings).
    pub fn prune(&self) {
        self.clients
            .lock()
            .expect("never poisoned")
            .retain(|_, c| Arc::strong_count(c) > 1);
    }
}

/// What to add to a connection error that a client certificate may explain. A server
/// that refuses a client certificate often just closes the connection during the
/// handshake (Node, nginx with TLS 1.3), which says nothing about certificates.
pub fn tls_hint(has_client_cert: bool, reason: &str) -> &'static str {
    let lower = reason.to_ascii_lowercase();
    if lower.contains("certificaterequired") || lower.contains("certificate required") {
        return if has_client_cert {
            " (the server asked for a client certificate and did not take client_cert)"
        } else {
            " (the server asks for a client certificate: set client_cert and client_key)"
        };
    }
    let dropped = ["close_notify", "reset by peer", "alert", "handshake"]
        .iter()
        .any(|w| lower.contains(w));
    if dropped && has_client_cert {
        " (the server ended the TLS connection: it may not accept client_cert, e.g. one its CA did not sign)"
    } else {
        ""
    }
}

/// Connecting never takes longer than the whole request may, nor than 10 s.
fn connect_timeout(timeout: Duration) -> Duration {
    timeout.min(Duration::from_secs(10))
}

fn build(
    key: &TransportKey,
    account: &Account,
    identity: Option<&Identity>,
) -> Result<reqwest::Client, Error> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(key.connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tokend/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60));
    if let (Some(pem), Some(ca)) = (&key.ca_pem, &account.options.ca_file) {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| Error::Client(format!("ca_file {}: {e}", ca.display())))?;
        if certs.is_empty() {
            return Err(Error::Client(format!(
                "ca_file {} holds no PEM certificate",
                ca.display()
            )));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    if let Some(id) = identity {
        // reqwest's message names what is missing or wrong, never the key.
        let id = reqwest::Identity::from_pem(id.0.as_bytes()).map_err(|e| {
            Error::Client(format!(
                "client_cert / client_key: {}",
                error_chain(&e.without_url())
            ))
        })?;
        b = b.identity(id);
    }
    if let Some(p) = &key.proxy {
        let proxy = reqwest::Proxy::all(p.expose())
            // Not the URL: it may carry the proxy's password.
            .map_err(|_| Error::Client("proxy is not a valid URL".into()))?;
        b = b.proxy(proxy);
    }
    b.build().map_err(|e| {
        let why = error_chain(&e.without_url());
        Error::Client(match identity {
            // rustls checks the pair when the client is built: a key that does not parse,
            // or is not the certificate's.
            Some(_) => format!("client_cert / client_key: {why}"),
            None => why,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;
    use std::path::Path;

    /// Two self-signed test CAs (P-256, no key kept).
    const CA_ONE: &str = "-----BEGIN CERTIFICATE-----
MIIBizCCATGgAwIBAgIUYQrkA6FOebY0SBJSf8quz0LzbGEwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPdG9rZW5kLXRlc3Qtb25lMCAXDTI2MTEyOTAxNTYyNVoYDzIx
MjYxMTA1MDE1NjI1WjAaMRgwFgYDVQQDDA90b2tlbmQtdGVzdC1vbmUwWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAAREyJ2j6dXYy4tvo0AVljxCuEg/mQaRf1/HPaCU
KuGRvZyeYdj5U81Hf/6r19tykgxZ7xdTNDDvOD1cOZqdGzJAo1MwUTAdBgNVHQ4E
FgQUtT/11EUl31/foRSCxi8ivH7nEw0wHwYDVR0jBBgwFoAUtT/11EUl31/foRSC
xi8ivH7nEw0wDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiEA3RXH
+VAiNsyzwFT8X1AItuaVbF8l6DnnH9hlK9Zv3NICICeM5M3af9Lyxg38yP4CyIKG
sOwgmZs+Fgn0D+BP7hi6
-----END CERTIFICATE-----
";
    const CA_TWO: &str = "-----BEGIN CERTIFICATE-----
MIIBijCCATGgAwIBAgIUKk0/S5HFchptVZ1qUKXBa2C6eFQwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPdG9rZW5kLXRlc3QtdHdvMCAXDTI2MTEyOTAxNTYyNVoYDzIx
MjYxMTA1MDE1NjI1WjAaMRgwFgYDVQQDDA90b2tlbmQtdGVzdC10d28wWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAAQ8Xy9FTxi9QQZ5qAII3RJDlkgwyy6a2X/IgLR2
0fgtvVrJHc61xoB/fhxkrXTombAFxE9bKdQrFgYrff85+A/Go1MwUTAdBgNVHQ4E
FgQUADzAQX1rnskfPpuulpxlEsPpauEwHwYDVR0jBBgwFoAUADzAQX1rnskfPpuu
lpxlEsPpauEwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiBr9rj/
SOYGCPwsvdIQukn92q7cFeniDO7bYS/IOITaUgIgX4t2/LWFYH+hc4n7SrwMgOq6
lwpNFpz1XdAez9ZFzsE=
-----END CERTIFICATE-----
";

    fn accounts(extra: [&str; 4]) -> Vec<Account> {
        let mut text = String::new();
        for (i, e) in extra.iter().enumerate() {
            text.push_str(&format!(
                "[[account]]\nname = \"a{i}\"\ntoken_url = \"https://idp.example/t\"\n\
                 client_id = \"id{i}\"\nclient_secret = {{ env = \"S\" }}\nscope = \"s{i}\"\n{e}\n\
                 [[account.output]]\npath = \"/out/a{i}\"\n"
            ));
        }
        parse_str(&text, Path::new("/c.toml")).unwrap().accounts
    }

    #[test]
    fn accounts_with_the_same_transport_share_a_client() {
        let t = Transports::default();
        let a = accounts([
            "",
            "timeout = \"20s\"",
            "",
            "proxy = \"http://p.internal:3128\"",
        ]);
        let c0 = t.client(&a[0]).unwrap();
        // A different request timeout is set per request: the client is shared.
        let c1 = t.client(&a[1]).unwrap();
        let c2 = t.client(&a[2]).unwrap();
        assert!(Arc::ptr_eq(&c0, &c1) && Arc::ptr_eq(&c0, &c2));
        assert_eq!(t.built(), 1);
        let c3 = t.client(&a[3]).unwrap();
        assert!(!Arc::ptr_eq(&c0, &c3), "another proxy, another client");
        assert_eq!(t.built(), 2);
    }

    #[test]
    fn another_ca_file_gets_another_client_and_unused_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("one.pem"), dir.path().join("two.pem"));
        std::fs::write(&one, CA_ONE).unwrap();
        std::fs::write(&two, CA_TWO).unwrap();
        let a = accounts([
            &format!("ca_file = \"{}\"", one.display()),
            &format!("ca_file = \"{}\"", one.display()),
            &format!("ca_file = \"{}\"", two.display()),
            "",
        ]);
        let t = Transports::default();
        let c: Vec<_> = a.iter().map(|a| t.client(a)).collect();
        let (x, y, z) = (
            c[0].as_ref().unwrap(),
            c[1].as_ref().unwrap(),
            c[2].as_ref().unwrap(),
        );
        assert!(Arc::ptr_eq(x, y), "the same ca_file: one client");
        assert!(!Arc::ptr_eq(x, z), "another ca_file: another client");
        let plain = c[3].as_ref().unwrap();
        assert!(!Arc::ptr_eq(x, plain), "no ca_file: another client");
        assert_eq!(t.built(), 3);
        let plain = plain.clone();
        drop(c);
        t.prune();
        assert_eq!(
            t.clients.lock().unwrap().len(),
            1,
            "only the one in use is kept"
        );
        drop(plain);
    }

    #[test]
    fn clients_with_different_certificates_are_kept_apart() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let (ec_cert, ec_key) = (
            write("ec.crt", include_str!("../../tests/keys/p256-cert.pem")),
            write("ec.key", include_str!("../../tests/keys/p256-sec1.pem")),
        );
        let (rsa_cert, rsa_key) = (
            write("rsa.crt", include_str!("../../tests/keys/rsa-cert.pem")),
            write("rsa.key", include_str!("../../tests/keys/rsa-pkcs8.pem")),
        );
        let mtls = |c: &str, k: &str| {
            format!("client_cert = {{ file = \"{c}\" }}\nclient_key = {{ file = \"{k}\" }}")
        };
        let a = accounts([
            &mtls(&ec_cert, &ec_key),
            &mtls(&ec_cert, &ec_key),
            &mtls(&rsa_cert, &rsa_key),
            "",
        ]);
        let t = Transports::default();
        let c: Vec<_> = a.iter().map(|a| t.client(a).unwrap()).collect();
        assert!(
            Arc::ptr_eq(&c[0], &c[1]),
            "the same certificate and key: one client"
        );
        assert!(
            !Arc::ptr_eq(&c[0], &c[2]),
            "another certificate: another client"
        );
        assert!(!Arc::ptr_eq(&c[0], &c[3]) && !Arc::ptr_eq(&c[2], &c[3]));
        assert_eq!(t.built(), 3);
        // A key that is not the certificate's: refused when the client is built.
        let mismatched = accounts([&mtls(&ec_cert, &rsa_key), "", "", ""]);
        let e = t.client(&mismatched[0]).unwrap_err().to_string();
        assert!(e.contains("client_cert / client_key"), "{e}");
        // A renewed certificate in the same file: the next call builds a new client.
        std::fs::write(
            dir.path().join("ec.crt"),
            include_str!("../../tests/keys/p256-expired-cert.pem"),
        )
        .unwrap();
        let renewed = t.client(&a[0]).unwrap();
        assert!(!Arc::ptr_eq(&renewed, &c[0]));
        assert_eq!(t.built(), 4);
        // A key that is no key: a clear error, nothing of the file in it.
        std::fs::write(
            dir.path().join("ec.key"),
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = t.client(&a[0]).unwrap_err().to_string();
        assert!(e.contains("client_cert / client_key"), "{e}");
        assert!(!e.contains("c2VjcmV0"), "{e}");
        std::fs::remove_file(dir.path().join("ec.key")).unwrap();
        let e = crate::oauth::error_chain(&t.client(&a[0]).unwrap_err());
        assert!(
            e.contains("failed to read the client key") && e.contains("ec.key"),
            "{e}"
        );
    }
}
