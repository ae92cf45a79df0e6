//! The JSON of etcd's v3 gateway, typed: requests, answers, watch lines, and the
//! base64 and quoted-integer encodings they use.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Compare, Kv, Op};

// ---- The wire: the gateway's JSON, typed ---------------------------------------------

/// Bytes as the gateway writes them: base64.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Bytes64(pub(super) Vec<u8>);

impl Serialize for Bytes64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        B64.decode(s)
            .map(Bytes64)
            .map_err(|_| serde::de::Error::custom("not base64"))
    }
}

impl From<&str> for Bytes64 {
    fn from(s: &str) -> Self {
        Bytes64(s.as_bytes().to_vec())
    }
}

/// A 64-bit number as the gateway writes it: a string (a JSON number is taken too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct I64(pub(super) i64);

impl Serialize for I64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for I64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            S(String),
            N(i64),
        }
        match Either::deserialize(d)? {
            Either::N(n) => Ok(I64(n)),
            Either::S(s) => s
                .parse()
                .map(I64)
                .map_err(|_| serde::de::Error::custom("not a 64-bit number")),
        }
    }
}

#[derive(Deserialize, Default, Debug)]
pub(super) struct ResponseHeader {
    #[serde(default)]
    pub(super) revision: I64,
}

#[derive(Deserialize, Debug)]
pub(super) struct WireKv {
    pub(super) key: Bytes64,
    #[serde(default)]
    pub(super) value: Bytes64,
    #[serde(default)]
    pub(super) create_revision: I64,
    #[serde(default)]
    pub(super) mod_revision: I64,
    #[serde(default)]
    pub(super) version: I64,
    #[serde(default)]
    pub(super) lease: I64,
}

impl WireKv {
    pub(super) fn into_kv(self) -> Option<Kv> {
        Some(Kv {
            key: String::from_utf8(self.key.0).ok()?,
            value: self.value.0,
            create_revision: self.create_revision.0,
            mod_revision: self.mod_revision.0,
            version: self.version.0,
            lease: self.lease.0,
        })
    }
}

#[derive(Serialize, Debug, Default)]
pub(super) struct RangeRequest {
    pub(super) key: Bytes64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) range_end: Option<Bytes64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(super) keys_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) min_mod_revision: Option<I64>,
}

#[derive(Deserialize, Debug)]
pub(super) struct RangeResponse {
    #[serde(default)]
    pub(super) header: ResponseHeader,
    #[serde(default)]
    pub(super) kvs: Vec<WireKv>,
}

#[derive(Serialize, Debug)]
pub(super) struct PutRequest {
    pub(super) key: Bytes64,
    pub(super) value: Bytes64,
    #[serde(skip_serializing_if = "is_zero")]
    pub(super) lease: I64,
}

pub(super) fn is_zero(n: &I64) -> bool {
    n.0 == 0
}

#[derive(Serialize, Debug)]
pub(super) struct DeleteRangeRequest {
    pub(super) key: Bytes64,
}

#[derive(Serialize, Debug)]
pub(super) enum RequestOp {
    #[serde(rename = "request_put")]
    Put(PutRequest),
    #[serde(rename = "request_range")]
    Range(RangeRequest),
    #[serde(rename = "request_delete_range")]
    Delete(DeleteRangeRequest),
}

#[derive(Serialize, Debug)]
pub(super) struct WireCompare {
    pub(super) key: Bytes64,
    pub(super) target: &'static str,
    pub(super) result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) create_revision: Option<I64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) mod_revision: Option<I64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) lease: Option<I64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) value: Option<Bytes64>,
}

impl From<&Compare> for WireCompare {
    fn from(c: &Compare) -> Self {
        let mut w = WireCompare {
            key: Bytes64::default(),
            target: "",
            result: "EQUAL",
            create_revision: None,
            mod_revision: None,
            lease: None,
            value: None,
        };
        match c {
            Compare::Value(k, v) => {
                w.key = k.as_str().into();
                w.target = "VALUE";
                w.value = Some(Bytes64(v.clone()));
            }
            Compare::CreateRevision(k, r) => {
                w.key = k.as_str().into();
                w.target = "CREATE";
                w.create_revision = Some(I64(*r));
            }
            Compare::ModRevision(k, r) => {
                w.key = k.as_str().into();
                w.target = "MOD";
                w.mod_revision = Some(I64(*r));
            }
            Compare::Lease(k, l) => {
                w.key = k.as_str().into();
                w.target = "LEASE";
                w.lease = Some(I64(*l));
            }
        }
        w
    }
}

impl From<&Op> for RequestOp {
    fn from(o: &Op) -> Self {
        match o {
            Op::Put { key, value, lease } => RequestOp::Put(PutRequest {
                key: key.as_str().into(),
                value: Bytes64(value.clone()),
                lease: I64(*lease),
            }),
            Op::Get(key) => RequestOp::Range(RangeRequest {
                key: key.as_str().into(),
                ..RangeRequest::default()
            }),
            Op::Delete(key) => RequestOp::Delete(DeleteRangeRequest {
                key: key.as_str().into(),
            }),
        }
    }
}

#[derive(Serialize, Debug)]
pub(super) struct TxnRequest {
    pub(super) compare: Vec<WireCompare>,
    pub(super) success: Vec<RequestOp>,
    pub(super) failure: Vec<RequestOp>,
}

#[derive(Deserialize, Debug, Default)]
pub(super) struct ResponseOp {
    #[serde(default)]
    pub(super) response_range: Option<RangeResponse>,
}

#[derive(Deserialize, Debug)]
pub(super) struct TxnResponse {
    #[serde(default)]
    pub(super) header: ResponseHeader,
    #[serde(default)]
    pub(super) succeeded: bool,
    #[serde(default)]
    pub(super) responses: Vec<ResponseOp>,
}

#[derive(Serialize, Debug)]
pub(super) struct LeaseGrantRequest {
    #[serde(rename = "TTL")]
    pub(super) ttl: I64,
}

#[derive(Deserialize, Debug)]
pub(super) struct LeaseGrantResponse {
    #[serde(rename = "ID", default)]
    pub(super) id: I64,
    #[serde(rename = "TTL", default)]
    pub(super) ttl: I64,
    #[serde(default)]
    pub(super) error: String,
}

#[derive(Serialize, Debug)]
pub(super) struct LeaseIdRequest {
    #[serde(rename = "ID")]
    pub(super) id: I64,
}

#[derive(Deserialize, Debug)]
pub(super) struct LeaseKeepAliveResponse {
    #[serde(default)]
    pub(super) result: Option<LeaseKeepAliveResult>,
}

#[derive(Deserialize, Debug)]
pub(super) struct LeaseKeepAliveResult {
    #[serde(rename = "TTL", default)]
    pub(super) ttl: I64,
}

#[derive(Serialize, Debug)]
pub(super) struct WatchRequest {
    pub(super) create_request: WatchCreateRequest,
}

#[derive(Serialize, Debug)]
pub(super) struct WatchCreateRequest {
    pub(super) key: Bytes64,
    pub(super) range_end: Bytes64,
    pub(super) start_revision: I64,
}

/// One line of the gateway's watch stream.
#[derive(Deserialize, Debug)]
pub(super) struct WatchLine {
    #[serde(default)]
    pub(super) result: Option<WatchResponse>,
}

#[derive(Deserialize, Debug)]
pub(super) struct WatchResponse {
    #[serde(default)]
    pub(super) header: ResponseHeader,
    #[serde(default)]
    pub(super) canceled: bool,
    #[serde(default)]
    pub(super) compact_revision: I64,
    #[serde(default)]
    pub(super) events: Vec<WireEvent>,
}

#[derive(Deserialize, Debug)]
pub(super) struct WireEvent {
    /// `PUT` is the zero value, left out.
    #[serde(rename = "type", default)]
    pub(super) kind: Option<String>,
    pub(super) kv: WireKv,
}

#[derive(Serialize)]
pub(super) struct AuthRequest<'a> {
    pub(super) name: &'a str,
    pub(super) password: &'a str,
}

#[derive(Deserialize)]
pub(super) struct AuthResponse {
    #[serde(default)]
    pub(super) token: Option<String>,
}

#[derive(Deserialize, Default)]
pub(super) struct ErrorBody {
    #[serde(default)]
    pub(super) message: Option<String>,
    #[serde(default)]
    pub(super) error: Option<String>,
}
