//! One `[[account]]` (and the `[defaults]` it inherits from): its name, where its token
//! endpoint is (`token_url`, `issuer` or `fhir_base`, and the plain-http rule,
//! [`is_loopback`]), its client id, and the settings most accounts share ([`Options`]:
//! headers, proxy, timeouts, schedule, hooks, access).
//!
//! Client authentication and the grant are in `auth`, outputs in `output`; what holds
//! across accounts (names, output paths) in `validate` itself.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use super::{auth, output, share, valid_name, At, Ctx};
use crate::config::raw::{RawAccount, S};
use crate::config::{
    Access, Account, BasicEncoding, OnExpiry, Options, ParamsIn, SchedulePolicy, Secret,
    SignalHook, TokenUrl,
};

/// Whether `url` points at this machine: `localhost` or a loopback address. Plain http://
/// goes only there unless an account sets `allow_http`, for a configured token endpoint
/// and for a discovered one alike.
pub fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// `[defaults]` holds what accounts inherit, which is neither a name nor an output.
pub(super) fn defaults(cx: &mut Ctx<'_>, defaults: &RawAccount) {
    if let Some(n) = &defaults.name {
        cx.err(n.span(), "defaults.name", "every account has its own name");
    }
    if let Some(o) = defaults.output.as_ref().and_then(|o| o.first()) {
        cx.err(o.span(), "defaults.output", "outputs are per account");
    }
}

/// Validates one account; None (and errors in `cx`) if anything about it is wrong.
pub(super) fn account(
    cx: &mut Ctx<'_>,
    label: &str,
    a: RawAccount,
    d: &RawAccount,
    span: Range<usize>,
    has_socket: bool,
) -> Option<Account> {
    let before = cx.errors.len();
    let at = At {
        a: &a,
        d,
        label,
        span: span.clone(),
    };
    let name = name(cx, &at);
    let (token_url, allow_http) = token_url(cx, &at);
    let client_id = client_id(cx, &at);
    let (client_auth, client_secret) = auth::client_auth(cx, &at);
    let assertion = auth::assertion(cx, &at, client_auth);
    let client_cert = auth::client_cert(cx, &at, client_auth);
    let basic_encoding = cx.choice(
        &pick!(a, d, basic_encoding),
        at.k("basic_encoding"),
        &[("raw", BasicEncoding::Raw), ("form", BasicEncoding::Form)],
        BasicEncoding::Raw,
    );
    let params_in = cx.choice(
        &pick!(a, d, params_in),
        at.k("params_in"),
        &[("body", ParamsIn::Body), ("query", ParamsIn::Query)],
        ParamsIn::Body,
    );
    let grant = auth::grant(cx, &at);
    let options = options(cx, &at);
    let on_expiry = cx.choice(
        &pick!(a, d, on_expiry),
        at.k("on_expiry"),
        &[("remove", OnExpiry::Remove), ("keep", OnExpiry::Keep)],
        OnExpiry::Remove,
    );
    let outputs = output::outputs(cx, &at, &name, has_socket);
    let urls = super::credential::urls(cx, &at, &|u| allow_http || is_loopback(u));
    let dpop = super::binding::binding(cx, &at, has_socket);

    if cx.errors.len() > before {
        return None;
    }
    Some(Account {
        name,
        token_url: token_url?,
        allow_http,
        grant: grant?,
        client_id,
        client_secret,
        client_auth,
        assertion: assertion.map(Box::new),
        client_cert: client_cert.map(Box::new),
        basic_encoding,
        params_in,
        scope: pick!(a, d, scope).map(|s| s.into_inner()),
        options: share(&mut cx.options, options),
        on_expiry,
        outputs,
        urls,
        cluster: pick!(a, d, cluster).is_none_or(|c| *c.get_ref()),
        dpop: dpop.map(Box::new),
    })
}

/// The settings most accounts leave at their defaults or take from `[defaults]`.
fn options(cx: &mut Ctx<'_>, at: &At<'_>) -> Options {
    let (a, d) = (at.a, at.d);
    let extra_params = pick!(a, d, extra_params)
        .map(|p| p.into_inner())
        .unwrap_or_default();
    let extra_headers = extra_headers(cx, at);
    let proxy = proxy(cx, at);
    let schedule = schedule(cx, at);
    let on_refresh = on_refresh(cx, at);
    let on_refresh_signal = on_refresh_signal(cx, at);
    let hook_timeout = cx.duration(
        &pick!(a, d, hook_timeout),
        at.k("hook_timeout"),
        Duration::from_secs(30),
    );
    let timeout = cx.duration(
        &pick!(a, d, timeout),
        at.k("timeout"),
        Duration::from_secs(30),
    );
    let refresh_token_timeout = cx.duration(
        &pick!(a, d, refresh_token_timeout),
        at.k("refresh_token_timeout"),
        Duration::from_secs(120),
    );
    let ca_file = pick!(a, d, ca_file).map(|c| cx.path(c.get_ref()));
    let access = access(cx, at);
    let credential_username = super::credential::username(cx, at);
    Options {
        extra_params,
        extra_headers,
        ca_file,
        proxy,
        timeout,
        refresh_token_timeout,
        schedule,
        on_refresh,
        on_refresh_signal,
        hook_timeout,
        access,
        credential_username,
    }
}

/// `name`: 1 to 64 of `[A-Za-z0-9._-]`.
fn name(cx: &mut Ctx<'_>, at: &At<'_>) -> String {
    let a = at.a;
    let name = match &a.name {
        Some(n) if valid_name(n.get_ref()) => n.get_ref().clone(),
        Some(n) => {
            cx.err(
                n.span(),
                at.k("name"),
                format!(
                    "{:?} is not a valid name: 1 to 64 of A-Z a-z 0-9 . _ -",
                    n.get_ref()
                ),
            );
            String::new()
        }
        None => {
            cx.missing(at.span.clone(), at.label, "name", "");
            String::new()
        }
    };

    name
}

/// `token_url`, `issuer` or `fhir_base`, exactly one: http(s), and plain http only to
/// loopback unless `allow_http` (also for an issuer or FHIR base: the token endpoint
/// found there is held to the same rule when it is discovered). An account that writes
/// any of the three inherits none of them from `[defaults]`.
fn token_url(cx: &mut Ctx<'_>, at: &At<'_>) -> (Option<Arc<TokenUrl>>, bool) {
    let (a, d) = (at.a, at.d);
    let allow_http = pick!(a, d, allow_http).is_some_and(|b| *b.get_ref());
    let own = a.token_url.is_some() || a.issuer.is_some() || a.fhir_base.is_some();
    let from = if own { a } else { d };
    let given: Vec<(&str, &S<String>)> = [
        ("token_url", &from.token_url),
        ("issuer", &from.issuer),
        ("fhir_base", &from.fhir_base),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    .collect();
    let Some(&(key, u)) = given.first() else {
        cx.missing(
            at.span.clone(),
            at.label,
            "token_url",
            " (or \"issuer\" or \"fhir_base\", to discover it)",
        );
        return (None, allow_http);
    };
    if let Some((other, v)) = given.get(1) {
        cx.err(
            v.span(),
            at.k(other),
            format!("{key} is set already: an account names exactly one of token_url, issuer and fhir_base"),
        );
        return (None, allow_http);
    }
    let url = match url::Url::parse(u.get_ref()) {
        Ok(url) if url.scheme() == "http" && !allow_http && !is_loopback(&url) => {
            cx.err(
                u.span(),
                at.k(key),
                format!(
                    "plain http:// to {} would send the credentials in the clear: use https://, \
                     or set allow_http = true for this account",
                    url.host_str().unwrap_or_default()
                ),
            );
            return (None, allow_http);
        }
        Ok(url) if matches!(url.scheme(), "https" | "http") && url.has_host() => {
            if !url.username().is_empty() || url.password().is_some() {
                cx.inline_secret(u.span(), at.k(key));
            }
            url
        }
        Ok(_) => {
            cx.err(u.span(), at.k(key), "must be an http:// or https:// URL");
            return (None, allow_http);
        }
        Err(e) => {
            cx.err(u.span(), at.k(key), format!("not a URL: {e}"));
            return (None, allow_http);
        }
    };
    let discovery = key != "token_url";
    if discovery && (url.fragment().is_some() || (key == "issuer" && url.query().is_some())) {
        cx.err(
            u.span(),
            at.k(key),
            format!(
                "the discovery document's address is made from it: a {key} has no {}",
                if key == "issuer" {
                    "query or fragment (RFC 8414 §2)"
                } else {
                    "fragment"
                }
            ),
        );
        return (None, allow_http);
    }
    let token_url = match key {
        "issuer" => TokenUrl::Issuer(url),
        "fhir_base" => TokenUrl::FhirBase(url),
        _ => TokenUrl::Fixed(url),
    };
    (Some(share(&mut cx.token_urls, token_url)), allow_http)
}

/// `client_id`: required, not empty.
fn client_id(cx: &mut Ctx<'_>, at: &At<'_>) -> String {
    let (a, d) = (at.a, at.d);
    let client_id = match pick!(a, d, client_id) {
        Some(c) if !c.get_ref().is_empty() => c.into_inner(),
        Some(c) => {
            cx.err(c.span(), at.k("client_id"), "must not be empty");
            String::new()
        }
        None => {
            cx.missing(at.span.clone(), at.label, "client_id", "");
            String::new()
        }
    };
    client_id
}

/// `extra_headers`: valid names; values count as inline secrets.
fn extra_headers(cx: &mut Ctx<'_>, at: &At<'_>) -> BTreeMap<String, Secret> {
    let (a, d) = (at.a, at.d);
    let extra_headers: BTreeMap<String, Secret> = pick!(a, d, extra_headers)
        .map(|p| p.into_inner())
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, Secret::new(v)))
        .collect();
    if !extra_headers.is_empty() {
        // Header values are API keys as often as not.
        if let Some(h) = pick!(a, d, extra_headers) {
            cx.inline_secret(h.span(), at.k("extra_headers"));
        }
    }
    for h in extra_headers.keys() {
        if reqwest::header::HeaderName::from_bytes(h.as_bytes()).is_err() {
            let s = pick!(a, d, extra_headers)
                .map(|p| p.span())
                .unwrap_or(at.span.clone());
            cx.err(
                s,
                at.k("extra_headers"),
                format!("{h:?} is not a valid header name"),
            );
        }
    }
    extra_headers
}

/// `proxy`: a proxy URL; one with a user or password counts as an inline secret.
fn proxy(cx: &mut Ctx<'_>, at: &At<'_>) -> Option<Secret> {
    let (a, d) = (at.a, at.d);
    let proxy = pick!(a, d, proxy).and_then(|p| match reqwest::Proxy::all(p.get_ref()) {
        Ok(_) => {
            if url::Url::parse(p.get_ref())
                .is_ok_and(|u| !u.username().is_empty() || u.password().is_some())
            {
                cx.inline_secret(p.span(), at.k("proxy"));
            }
            Some(Secret::new(p.into_inner()))
        }
        Err(_) => {
            cx.err(
                p.span(),
                at.k("proxy"),
                "not a proxy URL (e.g. \"http://proxy.internal:3128\")",
            );
            None
        }
    });

    proxy
}

/// When to refresh: `refresh_ratio` (above 0, at most 1), `refresh_every`,
/// `min_refresh_interval`, `default_lifetime`, `auth_failure_hold`.
fn schedule(cx: &mut Ctx<'_>, at: &At<'_>) -> SchedulePolicy {
    let (a, d) = (at.a, at.d);
    let defaults = SchedulePolicy::default();
    let refresh_ratio = match pick!(a, d, refresh_ratio) {
        Some(r) if *r.get_ref() > 0.0 && *r.get_ref() <= 1.0 => *r.get_ref(),
        Some(r) => {
            cx.err(
                r.span(),
                at.k("refresh_ratio"),
                "must be above 0 and at most 1",
            );
            defaults.refresh_ratio
        }
        None => defaults.refresh_ratio,
    };
    SchedulePolicy {
        refresh_ratio,
        refresh_every: cx.opt_duration(&pick!(a, d, refresh_every), at.k("refresh_every")),
        min_refresh_interval: cx.duration(
            &pick!(a, d, min_refresh_interval),
            at.k("min_refresh_interval"),
            defaults.min_refresh_interval,
        ),
        default_lifetime: cx.duration(
            &pick!(a, d, default_lifetime),
            at.k("default_lifetime"),
            defaults.default_lifetime,
        ),
        auth_failure_hold: cx.duration(
            &pick!(a, d, auth_failure_hold),
            at.k("auth_failure_hold"),
            defaults.auth_failure_hold,
        ),
    }
}

/// `on_refresh`: a command and its arguments (no shell), run after the outputs are written.
fn on_refresh(cx: &mut Ctx<'_>, at: &At<'_>) -> Option<Vec<String>> {
    let (a, d) = (at.a, at.d);
    let on_refresh = match pick!(a, d, on_refresh) {
        Some(v) if v.get_ref().is_empty() || v.get_ref()[0].is_empty() => {
            cx.err(
                v.span(),
                at.k("on_refresh"),
                "expected a command and its arguments, as [\"systemctl\", \"reload\", \"app\"]",
            );
            None
        }
        v => v.map(|v| v.into_inner()),
    };
    on_refresh
}

/// `on_refresh_signal`: a pid file and a signal name (SIGHUP unless given).
fn on_refresh_signal(cx: &mut Ctx<'_>, at: &At<'_>) -> Option<SignalHook> {
    let (a, d) = (at.a, at.d);
    let on_refresh_signal = pick!(a, d, on_refresh_signal).and_then(|s| {
        let s = s.into_inner();
        let signal = match &s.signal {
            Some(name) => match name.get_ref().parse::<nix::sys::signal::Signal>() {
                Ok(sig) => sig,
                Err(_) => {
                    cx.err(
                        name.span(),
                        at.k("on_refresh_signal.signal"),
                        format!(
                            "{:?} is not a signal name such as \"SIGHUP\"",
                            name.get_ref()
                        ),
                    );
                    return None;
                }
            },
            None => nix::sys::signal::Signal::SIGHUP,
        };
        Some(SignalHook {
            pid_file: cx.path(s.pid_file.get_ref()),
            signal,
        })
    });
    on_refresh_signal
}

/// `access`: the users and groups (names or ids) that may read the account over the
/// socket.
fn access(cx: &mut Ctx<'_>, at: &At<'_>) -> Access {
    let (a, d) = (at.a, at.d);
    let mut access = Access::default();
    if let Some(acc) = pick!(a, d, access) {
        let acc = acc.into_inner();
        for u in &acc.users {
            if let Some(uid) = cx.user(u, at.k("access.users")) {
                access.users.push(uid);
            }
        }
        for g in &acc.groups {
            if let Some(gid) = cx.group(g, at.k("access.groups")) {
                access.groups.push(gid);
            }
        }
    }

    access
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::tests::{errors, parse, KEYED, OUT, REF_SECRET};
    use super::*;
    use crate::config::{parse_str, SecretSpec};

    #[test]
    fn exactly_one_of_token_url_issuer_and_fhir_base() {
        let c = parse(&format!("{KEYED}key_id = \"2026-11\"\n{OUT}")).unwrap();
        let a = &c.accounts[0];
        assert_eq!(
            *a.token_url,
            TokenUrl::FhirBase(url::Url::parse("https://ehr.example/fhir/R4").unwrap())
        );
        let asrt = a.assertion.as_ref().unwrap();
        assert_eq!(asrt.key_id.as_deref(), Some("2026-11"));
        assert_eq!(
            (asrt.alg, asrt.audience.as_deref(), asrt.lifetime),
            (None, None, Duration::from_secs(300))
        );
        assert_eq!(
            asrt.private_key,
            SecretSpec::File("/etc/tokend/key.pem".into())
        );
        let both = KEYED.replace("fhir_base", "issuer = \"https://idp.example\"\nfhir_base");
        let e = &errors(&format!("{both}{OUT}"))[0];
        assert_eq!(
            (e.key.as_str(), e.line, e.column),
            ("account.k.fhir_base", 4, 13),
            "{e}"
        );
        assert!(
            e.message
                .contains("exactly one of token_url, issuer and fhir_base"),
            "{e}"
        );
        let none = KEYED.replace("fhir_base = \"https://ehr.example/fhir/R4\"\n", "");
        let e = &errors(&format!("{none}{OUT}"))[0];
        assert!(
            e.message
                .contains("missing key \"token_url\" (or \"issuer\" or \"fhir_base\""),
            "{e}"
        );
        // An account's own issuer wins over a token_url in [defaults].
        let text = format!(
            "[defaults]\ntoken_url = \"https://idp.example/t\"\n{}{OUT}",
            KEYED.replace(
                "fhir_base = \"https://ehr.example/fhir/R4\"",
                "issuer = \"https://idp.example\""
            )
        );
        assert!(matches!(
            *parse(&text).unwrap().accounts[0].token_url,
            TokenUrl::Issuer(_)
        ));
        // The http:// rule and the discovery rules.
        for (value, want) in [
            ("issuer = \"http://idp.example\"", "in the clear"),
            (
                "issuer = \"https://idp.example?x=1\"",
                "no query or fragment",
            ),
            ("fhir_base = \"https://ehr.example/fhir#x\"", "no fragment"),
            ("fhir_base = \"ftp://ehr.example\"", "http:// or https://"),
        ] {
            let text = KEYED.replace("fhir_base = \"https://ehr.example/fhir/R4\"", value);
            let e = &errors(&format!("{text}{OUT}"))[0];
            assert_eq!(e.line, 3, "{e}");
            assert!(e.message.contains(want), "{want} in {e}");
        }
        let allowed = KEYED.replace(
            "fhir_base = \"https://ehr.example/fhir/R4\"",
            "issuer = \"http://idp.example\"\nallow_http = true",
        );
        assert!(parse(&format!("{allowed}{OUT}")).unwrap().accounts[0].allow_http);
    }

    #[test]
    fn plain_http_is_refused_off_loopback_unless_allowed() {
        let out = "[[account.output]]\npath = \"/x\"\n";
        let http = REF_SECRET.replace("https://idp.example", "http://idp.example") + out;
        let e = parse_str(&http, Path::new("/c.toml"))
            .unwrap_err()
            .0
            .remove(0);
        assert_eq!(
            (e.key.as_str(), e.line, e.column),
            ("account.a.token_url", 3, 13)
        );
        assert!(
            e.message.contains("in the clear") && e.message.contains("allow_http"),
            "{e}"
        );
        let allowed = http.replace("client_id", "allow_http = true\nclient_id");
        assert!(parse_str(&allowed, Path::new("/c.toml")).is_ok());
        for local in [
            "http://localhost:8080",
            "http://127.0.0.1:9",
            "http://[::1]:9",
        ] {
            let text = REF_SECRET.replace("https://idp.example", local) + out;
            assert!(parse_str(&text, Path::new("/c.toml")).is_ok(), "{local}");
        }
    }

    #[test]
    fn loopback_is_localhost_and_the_loopback_addresses() {
        for (url, want) in [
            ("http://localhost:8080/t", true),
            ("http://LocalHost/t", true),
            ("http://127.0.0.1/t", true),
            ("http://127.8.9.10/t", true),
            ("http://[::1]:9/t", true),
            ("http://localhost.example/t", false),
            ("http://10.0.0.1/t", false),
            ("http://[::2]/t", false),
            ("unix:/run/x", false),
        ] {
            assert_eq!(is_loopback(&url::Url::parse(url).unwrap()), want, "{url}");
        }
    }
}
