//! A small etcd v3 client over etcd's JSON gateway (`/v3/...`, in every etcd since 3.3),
//! on the reqwest client already in the tree: leases, ranges, puts, guarded
//! transactions and watches, which is all cluster mode needs. Chosen over the gRPC
//! client (etcd-client) because that one needs `protoc` and tonic at build time for
//! the same few calls; the gateway speaks the same API, as JSON with base64 bytes.
//!
//! Every call tries the endpoints in turn, starting from the one that answered last.
//! Errors name the endpoint and never a value (values are sealed records anyway).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::config::Secret;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd unreachable: {0}")]
    Unreachable(String),
    #[error("etcd at {endpoint} answered HTTP {status}: {message}")]
    Status {
        endpoint: String,
        status: u16,
        message: String,
    },
    #[error("etcd at {endpoint} answered something unexpected: {reason}")]
    Malformed { endpoint: String, reason: String },
}

/// One key and its value, as etcd keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: i64,
}

/// A condition of a transaction.
#[derive(Debug, Clone)]
pub enum Compare {
    /// The key's value equals this.
    Value(String, Vec<u8>),
    /// The key's create revision equals this (0: the key does not exist).
    CreateRevision(String, i64),
    /// The key is attached to this lease.
    Lease(String, i64),
}

/// An operation of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    Get(String),
    Delete(String),
}

/// What a transaction did: whether its conditions held, and the keys its gets read.
#[derive(Debug)]
pub struct TxnResult {
    pub succeeded: bool,
    pub kvs: Vec<Kv>,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Kv),
    Delete { key: String, mod_revision: i64 },
}

pub struct Etcd {
    client: reqwest::Client,
    endpoints: Vec<url::Url>,
    current: AtomicUsize,
    auth: Option<(String, Secret)>,
    token: Mutex<Option<String>>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field(
                "endpoints",
                &self
                    .endpoints
                    .iter()
                    .map(url::Url::as_str)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn json_post(client: &reqwest::Client, url: url::Url, body: &Value) -> reqwest::RequestBuilder {
    client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(body).expect("JSON always serializes"))
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// The end of the range of every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// etcd's JSON writes 64-bit numbers as strings, and leaves zero values out.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kv(v: &Value) -> Option<Kv> {
    let key = B64.decode(v.get("key")?.as_str()?).ok()?;
    let value = match v.get("value").and_then(Value::as_str) {
        Some(s) => B64.decode(s).ok()?,
        None => Vec::new(),
    };
    Some(Kv {
        key: String::from_utf8(key).ok()?,
        value,
        create_revision: v.get("create_revision").map_or(0, int),
        mod_revision: v.get("mod_revision").map_or(0, int),
        lease: v.get("lease").map_or(0, int),
    })
}

impl Etcd {
    /// A client of the members at `endpoints` (`http://` or `https://` URLs). `client`
    /// carries TLS settings (CA, client certificate) and timeouts.
    pub fn new(
        client: reqwest::Client,
        endpoints: Vec<url::Url>,
        auth: Option<(String, Secret)>,
    ) -> Self {
        Etcd {
            client,
            endpoints,
            current: AtomicUsize::new(0),
            auth,
            token: Mutex::new(None),
        }
    }

    /// POSTs `body` to `path` on the first endpoint that answers.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let n = self.endpoints.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::from("no endpoint configured");
        for i in 0..n {
            let idx = (start + i) % n;
            let endpoint = &self.endpoints[idx];
            match self.call_one(endpoint, path, body).await {
                Ok(v) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(EtcdError::Unreachable(reason)) => last = reason,
                Err(e) => return Err(e),
            }
        }
        Err(EtcdError::Unreachable(last))
    }

    async fn call_one(
        &self,
        endpoint: &url::Url,
        path: &str,
        body: &Value,
    ) -> Result<Value, EtcdError> {
        let mut retried_auth = false;
        loop {
            let token = self.auth_token(endpoint).await?;
            let url = endpoint.join(path).map_err(|e| EtcdError::Malformed {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            })?;
            let mut req = json_post(&self.client, url, body);
            if let Some(t) = &token {
                req = req.header("Authorization", t);
            }
            let resp = req.send().await.map_err(|e| {
                EtcdError::Unreachable(format!(
                    "{endpoint}: {}",
                    crate::oauth::error_chain(&e.without_url())
                ))
            })?;
            let status = resp.status().as_u16();
            let bytes = resp.bytes().await.map_err(|e| {
                EtcdError::Unreachable(format!(
                    "{endpoint}: {}",
                    crate::oauth::error_chain(&e.without_url())
                ))
            })?;
            let value: Value =
                serde_json::from_slice(&bytes).map_err(|e| EtcdError::Malformed {
                    endpoint: endpoint.to_string(),
                    reason: format!("not JSON ({:?})", e.classify()),
                })?;
            if status == 200 {
                return Ok(value);
            }
            let message = value
                .get("message")
                .or_else(|| value.get("error"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect::<String>();
            // An expired auth token: authenticate again, once.
            if self.auth.is_some() && !retried_auth && message.contains("token") {
                *self.token.lock().expect("never poisoned") = None;
                retried_auth = true;
                continue;
            }
            // A member that lost its quorum answers 503-ish errors: try another.
            if status >= 500 {
                return Err(EtcdError::Unreachable(format!(
                    "{endpoint}: HTTP {status}: {message}"
                )));
            }
            return Err(EtcdError::Status {
                endpoint: endpoint.to_string(),
                status,
                message,
            });
        }
    }

    async fn auth_token(&self, endpoint: &url::Url) -> Result<Option<String>, EtcdError> {
        let Some((user, password)) = &self.auth else {
            return Ok(None);
        };
        if let Some(t) = self.token.lock().expect("never poisoned").clone() {
            return Ok(Some(t));
        }
        let url = endpoint
            .join("/v3/auth/authenticate")
            .map_err(|e| EtcdError::Malformed {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            })?;
        let resp = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(
                zeroize::Zeroizing::new(
                    serde_json::to_vec(&json!({ "name": user, "password": password.expose() }))
                        .expect("JSON always serializes"),
                )
                .to_vec(),
            )
            .send()
            .await
            .map_err(|e| {
                EtcdError::Unreachable(format!(
                    "{endpoint}: {}",
                    crate::oauth::error_chain(&e.without_url())
                ))
            })?;
        let status = resp.status().as_u16();
        let v: Value = resp
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| EtcdError::Malformed {
                endpoint: endpoint.to_string(),
                reason: "authentication answer is not JSON".into(),
            })?;
        let token = v
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| EtcdError::Status {
                endpoint: endpoint.to_string(),
                status,
                message: "authentication failed (check the cluster username and password)".into(),
            })?;
        *self.token.lock().expect("never poisoned") = Some(token.to_owned());
        Ok(Some(token.to_owned()))
    }

    /// A new lease of `ttl`; its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let v = self
            .call(
                "/v3/lease/grant",
                &json!({ "TTL": ttl.as_secs().max(1).to_string() }),
            )
            .await?;
        Ok(v.get("ID").map_or(0, int))
    }

    /// Renews lease `id`; false if it expired (or never was).
    pub async fn keepalive(&self, id: i64) -> Result<bool, EtcdError> {
        let v = self
            .call("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))
            .await?;
        let ttl = v.get("result").and_then(|r| r.get("TTL")).map_or(0, int);
        Ok(ttl > 0)
    }

    /// Ends lease `id` now: every key attached to it goes.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({ "ID": id.to_string() }))
            .await
            .map(drop)
    }

    /// Every key under `prefix`, and the revision they were read at.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        let v = self
            .call(
                "/v3/kv/range",
                &json!({ "key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix)) }),
            )
            .await?;
        let revision = v
            .get("header")
            .and_then(|h| h.get("revision"))
            .map_or(0, int);
        let kvs = v
            .get("kvs")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(kv).collect())
            .unwrap_or_default();
        Ok((kvs, revision))
    }

    /// One key.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        let v = self
            .call("/v3/kv/range", &json!({ "key": b64(key.as_bytes()) }))
            .await?;
        Ok(v.get("kvs")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(kv))
    }

    /// If every `compare` holds, `success`, else `failure`, atomically.
    pub async fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResult, EtcdError> {
        let cmp: Vec<Value> = compare
            .iter()
            .map(|c| match c {
                Compare::Value(k, v) => json!({"key": b64(k.as_bytes()), "target": "VALUE", "result": "EQUAL", "value": b64(v)}),
                Compare::CreateRevision(k, r) => json!({"key": b64(k.as_bytes()), "target": "CREATE", "result": "EQUAL", "create_revision": r.to_string()}),
                Compare::Lease(k, l) => json!({"key": b64(k.as_bytes()), "target": "LEASE", "result": "EQUAL", "lease": l.to_string()}),
            })
            .collect();
        let ops = |ops: &[Op]| -> Vec<Value> {
            ops.iter()
                .map(|o| match o {
                    Op::Put { key, value, lease } => json!({"request_put": {"key": b64(key.as_bytes()), "value": b64(value), "lease": lease.to_string()}}),
                    Op::Get(key) => json!({"request_range": {"key": b64(key.as_bytes())}}),
                    Op::Delete(key) => json!({"request_delete_range": {"key": b64(key.as_bytes())}}),
                })
                .collect()
        };
        let v = self
            .call(
                "/v3/kv/txn",
                &json!({ "compare": cmp, "success": ops(success), "failure": ops(failure) }),
            )
            .await?;
        let succeeded = v.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let kvs = v
            .get("responses")
            .and_then(Value::as_array)
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| r.get("response_range"))
                    .filter_map(|r| r.get("kvs").and_then(Value::as_array))
                    .flatten()
                    .filter_map(kv)
                    .collect()
            })
            .unwrap_or_default();
        Ok(TxnResult { succeeded, kvs })
    }

    /// Watches every key under `prefix` from revision `from` on, sending each change to
    /// `tx` until the stream ends (an error or etcd going away; the caller watches again
    /// from the last revision it saw). Returns the last revision seen.
    pub async fn watch(
        &self,
        prefix: &str,
        from: i64,
        tx: &tokio::sync::mpsc::Sender<Event>,
    ) -> Result<i64, EtcdError> {
        let n = self.endpoints.len().max(1);
        let idx = self.current.load(Ordering::Relaxed) % n;
        let endpoint = self
            .endpoints
            .get(idx)
            .ok_or_else(|| EtcdError::Unreachable("no endpoint configured".into()))?;
        let token = self.auth_token(endpoint).await?;
        let url = endpoint
            .join("/v3/watch")
            .map_err(|e| EtcdError::Malformed {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            })?;
        let body = json!({"create_request": {
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&prefix_end(prefix)),
            "start_revision": from.to_string(),
        }});
        // A watch is a long-lived answer: no overall timeout, but the stream's reads are
        // bounded by the caller (it restarts the watch on any error).
        let mut req = json_post(&self.client, url, &body).timeout(Duration::from_secs(24 * 3600));
        if let Some(t) = &token {
            req = req.header("Authorization", t);
        }
        let unreachable = |e: reqwest::Error| {
            // Next time, another member.
            self.current.store((idx + 1) % n, Ordering::Relaxed);
            EtcdError::Unreachable(format!(
                "{endpoint}: {}",
                crate::oauth::error_chain(&e.without_url())
            ))
        };
        let mut resp = req.send().await.map_err(unreachable)?;
        let mut buf: Vec<u8> = Vec::new();
        let mut last = from.saturating_sub(1);
        while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
            buf.extend_from_slice(&chunk);
            if buf.len() > 16 * 1024 * 1024 {
                return Err(EtcdError::Malformed {
                    endpoint: endpoint.to_string(),
                    reason: "a watch message larger than 16 MiB".into(),
                });
            }
            // The gateway writes one JSON object per line.
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                let Some(result) = v.get("result") else {
                    continue;
                };
                if result.get("canceled").and_then(Value::as_bool) == Some(true) {
                    return Ok(last);
                }
                if let Some(rev) = result.get("header").and_then(|h| h.get("revision")) {
                    last = last.max(int(rev));
                }
                for e in result
                    .get("events")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let Some(kv_v) = e.get("kv") else { continue };
                    let event = if e.get("type").and_then(Value::as_str) == Some("DELETE") {
                        let Some(k) = kv_v
                            .get("key")
                            .and_then(Value::as_str)
                            .and_then(|k| B64.decode(k).ok())
                            .and_then(|k| String::from_utf8(k).ok())
                        else {
                            continue;
                        };
                        let mod_revision = kv_v.get("mod_revision").map_or(0, int);
                        last = last.max(mod_revision);
                        Event::Delete {
                            key: k,
                            mod_revision,
                        }
                    } else {
                        let Some(kv) = kv(kv_v) else { continue };
                        last = last.max(kv.mod_revision);
                        Event::Put(kv)
                    };
                    if tx.send(event).await.is_err() {
                        return Ok(last);
                    }
                }
            }
        }
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end("/a/b"), b"/a/c");
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80");
        assert_eq!(prefix_end(""), vec![0]);
    }

    #[test]
    fn etcd_json_numbers_are_strings_and_zero_values_are_left_out() {
        let v = serde_json::json!({"key": b64(b"k"), "create_revision": "5", "mod_revision": "9"});
        assert_eq!(
            kv(&v),
            Some(Kv {
                key: "k".into(),
                value: Vec::new(),
                create_revision: 5,
                mod_revision: 9,
                lease: 0
            })
        );
    }
}
