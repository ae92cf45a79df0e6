//! Cluster mode (SPEC §8): tokend instances that share an etcd cluster and a `prefix`
//! share their accounts, one member refreshing each and every member publishing the
//! same token. An etcd v3 client over the JSON gateway (`etcd`), the sealed shared
//! record and keyed account paths (`record`), this member's lease, watch and elections
//! (`member`), and the account layer's coordinator built on them (`coordinate`). The
//! refresh engine does the refreshing; this layer only decides who, and carries the
//! result to the others.

pub mod coordinate;
pub mod etcd;
pub mod member;
pub mod record;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ClusterConfig;

/// How long one etcd call may take before the next member is tried: a member without
/// quorum does not answer, and an account waits on these calls.
const ETCD_TIMEOUT: Duration = Duration::from_millis(1500);

/// Joins the cluster `config` describes, until `cancel`.
pub fn join(
    config: &ClusterConfig,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<Arc<member::Member>> {
    let (etcd, key) = connect(config)?;
    tracing::info!(member = %config.member, prefix = %config.prefix, "joining the cluster");
    Ok(member::Member::start(
        etcd,
        key,
        &config.prefix,
        &config.member,
        config.lease_ttl,
        cancel,
        tracker,
    ))
}

/// For `tokend check`: reads the cluster's prefix once. Says how many accounts the
/// cluster shares, or why etcd cannot be reached.
pub async fn probe(config: &ClusterConfig) -> anyhow::Result<String> {
    let (etcd, _) = connect(config)?;
    let (kvs, _) = etcd
        .get_prefix(&format!("{}/accounts/", config.prefix))
        .await?;
    let leaders = kvs.iter().filter(|kv| kv.key.ends_with("/leader")).count();
    Ok(format!(
        "etcd reachable; {leaders} shared account(s) have a leader under {}",
        config.prefix
    ))
}

/// The etcd client and the record key `config` describes.
fn connect(config: &ClusterConfig) -> anyhow::Result<(etcd::Etcd, record::ClusterKey)> {
    let key_text = config
        .key
        .read()
        .with_context(|| format!("cluster.key from {}", config.key.describe()))?;
    let key = record::ClusterKey::from_hex(key_text.expose())
        .with_context(|| format!("cluster.key from {}", config.key.describe()))?;
    let mut b = reqwest::Client::builder()
        .timeout(ETCD_TIMEOUT)
        .connect_timeout(Duration::from_millis(500))
        .user_agent(concat!("tokend/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &config.ca_file {
        let pem = std::fs::read(ca)
            .with_context(|| format!("failed to read cluster.ca_file {}", ca.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("cluster.ca_file {}", ca.display()))?
        {
            b = b.add_root_certificate(cert);
        }
    }
    match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key_spec)) => {
            let mut pem =
                zeroize::Zeroizing::new(std::fs::read(cert).with_context(|| {
                    format!("failed to read cluster.cert_file {}", cert.display())
                })?);
            let k = key_spec
                .read()
                .with_context(|| format!("cluster.key_file from {}", key_spec.describe()))?;
            pem.push(b'\n');
            pem.extend_from_slice(k.expose().as_bytes());
            // Not the error's text: it may quote the key.
            let id = reqwest::Identity::from_pem(&pem).map_err(|_| {
                anyhow::anyhow!(
                    "cluster.cert_file and cluster.key_file are no PEM certificate and key"
                )
            })?;
            b = b.identity(id);
        }
        (None, None) => {}
        _ => anyhow::bail!("cluster.cert_file and cluster.key_file go together"),
    }
    let client = b
        .build()
        .map_err(|e| anyhow::anyhow!("failed to set up the etcd client: {}", e.without_url()))?;
    let auth = match (&config.username, &config.password) {
        (Some(u), Some(p)) => Some((
            u.clone(),
            p.read()
                .with_context(|| format!("cluster.password from {}", p.describe()))?,
        )),
        (None, None) => None,
        _ => anyhow::bail!("cluster.username and cluster.password go together"),
    };
    Ok((etcd::Etcd::new(client, config.endpoints.clone(), auth), key))
}
