//! The shared record of a cluster account (SPEC §8) and how it is sealed: the token, its
//! expiry, the rotated refresh token, the hold and rate-limit wait (the engine's
//! [`Portable`] state), and who fetched it,
//! as JSON sealed with AES-256-GCM under the cluster's `key` (bound to the record's etcd
//! key, so a record cannot be moved to another account), and the keyed digest that names
//! an account in etcd without naming any of its settings in the clear.
//!
//! Nothing here talks to etcd (`etcd`) or decides who refreshes (`election`).

use std::fmt;

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::account::identity::RequestIdentity;
use crate::account::persist::Portable;

/// The cluster's shared key: 32 random bytes, written as 64 hex digits (`openssl rand
/// -hex 32`). `Debug` shows nothing of it; it is zeroed when dropped.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl Drop for ClusterKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

/// What is wrong with a cluster key's text (read in config, as `cluster.key` is checked).
pub use crate::config::ClusterKeyError as KeyError;

impl ClusterKey {
    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        crate::config::parse_hex_key(text).map(|key| ClusterKey(*key))
    }

    /// The etcd key prefix of one account: `{prefix}/accounts/{name}/{digest}`. Members
    /// share an account only when its name and its request identity (SPEC §8: token_url,
    /// grant_type, client_id, username, scope, extra_params) agree; the digest is keyed,
    /// so etcd learns neither the settings nor whether two clusters' accounts match.
    pub fn account_path(&self, prefix: &str, name: &str, identity: &RequestIdentity) -> String {
        let k = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let encoded = serde_json::to_vec(identity).expect("an identity always serializes");
        let tag = hmac::sign(&k, &encoded);
        let digest: String = tag.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{}/accounts/{name}/{digest}", prefix.trim_end_matches('/'))
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &self.0).expect("32 bytes is an AES-256 key"),
        )
    }

    /// Seals `record` for the etcd key `at`: base64 of nonce || ciphertext || tag.
    pub fn seal(&self, at: &str, record: &Record) -> String {
        let mut buf = zeroize::Zeroizing::new(
            serde_json::to_vec(record).expect("a record always serializes"),
        );
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(at.as_bytes()),
                &mut *buf,
            )
            .expect("AES-GCM seals any record of this size");
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&buf);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// Opens what [`ClusterKey::seal`] sealed for `at`. Fails for another key, another
    /// etcd key, or any change.
    pub fn open(&self, at: &str, sealed: &[u8]) -> Result<Record, SealError> {
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SealError::Short);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let mut buf = zeroize::Zeroizing::new(rest.to_vec());
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Short)?;
        let plain = self
            .aead()
            .open_in_place(nonce, Aad::from(at.as_bytes()), &mut buf)
            .map_err(|_| SealError::Unauthentic)?;
        serde_json::from_slice(plain).map_err(|e| SealError::Format(format!("{:?}", e.classify())))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the shared record is too short to be sealed")]
    Short,
    #[error("the shared record does not open with this cluster key (another key, or altered)")]
    Unauthentic,
    #[error("the shared record opens but is not a record ({0})")]
    Format(String),
}

/// What members share about one account: the engine's portable state, who fetched the
/// token, and a generation that only grows.
#[derive(Serialize, Deserialize, Clone, PartialEq)]
pub struct Record {
    pub generation: u64,
    /// The member that fetched the token.
    pub fetched_by: String,
    pub state: Portable,
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn record() -> Record {
        Record {
            generation: 7,
            fetched_by: "host-a".into(),
            state: Portable {
                token: None,
                refresh_token: Some("tok-secret rt-secret".into()),
                wait: None,
                refusals: 0,
                last_error: None,
            },
        }
    }

    #[test]
    fn keys_are_64_hex_digits() {
        assert!(ClusterKey::from_hex(HEX).is_ok());
        assert!(ClusterKey::from_hex(&format!(" {HEX}\n")).is_ok());
        assert_eq!(
            ClusterKey::from_hex("abcd").unwrap_err(),
            KeyError::Length(4)
        );
        assert_eq!(
            ClusterKey::from_hex(&HEX.replace('a', "g")).unwrap_err(),
            KeyError::NotHex
        );
        assert!(!format!("{:?}", ClusterKey::from_hex(HEX).unwrap()).contains("0011"));
    }

    #[test]
    fn a_sealed_record_opens_only_with_its_key_at_its_place() {
        let key = ClusterKey::from_hex(HEX).unwrap();
        let sealed = key.seal("/p/accounts/a/x", &record());
        assert!(!sealed.contains("tok-secret"));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&sealed)
            .unwrap();
        let back = key.open("/p/accounts/a/x", &bytes).unwrap();
        assert!(back == record());
        assert_eq!(
            key.open("/p/accounts/b/x", &bytes).err(),
            Some(SealError::Unauthentic),
            "moved to another account"
        );
        let other = ClusterKey::from_hex(&HEX.replace('0', "1")).unwrap();
        assert_eq!(
            other.open("/p/accounts/a/x", &bytes).err(),
            Some(SealError::Unauthentic)
        );
        let mut tampered = bytes.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            key.open("/p/accounts/a/x", &tampered).err(),
            Some(SealError::Unauthentic)
        );
        assert_eq!(
            key.open("/p/accounts/a/x", &bytes[..5]).err(),
            Some(SealError::Short)
        );
        assert_ne!(
            key.seal("/p/accounts/a/x", &record()),
            sealed,
            "a fresh nonce every time"
        );
    }
}
