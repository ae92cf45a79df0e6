//! A provider's URL as logs, errors and metrics may show it: without its query (which
//! may carry parameters of the grant) and without user info (which may be a
//! credential). Used by the request, discovery and the rate limits per provider.

/// The URL as it may appear in logs and errors: no query, no user info.
pub fn redacted_url(url: &url::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.to_string()
}
