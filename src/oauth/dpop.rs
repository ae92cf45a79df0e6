//! DPoP proofs (RFC 9449): the JWT that binds a request to the key tokend keeps for a
//! `token_binding = "dpop"` account, both for its own token requests (§5) and for the
//! requests a reader is about to make with the bound token (§7, with `ath`).
//!
//! A proof's header is `typ: dpop+jwt`, `alg` and the public `jwk`; its claims a fresh
//! `jti`, `htm` (the method), `htu` (the URL without query and fragment, §4.2), `iat`,
//! and, where they apply, `ath` (base64url SHA-256 of the access token) and the
//! server's `nonce`. What a proof may be minted for (the account's `urls`) is decided
//! by the caller; the key's keeping (`dpop_key`, or one made once in `state_dir`) too.
//! A proof is a credential for as long as a server accepts its `iat`: a [`Secret`].

use std::fmt;
use std::time::SystemTime;

use serde::Serialize;

use crate::config::keys::{b64url, KeyError, PrivateKey};
pub use crate::config::DpopAlg;
use crate::config::{AssertionAlg, Secret};

/// A DPoP key and the algorithm it signs with. `Debug` shows the key's kind only.
pub struct DpopKey {
    key: PrivateKey,
    alg: DpopAlg,
    /// The proof header (`typ`, `alg`, the public `jwk`), base64url: the same for every
    /// proof of this key, so encoded once.
    header: String,
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopKey")
            .field("key", &self.key)
            .field("alg", &self.alg)
            .finish()
    }
}

impl DpopKey {
    /// The key in `pem` for `alg`; an error says what the key is and what `alg` needs.
    pub fn from_pem(pem: &Secret, alg: DpopAlg) -> Result<Self, KeyError> {
        let key = PrivateKey::from_pem(pem)?;
        alg.check_key(&key)?;
        let header = header(&key, alg);
        Ok(DpopKey { key, alg, header })
    }

    /// A new key for `alg` (EC only, see [`DpopAlg::can_generate`]) and its PEM to keep.
    pub fn generate(alg: DpopAlg) -> Result<(Self, Secret), KeyError> {
        if !alg.can_generate() {
            return Err(KeyError::Unsupported(format!(
                "no key: tokend makes EC keys only, and dpop_alg = \"{alg}\" needs an RSA key (set dpop_key)"
            )));
        }
        let (key, pem) = PrivateKey::generate_ec(alg == DpopAlg::Es384)?;
        let header = header(&key, alg);
        Ok((DpopKey { key, alg, header }, pem))
    }

    pub fn alg(&self) -> DpopAlg {
        self.alg
    }

    /// The key's RFC 7638 thumbprint: the `jkt` a bound token's `cnf` names (§6).
    pub fn thumbprint(&self) -> String {
        self.key.thumbprint()
    }

    /// A proof for a request of `method` to `url` at `now` (RFC 9449 §4.2); `token`: the
    /// access token the request carries (its hash goes in `ath`); `nonce`: the server's
    /// `DPoP-Nonce`.
    pub fn proof(
        &self,
        method: &str,
        url: &url::Url,
        token: Option<&str>,
        nonce: Option<&str>,
        now: SystemTime,
    ) -> Result<Secret, KeyError> {
        #[derive(Serialize)]
        struct Claims<'a> {
            jti: String,
            htm: &'a str,
            htu: String,
            iat: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            ath: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            nonce: Option<&'a str>,
        }
        let claims = Claims {
            jti: b64url(&rand::random::<[u8; 16]>()),
            htm: method,
            htu: htu(url),
            iat: now
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            ath: token.map(ath),
            nonce,
        };
        let payload =
            zeroize::Zeroizing::new(serde_json::to_vec(&claims).expect("claims serialize"));
        let input = format!("{}.{}", self.header, b64url(&payload));
        let signature = match self.alg {
            DpopAlg::Es256 => self.key.sign(AssertionAlg::Es256, input.as_bytes())?,
            DpopAlg::Es384 => self.key.sign(AssertionAlg::Es384, input.as_bytes())?,
            DpopAlg::Rs256 => self.key.sign(AssertionAlg::Rs256, input.as_bytes())?,
            DpopAlg::Ps256 => self.key.sign_ps256(input.as_bytes())?,
        };
        Ok(Secret::new(format!("{input}.{}", b64url(&signature))))
    }
}

/// The base64url of a proof's JOSE header for `key` (RFC 9449 §4.2).
fn header(key: &PrivateKey, alg: DpopAlg) -> String {
    #[derive(Serialize)]
    struct Header {
        typ: &'static str,
        alg: &'static str,
        jwk: serde_json::Value,
    }
    let header = Header {
        typ: "dpop+jwt",
        alg: alg.as_str(),
        jwk: key.public_jwk_bare(),
    };
    b64url(&serde_json::to_vec(&header).expect("a header serializes"))
}

/// `htu` (RFC 9449 §4.2): the URL without its query and fragment.
pub fn htu(url: &url::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// `ath` (RFC 9449 §4.2): base64url of the SHA-256 of the access token's ASCII.
pub fn ath(token: &str) -> String {
    b64url(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::keys::tests::{P256_PKCS8, P384_SEC1, RSA_PKCS8};
    use base64::Engine as _;
    use ring::signature::{self, UnparsedPublicKey};

    fn decode(part: &str) -> serde_json::Value {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// Checks a proof as a resource server would, with the public key in its own header.
    fn verify(proof: &str, alg: DpopAlg) -> (serde_json::Value, serde_json::Value) {
        let parts: Vec<&str> = proof.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = decode(parts[0]);
        let jwk = &header["jwk"];
        let b = |k: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(jwk[k].as_str().unwrap())
                .unwrap()
        };
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .unwrap();
        let input = format!("{}.{}", parts[0], parts[1]);
        match alg {
            DpopAlg::Es256 | DpopAlg::Es384 => {
                let mut point = vec![4u8];
                point.extend(b("x"));
                point.extend(b("y"));
                let v: &dyn signature::VerificationAlgorithm = if alg == DpopAlg::Es256 {
                    &signature::ECDSA_P256_SHA256_FIXED
                } else {
                    &signature::ECDSA_P384_SHA384_FIXED
                };
                UnparsedPublicKey::new(v, point)
                    .verify(input.as_bytes(), &sig)
                    .unwrap();
            }
            DpopAlg::Rs256 | DpopAlg::Ps256 => {
                let v: &signature::RsaParameters = if alg == DpopAlg::Rs256 {
                    &signature::RSA_PKCS1_2048_8192_SHA256
                } else {
                    &signature::RSA_PSS_2048_8192_SHA256
                };
                signature::RsaPublicKeyComponents {
                    n: b("n"),
                    e: b("e"),
                }
                .verify(v, input.as_bytes(), &sig)
                .unwrap();
            }
        }
        (header, decode(parts[1]))
    }

    #[test]
    fn proofs_of_every_algorithm_verify_with_the_key_in_their_header() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_900_000_000);
        let url = url::Url::parse("https://fhir.example/r4/Patient?name=x#frag").unwrap();
        for (pem, alg) in [
            (P256_PKCS8, DpopAlg::Es256),
            (P384_SEC1, DpopAlg::Es384),
            (RSA_PKCS8, DpopAlg::Rs256),
            (RSA_PKCS8, DpopAlg::Ps256),
        ] {
            let key = DpopKey::from_pem(&Secret::new(pem), alg).unwrap();
            let proof = key
                .proof("GET", &url, Some("tok-abc"), Some("n-1"), now)
                .unwrap();
            let (header, claims) = verify(proof.expose(), alg);
            assert_eq!(header["typ"], "dpop+jwt");
            assert_eq!(header["alg"], alg.as_str());
            assert!(header["jwk"].get("d").is_none(), "no private part");
            assert_eq!(claims["htm"], "GET");
            assert_eq!(claims["htu"], "https://fhir.example/r4/Patient");
            assert_eq!(claims["iat"], 1_900_000_000);
            assert_eq!(claims["ath"], ath("tok-abc"));
            assert_eq!(claims["nonce"], "n-1");
            assert_eq!(claims["jti"].as_str().unwrap().len(), 22);
        }
    }

    #[test]
    fn a_proof_for_the_token_endpoint_has_no_ath_and_every_jti_is_new() {
        let (key, pem) = DpopKey::generate(DpopAlg::Es256).unwrap();
        assert!(pem.expose().starts_with("-----BEGIN PRIVATE KEY-----"));
        let again = DpopKey::from_pem(&pem, DpopAlg::Es256).unwrap();
        assert_eq!(
            again.thumbprint(),
            key.thumbprint(),
            "the kept PEM is the key"
        );
        let url = url::Url::parse("https://idp.example/token").unwrap();
        let jtis: std::collections::HashSet<String> = (0..200)
            .map(|_| {
                let p = key
                    .proof("POST", &url, None, None, SystemTime::now())
                    .unwrap();
                let (_, claims) = verify(p.expose(), DpopAlg::Es256);
                assert!(claims.get("ath").is_none() && claims.get("nonce").is_none());
                claims["jti"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(jtis.len(), 200);
        assert!(
            DpopKey::generate(DpopAlg::Ps256).is_err(),
            "no RSA keys are made"
        );
        let (p384, _) = DpopKey::generate(DpopAlg::Es384).unwrap();
        verify(
            p384.proof("GET", &url, None, None, SystemTime::now())
                .unwrap()
                .expose(),
            DpopAlg::Es384,
        );
    }

    #[test]
    fn a_key_that_does_not_fit_the_algorithm_is_refused_and_debug_shows_no_key() {
        let e = DpopKey::from_pem(&Secret::new(P256_PKCS8), DpopAlg::Ps256).unwrap_err();
        assert!(e.to_string().contains("needs an RSA key"), "{e}");
        let e = DpopKey::from_pem(&Secret::new(RSA_PKCS8), DpopAlg::Es384).unwrap_err();
        assert!(e.to_string().contains("needs an EC P-384 key"), "{e}");
        let key = DpopKey::from_pem(&Secret::new(P256_PKCS8), DpopAlg::Es256).unwrap();
        let dbg = format!("{key:?}");
        assert!(dbg.contains("EC P-256") && !dbg.contains("BEGIN"), "{dbg}");
        // The RFC 9449 §4.2 ath example: the SHA-256 of the token, base64url.
        assert_eq!(
            ath("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"),
            "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
        );
    }
}
