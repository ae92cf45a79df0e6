//! Answers one request: the routes of SPEC §4. Reading tokens (and who may) is in
//! `tokens`, the operator's pokes in `refresh`, the answers they share in `reply`.
//!
//! An account the caller may not read is answered exactly like one that does not exist
//! (404, same body), so names cannot be probed. On the socket every answer, `/metrics`
//! and `/v1/health` included, shows only the accounts the caller may read; the TCP
//! monitoring listener shows every account's name and state, and nothing else.

use std::time::SystemTime;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use super::api::{self, code, AccountInfo, AccountList, Health, NotReady};
use super::{Caller, Ctx};
use crate::account::AccountView;
use crate::clock::rfc3339;

use super::refresh::refresh;
use super::reply::*;
use super::tokens::*;

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
        leader: s.cluster().leader.clone(),
        refreshed_by: s.cluster().refreshed_by.clone(),
        degraded: s.cluster().degraded,
        cluster_warning: s.cluster().warning.clone(),
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
                    leader: s.cluster().leader.clone(),
                    refreshed_by: s.cluster().refreshed_by.clone(),
                    degraded: s.cluster().degraded,
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
        if s.cluster().degraded {
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
    respond(StatusCode::OK, crate::account::metrics::CONTENT_TYPE, text)
}
