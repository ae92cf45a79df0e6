//! The answers every route shares: JSON bodies, the error body of SPEC §4 with its
//! code, and the fixed refusals (404, 405, 413, a closing daemon).

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
