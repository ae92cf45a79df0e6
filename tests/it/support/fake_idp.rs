//! A fake OAuth2 token endpoint for wire tests: a small HTTP/1.1 responder on a tokio
//! `TcpListener` bound on loopback, with a scripted reply queue (and a default reply
//! when the queue is empty) that records every request it gets.
//!
//! It runs on its own thread and runtime, so synchronous tests that drive the real
//! binary can use it, and it stops (closing every connection, hanging ones too) when
//! dropped. One request per connection (`Connection: close`): simpler, and a client
//! never holds a pooled connection to an endpoint that a test has stopped.
//!
//! Besides the scripted replies it can play two provider behaviours that fault tests
//! need: slow answers ([`Reply::Slow`], for "a request in flight" tests), and refresh
//! token families as Okta and Auth0 keep them ([`FakeIdp::seed_refresh_token`]): every
//! refresh token is good once, and one presented a second time revokes its whole family.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rand::Rng as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Requests larger than this are refused: the daemon never sends one.
const MAX_REQUEST: usize = 64 * 1024;

/// How the expiry of an issued token is told.
#[derive(Clone, Debug)]
pub enum Expiry {
    /// `"expires_in": n` (a JSON number).
    In(u64),
    /// `"expires_in": "n"` (a string, as some providers send).
    InString(u64),
    /// No `expires_in`: the daemon falls back to `default_lifetime`.
    Missing,
    /// No `expires_in`; the token is a JWT whose `exp` is this many seconds from now.
    Jwt(u64),
    /// No `expires_in`; the token is a JWT whose `exp` is this absolute JSON number
    /// (`1e20`: an absurd one, far past year 9999).
    JwtExp(f64),
    /// `"expires_in": <this JSON text>` as it is (`0`, `"3600.0"`).
    Raw(&'static str),
}

/// One scripted answer.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with a new, unique token of a length in `len`.
    Token { expiry: Expiry, len: Range<usize> },
    /// This status, with a small HTML body that is no OAuth error.
    Status(u16),
    /// 429 with `Retry-After: <seconds>`.
    RetryAfter(u64),
    /// 429 with Okta's `X-Rate-Limit-Reset: <epoch seconds>`, this many seconds ahead.
    OktaReset(u64),
    /// 400 `{"error":"invalid_grant"}`.
    InvalidGrant,
    /// 401 `{"error":"invalid_client"}` with `WWW-Authenticate: Basic`.
    InvalidClient,
    /// 403 with an empty body, as Glewlwyd answers a wrong password.
    Forbidden,
    /// 403 `{"error":"access_denied"}`, as Auth0 answers.
    AccessDenied,
    /// 400 `{"error":"invalid_scope"}`.
    InvalidScope,
    /// 429 with `Retry-After: <this text>` (an HTTP date, e.g. [`YEAR_9999`]).
    RetryAfterDate(String),
    /// `reply`, with Okta's rate-limit headers (`X-Rate-Limit-Limit`, `-Remaining`,
    /// `-Reset` this many seconds ahead) added, as Okta sends them on every answer.
    WithOktaReset(u64, Box<Reply>),
    /// 200 with a body that is not JSON.
    Malformed,
    /// 200 with this access token (any characters), `expires_in` this many seconds.
    Literal(String, u64),
    /// This status with this body as it is (a discovery document, a hostile one).
    Body(u16, String),
    /// Never answers; the connection stays open until the IdP stops.
    Hang,
    /// `reply`, its body after a UTF-8 byte-order mark (as some gateways send it).
    WithBom(Box<Reply>),
    /// Waits this long, then answers `reply`. What the answer holds (a token, a rotated
    /// refresh token) is decided and recorded when the request arrives, as a provider
    /// does: a client that gives up waiting loses what the answer carried.
    Slow(Duration, Box<Reply>),
}

/// An HTTP date in year 9999, for absurd `Retry-After` values.
pub const YEAR_9999: &str = "Fri, 31 Dec 9999 23:59:59 GMT";

impl Reply {
    /// A 200 with a 48-character token and `"expires_in": secs`.
    pub fn token(secs: u64) -> Reply {
        Reply::Token {
            expiry: Expiry::In(secs),
            len: 48..49,
        }
    }

    pub fn token_with(expiry: Expiry) -> Reply {
        Reply::Token {
            expiry,
            len: 48..49,
        }
    }

    /// `reply`, answered after `delay`.
    pub fn slow(delay: Duration, reply: Reply) -> Reply {
        Reply::Slow(delay, Box::new(reply))
    }

    /// `reply` with Okta's `X-Rate-Limit-Reset` this many seconds ahead.
    pub fn with_okta_reset(secs: u64, reply: Reply) -> Reply {
        Reply::WithOktaReset(secs, Box::new(reply))
    }

    /// Whether this answer issues a token (and so rotates a refresh token).
    fn is_token(&self) -> bool {
        match self {
            Reply::Token { .. } => true,
            Reply::WithBom(r) | Reply::WithOktaReset(_, r) | Reply::Slow(_, r) => r.is_token(),
            _ => false,
        }
    }
}

/// One request as the IdP received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent on the request line.
    pub target: String,
    /// Names lowercased, in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub at: Instant,
    /// The status the IdP answered (decided on arrival; 0 for [`Reply::Hang`]).
    pub status: u16,
}

impl Request {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The form fields of the body.
    pub fn form(&self) -> BTreeMap<String, String> {
        pairs(&self.body)
    }

    /// The fields of the query string.
    pub fn query(&self) -> BTreeMap<String, String> {
        pairs(self.target.split_once('?').map_or("", |(_, q)| q))
    }

    /// The `grant_type` field, from the body or the query.
    pub fn grant_type(&self) -> Option<String> {
        self.form()
            .remove("grant_type")
            .or_else(|| self.query().remove("grant_type"))
    }

    /// The refresh token presented with the refresh_token grant (body or query).
    pub fn refresh_token(&self) -> Option<String> {
        if self.grant_type().as_deref() != Some("refresh_token") {
            return None;
        }
        self.form()
            .remove("refresh_token")
            .or_else(|| self.query().remove("refresh_token"))
    }

    /// `id:secret` from an `Authorization: Basic` header.
    pub fn basic(&self) -> Option<String> {
        let b64 = self.header("authorization")?.strip_prefix("Basic ")?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("the Basic credentials are base64");
        Some(String::from_utf8(bytes).expect("the Basic credentials are UTF-8"))
    }
}

fn pairs(s: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for (k, v) in url::form_urlencoded::parse(s.as_bytes()).into_owned() {
        let dup = map.insert(k.clone(), v);
        assert!(dup.is_none(), "field {k:?} sent twice in {s:?}");
    }
    map
}

struct State {
    queue: VecDeque<Reply>,
    default: Reply,
    /// What issued opaque tokens start with: `tok`, or a name ([`FakeIdp::name_tokens`]).
    prefix: String,
    requests: Vec<Request>,
    issued: Vec<String>,
    issued_set: HashSet<String>,
    /// When each token with an `expires_in` expires, by this process's clock.
    expiries: std::collections::HashMap<String, Instant>,
    /// Refresh tokens handed out with tokens for the refresh_token grant (rotation).
    refresh_issued: Vec<String>,
    /// Refresh-token families; empty until a seed is given, and then every refresh
    /// token must belong to one.
    families: Vec<Family>,
}

/// One chain of refresh tokens, seed first; the last one is the only good one.
struct Family {
    tokens: Vec<String>,
    /// Set when a used refresh token came back: every token of the family is dead.
    revoked: bool,
}

/// What the families say about a presented refresh token.
enum Verdict {
    /// The current token of family `i`.
    Current(usize),
    /// Unknown, from a revoked family, or reused (which revokes the family first).
    Rejected,
}

impl State {
    fn next_reply(&mut self) -> Reply {
        match self.queue.pop_front() {
            Some(r) => r,
            None => self.default.clone(),
        }
    }

    fn judge(&mut self, rt: &str) -> Verdict {
        let Some(i) = self
            .families
            .iter()
            .position(|f| f.tokens.iter().any(|t| t == rt))
        else {
            return Verdict::Rejected;
        };
        let family = &mut self.families[i];
        if family.revoked {
            return Verdict::Rejected;
        }
        if family.tokens.last().map(String::as_str) != Some(rt) {
            // Reuse: an attacker may hold the chain; the provider kills all of it.
            family.revoked = true;
            return Verdict::Rejected;
        }
        Verdict::Current(i)
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the first failure behind a poison error.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake IdP; stops when dropped.
pub struct FakeIdp {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeIdp {
    /// Starts on `127.0.0.1:0`, answering `default` when the queue is empty.
    pub fn start(default: Reply) -> FakeIdp {
        Self::start_on("127.0.0.1:0".parse().expect("a socket address"), default)
    }

    /// Starts on `addr` (a port a previous IdP used, to come back after an outage).
    pub fn start_on(addr: SocketAddr, default: Reply) -> FakeIdp {
        assert!(addr.ip().is_loopback(), "servers bind on loopback only");
        let std_listener = std::net::TcpListener::from(reusable_port(addr, true));
        std_listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = std_listener.local_addr().expect("a bound address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                default,
                prefix: "tok".to_owned(),
                requests: Vec::new(),
                issued: Vec::new(),
                issued_set: HashSet::new(),
                expiries: Default::default(),
                refresh_issued: Vec::new(),
                families: Vec::new(),
            }),
            changed: Condvar::new(),
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn({
            let shared = shared.clone();
            move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the fake IdP");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("a tokio listener");
                    tokio::select! {
                        _ = stop_rx => {}
                        _ = accept_loop(listener, shared) => {}
                    }
                });
                // Dropping the runtime drops every connection task, hanging ones too.
            }
        });
        FakeIdp {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The token endpoint's URL.
    pub fn url(&self) -> String {
        format!("http://{}/oauth2/token", self.addr)
    }

    /// Answers `reply` when the queue is empty, from now on.
    pub fn set_default(&self, reply: Reply) {
        self.shared.lock().default = reply;
    }

    /// Issues opaque tokens as `NAME-<n>-...` instead of `tok-<n>-...` from now on: with
    /// one IdP per account, a token read back shows whose it is.
    pub fn name_tokens(&self, name: &str) {
        self.shared.lock().prefix = name.to_owned();
    }

    /// Starts a refresh-token family with `seed` (Okta, Auth0): from now on the
    /// refresh_token grant is judged against the families. The current token of a live
    /// family gets the scripted reply, and a token answer rotates it (the answer's new
    /// refresh token becomes the current one). Any other refresh token gets 400
    /// `invalid_grant` without consuming a scripted reply; a used one presented again
    /// also revokes its family, so the current one stops working too.
    pub fn seed_refresh_token(&self, seed: &str) {
        self.shared.lock().families.push(Family {
            tokens: vec![seed.to_owned()],
            revoked: false,
        });
    }

    /// The current (good) refresh token of `seed`'s family; `None` once it is revoked.
    pub fn current_refresh_token(&self, seed: &str) -> Option<String> {
        let state = self.shared.lock();
        let family = state.families.iter().find(|f| f.tokens[0] == seed)?;
        (!family.revoked)
            .then(|| family.tokens.last().cloned())
            .flatten()
    }

    /// Whether `seed`'s family was revoked (a used refresh token came back).
    pub fn family_revoked(&self, seed: &str) -> bool {
        self.shared
            .lock()
            .families
            .iter()
            .any(|f| f.tokens[0] == seed && f.revoked)
    }

    /// The refresh tokens presented with the refresh_token grant, in order.
    pub fn refresh_tokens_presented(&self) -> Vec<String> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter_map(Request::refresh_token)
            .collect()
    }

    /// The refresh tokens presented more than once (each named once, in order of their
    /// second use): what a chain that is never lost never shows.
    pub fn reused_refresh_tokens(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        let mut reused = Vec::new();
        for rt in self.refresh_tokens_presented() {
            if !seen.insert(rt.clone()) && !reused.contains(&rt) {
                reused.push(rt);
            }
        }
        reused
    }

    /// Queues `reply` for a coming request.
    pub fn push(&self, reply: Reply) {
        self.shared.lock().queue.push_back(reply);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// Every token issued so far, in order.
    pub fn issued(&self) -> Vec<String> {
        self.shared.lock().issued.clone()
    }

    /// Every refresh token handed out (one with each token for the refresh_token grant).
    pub fn refresh_issued(&self) -> Vec<String> {
        self.shared.lock().refresh_issued.clone()
    }

    /// When a token expires (tokens issued with an `expires_in`), by the test's clock,
    /// for another thread (a sampler of token files): what tells whether a member
    /// serves a valid token, whatever the member's clock says.
    pub fn expiry_reader(&self) -> impl Fn(&str) -> Option<Instant> + Send + 'static {
        let shared = self.shared.clone();
        move |token| shared.lock().expiries.get(token).copied()
    }

    /// Whether this IdP issued `token` (recorded before the answer is sent).
    pub fn is_issued(&self, token: &str) -> bool {
        self.shared.lock().issued_set.contains(token)
    }

    /// Waits until at least `n` requests came in; panics after `timeout`.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Request> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        while state.requests.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {timeout:?} waiting for {n} requests; got {}",
                state.requests.len()
            );
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.requests.clone()
    }

    /// Stops listening and closes every connection. The port stays reserved, refusing
    /// connections, until [`ClosedPort::reopen`]: no other test can take it meanwhile
    /// (it is held before the listener closes: both bind it with `SO_REUSEPORT`).
    pub fn stop(mut self) -> ClosedPort {
        let held = ClosedPort::hold(self.addr);
        self.shutdown();
        held
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeIdp {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A loopback port bound by a socket that does not listen: connections to it are
/// refused (ECONNREFUSED), as to a provider that is down.
pub struct ClosedPort {
    addr: SocketAddr,
    _socket: std::os::fd::OwnedFd,
}

impl ClosedPort {
    fn hold(addr: SocketAddr) -> ClosedPort {
        ClosedPort {
            addr,
            _socket: reusable_port(addr, false),
        }
    }

    /// Starts a fake IdP on the held port again (listening before the port is let go).
    pub fn reopen(self, default: Reply) -> FakeIdp {
        FakeIdp::start_on(self.addr, default)
    }
}

/// A TCP socket bound to `addr` (IPv4 loopback) with `SO_REUSEADDR` (the closed
/// connections of a stopped IdP are in TIME_WAIT on its port) and `SO_REUSEPORT` (so a
/// listener and the socket that holds its port closed can be bound at the same time),
/// listening or not. A port only ever bound with `SO_REUSEPORT` cannot be taken by
/// another test's bind meanwhile.
fn reusable_port(addr: SocketAddr, listen: bool) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    let SocketAddr::V4(v4) = addr else {
        panic!("the fake IdP binds IPv4 loopback");
    };
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("a socket");
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    socket::setsockopt(&fd, sockopt::ReusePort, &true).expect("SO_REUSEPORT");
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(v4))
        .unwrap_or_else(|e| panic!("bind the fake IdP's port {addr}: {e}"));
    if listen {
        socket::listen(&fd, socket::Backlog::new(128).expect("a backlog")).expect("listen");
    }
    fd
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, shared.clone()));
            }
            // Out of descriptors, most likely: not a reason for a busy loop.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Reads one request, records it, and answers with the next scripted reply.
async fn serve(mut stream: TcpStream, shared: Arc<Shared>) {
    let Some(mut req) = read_request(&mut stream).await else {
        return;
    };
    // The refresh_token grant gets a rotated refresh token with every token.
    let presented = req.refresh_token();
    let rotates = req.grant_type().as_deref() == Some("refresh_token");
    let (delay, answer) = {
        let mut state = shared.lock();
        let verdict = match presented.as_deref() {
            Some(rt) if !state.families.is_empty() => Some(state.judge(rt)),
            _ => None,
        };
        // A rejected refresh token consumes no scripted reply.
        let (family, mut reply) = match verdict {
            Some(Verdict::Rejected) => (None, Reply::InvalidGrant),
            Some(Verdict::Current(i)) => (Some(i), state.next_reply()),
            None => (None, state.next_reply()),
        };
        let mut delay = Duration::ZERO;
        while let Reply::Slow(d, inner) = reply {
            delay += d;
            reply = *inner;
        }
        let refresh = (rotates && reply.is_token()).then(|| {
            let n = state.refresh_issued.len() + 1;
            format!("rrt-{n}-{}", random_chars(16))
        });
        if let (Some(i), Some(rt)) = (family, &refresh) {
            state.families[i].tokens.push(rt.clone());
        }
        let answer = render(&mut state, reply, refresh);
        req.status = answer.as_ref().map_or(0, |a| a.0);
        state.requests.push(req);
        shared.changed.notify_all();
        (delay, answer)
    };
    tokio::time::sleep(delay).await;
    let Some((_, bytes)) = answer else {
        return std::future::pending().await;
    };
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
}

/// The status and bytes of `reply` (`None` for [`Reply::Hang`]); a token is recorded
/// as issued here, before it is sent.
fn render(state: &mut State, reply: Reply, refresh: Option<String>) -> Option<(u16, Vec<u8>)> {
    let rate_limited = r#"{"errorCode":"E0000047","errorSummary":"API call exceeded rate limit"}"#;
    let (status, headers, body): (u16, Vec<(&str, String)>, String) = match reply {
        Reply::Hang => return None,
        Reply::Slow(_, inner) => return render(state, *inner, refresh),
        Reply::WithBom(inner) => {
            let (status, bytes) = render(state, *inner, refresh)?;
            let text = String::from_utf8(bytes).expect("the fake IdP answers UTF-8");
            let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
            let head = head
                .lines()
                .map(|l| match l.to_ascii_lowercase().strip_prefix("content-length:") {
                    Some(n) => format!("Content-Length: {}", n.trim().parse::<usize>().unwrap() + 3),
                    None => l.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("\r\n");
            return Some((status, format!("{head}\r\n\r\n\u{feff}{body}").into_bytes()));
        }
        Reply::WithOktaReset(secs, inner) => {
            let (status, bytes) = render(state, *inner, refresh)?;
            return Some((status, with_okta_headers(bytes, secs)));
        }
        Reply::Token { expiry, len } => {
            let n = state.issued.len() + 1;
            let (token, body) = token_body(&state.prefix, n, &expiry, len, refresh.clone());
            if let Expiry::In(secs) | Expiry::InString(secs) = expiry {
                // A lifetime past what an Instant holds (u64::MAX seconds) never ends.
                if let Some(at) = Instant::now().checked_add(Duration::from_secs(secs)) {
                    state.expiries.insert(token.clone(), at);
                }
            }
            state.issued.push(token.clone());
            state.refresh_issued.extend(refresh);
            state.issued_set.insert(token);
            (200, vec![], body)
        }
        Reply::Status(status) => (status, vec![], "<html><body>oops</body></html>".into()),
        Reply::RetryAfter(secs) => (
            429,
            vec![("Retry-After", secs.to_string())],
            rate_limited.into(),
        ),
        Reply::RetryAfterDate(date) => (429, vec![("Retry-After", date)], rate_limited.into()),
        Reply::OktaReset(secs) => {
            return Some((
                429,
                with_okta_headers(response(429, &[], rate_limited), secs),
            ))
        }
        Reply::InvalidGrant => (
            400,
            vec![],
            r#"{"error":"invalid_grant","error_description":"The credentials provided were invalid."}"#.into(),
        ),
        Reply::InvalidClient => (
            401,
            vec![("WWW-Authenticate", "Basic realm=\"test\"".into())],
            r#"{"error":"invalid_client","error_description":"Client authentication failed."}"#.into(),
        ),
        Reply::Forbidden => (403, vec![], String::new()),
        Reply::AccessDenied => (
            403,
            vec![],
            r#"{"error":"access_denied","error_description":"Unauthorized"}"#.into(),
        ),
        Reply::InvalidScope => (
            400,
            vec![],
            r#"{"error":"invalid_scope","error_description":"The authorization server resource does not have any configured default scopes."}"#.into(),
        ),
        Reply::Malformed => (200, vec![], r#"{"access_token": "tok-trunc"#.into()),
        Reply::Body(status, body) => (status, vec![], body),
        Reply::Literal(token, secs) => (
            200,
            vec![],
            serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": secs})
                .to_string(),
        ),
    };
    Some((status, response(status, &headers, &body)))
}

/// `response` with Okta's rate-limit headers added after the status line.
fn with_okta_headers(response: Vec<u8>, reset_in: u64) -> Vec<u8> {
    let text = String::from_utf8(response).expect("the fake IdP answers UTF-8");
    let (status_line, rest) = text
        .split_once("\r\n")
        .expect("a response has a status line");
    let remaining = if status_line.contains(" 429 ") { 0 } else { 42 };
    format!(
        "{status_line}\r\nX-Rate-Limit-Limit: 600\r\nX-Rate-Limit-Remaining: {remaining}\r\nX-Rate-Limit-Reset: {}\r\n{rest}",
        epoch_secs() + reset_in
    )
    .into_bytes()
}

/// The request line, headers and `Content-Length` body; `None` when the client went away
/// or sent something this responder does not speak (answered 400/501 first).
async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_REQUEST {
            let _ = stream.write_all(&response(431, &[], "")).await;
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let at = Instant::now();
    let head = String::from_utf8(buf[..head_end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let (method, target) = (request_line.next()?, request_line.next()?);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let value = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    if value("transfer-encoding").is_some() {
        let _ = stream.write_all(&response(501, &[], "")).await;
        return None;
    }
    let len: usize = match value("content-length") {
        Some(v) => v.parse().ok()?,
        None => 0,
    };
    if len > MAX_REQUEST {
        let _ = stream.write_all(&response(413, &[], "")).await;
        return None;
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Some(Request {
        method: method.to_owned(),
        target: target.to_owned(),
        body: String::from_utf8(body).ok()?,
        headers,
        at,
        status: 0,
    })
}

fn response(status: u16, headers: &[(&str, String)], body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Whatever",
    };
    let kind = if body.starts_with('<') {
        "text/html"
    } else {
        "application/json"
    };
    // A Date, as every provider sends: cluster members compare their clocks with it.
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\ncache-control: no-store\r\ndate: {}\r\n",
        body.len(),
        httpdate::fmt_http_date(SystemTime::now())
    );
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

fn epoch_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// The `n`-th token and the JSON answer that carries it. Tokens are `<prefix>-<n>-`
/// padded with random letters to a length in `len`, or a JWT with `"jti": n`: unique
/// either way.
fn token_body(
    prefix: &str,
    n: usize,
    expiry: &Expiry,
    len: Range<usize>,
    refresh: Option<String>,
) -> (String, String) {
    let mut fields = serde_json::Map::new();
    let token = match expiry {
        Expiry::Jwt(_) | Expiry::JwtExp(_) => {
            let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            let exp: serde_json::Value = match expiry {
                Expiry::Jwt(secs) => (epoch_secs() + secs).into(),
                Expiry::JwtExp(exp) => (*exp).into(),
                _ => unreachable!("matched above"),
            };
            let claims = serde_json::json!({ "sub": "tokend-test", "jti": n, "exp": exp });
            format!(
                "{}.{}.c2lnbmF0dXJl",
                b64(r#"{"alg":"RS256","typ":"JWT"}"#),
                b64(&claims.to_string())
            )
        }
        _ => {
            let prefix = format!("{prefix}-{n}-");
            let want = rand::thread_rng().gen_range(len);
            prefix.clone() + &random_chars(want.saturating_sub(prefix.len()))
        }
    };
    fields.insert("access_token".into(), token.clone().into());
    fields.insert("token_type".into(), "bearer".into());
    match expiry {
        Expiry::In(secs) => {
            fields.insert("expires_in".into(), (*secs).into());
        }
        Expiry::InString(secs) => {
            fields.insert("expires_in".into(), secs.to_string().into());
        }
        Expiry::Raw(json) => {
            let v: serde_json::Value = serde_json::from_str(json).expect("Expiry::Raw is JSON");
            fields.insert("expires_in".into(), v);
        }
        Expiry::Missing | Expiry::Jwt(_) | Expiry::JwtExp(_) => {}
    }
    if let Some(r) = refresh {
        fields.insert("refresh_token".into(), r.into());
    }
    fields.insert("scope".into(), "full".into());
    // MSK's answer carries fields of its own.
    fields.insert("consented_on".into(), 1_700_000_000u64.into());
    (token, serde_json::Value::Object(fields).to_string())
}

fn random_chars(n: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| rng.sample(rand::distributions::Alphanumeric) as char)
        .collect()
}
