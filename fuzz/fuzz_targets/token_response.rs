//! The token endpoint's answer: `tokend::oauth::response::{parse_success, parse_error,
//! retry_after, jwt_exp}` on a status, headers and a body.
//!
//! Input starting with `HTTP/` is a raw answer (status line, header lines, an empty
//! line, the body; the seeds are such answers, as MSK's and Okta's look) read at a fixed
//! `now`. Anything else is built by `arbitrary`: any `now` up to year 2514, any status,
//! headers (`Retry-After` in seconds or as an HTTP date, Okta's `X-Rate-Limit-Reset`,
//! or any pair), and a body that is raw bytes or a token response built from parts
//! (`expires_in` as a number, a numeric string or anything else; the access token
//! opaque or a JWT with any `exp`), so that the fuzzer reaches the arithmetic quickly. Invariants: no panic; a token's `expires_at` is within
//! [`now`, `now + MAX_LIFETIME`], its access token and type visible ASCII; a wait is
//! within [`now`, `now + RATE_LIMIT_CAP`], and only on a 429 or a 503; every time
//! formats with `clock::rfc3339`; errors render; `Debug` of a token shows no token.
#![no_main]

use std::time::{Duration, SystemTime};

use arbitrary::Arbitrary;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{json, Map, Value};
use tokend::account::schedule::{MAX_LIFETIME, RATE_LIMIT_CAP};
use tokend::clock::rfc3339;
use tokend::config::Secret;
use tokend::oauth::response::{jwt_exp, parse_error, parse_success, retry_after};

#[derive(Arbitrary, Debug)]
struct Input {
    /// Seconds since the epoch, kept below year 2500.
    now: u32,
    now_high: u8,
    status: Status,
    default_lifetime: u32,
    headers: Vec<Header>,
    body: Body,
}

#[derive(Arbitrary, Debug)]
enum Status {
    Ok,
    TooMany,
    Unavailable,
    Other(u16),
}

#[derive(Arbitrary, Debug)]
enum Header {
    RetryAfterSecs(u64),
    /// An HTTP date, as seconds from `now` (either way).
    RetryAfterDate(i64),
    RateLimitReset(u64),
    /// An epoch time near `now`, as Okta sends it.
    RateLimitResetNear(i32),
    Named(KnownName, Vec<u8>),
    Any(String, Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum KnownName {
    RetryAfter,
    RateLimitReset,
    ContentType,
}

#[derive(Arbitrary, Debug)]
enum Body {
    Raw(Vec<u8>),
    Token {
        access_token: AccessToken,
        token_type: Option<String>,
        expires_in: Option<Expiry>,
        scope: Option<String>,
        refresh_token: Option<String>,
        extra: Vec<(String, String)>,
    },
    Error {
        error: String,
        description: Option<String>,
    },
}

#[derive(Arbitrary, Debug)]
enum AccessToken {
    Opaque(String),
    /// A JWT whose payload carries `exp` as the given JSON.
    Jwt(Claim),
    /// A JWT with any payload bytes.
    JwtRaw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Claim {
    /// Seconds from `now`.
    Near(i32),
    Int(i64),
    Float(f64),
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Expiry {
    Int(i64),
    Unsigned(u64),
    Float(f64),
    Text(String),
    Digits(u64),
    Null,
    Bool(bool),
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn number(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

impl AccessToken {
    fn render(&self, now: u64) -> String {
        let jwt = |payload: &[u8]| {
            format!(
                "{}.{}.c2ln",
                b64(br#"{"alg":"RS256","kid":"k1"}"#),
                b64(payload)
            )
        };
        match self {
            AccessToken::Opaque(s) => s.clone(),
            AccessToken::Jwt(claim) => {
                let exp = match claim {
                    Claim::Near(d) => json!(now as i64 + *d as i64),
                    Claim::Int(i) => json!(i),
                    Claim::Float(f) => number(*f),
                    Claim::Text(s) => json!(s),
                };
                jwt(json!({"sub": "svc", "exp": exp}).to_string().as_bytes())
            }
            AccessToken::JwtRaw(payload) => jwt(payload),
        }
    }
}

impl Body {
    fn render(&self, now: u64) -> Vec<u8> {
        match self {
            Body::Raw(b) => b.clone(),
            Body::Token {
                access_token,
                token_type,
                expires_in,
                scope,
                refresh_token,
                extra,
            } => {
                let mut obj = Map::new();
                for (k, v) in extra {
                    obj.insert(k.clone(), json!(v));
                }
                obj.insert("access_token".into(), json!(access_token.render(now)));
                if let Some(t) = token_type {
                    obj.insert("token_type".into(), json!(t));
                }
                if let Some(e) = expires_in {
                    let v = match e {
                        Expiry::Int(i) => json!(i),
                        Expiry::Unsigned(u) => json!(u),
                        Expiry::Float(f) => number(*f),
                        Expiry::Text(s) => json!(s),
                        Expiry::Digits(u) => json!(u.to_string()),
                        Expiry::Null => Value::Null,
                        Expiry::Bool(b) => json!(b),
                    };
                    obj.insert("expires_in".into(), v);
                }
                if let Some(s) = scope {
                    obj.insert("scope".into(), json!(s));
                }
                if let Some(r) = refresh_token {
                    obj.insert("refresh_token".into(), json!(r));
                }
                Value::Object(obj).to_string().into_bytes()
            }
            Body::Error { error, description } => {
                let mut obj = Map::new();
                obj.insert("error".into(), json!(error));
                if let Some(d) = description {
                    obj.insert("error_description".into(), json!(d));
                }
                Value::Object(obj).to_string().into_bytes()
            }
        }
    }
}

fn headers(input: &[Header], now: SystemTime) -> HeaderMap {
    let mut map = HeaderMap::new();
    let epoch = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    for h in input {
        let (name, value): (HeaderName, Vec<u8>) = match h {
            Header::RetryAfterSecs(s) => (
                HeaderName::from_static("retry-after"),
                s.to_string().into_bytes(),
            ),
            Header::RetryAfterDate(offset) => {
                let t = if *offset >= 0 {
                    now.checked_add(Duration::from_secs(*offset as u64))
                } else {
                    now.checked_sub(Duration::from_secs(offset.unsigned_abs()))
                };
                // httpdate formats years 1970..=9999 only.
                let Some(t) =
                    t.filter(|t| *t >= SystemTime::UNIX_EPOCH && epoch(*t) < 253_402_300_800)
                else {
                    continue;
                };
                (
                    HeaderName::from_static("retry-after"),
                    httpdate::fmt_http_date(t).into_bytes(),
                )
            }
            Header::RateLimitReset(s) => (
                HeaderName::from_static("x-rate-limit-reset"),
                s.to_string().into_bytes(),
            ),
            Header::RateLimitResetNear(d) => (
                HeaderName::from_static("x-rate-limit-reset"),
                (epoch(now) as i64 + *d as i64).to_string().into_bytes(),
            ),
            Header::Named(n, v) => (
                HeaderName::from_static(match n {
                    KnownName::RetryAfter => "retry-after",
                    KnownName::RateLimitReset => "x-rate-limit-reset",
                    KnownName::ContentType => "content-type",
                }),
                v.clone(),
            ),
            Header::Any(n, v) => match HeaderName::from_bytes(n.as_bytes()) {
                Ok(n) => (n, v.clone()),
                Err(_) => continue,
            },
        };
        if let Ok(v) = HeaderValue::from_bytes(&value) {
            map.append(name, v);
        }
    }
    map
}

fn check_wait(wait: Option<SystemTime>, status: u16, now: SystemTime) {
    if let Some(t) = wait {
        assert!(status == 429 || status == 503, "a wait on HTTP {status}");
        assert!(t >= now, "a wait that ends before now");
        assert!(t <= now + RATE_LIMIT_CAP, "a wait past the cap");
        let _ = rfc3339(t);
    }
}

/// A raw answer as the seeds hold them: `HTTP/1.1 STATUS ...`, header lines, an empty
/// line, the body; at a fixed `now` (2023-11-14, what the seeds' times are near).
fn raw_answer(data: &[u8]) -> Option<(u16, HeaderMap, Vec<u8>)> {
    let split = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or((data.len(), data.len()), |i| (i, i + 4));
    let (head, body) = (&data[..split.0], &data[split.1..]);
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = std::str::from_utf8(lines.next()?).ok()?;
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let mut map = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        map.append(n, v);
    }
    Some((status, map, body.to_vec()))
}

fuzz_target!(|data: &[u8]| {
    if data.starts_with(b"HTTP/") {
        if let Some((status, headers, body)) = raw_answer(data) {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
            check(status, &headers, &body, now, Duration::from_secs(3600));
        }
        return;
    }
    let Ok(input) = Input::arbitrary_take_rest(arbitrary::Unstructured::new(data)) else {
        return;
    };
    let now_secs = ((input.now_high as u64 % 8) << 32) | input.now as u64;
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now_secs);
    let status = match input.status {
        Status::Ok => 200,
        Status::TooMany => 429,
        Status::Unavailable => 503,
        Status::Other(s) => s,
    };
    let headers = headers(&input.headers, now);
    let body = input.body.render(now_secs);
    let default_lifetime = Duration::from_secs(input.default_lifetime as u64);
    check(status, &headers, &body, now, default_lifetime);
    if let Body::Token { access_token, .. } = &input.body {
        if let Some(exp) = jwt_exp(&access_token.render(now_secs)) {
            let _ = rfc3339(exp);
        }
    }
});

fn check(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
    default_lifetime: Duration,
) {
    check_wait(retry_after(status, headers, now), status, now);

    match parse_success(status, body, now, default_lifetime) {
        Ok(t) => {
            assert_eq!(t.issued_at, now);
            assert!(
                t.expires_at >= now,
                "a token that expired before it was issued"
            );
            assert!(
                t.expires_at <= now + MAX_LIFETIME,
                "a token that lives longer than a year"
            );
            assert!(t.lifetime() <= MAX_LIFETIME);
            let token = t.access_token.expose();
            assert!(!token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()));
            assert!(!t.token_type.is_empty());
            assert!(t.token_type.bytes().all(|b| b.is_ascii_graphic()));
            let _ = rfc3339(t.expires_at);
            let _ = rfc3339(t.issued_at);
            let _ = t.is_valid_at(now);
            // Debug shows no token, unless the same text shows as something else too
            // (the token `"Bearer` in `token_type: "Bearer"`).
            let shown = format!("{t:?}");
            let mut other = t.clone();
            other.access_token = Secret::new("x");
            if token.len() >= 8 && !format!("{other:?}").contains(token) {
                assert!(
                    !shown.contains(token),
                    "Debug shows the access token {token:?}: {shown}"
                );
            }
            if let Some(exp) = jwt_exp(token) {
                let _ = rfc3339(exp);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }

    let e = parse_error(status, headers, body, now);
    let msg = e.to_string();
    assert!(
        !msg.contains('\n') && !msg.contains('\r'),
        "a multi-line error: {msg:?}"
    );
    check_wait(e.retry_after(), status, now);
}
