//! How to reach the API server, and as whom: a kubeconfig's current context, or the
//! pod's in-cluster configuration (service account token, CA and namespace); and the
//! token re-read when its file changes (a projected token rotates). Nothing here sends
//! a request: the HTTP calls are `client`'s.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Deserialize;

use super::errors::KubeError;
use crate::config::Secret;

/// Where the in-cluster configuration lives (a pod's service account).
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Where the token comes from.
pub(super) enum TokenSource {
    Static(Secret),
    /// A file (a projected service account token rotates): read again when it changes.
    File {
        path: PathBuf,
        cached: Mutex<Option<(FileStamp, Secret)>>,
    },
    None,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct FileStamp {
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
    pub(super) fn token(&self, fresh: bool) -> Result<Option<Secret>, KubeError> {
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
    pub(super) ca: Option<Vec<u8>>,
    pub(super) insecure: bool,
    pub(super) identity: Option<zeroize::Zeroizing<Vec<u8>>>,
    pub(super) token: TokenSource,
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

impl Kubeconfig {
    /// Reads and parses the file at `path`.
    fn read(path: &Path) -> anyhow::Result<Kubeconfig> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read cluster.kubeconfig {}", path.display()))?;
        // Not serde's message: it may quote a line of the file, and the file holds a token.
        serde_yaml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "cluster.kubeconfig {} is no kubeconfig (at {})",
                path.display(),
                e.location()
                    .map_or("?".into(), |l| format!("{}:{}", l.line(), l.column()))
            )
        })
    }
}

impl KcUser {
    /// The client certificate and key (one PEM, when both are given) and the token
    /// source; relative paths are `dir`'s.
    fn credentials(
        &self,
        dir: &Path,
    ) -> anyhow::Result<(Option<zeroize::Zeroizing<Vec<u8>>>, TokenSource)> {
        let cert = data_or_file(
            "client-certificate",
            &self.client_certificate_data,
            &self.client_certificate,
            dir,
        )?;
        let key = data_or_file("client-key", &self.client_key_data, &self.client_key, dir)?;
        let mut identity = None;
        if let (Some(mut c), Some(k)) = (cert, key) {
            c.push(b'\n');
            c.extend_from_slice(&k);
            identity = Some(zeroize::Zeroizing::new(c));
        }
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => TokenSource::Static(Secret::new(t.clone())),
            (None, Some(p)) => TokenSource::File {
                path: dir.join(p),
                cached: Mutex::new(None),
            },
            _ => TokenSource::None,
        };
        Ok((identity, token))
    }
}

/// The bytes of kubeconfig field `field`: its `-data` form (base64) first, else the file
/// it names (relative to `dir`), else none.
fn data_or_file(
    field: &str,
    data: &Option<String>,
    file: &Option<PathBuf>,
    dir: &Path,
) -> anyhow::Result<Option<Vec<u8>>> {
    use anyhow::Context as _;
    Ok(match (data, file) {
        (Some(d), _) => Some(b64(&format!("{field}-data"), d)?),
        (None, Some(p)) => Some(std::fs::read(dir.join(p)).with_context(|| {
            format!(
                "failed to read the kubeconfig's {field} {}",
                dir.join(p).display()
            )
        })?),
        (None, None) => None,
    })
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
        let kc = Kubeconfig::read(path)?;
        let dir = path.parent().unwrap_or(Path::new("."));
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
        let ca = data_or_file(
            "certificate-authority",
            &cluster.certificate_authority_data,
            &cluster.certificate_authority,
            dir,
        )?;
        let (identity, token) = match user {
            Some(u) => u.credentials(dir)?,
            None => (None, TokenSource::None),
        };
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
}
