//! The answers every route shares: JSON bodies, the error body of SPEC §4 with its
//! code, and the fixed refusals (404, 405, 413, a closing daemon).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;

use super::api::{code, ErrorBody};
pub(super) type Body = Full<Bytes>;

pub(super) const JSON: &str = "application/json";

pub(super) const TEXT: &str = "text/plain; charset=utf-8";

pub(super) fn too_large(max: usize) -> Response<Body> {
    closing(error(
        StatusCode::PAYLOAD_TOO_LARGE,
        code::PAYLOAD_TOO_LARGE,
        format!("request bodies are limited to {max} bytes"),
    ))
}

/// Marks a response as the connection's last: the request's body may be unread.
pub(super) fn closing(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The same answer for an account that does not exist and one the caller may not read.
pub(super) fn no_account(name: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        code::NOT_FOUND,
        format!("no account {name:?} that you may read"),
    )
}

pub(super) fn no_endpoint(path: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        code::NOT_FOUND,
        format!("no such endpoint: {path}"),
    )
}

pub(super) fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = error(
        StatusCode::METHOD_NOT_ALLOWED,
        code::METHOD_NOT_ALLOWED,
        format!("this endpoint takes {allow}"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

pub(super) fn error(status: StatusCode, code: &str, message: String) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: code.to_owned(),
            message,
        },
    )
}

pub(super) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    respond(status, JSON, json_body(value))
}

pub(super) fn json_body<T: Serialize>(value: &T) -> Vec<u8> {
    let mut body = serde_json::to_vec(value).expect("the wire types always serialize");
    body.push(b'\n');
    body
}

pub(super) fn respond(
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

/// The body of a request, read within the server's limits (its size, and the time it
/// may take to arrive), or the answer that says which limit it broke.
pub(super) async fn read_body(
    limits: &super::Limits,
    parts: &hyper::http::request::Parts,
    body: hyper::body::Incoming,
) -> Result<Bytes, Response<Body>> {
    use http_body_util::{BodyExt as _, Limited};
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return Err(too_large(limits.max_body));
    }
    match tokio::time::timeout(
        limits.body_timeout,
        Limited::new(body, limits.max_body).collect(),
    )
    .await
    {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(limits.max_body)),
        Ok(Err(e)) => Err(closing(error(
            StatusCode::BAD_REQUEST,
            code::BAD_REQUEST,
            format!("failed to read the request body: {e}"),
        ))),
        Err(_) => Err(closing(error(
            StatusCode::REQUEST_TIMEOUT,
            code::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {}",
                secs(limits.body_timeout)
            ),
        ))),
    }
}

pub(super) fn secs(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(d.as_secs()))
}
