//! Private keys and certificates, as read from secret sources: parsing PEM (PKCS#8 and
//! PKCS#1 RSA, PKCS#8 and SEC1 EC P-256/P-384) into a [`PrivateKey`] that can sign and
//! tell its public half (a JWK, an RFC 7638 thumbprint), and reading a certificate's
//! validity and public key (for `tokend check`).
//!
//! What lives here is key material and its parsing; the JWT built with it lives in
//! `oauth::assertion`. PEM and DER are read by maintained crates (rustls-pki-types, sec1,
//! x509-cert) and keys are ring's: no ASN.1 or base64 by hand. No error or `Debug` output
//! shows a key: errors say what kind of key was found or wanted, never its bytes.
//!
//! ring's key pairs do not zero their own memory; the PEM text ([`Secret`]) and the DER
//! decoded from it are zeroed when dropped, and the daemon parses a key for each request
//! and drops it after signing, so a parsed key lives for milliseconds.

use std::fmt;
use std::time::SystemTime;

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

use super::Secret;

/// The JWS algorithms a client assertion may be signed with (RFC 7518 §3.1); SMART
/// Backend Services asks for RS384 or ES384.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AssertionAlg {
    Rs256,
    Rs384,
    Es256,
    Es384,
}

impl AssertionAlg {
    pub const ALL: [(&'static str, AssertionAlg); 4] = [
        ("RS256", AssertionAlg::Rs256),
        ("RS384", AssertionAlg::Rs384),
        ("ES256", AssertionAlg::Es256),
        ("ES384", AssertionAlg::Es384),
    ];

    /// The JWS `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            AssertionAlg::Rs256 => "RS256",
            AssertionAlg::Rs384 => "RS384",
            AssertionAlg::Es256 => "ES256",
            AssertionAlg::Es384 => "ES384",
        }
    }

    /// The kind of key this algorithm signs with.
    fn wants(self) -> &'static str {
        match self {
            AssertionAlg::Rs256 | AssertionAlg::Rs384 => "an RSA key",
            AssertionAlg::Es256 => "an EC P-256 key",
            AssertionAlg::Es384 => "an EC P-384 key",
        }
    }
}

impl fmt::Display for AssertionAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JWS algorithms of a DPoP key (`dpop_alg`, RFC 9449; `oauth::dpop` signs with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DpopAlg {
    Es256,
    Es384,
    Rs256,
    Ps256,
}

impl DpopAlg {
    pub const ALL: [(&'static str, DpopAlg); 4] = [
        ("ES256", DpopAlg::Es256),
        ("ES384", DpopAlg::Es384),
        ("RS256", DpopAlg::Rs256),
        ("PS256", DpopAlg::Ps256),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DpopAlg::Es256 => "ES256",
            DpopAlg::Es384 => "ES384",
            DpopAlg::Rs256 => "RS256",
            DpopAlg::Ps256 => "PS256",
        }
    }

    /// Whether `key` signs with this algorithm; the error says what the key is and
    /// what the algorithm needs.
    pub fn check_key(self, key: &PrivateKey) -> Result<(), KeyError> {
        let fits = match self {
            DpopAlg::Es256 => key.check_alg(AssertionAlg::Es256).is_ok(),
            DpopAlg::Es384 => key.check_alg(AssertionAlg::Es384).is_ok(),
            DpopAlg::Rs256 | DpopAlg::Ps256 => key.is_rsa(),
        };
        if fits {
            return Ok(());
        }
        let wants = match self {
            DpopAlg::Es256 => "an EC P-256 key",
            DpopAlg::Es384 => "an EC P-384 key",
            DpopAlg::Rs256 | DpopAlg::Ps256 => "an RSA key",
        };
        Err(KeyError::Unsupported(format!(
            "{}, but dpop_alg = \"{self}\" needs {wants}",
            key.kind()
        )))
    }

    /// Whether tokend can make a key for this algorithm itself (EC only: ring makes no
    /// RSA keys; an RSA algorithm needs `dpop_key`).
    pub fn can_generate(self) -> bool {
        matches!(self, DpopAlg::Es256 | DpopAlg::Es384)
    }
}

impl fmt::Display for DpopAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a key or certificate cannot be used. Never holds key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("holds no PEM private key (expected -----BEGIN PRIVATE KEY-----, -----BEGIN RSA PRIVATE KEY----- or -----BEGIN EC PRIVATE KEY-----)")]
    NoPrivateKey,
    #[error("holds an encrypted private key; tokend reads unencrypted keys (`openssl pkey -in KEY -out PLAIN`, then protect PLAIN with its file mode)")]
    Encrypted,
    #[error("holds {0}")]
    Unsupported(String),
    #[error("holds {found}, but assertion_alg = \"{alg}\" needs {}", alg.wants())]
    WrongAlg { found: String, alg: AssertionAlg },
    #[error("holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate,
    #[error("holds a certificate that does not parse: {0}")]
    BadCertificate(String),
}

/// A private key that signs client assertions. `Debug` shows its kind, never the key.
pub struct PrivateKey {
    inner: Inner,
}

enum Inner {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair, Curve),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

impl Curve {
    fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }

    fn signing(self) -> &'static signature::EcdsaSigningAlgorithm {
        match self {
            Curve::P256 => &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            Curve::P384 => &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        }
    }

    /// Bytes of one coordinate of a public point.
    fn coordinate_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
        }
    }
}

/// The named-curve OIDs of SEC1 `ECParameters` (RFC 5480 §2.1.1.1).
const P256_OID: &str = "1.2.840.10045.3.1.7";
const P384_OID: &str = "1.3.132.0.34";

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("kind", &self.kind())
            .finish_non_exhaustive()
    }
}

/// base64url without padding (RFC 7515 §2), as JWS and JWK want it.
pub(crate) fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl PrivateKey {
    /// Parses the first private key in `pem`: PKCS#8 (RSA or EC), PKCS#1 (RSA) or SEC1
    /// (EC), unencrypted.
    pub fn from_pem(pem: &Secret) -> Result<Self, KeyError> {
        let text = pem.expose();
        let der = match PrivateKeyDer::from_pem_slice(text.as_bytes()) {
            Ok(der) => Zeroizing::new(der),
            Err(_) if text.contains("ENCRYPTED") => return Err(KeyError::Encrypted),
            Err(_) => return Err(KeyError::NoPrivateKey),
        };
        let rng = SystemRandom::new();
        let inner = match &*der {
            PrivateKeyDer::Pkcs1(k) => Inner::Rsa(
                RsaKeyPair::from_der(k.secret_pkcs1_der()).map_err(|e| rsa_rejected(&e))?,
            ),
            PrivateKeyDer::Pkcs8(k) => pkcs8(k.secret_pkcs8_der(), &rng)?,
            PrivateKeyDer::Sec1(k) => sec1(k.secret_sec1_der(), &rng)?,
            _ => return Err(KeyError::NoPrivateKey),
        };
        Ok(PrivateKey { inner })
    }

    /// What kind of key this is, for messages: "an RSA 2048-bit key", "an EC P-256 key".
    pub fn kind(&self) -> String {
        match &self.inner {
            Inner::Rsa(k) => format!("an RSA {}-bit key", k.public().modulus_len() * 8),
            Inner::Ec(_, c) => format!("an EC {} key", c.name()),
        }
    }

    /// The algorithm used when `assertion_alg` is not set: RS384 for RSA (what SMART
    /// Backend Services asks for), ES256 or ES384 by the curve.
    pub fn default_alg(&self) -> AssertionAlg {
        match &self.inner {
            Inner::Rsa(_) => AssertionAlg::Rs384,
            Inner::Ec(_, Curve::P256) => AssertionAlg::Es256,
            Inner::Ec(_, Curve::P384) => AssertionAlg::Es384,
        }
    }

    /// Whether this key signs with `alg`; the error says what it holds and what `alg` needs.
    pub fn check_alg(&self, alg: AssertionAlg) -> Result<(), KeyError> {
        let fits = matches!(
            (&self.inner, alg),
            (Inner::Rsa(_), AssertionAlg::Rs256 | AssertionAlg::Rs384)
                | (Inner::Ec(_, Curve::P256), AssertionAlg::Es256)
                | (Inner::Ec(_, Curve::P384), AssertionAlg::Es384)
        );
        if fits {
            Ok(())
        } else {
            Err(KeyError::WrongAlg {
                found: self.kind(),
                alg,
            })
        }
    }

    /// The JWS signature of `message` with `alg` (RFC 7515 / 7518: PKCS#1 v1.5 for RS*,
    /// the fixed-width r || s for ES*).
    pub fn sign(&self, alg: AssertionAlg, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.check_alg(alg)?;
        let rng = SystemRandom::new();
        let failed = || KeyError::Unsupported("a key ring could not sign with".into());
        match &self.inner {
            Inner::Rsa(k) => {
                let padding: &'static dyn signature::RsaEncoding = match alg {
                    AssertionAlg::Rs256 => &signature::RSA_PKCS1_SHA256,
                    _ => &signature::RSA_PKCS1_SHA384,
                };
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(padding, &rng, message, &mut sig)
                    .map_err(|_| failed())?;
                Ok(sig)
            }
            Inner::Ec(k, _) => Ok(k
                .sign(&rng, message)
                .map_err(|_| failed())?
                .as_ref()
                .to_vec()),
        }
    }

    /// The public key's members as a JWK (RFC 7517/7518 §6): `kty` and `n`, `e` for
    /// RSA; `kty` and `crv`, `x`, `y` for EC.
    fn public_members(&self) -> Vec<(&'static str, String)> {
        match &self.inner {
            Inner::Rsa(k) => {
                let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
                vec![
                    ("e", b64url(&c.e)),
                    ("kty", "RSA".into()),
                    ("n", b64url(&c.n)),
                ]
            }
            Inner::Ec(k, curve) => {
                // The uncompressed point: 0x04 || x || y.
                let point = k.public_key().as_ref();
                let n = curve.coordinate_len();
                vec![
                    ("crv", curve.name().into()),
                    ("kty", "EC".into()),
                    ("x", b64url(&point[1..1 + n])),
                    ("y", b64url(&point[1 + n..1 + 2 * n])),
                ]
            }
        }
    }

    /// A new EC key on P-256 (`p384`: P-384), and its PKCS#8 PEM to keep: the DPoP key
    /// tokend makes when none is configured (RFC 9449 §2).
    pub fn generate_ec(p384: bool) -> Result<(PrivateKey, Secret), KeyError> {
        let curve = if p384 { Curve::P384 } else { Curve::P256 };
        let rng = SystemRandom::new();
        let failed = || KeyError::Unsupported("a key ring could not make".into());
        let der = Zeroizing::new(
            EcdsaKeyPair::generate_pkcs8(curve.signing(), &rng)
                .map_err(|_| failed())?
                .as_ref()
                .to_vec(),
        );
        let body = base64::engine::general_purpose::STANDARD.encode(&*der);
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        let pem = Secret::new(pem);
        Ok((PrivateKey::from_pem(&pem)?, pem))
    }

    /// Whether this is an RSA key (else EC), and for EC whether on P-384.
    pub fn is_rsa(&self) -> bool {
        matches!(self.inner, Inner::Rsa(_))
    }

    /// Whether this is an EC key on P-384.
    pub fn is_p384(&self) -> bool {
        matches!(self.inner, Inner::Ec(_, Curve::P384))
    }

    /// The RSASSA-PSS signature (SHA-256, MGF1, a salt of 32 bytes: JWS `PS256`, RFC 7518
    /// §3.5) of `message`, with an RSA key.
    pub fn sign_ps256(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let Inner::Rsa(k) = &self.inner else {
            return Err(KeyError::Unsupported(format!(
                "{}, but PS256 needs an RSA key",
                self.kind()
            )));
        };
        let mut sig = vec![0; k.public().modulus_len()];
        k.sign(
            &signature::RSA_PSS_SHA256,
            &SystemRandom::new(),
            message,
            &mut sig,
        )
        .map_err(|_| KeyError::Unsupported("a key ring could not sign with".into()))?;
        Ok(sig)
    }

    /// The public key alone as a JWK (RFC 7517): what a DPoP proof's header carries.
    pub fn public_jwk_bare(&self) -> serde_json::Value {
        let mut jwk = serde_json::Map::new();
        for (k, v) in self.public_members() {
            jwk.insert(k.into(), v.into());
        }
        serde_json::Value::Object(jwk)
    }

    /// The RFC 7638 JWK thumbprint (SHA-256, base64url): the `kid` when none is configured.
    pub fn thumbprint(&self) -> String {
        thumbprint(&self.public_members())
    }

    /// The public JWK to register with a provider, with `kid`, `alg` and `use`.
    pub fn public_jwk(&self, kid: &str, alg: AssertionAlg) -> serde_json::Value {
        let mut jwk = serde_json::Map::new();
        for (k, v) in self.public_members() {
            jwk.insert(k.into(), v.into());
        }
        jwk.insert("kid".into(), kid.into());
        jwk.insert("alg".into(), alg.as_str().into());
        jwk.insert("use".into(), "sig".into());
        serde_json::Value::Object(jwk)
    }

    /// The public key as a certificate's SubjectPublicKeyInfo carries it (the RSAPublicKey
    /// DER, or the EC point), to tell whether a certificate is this key's.
    pub fn spki_bits(&self) -> Vec<u8> {
        match &self.inner {
            Inner::Rsa(k) => k.public().as_ref().to_vec(),
            Inner::Ec(k, _) => k.public_key().as_ref().to_vec(),
        }
    }
}

/// RFC 7638 §3: SHA-256 over the required members, sorted by name, without whitespace.
/// The names are fixed and the values base64url: nothing to escape.
fn thumbprint(members: &[(&'static str, String)]) -> String {
    let members: Vec<String> = members
        .iter()
        .map(|(k, v)| format!("\"{k}\":\"{v}\""))
        .collect();
    let canonical = format!("{{{}}}", members.join(","));
    b64url(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
}

fn rsa_rejected(e: &ring::error::KeyRejected) -> KeyError {
    KeyError::Unsupported(match e.to_string().as_str() {
        "TooSmall" => "an RSA key shorter than 2048 bits: too weak to sign with".into(),
        "TooLarge" => "an RSA key longer than ring accepts (over 8192 bits)".into(),
        other => format!("an RSA key that does not load ({other})"),
    })
}

/// A PKCS#8 key: RSA, or EC on P-256 or P-384 (ring knows which from the algorithm
/// identifier and refuses the others as the wrong algorithm).
fn pkcs8(der: &[u8], rng: &SystemRandom) -> Result<Inner, KeyError> {
    match RsaKeyPair::from_pkcs8(der) {
        Ok(k) => return Ok(Inner::Rsa(k)),
        Err(e) if e.to_string() != "WrongAlgorithm" => return Err(rsa_rejected(&e)),
        Err(_) => {}
    }
    for curve in [Curve::P256, Curve::P384] {
        match EcdsaKeyPair::from_pkcs8(curve.signing(), der, rng) {
            Ok(k) => return Ok(Inner::Ec(k, curve)),
            Err(e) if e.to_string() == "WrongAlgorithm" => {}
            Err(e) => {
                return Err(KeyError::Unsupported(format!(
                    "an EC {} key that does not load ({e}; a key without its public half is re-written whole by `openssl pkey -in KEY -out FIXED`)",
                    curve.name()
                )))
            }
        }
    }
    Err(KeyError::Unsupported(
        "a key of a kind other than RSA, EC P-256 or EC P-384 (Ed25519, P-521, ...)".into(),
    ))
}

/// A SEC1 `EC PRIVATE KEY` (RFC 5915): the curve from its parameters, the scalar and
/// the public point handed to ring, which checks that they belong together.
fn sec1(der: &[u8], rng: &SystemRandom) -> Result<Inner, KeyError> {
    use sec1::der::Decode as _;
    let key = sec1::EcPrivateKey::from_der(der).map_err(|e| {
        KeyError::Unsupported(format!("an EC PRIVATE KEY that does not parse ({e})"))
    })?;
    let oid = key
        .parameters
        .and_then(|p| p.named_curve())
        .map(|o| o.to_string());
    let curve = match oid.as_deref() {
        Some(P256_OID) => Curve::P256,
        Some(P384_OID) => Curve::P384,
        Some(other) => {
            return Err(KeyError::Unsupported(format!(
                "an EC key on a curve other than P-256 or P-384 (OID {other})"
            )))
        }
        None => {
            return Err(KeyError::Unsupported(
                "an EC PRIVATE KEY that does not name its curve".into(),
            ))
        }
    };
    let Some(public) = key.public_key else {
        return Err(KeyError::Unsupported(format!(
            "an EC {} key without its public half (`openssl ec -in KEY -out FIXED` writes it whole)",
            curve.name()
        )));
    };
    let pair = EcdsaKeyPair::from_private_key_and_public_key(
        curve.signing(),
        key.private_key,
        public,
        rng,
    )
    .map_err(|e| {
        KeyError::Unsupported(format!(
            "an EC {} key whose parts do not load ({e})",
            curve.name()
        ))
    })?;
    Ok(Inner::Ec(pair, curve))
}

/// What `tokend check` needs of a client certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub subject: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The SubjectPublicKeyInfo's key bits (compare with [`PrivateKey::spki_bits`]).
    pub public_key: Vec<u8>,
    /// Certificates in the chain, the leaf first.
    pub chain_len: usize,
}

/// Reads the leaf (the first certificate) of a PEM chain.
pub fn certificate_info(pem: &[u8]) -> Result<CertInfo, KeyError> {
    use x509_cert::der::Decode as _;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| KeyError::BadCertificate(e.to_string()))?;
    let leaf = chain.first().ok_or(KeyError::NoCertificate)?;
    let cert = x509_cert::Certificate::from_der(leaf.as_ref())
        .map_err(|e| KeyError::BadCertificate(e.to_string()))?;
    let tbs = &cert.tbs_certificate;
    Ok(CertInfo {
        subject: tbs.subject.to_string(),
        not_before: tbs.validity.not_before.to_system_time(),
        not_after: tbs.validity.not_after.to_system_time(),
        public_key: tbs
            .subject_public_key_info
            .subject_public_key
            .raw_bytes()
            .to_vec(),
        chain_len: chain.len(),
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Keys made once with openssl for these tests (they protect nothing).
    /// `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048` (PKCS#8) ...
    pub(crate) const RSA_PKCS8: &str = include_str!("../../tests/keys/rsa-pkcs8.pem");
    /// ... the same key as PKCS#1 (`openssl pkey -traditional`) ...
    pub(crate) const RSA_PKCS1: &str = include_str!("../../tests/keys/rsa-pkcs1.pem");
    /// `openssl ecparam -name prime256v1 -genkey -noout` (SEC1) ...
    pub(crate) const P256_SEC1: &str = include_str!("../../tests/keys/p256-sec1.pem");
    /// ... the same key as PKCS#8.
    pub(crate) const P256_PKCS8: &str = include_str!("../../tests/keys/p256-pkcs8.pem");
    /// `openssl ecparam -name secp384r1 -genkey -noout` (SEC1) ...
    pub(crate) const P384_SEC1: &str = include_str!("../../tests/keys/p384-sec1.pem");
    /// ... the same key as PKCS#8.
    pub(crate) const P384_PKCS8: &str = include_str!("../../tests/keys/p384-pkcs8.pem");
    /// An Ed25519 key (PKCS#8): a kind tokend does not sign with.
    pub(crate) const ED25519: &str = include_str!("../../tests/keys/ed25519.pem");

    pub(crate) fn key(pem: &str) -> PrivateKey {
        PrivateKey::from_pem(&Secret::new(pem)).unwrap()
    }

    #[test]
    fn every_format_of_the_same_key_is_the_same_key() {
        for (a, b, kind) in [
            (RSA_PKCS8, RSA_PKCS1, "an RSA 2048-bit key"),
            (P256_SEC1, P256_PKCS8, "an EC P-256 key"),
            (P384_SEC1, P384_PKCS8, "an EC P-384 key"),
        ] {
            let (a, b) = (key(a), key(b));
            assert_eq!(a.kind(), kind);
            assert_eq!(a.thumbprint(), b.thumbprint(), "{kind}");
            assert_eq!(a.spki_bits(), b.spki_bits(), "{kind}");
        }
    }

    #[test]
    fn algorithms_fit_their_keys_only() {
        let rsa = key(RSA_PKCS8);
        let p256 = key(P256_SEC1);
        let p384 = key(P384_PKCS8);
        assert_eq!(rsa.default_alg(), AssertionAlg::Rs384);
        assert_eq!(p256.default_alg(), AssertionAlg::Es256);
        assert_eq!(p384.default_alg(), AssertionAlg::Es384);
        assert!(rsa.check_alg(AssertionAlg::Rs256).is_ok());
        let e = p256.check_alg(AssertionAlg::Es384).unwrap_err();
        assert_eq!(
            e.to_string(),
            "holds an EC P-256 key, but assertion_alg = \"ES384\" needs an EC P-384 key"
        );
        assert!(rsa.check_alg(AssertionAlg::Es256).is_err());
        assert!(p384.sign(AssertionAlg::Rs384, b"x").is_err());
    }

    #[test]
    fn unusable_keys_say_why_and_show_nothing_of_the_key() {
        let e = PrivateKey::from_pem(&Secret::new(ED25519)).unwrap_err();
        assert!(e.to_string().contains("Ed25519"), "{e}");
        let e = PrivateKey::from_pem(&Secret::new("not a key")).unwrap_err();
        assert_eq!(e, KeyError::NoPrivateKey);
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert_eq!(
            PrivateKey::from_pem(&Secret::new(encrypted)).unwrap_err(),
            KeyError::Encrypted
        );
        // A key whose body is damaged: an error, no panic, no key bytes in it.
        let body: String = RSA_PKCS1.lines().nth(3).unwrap().to_owned();
        let damaged = RSA_PKCS1.replace(&body, &"A".repeat(body.len()));
        let e = PrivateKey::from_pem(&Secret::new(damaged)).unwrap_err();
        assert!(!e.to_string().contains(&body[..20]), "{e}");
    }

    #[test]
    fn debug_of_a_key_shows_its_kind_only() {
        for pem in [RSA_PKCS8, RSA_PKCS1, P256_SEC1, P384_PKCS8] {
            let k = key(pem);
            let dbg = format!("{k:?}");
            assert!(dbg.starts_with("PrivateKey { kind: \"an "), "{dbg}");
            for line in pem.lines().filter(|l| !l.starts_with("-----")) {
                assert!(!dbg.contains(&line[..16]), "{dbg}");
            }
        }
    }

    #[test]
    fn public_jwks_carry_kid_alg_and_the_public_members_only() {
        let rsa = key(RSA_PKCS1).public_jwk("k1", AssertionAlg::Rs384);
        assert_eq!(rsa["kty"], "RSA");
        assert_eq!(rsa["e"], "AQAB");
        assert_eq!(rsa["kid"], "k1");
        assert_eq!(rsa["alg"], "RS384");
        assert!(rsa.get("d").is_none() && rsa.get("p").is_none());
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(rsa["n"].as_str().unwrap())
            .unwrap();
        assert_eq!(n.len(), 256);
        let ec = key(P384_SEC1).public_jwk("k2", AssertionAlg::Es384);
        assert_eq!(
            (ec["kty"].as_str(), ec["crv"].as_str()),
            (Some("EC"), Some("P-384"))
        );
        for c in ["x", "y"] {
            let v = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(ec[c].as_str().unwrap())
                .unwrap();
            assert_eq!(v.len(), 48);
        }
        assert!(ec.get("d").is_none());
    }

    #[test]
    fn thumbprint_follows_rfc_7638() {
        // RFC 7638 §3.1's example key and thumbprint.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        let members = [
            ("e", "AQAB".to_owned()),
            ("kty", "RSA".to_owned()),
            ("n", n.to_owned()),
        ];
        assert_eq!(
            thumbprint(&members),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
        // Ours is of that shape: 43 characters of base64url.
        let t = key(P256_SEC1).thumbprint();
        assert_eq!(t.len(), 43);
    }

    #[test]
    fn certificates_tell_their_validity_and_key() {
        let cert = include_str!("../../tests/keys/p256-cert.pem");
        let info = certificate_info(cert.as_bytes()).unwrap();
        assert_eq!(info.subject, "CN=tokend-test-client");
        assert_eq!(info.public_key, key(P256_SEC1).spki_bits());
        assert!(info.not_after > info.not_before);
        assert_eq!(
            certificate_info(b"nothing").unwrap_err(),
            KeyError::NoCertificate
        );
        let broken = "-----BEGIN CERTIFICATE-----\nMIIBAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            certificate_info(broken.as_bytes()),
            Err(KeyError::BadCertificate(_))
        ));
    }
}
