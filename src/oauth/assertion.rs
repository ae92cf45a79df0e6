//! `client_auth = "private_key_jwt"` (RFC 7523 §2.2, SMART Backend Services): the client
//! assertion, a JWT the client signs with its own key, sent as `client_assertion` with
//! `client_assertion_type = urn:ietf:params:oauth:client-assertion-type:jwt-bearer`.
//!
//! Claims (RFC 7523 §3): `iss` = `sub` = the client id, `aud` (the token endpoint's URL
//! unless `assertion_audience` says otherwise), a fresh random `jti` for every request (a
//! server refuses one it saw before), `iat` and `exp` = `iat` + `assertion_lifetime` (at
//! most 5 minutes). Header: `alg`, `kid`, `typ: JWT`. The key and its parsing live in
//! `config::keys`; JSON and base64url come from serde_json and base64, the signature from
//! ring. An assertion is a credential for its lifetime: it is a [`Secret`].

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::keys::{b64url, KeyError, PrivateKey};
use crate::config::{Account, AssertionAlg, Secret};

/// RFC 7523 §2.2's `client_assertion_type`.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The claims of a client assertion (RFC 7523 §3).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub jti: String,
    pub iat: u64,
    pub exp: u64,
}

/// The JOSE header (RFC 7515 §4.1).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub alg: String,
    pub kid: String,
    pub typ: String,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The claims for one request of `account` to `token_url` at `now`, with a fresh `jti`
/// (128 random bits).
pub fn claims(account: &Account, token_url: &url::Url, now: SystemTime) -> Claims {
    let config = account.assertion.as_ref();
    let iat = unix(now);
    let lifetime = config.map_or(crate::config::MAX_ASSERTION_LIFETIME, |c| c.lifetime);
    Claims {
        iss: account.client_id.clone(),
        sub: account.client_id.clone(),
        aud: config
            .and_then(|c| c.audience.clone())
            .unwrap_or_else(|| token_url.to_string()),
        jti: b64url(&rand::random::<[u8; 16]>()),
        iat,
        exp: iat + lifetime.as_secs().max(1),
    }
}

/// Signs `claims` into a compact JWS (RFC 7515 §7.1) with `key`.
pub fn sign(
    key: &PrivateKey,
    alg: AssertionAlg,
    kid: &str,
    claims: &Claims,
) -> Result<Secret, KeyError> {
    let header = Header {
        alg: alg.as_str().into(),
        kid: kid.into(),
        typ: "JWT".into(),
    };
    let header = serde_json::to_vec(&header).expect("a header serializes");
    let payload = serde_json::to_vec(claims).expect("claims serialize");
    let signing_input = format!("{}.{}", b64url(&header), b64url(&payload));
    let signature = key.sign(alg, signing_input.as_bytes())?;
    Ok(Secret::new(format!(
        "{signing_input}.{}",
        b64url(&signature)
    )))
}

/// The key's `kid` and `alg` as the account configures them (or as they follow from the
/// key): what the assertion's header and `tokend jwks` say.
pub fn kid_and_alg(
    account: &Account,
    key: &PrivateKey,
) -> Result<(String, AssertionAlg), KeyError> {
    let config = account.assertion.as_ref();
    let alg = config
        .and_then(|c| c.alg)
        .unwrap_or_else(|| key.default_alg());
    key.check_alg(alg)?;
    let kid = config
        .and_then(|c| c.key_id.clone())
        .unwrap_or_else(|| key.thumbprint());
    Ok((kid, alg))
}

/// The client assertion for one request of `account` to `token_url`, signed with the key
/// in `pem` (read for this request: a rotated key file is used at once).
pub fn client_assertion(
    account: &Account,
    pem: &Secret,
    token_url: &url::Url,
    now: SystemTime,
) -> Result<Secret, KeyError> {
    let key = PrivateKey::from_pem(pem)?;
    let (kid, alg) = kid_and_alg(account, &key)?;
    sign(&key, alg, &kid, &claims(account, token_url, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::keys::tests::{key, P256_PKCS8, P256_SEC1, P384_SEC1, RSA_PKCS1, RSA_PKCS8};
    use crate::config::parse_str;
    use ring::signature::{self, UnparsedPublicKey};
    use std::path::Path;
    use std::time::Duration;

    use base64::Engine as _;

    fn account(extra: &str) -> Account {
        let text = format!(
            "[[account]]\nname = \"a\"\ntoken_url = \"https://idp.example/oauth2/token\"\n\
             client_id = \"my-client\"\nclient_auth = \"private_key_jwt\"\n\
             private_key = {{ env = \"K\" }}\n{extra}\n[[account.output]]\npath = \"/x\"\n"
        );
        parse_str(&text, Path::new("/c.toml"))
            .unwrap()
            .accounts
            .remove(0)
    }

    fn decode<T: serde::de::DeserializeOwned>(part: &str) -> T {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// Splits and checks a compact JWS with the key's public half, as a server would.
    fn verify(jws: &str, key: &PrivateKey, alg: AssertionAlg) -> (Header, Claims) {
        let parts: Vec<&str> = jws.split('.').collect();
        assert_eq!(parts.len(), 3, "{jws}");
        let input = format!("{}.{}", parts[0], parts[1]);
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .unwrap();
        let verifier: &dyn signature::VerificationAlgorithm = match alg {
            AssertionAlg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            AssertionAlg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            AssertionAlg::Es256 => &signature::ECDSA_P256_SHA256_FIXED,
            AssertionAlg::Es384 => &signature::ECDSA_P384_SHA384_FIXED,
        };
        UnparsedPublicKey::new(verifier, key.spki_bits())
            .verify(input.as_bytes(), &sig)
            .unwrap_or_else(|_| panic!("the {alg} signature verifies"));
        (decode(parts[0]), decode(parts[1]))
    }

    #[test]
    fn every_algorithm_signs_claims_the_public_key_verifies() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        for (pem, alg) in [
            (RSA_PKCS8, "RS256"),
            (RSA_PKCS1, "RS384"),
            (P256_SEC1, "ES256"),
            (P256_PKCS8, "ES256"),
            (P384_SEC1, "ES384"),
        ] {
            let a = account(&format!(
                "key_id = \"kid-{alg}\"\nassertion_alg = \"{alg}\"\nassertion_lifetime = \"90s\""
            ));
            let url = url::Url::parse("https://idp.example/oauth2/token").unwrap();
            let jws = client_assertion(&a, &Secret::new(pem), &url, now).unwrap();
            let k = key(pem);
            let alg = a.assertion.as_ref().unwrap().alg.unwrap();
            let (header, claims) = verify(jws.expose(), &k, alg);
            assert_eq!(
                header,
                Header {
                    alg: alg.as_str().into(),
                    kid: format!("kid-{alg}"),
                    typ: "JWT".into()
                }
            );
            assert_eq!(claims.iss, "my-client");
            assert_eq!(claims.sub, "my-client");
            assert_eq!(claims.aud, "https://idp.example/oauth2/token");
            assert_eq!(claims.iat, 1_900_000_000);
            assert_eq!(claims.exp, 1_900_000_090);
        }
    }

    #[test]
    fn jti_is_fresh_for_every_request() {
        let a = account("");
        let url = url::Url::parse("https://idp.example/oauth2/token").unwrap();
        let jtis: std::collections::HashSet<String> = (0..1000)
            .map(|_| claims(&a, &url, SystemTime::now()).jti)
            .collect();
        assert_eq!(jtis.len(), 1000);
        assert!(jtis.iter().all(|j| j.len() == 22), "128 bits of base64url");
    }

    #[test]
    fn exp_is_at_most_five_minutes_ahead_and_defaults_follow_the_key() {
        let a = account("");
        let url = url::Url::parse("https://idp.example/oauth2/token").unwrap();
        let c = claims(&a, &url, SystemTime::now());
        assert_eq!(
            c.exp - c.iat,
            300,
            "the default lifetime is the most allowed"
        );
        // No assertion_alg, no key_id: the key's default algorithm and its thumbprint.
        for (pem, alg) in [
            (RSA_PKCS8, "RS384"),
            (P256_PKCS8, "ES256"),
            (P384_SEC1, "ES384"),
        ] {
            let k = key(pem);
            let jws = client_assertion(&a, &Secret::new(pem), &url, SystemTime::now()).unwrap();
            let (header, _) = verify(jws.expose(), &k, k.default_alg());
            assert_eq!(header.alg, alg);
            assert_eq!(header.kid, k.thumbprint());
        }
        let aud = account("assertion_audience = \"https://idp.example\"");
        assert_eq!(
            claims(&aud, &url, SystemTime::now()).aud,
            "https://idp.example"
        );
    }

    #[test]
    fn a_key_that_does_not_fit_the_algorithm_signs_nothing() {
        let a = account("assertion_alg = \"ES384\"");
        let url = url::Url::parse("https://idp.example/t").unwrap();
        let e = client_assertion(&a, &Secret::new(P256_SEC1), &url, SystemTime::now()).unwrap_err();
        assert!(e.to_string().contains("needs an EC P-384 key"), "{e}");
    }

    #[test]
    fn debug_of_an_assertion_shows_nothing() {
        let a = account("");
        let url = url::Url::parse("https://idp.example/t").unwrap();
        let jws = client_assertion(&a, &Secret::new(RSA_PKCS8), &url, SystemTime::now()).unwrap();
        assert_eq!(format!("{jws:?}"), "<redacted>");
    }
}
