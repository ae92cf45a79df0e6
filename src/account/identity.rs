//! Who an account is, for the decisions that depend on "the same": the request a token
//! was issued for ([`RequestIdentity`]: a saved token is reused only for it), the
//! accounts that may share one request ([`SiblingKey`]), and the credentials a provider
//! refused ([`CredentialsDigest`]: a hold ends when they change).
//!
//! Each is an explicit list of the fields that matter, never a `Debug` string. What is
//! written to disk is a salted SHA-256 over a versioned, length-prefixed encoding:
//! stable across Rust releases, and no offline dictionary on the password (the salt is
//! random per state file).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{
    Account, AssertionConfig, BasicEncoding, ClientAuth, Grant, ParamsIn, Secret, SecretReads,
    SecretSpec,
};
use crate::hex::hex;

/// What a token is issued for: endpoint, grant, client, user, scope and parameters.
/// Holds no secret, so it may be shown and stored as is.
#[derive(Serialize, Deserialize, PartialEq, Eq, Hash, Debug, Clone)]
pub struct RequestIdentity {
    token_url: String,
    /// One of three words: not an allocation of its own unless read from a file.
    grant_type: std::borrow::Cow<'static, str>,
    client_id: String,
    username: Option<String>,
    scope: Option<String>,
    extra_params: Vec<(String, String)>,
    /// `token_binding = "dpop"` and its algorithm (`dpop ES256`): a bearer token is not
    /// one bound to a key, nor one bound to a key of another kind. Absent for a bearer
    /// account, so its saved state and cluster path stay what they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_binding: Option<String>,
}

impl RequestIdentity {
    pub fn of(a: &Account) -> Self {
        RequestIdentity {
            token_url: a.token_url.identity(),
            grant_type: a.grant.as_str().into(),
            client_id: a.client_id.clone(),
            username: match &a.grant {
                Grant::Password { username, .. } => Some(username.clone()),
                _ => None,
            },
            scope: a.scope.clone(),
            extra_params: a
                .options
                .extra_params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            token_binding: a.dpop.as_ref().map(|d| format!("dpop {}", d.alg)),
        }
    }

    /// A digest of the whole identity, for comparisons in memory: what each account's
    /// saved state keeps instead of a copy of it (issue #11).
    pub fn digest(&self) -> [u8; 32] {
        sha256_of_hash(self)
    }
}

/// What makes two accounts' requests identical, so that one request serves both: the
/// request, how the client authenticates, the headers and proxy it goes through, and
/// where its secrets come from. Kept in memory only (header values and the proxy may be
/// credentials); `Debug` shows none of them.
#[derive(PartialEq, Eq, Hash, Clone)]
pub struct SiblingKey {
    request: RequestIdentity,
    client_auth: ClientAuth,
    basic_encoding: BasicEncoding,
    params_in: ParamsIn,
    extra_headers: BTreeMap<String, Secret>,
    proxy: Option<Secret>,
    secrets: Vec<(&'static str, SecretSpec)>,
    /// `private_key_jwt`: the key's source and the assertion's settings.
    assertion: Option<Box<AssertionConfig>>,
    allow_http: bool,
}

impl std::fmt::Debug for SiblingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiblingKey")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

impl SiblingKey {
    /// The key of `a`; none for the refresh_token grant, whose rotation chain is its own,
    /// and for a DPoP-bound account, whose token is bound to its own key.
    pub fn of(a: &Account) -> Option<Self> {
        if matches!(a.grant, Grant::RefreshToken { .. }) || a.dpop.is_some() {
            return None;
        }
        Some(SiblingKey {
            request: RequestIdentity::of(a),
            client_auth: a.client_auth,
            basic_encoding: a.basic_encoding,
            params_in: a.params_in,
            extra_headers: a.options.extra_headers.clone(),
            proxy: a.options.proxy.clone(),
            secrets: a
                .secrets()
                .into_iter()
                .map(|(k, s)| (k, s.clone()))
                .collect(),
            assertion: a.assertion.clone(),
            allow_http: a.allow_http,
        })
    }
}

impl SiblingKey {
    /// A SHA-256 of the whole key (its derived `Hash`, which is prefix-free: strings end
    /// in a marker, sequences start with their length), to find identical accounts
    /// without keeping a copy of each key (issue #11). Kept in memory only.
    pub fn digest(&self) -> [u8; 32] {
        sha256_of_hash(self)
    }
}

/// A SHA-256 of `value`'s derived `Hash`, which is prefix-free (strings end in a marker,
/// sequences start with their length): what tells values apart in memory without a
/// copy of each. Not for files: `Hash` may change between Rust releases.
fn sha256_of_hash<T: std::hash::Hash + ?Sized>(value: &T) -> [u8; 32] {
    struct Sha256(ring::digest::Context);
    impl std::hash::Hasher for Sha256 {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        fn finish(&self) -> u64 {
            unreachable!("only the SHA-256 below is taken")
        }
    }
    let mut h = Sha256(ring::digest::Context::new(&ring::digest::SHA256));
    value.hash(&mut h);
    h.0.finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// Version of the encoding hashed by [`CredentialsDigest`]; a new field means a new
/// version (an old digest then never matches, which ends a hold: the safe direction).
const CREDENTIALS_V: &[u8] = b"tokend-credentials-v1";

/// A salted SHA-256 of everything a provider judges when it refuses a request: the
/// request, the client authentication, headers, proxy and the current secret values.
#[derive(Serialize, Deserialize, PartialEq, Eq, Clone)]
pub struct CredentialsDigest {
    salt: String,
    digest: String,
}

impl std::fmt::Debug for CredentialsDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialsDigest(..)")
    }
}

impl CredentialsDigest {
    /// The digest of `a`'s credentials now (secret files are read), with a fresh salt.
    pub fn of(a: &Account) -> Self {
        let salt: [u8; 16] = rand::random();
        Self::with_salt(a, &hex(&salt))
    }

    /// The digest of `a`'s credentials now, unsalted, as bytes: for comparisons in
    /// memory only (the daemon noticing a changed secret file), where neither a salt
    /// nor hex strings are worth their bytes for each of thousands of accounts.
    /// `reads` holds what this pass over accounts has read so far.
    pub fn in_memory(a: &Account, reads: &mut SecretReads) -> [u8; 32] {
        Self::hash(a, "", reads)
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes")
    }

    fn with_salt(a: &Account, salt: &str) -> Self {
        CredentialsDigest {
            salt: salt.to_owned(),
            digest: hex(Self::hash(a, salt, &mut SecretReads::default()).as_ref()),
        }
    }

    fn hash(a: &Account, salt: &str, reads: &mut SecretReads) -> ring::digest::Digest {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut field = |bytes: &[u8]| {
            ctx.update(&(bytes.len() as u64).to_be_bytes());
            ctx.update(bytes);
        };
        field(CREDENTIALS_V);
        field(salt.as_bytes());
        let r = RequestIdentity::of(a);
        field(r.token_url.as_bytes());
        field(r.grant_type.as_bytes());
        field(r.client_id.as_bytes());
        field(r.username.as_deref().unwrap_or("\0none").as_bytes());
        field(r.scope.as_deref().unwrap_or("\0none").as_bytes());
        field(&(r.extra_params.len() as u64).to_be_bytes());
        for (k, v) in &r.extra_params {
            field(k.as_bytes());
            field(v.as_bytes());
        }
        field(
            format!(
                "{:?}/{:?}/{:?}",
                a.client_auth, a.basic_encoding, a.params_in
            )
            .as_bytes(),
        );
        field(&(a.options.extra_headers.len() as u64).to_be_bytes());
        for (k, v) in &a.options.extra_headers {
            field(k.as_bytes());
            field(v.expose().as_bytes());
        }
        field(
            a.options
                .proxy
                .as_ref()
                .map_or("\0none", |p| p.expose())
                .as_bytes(),
        );
        // Only accounts with an assertion have these fields: the digest of every other
        // account stays what it was (a hold survives the upgrade that added them), and
        // the client_auth above already tells the two encodings apart.
        if let Some(c) = &a.assertion {
            field(c.key_id.as_deref().unwrap_or("\0none").as_bytes());
            field(c.alg.map_or("\0none", |alg| alg.as_str()).as_bytes());
            field(c.audience.as_deref().unwrap_or("\0none").as_bytes());
            field(&c.lifetime.as_secs().to_be_bytes());
        }
        for (what, spec) in a.secrets() {
            field(what.as_bytes());
            match reads.read(spec) {
                Some(v) => field(v.expose().as_bytes()),
                // Unreadable now: a distinct value, so that reading it again is a change.
                None => field(format!("\0unreadable {}", spec.describe()).as_bytes()),
            }
        }
        ctx.finish()
    }

    /// Whether `a`'s credentials now are the ones this digest was taken of.
    pub fn matches(&self, a: &Account) -> bool {
        Self::with_salt(a, &self.salt).digest == self.digest
    }
}

/// A salted SHA-256 of one secret value (the configured seed of a refresh-token chain),
/// to tell later whether the configuration still names the same one.
pub fn secret_digest(salt: &Salt, secret: &Secret) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"tokend-secret-v1\0");
    ctx.update(salt.spelled().as_bytes());
    ctx.update(b"\0");
    ctx.update(secret.expose().as_bytes());
    hex(ctx.finish().as_ref())
}

/// A state file's salt for the digests of the secrets it names ([`secret_digest`]):
/// 16 random bytes, spelled (in the file, and where hashed) as 32 lowercase hex digits.
/// Kept as the bytes: every account holds one for the daemon's life, and as a string it
/// was an allocation of its own, made at each account's first run (issue 21). A salt
/// read in any other spelling is kept as read.
#[derive(Clone, PartialEq, Eq)]
pub enum Salt {
    Bytes([u8; 16]),
    Read(Box<str>),
}

impl Salt {
    /// A fresh random salt.
    pub fn random() -> Self {
        Salt::Bytes(rand::random())
    }

    /// As written in the file and hashed.
    pub fn spelled(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Salt::Bytes(b) => hex(b).into(),
            Salt::Read(s) => (**s).into(),
        }
    }
}

impl From<Box<str>> for Salt {
    fn from(s: Box<str>) -> Self {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut bytes = [0u8; 16];
        let parsed = s.len() == 32
            && s.as_bytes()
                .chunks(2)
                .zip(bytes.iter_mut())
                .all(|(pair, b)| match (digit(pair[0]), digit(pair[1])) {
                    (Some(hi), Some(lo)) => {
                        *b = hi << 4 | lo;
                        true
                    }
                    _ => false,
                });
        if parsed {
            Salt::Bytes(bytes)
        } else {
            Salt::Read(s)
        }
    }
}

impl Serialize for Salt {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.spelled())
    }
}

impl<'de> Deserialize<'de> for Salt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Box::<str>::deserialize(d).map(Salt::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;
    use std::path::Path;

    fn account(extra: &str) -> Account {
        let text = format!(
            "[daemon]\nstate_dir = \"/s\"\n[[account]]\nname = \"a\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\n\
             client_secret = \"s3cret\"\n{extra}\n[[account.output]]\npath = \"/x\"\n"
        );
        parse_str(&text, Path::new("/c.toml"))
            .unwrap()
            .accounts
            .remove(0)
    }

    #[test]
    fn credentials_digest_is_salted_stable_and_sees_every_credential() {
        let a = account("");
        let d = CredentialsDigest::of(&a);
        assert!(d.matches(&a), "stable for the same credentials");
        assert_ne!(
            CredentialsDigest::of(&a).digest,
            d.digest,
            "salted: two digests of one password differ"
        );
        for other in [
            account("scope = \"x\""),
            account("extra_headers = { \"X-Api-Key\" = \"k\" }"),
            account("proxy = \"http://proxy.example:3128\""),
            account("client_auth = \"post\""),
        ] {
            assert!(!d.matches(&other));
        }
        let mut changed = a.clone();
        changed.client_secret = Some(SecretSpec::Inline(Secret::new("other")));
        assert!(!d.matches(&changed), "a new secret value");
        let json = serde_json::to_string(&d).unwrap();
        assert!(!json.contains("s3cret") && !format!("{d:?}").contains("s3cret"));
    }

    #[test]
    fn the_digest_of_fixed_input_does_not_change_between_releases() {
        // Pinned: a change of the encoding must come with a new CREDENTIALS_V.
        let d = CredentialsDigest::with_salt(&account(""), "00");
        assert_eq!(
            d.digest,
            "f13cedab304e03179ad5ac72b612c4b27cdf1855924b0d7fc0685561f809b323"
        );
        assert_eq!(
            secret_digest(&Salt::Read("00".into()), &Secret::new("seed")),
            "881f704c6fc9c59181ad7ba611b61ac5f03b52b02f47af0ad3780023bbfa99a8"
        );
        assert_ne!(
            secret_digest(&Salt::Read("00".into()), &Secret::new("seed")),
            secret_digest(&Salt::Read("01".into()), &Secret::new("seed"))
        );
    }

    #[test]
    fn a_salt_is_kept_as_bytes_and_hashed_and_written_as_its_hex() {
        let salt = Salt::random();
        let written = serde_json::to_string(&salt).unwrap();
        assert_eq!(written.len(), 34, "{written}");
        let read: Salt = serde_json::from_str(&written).unwrap();
        assert!(matches!(read, Salt::Bytes(_)) && read == salt);
        // The bytes hash as the spelling a file holds: digests in files stay valid.
        let spelled = Salt::Read(written.trim_matches('"').into());
        let seed = Secret::new("seed");
        assert_eq!(secret_digest(&read, &seed), secret_digest(&spelled, &seed));
        // Any other spelling is kept as read (and written back the same).
        for other in [
            "00",
            "ABCDEF0123456789ABCDEF0123456789",
            "not hex at all, 32 chars long!!!",
        ] {
            let read: Salt = serde_json::from_str(&format!("{other:?}")).unwrap();
            assert!(matches!(read, Salt::Read(_)), "{other}");
            assert_eq!(serde_json::to_string(&read).unwrap(), format!("{other:?}"));
        }
    }

    #[test]
    fn siblings_share_only_identical_requests_and_never_refresh_token_chains() {
        assert_eq!(SiblingKey::of(&account("")), SiblingKey::of(&account("")));
        assert_ne!(
            SiblingKey::of(&account("")),
            SiblingKey::of(&account("extra_headers = { \"X-Api-Key\" = \"k\" }"))
        );
        let rt = account("grant_type = \"refresh_token\"\nrefresh_token = { env = \"RT\" }");
        assert!(SiblingKey::of(&rt).is_none());
        let dbg = format!(
            "{:?}",
            SiblingKey::of(&account("proxy = \"http://u:pw@p:1\""))
        );
        assert!(!dbg.contains("pw@"), "{dbg}");
    }

    #[test]
    fn a_dpop_bound_request_is_another_request_and_has_no_siblings() {
        let parse = |binding: &str| {
            let text = format!(
                "[daemon]\nsocket = \"/t.sock\"\nstate_dir = \"/s\"\n[[account]]\nname = \"a\"\n\
                 token_url = \"https://idp.example/t\"\nclient_id = \"id\"\nclient_secret = \"s3cret\"\n\
                 urls = [\"https://api.example/\"]\n{binding}\n"
            );
            parse_str(&text, Path::new("/c.toml"))
                .unwrap()
                .accounts
                .remove(0)
        };
        let bearer = parse("");
        let dpop = parse("token_binding = \"dpop\"");
        let p384 = parse("token_binding = \"dpop\"\ndpop_alg = \"ES384\"");
        let ids = [&bearer, &dpop, &p384].map(|a| RequestIdentity::of(a).digest());
        assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
        // A bearer account's identity is written as it always was.
        let json = serde_json::to_value(RequestIdentity::of(&bearer)).unwrap();
        assert!(json.get("token_binding").is_none(), "{json}");
        let json = serde_json::to_value(RequestIdentity::of(&dpop)).unwrap();
        assert_eq!(json["token_binding"], "dpop ES256");
        assert!(SiblingKey::of(&bearer).is_some());
        assert!(
            SiblingKey::of(&dpop).is_none(),
            "each DPoP account has its own key"
        );
    }
}
