//! Rendering a token in each output format (SPEC §3). Pure: no I/O, no clock.

use serde::Serialize;

use crate::clock::rfc3339;
use crate::config::{Format, Secret};
use crate::oauth::Token;

/// The json format, also served by the socket's `GET /v1/tokens/{account}`.
#[derive(Serialize)]
pub struct TokenJson<'a> {
    pub account: &'a str,
    pub access_token: &'a str,
    pub token_type: &'a str,
    pub expires_at: String,
    pub issued_at: String,
    pub scope: Option<&'a str>,
}

impl<'a> TokenJson<'a> {
    pub fn new(account: &'a str, token: &'a Token) -> Self {
        TokenJson {
            account,
            access_token: token.access_token.expose(),
            token_type: &token.token_type,
            expires_at: rfc3339(token.expires_at),
            issued_at: rfc3339(token.issued_at),
            scope: token.scope.as_deref(),
        }
    }
}

/// Why a token cannot be written in a format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    /// SPEC §3: an env file is sourced by shells (`. file`), so a token outside RFC
    /// 6750's b64token characters could run commands there.
    #[error("the token holds characters outside RFC 6750's b64token set (A-Z a-z 0-9 - . _ ~ + / and trailing =): not written to an env file, where a shell sourcing it could run them")]
    NotB64Token,
}

/// Whether `t` is an RFC 6750 §2.1 b64token: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~"
/// / "+" / "/" ) *"="`. Nothing in it means anything to a shell.
pub fn is_b64token(t: &str) -> bool {
    let body = t.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// The file content for `format`. A `Secret`, since it holds the token.
pub fn render(format: &Format, account: &str, token: &Token) -> Result<Secret, RenderError> {
    let t = token.access_token.expose();
    Ok(Secret::new(match format {
        Format::Raw => t.to_owned(),
        Format::Json => {
            serde_json::to_string(&TokenJson::new(account, token))
                .expect("string fields always serialize")
                + "\n"
        }
        Format::Env { .. } if !is_b64token(t) => return Err(RenderError::NotB64Token),
        Format::Env { var } => format!("{var}={t}\n"),
        Format::Header => format!("Authorization: {} {t}\n", scheme(&token.token_type)),
        // Its files are rendered one by one, by `files`.
        Format::Directory { .. } => String::new(),
    }))
}

/// The files of a `directory` output: each format, named after it. All or none: a
/// token that cannot be an env file leaves the whole directory at its last version.
pub fn files(
    var: &str,
    account: &str,
    token: &Token,
) -> Result<Vec<(&'static str, Secret)>, RenderError> {
    Ok(vec![
        ("raw", render(&Format::Raw, account, token)?),
        ("json", render(&Format::Json, account, token)?),
        (
            "env",
            render(
                &Format::Env {
                    var: var.to_owned(),
                },
                account,
                token,
            )?,
        ),
        ("header", render(&Format::Header, account, token)?),
    ])
}

/// `Bearer` however the provider spelled it (RFC 6750 §5.1.1 registers it that way; Okta
/// and others send "bearer"); other schemes as sent.
fn scheme(token_type: &str) -> &str {
    if token_type.eq_ignore_ascii_case("bearer") {
        "Bearer"
    } else {
        token_type
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn token(token_type: &str) -> Token {
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Token {
            access_token: Secret::new("tok.en-1"),
            token_type: token_type.to_owned().into(),
            issued_at: issued,
            expires_at: issued + Duration::from_secs(3600),
            scope: Some("full".into()),
            refresh_token: None,
            extra: Default::default(),
        }
    }

    #[test]
    fn every_format() {
        let t = token("bearer");
        assert_eq!(
            render(&Format::Raw, "msk", &t).unwrap().expose(),
            "tok.en-1"
        );
        assert_eq!(
            render(
                &Format::Env {
                    var: "MSK_TOKEN".into()
                },
                "msk",
                &t
            )
            .unwrap()
            .expose(),
            "MSK_TOKEN=tok.en-1\n"
        );
        assert_eq!(
            render(&Format::Header, "msk", &t).unwrap().expose(),
            "Authorization: Bearer tok.en-1\n"
        );
        assert_eq!(
            render(&Format::Header, "msk", &token("DPoP"))
                .unwrap()
                .expose(),
            "Authorization: DPoP tok.en-1\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(render(&Format::Json, "msk", &t).unwrap().expose()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "account": "msk",
                "access_token": "tok.en-1",
                "token_type": "bearer",
                "expires_at": "2023-11-14T23:13:20Z",
                "issued_at": "2023-11-14T22:13:20Z",
                "scope": "full",
            })
        );
    }

    #[test]
    fn a_token_a_shell_would_run_is_never_an_env_file() {
        let env = Format::Env { var: "T".into() };
        for bad in [
            "x;touch${IFS}/tmp/pwned;",
            "$(id)",
            "`id`",
            "a b",
            "a'b",
            "a\"b",
            "a|b",
            "a&b",
            "a=b",
            "==",
            "a\\b",
            "a>b",
        ] {
            let mut t = token("Bearer");
            t.access_token = Secret::new(bad);
            assert_eq!(
                render(&env, "msk", &t).unwrap_err(),
                RenderError::NotB64Token,
                "{bad}"
            );
            assert!(
                files("T", "msk", &t).is_err(),
                "{bad}: no directory version"
            );
            assert!(
                render(&Format::Raw, "msk", &t).is_ok(),
                "raw keeps any visible ASCII"
            );
        }
        for good in ["abc", "a-b.c_d~e+f/g", "YWJj==", "eyJ0.eyJ1.c2ln"] {
            let mut t = token("Bearer");
            t.access_token = Secret::new(good);
            assert_eq!(
                render(&env, "msk", &t).unwrap().expose(),
                format!("T={good}\n")
            );
        }
        let msg = RenderError::NotB64Token.to_string();
        assert!(
            msg.contains("b64token") && msg.contains("env file"),
            "{msg}"
        );
    }
}
