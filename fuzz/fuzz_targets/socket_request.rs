//! The socket API's request handling: `tokend::server::answer_bytes` serves the bytes a
//! client sends on one connection (hyper's HTTP/1.1 parser, the limits, the routes) to a
//! fixed peer, against a fixed account map: `msk` (a valid token, read by uid 1000),
//! `cibmtr` (no token, failing; read by group 2000) and `expired` (read by nobody but
//! root and the daemon's user). Their tasks do not run: a refresh asked for is never
//! taken up, as when the account is held.
//!
//! Input: bytes starting with an upper-case letter are sent as they are (the seeds are
//! such requests, from the book's socket API chapter), once as root and once as uid 1000;
//! anything else is a list of requests built from parts (method, path, query, headers,
//! body) by `arbitrary`, for one of four peers.
//!
//! The runtime's clock is paused: the server's time limits (10 s for a head, 5 s for a
//! body, 60 s for a `min_valid` wait) pass at once, in virtual time. Invariants: no
//! panic; the server closes the connection within its limits for the requests sent (a
//! request that outlives them is a hang); every answer is well-formed HTTP/1.1 and its
//! status is one the book's socket API chapter documents (or a `100 Continue`).
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tokend::account::registry::ByName;
use tokend::account::{AccountView, Accounts, Status as AccountStatus, TokenState};
use tokend::server::peer::Peer;
use tokend::server::{answer_bytes, Limits};
use tokio::sync::watch;

/// The statuses SPEC §4 and the book's error table (docs/src/socket-api.md) name.
const DOCUMENTED: &[u16] = &[200, 202, 400, 403, 404, 405, 408, 413, 431, 503];

const CONFIG: &str = r#"
[[account]]
name = "msk"
token_url = "https://partner.example.org/oauth2/token"
client_id = "id"
client_secret = { file = "/etc/tokend/secrets/msk" }
[[account.output]]
path = "/run/tokend/tokens/msk"

[[account]]
name = "cibmtr"
token_url = "https://example.okta.com/oauth2/default/v1/token"
grant_type = "password"
client_id = "id"
client_secret = { file = "/etc/tokend/secrets/cibmtr" }
username = "svc"
password = { file = "/etc/tokend/secrets/cibmtr-password" }
[[account.output]]
path = "/run/tokend/tokens/cibmtr"

[[account]]
name = "expired"
token_url = "https://idp.example/token"
client_id = "id"
client_secret = { file = "/etc/tokend/secrets/expired" }
[[account.output]]
path = "/run/tokend/tokens/expired"
"#;

struct World {
    runtime: tokio::runtime::Runtime,
    accounts: watch::Receiver<Accounts>,
    // Kept so that the receivers see no closed channel.
    _senders: (
        watch::Sender<Accounts>,
        Vec<tokend::account::state::published::Sender<TokenState>>,
    ),
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime builds");
        let config = tokend::config::parse_str(CONFIG, Path::new("/etc/tokend/config.toml"))
            .expect("the fuzz target's config is valid");
        let now = SystemTime::now();
        let token = |body: &str, at: SystemTime| {
            Arc::new(
                tokend::oauth::response::parse_success(
                    200,
                    body.as_bytes(),
                    at,
                    Duration::from_secs(3600),
                )
                .expect("a valid token response"),
            )
        };
        let mut map = BTreeMap::new();
        let mut senders = Vec::new();
        for mut account in config.accounts {
            let state = match account.name.as_str() {
                "msk" => {
                    std::sync::Arc::make_mut(&mut account.options).access.users = vec![1000];
                    TokenState {
                        status: AccountStatus::Fresh,
                        token: Some(token(
                            r#"{"access_token":"tok-msk-0123456789","token_type":"Bearer","expires_in":3600,"scope":"full"}"#,
                            now,
                        )),
                        last_refresh: Some(now),
                        next_attempt: Some(now + Duration::from_secs(2880)),
                        attempted: true,
                        ..TokenState::default()
                    }
                }
                "cibmtr" => {
                    std::sync::Arc::make_mut(&mut account.options).access.groups = vec![2000];
                    TokenState {
                        status: AccountStatus::Failing,
                        last_error: Some(
                            "token endpoint answered HTTP 401: invalid_client".into(),
                        ),
                        next_attempt: Some(now + Duration::from_secs(900)),
                        failures: 3,
                        attempted: true,
                        ..TokenState::default()
                    }
                }
                _ => TokenState {
                    status: AccountStatus::Expired,
                    token: Some(token(
                        r#"{"access_token":"tok-old","expires_in":60}"#,
                        now - Duration::from_secs(7200),
                    )),
                    last_refresh: Some(now - Duration::from_secs(7200)),
                    attempted: true,
                    ..TokenState::default()
                },
            };
            let (tx, rx) = tokend::account::state::published::channel(state);
            senders.push(tx);
            let account = Arc::new(account);
            map.insert(ByName(account.clone()), AccountView::detached(account, rx));
        }
        let (tx, accounts) = watch::channel(Arc::new(map));
        World {
            runtime,
            accounts,
            _senders: (tx, senders),
        }
    })
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Who {
    Root,
    /// uid 1000: reads `msk`.
    Reader,
    /// uid 1001 in group 2000: reads `cibmtr`.
    GroupMember,
    Stranger,
}

impl Who {
    fn peer(self) -> Peer {
        let (uid, gid, groups, privileged) = match self {
            Who::Root => (0, 0, vec![], true),
            Who::Reader => (1000, 1000, vec![], false),
            Who::GroupMember => (1001, 1001, vec![2000], false),
            Who::Stranger => (4242, 4242, vec![4243], false),
        };
        Peer {
            uid,
            gid,
            pid: 4321,
            groups,
            privileged,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    who: Who,
    requests: Vec<Request>,
    /// Sent after the requests.
    tail: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Request {
    method: Method,
    path: Target,
    query: Vec<(QueryKey, QueryValue)>,
    http10: bool,
    headers: Vec<(HeaderName, String)>,
    /// The length of an `x-pad` header: past 8 KiB, the head is too large (431).
    pad: Option<u16>,
    body: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Target {
    Tokens,
    Token(Name),
    Raw(Name),
    Refresh(Name),
    Action(Name, String),
    Health,
    Metrics,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Name {
    Msk,
    Cibmtr,
    Expired,
    Missing,
    Any(String),
}

#[derive(Arbitrary, Debug)]
enum QueryKey {
    MinValid,
    Force,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum QueryValue {
    Secs(u64),
    Human(u32, Unit),
    True,
    False,
    Any(String),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Unit {
    S,
    M,
    H,
    D,
    Y,
}

#[derive(Arbitrary, Debug)]
enum HeaderName {
    ContentLength,
    TransferEncoding,
    Connection,
    Expect,
    Host,
    Upgrade,
    Any(String),
}

fn render(requests: &[Request], tail: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in requests.iter().take(4) {
        let method = match &r.method {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Other(m) => m,
        };
        let name = |n: &Name| match n {
            Name::Msk => "msk".to_owned(),
            Name::Cibmtr => "cibmtr".to_owned(),
            Name::Expired => "expired".to_owned(),
            Name::Missing => "nope".to_owned(),
            Name::Any(s) => s.clone(),
        };
        let path = match &r.path {
            Target::Tokens => "/v1/tokens".to_owned(),
            Target::Token(n) => format!("/v1/tokens/{}", name(n)),
            Target::Raw(n) => format!("/v1/tokens/{}/raw", name(n)),
            Target::Refresh(n) => format!("/v1/tokens/{}/refresh", name(n)),
            Target::Action(n, a) => format!("/v1/tokens/{}/{a}", name(n)),
            Target::Health => "/v1/health".to_owned(),
            Target::Metrics => "/metrics".to_owned(),
            Target::Other(s) => s.clone(),
        };
        let mut target = path;
        for (i, (k, v)) in r.query.iter().take(4).enumerate() {
            target.push(if i == 0 { '?' } else { '&' });
            target.push_str(match k {
                QueryKey::MinValid => "min_valid",
                QueryKey::Force => "force",
                QueryKey::Other(s) => s,
            });
            target.push('=');
            match v {
                QueryValue::Secs(s) => target.push_str(&s.to_string()),
                QueryValue::Human(n, u) => target.push_str(&format!(
                    "{n}{}",
                    match u {
                        Unit::S => "s",
                        Unit::M => "m",
                        Unit::H => "h",
                        Unit::D => "d",
                        Unit::Y => "y",
                    }
                )),
                QueryValue::True => target.push_str("true"),
                QueryValue::False => target.push_str("false"),
                QueryValue::Any(s) => target.push_str(s),
            }
        }
        let version = if r.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        out.extend_from_slice(
            format!("{method} {target} {version}\r\nhost: localhost\r\n").as_bytes(),
        );
        for (n, v) in r.headers.iter().take(8) {
            let n = match n {
                HeaderName::ContentLength => "content-length",
                HeaderName::TransferEncoding => "transfer-encoding",
                HeaderName::Connection => "connection",
                HeaderName::Expect => "expect",
                HeaderName::Host => "host",
                HeaderName::Upgrade => "upgrade",
                HeaderName::Any(s) => s,
            };
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        if let Some(n) = r.pad {
            out.extend_from_slice(b"x-pad: ");
            out.resize(out.len() + n as usize, b'a');
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&r.body);
    }
    out.extend_from_slice(tail);
    out
}

/// Every answer in `bytes`: well-formed, with a documented status. Our bodies never
/// start with `HTTP/`, so an answer whose body is absent (to a `HEAD`) shows as the
/// next answer starting right after its head.
fn check_answers(mut bytes: &[u8]) -> usize {
    let mut answers = 0;
    while !bytes.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                panic!("a truncated answer: {:?}", String::from_utf8_lossy(bytes))
            }
            Err(e) => panic!(
                "a malformed answer ({e}): {:?}",
                String::from_utf8_lossy(bytes)
            ),
        };
        let status = resp.code.expect("a complete head has a status");
        answers += 1;
        if status == 100 {
            bytes = &bytes[head..];
            continue;
        }
        assert!(
            DOCUMENTED.contains(&status),
            "an undocumented status {status}: {:?}",
            String::from_utf8_lossy(bytes)
        );
        let length = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| {
                std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .expect("a numeric content-length")
            });
        let rest = &bytes[head..];
        bytes = match length {
            _ if rest.is_empty() || rest.starts_with(b"HTTP/") => rest,
            Some(n) => {
                assert!(n <= rest.len(), "an answer shorter than its content-length");
                &rest[n..]
            }
            // Up to the close.
            None => &[],
        };
    }
    answers
}

fn serve(request: &[u8], who: Who) {
    let world = world();
    let limits = Limits::default();
    // Each request (at most one per line sent) may take the head's time, then a body's
    // or a min_valid wait; then the connection idles out within a head's time and
    // closes within its grace.
    let requests = request.iter().filter(|&&b| b == b'\n').count() as u32 + 1;
    let per_request = limits.header_timeout + limits.body_timeout.max(limits.max_wait);
    let bound = per_request * requests + limits.stall_timeout + limits.shutdown_grace;
    let answer = world.runtime.block_on(async {
        tokio::time::timeout(
            bound,
            answer_bytes(request, world.accounts.clone(), who.peer(), limits.clone()),
        )
        .await
        .unwrap_or_else(|_| panic!("the connection outlived the server's limits ({bound:?})"))
    });
    check_answers(&answer);
}

fuzz_target!(|data: &[u8]| {
    if data.first().is_some_and(u8::is_ascii_uppercase) {
        serve(data, Who::Root);
        serve(data, Who::Reader);
        return;
    }
    let Ok(input) = Input::arbitrary_take_rest(arbitrary::Unstructured::new(data)) else {
        return;
    };
    serve(&render(&input.requests, &input.tail), input.who);
});
