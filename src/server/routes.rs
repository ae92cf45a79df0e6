//! Answers one request: the routes of SPEC §4, the access check, and JSON errors.
//!
//! An account the caller may not read is answered exactly like one that does not exist
//! (404, same body), so names cannot be probed. On the socket every answer, `/metrics`
//! and `/v1/health` included, shows only the accounts the caller may read; the TCP
//! monitoring listener shows every account's name and state, and nothing else.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::time::Instant;

use super::api::{self, code, AccountInfo, AccountList, ErrorBody, Health, NotReady};
use super::{Caller, Ctx};
use crate::account::{AccountView, Status, TokenState};
use crate::clock::rfc3339;
use crate::oauth::Token;
use crate::output::render::TokenJson;

pub(super) type Body = Full<Bytes>;

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

/// How long a `min_valid` request waits for the account's task to take up the
/// refresh request before concluding it declined (the account is held after its
/// credentials were refused).
const POKE_ACK: Duration = Duration::from_secs(1);

pub(super) async fn handle(req: Request<Incoming>, ctx: &Ctx, caller: &Caller) -> Response<Body> {
    let resp = route(req, ctx, caller).await;
    ctx.metrics
        .request(caller.listener(), resp.status().as_u16());
    resp
}

async fn route(req: Request<Incoming>, ctx: &Ctx, caller: &Caller) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let get = parts.method == Method::GET || parts.method == Method::HEAD;
    if path == api::METRICS {
        return if get {
            metrics(ctx, caller)
        } else {
            not_allowed("GET, HEAD")
        };
    }
    if path == api::HEALTH {
        return if get {
            health(ctx, caller)
        } else {
            not_allowed("GET, HEAD")
        };
    }
    let Caller::Local(peer) = caller else {
        return no_endpoint(path);
    };
    if path == api::TOKENS {
        return if get {
            list(ctx, peer)
        } else {
            not_allowed("GET, HEAD")
        };
    }
    if path == api::CLUSTER {
        return if get {
            cluster(ctx, peer)
        } else {
            not_allowed("GET, HEAD")
        };
    }
    if path == api::DAEMON {
        return if get {
            daemon(ctx, peer)
        } else {
            not_allowed("GET, HEAD")
        };
    }
    let Some(rest) = path
        .strip_prefix(api::TOKENS)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return no_endpoint(path);
    };
    let (name, action) = rest.split_once('/').unwrap_or((rest, ""));
    match action {
        "" | "raw" if get => {
            let min_valid = match min_valid(parts.uri.query()) {
                Ok(v) => v,
                Err(resp) => return resp,
            };
            token(ctx, peer, name, action == "raw", min_valid).await
        }
        "" | "raw" => not_allowed("GET, HEAD"),
        "refresh" | "reseed" if parts.method == Method::POST => {
            refresh(ctx, peer, name, action == "reseed", &parts, body).await
        }
        "refresh" | "reseed" => not_allowed("POST"),
        "dpop" if parts.method == Method::POST => {
            super::dpop::proof(ctx, peer, name, &parts, body).await
        }
        "dpop" => not_allowed("POST"),
        _ => no_endpoint(path),
    }
}

/// `GET /v1/daemon`: root and the daemon's own user only (the config's path and the
/// errors of a refused reload are the operator's).
fn daemon(ctx: &Ctx, peer: &super::Peer) -> Response<Body> {
    let Some(d) = &ctx.daemon else {
        return no_endpoint(api::DAEMON);
    };
    if !peer.privileged {
        return error(
            StatusCode::FORBIDDEN,
            code::FORBIDDEN,
            format!(
                "{} takes root or the daemon's own user (uid {})",
                api::DAEMON,
                nix::unistd::geteuid()
            ),
        );
    }
    let info = api::DaemonInfo::of(&d.borrow());
    json(StatusCode::OK, &info)
}

/// The `min_valid` query parameter, if any.
#[allow(clippy::result_large_err)]
fn min_valid(query: Option<&str>) -> Result<Option<Duration>, Response<Body>> {
    let Some(q) = query else { return Ok(None) };
    for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
        if k == api::MIN_VALID {
            return api::parse_min_valid(&v).map(Some).ok_or_else(|| {
                error(
                    StatusCode::BAD_REQUEST,
                    code::BAD_REQUEST,
                    format!("min_valid={v:?} is neither whole seconds nor a duration like 5m"),
                )
            });
        }
    }
    Ok(None)
}

/// The `force` query parameter of the refresh `POST`: false when absent.
#[allow(clippy::result_large_err)]
fn force(query: Option<&str>) -> Result<bool, Response<Body>> {
    let Some(q) = query else { return Ok(false) };
    for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
        if k == api::FORCE {
            return api::parse_force(&v).ok_or_else(|| {
                error(
                    StatusCode::BAD_REQUEST,
                    code::BAD_REQUEST,
                    format!("force={v:?} is neither true nor false"),
                )
            });
        }
    }
    Ok(false)
}

/// The account `name` if it exists and `peer` may read it.
fn readable<'a>(
    accounts: &'a crate::account::Accounts,
    peer: &super::Peer,
    name: &str,
) -> Option<&'a AccountView> {
    accounts
        .get(name)
        .filter(|v| peer.may_read(&v.account.options.access))
}

fn visible(caller: &Caller, view: &AccountView) -> bool {
    match caller {
        Caller::Local(peer) => peer.may_read(&view.account.options.access),
        Caller::Monitor => true,
    }
}

/// `GET /v1/tokens/{account}[/raw]`.
async fn token(
    ctx: &Ctx,
    peer: &super::Peer,
    name: &str,
    raw: bool,
    min_valid: Option<Duration>,
) -> Response<Body> {
    let accounts = ctx.accounts.borrow().clone();
    let Some(view) = readable(&accounts, peer, name) else {
        return no_account(name);
    };
    let now = SystemTime::now();
    let found = {
        let s = view.state.borrow();
        s.valid_token(now)
            .filter(|t| lasts(t, now, min_valid))
            .cloned()
    };
    let token = match (found, min_valid) {
        (Some(t), _) => t,
        (None, Some(min)) => match wait_for(view, min, ctx).await {
            Ok(t) => t,
            Err(resp) => return resp,
        },
        (None, None) => return unavailable(name, &view.state.borrow(), now, None),
    };
    let mut resp = if raw {
        respond(
            StatusCode::OK,
            TEXT,
            Bytes::copy_from_slice(token.access_token.expose().as_bytes()),
        )
    } else {
        json(StatusCode::OK, &TokenJson::new(name, &token))
    };
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn lasts(token: &Token, now: SystemTime, min_valid: Option<Duration>) -> bool {
    let left = token.expires_at.duration_since(now).unwrap_or_default();
    min_valid.is_none_or(|m| left >= m)
}

/// Asks the account for a refresh and waits, within limits, for a token that lasts
/// `min_valid`. Gives up as soon as the answer is known: the refresh brought a token
/// that is still too short, it failed, the account declined (it is held after its
/// credentials were refused), or the next possible refresh is too far away.
#[allow(clippy::result_large_err)]
async fn wait_for(
    view: &AccountView,
    min_valid: Duration,
    ctx: &Ctx,
) -> Result<Arc<Token>, Response<Body>> {
    let a = &view.account;
    let limit = ctx.limits.max_wait.min(
        a.options.schedule.min_refresh_interval + a.request_timeout() + Duration::from_secs(2),
    );
    let deadline = Instant::now() + limit;
    let mut rx = view.state.clone();
    let (old_token, old_failures) = {
        let s = rx.borrow_and_update();
        // The provider's tokens live shorter than asked for: a refresh cannot help, and
        // the provider is not asked in vain.
        if let Some(t) = s.valid_token(SystemTime::now()) {
            if t.lifetime() < min_valid {
                let mut resp = unavailable(&a.name, &s, SystemTime::now(), Some(min_valid));
                *resp.body_mut() = Full::new(Bytes::from(json_body(&ErrorBody {
                    error: code::EXPIRES_TOO_SOON.into(),
                    message: format!(
                        "tokens of account {:?} live {}, less than min_valid {}",
                        a.name,
                        secs(t.lifetime()),
                        secs(min_valid)
                    ),
                })));
                return Err(resp);
            }
        }
        (s.token.clone(), s.failures)
    };
    view.refresh_now();
    let mut acked = false;
    loop {
        let now = SystemTime::now();
        {
            let s = rx.borrow_and_update();
            if let Some(t) = s
                .valid_token(now)
                .filter(|t| lasts(t, now, Some(min_valid)))
            {
                return Ok(t.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if acked && s.status != Status::Refreshing {
                let new_token = match (&s.token, &old_token) {
                    (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                    (a, b) => a.is_some() != b.is_some(),
                };
                let failed = s.failures > old_failures;
                let too_late = s.next_attempt.is_some_and(|n| n > now + left);
                if new_token || failed || too_late {
                    return Err(unavailable(&a.name, &s, now, Some(min_valid)));
                }
            }
            if left.is_zero() {
                return Err(unavailable(&a.name, &s, now, Some(min_valid)));
            }
        }
        let until = if acked {
            deadline
        } else {
            deadline.min(Instant::now() + POKE_ACK)
        };
        match tokio::time::timeout_at(until, rx.changed()).await {
            Ok(Ok(())) => acked = true,
            // The account stopped (a reload removed it).
            Ok(Err(_)) => {
                return Err(unavailable(&a.name, &rx.borrow(), now, Some(min_valid)));
            }
            Err(_) if !acked => {
                // No word from the task: unless a refresh is already under way, it
                // declined the request.
                let s = rx.borrow();
                if s.status != Status::Refreshing {
                    return Err(unavailable(&a.name, &s, SystemTime::now(), Some(min_valid)));
                }
                acked = true;
            }
            Err(_) => {}
        }
    }
}

/// 503 for an account without a (long enough) token, with `Retry-After`.
fn unavailable(
    name: &str,
    s: &TokenState,
    now: SystemTime,
    min_valid: Option<Duration>,
) -> Response<Body> {
    let retry = s
        .next_attempt
        .and_then(|n| n.duration_since(now).ok())
        .map_or(1, |d| d.as_secs().clamp(1, 3600));
    let why = match &s.last_error {
        Some(e) if s.status != Status::Fresh => format!("{}: {e}", s.status.as_str()),
        _ => s.status.as_str().to_owned(),
    };
    let (code, message) = match (s.valid_token(now), min_valid) {
        (Some(t), Some(min)) => (
            code::EXPIRES_TOO_SOON,
            format!(
                "the token of account {name:?} expires in {}, sooner than min_valid {}, and no newer one could be had yet ({why}; next refresh in {retry}s)",
                secs(t.expires_at.duration_since(now).unwrap_or_default()),
                secs(min),
            ),
        ),
        _ => (
            code::NO_TOKEN,
            format!("account {name:?} has no valid token ({why}); try again in {retry}s"),
        ),
    };
    let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, code, message);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry));
    resp
}

fn secs(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(d.as_secs()))
}

/// `GET /v1/tokens`.
fn list(ctx: &Ctx, peer: &super::Peer) -> Response<Body> {
    let accounts = ctx.accounts.borrow().clone();
    let now = SystemTime::now();
    let list = AccountList {
        accounts: accounts
            .values()
            .filter(|v| peer.may_read(&v.account.options.access))
            .map(|v| info(v, now))
            .collect(),
    };
    json(StatusCode::OK, &list)
}

fn info(view: &AccountView, now: SystemTime) -> AccountInfo {
    let s = view.state.borrow();
    AccountInfo {
        account: view.account.name.clone(),
        status: s.status,
        valid: s.valid_token(now).is_some(),
        expires_at: s.token.as_ref().map(|t| rfc3339(t.expires_at)),
        last_refresh: s.last_refresh.map(rfc3339),
        last_error: s.last_error.clone(),
        next_refresh: s.next_attempt.map(rfc3339),
        leader: s.leader.clone(),
        refreshed_by: s.refreshed_by.clone(),
        degraded: s.degraded,
        cluster_warning: s.cluster_warning.clone(),
        urls: view.account.urls.iter().map(|u| u.to_string()).collect(),
        credential_username: view.account.options.credential_username.clone(),
    }
}

/// `GET /v1/cluster` (SPEC §4, §8): this member, whether it reaches etcd, and who
/// refreshes each shared account the caller may read. 404 without `[cluster]`.
fn cluster(ctx: &Ctx, peer: &super::Peer) -> Response<Body> {
    let accounts = ctx.accounts.borrow().clone();
    let Some(status) = accounts.values().find_map(|v| v.cluster.clone()) else {
        return error(
            StatusCode::NOT_FOUND,
            code::NOT_FOUND,
            "not in cluster mode: the config has no [cluster] (or no account shared with it)"
                .into(),
        );
    };
    let info = api::ClusterInfo {
        member: status.member().to_owned(),
        reachable: status.reachable(),
        problem: status.problem(),
        clock_skew_seconds: status.clock_skew_seconds().map(|s| s.round() as i64),
        accounts: accounts
            .values()
            .filter(|v| v.cluster.is_some() && peer.may_read(&v.account.options.access))
            .map(|v| {
                let s = v.state.borrow();
                api::ClusterAccount {
                    account: v.account.name.clone(),
                    leader: s.leader.clone(),
                    refreshed_by: s.refreshed_by.clone(),
                    degraded: s.degraded,
                }
            })
            .collect(),
    };
    json(StatusCode::OK, &info)
}

/// `GET /v1/health`: 200 when every account the caller may read holds a valid token,
/// else 503 (SPEC §4). Accounts the caller cannot read do not count: an unprivileged
/// caller learns nothing about them, not even that one fails.
fn health(ctx: &Ctx, caller: &Caller) -> Response<Body> {
    let accounts = ctx.accounts.borrow().clone();
    let now = SystemTime::now();
    let mut healthy = true;
    let mut not_ready = Vec::new();
    let mut degraded = Vec::new();
    for view in accounts.values().filter(|v| visible(caller, v)) {
        let s = view.state.borrow();
        if s.degraded {
            degraded.push(view.account.name.clone());
        }
        if s.valid_token(now).is_some() {
            continue;
        }
        healthy = false;
        not_ready.push(NotReady {
            account: view.account.name.clone(),
            status: s.status,
            last_error: match caller {
                Caller::Local(_) => s.last_error.clone(),
                Caller::Monitor => None,
            },
        });
    }
    let (status, word) = if healthy {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    };
    json(
        status,
        &Health {
            status: word.into(),
            not_ready,
            degraded,
        },
    )
}

/// `GET /metrics`.
fn metrics(ctx: &Ctx, caller: &Caller) -> Response<Body> {
    let accounts = ctx.accounts.borrow().clone();
    let text = ctx.metrics.encode(
        accounts.values().filter(|v| visible(caller, v)),
        SystemTime::now(),
    );
    respond(StatusCode::OK, crate::metrics::CONTENT_TYPE, text)
}

/// `POST /v1/tokens/{account}/refresh[?force=true]`: 202; the account refreshes as
/// soon as its `min_refresh_interval` allows, or, forced, at once, ending a hold or a
/// rate-limit wait for one attempt.
///
/// Checked in this order, so that nothing tells a caller more than it may know: the
/// query (400), the account (404, the same for one the caller may not read), then the
/// caller's right to force (403). Forcing takes root or the daemon's own user: it
/// overrides what protects the provider (a hold after refused credentials, its
/// rate limit), which an account's readers should not be able to do.
///
/// `POST /v1/tokens/{account}/reseed` (`reseed`): the same checks; root or the
/// daemon's own user only, and only for an account of the refresh_token grant.
async fn refresh(
    ctx: &Ctx,
    peer: &super::Peer,
    name: &str,
    reseed: bool,
    parts: &hyper::http::request::Parts,
    body: Incoming,
) -> Response<Body> {
    let limits = &ctx.limits;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return too_large(limits.max_body);
    }
    match tokio::time::timeout(
        limits.body_timeout,
        Limited::new(body, limits.max_body).collect(),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return too_large(limits.max_body)
        }
        Ok(Err(e)) => {
            return closing(error(
                StatusCode::BAD_REQUEST,
                code::BAD_REQUEST,
                format!("failed to read the request body: {e}"),
            ))
        }
        Err(_) => {
            return closing(error(
                StatusCode::REQUEST_TIMEOUT,
                code::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}",
                    secs(limits.body_timeout)
                ),
            ))
        }
    }
    let force = match force(parts.uri.query()) {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let accounts = ctx.accounts.borrow().clone();
    let Some(view) = readable(&accounts, peer, name) else {
        return no_account(name);
    };
    if reseed {
        if !peer.privileged {
            return error(
                StatusCode::FORBIDDEN,
                code::FORBIDDEN,
                format!(
                    "reseed takes root or the daemon's own user (uid {}): it starts the refresh-token chain again",
                    nix::unistd::geteuid()
                ),
            );
        }
        if !view.account.rotates() {
            return error(
                StatusCode::CONFLICT,
                code::CONFLICT,
                format!("account {name:?} is not of the refresh_token grant: it has no chain to re-seed"),
            );
        }
        tracing::warn!(account = %name, uid = peer.uid, pid = peer.pid, "reseed asked for over the socket");
        view.reseed();
    } else if !force {
        view.refresh_now();
    } else if peer.privileged {
        tracing::info!(account = %name, uid = peer.uid, pid = peer.pid, "forced refresh asked for over the socket");
        view.force_refresh();
    } else {
        return error(
            StatusCode::FORBIDDEN,
            code::FORBIDDEN,
            format!(
                "force=true takes root or the daemon's own user (uid {}): it ends a hold or \
                 a rate-limit wait; ask without force, and the account refreshes as soon as \
                 it may",
                nix::unistd::geteuid()
            ),
        );
    }
    json(
        StatusCode::ACCEPTED,
        &api::RefreshAccepted {
            account: name.to_owned(),
            status: "accepted".into(),
        },
    )
}

fn too_large(max: usize) -> Response<Body> {
    closing(error(
        StatusCode::PAYLOAD_TOO_LARGE,
        code::PAYLOAD_TOO_LARGE,
        format!("request bodies are limited to {max} bytes"),
    ))
}

/// Marks a response as the connection's last: the request's body may be unread.
fn closing(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The same answer for an account that does not exist and one the caller may not read.
fn no_account(name: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        code::NOT_FOUND,
        format!("no account {name:?} that you may read"),
    )
}

fn no_endpoint(path: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        code::NOT_FOUND,
        format!("no such endpoint: {path}"),
    )
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = error(
        StatusCode::METHOD_NOT_ALLOWED,
        code::METHOD_NOT_ALLOWED,
        format!("this endpoint takes {allow}"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

fn error(status: StatusCode, code: &str, message: String) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: code.to_owned(),
            message,
        },
    )
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    respond(status, JSON, json_body(value))
}

fn json_body<T: Serialize>(value: &T) -> Vec<u8> {
    let mut body = serde_json::to_vec(value).expect("the wire types always serialize");
    body.push(b'\n');
    body
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
