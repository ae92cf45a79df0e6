//! The serde mirror of the config file: every section as written, with spans, unknown keys
//! rejected. Values that need checking (durations, modes, enums, secrets) stay loose here
//! so that `validate` can report every problem at once, with its line and column.
//!
//! Nothing here derives `Debug`: an inline secret lives in these structs.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub(crate) type S<T> = Spanned<T>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDaemon {
    pub socket: Option<S<String>>,
    pub socket_mode: Option<S<toml::Value>>,
    pub socket_group: Option<S<String>>,
    pub state_dir: Option<S<String>>,
    pub log_format: Option<S<String>>,
    pub log_level: Option<S<String>>,
    pub max_concurrent_refreshes: Option<S<i64>>,
    pub startup_timeout: Option<S<String>>,
    pub metrics_listen: Option<S<String>>,
}

/// `[cluster]` (SPEC §8).
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    pub backend: Option<S<String>>,
    pub endpoints: Option<S<Vec<String>>>,
    pub prefix: Option<S<String>>,
    pub member: Option<S<String>>,
    pub lease_ttl: Option<S<String>>,
    pub key: Option<S<toml::Value>>,
    pub ca_file: Option<S<String>>,
    pub cert_file: Option<S<String>>,
    pub key_file: Option<S<toml::Value>>,
    pub username: Option<S<String>>,
    pub password: Option<S<toml::Value>>,
    pub on_cluster_loss: Option<S<String>>,
    pub namespace: Option<S<String>>,
    pub kubeconfig: Option<S<String>>,
}

/// One `[[account]]`, and also `[defaults]` (which may not hold `name` or `output`).
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAccount {
    pub name: Option<S<String>>,
    pub token_url: Option<S<String>>,
    /// Instead of `token_url`: discovery from an OpenID / RFC 8414 issuer...
    pub issuer: Option<S<String>>,
    /// ...or from a FHIR server's SMART configuration.
    pub fhir_base: Option<S<String>>,
    pub allow_http: Option<S<bool>>,
    /// `false`: not shared with the cluster even when there is a `[cluster]`.
    pub cluster: Option<S<bool>>,
    pub grant_type: Option<S<String>>,
    pub client_id: Option<S<String>>,
    pub client_secret: Option<S<toml::Value>>,
    pub client_auth: Option<S<String>>,
    pub private_key: Option<S<toml::Value>>,
    pub key_id: Option<S<String>>,
    pub assertion_alg: Option<S<String>>,
    pub assertion_audience: Option<S<String>>,
    pub assertion_lifetime: Option<S<String>>,
    pub client_cert: Option<S<toml::Value>>,
    pub client_key: Option<S<toml::Value>>,
    pub basic_encoding: Option<S<String>>,
    pub params_in: Option<S<String>>,
    pub scope: Option<S<String>>,
    pub username: Option<S<String>>,
    pub password: Option<S<toml::Value>>,
    pub refresh_token: Option<S<toml::Value>>,
    pub extra_params: Option<S<BTreeMap<String, String>>>,
    pub extra_headers: Option<S<BTreeMap<String, String>>>,
    pub ca_file: Option<S<String>>,
    pub proxy: Option<S<String>>,
    pub timeout: Option<S<String>>,
    /// A refresh_token request's own, longer timeout (its answer is the next link).
    pub refresh_token_timeout: Option<S<String>>,

    pub refresh_ratio: Option<S<f64>>,
    pub refresh_every: Option<S<String>>,
    pub min_refresh_interval: Option<S<String>>,
    pub default_lifetime: Option<S<String>>,
    pub auth_failure_hold: Option<S<String>>,
    pub on_expiry: Option<S<String>>,
    pub on_refresh: Option<S<Vec<String>>>,
    pub on_refresh_signal: Option<S<RawSignal>>,
    pub hook_timeout: Option<S<String>>,

    /// `"dpop"`: sender-constrained tokens (RFC 9449); `"bearer"` (the default) not.
    pub token_binding: Option<S<String>>,
    pub dpop_alg: Option<S<String>>,
    pub dpop_key: Option<S<toml::Value>>,

    /// The resource URLs the token is for: credential helpers pick the account by them.
    pub urls: Option<S<Vec<S<String>>>>,
    /// The user name git and container tools send beside the token.
    pub credential_username: Option<S<String>>,

    pub output: Option<Vec<S<RawOutput>>>,
    pub access: Option<S<RawAccess>>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutput {
    pub path: Option<S<String>>,
    pub format: Option<S<String>>,
    pub mode: Option<S<toml::Value>>,
    pub owner: Option<S<toml::Value>>,
    pub group: Option<S<toml::Value>>,
    pub env_var: Option<S<String>>,
}

#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAccess {
    #[serde(default)]
    pub users: Vec<S<toml::Value>>,
    #[serde(default)]
    pub groups: Vec<S<toml::Value>>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSignal {
    pub pid_file: S<String>,
    pub signal: Option<S<String>>,
}

/// The field names serde expects for `T`, read from its derived `Deserialize` impl, so
/// the unknown-key walk and the structs cannot drift apart.
pub(crate) fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);

    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("stop")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }

    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_come_from_the_struct() {
        let names = field_names::<RawOutput>();
        assert_eq!(
            names,
            ["path", "format", "mode", "owner", "group", "env_var"]
        );
        assert!(field_names::<RawAccount>().contains(&"refresh_every"));
    }
}
