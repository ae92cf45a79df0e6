//! What the credential helpers (SPEC §5: `tokend credential kubectl|git`,
//! `docker-credential-tokend`) read of an account: `urls`, the resource URLs its token is
//! for (git and container tools pick the account by the longest prefix), and
//! `credential_username`, the user name sent beside the token where a tool wants one.
//!
//! How a URL is matched is the helpers' business (`crate::credential`); here only what
//! makes a URL one to match against: absolute http(s) with a host, no user or password
//! (the token is the credential), no query or fragment (a prefix of a path), and plain
//! http only where the account may send its secrets that way (the token would cross the
//! network in the clear).

use super::{At, Ctx};
use crate::config::raw::RawAccount;

/// What git and container tools send as the user name when an account sets none. GitLab
/// takes `oauth2` with an OAuth token as the password; registries that check only the
/// token ignore it.
pub const DEFAULT_CREDENTIAL_USERNAME: &str = "oauth2";

/// `[defaults]` may hold `credential_username`, but not `urls`: two accounts that match
/// the same URLs are the exception (one per reader, by `access`), not the rule.
pub(super) fn defaults(cx: &mut Ctx<'_>, defaults: &RawAccount) {
    if let Some(u) = &defaults.urls {
        cx.err(
            u.span(),
            "defaults.urls",
            "every account names its own urls (the URLs its token is for)",
        );
    }
}

/// `urls`: each an absolute http(s) URL with a host; none twice; plain http only where
/// `http_ok` says the account may send over it (the plain-http rule of its token_url).
pub(super) fn urls(
    cx: &mut Ctx<'_>,
    at: &At<'_>,
    http_ok: &dyn Fn(&url::Url) -> bool,
) -> Vec<url::Url> {
    let Some(list) = &at.a.urls else {
        return Vec::new();
    };
    let key = at.k("urls");
    let mut urls: Vec<url::Url> = Vec::new();
    for u in list.get_ref() {
        let text = u.get_ref();
        let why = match url::Url::parse(text) {
            Err(e) => Some(format!("{text:?} is not a URL: {e}")),
            Ok(url) => match problem(&url, http_ok) {
                Some(why) => Some(format!("{text:?}: {why}")),
                None if urls.contains(&url) => Some(format!("{text:?} is listed twice")),
                None => {
                    urls.push(url);
                    None
                }
            },
        };
        if let Some(why) = why {
            cx.err(u.span(), key, why);
        }
    }
    // Kept for the daemon's life, once per account (issue #11).
    urls.shrink_to_fit();
    urls
}

/// Why `url` cannot be one of an account's `urls`, if it cannot.
fn problem(url: &url::Url, http_ok: &dyn Fn(&url::Url) -> bool) -> Option<&'static str> {
    if !matches!(url.scheme(), "https" | "http") || !url.has_host() {
        return Some("must be an absolute http:// or https:// URL with a host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Some("holds a user or password: the token is the credential, and nothing else belongs in a URL here");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Some("has a query or fragment: urls are prefixes of paths");
    }
    if url.scheme() == "http" && !http_ok(url) {
        return Some("plain http:// would send the token in the clear: use https://, or set allow_http = true for this account");
    }
    None
}

/// `credential_username`: not empty, no `:` (RFC 7617 §2: the Basic user-id cannot hold
/// one) and no control character (git's protocol is one `key=value` a line).
pub(super) fn username(cx: &mut Ctx<'_>, at: &At<'_>) -> String {
    let Some(u) = pick!(at.a, at.d, credential_username) else {
        return DEFAULT_CREDENTIAL_USERNAME.to_owned();
    };
    let name = u.get_ref();
    if name.is_empty() || name.contains(':') || name.chars().any(char::is_control) {
        cx.err(
            u.span(),
            at.k("credential_username"),
            "must be a user name that is not empty, without \":\" and without control characters",
        );
        return DEFAULT_CREDENTIAL_USERNAME.to_owned();
    }
    name.clone()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, parse, OUT, REF_SECRET};

    #[test]
    fn urls_are_absolute_http_urls_and_default_to_none() {
        let c = parse(&format!("{REF_SECRET}{OUT}")).unwrap();
        assert!(c.accounts[0].urls.is_empty());
        assert_eq!(c.accounts[0].options.credential_username, "oauth2");
        let text = format!(
            "{REF_SECRET}urls = [\"https://Git.Example.org/team/\", \"http://127.0.0.1:5000\"]\n\
             credential_username = \"x-token\"\n{OUT}"
        );
        let c = parse(&text).unwrap();
        let urls: Vec<&str> = c.accounts[0].urls.iter().map(|u| u.as_str()).collect();
        assert_eq!(
            urls,
            ["https://git.example.org/team/", "http://127.0.0.1:5000/"]
        );
        assert_eq!(c.accounts[0].options.credential_username, "x-token");
    }

    #[test]
    fn bad_urls_are_reported_each_with_line_and_column() {
        let text = format!(
            "{REF_SECRET}urls = [\"https://ok.example/\", \"ftp://x.example/\",\n  \
             \"https://u:p@x.example/\", \"https://x.example/?q=1\", \"http://x.example/\",\n  \
             \"not a url\", \"https://ok.example/\"]\n{OUT}"
        );
        let errs = errors(&text);
        let got: Vec<(usize, usize, &str)> = errs
            .iter()
            .map(|e| (e.line, e.column, e.key.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (6, 32, "account.a.urls"),
                (7, 3, "account.a.urls"),
                (7, 29, "account.a.urls"),
                (7, 55, "account.a.urls"),
                (8, 3, "account.a.urls"),
                (8, 16, "account.a.urls"),
            ],
            "{errs:?}"
        );
        for (e, want) in errs.iter().zip([
            "absolute http:// or https://",
            "holds a user or password",
            "query or fragment",
            "in the clear",
            "not a URL",
            "listed twice",
        ]) {
            assert!(e.message.contains(want), "{want:?} in {e}");
        }
        // allow_http lets an account's token go over plain http, to its urls too.
        let allowed =
            format!("{REF_SECRET}allow_http = true\nurls = [\"http://x.example/\"]\n{OUT}");
        assert!(parse(&allowed).is_ok());
    }

    #[test]
    fn urls_are_per_account_and_the_username_a_user_name() {
        let text = format!("[defaults]\nurls = [\"https://x.example/\"]\n{REF_SECRET}{OUT}");
        let e = &errors(&text)[0];
        assert_eq!(
            (e.key.as_str(), e.line, e.column),
            ("defaults.urls", 2, 8),
            "{e}"
        );
        for bad in ["\"\"", "\"a:b\"", "\"a\\nb\""] {
            let text = format!("{REF_SECRET}credential_username = {bad}\n{OUT}");
            let e = &errors(&text)[0];
            assert_eq!(
                (e.key.as_str(), e.line, e.column),
                ("account.a.credential_username", 6, 23),
                "{e}"
            );
        }
        // Inherited from [defaults].
        let text = format!("[defaults]\ncredential_username = \"bot\"\n{REF_SECRET}{OUT}");
        assert_eq!(
            parse(&text).unwrap().accounts[0]
                .options
                .credential_username,
            "bot"
        );
    }
}
