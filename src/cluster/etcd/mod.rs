//! A small etcd v3 client over etcd's JSON gateway (`/v3/...`, in every etcd since 3.3),
//! on the reqwest client already in the tree: leases, ranges, guarded transactions and
//! watches, which is all cluster mode needs. Chosen over the gRPC client (etcd-client)
//! because that one needs `protoc` and tonic at build time for the same few calls; the
//! gateway speaks the same API, as JSON with base64 bytes and 64-bit numbers as strings.
//!
//! The wire is typed: one serde struct per request and answer (`wire`), and nothing
//! outside `etcd` knows the gateway's JSON. Every call has a deadline: each endpoint
//! gets [`Etcd::attempt_timeout`] (a fraction of the lease's time to live, so that a hung
//! member is left behind before a lease lapses), then the next is tried; the one that
//! answered is tried first next time. A watch has no deadline of its own: the member
//! checks its endpoint's progress beside it ([`Etcd::progress`]) and moves it elsewhere.
//!
//! Every answer's `Date` header feeds [`BackendClock`]: etcd's time, as this member sees
//! it, which is what members compare their clocks against.
//!
//! Errors name the endpoint and never a value (values are sealed records anyway).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::clock::Clock;
use crate::config::Secret;

mod clock;
mod watch;
mod wire;

/// How long authenticating to etcd may take, besides the call it is for.
const AUTH_TIMEOUT: Duration = Duration::from_secs(3);

pub use clock::BackendClock;
use wire::*;

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
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// How many times the key was written since it was created (1 for a new key).
    pub version: i64,
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
    /// The key's last modification was at this revision (0: the key does not exist).
    ModRevision(String, i64),
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

/// What a transaction did: whether its conditions held, the revision it ran at (the
/// revision of its writes, when it wrote), and the keys its gets read.
#[derive(Debug)]
pub struct TxnResult {
    pub succeeded: bool,
    pub revision: i64,
    pub kvs: Vec<Kv>,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Kv),
    Delete { key: String, mod_revision: i64 },
}

/// How a watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// The stream ended (etcd went away, or cancelled the watch); the last revision
    /// it reported. Watch again from the next one.
    Ended { last: i64 },
    /// The revision asked for was compacted away: what happened before
    /// `compact_revision` is gone; read the state again and watch from there.
    Compacted { compact_revision: i64 },
}

// ---- The client ------------------------------------------------------------------------

pub struct Etcd {
    client: reqwest::Client,
    endpoints: Vec<url::Url>,
    current: AtomicUsize,
    auth: Option<(String, Secret)>,
    token: Mutex<Option<String>>,
    attempt_timeout: Duration,
    clock: Clock,
    backend_clock: BackendClock,
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

/// What one endpoint's answer was, before it is read as a particular answer.
struct Answer {
    bytes: bytes::Bytes,
}

impl Etcd {
    /// A client of the members at `endpoints` (`http://` or `https://` URLs). `client`
    /// carries TLS settings (CA, client certificate); each endpoint gets
    /// `attempt_timeout` per call before the next is tried. `clock` is this member's
    /// wall clock, which answers' `Date` headers are compared with.
    pub fn new(
        client: reqwest::Client,
        endpoints: Vec<url::Url>,
        auth: Option<(String, Secret)>,
        attempt_timeout: Duration,
        clock: Clock,
    ) -> Self {
        Etcd {
            client,
            endpoints,
            current: AtomicUsize::new(0),
            auth,
            token: Mutex::new(None),
            attempt_timeout,
            clock,
            backend_clock: BackendClock::default(),
        }
    }

    /// How long one endpoint gets per call.
    pub fn attempt_timeout(&self) -> Duration {
        self.attempt_timeout
    }

    /// etcd's clock, as its answers told it.
    pub fn backend_clock(&self) -> &BackendClock {
        &self.backend_clock
    }

    /// How many endpoints there are.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// The endpoint that answered last (the one calls try first).
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.endpoints.len().max(1)
    }

    /// Moves calls away from endpoint `idx` (it hung): the next one is tried first.
    pub fn avoid(&self, idx: usize) {
        let n = self.endpoints.len().max(1);
        let _ = self.current.compare_exchange(
            idx % n,
            (idx + 1) % n,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// POSTs `body` to `path` on the first endpoint that answers; its answer.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, EtcdError> {
        let body = serde_json::to_vec(body).expect("requests always serialize");
        let n = self.endpoints.len();
        let start = self.current();
        let mut last = String::from("no endpoint configured");
        for i in 0..n {
            let idx = (start + i) % n;
            let limit = self.limit();
            let attempt = tokio::time::timeout(limit, self.call_one(idx, path, &body));
            let result = match attempt.await {
                Ok(r) => r,
                Err(_) => Err(EtcdError::Unreachable(format!(
                    "{}: no answer within {limit:?}",
                    self.endpoints[idx]
                ))),
            };
            match result {
                Ok(a) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return parse(&self.endpoints[idx], &a.bytes);
                }
                Err(EtcdError::Unreachable(reason)) => last = reason,
                Err(e) => return Err(e),
            }
        }
        Err(EtcdError::Unreachable(last))
    }

    /// How long the next call may take on one endpoint: longer while it has to
    /// authenticate first (etcd checks passwords with bcrypt, slowly on purpose).
    fn limit(&self) -> Duration {
        if self.auth.is_some() && self.token.lock().expect("never poisoned").is_none() {
            self.attempt_timeout + AUTH_TIMEOUT
        } else {
            self.attempt_timeout
        }
    }

    /// One endpoint's answer to `path` (re-authenticating once when the token expired).
    async fn call_one(&self, idx: usize, path: &str, body: &[u8]) -> Result<Answer, EtcdError> {
        let endpoint = &self.endpoints[idx];
        let mut retried_auth = false;
        loop {
            let token = self.auth_token(endpoint).await?;
            let resp = self
                .post(endpoint, path, body.to_vec(), token.as_deref())
                .await?;
            let status = resp.status().as_u16();
            let bytes = resp.bytes().await.map_err(|e| unreachable(endpoint, e))?;
            if status == 200 {
                return Ok(Answer { bytes });
            }
            let err: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_default();
            let message: String = err
                .message
                .or(err.error)
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect();
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

    /// Sends one POST, noting the answer's `Date`.
    async fn post(
        &self,
        endpoint: &url::Url,
        path: &str,
        body: Vec<u8>,
        token: Option<&str>,
    ) -> Result<reqwest::Response, EtcdError> {
        let url = endpoint.join(path).map_err(|e| EtcdError::Malformed {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?;
        let mut req = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(t) = token {
            req = req.header("Authorization", t);
        }
        let sent = self.clock.now();
        let resp = req.send().await.map_err(|e| unreachable(endpoint, e))?;
        let date = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| httpdate::parse_http_date(d).ok());
        if let Some(date) = date {
            self.backend_clock.observe(date, sent, self.clock.now());
        }
        Ok(resp)
    }

    async fn auth_token(&self, endpoint: &url::Url) -> Result<Option<String>, EtcdError> {
        let Some((user, password)) = &self.auth else {
            return Ok(None);
        };
        if let Some(t) = self.token.lock().expect("never poisoned").clone() {
            return Ok(Some(t));
        }
        let body = zeroize::Zeroizing::new(
            serde_json::to_vec(&AuthRequest {
                name: user,
                password: password.expose(),
            })
            .expect("JSON always serializes"),
        );
        let resp = self
            .post(endpoint, "/v3/auth/authenticate", body.to_vec(), None)
            .await?;
        let status = resp.status().as_u16();
        let answer: Option<AuthResponse> = resp
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let Some(answer) = answer else {
            return Err(EtcdError::Malformed {
                endpoint: endpoint.to_string(),
                reason: "authentication answer is not JSON".into(),
            });
        };
        let token = answer.token.ok_or_else(|| EtcdError::Status {
            endpoint: endpoint.to_string(),
            status,
            message: "authentication failed (check the cluster username and password)".into(),
        })?;
        *self.token.lock().expect("never poisoned") = Some(token.clone());
        Ok(Some(token))
    }

    /// A new lease of `ttl`: its id and the time to live etcd granted.
    pub async fn grant(&self, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
        let r: LeaseGrantResponse = self
            .call(
                "/v3/lease/grant",
                &LeaseGrantRequest {
                    ttl: I64(ttl.as_secs().max(1) as i64),
                },
            )
            .await?;
        if r.id.0 == 0 || !r.error.is_empty() {
            return Err(EtcdError::Malformed {
                endpoint: self.endpoints[self.current()].to_string(),
                reason: format!("no lease granted ({})", r.error),
            });
        }
        Ok((r.id.0, Duration::from_secs(r.ttl.0.max(0) as u64)))
    }

    /// Renews lease `id`: the time to live it has again, or `None` if it expired (or
    /// never was).
    pub async fn keepalive(&self, id: i64) -> Result<Option<Duration>, EtcdError> {
        let r: LeaseKeepAliveResponse = self
            .call("/v3/lease/keepalive", &LeaseIdRequest { id: I64(id) })
            .await?;
        let ttl = r.result.map_or(0, |r| r.ttl.0);
        Ok((ttl > 0).then(|| Duration::from_secs(ttl as u64)))
    }

    /// Ends lease `id` now: every key attached to it goes.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call::<serde::de::IgnoredAny>("/v3/lease/revoke", &LeaseIdRequest { id: I64(id) })
            .await
            .map(drop)
    }

    /// Every key under `prefix`, and the revision they were read at.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        let r: RangeResponse = self
            .call("/v3/kv/range", &prefix_range(prefix, false))
            .await?;
        Ok(range_kvs(r))
    }

    /// How many keys under `prefix` were written at revision `since` or later, read
    /// through endpoint `idx` only, within one attempt's time: whether that member still
    /// answers with a quorum behind it (a watch through it is alive), and whether a watch
    /// that has seen everything before `since` missed something. Keys without values:
    /// the answer is empty unless the watch missed something.
    pub async fn progress(&self, idx: usize, prefix: &str, since: i64) -> Result<i64, EtcdError> {
        // Keys only, not `count_only`: etcd counts every key of the range, whatever
        // `min_mod_revision` says (3.4 and 3.5 alike); only the keys it returns are
        // filtered by it (so a watch that was up to date looked behind).
        let req = RangeRequest {
            keys_only: true,
            min_mod_revision: Some(I64(since)),
            ..prefix_range(prefix, false)
        };
        let body = serde_json::to_vec(&req).expect("requests serialize");
        let idx = idx % self.endpoints.len().max(1);
        let endpoint = &self.endpoints[idx];
        let answer = tokio::time::timeout(
            self.attempt_timeout,
            self.call_one(idx, "/v3/kv/range", &body),
        )
        .await
        .map_err(|_| {
            EtcdError::Unreachable(format!(
                "{endpoint}: no answer within {:?}",
                self.attempt_timeout
            ))
        })??;
        let r: RangeResponse = parse(endpoint, &answer.bytes)?;
        Ok(r.kvs.len() as i64)
    }

    /// One key.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        let r: RangeResponse = self
            .call(
                "/v3/kv/range",
                &RangeRequest {
                    key: key.into(),
                    ..RangeRequest::default()
                },
            )
            .await?;
        Ok(r.kvs.into_iter().find_map(WireKv::into_kv))
    }

    /// If every `compare` holds, `success`, else `failure`, atomically.
    pub async fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResult, EtcdError> {
        let req = TxnRequest {
            compare: compare.iter().map(WireCompare::from).collect(),
            success: success.iter().map(RequestOp::from).collect(),
            failure: failure.iter().map(RequestOp::from).collect(),
        };
        let r: TxnResponse = self.call("/v3/kv/txn", &req).await?;
        Ok(TxnResult {
            succeeded: r.succeeded,
            revision: r.header.revision.0,
            kvs: r
                .responses
                .into_iter()
                .filter_map(|r| r.response_range)
                .flat_map(|r| r.kvs)
                .filter_map(WireKv::into_kv)
                .collect(),
        })
    }
}

fn prefix_range(prefix: &str, keys_only: bool) -> RangeRequest {
    RangeRequest {
        key: prefix.into(),
        range_end: Some(Bytes64(prefix_end(prefix))),
        keys_only,
        ..RangeRequest::default()
    }
}

fn range_kvs(r: RangeResponse) -> (Vec<Kv>, i64) {
    (
        r.kvs.into_iter().filter_map(WireKv::into_kv).collect(),
        r.header.revision.0,
    )
}

fn parse<T: serde::de::DeserializeOwned>(
    endpoint: &url::Url,
    bytes: &[u8],
) -> Result<T, EtcdError> {
    serde_json::from_slice(bytes).map_err(|e| EtcdError::Malformed {
        endpoint: endpoint.to_string(),
        reason: format!("not the expected JSON ({:?})", e.classify()),
    })
}

fn unreachable(endpoint: &url::Url, e: reqwest::Error) -> EtcdError {
    EtcdError::Unreachable(format!(
        "{endpoint}: {}",
        crate::oauth::error_chain(&e.without_url())
    ))
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end("/a/b"), b"/a/c");
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80");
        assert_eq!(prefix_end(""), vec![0]);
    }

    #[test]
    fn etcd_json_numbers_are_strings_and_zero_values_are_left_out() {
        let kv: WireKv =
            serde_json::from_str(r#"{"key":"aw==","create_revision":"5","mod_revision":"9"}"#)
                .unwrap();
        assert_eq!(
            kv.into_kv(),
            Some(Kv {
                key: "k".into(),
                value: Vec::new(),
                create_revision: 5,
                mod_revision: 9,
                version: 0,
                lease: 0
            })
        );
    }

    #[test]
    fn requests_are_written_as_the_gateway_reads_them() {
        let req = TxnRequest {
            compare: vec![
                (&Compare::ModRevision("k".into(), 0)).into(),
                (&Compare::Lease("l".into(), 7)).into(),
            ],
            success: vec![(&Op::Put {
                key: "k".into(),
                value: b"v".to_vec(),
                lease: 0,
            })
                .into()],
            failure: vec![(&Op::Get("k".into())).into()],
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"compare":[{"key":"aw==","target":"MOD","result":"EQUAL","mod_revision":"0"},{"key":"bA==","target":"LEASE","result":"EQUAL","lease":"7"}],"success":[{"request_put":{"key":"aw==","value":"dg=="}}],"failure":[{"request_range":{"key":"aw=="}}]}"#
        );
    }

    #[test]
    fn a_compacted_watch_says_where_history_starts() {
        let line: WatchLine = serde_json::from_str(
            r#"{"result":{"header":{"raft_term":"2"},"canceled":true,"compact_revision":"3"}}"#,
        )
        .unwrap();
        let r = line.result.unwrap();
        assert!(r.canceled);
        assert_eq!(r.compact_revision, I64(3));
        let put: WatchLine = serde_json::from_str(
            r#"{"result":{"header":{"revision":"4"},"events":[{"kv":{"key":"aw==","mod_revision":"4","version":"1"}},{"type":"DELETE","kv":{"key":"aw==","mod_revision":"5"}}]}}"#,
        )
        .unwrap();
        let events = put.result.unwrap().events;
        assert_eq!(events[0].kind, None);
        assert_eq!(events[1].kind.as_deref(), Some("DELETE"));
    }

    #[test]
    fn the_backend_clock_narrows_to_what_every_answer_allows() {
        let c = BackendClock::default();
        assert_eq!(c.offset_ms(), None);
        let t = |ms: i64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64);
        // The server is 5 minutes and 300 ms ahead; round trips of 10 ms.
        let skew = 300_300;
        for local in (1_000_000i64..1_010_000).step_by(370) {
            let server = local + 5 + skew;
            let date = t(server - server % 1000);
            c.observe(date, t(local), t(local + 10));
        }
        let off = c.offset_ms().unwrap();
        assert!((off - skew).abs() < 50, "{off}");
        // This member's clock is set back a minute: the old bounds no longer agree.
        for local in (1_000_000i64..1_004_000).step_by(370) {
            let server = local + 5 + skew + 60_000;
            c.observe(t(server - server % 1000), t(local), t(local + 10));
        }
        let off = c.offset_ms().unwrap();
        assert!((off - skew - 60_000).abs() < 500, "{off}");
    }
}
