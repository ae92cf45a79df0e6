//! Cluster mode (SPEC §8): tokend instances that share an etcd cluster and a `prefix`
//! share their accounts, one member refreshing each and every member publishing the
//! same token; or the members of one Kubernetes namespace, through a Lease and a Secret
//! per account (`kubernetes`). The seam both stores implement (`backend`); an etcd v3
//! client over the JSON gateway (`etcd`), the sealed shared record and keyed account paths (`record`), this member's key check, lease, watch and
//! elections (`member`), what it remembers across restarts (`memory`), and the account
//! layer's coordinator built on them: the fenced refresh protocol (`coordinate`). The
//! refresh engine does the refreshing; this layer only decides who, and carries the
//! result to the others.

pub mod backend;
pub mod coordinate;
pub mod etcd;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod member;
pub mod memory;
pub mod record;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::ClusterConfig;

/// How long one etcd call may take on one endpoint before the next is tried: a member
/// without quorum, or one that hangs, does not answer, and the lease must be renewed
/// through another before it lapses (a renewal every third of its time to live, so a
/// quarter of it is left for one endpoint that does not answer).
pub fn attempt_timeout(lease_ttl: Duration) -> Duration {
    (lease_ttl / 4).clamp(Duration::from_millis(250), Duration::from_millis(1500))
}

/// This tokend in its cluster, on the backend `[cluster]` names.
#[derive(Debug, Clone)]
pub enum Joined {
    Etcd(Arc<member::Member>),
    #[cfg(feature = "kubernetes")]
    Kubernetes(Arc<kubernetes::KubeMember>),
}

impl Joined {
    /// The coordinator of `account`'s refreshes in this cluster.
    pub fn coordinator(
        &self,
        account: Arc<crate::config::Account>,
        on_loss: crate::config::OnClusterLoss,
    ) -> Box<dyn crate::account::coordinator::Coordinator> {
        let identity = crate::account::identity::RequestIdentity::of(&account);
        match self {
            Joined::Etcd(m) => Box::new(coordinate::Seated::new(
                m.seat(&account.name, &identity),
                account,
                on_loss,
            )),
            #[cfg(feature = "kubernetes")]
            Joined::Kubernetes(m) => Box::new(coordinate::Seated::new(
                m.seat(&account.name, &identity),
                account,
                on_loss,
            )),
        }
    }
}

/// Joins the cluster `config` describes, until `cancel`. What the member remembers
/// across restarts lives under `state_dir`.
pub fn join(
    config: &ClusterConfig,
    state_dir: Option<&std::path::Path>,
    clock: Clock,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<Joined> {
    #[cfg(not(feature = "kubernetes"))]
    if config.backend == crate::config::ClusterBackend::Kubernetes {
        anyhow::bail!("{WITHOUT_KUBERNETES}");
    }
    #[cfg(feature = "kubernetes")]
    if config.backend == crate::config::ClusterBackend::Kubernetes {
        let (kube, key) = connect_kubernetes(config)?;
        tracing::info!(member = %config.member, namespace = %kube.namespace(), "joining the cluster on the Kubernetes API");
        return Ok(Joined::Kubernetes(kubernetes::KubeMember::start(
            kube,
            settings(config, key, clock, state_dir),
            cancel,
            tracker,
        )));
    }
    let (etcd, key) = connect(config, clock)?;
    tracing::info!(member = %config.member, prefix = %config.prefix, "joining the cluster");
    Ok(Joined::Etcd(member::Member::start(
        etcd,
        settings(config, key, clock, state_dir),
        cancel,
        tracker,
    )))
}

/// What a member is made of, on either backend.
fn settings(
    config: &ClusterConfig,
    key: record::ClusterKey,
    clock: Clock,
    state_dir: Option<&std::path::Path>,
) -> backend::Settings {
    backend::Settings {
        key,
        prefix: config.prefix.clone(),
        name: config.member.clone(),
        ttl: config.lease_ttl,
        clock,
        memory: memory::Memory::new(state_dir),
    }
}

/// For `tokend check`: reads the cluster's prefix once. Says how many accounts the
/// cluster shares, or why this member would not take part (etcd out of reach, or a key
/// that is not the cluster's).
pub async fn probe(config: &ClusterConfig) -> anyhow::Result<String> {
    #[cfg(not(feature = "kubernetes"))]
    if config.backend == crate::config::ClusterBackend::Kubernetes {
        anyhow::bail!("{WITHOUT_KUBERNETES}");
    }
    #[cfg(feature = "kubernetes")]
    if config.backend == crate::config::ClusterBackend::Kubernetes {
        let (kube, _) = connect_kubernetes(config)?;
        let selector = format!(
            "{}={}",
            kubernetes::client::MANAGED_BY.0,
            kubernetes::client::MANAGED_BY.1
        );
        let (leases, _) = kube
            .list::<kubernetes::client::Lease>(kubernetes::client::Resource::Leases, &selector)
            .await?;
        return Ok(format!(
            "the Kubernetes API server is reachable; {} Lease(s) of tokend in namespace {}",
            leases.len(),
            kube.namespace()
        ));
    }
    let (etcd, key) = connect(config, Clock::System)?;
    let prefix = config.prefix.trim_end_matches('/');
    let (kvs, _) = etcd.get_prefix(&format!("{prefix}/")).await?;
    if let Some(check) = kvs.iter().find(|kv| kv.key == format!("{prefix}/keycheck")) {
        if !key.opens_check(prefix, &check.value) {
            anyhow::bail!("{}", member::mismatch_message(prefix));
        }
    }
    let leaders = kvs.iter().filter(|kv| kv.key.ends_with("/leader")).count();
    let mut line =
        format!("etcd reachable; {leaders} shared account(s) have a leader under {prefix}");
    if let Some(off) = etcd.backend_clock().offset_ms() {
        let off = std::time::Duration::from_millis(off.unsigned_abs());
        if off > member::SKEW_LIMIT {
            line.push_str(&format!(
                "; this host's clock is off etcd's by {}",
                humantime::format_duration(std::time::Duration::from_secs(off.as_secs()))
            ));
        }
    }
    Ok(line)
}

/// The cluster key `config` names.
fn cluster_key(config: &ClusterConfig) -> anyhow::Result<record::ClusterKey> {
    let key_text = config
        .key
        .read()
        .with_context(|| format!("cluster.key from {}", config.key.describe()))?;
    record::ClusterKey::from_hex(key_text.expose())
        .with_context(|| format!("cluster.key from {}", config.key.describe()))
}

#[cfg(not(feature = "kubernetes"))]
const WITHOUT_KUBERNETES: &str = "cluster.backend = \"kubernetes\": this tokend was built without the Kubernetes backend (cargo feature \"kubernetes\")";

/// The Kubernetes client and the record key `config` describes: a kubeconfig's current
/// context, else the pod's service account.
#[cfg(feature = "kubernetes")]
fn connect_kubernetes(
    config: &ClusterConfig,
) -> anyhow::Result<(kubernetes::client::Kube, record::ClusterKey)> {
    let key = cluster_key(config)?;
    let conn = match &config.kubeconfig {
        Some(path) => {
            kubernetes::client::Connection::from_kubeconfig(path, config.namespace.as_deref())?
        }
        None => kubernetes::client::Connection::in_cluster(config.namespace.as_deref())?,
    };
    let kube = kubernetes::client::Kube::new(conn, attempt_timeout(config.lease_ttl))?;
    Ok((kube, key))
}

/// The etcd client and the record key `config` describes.
fn connect(
    config: &ClusterConfig,
    clock: Clock,
) -> anyhow::Result<(etcd::Etcd, record::ClusterKey)> {
    let key = cluster_key(config)?;
    let attempt = attempt_timeout(config.lease_ttl);
    let mut b = reqwest::Client::builder()
        .connect_timeout(attempt)
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
    Ok((
        etcd::Etcd::new(client, config.endpoints.clone(), auth, attempt, clock),
        key,
    ))
}
