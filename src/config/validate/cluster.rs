//! `[cluster]` (SPEC §8): the etcd members, the key prefix, this member's name, the lease,
//! the shared record key and what to do without etcd; and [`parse_hex_key`], the one
//! reading of a cluster key's 64 hex digits, which the cluster layer builds its
//! `ClusterKey` from.
//!
//! Nothing here talks to etcd or reads a key file: a key written inline is checked
//! here, one in a file when the cluster starts. The host name (the default `member`)
//! comes from the parse's [`Host`](super::Host).

use std::time::Duration;

use zeroize::Zeroizing;

use super::{valid_name, Ctx};
use crate::config::raw::{RawCluster, S};
use crate::config::secret::SecretSpec;
use crate::config::{ClusterBackend, ClusterConfig, OnClusterLoss};

/// What is wrong with the text of a cluster key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClusterKeyError {
    #[error("the cluster key must be 64 hex digits (32 bytes, `openssl rand -hex 32`); this one has {0} characters")]
    Length(usize),
    #[error("the cluster key must be hex digits only (0-9, a-f)")]
    NotHex,
}

/// The cluster's shared key: 64 hex digits (surrounding whitespace ignored) into its 32
/// bytes, zeroed when dropped.
pub fn parse_hex_key(text: &str) -> Result<Zeroizing<[u8; 32]>, ClusterKeyError> {
    let t = text.trim();
    if t.len() != 64 {
        return Err(ClusterKeyError::Length(t.chars().count()));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    for (i, pair) in t.as_bytes().chunks(2).enumerate() {
        let digit = |b: u8| (b as char).to_digit(16).ok_or(ClusterKeyError::NotHex);
        key[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Ok(key)
}

/// `[cluster]` (SPEC §8); `None` (with errors reported) when it cannot be used.
pub(super) fn cluster(cx: &mut Ctx<'_>, raw: RawCluster) -> Option<ClusterConfig> {
    let at = |s: &Option<S<String>>| s.as_ref().map_or(0..0, |v| v.span());
    let backend = match raw.backend.as_ref().map(|b| b.get_ref().as_str()) {
        None | Some("etcd") => ClusterBackend::Etcd,
        Some("kubernetes") => ClusterBackend::Kubernetes,
        Some(_) => {
            cx.err(
                at(&raw.backend),
                "cluster.backend",
                "\"etcd\" or \"kubernetes\"",
            );
            ClusterBackend::Etcd
        }
    };
    let (endpoints, prefix) = backend_keys(cx, &raw, backend);
    let member = member(cx, &raw);
    let lease_ttl = cx.duration(&raw.lease_ttl, "cluster.lease_ttl", Duration::from_secs(10));
    if lease_ttl < Duration::from_secs(2) {
        cx.err(at(&raw.lease_ttl), "cluster.lease_ttl", "at least 2s");
    }
    let key = key(cx, &raw);
    let on_cluster_loss = cx.choice(
        &raw.on_cluster_loss,
        "cluster.on_cluster_loss",
        &[
            ("refresh", OnClusterLoss::Refresh),
            ("wait", OnClusterLoss::Wait),
        ],
        OnClusterLoss::Refresh,
    );
    let key_file = raw
        .key_file
        .as_ref()
        .and_then(|k| cx.secret(k, "cluster.key_file"));
    let password = raw
        .password
        .as_ref()
        .and_then(|p| cx.secret(p, "cluster.password"));
    Some(ClusterConfig {
        backend,
        namespace: raw.namespace.as_ref().map(|n| n.get_ref().clone()),
        kubeconfig: raw.kubeconfig.as_ref().map(|p| cx.path(p.get_ref())),
        endpoints,
        prefix,
        member,
        lease_ttl,
        key: key?,
        ca_file: raw.ca_file.as_ref().map(|p| cx.path(p.get_ref())),
        cert_file: raw.cert_file.as_ref().map(|p| cx.path(p.get_ref())),
        key_file,
        username: raw.username.map(|u| u.into_inner()),
        password,
        on_cluster_loss,
    })
}

/// The keys of one backend only: those of the other refused; the endpoints and the key
/// prefix of `backend`.
fn backend_keys(
    cx: &mut Ctx<'_>,
    raw: &RawCluster,
    backend: ClusterBackend,
) -> (Vec<url::Url>, String) {
    match backend {
        ClusterBackend::Etcd => {
            for (k, set) in [
                ("cluster.namespace", raw.namespace.is_some()),
                ("cluster.kubeconfig", raw.kubeconfig.is_some()),
            ] {
                if set {
                    cx.err(0..0, k, "only with backend = \"kubernetes\"");
                }
            }
            (endpoints(cx, raw), prefix(cx, raw))
        }
        ClusterBackend::Kubernetes => {
            let etcd_only = [
                (
                    "cluster.endpoints",
                    raw.endpoints.as_ref().map(|v| v.span()),
                ),
                ("cluster.ca_file", raw.ca_file.as_ref().map(|v| v.span())),
                (
                    "cluster.cert_file",
                    raw.cert_file.as_ref().map(|v| v.span()),
                ),
                ("cluster.key_file", raw.key_file.as_ref().map(|v| v.span())),
                ("cluster.username", raw.username.as_ref().map(|v| v.span())),
                ("cluster.password", raw.password.as_ref().map(|v| v.span())),
            ];
            for (k, span) in etcd_only {
                if let Some(span) = span {
                    cx.err(span, k, "only with backend = \"etcd\" (the Kubernetes backend reaches the API server in-cluster or through `kubeconfig`)");
                }
            }
            if let Some(ns) = &raw.namespace {
                if !dns_label(ns.get_ref()) {
                    cx.err(ns.span(), "cluster.namespace", "a Kubernetes namespace: 1 to 63 of a-z 0-9 -, starting and ending with a letter or digit");
                }
            }
            // Members with the same prefix share accounts; the Kubernetes backend's
            // objects are named by a digest of it, so one namespace may hold several.
            let prefix = if raw.prefix.is_some() {
                prefix(cx, raw)
            } else {
                "/tokend".to_owned()
            };
            (Vec::new(), prefix)
        }
    }
}

/// A Kubernetes namespace's name (RFC 1123 label).
fn dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// `endpoints`: at least one, each an http:// or https:// URL.
fn endpoints(cx: &mut Ctx<'_>, raw: &RawCluster) -> Vec<url::Url> {
    let mut endpoints = Vec::new();
    match &raw.endpoints {
        Some(e) if !e.get_ref().is_empty() => {
            for u in e.get_ref() {
                match url::Url::parse(u) {
                    Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
                        endpoints.push(url)
                    }
                    _ => cx.err(
                        e.span(),
                        "cluster.endpoints",
                        format!("{u:?} is not an http:// or https:// URL of an etcd member"),
                    ),
                }
            }
        }
        Some(e) => cx.err(
            e.span(),
            "cluster.endpoints",
            "name at least one etcd member",
        ),
        None => cx.err(
            0..0,
            "cluster.endpoints",
            "missing key \"endpoints\" (the etcd members' client URLs)",
        ),
    }
    endpoints
}

/// `prefix`: an etcd key prefix, stored without a trailing `/`.
fn prefix(cx: &mut Ctx<'_>, raw: &RawCluster) -> String {
    match &raw.prefix {
        Some(p) if p.get_ref().starts_with('/') && p.get_ref().len() > 1 => {
            p.get_ref().trim_end_matches('/').to_owned()
        }
        Some(p) => {
            cx.err(
                p.span(),
                "cluster.prefix",
                "an etcd key prefix such as \"/tokend/prod\"",
            );
            String::new()
        }
        None => {
            cx.err(
                0..0,
                "cluster.prefix",
                "missing key \"prefix\" (members with the same prefix share accounts)",
            );
            String::new()
        }
    }
}

/// `member`: this member's name; unset, the host's name (if it is a valid one) or
/// "tokend".
fn member(cx: &mut Ctx<'_>, raw: &RawCluster) -> String {
    match &raw.member {
        Some(m) if valid_name(m.get_ref()) => m.get_ref().clone(),
        Some(m) => {
            cx.err(m.span(), "cluster.member", "1 to 64 of A-Z a-z 0-9 . _ -");
            String::new()
        }
        None => cx
            .host
            .hostname()
            .filter(|h| valid_name(h))
            .unwrap_or_else(|| "tokend".into()),
    }
}

/// `key`: a secret; written inline, it must be 64 hex digits (and the error does not
/// show it).
fn key(cx: &mut Ctx<'_>, raw: &RawCluster) -> Option<SecretSpec> {
    let Some(k) = &raw.key else {
        cx.err(
            0..0,
            "cluster.key",
            "missing key \"key\" (64 hex digits, the same on every member: openssl rand -hex 32)",
        );
        return None;
    };
    let spec = cx.secret(k, "cluster.key");
    if let Some(Ok(v)) = spec
        .as_ref()
        .filter(|s| s.is_inline())
        .map(SecretSpec::read)
    {
        if let Err(e) = parse_hex_key(v.expose()) {
            cx.err(k.span(), "cluster.key", e.to_string());
        }
    }
    spec
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::tests::{OUT, REF_SECRET};
    use super::*;
    use crate::config::parse_str;

    #[test]
    fn cluster_section_is_checked_with_line_and_key() {
        let out = OUT;
        let good = format!(
            "[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"/tokend/t\"\n\
             member = \"m1\"\nkey = \"{}\"\n\n{REF_SECRET}{out}",
            "ab".repeat(32)
        );
        let c = parse_str(&good, Path::new("/c.toml")).unwrap();
        let cl = c.cluster.as_ref().unwrap();
        assert_eq!(
            (cl.member.as_str(), cl.prefix.as_str()),
            ("m1", "/tokend/t")
        );
        assert_eq!(cl.lease_ttl, Duration::from_secs(10));
        assert!(c.accounts[0].cluster, "accounts take part by default");
        let opted_out = good.replace("client_id = \"id\"", "client_id = \"id\"\ncluster = false");
        assert!(
            !parse_str(&opted_out, Path::new("/c.toml"))
                .unwrap()
                .accounts[0]
                .cluster
        );
        assert!(
            !parse_str(&format!("{REF_SECRET}{out}"), Path::new("/c.toml"))
                .unwrap()
                .accounts[0]
                .cluster
        );

        let short_key = good.replace(&"ab".repeat(32), "abcd");
        let e = parse_str(&short_key, Path::new("/c.toml"))
            .unwrap_err()
            .0
            .remove(0);
        assert_eq!(
            (e.key.as_str(), e.line, e.column),
            ("cluster.key", 5, 7),
            "{e}"
        );
        assert!(e.message.contains("64 hex digits"), "{e}");
        assert!(!e.to_string().contains("abcd"), "the key is a secret: {e}");
        let bad = good
            .replace("http://127.0.0.1:2379", "etcd:2379")
            .replace("\"/tokend/t\"", "\"tokend\"")
            .replace(
                "member = \"m1\"\n",
                "member = \"m 1\"\nlease_ttl = \"1s\"\n",
            );
        let errs = parse_str(&bad, Path::new("/c.toml")).unwrap_err().0;
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "cluster.endpoints",
            "cluster.prefix",
            "cluster.member",
            "cluster.lease_ttl",
        ] {
            assert!(keys.contains(&k), "{k} in {keys:?}");
        }
    }

    #[test]
    fn the_kubernetes_backend_takes_a_namespace_and_a_kubeconfig_and_no_etcd_keys() {
        let out = OUT;
        let key = "ab".repeat(32);
        let good = format!(
            "[cluster]\nbackend = \"kubernetes\"\nnamespace = \"payments\"\n\
             kubeconfig = \"kube\"\nmember = \"m1\"\nkey = \"{key}\"\n\n{REF_SECRET}{out}"
        );
        let c = parse_str(&good, Path::new("/etc/tokend/c.toml")).unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(cl.backend, ClusterBackend::Kubernetes);
        assert_eq!(cl.namespace.as_deref(), Some("payments"));
        assert_eq!(
            cl.kubeconfig.as_deref(),
            Some(Path::new("/etc/tokend/kube"))
        );
        assert_eq!(
            cl.prefix, "/tokend",
            "members of a namespace share by default"
        );
        assert!(cl.endpoints.is_empty());

        let bad = good.replace("\"payments\"", "\"Payments_1\"").replace(
            "member = ",
            "endpoints = [\"http://127.0.0.1:2379\"]\nmember = ",
        );
        let errs = parse_str(&bad, Path::new("/c.toml")).unwrap_err().0;
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["cluster.namespace", "cluster.endpoints"], "{errs:?}");

        let etcd = format!(
            "[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"/t\"\n\
             namespace = \"payments\"\nkey = \"{key}\"\n\n{REF_SECRET}{out}"
        );
        let errs = parse_str(&etcd, Path::new("/c.toml")).unwrap_err().0;
        assert_eq!(errs[0].key, "cluster.namespace");
        let other = good.replace("\"kubernetes\"", "\"consul\"");
        let errs = parse_str(&other, Path::new("/c.toml")).unwrap_err().0;
        assert!(errs.iter().any(|e| e.key == "cluster.backend"), "{errs:?}");
    }

    #[test]
    fn a_cluster_key_is_64_hex_digits() {
        let hex = "00ff1122334455667788990aabbccddeeff00112233445566778899aabbccdde";
        let key = parse_hex_key(&format!(" {hex}\n")).unwrap();
        assert_eq!((key[0], key[1], key[2], key[31]), (0x00, 0xff, 0x11, 0xde));
        assert_eq!(
            parse_hex_key("abcd").unwrap_err(),
            ClusterKeyError::Length(4)
        );
        assert_eq!(
            parse_hex_key(&"é".repeat(10)).unwrap_err(),
            ClusterKeyError::Length(10),
            "characters counted, not bytes"
        );
        assert_eq!(
            parse_hex_key(&"é".repeat(32)).unwrap_err(),
            ClusterKeyError::NotHex
        );
        assert_eq!(
            parse_hex_key(&hex.replace('a', "g")).unwrap_err(),
            ClusterKeyError::NotHex
        );
        assert_eq!(parse_hex_key(&"AB".repeat(32)).unwrap()[5], 0xab);
    }
}
