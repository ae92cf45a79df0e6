//! Finding a token endpoint (SPEC §1): an `issuer`'s
//! `{issuer}/.well-known/openid-configuration` (OpenID Connect Discovery 1.0 §4), falling
//! back to RFC 8414's `/.well-known/oauth-authorization-server` (inserted before the
//! issuer's path, RFC 8414 §3.1), or a `fhir_base`'s `{fhir_base}/.well-known/smart-configuration`
//! (SMART App Launch 2.x).
//!
//! A discovery document is hostile input: it is read up to [`MAX_DOCUMENT_BYTES`], parsed
//! by serde_json (whose recursion limit holds deep nesting), and only `token_endpoint` (and
//! `issuer`, which must be the one configured) is taken from it, checked like a configured
//! `token_url` (http(s), plain http only to loopback unless `allow_http`). What it says
//! never reaches a message unquoted or untruncated.
//!
//! Not here: when to discover and what a known endpoint is used for meanwhile
//! (`request::HttpEndpoint`), and where the answer is kept (the account's state file).

use std::time::Duration;

use reqwest::header::ACCEPT;
use serde::Deserialize;

use super::redact::redacted_url;
use super::{error_chain, Error};
use crate::config::TokenUrl;

/// The largest discovery document read (real ones are a few KiB).
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// The longest token endpoint URL taken from a document.
const MAX_URL_LEN: usize = 2048;

/// Where the discovery documents of `source` are, in the order they are tried.
pub fn document_urls(source: &TokenUrl) -> Vec<url::Url> {
    match source {
        TokenUrl::Fixed(_) => vec![],
        TokenUrl::Issuer(issuer) => {
            let mut rfc8414 = issuer.clone();
            let path = issuer.path().trim_end_matches('/');
            rfc8414.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
            vec![
                appended(issuer, "/.well-known/openid-configuration"),
                rfc8414,
            ]
        }
        TokenUrl::FhirBase(base) => vec![appended(base, "/.well-known/smart-configuration")],
    }
}

fn appended(base: &url::Url, suffix: &str) -> url::Url {
    let mut u = base.clone();
    let path = format!("{}{suffix}", base.path().trim_end_matches('/'));
    u.set_path(&path);
    u.set_query(None);
    u.set_fragment(None);
    u
}

/// Of a discovery document, only what tokend uses; anything else is ignored.
#[derive(Deserialize)]
struct Document {
    issuer: Option<serde_json::Value>,
    token_endpoint: Option<serde_json::Value>,
}

/// `s` for a message: quoted, control characters escaped, at most 100 characters.
fn quoted(s: &str) -> String {
    let mut q: String = s.chars().take(100).collect();
    if q.len() < s.len() {
        q.push('…');
    }
    format!("{q:?}")
}

/// Whether a discovered token endpoint may be used: https, or plain http to loopback,
/// or with `allow_http` (the rule a configured `token_url` is held to).
pub fn allowed(url: &url::Url, allow_http: bool) -> bool {
    match url.scheme() {
        "https" => true,
        "http" => allow_http || crate::config::is_loopback(url),
        _ => false,
    }
}

/// The token endpoint a discovery document of `source` names, checked; the error says
/// what is wrong with the document.
pub fn parse(doc: &[u8], source: &TokenUrl, allow_http: bool) -> Result<url::Url, String> {
    let doc: Document = serde_json::from_slice(doc)
        .map_err(|e| format!("not a JSON object with a token_endpoint ({e})"))?;
    if let TokenUrl::Issuer(issuer) = source {
        // RFC 8414 §3.3, OpenID Connect Discovery §4.3: the document is the issuer's own.
        let want = issuer.as_str().trim_end_matches('/');
        match &doc.issuer {
            Some(serde_json::Value::String(s)) if s.trim_end_matches('/') == want => {}
            Some(serde_json::Value::String(s)) => {
                return Err(format!(
                    "names the issuer {}, not {:?} (RFC 8414 §3.3: a document of another issuer is not used)",
                    quoted(s),
                    issuer.as_str()
                ))
            }
            _ => return Err("has no \"issuer\" string".into()),
        }
    }
    let endpoint = match &doc.token_endpoint {
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err("has a \"token_endpoint\" that is not a string".into()),
        None => return Err("has no \"token_endpoint\"".into()),
    };
    if endpoint.len() > MAX_URL_LEN {
        return Err(format!(
            "has a token_endpoint longer than {MAX_URL_LEN} characters"
        ));
    }
    let url = url::Url::parse(endpoint).map_err(|e| {
        format!(
            "has a token_endpoint {} that is no URL ({e})",
            quoted(endpoint)
        )
    })?;
    if !matches!(url.scheme(), "https" | "http") || !url.has_host() {
        return Err(format!(
            "has a token_endpoint {} that is no http:// or https:// URL",
            quoted(endpoint)
        ));
    }
    if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
        return Err("has a token_endpoint with a user, password or fragment".into());
    }
    if !allowed(&url, allow_http) {
        return Err(format!(
            "names the plain http:// token endpoint {}, which would get the credentials in the clear: \
             use https://, or set allow_http = true for this account",
            quoted(&redacted_url(&url))
        ));
    }
    Ok(url)
}

/// Reads the discovery documents of `source` in turn until one names a usable token
/// endpoint. A failure is [`Error::Discovery`]: transient, like a token endpoint that
/// cannot be reached (SPEC §1).
pub async fn discover(
    client: &reqwest::Client,
    source: &TokenUrl,
    allow_http: bool,
    timeout: Duration,
    has_client_cert: bool,
) -> Result<url::Url, Error> {
    let mut problems = Vec::new();
    for url in document_urls(source) {
        match fetch_one(client, &url, timeout, has_client_cert).await {
            Ok(body) => match parse(&body, source, allow_http) {
                Ok(endpoint) => return Ok(endpoint),
                Err(why) => problems.push(format!("{} {why}", redacted_url(&url))),
            },
            Err(why) => problems.push(format!("{}: {why}", redacted_url(&url))),
        }
    }
    Err(Error::Discovery {
        from: source.key(),
        reason: problems.join("; "),
    })
}

/// GETs one document: 2xx, at most [`MAX_DOCUMENT_BYTES`].
async fn fetch_one(
    client: &reqwest::Client,
    url: &url::Url,
    timeout: Duration,
    has_client_cert: bool,
) -> Result<Vec<u8>, String> {
    let describe = |e: reqwest::Error| describe(e, timeout, has_client_cert);
    let mut resp = client
        .get(url.clone())
        .header(ACCEPT, "application/json")
        .timeout(timeout)
        .send()
        .await
        .map_err(describe)?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("answered HTTP {}", status.as_u16()));
    }
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
    {
        return Err(format!(
            "a document larger than {} KiB",
            MAX_DOCUMENT_BYTES / 1024
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(describe)? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(format!(
                "a document larger than {} KiB",
                MAX_DOCUMENT_BYTES / 1024
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn describe(e: reqwest::Error, timeout: Duration, has_client_cert: bool) -> String {
    if e.is_timeout() {
        format!("timed out after {timeout:?}")
    } else {
        let why = error_chain(&e.without_url());
        let hint = super::transport::tls_hint(has_client_cert, &why);
        format!("failed to reach it: {why}{hint}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(s: &str) -> TokenUrl {
        TokenUrl::Issuer(url::Url::parse(s).unwrap())
    }

    #[test]
    fn document_addresses_follow_the_specs() {
        let urls = |t: TokenUrl| -> Vec<String> {
            document_urls(&t).iter().map(|u| u.to_string()).collect()
        };
        assert_eq!(
            urls(issuer("https://idp.example")),
            [
                "https://idp.example/.well-known/openid-configuration",
                "https://idp.example/.well-known/oauth-authorization-server"
            ]
        );
        assert_eq!(
            urls(issuer("https://idp.example/tenant/1/")),
            [
                "https://idp.example/tenant/1/.well-known/openid-configuration",
                "https://idp.example/.well-known/oauth-authorization-server/tenant/1"
            ]
        );
        assert_eq!(
            urls(TokenUrl::FhirBase(
                url::Url::parse("https://ehr.example/fhir/R4?x=1").unwrap()
            )),
            ["https://ehr.example/fhir/R4/.well-known/smart-configuration"]
        );
    }

    #[test]
    fn a_document_gives_its_token_endpoint_or_says_what_is_wrong() {
        let iss = issuer("https://idp.example/");
        let ok = br#"{"issuer":"https://idp.example","token_endpoint":"https://idp.example/token","jwks_uri":{"deep":[[[1]]]}}"#;
        assert_eq!(
            parse(ok, &iss, false).unwrap().as_str(),
            "https://idp.example/token"
        );
        let fhir = TokenUrl::FhirBase(url::Url::parse("https://ehr.example/fhir").unwrap());
        // SMART configurations need not name an issuer.
        assert!(parse(
            br#"{"token_endpoint":"https://ehr.example/token"}"#,
            &fhir,
            false
        )
        .is_ok());
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        for (doc, want) in [
            (&b"<html>"[..], "not a JSON object"),
            (b"[]", "not a JSON object"),
            (deep.as_bytes(), "not a JSON object"),
            (
                br#"{"issuer":"https://idp.example"}"#,
                "has no \"token_endpoint\"",
            ),
            (
                br#"{"issuer":"https://idp.example","token_endpoint":7}"#,
                "not a string",
            ),
            (
                br#"{"issuer":"https://evil.example","token_endpoint":"https://evil.example/t"}"#,
                "names the issuer \"https://evil.example\"",
            ),
            (
                br#"{"token_endpoint":"https://idp.example/t"}"#,
                "has no \"issuer\"",
            ),
            (
                br#"{"issuer":"https://idp.example","token_endpoint":"ftp://idp.example/t"}"#,
                "no http:// or https://",
            ),
            (
                br#"{"issuer":"https://idp.example","token_endpoint":"not a url"}"#,
                "is no URL",
            ),
            (
                br#"{"issuer":"https://idp.example","token_endpoint":"https://u:p@idp.example/t"}"#,
                "a user, password",
            ),
            (
                br#"{"issuer":"https://idp.example","token_endpoint":"http://idp.example/t"}"#,
                "in the clear",
            ),
        ] {
            let e = parse(doc, &iss, false).unwrap_err();
            assert!(e.contains(want), "{want:?} in {e:?}");
            assert!(!e.contains("u:p@"), "{e}");
        }
        let long = format!(
            r#"{{"issuer":"https://idp.example","token_endpoint":"https://idp.example/{}"}}"#,
            "a".repeat(5000)
        );
        assert!(parse(long.as_bytes(), &iss, false)
            .unwrap_err()
            .contains("longer than"));
        // Plain http to loopback, or with allow_http.
        let http = br#"{"issuer":"https://idp.example","token_endpoint":"http://127.0.0.1:9/t"}"#;
        assert!(parse(http, &iss, false).is_ok());
        let http = br#"{"issuer":"https://idp.example","token_endpoint":"http://idp.example/t"}"#;
        assert!(parse(http, &iss, true).is_ok());
        // A hostile issuer value is quoted and cut short.
        let noisy = format!(
            r#"{{"issuer":"\u001b[31m{}","token_endpoint":"https://x/t"}}"#,
            "x".repeat(1000)
        );
        let e = parse(noisy.as_bytes(), &iss, false).unwrap_err();
        assert!(!e.contains('\u{1b}') && e.len() < 300, "{e}");
    }
}
