//! The wire types of the API objects the backend uses: object metadata, Leases, Secrets
//! (whose data a `Debug` never shows), lists, `Status` answers, watch events; and a
//! Lease's MicroTime. Only shapes and their (de)serialization: the calls that send and
//! receive them are `client`'s.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::errors::KubeError;

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct LeaseSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_duration_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_transitions: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// Items of a list have none.
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: LeaseSpec,
}

impl Lease {
    pub fn new(metadata: ObjectMeta, spec: LeaseSpec) -> Self {
        Lease {
            api_version: "coordination.k8s.io/v1".into(),
            kind: "Lease".into(),
            metadata,
            spec,
        }
    }
}

/// A Secret. Its values are sealed records (never a token in the clear), still kept
/// out of Debug.
#[derive(Serialize, Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
pub struct SecretObject {
    /// Items of a list have none.
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// Base64 values, as the API has them (`null` when empty).
    #[serde(default, deserialize_with = "null_is_empty")]
    pub data: BTreeMap<String, String>,
}

impl std::fmt::Debug for SecretObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretObject")
            .field("metadata", &self.metadata)
            .finish_non_exhaustive()
    }
}

impl SecretObject {
    pub fn new(metadata: ObjectMeta) -> Self {
        SecretObject {
            api_version: "v1".into(),
            kind: "Secret".into(),
            metadata,
            type_: Some("Opaque".into()),
            data: BTreeMap::new(),
        }
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(self.data.get(key)?)
            .ok()
    }

    pub fn set(&mut self, key: &str, value: &[u8]) {
        use base64::Engine as _;
        self.data.insert(
            key.to_owned(),
            base64::engine::general_purpose::STANDARD.encode(value),
        );
    }
}

pub(super) fn null_is_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ListMeta {
    #[serde(default)]
    pub(super) resource_version: String,
}

#[derive(Deserialize)]
pub(super) struct List<T> {
    pub(super) metadata: ListMeta,
    #[serde(default = "Vec::new")]
    pub(super) items: Vec<T>,
}

#[derive(Deserialize, Default)]
pub(super) struct StatusBody {
    #[serde(default)]
    pub(super) message: String,
    #[serde(default)]
    pub(super) reason: String,
    #[serde(default)]
    pub(super) details: Option<StatusDetails>,
}

#[derive(Deserialize, Default)]
pub(super) struct StatusDetails {
    #[serde(default)]
    pub(super) kind: String,
}

#[derive(Deserialize)]
pub(super) struct WireEvent {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) object: serde_json::Value,
}

/// One event of a watch: the object's name, labels and resourceVersion (what the
/// member needs to know which account changed).
#[derive(Debug)]
pub enum WatchEvent {
    Changed {
        name: String,
        labels: BTreeMap<String, String>,
        resource_version: String,
        deleted: bool,
        /// A Lease's `holderIdentity` (empty: released).
        holder: Option<String>,
    },
    /// A bookmark: nothing changed up to this resourceVersion.
    Bookmark(String),
}

/// Why a watch ended.
#[derive(Debug)]
pub enum WatchEnd {
    /// The server closed it (its timeout): go on from the last resourceVersion.
    Closed,
    /// 410 Gone: the resourceVersion is too old; list again.
    Gone,
    Failed(KubeError),
}

/// A Lease's MicroTime now (RFC 3339 with microseconds, UTC).
pub fn micro_time(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    t.format(&f).expect("a UTC time always formats")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn list_items_without_api_version_parse_and_a_secret_hides_its_data() {
        let list = r#"{"metadata":{"resourceVersion":"42"},"items":[{"metadata":{"name":"tokend-x","resourceVersion":"41","uid":"u"},"data":{"record":"c2VhbGVk"}},{"metadata":{"name":"e"},"data":null}]}"#;
        let l: List<SecretObject> = serde_json::from_str(list).unwrap();
        assert_eq!(l.metadata.resource_version, "42");
        assert_eq!(l.items[0].get("record").unwrap(), b"sealed");
        assert!(l.items[1].data.is_empty());
        assert!(!format!("{:?}", l.items[0]).contains("c2VhbGVk"));
        assert_eq!(
            micro_time(SystemTime::UNIX_EPOCH + Duration::from_micros(1_500_000)),
            "1970-01-01T00:00:01.500000Z"
        );
    }
}
