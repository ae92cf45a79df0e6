//! `POST /v1/tokens/{account}/refresh` (and `force`, `reseed`): the operator's pokes,
//! with who may send which.

use hyper::body::Incoming;
use hyper::{Response, StatusCode};

use super::api::{self, code};
use super::reply::*;
use super::tokens::readable;
use super::Ctx;

/// The `force` query parameter of the refresh `POST`: false when absent.
#[allow(clippy::result_large_err)]
pub(super) fn force(query: Option<&str>) -> Result<bool, Response<Body>> {
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
pub(super) async fn refresh(
    ctx: &Ctx,
    peer: &super::Peer,
    name: &str,
    reseed: bool,
    parts: &hyper::http::request::Parts,
    body: Incoming,
) -> Response<Body> {
    if let Err(resp) = read_body(&ctx.limits, parts, body).await {
        return resp;
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
