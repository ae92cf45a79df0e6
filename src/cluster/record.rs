//! The shared record of a cluster account (SPEC §8) and how it is sealed: the token, the
//! lifetime it had left when written, the rotated refresh token, the hold and rate-limit
//! wait (the engine's [`Portable`] state), who fetched it, its generation and the link in
//! flight, as JSON sealed with AES-256-GCM under the cluster's `key`, bound to the
//! record's etcd key and its place in that key's history (so a record can neither be
//! moved to another account nor put back over a newer one). Also the key check's value,
//! a member's request to the leader, and the keyed digests that name an account (and a
//! chain's seed) in etcd without naming any of its settings in the clear.
//!
//! Nothing here talks to etcd (`etcd`) or decides who refreshes (`coordinate`).

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
        let digest = crate::hex::hex(&tag.as_ref()[..16]);
        format!("{}/accounts/{name}/{digest}", prefix.trim_end_matches('/'))
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &self.0).expect("32 bytes is an AES-256 key"),
        )
    }

    /// A keyed digest of `secret` (the seed of a refresh-token chain), the same on every
    /// member with this key: what tells two identities apart that would start the same
    /// chain, without the seed in etcd.
    pub fn seed_digest(&self, secret: &str) -> String {
        let k = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut ctx = hmac::Context::with_key(&k);
        ctx.update(b"tokend-seed/1\0");
        ctx.update(secret.as_bytes());
        crate::hex::hex(&ctx.sign().as_ref()[..16])
    }

    /// Seals `plain` bound to `aad`: base64 of nonce || ciphertext || tag.
    fn seal_bytes(&self, aad: &[u8], plain: &[u8]) -> String {
        let mut buf = zeroize::Zeroizing::new(plain.to_vec());
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad),
                &mut *buf,
            )
            .expect("AES-GCM seals any record of this size");
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&buf);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// Opens what [`ClusterKey::seal_bytes`] sealed for `aad`.
    fn open_bytes(
        &self,
        aad: &[u8],
        sealed: &str,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, SealError> {
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(sealed.trim())
            .map_err(|_| SealError::Short)?;
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SealError::Short);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let mut buf = zeroize::Zeroizing::new(rest.to_vec());
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Short)?;
        let len = self
            .aead()
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| SealError::Unauthentic)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }

    /// Seals `record` for the etcd key `at`, where it will sit at `place`: the
    /// generation in the clear (`2.<generation>.<sealed>`) and bound, with the key and
    /// its place, into the AEAD's associated data. Put back anywhere else in the key's
    /// history (an older record restored over a newer one), it no longer opens.
    pub fn seal(&self, at: &str, place: Place, record: &Record) -> Vec<u8> {
        let plain = zeroize::Zeroizing::new(
            serde_json::to_vec(record).expect("a record always serializes"),
        );
        let aad = record_aad(at, place, record.generation);
        format!(
            "{RECORD_FORMAT}.{}.{}",
            record.generation,
            self.seal_bytes(&aad, &plain)
        )
        .into_bytes()
    }

    /// Opens what [`ClusterKey::seal`] sealed for `at`, found at `place`. Fails for
    /// another key, another etcd key, another place in the key's history, or any change.
    pub fn open(&self, at: &str, place: Place, value: &[u8]) -> Result<Record, SealError> {
        let text = std::str::from_utf8(value).map_err(|_| SealError::Short)?;
        let mut parts = text.splitn(3, '.');
        let (Some(RECORD_FORMAT), Some(generation), Some(sealed)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(SealError::Format(
                "not a sealed record of this version".into(),
            ));
        };
        let generation: u64 = generation
            .parse()
            .map_err(|_| SealError::Format("no generation".into()))?;
        let plain = self.open_bytes(&record_aad(at, place, generation), sealed)?;
        let record: Record = serde_json::from_slice(&plain)
            .map_err(|e| SealError::Format(format!("{:?}", e.classify())))?;
        if record.generation != generation {
            return Err(SealError::Unauthentic);
        }
        Ok(record)
    }

    /// The value that shows which key a cluster uses (`{prefix}/keycheck`): a fixed
    /// text sealed under the key. A member whose key cannot open it does not take part.
    pub fn seal_check(&self, prefix: &str) -> Vec<u8> {
        self.seal_bytes(&check_aad(prefix), KEY_CHECK).into_bytes()
    }

    /// Whether `value` is [`ClusterKey::seal_check`] of this key.
    pub fn opens_check(&self, prefix: &str, value: &[u8]) -> bool {
        std::str::from_utf8(value)
            .ok()
            .and_then(|v| self.open_bytes(&check_aad(prefix), v).ok())
            .is_some_and(|p| p.as_slice() == KEY_CHECK)
    }

    /// Seals a member's request to the leader, for the etcd key `at`.
    pub fn seal_request(&self, at: &str, request: &LeaderRequest) -> Vec<u8> {
        let plain = serde_json::to_vec(request).expect("a request always serializes");
        self.seal_bytes(&request_aad(at), &plain).into_bytes()
    }

    /// Opens a request sealed by [`ClusterKey::seal_request`] for `at`.
    pub fn open_request(&self, at: &str, value: &[u8]) -> Result<LeaderRequest, SealError> {
        let text = std::str::from_utf8(value).map_err(|_| SealError::Short)?;
        let plain = self.open_bytes(&request_aad(at), text)?;
        serde_json::from_slice(&plain).map_err(|e| SealError::Format(format!("{:?}", e.classify())))
    }
}

/// The version of the sealed record's format (its first field).
const RECORD_FORMAT: &str = "2";

/// What the key check's value holds.
const KEY_CHECK: &[u8] = b"tokend cluster key check";

fn record_aad(at: &str, place: Place, generation: u64) -> Vec<u8> {
    format!(
        "tokend-record/{RECORD_FORMAT}\0{at}\0{}\0{}\0{generation}",
        place.create_revision, place.version
    )
    .into_bytes()
}

fn check_aad(prefix: &str) -> Vec<u8> {
    format!("tokend-key-check/1\0{}", prefix.trim_end_matches('/')).into_bytes()
}

fn request_aad(at: &str) -> Vec<u8> {
    format!("tokend-request/1\0{at}").into_bytes()
}

/// Where a record sits in its etcd key's history: the revision that created the key
/// (a key deleted and created again has another) and how many writes it has had.
/// What a sealed record is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub create_revision: i64,
    pub version: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the shared record is too short to be sealed")]
    Short,
    #[error("the shared record does not open with this cluster key at its place in etcd (another key, altered, or an older record put back)")]
    Unauthentic,
    #[error("the shared record opens but is not a record ({0})")]
    Format(String),
}

/// What members share about one account: the engine's portable state, who fetched the
/// token, a generation that grows with every write, and the fence of the refresh
/// protocol (the link in flight).
#[derive(Serialize, Deserialize, Clone, PartialEq)]
pub struct Record {
    pub generation: u64,
    /// The member that fetched the token.
    pub fetched_by: String,
    pub state: Portable,
    /// How long the token had left when the record was written, in milliseconds: a
    /// member's idea of its expiry is this, on its own clock (never the writer's).
    #[serde(default)]
    pub token_left_ms: Option<u64>,
    /// When the record was written, on the backend's clock (Unix milliseconds), if the
    /// writer knew it: how old the record is when read later.
    #[serde(default)]
    pub written_at_ms: Option<i64>,
    /// The provider's clock minus the backend's (milliseconds), as the writer last saw
    /// the provider's `Date`.
    #[serde(default)]
    pub provider_offset_ms: Option<i64>,
    /// The keyed digest of the seed the chain grew from (refresh_token grant).
    #[serde(default)]
    pub seed: Option<String>,
    /// The link claimed by a member that is (or was) asking the provider with it.
    #[serde(default)]
    pub in_flight: Option<InFlight>,
}

/// A claimed link: who sends it, and how long the others wait for its answer.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct InFlight {
    pub member: String,
    /// This claim's random id (a member that restarts makes new claims).
    pub claim: u64,
    /// How long another member waits, from when it first sees this claim, before it
    /// takes the link over: the request's timeout plus the lease's time to live.
    pub wait_ms: u64,
    /// Set when the claim took over the link of a member that died mid-request.
    #[serde(default)]
    pub after: Option<String>,
}

/// A member's request to the account's leader (`refresh`, `refresh --force`,
/// `get --min-valid` on a member that does not lead).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct LeaderRequest {
    pub member: String,
    /// Random: each request is handled once.
    pub id: u64,
    pub force: bool,
    /// The etcd revision of the record the member held when it asked: a refresh
    /// claimed after it answers the request.
    #[serde(default)]
    pub held: i64,
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
                dpop_key: None,
            },
            token_left_ms: Some(1000),
            written_at_ms: None,
            provider_offset_ms: None,
            seed: None,
            in_flight: None,
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

    const AT: &str = "/p/accounts/a/x/record";
    const PLACE: Place = Place {
        create_revision: 4,
        version: 2,
    };

    #[test]
    fn a_sealed_record_opens_only_with_its_key_at_its_place() {
        let key = ClusterKey::from_hex(HEX).unwrap();
        let sealed = key.seal(AT, PLACE, &record());
        let text = String::from_utf8(sealed.clone()).unwrap();
        assert!(!text.contains("tok-secret"));
        assert!(text.starts_with("2.7."), "{text}");
        assert!(key.open(AT, PLACE, &sealed).unwrap() == record());
        let refused = |at: &str, place: Place, value: &[u8]| key.open(at, place, value).err();
        assert_eq!(
            refused("/p/accounts/b/x/record", PLACE, &sealed),
            Some(SealError::Unauthentic),
            "moved to another account"
        );
        let later = Place {
            version: 3,
            ..PLACE
        };
        assert_eq!(
            refused(AT, later, &sealed),
            Some(SealError::Unauthentic),
            "put back over a newer record"
        );
        let recreated = Place {
            create_revision: 9,
            version: 2,
        };
        assert_eq!(
            refused(AT, recreated, &sealed),
            Some(SealError::Unauthentic),
            "put back after the key was deleted"
        );
        let relabelled = text.replacen("2.7.", "2.8.", 1).into_bytes();
        assert_eq!(
            refused(AT, PLACE, &relabelled),
            Some(SealError::Unauthentic),
            "its generation changed"
        );
        let other = ClusterKey::from_hex(&HEX.replace('0', "1")).unwrap();
        assert_eq!(
            other.open(AT, PLACE, &sealed).err(),
            Some(SealError::Unauthentic)
        );
        let mut tampered = sealed.clone();
        let last = tampered.len() / 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(refused(AT, PLACE, &tampered), Some(SealError::Unauthentic));
        assert_eq!(refused(AT, PLACE, b"2.7.AAAA"), Some(SealError::Short));
        assert!(matches!(
            refused(AT, PLACE, b"old"),
            Some(SealError::Format(_))
        ));
        assert_ne!(
            key.seal(AT, PLACE, &record()),
            sealed,
            "a fresh nonce every time"
        );
    }

    #[test]
    fn the_key_check_opens_with_the_same_key_only() {
        let key = ClusterKey::from_hex(HEX).unwrap();
        let other = ClusterKey::from_hex(&HEX.replace('0', "1")).unwrap();
        let check = key.seal_check("/p");
        assert!(key.opens_check("/p/", &check));
        assert!(!other.opens_check("/p", &check));
        assert!(!key.opens_check("/q", &check), "another prefix's");
        assert!(!key.opens_check("/p", b"junk"));
    }

    #[test]
    fn seed_digests_are_keyed_and_stable() {
        let key = ClusterKey::from_hex(HEX).unwrap();
        let other = ClusterKey::from_hex(&HEX.replace('0', "1")).unwrap();
        assert_eq!(key.seed_digest("rt-seed"), key.seed_digest("rt-seed"));
        assert_ne!(key.seed_digest("rt-seed"), key.seed_digest("rt-seed2"));
        assert_ne!(key.seed_digest("rt-seed"), other.seed_digest("rt-seed"));
        assert!(!key.seed_digest("rt-seed").contains("rt-seed"));
    }
}
