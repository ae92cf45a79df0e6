//! A small typed client of the Kubernetes API for the cluster backend: Leases
//! (`coordination.k8s.io/v1`) and Secrets (`v1`) of one namespace, get, create, update
//! (conditional on `resourceVersion`), list and watch by label; the in-cluster
//! configuration and kubeconfig files; the service account token re-read when its file
//! changes. Over the project's reqwest (rustls), not the kube crate: BENCHMARKS.md
//! ("The Kubernetes backend's client") has the numbers behind that choice.
//!
//! What the cluster does with these objects lives in `super`; nothing here knows of
//! records or elections.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::cluster::etcd::BackendClock;
use crate::config::Secret;

/// Where the in-cluster configuration lives (a pod's service account).
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The label every object of tokend carries.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "tokend");

/// What went wrong talking to the API server. Errors a member's operator must act on
/// say what to do; none of them quotes a token.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("the Kubernetes API server is out of reach: {0}")]
    Unreachable(String),
    #[error("forbidden: this member's service account may not {verb} {resource} in namespace {namespace:?}; apply the Role of packaging/kubernetes/ (verbs get, list, watch, create, update on leases.coordination.k8s.io and secrets) and bind it to the service account (or set cluster.namespace to the namespace the Role is in)")]
    Forbidden {
        verb: &'static str,
        resource: &'static str,
        namespace: String,
    },
    #[error("the API server refused this member's service account token (401 Unauthorized: expired, revoked, or of another cluster)")]
    Unauthorized,
    #[error("namespace {0:?} does not exist on the API server (cluster.namespace)")]
    NoNamespace(String),
    #[error("failed to read the service account token {path}: {reason}")]
    NoToken { path: String, reason: String },
    #[error("failed to read the API server's answer: {0}")]
    Malformed(String),
    #[error("the API server answered {status} to {verb} {resource}: {message}")]
    Status {
        status: u16,
        verb: &'static str,
        resource: &'static str,
        message: String,
    },
}

impl KubeError {
    /// Whether an operator must act (RBAC, token, namespace), as opposed to a server out
    /// of reach for now.
    pub fn needs_operator(&self) -> bool {
        !matches!(self, KubeError::Unreachable(_) | KubeError::Malformed(_))
    }
}

// ---- Wire types --------------------------------------------------------------------------

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

fn null_is_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    #[serde(default)]
    resource_version: String,
}

#[derive(Deserialize)]
struct List<T> {
    metadata: ListMeta,
    #[serde(default = "Vec::new")]
    items: Vec<T>,
}

#[derive(Deserialize, Default)]
struct StatusBody {
    #[serde(default)]
    message: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    details: Option<StatusDetails>,
}

#[derive(Deserialize, Default)]
struct StatusDetails {
    #[serde(default)]
    kind: String,
}

#[derive(Deserialize)]
struct WireEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
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

// ---- Configuration -----------------------------------------------------------------------

/// Where the token comes from.
enum TokenSource {
    Static(Secret),
    /// A file (a projected service account token rotates): read again when it changes.
    File {
        path: PathBuf,
        cached: Mutex<Option<(FileStamp, Secret)>>,
    },
    None,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path)?;
    Ok(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

impl TokenSource {
    /// The token now: a file's is read again when the file changed (`fresh`: always).
    fn token(&self, fresh: bool) -> Result<Option<Secret>, KubeError> {
        match self {
            TokenSource::Static(s) => Ok(Some(s.clone())),
            TokenSource::None => Ok(None),
            TokenSource::File { path, cached } => {
                let no = |e: std::io::Error| KubeError::NoToken {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                };
                let now = stamp(path).map_err(no)?;
                let mut c = cached.lock().expect("never poisoned");
                if let Some((s, t)) = &*c {
                    if *s == now && !fresh {
                        return Ok(Some(t.clone()));
                    }
                }
                let text = std::fs::read_to_string(path).map_err(no)?;
                let t = text.trim();
                if t.is_empty() {
                    return Err(KubeError::NoToken {
                        path: path.display().to_string(),
                        reason: "the file is empty".into(),
                    });
                }
                let t = Secret::new(t.to_owned());
                if c.as_ref().is_some_and(|(s, _)| *s != now) {
                    tracing::info!(path = %path.display(), "the service account token changed: using the new one");
                }
                *c = Some((now, t.clone()));
                Ok(Some(t))
            }
        }
    }
}

/// How to reach the API server, and as whom.
pub struct Connection {
    pub server: url::Url,
    pub namespace: String,
    ca: Option<Vec<u8>>,
    insecure: bool,
    identity: Option<zeroize::Zeroizing<Vec<u8>>>,
    token: TokenSource,
}

#[derive(Deserialize, Default)]
struct Kubeconfig {
    #[serde(rename = "current-context", default)]
    current_context: String,
    #[serde(default)]
    clusters: Vec<Named<KcCluster>>,
    #[serde(default)]
    users: Vec<Named<KcUser>>,
    #[serde(default)]
    contexts: Vec<Named<KcContext>>,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    value: T,
}

#[derive(Deserialize, Default)]
struct KcCluster {
    server: String,
    #[serde(rename = "certificate-authority")]
    certificate_authority: Option<PathBuf>,
    #[serde(rename = "certificate-authority-data")]
    certificate_authority_data: Option<String>,
    #[serde(rename = "insecure-skip-tls-verify", default)]
    insecure: bool,
}

#[derive(Deserialize, Default)]
struct KcUser {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
    #[serde(rename = "client-certificate")]
    client_certificate: Option<PathBuf>,
    #[serde(rename = "client-certificate-data")]
    client_certificate_data: Option<String>,
    #[serde(rename = "client-key")]
    client_key: Option<PathBuf>,
    #[serde(rename = "client-key-data")]
    client_key_data: Option<String>,
}

#[derive(Deserialize, Default)]
struct KcContext {
    cluster: String,
    #[serde(default)]
    user: String,
    namespace: Option<String>,
}

fn b64(field: &str, s: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|_| anyhow::anyhow!("{field} is not base64"))
}

impl Connection {
    /// A kubeconfig's current context (relative paths are the file's directory's).
    pub fn from_kubeconfig(path: &Path, namespace: Option<&str>) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read cluster.kubeconfig {}", path.display()))?;
        // Not serde's message: it may quote a line of the file, and the file holds a token.
        let kc: Kubeconfig = serde_yaml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "cluster.kubeconfig {} is no kubeconfig (at {})",
                path.display(),
                e.location()
                    .map_or("?".into(), |l| format!("{}:{}", l.line(), l.column()))
            )
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &Path| dir.join(p);
        let ctx = kc
            .contexts
            .iter()
            .find(|c| c.name == kc.current_context)
            .or(kc.contexts.first())
            .map(|c| &c.value)
            .ok_or_else(|| {
                anyhow::anyhow!("cluster.kubeconfig {} has no context", path.display())
            })?;
        let cluster = kc
            .clusters
            .iter()
            .find(|c| c.name == ctx.cluster)
            .map(|c| &c.value)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "cluster.kubeconfig {}: no cluster {:?}",
                    path.display(),
                    ctx.cluster
                )
            })?;
        let user = kc
            .users
            .iter()
            .find(|u| u.name == ctx.user)
            .map(|u| &u.value);
        let ca = match (
            &cluster.certificate_authority_data,
            &cluster.certificate_authority,
        ) {
            (Some(d), _) => Some(b64("certificate-authority-data", d)?),
            (None, Some(p)) => Some(std::fs::read(rel(p)).with_context(|| {
                format!(
                    "failed to read the kubeconfig's certificate-authority {}",
                    rel(p).display()
                )
            })?),
            (None, None) => None,
        };
        let mut identity = None;
        let mut token = TokenSource::None;
        if let Some(u) = user {
            let cert = match (&u.client_certificate_data, &u.client_certificate) {
                (Some(d), _) => Some(b64("client-certificate-data", d)?),
                (None, Some(p)) => Some(std::fs::read(rel(p)).with_context(|| {
                    format!(
                        "failed to read the kubeconfig's client-certificate {}",
                        rel(p).display()
                    )
                })?),
                _ => None,
            };
            let key = match (&u.client_key_data, &u.client_key) {
                (Some(d), _) => Some(b64("client-key-data", d)?),
                (None, Some(p)) => Some(std::fs::read(rel(p)).with_context(|| {
                    format!(
                        "failed to read the kubeconfig's client-key {}",
                        rel(p).display()
                    )
                })?),
                _ => None,
            };
            if let (Some(mut c), Some(k)) = (cert, key) {
                c.push(b'\n');
                c.extend_from_slice(&k);
                identity = Some(zeroize::Zeroizing::new(c));
            }
            token = match (&u.token, &u.token_file) {
                (Some(t), _) => TokenSource::Static(Secret::new(t.clone())),
                (None, Some(p)) => TokenSource::File {
                    path: rel(p),
                    cached: Mutex::new(None),
                },
                _ => TokenSource::None,
            };
        }
        let server = url::Url::parse(&cluster.server)
            .with_context(|| format!("cluster.kubeconfig {}: server is no URL", path.display()))?;
        Ok(Connection {
            server,
            namespace: namespace
                .map(str::to_owned)
                .or_else(|| ctx.namespace.clone())
                .unwrap_or_else(|| "default".into()),
            ca,
            insecure: cluster.insecure,
            identity,
            token,
        })
    }

    /// The pod's own: `KUBERNETES_SERVICE_HOST`/`_PORT`, the service account's token,
    /// CA and namespace (`TOKEND_SERVICEACCOUNT_DIR` replaces the directory, for tests).
    pub fn in_cluster(namespace: Option<&str>) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            anyhow::anyhow!("not in a pod (KUBERNETES_SERVICE_HOST is not set): set cluster.kubeconfig to reach the API server from outside a cluster")
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let dir = std::env::var_os("TOKEND_SERVICEACCOUNT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(SA_DIR));
        let ca = std::fs::read(dir.join("ca.crt")).with_context(|| {
            format!(
                "failed to read the service account's CA {}",
                dir.join("ca.crt").display()
            )
        })?;
        let namespace = match namespace {
            Some(n) => n.to_owned(),
            None => std::fs::read_to_string(dir.join("namespace"))
                .map(|s| s.trim().to_owned())
                .with_context(|| {
                    format!(
                        "failed to read the pod's namespace {} (set cluster.namespace)",
                        dir.join("namespace").display()
                    )
                })?,
        };
        Ok(Connection {
            server: url::Url::parse(&format!("https://{host}:{port}"))
                .context("KUBERNETES_SERVICE_HOST and _PORT make no URL")?,
            namespace,
            ca: Some(ca),
            insecure: false,
            identity: None,
            token: TokenSource::File {
                path: dir.join("token"),
                cached: Mutex::new(None),
            },
        })
    }
}

// ---- The client --------------------------------------------------------------------------

pub struct Kube {
    http: reqwest::Client,
    server: url::Url,
    namespace: String,
    token: TokenSource,
    timeout: Duration,
    clock: BackendClock,
}

impl std::fmt::Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kube")
            .field("server", &self.server.as_str())
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// The resources the backend uses, for the paths and the errors.
#[derive(Clone, Copy)]
pub enum Resource {
    Leases,
    Secrets,
}

impl Resource {
    fn name(self) -> &'static str {
        match self {
            Resource::Leases => "leases",
            Resource::Secrets => "secrets",
        }
    }

    fn base(self) -> &'static str {
        match self {
            Resource::Leases => "apis/coordination.k8s.io/v1",
            Resource::Secrets => "api/v1",
        }
    }
}

impl Kube {
    /// A client for `conn`; each call bounded by `timeout` (watches excepted).
    pub fn new(conn: Connection, timeout: Duration) -> anyhow::Result<Self> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(timeout)
            .user_agent(concat!("tokend/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &conn.ca {
            b = b.tls_built_in_root_certs(false);
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|_| anyhow::anyhow!("the API server's CA is no PEM certificate"))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        if conn.insecure {
            b = b.danger_accept_invalid_certs(true);
        }
        if let Some(id) = &conn.identity {
            // Not the error's text: it may quote the key.
            let id = reqwest::Identity::from_pem(id).map_err(|_| {
                anyhow::anyhow!("the kubeconfig's client certificate and key are no PEM")
            })?;
            b = b.identity(id);
        }
        let http = b.build().map_err(|e| {
            anyhow::anyhow!(
                "failed to set up the Kubernetes client: {}",
                e.without_url()
            )
        })?;
        let mut server = conn.server;
        if !server.path().ends_with('/') {
            server.set_path(&format!("{}/", server.path()));
        }
        Ok(Kube {
            http,
            server,
            namespace: conn.namespace,
            token: conn.token,
            timeout,
            clock: BackendClock::default(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The API server's clock, as its answers' `Date` told.
    pub fn backend_clock(&self) -> &BackendClock {
        &self.clock
    }

    fn url(&self, r: Resource, name: Option<&str>, query: &[(&str, &str)]) -> url::Url {
        let mut path = format!("{}/namespaces/{}/{}", r.base(), self.namespace, r.name());
        if let Some(n) = name {
            path.push('/');
            path.push_str(n);
        }
        let mut u = self
            .server
            .join(&path)
            .expect("a relative path always joins");
        if !query.is_empty() {
            u.query_pairs_mut().extend_pairs(query);
        }
        u
    }

    /// Sends one request (with the token, read again once after a 401); the status and
    /// body. `watch`: no total timeout (the stream is read by the caller).
    async fn send(
        &self,
        method: reqwest::Method,
        url: url::Url,
        body: Option<Vec<u8>>,
        watch: bool,
    ) -> Result<reqwest::Response, KubeError> {
        let mut fresh = false;
        loop {
            let mut req = self.http.request(method.clone(), url.clone());
            if !watch {
                req = req.timeout(self.timeout);
            }
            if let Some(t) = self.token.token(fresh)? {
                req = req.bearer_auth(t.expose());
            }
            if let Some(b) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.clone());
            }
            let sent = SystemTime::now();
            let resp = req
                .send()
                .await
                .map_err(|e| KubeError::Unreachable(crate::oauth::error_chain(&e.without_url())))?;
            let received = SystemTime::now();
            if let Some(date) = resp
                .headers()
                .get(reqwest::header::DATE)
                .and_then(|d| d.to_str().ok())
                .and_then(|d| httpdate::parse_http_date(d).ok())
            {
                self.clock.observe(date, sent, received);
            }
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED && !fresh {
                // The token file may have been replaced since it was read.
                fresh = true;
                continue;
            }
            return Ok(resp);
        }
    }

    /// The error for a status that is neither success nor one the caller handles.
    async fn error(&self, resp: reqwest::Response, verb: &'static str, r: Resource) -> KubeError {
        let status = resp.status().as_u16();
        let body: StatusBody = resp
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        match status {
            401 => KubeError::Unauthorized,
            403 => KubeError::Forbidden {
                verb,
                resource: r.name(),
                namespace: self.namespace.clone(),
            },
            404 if body
                .details
                .as_ref()
                .is_some_and(|d| d.kind == "namespaces") =>
            {
                KubeError::NoNamespace(self.namespace.clone())
            }
            s if s >= 500 => KubeError::Unreachable(format!("HTTP {s}: {}", clip(&body.message))),
            _ => KubeError::Status {
                status,
                verb,
                resource: r.name(),
                message: format!("{}: {}", body.reason, clip(&body.message)),
            },
        }
    }

    /// GET one object; none if it does not exist.
    pub async fn get<T: DeserializeOwned>(
        &self,
        r: Resource,
        name: &str,
    ) -> Result<Option<T>, KubeError> {
        let resp = self
            .send(
                reqwest::Method::GET,
                self.url(r, Some(name), &[]),
                None,
                false,
            )
            .await?;
        match resp.status().as_u16() {
            200 => Ok(Some(parse(resp).await?)),
            404 => {
                // A missing namespace is a 404 too, but only a create tells them apart
                // (a get of a missing object in a missing namespace says the object).
                Ok(None)
            }
            _ => Err(self.error(resp, "get", r).await),
        }
    }

    /// POST a new object; none if one of its name exists (409).
    pub async fn create<T: Serialize + DeserializeOwned>(
        &self,
        r: Resource,
        object: &T,
    ) -> Result<Option<T>, KubeError> {
        let body = serde_json::to_vec(object).expect("objects always serialize");
        let resp = self
            .send(
                reqwest::Method::POST,
                self.url(r, None, &[]),
                Some(body),
                false,
            )
            .await?;
        match resp.status().as_u16() {
            200 | 201 => Ok(Some(parse(resp).await?)),
            409 => Ok(None),
            _ => Err(self.error(resp, "create", r).await),
        }
    }

    /// PUT `object` over `name`, conditional on the resourceVersion it carries; none if
    /// the object changed since (409) or is gone (404).
    pub async fn update<T: Serialize + DeserializeOwned>(
        &self,
        r: Resource,
        name: &str,
        object: &T,
    ) -> Result<Option<T>, KubeError> {
        let body = serde_json::to_vec(object).expect("objects always serialize");
        let resp = self
            .send(
                reqwest::Method::PUT,
                self.url(r, Some(name), &[]),
                Some(body),
                false,
            )
            .await?;
        match resp.status().as_u16() {
            200 | 201 => Ok(Some(parse(resp).await?)),
            409 | 404 => Ok(None),
            _ => Err(self.error(resp, "update", r).await),
        }
    }

    /// LIST by label selector; the items and the list's resourceVersion.
    pub async fn list<T: DeserializeOwned>(
        &self,
        r: Resource,
        selector: &str,
    ) -> Result<(Vec<T>, String), KubeError> {
        let resp = self
            .send(
                reqwest::Method::GET,
                self.url(r, None, &[("labelSelector", selector)]),
                None,
                false,
            )
            .await?;
        match resp.status().as_u16() {
            200 => {
                let l: List<T> = parse(resp).await?;
                Ok((l.items, l.metadata.resource_version))
            }
            _ => Err(self.error(resp, "list", r).await),
        }
    }

    /// WATCH by label selector from `from` (a resourceVersion), sending each event to
    /// `tx`, until the server closes it or it fails.
    pub async fn watch(
        &self,
        r: Resource,
        selector: &str,
        from: &str,
        timeout: Duration,
        tx: &mpsc::Sender<WatchEvent>,
    ) -> WatchEnd {
        let secs = timeout.as_secs().max(1).to_string();
        let url = self.url(
            r,
            None,
            &[
                ("labelSelector", selector),
                ("watch", "true"),
                ("resourceVersion", from),
                ("allowWatchBookmarks", "true"),
                ("timeoutSeconds", &secs),
            ],
        );
        let mut resp = match self.send(reqwest::Method::GET, url, None, true).await {
            Ok(r) => r,
            Err(e) => return WatchEnd::Failed(e),
        };
        match resp.status().as_u16() {
            200 => {}
            410 => return WatchEnd::Gone,
            _ => return WatchEnd::Failed(self.error(resp, "watch", r).await),
        }
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => return WatchEnd::Closed,
                Err(e) => {
                    return WatchEnd::Failed(KubeError::Unreachable(crate::oauth::error_chain(
                        &e.without_url(),
                    )))
                }
            };
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let Ok(ev) = serde_json::from_slice::<WireEvent>(&line) else {
                    continue;
                };
                if ev.kind == "ERROR" {
                    let code = ev.object.get("code").and_then(|c| c.as_u64());
                    return if code == Some(410) {
                        WatchEnd::Gone
                    } else {
                        WatchEnd::Closed
                    };
                }
                let meta: ObjectMeta = match ev.object.get("metadata") {
                    Some(m) => serde_json::from_value(m.clone()).unwrap_or_default(),
                    None => continue,
                };
                let rv = meta.resource_version.clone().unwrap_or_default();
                let out = if ev.kind == "BOOKMARK" {
                    WatchEvent::Bookmark(rv)
                } else {
                    WatchEvent::Changed {
                        name: meta.name,
                        labels: meta.labels,
                        resource_version: rv,
                        deleted: ev.kind == "DELETED",
                        holder: ev
                            .object
                            .pointer("/spec/holderIdentity")
                            .and_then(|h| h.as_str())
                            .map(str::to_owned),
                    }
                };
                if tx.send(out).await.is_err() {
                    return WatchEnd::Closed;
                }
            }
        }
    }
}

async fn parse<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, KubeError> {
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| KubeError::Unreachable(crate::oauth::error_chain(&e.without_url())))?;
    // Not serde's message: it may quote the body.
    serde_json::from_slice(&bytes).map_err(|e| KubeError::Status {
        status: 200,
        verb: "parse",
        resource: "answer",
        message: format!(
            "not the expected object (line {} column {})",
            e.line(),
            e.column()
        ),
    })
}

fn clip(s: &str) -> String {
    s.chars().take(200).collect()
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
    use super::*;

    #[test]
    fn a_kubeconfig_gives_its_current_contexts_server_namespace_and_token_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ca.crt"),
            "not read until the client is made",
        )
        .unwrap();
        let text = "apiVersion: v1\nkind: Config\nclusters:\n- name: other\n  cluster:\n    server: https://10.9.9.9:6443\n\
                    - name: c\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority: ca.crt\n\
                    users:\n- name: u\n  user:\n    tokenFile: token\n\
                    contexts:\n- name: x\n  context:\n    cluster: other\n    user: u\n\
                    - name: ctx\n  context:\n    cluster: c\n    user: u\n    namespace: payments\n\
                    current-context: ctx\n";
        let path = dir.path().join("kube");
        std::fs::write(&path, text).unwrap();
        let c = Connection::from_kubeconfig(&path, None).unwrap();
        assert_eq!(c.server.as_str(), "https://127.0.0.1:6443/");
        assert_eq!(c.namespace, "payments");
        assert!(c.ca.is_some());
        let TokenSource::File { path: token, .. } = &c.token else {
            panic!("a token file")
        };
        assert_eq!(token, &dir.path().join("token"));
        // The configured namespace wins; a missing token file is said when first used.
        let c = Connection::from_kubeconfig(&path, Some("other")).unwrap();
        assert_eq!(c.namespace, "other");
        let e = c.token.token(false).unwrap_err();
        assert!(matches!(e, KubeError::NoToken { .. }), "{e}");

        std::fs::write(&path, "users: [token: secret-value\n").unwrap();
        let e = Connection::from_kubeconfig(&path, None).err().unwrap();
        assert!(!format!("{e:#}").contains("secret-value"), "{e:#}");
    }

    #[test]
    fn a_token_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "one\n").unwrap();
        let source = TokenSource::File {
            path: path.clone(),
            cached: Mutex::new(None),
        };
        assert_eq!(source.token(false).unwrap().unwrap().expose(), "one");
        let tmp = dir.path().join("new");
        std::fs::write(&tmp, "two-longer\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(source.token(false).unwrap().unwrap().expose(), "two-longer");
    }

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
