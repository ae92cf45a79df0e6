//! `POST /v1/tokens/{account}/dpop` (SPEC §4, §9): a DPoP proof for one request a reader
//! is about to make with a DPoP-bound token, signed with the key tokend keeps, with the
//! token it is for. The key never leaves tokend; a reader gets a proof for one method
//! and one URL, and only for a URL under one of the account's `urls`.
//!
//! The same access rules as reading the token (an account the caller may not read is
//! answered like one that does not exist). The routing is in `routes`; the proof itself
//! is made in `oauth::dpop`.

use std::time::SystemTime;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::api::{code, DpopProof, DpopRequest};
use super::reply::{error, json, no_account, read_body, Body};
use super::tokens::{readable, unavailable};
use super::Ctx;
use crate::clock::rfc3339;

/// The longest nonce passed through (servers send a few dozen characters).
const MAX_NONCE: usize = 512;

/// `POST /v1/tokens/{account}/dpop`.
pub(super) async fn proof(
    ctx: &Ctx,
    peer: &super::Peer,
    name: &str,
    parts: &hyper::http::request::Parts,
    body: Incoming,
) -> Response<Body> {
    let bytes = match read_body(&ctx.limits, parts, body).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let accounts = ctx.accounts.borrow().clone();
    let Some(view) = readable(&accounts, peer, name) else {
        return no_account(name);
    };
    let account = &view.account;
    if account.dpop.is_none() {
        // Whatever the body says: the account is not one that takes proofs (as a
        // reseed of an account without a chain: 409).
        return error(
            StatusCode::CONFLICT,
            code::CONFLICT,
            format!(
                "account {name:?} is not DPoP-bound (token_binding = \"dpop\"): send its token as a Bearer token"
            ),
        );
    }
    let req: DpopRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        // serde_json names the position and the field, never the input's values.
        Err(e) => {
            return bad(format!(
                "the body must be JSON {{\"method\", \"url\", \"nonce\"?}}: {e}"
            ))
        }
    };
    if req.method.is_empty() || req.method.len() > 32 || !req.method.bytes().all(is_tchar) {
        return bad(format!("{:?} is not an HTTP method", req.method));
    }
    if let Some(n) = &req.nonce {
        if n.is_empty() || n.len() > MAX_NONCE || !n.bytes().all(|b| b.is_ascii_graphic()) {
            return bad(
                "the nonce is not a DPoP-Nonce value (1 to 512 visible ASCII characters)".into(),
            );
        }
    }
    let url = match url::Url::parse(&req.url) {
        Ok(u) => u,
        Err(e) => return bad(format!("{:?} is not a URL: {e}", req.url)),
    };
    if !account.urls.iter().any(|base| under(&url, base)) {
        let urls: Vec<&str> = account.urls.iter().map(url::Url::as_str).collect();
        return bad(format!(
            "{} is not under the urls of account {name:?} ({}): proofs are minted only for those",
            crate::oauth::dpop::htu(&url),
            urls.join(", ")
        ));
    }
    let now = SystemTime::now();
    let (token, key) = {
        let s = view.state.borrow();
        match (s.valid_token(now).cloned(), s.dpop.clone()) {
            (Some(t), Some(k)) => (t, k),
            _ => return unavailable(name, &s, now, None),
        }
    };
    let proof = match key.proof(
        &req.method,
        &url,
        Some(token.access_token.expose()),
        req.nonce.as_deref(),
        now,
    ) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(account = %name, "failed to sign a DPoP proof: {e}");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("failed to sign a DPoP proof: {e}"),
            );
        }
    };
    let body = DpopProof {
        authorization: format!("DPoP {}", token.access_token.expose()),
        dpop: proof.expose().to_owned(),
        expires_at: rfc3339(token.expires_at),
    };
    let mut resp = json(StatusCode::OK, &body);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Whether `url` is under `base`: the same origin, and a path that is `base`'s or goes
/// on below it (at a `/`: `https://h/api` covers `/api` and `/api/x`, not `/apix`). A
/// URL with a user or password is under nothing.
pub(crate) fn under(url: &url::Url, base: &url::Url) -> bool {
    if url.scheme() != base.scheme()
        || url.host() != base.host()
        || url.port_or_known_default() != base.port_or_known_default()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return false;
    }
    let (path, prefix) = (url.path(), base.path());
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// RFC 9110 §5.6.2 `tchar`: what a method is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn bad(message: String) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, code::BAD_REQUEST, message)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_under_a_base_at_a_path_boundary_on_the_same_origin() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        for (url, base, want) in [
            (
                "https://fhir.example/r4/Patient?x=1",
                "https://fhir.example/r4/",
                true,
            ),
            ("https://fhir.example/r4", "https://fhir.example/r4", true),
            ("https://fhir.example/r4/x", "https://fhir.example/r4", true),
            ("https://fhir.example/r4x", "https://fhir.example/r4", false),
            (
                "https://fhir.example:443/r4/x",
                "https://fhir.example/r4/",
                true,
            ),
            (
                "https://fhir.example:8443/r4/x",
                "https://fhir.example/r4/",
                false,
            ),
            (
                "http://fhir.example/r4/x",
                "https://fhir.example/r4/",
                false,
            ),
            (
                "https://evil.example/r4/x",
                "https://fhir.example/r4/",
                false,
            ),
            (
                "https://fhir.example.evil/r4/x",
                "https://fhir.example/",
                false,
            ),
            (
                "https://u:p@fhir.example/r4/x",
                "https://fhir.example/",
                false,
            ),
            ("https://fhir.example/", "https://fhir.example/r4/", false),
        ] {
            assert_eq!(under(&u(url), &u(base)), want, "{url} under {base}");
        }
    }
}
