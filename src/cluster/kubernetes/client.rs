//! A small typed client of the Kubernetes API for the cluster backend: Leases
//! (`coordination.k8s.io/v1`) and Secrets (`v1`) of one namespace, get, create, update
//! (conditional on `resourceVersion`), list and watch by label, and the wire types.
//! Over the project's reqwest (rustls), not the kube crate: BENCHMARKS.md
//! ("The Kubernetes backend's client") has the numbers behind that choice.
//!
//! What the cluster does with these objects lives in `super`; nothing here knows of
//! records or elections. How to reach the API server and as whom (kubeconfig, in-cluster
//! configuration, the token file) is `kubeconfig`'s; the error texts are `errors`'.

use std::time::{Duration, SystemTime};

use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::mpsc;

use crate::cluster::etcd::BackendClock;

pub use super::errors::KubeError;
pub use super::kubeconfig::Connection;
use super::kubeconfig::TokenSource;

/// The label every object of tokend carries.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "tokend");

pub use super::objects::{
    micro_time, Lease, LeaseSpec, ObjectMeta, SecretObject, WatchEnd, WatchEvent,
};
use super::objects::{List, StatusBody, WireEvent};

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
