//! Reading a token: `GET /v1/tokens/{account}` (json, raw, `min_valid`), who may
//! read it, and the 503 with Retry-After while an account has none.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use tokio::time::Instant;

use super::api::{self, code, ErrorBody};
use super::reply::*;
use super::{Caller, Ctx};
use crate::account::{AccountView, Status, TokenState};
use crate::oauth::Token;
use crate::output::render::TokenJson;

/// The account `name` if it exists and `peer` may read it.
pub(super) fn readable<'a>(
    accounts: &'a crate::account::Accounts,
    peer: &super::Peer,
    name: &str,
) -> Option<&'a AccountView> {
    accounts
        .get(name)
        .filter(|v| peer.may_read(&v.account.options.access))
}

pub(super) fn visible(caller: &Caller, view: &AccountView) -> bool {
    match caller {
        Caller::Local(peer) => peer.may_read(&view.account.options.access),
        Caller::Monitor => true,
    }
}

/// `GET /v1/tokens/{account}[/raw]`.
pub(super) async fn token(
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

pub(super) fn lasts(token: &Token, now: SystemTime, min_valid: Option<Duration>) -> bool {
    let left = token.expires_at.duration_since(now).unwrap_or_default();
    min_valid.is_none_or(|m| left >= m)
}

/// Asks the account for a refresh and waits, within limits, for a token that lasts
/// `min_valid`. Gives up as soon as the answer is known: the refresh brought a token
/// that is still too short, it failed, the account declined (it is held after its
/// credentials were refused), or the next possible refresh is too far away.
#[allow(clippy::result_large_err)]
pub(super) async fn wait_for(
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
pub(super) fn unavailable(
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

/// The `min_valid` query parameter, if any.
#[allow(clippy::result_large_err)]
pub(super) fn min_valid(query: Option<&str>) -> Result<Option<Duration>, Response<Body>> {
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

/// How long a `min_valid` request waits for the account's task to take up the
/// refresh request before concluding it declined (the account is held after its
/// credentials were refused).
pub(super) const POKE_ACK: Duration = Duration::from_secs(1);
