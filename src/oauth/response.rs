//! Reading token endpoint answers: RFC 6749 §5.1 tokens (with `expires_in` as a number or
//! a numeric string, the JWT `exp` when it is absent), §5.2 error bodies, `Retry-After`
//! and Okta's `X-Rate-Limit-Reset`. Of an error body only `error` and
//! `error_description` are kept.

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use reqwest::header::HeaderMap;
use serde_json::{Map, Value};

use super::caps::{cap_rate_limit, MAX_LIFETIME, RATE_LIMIT_CAP};
use super::Error;
use crate::config::Secret;

/// An access token and what the provider said about it.
#[derive(Clone, PartialEq)]
pub struct Token {
    pub access_token: Secret,
    /// As the provider spelled it (its common spellings are not allocated: see
    /// [`token_type`]).
    pub token_type: Cow<'static, str>,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    pub scope: Option<String>,
    pub refresh_token: Option<Secret>,
    /// Fields of the response this daemon does not interpret (`consented_on`, `id_token`,
    /// ...), kept as sent. Not shown by `Debug`: they may be credentials too.
    pub extra: Map<String, Value>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("access_token", &self.access_token)
            .field("token_type", &self.token_type)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("scope", &self.scope)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("extra", &self.extra.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A token type as a token keeps it: the spellings nearly every provider sends are not
/// an allocation of their own (each account holds its token for the daemon's life; a
/// string made when the token arrives, among the temporaries of its request, also
/// keeps a page of the heap from being returned: issue 21).
pub fn token_type(s: String) -> Cow<'static, str> {
    const COMMON: [&str; 4] = ["Bearer", "bearer", "DPoP", "dpop"];
    match COMMON.iter().find(|c| **c == s) {
        Some(c) => Cow::Borrowed(c),
        None => Cow::Owned(s),
    }
}

impl Token {
    /// The lifetime the provider granted.
    pub fn lifetime(&self) -> Duration {
        self.expires_at
            .duration_since(self.issued_at)
            .unwrap_or_default()
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now < self.expires_at
    }
}

fn malformed(status: u16, reason: impl Into<String>) -> Error {
    Error::Malformed {
        status,
        reason: reason.into(),
        rotated: None,
    }
}

/// Parses a 2xx answer. `default_lifetime` applies when there is neither `expires_in` nor
/// a JWT `exp`. A body may start with a UTF-8 byte-order mark (some gateways add one).
///
/// The refresh token is taken first: an answer that is wrong in any other way still
/// hands it back in [`Error::Malformed`], because the provider may have rotated the
/// chain with it, and the old one is spent (SPEC §6).
pub fn parse_success(
    status: u16,
    body: &[u8],
    now: SystemTime,
    default_lifetime: Duration,
) -> Result<Token, Error> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        // serde_json's message names a position and a category, never the input.
        malformed(
            status,
            format!(
                "not JSON ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ),
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err(malformed(status, "not a JSON object"));
    };
    let refresh_token = match obj.remove("refresh_token") {
        Some(Value::String(s)) if !s.is_empty() => Some(Secret::new(s)),
        _ => None,
    };
    let bad = |reason: &str| Error::Malformed {
        status,
        reason: reason.to_owned(),
        rotated: refresh_token.clone(),
    };
    let access_token = match obj.remove("access_token") {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(Value::String(_)) => return Err(bad("access_token is empty")),
        Some(_) => return Err(bad("access_token is not a string")),
        None => return Err(bad("no access_token")),
    };
    // The token ends up in a header line, an env file and HTTP answers: anything outside
    // visible ASCII would break them (or inject into them).
    if !access_token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(
            "access_token holds characters that are not visible ASCII",
        ));
    }
    let token_type = match obj.remove("token_type") {
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()) => {
            token_type(s)
        }
        Some(_) => return Err(bad("token_type is not a word")),
        // RFC 6749 requires it; some providers leave it out. Bearer is what they mean.
        None => Cow::Borrowed("Bearer"),
    };
    // Whatever a provider states, a token lives a year at most (SPEC §6): no value can
    // overflow the clock arithmetic downstream or pin a token for centuries.
    let expires_in = match obj.remove("expires_in") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if f.is_finite() && f > 0.0 => Some(seconds_capped(f)),
            _ => return Err(bad("expires_in is not a positive number")),
        },
        Some(Value::String(s)) => match numeric_string(&s) {
            Some(d) => Some(d),
            None => return Err(bad("expires_in is not a positive number")),
        },
        Some(_) => return Err(bad("expires_in is not a number")),
    };
    let expires_at = match expires_in {
        Some(d) => now + d,
        None => match jwt_exp(&access_token) {
            Some(exp) if exp > now => exp.min(now + MAX_LIFETIME),
            Some(_) => {
                return Err(bad(
                    "the token's JWT exp is already past and there is no expires_in",
                ))
            }
            None => now + default_lifetime.min(MAX_LIFETIME),
        },
    };
    let scope = match obj.remove("scope") {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    Ok(Token {
        access_token: Secret::new(access_token),
        token_type,
        issued_at: now,
        expires_at,
        scope,
        refresh_token,
        // A map emptied by `remove` keeps its node (about 600 bytes); a token lives as
        // long as its account, thousands of them (issue #11).
        extra: if obj.is_empty() { Map::new() } else { obj },
    })
}

/// `expires_in` written as a string: digits (`"3600"`), or a decimal number
/// (`"3600.0"`, `"1.8e3"`); positive; at most [`MAX_LIFETIME`] (a number too large for
/// any type is still a huge lifetime). Words such as `"inf"` are no number here.
fn numeric_string(s: &str) -> Option<Duration> {
    let t = s.trim();
    if t.is_empty()
        || !t
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
    {
        return None;
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return match t.parse::<u64>() {
            Ok(0) => None,
            Ok(n) => Some(Duration::from_secs(n).min(MAX_LIFETIME)),
            Err(_) => Some(MAX_LIFETIME),
        };
    }
    match t.parse::<f64>() {
        Ok(f) if f.is_infinite() && f > 0.0 => Some(MAX_LIFETIME),
        Ok(f) if f.is_finite() && f > 0.0 => Some(seconds_capped(f)),
        _ => None,
    }
}

/// `secs` seconds (positive and finite), at most [`MAX_LIFETIME`].
fn seconds_capped(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs)
        .unwrap_or(MAX_LIFETIME)
        .min(MAX_LIFETIME)
}

/// The `exp` claim of a JWT, if the token is one. The signature is not checked: the
/// claim only tells when to refresh. An `exp` beyond what a `SystemTime` holds, or a
/// century away, comes back as about a century away; callers cap it further.
pub fn jwt_exp(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    if !(exp.is_finite() && exp > 0.0) {
        return None;
    }
    // Year 2200 at the latest: far enough to be capped by the caller, near enough that
    // no arithmetic on it overflows.
    const LATEST: f64 = 7_258_118_400.0;
    let secs = Duration::try_from_secs_f64(exp.min(LATEST)).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(secs)
}

/// Turns a non-2xx answer into an error, keeping only the RFC 6749 §5.2 fields.
pub fn parse_error(status: u16, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Error {
    let retry_after = retry_after(status, headers, now);
    #[derive(serde::Deserialize)]
    struct Body {
        error: String,
        error_description: Option<String>,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(b) if is_error_code(&b.error) => Error::OAuth {
            status,
            error: b.error,
            description: b.error_description.map(|d| clean_description(&d)),
            retry_after,
        },
        _ => Error::Http {
            status,
            retry_after,
        },
    }
}

/// RFC 6749 §5.2: error codes are printable ASCII without `"` and `\`.
fn is_error_code(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\')
}

/// One line, bounded: a description goes into logs and status tables.
fn clean_description(s: &str) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &one_line[..i]),
        None => one_line,
    }
}

/// When to try again, for the answers that ask for it (SPEC §6): a 429's or a 503's
/// `Retry-After` (seconds or an HTTP date, RFC 9110 §10.2.3) and, on a 429 only, Okta's
/// `X-Rate-Limit-Reset` (epoch seconds; Okta sends it on every answer, so on a 500 or
/// an `invalid_scope` it means nothing), the later of the two, capped at
/// [`RATE_LIMIT_CAP`] from `now`.
pub fn retry_after(status: u16, headers: &HeaderMap, now: SystemTime) -> Option<SystemTime> {
    if status != 429 && status != 503 {
        return None;
    }
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let ra = text("retry-after").and_then(|v| match v.parse::<u64>() {
        Ok(secs) => Some(now + Duration::from_secs(secs).min(RATE_LIMIT_CAP)),
        Err(_) => httpdate::parse_http_date(v).ok(),
    });
    let reset = text("x-rate-limit-reset")
        .filter(|_| status == 429)
        .and_then(|v| v.parse::<u64>().ok())
        // Past what the clock holds: as far as anything is obeyed.
        .map(|secs| {
            SystemTime::UNIX_EPOCH
                .checked_add(Duration::from_secs(secs))
                .unwrap_or(now + RATE_LIMIT_CAP)
        });
    ra.into_iter()
        .chain(reset)
        .max()
        .map(|t| cap_rate_limit(t, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn ok(body: &str) -> Result<Token, Error> {
        parse_success(200, body.as_bytes(), now(), HOUR)
    }

    #[test]
    fn common_token_types_are_kept_without_an_allocation_and_others_as_sent() {
        for (sent, borrowed) in [
            ("Bearer", true),
            ("bearer", true),
            ("DPoP", true),
            ("N_A", false),
        ] {
            let t = ok(&format!(r#"{{"access_token":"a","token_type":"{sent}"}}"#)).unwrap();
            assert_eq!(t.token_type, sent);
            assert_eq!(matches!(t.token_type, Cow::Borrowed(_)), borrowed, "{sent}");
        }
        let t = ok(r#"{"access_token":"a"}"#).unwrap();
        assert!(matches!(t.token_type, Cow::Borrowed("Bearer")));
    }

    fn jwt(claims: &str) -> String {
        let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", e("{\"alg\":\"RS256\"}"), e(claims))
    }

    #[test]
    fn number_and_string_expires_in() {
        let t = ok(
            r#"{"access_token":"abc","token_type":"bearer","expires_in":3600,"consented_on":123}"#,
        )
        .unwrap();
        assert_eq!(t.access_token.expose(), "abc");
        assert_eq!(t.token_type, "bearer");
        assert_eq!(t.expires_at, now() + HOUR);
        assert_eq!(t.extra["consented_on"], 123);
        let t = ok(r#"{"access_token":"abc","token_type":"Bearer","expires_in":"1800"}"#).unwrap();
        assert_eq!(t.lifetime(), Duration::from_secs(1800));
    }

    #[test]
    fn numeric_strings_with_a_fraction_and_a_byte_order_mark() {
        for (v, secs) in [
            ("\"3600.0\"", 3600),
            ("\" 1800.5 \"", 1800),
            ("\"1.2e3\"", 1200),
        ] {
            let t = ok(&format!(r#"{{"access_token":"a","expires_in":{v}}}"#))
                .unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(t.lifetime().as_secs(), secs, "{v}");
        }
        for v in [
            "\"inf\"", "\"NaN\"", "\"-5.0\"", "\"0.0\"", "\"1e\"", "\"0\"",
        ] {
            assert!(
                ok(&format!(r#"{{"access_token":"a","expires_in":{v}}}"#)).is_err(),
                "{v}"
            );
        }
        assert_eq!(
            ok(r#"{"access_token":"a","expires_in":"1e400"}"#)
                .unwrap()
                .lifetime(),
            MAX_LIFETIME
        );
        let mut body = b"\xEF\xBB\xBF".to_vec();
        body.extend_from_slice(br#"{"access_token":"bom","expires_in":60}"#);
        let t = parse_success(200, &body, now(), HOUR).unwrap();
        assert_eq!(t.access_token.expose(), "bom");
    }

    #[test]
    fn a_malformed_answer_still_hands_back_its_refresh_token() {
        for body in [
            r#"{"access_token":"a","expires_in":0,"refresh_token":"rt-new"}"#,
            r#"{"expires_in":60,"refresh_token":"rt-new"}"#,
            r#"{"access_token":"a b","refresh_token":"rt-new"}"#,
            r#"{"access_token":"a","token_type":7,"refresh_token":"rt-new"}"#,
        ] {
            let e = ok(body).unwrap_err();
            assert_eq!(
                e.rotated_refresh_token().map(|s| s.expose().to_owned()),
                Some("rt-new".to_owned()),
                "{body}"
            );
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("rt-new"), "{shown}");
        }
        assert!(ok(r#"{"expires_in":60}"#)
            .unwrap_err()
            .rotated_refresh_token()
            .is_none());
    }

    #[test]
    fn jwt_exp_when_expires_in_is_missing() {
        let exp = 1_700_000_000 + 600;
        let token = jwt(&format!("{{\"sub\":\"x\",\"exp\":{exp}}}"));
        let t = ok(&format!(
            r#"{{"access_token":"{token}","token_type":"Bearer"}}"#
        ))
        .unwrap();
        assert_eq!(
            t.expires_at,
            SystemTime::UNIX_EPOCH + Duration::from_secs(exp)
        );
        let past = jwt("{\"exp\":1000}");
        assert!(matches!(
            ok(&format!(r#"{{"access_token":"{past}"}}"#)),
            Err(Error::Malformed { .. })
        ));
    }

    #[test]
    fn default_lifetime_when_nothing_says() {
        let t = ok(r#"{"access_token":"opaque","token_type":"Bearer"}"#).unwrap();
        assert_eq!(t.expires_at, now() + HOUR);
    }

    #[test]
    fn malformed_answers_say_why_without_echoing() {
        for (body, why) in [
            ("<html>secret-page</html>", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"token_type":"Bearer"}"#, "no access_token"),
            (r#"{"access_token":""}"#, "empty"),
            (r#"{"access_token":"a b"}"#, "visible ASCII"),
            (r#"{"access_token":"ok","expires_in":-5}"#, "positive"),
            (r#"{"access_token":"ok","expires_in":"soon"}"#, "positive"),
        ] {
            let e = ok(body).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(why), "{body}: {msg}");
            assert!(!msg.contains("secret-page"));
        }
    }

    #[test]
    fn error_bodies_keep_only_error_and_description() {
        let h = HeaderMap::new();
        let e = parse_error(401, &h, br#"{"error":"invalid_client","error_description":"Client authentication failed","client_secret":"oops"}"#, now());
        assert_eq!(
            e.to_string(),
            "token endpoint answered HTTP 401: invalid_client (Client authentication failed)"
        );
        assert_eq!(e.oauth_code(), Some("invalid_client"));
        let e = parse_error(500, &h, b"stack trace with password=hunter2", now());
        assert_eq!(e.to_string(), "token endpoint answered HTTP 500");
    }

    #[test]
    fn retry_after_seconds_date_and_okta_reset() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "120".parse().unwrap());
        assert_eq!(
            retry_after(429, &h, now()),
            Some(now() + Duration::from_secs(120))
        );
        assert_eq!(
            retry_after(503, &h, now()),
            Some(now() + Duration::from_secs(120))
        );
        assert_eq!(retry_after(500, &h, now()), None, "only 429 and 503 ask");
        h.insert(
            "retry-after",
            httpdate::fmt_http_date(now() + HOUR / 2).parse().unwrap(),
        );
        assert_eq!(retry_after(429, &h, now()), Some(now() + HOUR / 2));
        let mut h = HeaderMap::new();
        h.insert("x-rate-limit-reset", "1700000042".parse().unwrap());
        let e = parse_error(429, &h, b"{}", now());
        assert_eq!(e.retry_after(), Some(now() + Duration::from_secs(42)));
        assert_eq!(retry_after(429, &HeaderMap::new(), now()), None);
        // Okta sends the reset on every answer: on a 500 or a 400 it is no rate limit.
        assert_eq!(parse_error(500, &h, b"{}", now()).retry_after(), None);
        let e = parse_error(400, &h, br#"{"error":"invalid_scope"}"#, now());
        assert_eq!(e.retry_after(), None);
    }

    #[test]
    fn waits_are_capped_at_an_hour() {
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            "Fri, 31 Dec 9999 23:59:59 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(429, &h, now()), Some(now() + HOUR));
        h.insert("retry-after", "18446744073709551615".parse().unwrap());
        assert_eq!(retry_after(429, &h, now()), Some(now() + HOUR));
        let mut h = HeaderMap::new();
        h.insert("x-rate-limit-reset", "99999999999999".parse().unwrap());
        assert_eq!(retry_after(429, &h, now()), Some(now() + HOUR));
        h.insert(
            "x-rate-limit-reset",
            "18446744073709551615".parse().unwrap(),
        );
        assert_eq!(retry_after(429, &h, now()), Some(now() + HOUR));
    }

    #[test]
    fn absurd_expiries_are_capped_at_a_year() {
        let year = MAX_LIFETIME;
        for body in [
            r#"{"access_token":"a","expires_in":"18446744073709551615"}"#.to_owned(),
            r#"{"access_token":"a","expires_in":"99999999999999999999999999"}"#.to_owned(),
            r#"{"access_token":"a","expires_in":3e11}"#.to_owned(),
            r#"{"access_token":"a","expires_in":1e308}"#.to_owned(),
            format!(r#"{{"access_token":"{}"}}"#, jwt(r#"{"exp":1e20}"#)),
            format!(r#"{{"access_token":"{}"}}"#, jwt(r#"{"exp":253402300800}"#)),
        ] {
            let t = ok(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert_eq!(t.expires_at, now() + year, "{body}");
            assert_eq!(crate::clock::rfc3339(t.expires_at).len(), 20);
        }
    }

    #[test]
    fn debug_shows_no_token() {
        let t = ok(r#"{"access_token":"tok-123","refresh_token":"rt-456","id_token":"idt-789"}"#)
            .unwrap();
        let dbg = format!("{t:?}");
        for s in ["tok-123", "rt-456", "idt-789"] {
            assert!(!dbg.contains(s), "{dbg}");
        }
    }
}
