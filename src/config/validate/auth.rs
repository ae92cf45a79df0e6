//! How an account proves itself and what it asks for: `client_auth` and the
//! `client_secret` it needs (or must not have), private_key_jwt's key and assertion
//! settings (RFC 7523), the client certificate and its key (RFC 8705), and the grant
//! with its own keys (`username` and `password`, `refresh_token`).
//!
//! Nothing here reads a key or certificate: where each is written goes to
//! [`KeyFile`]s, which `files` reads and checks.

use super::{At, Ctx, KeyFile, KeyUse};
use crate::config::secret::SecretSpec;
use crate::config::{
    AssertionAlg, AssertionConfig, ClientAuth, ClientCert, Grant, MAX_ASSERTION_LIFETIME,
};

/// `client_auth` and the `client_secret` it needs (or must not have).
pub(super) fn client_auth(cx: &mut Ctx<'_>, at: &At<'_>) -> (ClientAuth, Option<SecretSpec>) {
    let (a, d) = (at.a, at.d);
    // Unset, it follows from the credential the account names: a private key signs
    // assertions, a client certificate alone proves the client, else a secret.
    let default = if pick!(a, d, private_key).is_some() {
        ClientAuth::PrivateKeyJwt
    } else if pick!(a, d, client_cert).is_some() && pick!(a, d, client_secret).is_none() {
        ClientAuth::TlsClientAuth
    } else {
        ClientAuth::Basic
    };
    let client_auth = cx.choice(
        &pick!(a, d, client_auth),
        at.k("client_auth"),
        &[
            ("basic", ClientAuth::Basic),
            ("post", ClientAuth::Post),
            ("none", ClientAuth::None),
            ("private_key_jwt", ClientAuth::PrivateKeyJwt),
            ("tls_client_auth", ClientAuth::TlsClientAuth),
        ],
        default,
    );
    let client_secret =
        pick!(a, d, client_secret).and_then(|s| cx.secret(&s, at.k("client_secret")));
    let no_secret = match client_auth {
        ClientAuth::None => Some("\"none\" sends no secret; remove it or choose basic or post"),
        ClientAuth::PrivateKeyJwt => {
            Some("\"private_key_jwt\" signs with private_key and sends no secret; remove it")
        }
        ClientAuth::TlsClientAuth => {
            Some("\"tls_client_auth\" proves the client with its certificate and sends no secret; remove it")
        }
        ClientAuth::Basic | ClientAuth::Post => None,
    };
    match (no_secret, &client_secret) {
        (Some(why), Some(_)) => {
            let s = pick!(a, d, client_secret)
                .map(|s| s.span())
                .unwrap_or(at.span.clone());
            cx.err(s, at.k("client_secret"), format!("client_auth = {why}"));
        }
        (None, None) if pick!(a, d, client_secret).is_none() => {
            cx.missing(
                at.span.clone(),
                at.label,
                "client_secret",
                " (or set client_auth = \"none\" for a public client, \"private_key_jwt\" or \"tls_client_auth\")",
            );
        }
        _ => {}
    }
    (client_auth, client_secret)
}

/// A value whose error is already reported in [`Ctx`].
type Checked<T> = Result<T, Reported>;

#[derive(Clone, Copy)]
struct Reported;

/// `client_auth = "private_key_jwt"`: `private_key` (required), `key_id`,
/// `assertion_alg`, `assertion_audience`, `assertion_lifetime`; with any other
/// client_auth, none of them.
pub(super) fn assertion(
    cx: &mut Ctx<'_>,
    at: &At<'_>,
    client_auth: ClientAuth,
) -> Option<AssertionConfig> {
    let (a, d) = (at.a, at.d);
    if client_auth != ClientAuth::PrivateKeyJwt {
        refuse_assertion_keys(cx, at);
        return None;
    }
    let Some(pk) = pick!(a, d, private_key) else {
        cx.missing(
            at.span.clone(),
            at.label,
            "private_key",
            " (client_auth = \"private_key_jwt\" signs its client assertion with it)",
        );
        return None;
    };
    let spec = cx.secret(&pk, at.k("private_key"));
    let key_id = key_id(cx, at);
    let alg_at = pick!(a, d, assertion_alg)
        .map(|v| cx.locate(v.span(), at.k("assertion_alg"), String::new()));
    let alg = assertion_alg(cx, at);
    let audience = assertion_audience(cx, at);
    let lifetime = assertion_lifetime(cx, at);
    let spec = spec?;
    let at_key = cx.locate(pk.span(), at.k("private_key"), String::new());
    cx.key_files.push(KeyFile {
        spec: spec.clone(),
        at: at_key,
        what: KeyUse::Assertion {
            alg: alg.unwrap_or(None),
            alg_at,
        },
    });
    Some(AssertionConfig {
        private_key: spec,
        key_id: key_id.ok()?,
        alg: alg.ok()?,
        audience: audience.ok()?,
        lifetime: lifetime.ok()?,
    })
}

/// The keys of private_key_jwt, written for another client_auth: each a mistake.
fn refuse_assertion_keys(cx: &mut Ctx<'_>, at: &At<'_>) {
    let (a, d) = (at.a, at.d);
    let spans = [
        ("private_key", pick!(a, d, private_key).map(|v| v.span())),
        ("key_id", pick!(a, d, key_id).map(|v| v.span())),
        (
            "assertion_alg",
            pick!(a, d, assertion_alg).map(|v| v.span()),
        ),
        (
            "assertion_audience",
            pick!(a, d, assertion_audience).map(|v| v.span()),
        ),
        (
            "assertion_lifetime",
            pick!(a, d, assertion_lifetime).map(|v| v.span()),
        ),
    ];
    for (key, span) in spans {
        if let Some(span) = span {
            cx.err(
                span,
                at.k(key),
                "only used with client_auth = \"private_key_jwt\"",
            );
        }
    }
}

/// `key_id`: the JWT header's `kid`, a non-empty string without control characters.
fn key_id(cx: &mut Ctx<'_>, at: &At<'_>) -> Checked<Option<String>> {
    match pick!(at.a, at.d, key_id) {
        Some(k) if k.get_ref().is_empty() || k.get_ref().chars().any(char::is_control) => {
            cx.err(
                k.span(),
                at.k("key_id"),
                "a key id is a non-empty string without control characters",
            );
            Err(Reported)
        }
        k => Ok(k.map(|k| k.into_inner())),
    }
}

/// `assertion_alg`: one of [`AssertionAlg::ALL`]; unset, the key's own.
fn assertion_alg(cx: &mut Ctx<'_>, at: &At<'_>) -> Checked<Option<AssertionAlg>> {
    let Some(v) = pick!(at.a, at.d, assertion_alg) else {
        return Ok(None);
    };
    match AssertionAlg::ALL.iter().find(|(n, _)| n == v.get_ref()) {
        Some((_, alg)) => Ok(Some(*alg)),
        None => {
            let names: Vec<_> = AssertionAlg::ALL.iter().map(|(n, _)| *n).collect();
            cx.err(
                v.span(),
                at.k("assertion_alg"),
                format!("{:?} is not one of {}", v.get_ref(), names.join(" | ")),
            );
            Err(Reported)
        }
    }
}

/// `assertion_audience`: the `aud` claim, not blank; unset, the token endpoint.
fn assertion_audience(cx: &mut Ctx<'_>, at: &At<'_>) -> Checked<Option<String>> {
    match pick!(at.a, at.d, assertion_audience) {
        Some(v) if v.get_ref().trim().is_empty() => {
            cx.err(v.span(), at.k("assertion_audience"), "must not be empty");
            Err(Reported)
        }
        v => Ok(v.map(|v| v.into_inner())),
    }
}

/// `assertion_lifetime`: at most (and by default) [`MAX_ASSERTION_LIFETIME`].
fn assertion_lifetime(cx: &mut Ctx<'_>, at: &At<'_>) -> Checked<std::time::Duration> {
    let lifetime = pick!(at.a, at.d, assertion_lifetime);
    let lifetime_at = lifetime.as_ref().map(|v| v.span());
    let lifetime = cx.duration(
        &lifetime,
        at.k("assertion_lifetime"),
        MAX_ASSERTION_LIFETIME,
    );
    if lifetime > MAX_ASSERTION_LIFETIME {
        cx.err(
            lifetime_at.unwrap_or(at.span.clone()),
            at.k("assertion_lifetime"),
            "at most 5m: a client assertion may not be valid longer (SMART Backend Services)",
        );
        return Err(Reported);
    }
    Ok(lifetime)
}

/// `client_cert` and `client_key`, together or not at all; `client_auth =
/// "tls_client_auth"` needs them. With another client_auth they still go on the HTTP
/// client (a gateway that asks for a client certificate as well as a secret).
pub(super) fn client_cert(
    cx: &mut Ctx<'_>,
    at: &At<'_>,
    client_auth: ClientAuth,
) -> Option<ClientCert> {
    let (a, d) = (at.a, at.d);
    match (pick!(a, d, client_cert), pick!(a, d, client_key)) {
        (Some(c), Some(k)) => {
            // A certificate is public: inline, it does not make the config a secret.
            let cert = cx.source(&c, at.k("client_cert"), false);
            let key = cx.secret(&k, at.k("client_key"));
            let (cert, key) = (cert?, key?);
            let key_at = cx.locate(k.span(), at.k("client_key"), String::new());
            let cert_at = cx.locate(c.span(), at.k("client_cert"), String::new());
            cx.key_files.push(KeyFile {
                spec: key.clone(),
                at: key_at,
                what: KeyUse::ClientKey,
            });
            cx.key_files.push(KeyFile {
                spec: cert.clone(),
                at: cert_at,
                what: KeyUse::ClientCert { key: key.clone() },
            });
            Some(ClientCert { cert, key })
        }
        (Some(c), None) => {
            cx.err(
                c.span(),
                at.k("client_cert"),
                "needs \"client_key\", the certificate's private key",
            );
            None
        }
        (None, Some(k)) => {
            cx.err(
                k.span(),
                at.k("client_key"),
                "needs \"client_cert\", the certificate (chain) of this key",
            );
            None
        }
        (None, None) => {
            if client_auth == ClientAuth::TlsClientAuth {
                cx.missing(
                    at.span.clone(),
                    at.label,
                    "client_cert",
                    " and \"client_key\" (client_auth = \"tls_client_auth\" proves the client with them)",
                );
            }
            None
        }
    }
}

/// `grant_type`, before the keys each grant needs are looked at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum GrantKind {
    ClientCredentials,
    Password,
    RefreshToken,
}

/// `grant_type` and the keys of that grant (and no other grant's).
pub(super) fn grant(cx: &mut Ctx<'_>, at: &At<'_>) -> Option<Grant> {
    let (a, d) = (at.a, at.d);
    let grant_kind = cx.choice(
        &pick!(a, d, grant_type),
        at.k("grant_type"),
        &[
            ("client_credentials", GrantKind::ClientCredentials),
            ("password", GrantKind::Password),
            ("refresh_token", GrantKind::RefreshToken),
        ],
        GrantKind::ClientCredentials,
    );
    let username = pick!(a, d, username);
    let password = pick!(a, d, password);
    let refresh_token = pick!(a, d, refresh_token);
    let grant = match grant_kind {
        GrantKind::Password => {
            if username.is_none() {
                cx.err(
                    at.span.clone(),
                    at.label,
                    "grant_type = \"password\" needs \"username\"",
                );
            }
            if password.is_none() {
                cx.err(
                    at.span.clone(),
                    at.label,
                    "grant_type = \"password\" needs \"password\"",
                );
            }
            let pw = password
                .as_ref()
                .and_then(|p| cx.secret(p, at.k("password")));
            match (username.clone(), pw) {
                (Some(u), Some(p)) => Some(Grant::Password {
                    username: u.into_inner(),
                    password: p,
                }),
                _ => None,
            }
        }
        GrantKind::RefreshToken => match &refresh_token {
            Some(r) => cx
                .secret(r, at.k("refresh_token"))
                .map(|refresh_token| Grant::RefreshToken { refresh_token }),
            None => {
                cx.err(
                    at.span.clone(),
                    at.label,
                    "grant_type = \"refresh_token\" needs \"refresh_token\"",
                );
                None
            }
        },
        GrantKind::ClientCredentials => Some(Grant::ClientCredentials),
    };
    if grant_kind != GrantKind::Password {
        for (key, v) in [
            ("username", username.map(|u| u.span())),
            ("password", password.map(|p| p.span())),
        ] {
            if let Some(s) = v {
                cx.err(s, at.k(key), "only used with grant_type = \"password\"");
            }
        }
    }
    if grant_kind != GrantKind::RefreshToken {
        if let Some(r) = refresh_token {
            cx.err(
                r.span(),
                at.k("refresh_token"),
                "only used with grant_type = \"refresh_token\"",
            );
        }
    }

    grant
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use url::form_urlencoded;

    use super::super::output::default_env_var;
    use super::super::tests::{errors, parse, KEYED, MINIMAL, OUT};
    use super::*;
    use crate::config::files::tests::load_with_mode;
    use crate::config::{Format, Secret};

    #[test]
    fn password_grant_and_env_default() {
        let text = MINIMAL.replace("client_id = \"id\"", "client_id = \"id\"\ngrant_type = \"password\"\nusername = \"u\"\npassword = { env = \"P\" }")
            .replace("path = \"/run/tokend/tokens/msk\"", "path = \"/x\"\nformat = \"env\"");
        let c = parse(&text).unwrap();
        let a = &c.accounts[0];
        assert_eq!(
            a.grant,
            Grant::Password {
                username: "u".into(),
                password: SecretSpec::Env("P".into())
            }
        );
        assert_eq!(
            a.outputs[0].format,
            Format::Env {
                var: "MSK_TOKEN".into()
            }
        );
        assert_eq!(default_env_var("my-api.v2"), "MY_API_V2_TOKEN");
    }

    #[test]
    fn client_auth_follows_the_credential_when_unset() {
        let key_only = KEYED.replace("client_auth = \"private_key_jwt\"\n", "");
        let c = parse(&format!("{key_only}{OUT}")).unwrap();
        assert_eq!(c.accounts[0].client_auth, ClientAuth::PrivateKeyJwt);
        let cert_only = format!(
            "[[account]]\nname = \"m\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\n\
             client_cert = {{ env = \"C\" }}\nclient_key = {{ env = \"K\" }}\n{OUT}"
        );
        let c = parse(&cert_only).unwrap();
        assert_eq!(c.accounts[0].client_auth, ClientAuth::TlsClientAuth);
        let both = cert_only.replace(
            "client_id = \"id\"",
            "client_id = \"id\"\nclient_secret = { env = \"S\" }",
        );
        assert_eq!(
            parse(&both).unwrap().accounts[0].client_auth,
            ClientAuth::Basic
        );
    }

    #[test]
    fn private_key_jwt_keys_are_checked_where_they_are_written() {
        for (extra, key, want) in [
            (
                "assertion_alg = \"HS256\"\n",
                "account.k.assertion_alg",
                "not one of RS256 | RS384 | ES256 | ES384",
            ),
            (
                "assertion_lifetime = \"6m\"\n",
                "account.k.assertion_lifetime",
                "at most 5m",
            ),
            ("key_id = \"\"\n", "account.k.key_id", "non-empty"),
            (
                "assertion_audience = \" \"\n",
                "account.k.assertion_audience",
                "must not be empty",
            ),
            (
                "client_secret = \"s\"\n",
                "account.k.client_secret",
                "signs with private_key and sends no secret",
            ),
        ] {
            let e = &errors(&format!("{KEYED}{extra}{OUT}"))[0];
            assert_eq!((e.key.as_str(), e.line), (key, 7), "{e}");
            assert!(e.message.contains(want), "{want} in {e}");
        }
        let e = &errors(&format!(
            "{}{OUT}",
            KEYED.replace("private_key = { file = \"key.pem\" }\n", "")
        ))[0];
        assert!(e.message.contains("missing key \"private_key\""), "{e}");
        // Keys of private_key_jwt with another client_auth are mistakes.
        let basic = KEYED.replace(
            "client_auth = \"private_key_jwt\"",
            "client_auth = \"post\"\nclient_secret = { env = \"S\" }",
        );
        let e = &errors(&format!("{basic}key_id = \"x\"\n{OUT}"))[0];
        assert!(
            e.message
                .contains("only used with client_auth = \"private_key_jwt\""),
            "{e}"
        );
        let c = parse(&format!(
            "{KEYED}assertion_alg = \"ES384\"\nassertion_audience = \"https://ehr.example\"\nassertion_lifetime = \"1m\"\n{OUT}"
        ))
        .unwrap();
        let asrt = c.accounts[0].assertion.clone().unwrap();
        assert_eq!(asrt.alg, Some(AssertionAlg::Es384));
        assert_eq!(asrt.audience.as_deref(), Some("https://ehr.example"));
        assert_eq!(asrt.lifetime, Duration::from_secs(60));
    }

    #[test]
    fn tls_client_auth_needs_a_certificate_and_its_key() {
        let mtls = "[[account]]\nname = \"m\"\ntoken_url = \"https://idp.example/t\"\n\
                    client_id = \"id\"\nclient_auth = \"tls_client_auth\"\n";
        let e = &errors(&format!("{mtls}{OUT}"))[0];
        assert!(
            e.message
                .contains("missing key \"client_cert\" and \"client_key\""),
            "{e}"
        );
        let e = &errors(&format!(
            "{mtls}client_cert = {{ file = \"c.pem\" }}\n{OUT}"
        ))[0];
        assert_eq!(
            (e.key.as_str(), e.line),
            ("account.m.client_cert", 6),
            "{e}"
        );
        assert!(e.message.contains("needs \"client_key\""), "{e}");
        let c = parse(&format!(
            "{mtls}client_cert = \"-----BEGIN CERTIFICATE-----\"\nclient_key = {{ credential = \"m-key\" }}\n{OUT}"
        ))
        .unwrap();
        let cc = c.accounts[0].client_cert.clone().unwrap();
        assert_eq!(cc.key, SecretSpec::Credential("m-key".into()));
        // An inline certificate is no secret; an inline key is.
        let cert = include_str!("../../../tests/keys/p256-cert.pem");
        let text = format!(
            "{mtls}client_cert = \"\"\"\n{cert}\"\"\"\nclient_key = {{ env = \"K\" }}\n{OUT}"
        );
        assert!(load_with_mode(&text, 0o644).is_ok());
        let text = format!(
            "{mtls}client_cert = {{ env = \"C\" }}\nclient_key = \"-----BEGIN PRIVATE KEY-----\"\n{OUT}"
        );
        let e = load_with_mode(&text, 0o644).unwrap_err().0.remove(0);
        assert_eq!(e.key, "account.m.client_key");
        // A client certificate may go with any client_auth (a gateway that wants one).
        let basic = format!(
            "{}client_secret = {{ env = \"S\" }}\nclient_cert = {{ env = \"C\" }}\nclient_key = {{ env = \"K\" }}\n{OUT}",
            mtls.replace("client_auth = \"tls_client_auth\"\n", "")
        );
        assert!(parse(&basic).unwrap().accounts[0].client_cert.is_some());
    }

    #[test]
    fn debug_shows_no_private_key_client_key_or_assertion() {
        use crate::config::keys::tests::{P256_SEC1, RSA_PKCS8};
        let text = format!(
            "[[account]]\nname = \"k\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\n\
             client_auth = \"private_key_jwt\"\nprivate_key = \"\"\"\n{RSA_PKCS8}\"\"\"\n\
             client_cert = {{ env = \"C\" }}\nclient_key = \"\"\"\n{P256_SEC1}\"\"\"\n{OUT}"
        );
        let c = parse(&text).unwrap();
        let a = &c.accounts[0];
        let pem = |p: &str| Secret::new(p.trim_end());
        let jws = crate::oauth::assertion::client_assertion(
            a,
            &pem(RSA_PKCS8),
            a.token_url.configured(),
            std::time::SystemTime::now(),
        )
        .unwrap();
        let creds = crate::oauth::request::Credentials {
            private_key: Some(pem(RSA_PKCS8)),
            client_assertion: Some(jws.clone()),
            ..Default::default()
        };
        let req = crate::oauth::request::build(a, a.token_url.configured(), &creds);
        assert!(req.body.contains(
            &form_urlencoded::byte_serialize(jws.expose().as_bytes()).collect::<String>()
        ));
        let key = crate::config::keys::PrivateKey::from_pem(&pem(RSA_PKCS8)).unwrap();
        let all = format!(
            "{c:?} {a:?} {:?} {creds:?} {req:?} {key:?} {jws:?}",
            a.secrets()
        );
        for pem in [RSA_PKCS8, P256_SEC1] {
            for line in pem.lines().filter(|l| !l.starts_with("-----")) {
                assert!(!all.contains(line), "{line} in {all}");
            }
        }
        assert!(!all.contains(&jws.expose()[..40]), "the assertion in {all}");
    }
}
