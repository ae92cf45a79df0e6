//! The socket API end to end (SPEC §4, and §5 `get`, `status` and `refresh`): a real `tokend run`
//! against a small fake token endpoint, asked over its real Unix socket, by root and by
//! test users switched to with `setpriv`; and the server's limits (slow clients,
//! a thousand connections, garbage) against `tokend::server::serve_with` in-process.
//!
//! The access matrix needs root to create users and switch to them; CI runs as root.
//! Run elsewhere, that test fails with "needs root" rather than passing unseen.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tokend");
const SECRET_ENV: &str = "TOKEND_T_SECRET";

// ---------------------------------------------------------------------------------
// A fake token endpoint on 127.0.0.1:0. The path says what it answers:
//   /ok/LIFETIME/NAME  200, token "NAME-N" (N counts every request) living LIFETIME s
//   /fail              503 temporarily_unavailable
//   /refuse            400 invalid_grant (the account is held)
// ---------------------------------------------------------------------------------

struct Idp {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl Idp {
    fn start() -> Idp {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let counter = counter.clone();
                std::thread::spawn(move || idp_answer(conn, &counter));
            }
        });
        Idp { addr, requests }
    }

    fn ok(&self, name: &str, lifetime: u32) -> String {
        format!("http://{}/ok/{lifetime}/{name}", self.addr)
    }

    fn fail(&self) -> String {
        format!("http://{}/fail", self.addr)
    }

    fn refuse(&self) -> String {
        format!("http://{}/refuse", self.addr)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn idp_answer(mut conn: TcpStream, counter: &AtomicUsize) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (status, body) = match parts.as_slice() {
        ["ok", life, name] => (
            "200 OK",
            serde_json::json!({
                "access_token": format!("{name}-{n}"),
                "token_type": "Bearer",
                "expires_in": life.parse::<u64>().unwrap(),
                "scope": "full",
            }),
        ),
        ["refuse"] => (
            "400 Bad Request",
            serde_json::json!({"error": "invalid_grant"}),
        ),
        _ => (
            "503 Service Unavailable",
            serde_json::json!({"error": "temporarily_unavailable"}),
        ),
    };
    let body = body.to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------
// A daemon: `tokend run` with a config written for the test; stopped when dropped.
// ---------------------------------------------------------------------------------

/// One `[[account]]` table. `extra` goes last (so it may open `[account.access]`).
fn account(name: &str, url: &str, extra: &str) -> String {
    let interval = if extra.contains("min_refresh_interval") {
        ""
    } else {
        "min_refresh_interval = \"1s\"\n"
    };
    format!(
        "[[account]]\nname = \"{name}\"\ntoken_url = \"{url}\"\ngrant_type = \"client_credentials\"\n\
         client_id = \"id\"\nclient_secret = {{ env = \"{SECRET_ENV}\" }}\n{interval}{extra}\n"
    )
}

struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    config: PathBuf,
}

impl Daemon {
    /// Starts a daemon serving `accounts` on a socket anyone may connect to; `daemon`
    /// adds `[daemon]` keys.
    fn start(daemon: &str, accounts: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        // Test users must reach the socket inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("tokend.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nsocket = \"{}\"\nsocket_mode = \"0666\"\nlog_format = \"text\"\n{daemon}\n\n{accounts}",
                socket.display()
            ),
        )
        .unwrap();
        let mut d = Daemon {
            child: None,
            dir,
            socket,
            config,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("log")).unwrap();
        let child = Command::new(BIN)
            .args(["run", "-c"])
            .arg(&self.config)
            .env(SECRET_ENV, "s3cret")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tokend exited with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no socket:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Reply {
        request(&self.socket, "GET", path, &[])
    }

    /// Waits until `account` serves a token, and returns it.
    fn token(&self, account: &str) -> String {
        let r = wait_for(|| {
            let r = self.get(&format!("/v1/tokens/{account}/raw"));
            (r.status == 200).then_some(r)
        });
        r.text()
    }

    /// SIGTERM, and the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        wait_for(|| child.try_wait().unwrap())
    }

    fn tokend(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env_remove("TOKEND_CONFIG")
            .env_remove("TOKEND_SOCKET")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` until it gives a value; the timeout only bounds a failure.
fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------
// A plain HTTP/1.1 client on a std UnixStream, one request per connection.
// ---------------------------------------------------------------------------------

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }
    fn json(&self) -> Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        serde_json::from_slice(&self.body).unwrap()
    }
    /// An error answer: checks its shape, returns its `error`.
    fn error(&self) -> String {
        let v = self.json();
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        v["error"].as_str().unwrap().to_owned()
    }
}

fn request(socket: &Path, method: &str, path: &str, body: &[u8]) -> Reply {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_reply(&raw)
        .unwrap_or_else(|| panic!("no HTTP answer: {:?}", String::from_utf8_lossy(&raw)))
}

fn parse_reply(raw: &[u8]) -> Option<Reply> {
    let end = find(raw, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(Reply {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

// ---------------------------------------------------------------------------------
// Test users (root only): created idempotently, named tokend-t-*.
// ---------------------------------------------------------------------------------

struct TestUser {
    name: &'static str,
    uid: u32,
    gid: u32,
}

const G_PRIMARY: &str = "tokend-t-gprim";
const G_SUPP: &str = "tokend-t-gsupp";

/// (name, primary group, supplementary groups)
const USERS: [(&str, Option<&str>, Option<&str>); 4] = [
    ("tokend-t-user", None, None),
    ("tokend-t-prim", Some(G_PRIMARY), None),
    ("tokend-t-supp", None, Some(G_SUPP)),
    ("tokend-t-stranger", None, None),
];

fn test_users() -> Vec<TestUser> {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root: the access matrix creates users and groups and runs clients as them (CI runs as root)"
    );
    static SETUP: std::sync::Once = std::sync::Once::new();
    SETUP.call_once(|| {
        for g in [G_PRIMARY, G_SUPP] {
            run_ok(Command::new("groupadd").args(["-f", g]));
        }
        for (name, primary, supp) in USERS {
            if nix::unistd::User::from_name(name).unwrap().is_some() {
                continue;
            }
            let mut cmd = Command::new("useradd");
            cmd.args(["-M", "-N", "-s", "/usr/sbin/nologin"]);
            cmd.args(["-g", primary.unwrap_or("nogroup")]);
            if let Some(s) = supp {
                cmd.args(["-G", s]);
            }
            run_ok(cmd.arg(name));
        }
    });
    USERS
        .iter()
        .map(|(name, ..)| {
            let u = nix::unistd::User::from_name(name).unwrap().unwrap();
            TestUser {
                name,
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
            }
        })
        .collect()
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `args` as `user`, with the groups the user database gives them.
fn as_user(user: &TestUser, args: &[&str]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--init-groups")
        .arg("--")
        .args(args)
        .env_remove("TOKEND_CONFIG")
        .env_remove("TOKEND_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `curl` as `user`: (HTTP status, body).
fn curl_as(user: &TestUser, socket: &Path, path: &str) -> (u16, String) {
    curl_method_as(user, socket, "GET", path)
}

/// `curl -X METHOD` as `user`: (HTTP status, body).
fn curl_method_as(user: &TestUser, socket: &Path, method: &str, path: &str) -> (u16, String) {
    let out = as_user(
        user,
        &[
            "curl",
            "-sS",
            "-X",
            method,
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
            socket.to_str().unwrap(),
            &format!("http://localhost{path}"),
        ],
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

// ---------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------

#[test]
fn access_matrix_over_the_socket() {
    let users = test_users();
    let idp = Idp::start();
    let accounts = [
        account(
            "by-user",
            &idp.ok("by-user", 3600),
            "[account.access]\nusers = [\"tokend-t-user\"]",
        ),
        account(
            "by-primary",
            &idp.ok("by-primary", 3600),
            &format!("[account.access]\ngroups = [\"{G_PRIMARY}\"]"),
        ),
        account(
            "by-supp",
            &idp.ok("by-supp", 3600),
            &format!("[account.access]\ngroups = [\"{G_SUPP}\"]"),
        ),
        account("nobody", &idp.ok("nobody", 3600), ""),
    ]
    .concat();
    let d = Daemon::start("", &accounts);
    for a in ["by-user", "by-primary", "by-supp", "nobody"] {
        d.token(a);
    }
    let readable: [(&str, &[&str]); 4] = [
        ("tokend-t-user", &["by-user"]),
        ("tokend-t-prim", &["by-primary"]),
        ("tokend-t-supp", &["by-supp"]),
        ("tokend-t-stranger", &[]),
    ];
    let (_, unknown) = curl_as(&users[3], &d.socket, "/v1/tokens/no-such-account");
    for (user, may) in readable {
        let u = users.iter().find(|u| u.name == user).unwrap();
        for a in ["by-user", "by-primary", "by-supp", "nobody"] {
            let allowed = may.contains(&a);
            let (code, body) = curl_as(u, &d.socket, &format!("/v1/tokens/{a}/raw"));
            assert_eq!(
                code,
                if allowed { 200 } else { 404 },
                "{user} reading {a}: {body}"
            );
            if allowed {
                assert!(body.starts_with(&format!("{a}-")), "{body}");
            } else {
                // Forbidden reads exactly like unknown: names cannot be probed.
                assert_eq!(
                    body.replace(a, "no-such-account"),
                    unknown,
                    "{user} reading {a}"
                );
            }
            let (code, _) = curl_as(u, &d.socket, &format!("/v1/tokens/{a}"));
            assert_eq!(code, if allowed { 200 } else { 404 });
            let (code, _) = curl_as(u, &d.socket, &format!("/v1/tokens/{a}/refresh"));
            assert_eq!(code, 405, "the method is checked, not the account");
        }
        let (code, list) = curl_as(u, &d.socket, "/v1/tokens");
        assert_eq!(code, 200);
        let list: Value = serde_json::from_str(&list).unwrap();
        let names: Vec<&str> = list["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["account"].as_str().unwrap())
            .collect();
        assert_eq!(names, may, "{user}'s list");

        // The same through `tokend get` and `tokend status`.
        let sock = d.socket.to_str().unwrap();
        let out = as_user(u, &[BIN, "get", "--socket", sock, "by-supp"]);
        if may.contains(&"by-supp") {
            assert!(out.status.success());
            assert!(String::from_utf8_lossy(&out.stdout).starts_with("by-supp-"));
        } else {
            assert_eq!(out.status.code(), Some(1));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("no account \"by-supp\" that you"), "{err}");
        }
        let out = as_user(u, &[BIN, "status", "--socket", sock]);
        assert!(out.status.success());
        let table = String::from_utf8_lossy(&out.stdout);
        for a in ["by-user", "by-primary", "by-supp", "nobody"] {
            assert_eq!(table.contains(a), may.contains(&a), "{user}: {table}");
        }
    }
    // Root reads everything.
    let list = d.get("/v1/tokens").json();
    assert_eq!(list["accounts"].as_array().unwrap().len(), 4);
    assert_eq!(d.get("/v1/tokens/nobody/raw").status, 200);

    // A socket the user may not open: a clear message.
    let closed = Daemon::start("", &account("x", &idp.ok("x", 3600), ""));
    std::fs::set_permissions(&closed.socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = as_user(
        &users[3],
        &[BIN, "status", "--socket", closed.socket.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("permission denied on") && err.contains("mode 0600"),
        "{err}"
    );
}

#[test]
fn token_endpoints_serve_json_raw_and_list() {
    let idp = Idp::start();
    let d = Daemon::start(
        "",
        &account("msk", &idp.ok("msk", 3600), "scope = \"full\""),
    );
    let raw = d.token("msk");
    assert!(raw.starts_with("msk-"), "{raw}");

    let r = d.get("/v1/tokens/msk/raw");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.text(), raw, "the token alone, no newline");

    let r = d.get("/v1/tokens/msk");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let j = r.json();
    assert_eq!(j["account"], "msk");
    assert_eq!(j["access_token"], raw.as_str());
    assert_eq!(j["token_type"], "Bearer");
    assert_eq!(j["scope"], "full");
    for k in ["expires_at", "issued_at"] {
        assert!(j[k].as_str().unwrap().ends_with('Z'), "{k}: {j}");
    }

    let r = d.get("/v1/tokens");
    assert_eq!(r.status, 200);
    let list = r.json();
    let a = &list["accounts"][0];
    assert_eq!(a["account"], "msk");
    assert_eq!(a["status"], "fresh");
    assert_eq!(a["valid"], true);
    assert!(a["expires_at"].is_string() && a["last_refresh"].is_string());
    assert!(a["last_error"].is_null());
    assert!(!r.text().contains(&raw), "the list holds no token");

    // HEAD: headers only.
    let r = request(&d.socket, "HEAD", "/v1/tokens/msk/raw", &[]);
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
}

#[test]
fn account_without_a_token_answers_503_with_retry_after() {
    let idp = Idp::start();
    let d = Daemon::start(
        "",
        &[
            account("up", &idp.ok("up", 3600), ""),
            account("down", &idp.fail(), ""),
        ]
        .concat(),
    );
    d.token("up");
    // Wait for the first failure to be recorded.
    let list = wait_for(|| {
        let l = d.get("/v1/tokens").json();
        (l["accounts"][0]["status"] == "failing").then_some(l)
    });
    let down = &list["accounts"][0];
    assert_eq!(down["account"], "down");
    assert_eq!(down["valid"], false);
    assert!(
        down["last_error"].as_str().unwrap().contains("503"),
        "{down}"
    );

    for path in ["/v1/tokens/down", "/v1/tokens/down/raw"] {
        let r = d.get(path);
        assert_eq!(r.status, 503);
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=3600).contains(&retry), "{retry}");
        assert_eq!(r.error(), "no_token");
    }

    let r = d.get("/v1/health");
    assert_eq!(r.status, 503);
    let h = r.json();
    assert_eq!(h["status"], "unhealthy");
    assert_eq!(h["not_ready"].as_array().unwrap().len(), 1);
    assert_eq!(h["not_ready"][0]["account"], "down");
    assert_eq!(h["not_ready"][0]["status"], "failing");
}

#[test]
fn errors_are_json_with_the_right_status() {
    let idp = Idp::start();
    let d = Daemon::start("", &account("a", &idp.ok("a", 3600), ""));
    d.token("a");
    let cases: [(&str, &str, u16, &str); 12] = [
        ("GET", "/", 404, "not_found"),
        ("GET", "/v1/tokens/", 404, "not_found"),
        ("GET", "/v1/tokens/a/raw/more", 404, "not_found"),
        ("GET", "/v1/tokens/nope", 404, "not_found"),
        ("POST", "/v1/tokens/nope/refresh", 404, "not_found"),
        ("DELETE", "/v1/tokens/a", 405, "method_not_allowed"),
        ("GET", "/v1/tokens/a/refresh", 405, "method_not_allowed"),
        ("POST", "/v1/health", 405, "method_not_allowed"),
        ("GET", "/v1/tokens/a?min_valid=soon", 400, "bad_request"),
        (
            "POST",
            "/v1/tokens/a/refresh?force=maybe",
            400,
            "bad_request",
        ),
        ("POST", "/v1/tokens/a/refresh?force=", 400, "bad_request"),
        // The query is checked before the account: nothing is told about either.
        (
            "POST",
            "/v1/tokens/nope/refresh?force=true",
            404,
            "not_found",
        ),
    ];
    for (method, path, status, error) in cases {
        let r = request(&d.socket, method, path, &[]);
        assert_eq!(r.status, status, "{method} {path}: {r:?}");
        assert_eq!(r.error(), error, "{method} {path}");
        if status == 405 {
            assert!(r.header("allow").is_some());
        }
    }
    // Bodies are bounded.
    let r = request(&d.socket, "POST", "/v1/tokens/a/refresh", &[b'x'; 4096]);
    assert_eq!(r.status, 413);
    assert_eq!(r.error(), "payload_too_large");
    // A small body is fine.
    let r = request(&d.socket, "POST", "/v1/tokens/a/refresh", b"{}");
    assert_eq!(r.status, 202);
    // The message names the bad value.
    let r = request(&d.socket, "POST", "/v1/tokens/a/refresh?force=maybe", &[]);
    let m = r.json()["message"].as_str().unwrap().to_owned();
    assert!(
        m.contains("force=\"maybe\"") && m.contains("true nor false"),
        "{m}"
    );
    assert_eq!(
        request(&d.socket, "POST", "/v1/tokens/a/refresh?force=false", &[]).status,
        202
    );
}

#[test]
fn refresh_post_is_accepted_and_refreshes() {
    let idp = Idp::start();
    let d = Daemon::start("", &account("a", &idp.ok("a", 3600), ""));
    let first = d.token("a");
    let r = request(&d.socket, "POST", "/v1/tokens/a/refresh", &[]);
    assert_eq!(r.status, 202);
    assert_eq!(
        r.json(),
        serde_json::json!({"account": "a", "status": "accepted"})
    );
    // A new token comes, no sooner than min_refresh_interval (1 s) after the first.
    let second = wait_for(|| {
        let t = d.get("/v1/tokens/a/raw").text();
        (t != first).then_some(t)
    });
    assert!(second.starts_with("a-"));
    assert_eq!(idp.requests(), 2);
}

/// Waits until `account` is held after refused credentials: failing, its next refresh
/// more than ten minutes away (`auth_failure_hold` is 15 minutes).
fn wait_held(d: &Daemon, account: &str) {
    wait_for(|| {
        let list = d.get("/v1/tokens").json();
        let a = list["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["account"] == account)
            .cloned()
            .unwrap();
        let next = a["next_refresh"].as_str().map(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap()
        })?;
        let held = a["status"] == "failing"
            && next - time::OffsetDateTime::now_utc() > time::Duration::minutes(10);
        held.then_some(())
    });
}

#[test]
fn forced_refresh_ends_a_hold_for_one_attempt() {
    let idp = Idp::start();
    let d = Daemon::start("", &account("held", &idp.refuse(), ""));
    let sock = d.socket.to_str().unwrap();
    // invalid_grant: held, the provider asked once.
    wait_held(&d, "held");
    assert_eq!(idp.requests(), 1);

    // Forced (this process is the daemon's user): the hold ends for one attempt, which
    // a plain refresh cannot do; refused again, the account is held again.
    let r = request(&d.socket, "POST", "/v1/tokens/held/refresh?force=true", &[]);
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(
        r.json(),
        serde_json::json!({"account": "held", "status": "accepted"})
    );
    wait_for(|| (idp.requests() >= 2).then_some(()));
    wait_held(&d, "held");
    assert_eq!(idp.requests(), 2, "one attempt");

    // `tokend refresh --force`, the socket from the config.
    let out = d.tokend(&[
        "refresh",
        "-c",
        d.config.to_str().unwrap(),
        "--force",
        "held",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "forced refresh of held requested: a hold or rate-limit wait is ended for one attempt\n"
    );
    wait_for(|| (idp.requests() >= 3).then_some(()));
    wait_held(&d, "held");

    // `tokend refresh`, plain: accepted (the engine declines it while held).
    let out = d.tokend(&["refresh", "--socket", sock, "held"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "refresh of held requested\n"
    );

    // Failures: exit 1 and the reason.
    let out = d.tokend(&["refresh", "--socket", sock, "--force", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no account \"nope\" that you"), "{err}");
    let missing = d.dir.path().join("missing.sock");
    let out = d.tokend(&["refresh", "--socket", missing.to_str().unwrap(), "held"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tokend is not running"), "{err}");
}

#[test]
fn force_takes_root_or_the_daemons_user() {
    let users = test_users();
    let user = |name: &str| users.iter().find(|u| u.name == name).unwrap();
    let (reader, stranger) = (user("tokend-t-user"), user("tokend-t-stranger"));
    let idp = Idp::start();
    let d = Daemon::start(
        "",
        &account(
            "held",
            &idp.refuse(),
            "[account.access]\nusers = [\"tokend-t-user\"]",
        ),
    );
    let sock = d.socket.to_str().unwrap();
    wait_held(&d, "held");

    // A reader may ask for a refresh, not force one.
    let (code, body) = curl_method_as(
        reader,
        &d.socket,
        "POST",
        "/v1/tokens/held/refresh?force=true",
    );
    assert_eq!(code, 403, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"], "forbidden");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("force=true takes root or the daemon's own user"),
        "{e}"
    );
    let (code, body) = curl_method_as(reader, &d.socket, "POST", "/v1/tokens/held/refresh");
    assert_eq!(code, 202, "{body}");

    // Who may not read the account learns nothing: the answer for an unknown one.
    let (_, unknown) = curl_method_as(
        stranger,
        &d.socket,
        "POST",
        "/v1/tokens/no-such-account/refresh?force=true",
    );
    for path in [
        "/v1/tokens/held/refresh?force=true",
        "/v1/tokens/held/refresh",
    ] {
        let (code, body) = curl_method_as(stranger, &d.socket, "POST", path);
        assert_eq!(code, 404, "{path}: {body}");
        assert_eq!(body.replace("held", "no-such-account"), unknown, "{path}");
    }

    // The same through `tokend refresh`.
    let out = as_user(
        reader,
        &[BIN, "refresh", "--socket", sock, "--force", "held"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("takes root or the daemon's own user"), "{err}");
    let out = as_user(reader, &[BIN, "refresh", "--socket", sock, "held"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "refresh of held requested\n"
    );
    let out = as_user(
        stranger,
        &[BIN, "refresh", "--socket", sock, "--force", "held"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no account \"held\" that you"), "{err}");

    // None of that ended the hold; root's force does.
    assert_eq!(idp.requests(), 1);
    let out = d.tokend(&["refresh", "--socket", sock, "--force", "held"]);
    assert_eq!(out.status.code(), Some(0));
    wait_for(|| (idp.requests() >= 2).then_some(()));
}

#[test]
fn min_valid_refreshes_first_within_min_refresh_interval() {
    let idp = Idp::start();
    let d = Daemon::start(
        "",
        &[
            account("short", &idp.ok("short", 100), ""),
            account(
                "held",
                &idp.ok("held", 100),
                "min_refresh_interval = \"1h\"",
            ),
        ]
        .concat(),
    );
    let first = d.token("short");
    d.token("held");
    // Valid long enough: served as is.
    let r = d.get("/v1/tokens/short/raw?min_valid=30");
    assert_eq!((r.status, r.text()), (200, first.clone()));
    // Wait until fewer than 99 s are left, then ask for 99: the daemon refreshes first.
    wait_for(|| {
        let j = d.get("/v1/tokens/short").json();
        let exp = time::OffsetDateTime::parse(
            j["expires_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        (exp - time::OffsetDateTime::now_utc() < time::Duration::seconds(98)).then_some(())
    });
    let out = d.tokend(&[
        "get",
        "--socket",
        d.socket.to_str().unwrap(),
        "--min-valid",
        "99s",
        "short",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = String::from_utf8(out.stdout).unwrap();
    assert!(second.starts_with("short-") && second != first, "{second}");

    // Longer than the provider's tokens live: refused at once, the provider not asked.
    let before = idp.requests();
    let r = d.get("/v1/tokens/short?min_valid=2h");
    assert_eq!(r.status, 503);
    assert_eq!(r.error(), "expires_too_soon");
    assert!(r.header("retry-after").is_some());
    assert_eq!(idp.requests(), before);

    // Within min_refresh_interval (1 h) no refresh can come: 503 at once, Retry-After
    // says when.
    let t = Instant::now();
    let r = d.get("/v1/tokens/held/raw?min_valid=99");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error(), "expires_too_soon");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry > 3000, "{retry}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn health_and_metrics_on_the_socket_and_the_tcp_listener() {
    let idp = Idp::start();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = Daemon::start(
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
        &[
            account("a", &idp.ok("a", 3600), ""),
            account("b", &idp.ok("b", 3600), ""),
        ]
        .concat(),
    );
    d.token("a");
    d.token("b");
    let r = d.get("/v1/health");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        serde_json::json!({"status": "ok", "not_ready": []})
    );

    let r = d.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let m = r.text();
    for want in [
        "tokend_token_expiry_timestamp_seconds{account=\"a\"}",
        "tokend_last_success_timestamp_seconds{account=\"b\"}",
        "tokend_token_valid{account=\"a\"} 1",
        "tokend_account_status{account=\"a\",status=\"fresh\"} 1",
        "tokend_refresh_attempts_total{account=\"a\",result=\"success\"} 1",
        "tokend_refresh_duration_seconds_count{account=\"a\"} 1",
        "tokend_http_requests_total{listener=\"unix\",code=\"200\"}",
        "# EOF",
    ] {
        assert!(m.contains(want), "missing {want} in:\n{m}");
    }
    assert!(
        !m.contains("a-1") && !m.contains("b-"),
        "no token in the metrics"
    );

    // A reload is counted.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.as_ref().unwrap().id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for(|| {
        d.get("/metrics")
            .text()
            .contains("tokend_config_reloads_total{result=\"success\"} 1")
            .then_some(())
    });

    // The TCP listener: /metrics and /v1/health, nothing else.
    let tcp = |path: &str| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        parse_reply(&raw).unwrap()
    };
    let r = tcp("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("tokend_token_valid{account=\"b\"} 1"));
    let r = tcp("/v1/health");
    assert_eq!(r.status, 200);
    for path in ["/v1/tokens", "/v1/tokens/a", "/v1/tokens/a/raw"] {
        assert_eq!(tcp(path).status, 404, "{path}");
    }
}

#[test]
fn socket_file_lifecycle() {
    let idp = Idp::start();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("t.sock");
    // A stale socket file from a daemon that was killed.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let gid = if nix::unistd::geteuid().is_root() {
        4242
    } else {
        nix::unistd::getegid().as_raw()
    };
    let accounts = account("a", &idp.ok("a", 3600), "");
    let daemon_keys = format!(
        "socket = \"{}\"\nsocket_mode = \"0660\"\nsocket_group = \"{gid}\"",
        socket.display()
    );
    let config = dir.path().join("c.toml");
    std::fs::write(&config, format!("[daemon]\n{daemon_keys}\n\n{accounts}")).unwrap();
    let mut d = Daemon {
        child: None,
        dir,
        socket: socket.clone(),
        config: config.clone(),
    };
    d.spawn();
    d.token("a");
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o7777, 0o660);
    assert_eq!(meta.gid(), gid);

    // A second daemon on the same socket: refused, clearly, and the first unharmed.
    let out = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&config)
        .env(SECRET_ENV, "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another tokend is already serving on"),
        "{err}"
    );
    assert_eq!(d.get("/v1/tokens/a/raw").status, 200);

    // SIGTERM: stops within a second, removes the socket.
    let t = Instant::now();
    let status = d.stop();
    assert!(status.success(), "{status}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert!(!socket.exists());
}

#[test]
fn get_and_status_end_to_end() {
    let idp = Idp::start();
    let d = Daemon::start(
        "",
        &[
            account("msk", &idp.ok("msk", 3600), "scope = \"full\""),
            account("down", &idp.fail(), ""),
        ]
        .concat(),
    );
    let token = d.token("msk");
    let sock = d.socket.to_str().unwrap();

    // Raw: exactly the token, no newline (stdout is no terminal here).
    let out = d.tokend(&["get", "--socket", sock, "msk"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), token);
    // The socket from the config, from -c and from TOKEND_CONFIG.
    let out = d.tokend(&["get", "-c", d.config.to_str().unwrap(), "msk"]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), token);
    let out = Command::new(BIN)
        .args(["get", "msk"])
        .env("TOKEND_CONFIG", &d.config)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), token);
    // --json: the json output format.
    let out = d.tokend(&["get", "--socket", sock, "--json", "msk"]);
    assert!(out.status.success());
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["access_token"], token.as_str());
    assert_eq!(j["account"], "msk");
    assert_eq!(j["scope"], "full");

    // Failures: exit 1 and a clear message.
    let out = d.tokend(&["get", "--socket", sock, "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no account \"nope\""));
    wait_for(|| {
        let l = d.get("/v1/tokens").json();
        (l["accounts"][0]["status"] == "failing").then_some(())
    });
    let out = d.tokend(&["get", "--socket", sock, "down"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("account \"down\" has no valid token (failing:"),
        "{err}"
    );
    let missing = d.dir.path().join("missing.sock");
    let out = d.tokend(&["status", "--socket", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tokend is not running"), "{err}");

    // status: a table, or the JSON list.
    let out = d.tokend(&["status", "--socket", sock]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("ACCOUNT  STATUS   EXPIRES IN  LAST REFRESH  LAST ERROR"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("down     failing  -           never"),
        "{table}"
    );
    assert!(lines[1].contains("503"), "{table}");
    assert!(lines[2].starts_with("msk      fresh    59m "), "{table}");
    assert!(
        lines[2].contains("s ago ") && lines[2].ends_with("  -"),
        "{table}"
    );
    let out = d.tokend(&["status", "--socket", sock, "--json"]);
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["accounts"].as_array().unwrap().len(), 2);
}

#[test]
fn docs_curl_examples_work() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    // The README's socket section: from its heading to the next one of its level.
    let start = readme
        .find("## The socket API")
        .expect("the README has a socket section");
    let rest = &readme[start + 2..];
    let doc = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let idp = Idp::start();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = Daemon::start(
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
        &account("msk", &idp.ok("msk", 3600), ""),
    );
    d.token("msk");
    let mut ran = 0;
    for line in doc.lines() {
        let Some(cmd) = line.strip_prefix("$ ") else {
            continue;
        };
        let cmd = cmd
            .replace("/run/tokend/tokend.sock", d.socket.to_str().unwrap())
            .replace("127.0.0.1:9464", &format!("127.0.0.1:{port}"));
        // `tokend` is this build, and finds the socket through TOKEND_SOCKET.
        let bin_dir = Path::new(BIN).parent().unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("bash")
            .args(["-c", &format!("set -eo pipefail; {cmd}")])
            .env("PATH", path)
            .env("TOKEND_SOCKET", &d.socket)
            .env_remove("TOKEND_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "{cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ran += 1;
    }
    assert!(ran >= 5, "only {ran} examples found");
}

// ---------------------------------------------------------------------------------
// The server's limits, in-process: `serve_with` on a socket with no accounts.
// ---------------------------------------------------------------------------------

struct Served {
    _dir: tempfile::TempDir,
    _file: tokend::server::SocketFile,
    socket: PathBuf,
    metrics: Arc<tokend::metrics::Metrics>,
    cancel: tokio_util::sync::CancellationToken,
}

fn serve(limits: tokend::server::Limits) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let (listener, file) = tokend::server::bind_unix(&socket, 0o600, None).unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(tokend::account::Accounts::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    let metrics = Arc::new(tokend::metrics::Metrics::new());
    tokio::spawn(tokend::server::serve_with(
        listener,
        rx,
        metrics.clone(),
        cancel.clone(),
        limits,
    ));
    Served {
        _dir: dir,
        _file: file,
        socket,
        metrics,
        cancel,
    }
}

/// Reads until the peer closes (or `limit`); returns what came and how long it took.
fn read_until_closed(s: &mut UnixStream, limit: Duration) -> (Vec<u8>, Duration) {
    let t = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("still open after {:?}: {e}", t.elapsed()),
        }
    }
    (got, t.elapsed())
}

fn short_limits() -> tokend::server::Limits {
    tokend::server::Limits {
        header_timeout: Duration::from_millis(400),
        stall_timeout: Duration::from_millis(400),
        body_timeout: Duration::from_millis(400),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    let s = serve(short_limits());
    let socket = s.socket.clone();
    tokio::task::spawn_blocking(move || {
        // A head that trickles in, a byte every 50 ms, never ends: cut at the header timeout.
        let mut c = UnixStream::connect(&socket).unwrap();
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            for b in b"GET /v1/health HTTP/1.1\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
                if w.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let (_, took) = read_until_closed(&mut c, Duration::from_secs(5));
        assert!(took < Duration::from_secs(2), "{took:?}");
        writer.join().unwrap();

        // An idle keep-alive connection: closed after the header timeout.
        let mut c = UnixStream::connect(&socket).unwrap();
        c.write_all(b"GET /v1/health HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
        let (got, took) = read_until_closed(&mut c, Duration::from_secs(5));
        assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
        assert!(took < Duration::from_secs(2), "{took:?}");

        // A body that stops coming: 408 after the body timeout.
        let mut c = UnixStream::connect(&socket).unwrap();
        c.write_all(b"POST /v1/tokens/a/refresh HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\n0123456789")
            .unwrap();
        let (got, took) = read_until_closed(&mut c, Duration::from_secs(5));
        let r = parse_reply(&got).unwrap();
        assert_eq!(r.status, 408);
        assert_eq!(r.error(), "request_timeout");
        assert!(took < Duration::from_secs(2), "{took:?}");

        // A client that connects and says nothing.
        let mut c = UnixStream::connect(&socket).unwrap();
        let (got, took) = read_until_closed(&mut c, Duration::from_secs(5));
        assert!(got.is_empty() && took < Duration::from_secs(2), "{took:?}");

        // And the server still serves.
        assert_eq!(request(&socket, "GET", "/v1/health", &[]).status, 200);
    })
    .await
    .unwrap();
    s.cancel.cancel();
}

#[tokio::test]
async fn requests_are_counted_in_the_metrics_handed_in() {
    let (a, b) = (serve(short_limits()), serve(short_limits()));
    let socket = a.socket.clone();
    let r = tokio::task::spawn_blocking(move || request(&socket, "GET", "/v1/health", &[]))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let counted = |s: &Served| {
        s.metrics
            .encode(std::iter::empty(), std::time::SystemTime::now())
            .contains("tokend_http_requests_total{listener=\"unix\",code=\"200\"} 1")
    };
    // Counted before the answer is sent; only by the server that answered.
    assert!(counted(&a));
    assert!(!counted(&b));
    a.cancel.cancel();
    b.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_leave_the_daemon_serving() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let s = serve(tokend::server::Limits::default());
    // Open them all first, then each sends a request and reads its answer, all at once.
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(tokio::net::UnixStream::connect(&s.socket).await.unwrap());
    }
    let gate = Arc::new(tokio::sync::Barrier::new(1001));
    let mut tasks = tokio::task::JoinSet::new();
    for mut c in conns {
        let gate = gate.clone();
        tasks.spawn(async move {
            gate.wait().await;
            c.write_all(b"GET /v1/tokens HTTP/1.1\r\nhost: t\r\n\r\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 1024];
            let mut got = 0;
            while !buf[..got].ends_with(b"\n") || find(&buf[..got], b"\r\n\r\n").is_none() {
                let n = c.read(&mut buf[got..]).await.unwrap();
                assert!(n > 0, "closed early");
                got += n;
            }
            assert!(
                buf.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&buf[..got])
            );
            c // kept open
        });
    }
    gate.wait().await;
    let mut open = Vec::new();
    let t = Instant::now();
    while let Some(r) = tasks.join_next().await {
        open.push(r.unwrap());
    }
    let took = t.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    // All thousand still open: a new client is served.
    let socket = s.socket.clone();
    let r = tokio::task::spawn_blocking(move || request(&socket, "GET", "/v1/health", &[]))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    drop(open);
    s.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_get_503_busy() {
    let s = serve(tokend::server::Limits {
        max_connections: 3,
        ..Default::default()
    });
    let socket = s.socket.clone();
    tokio::task::spawn_blocking(move || {
        // Three connections, each answered once and kept open.
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut c = UnixStream::connect(&socket).unwrap();
            c.write_all(b"GET /v1/health HTTP/1.1\r\nhost: t\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 512];
            assert!(c.read(&mut buf).unwrap() > 0);
            held.push(c);
        }
        let mut c = UnixStream::connect(&socket).unwrap();
        let (got, _) = read_until_closed(&mut c, Duration::from_secs(5));
        let r = parse_reply(&got).unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.error(), "busy");
        // One closes: served again.
        held.pop();
        wait_for(|| {
            let mut c = UnixStream::connect(&socket).unwrap();
            c.write_all(b"GET /v1/health HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
                .unwrap();
            let (got, _) = read_until_closed(&mut c, Duration::from_secs(5));
            got.starts_with(b"HTTP/1.1 200").then_some(())
        });
    })
    .await
    .unwrap();
    s.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_requests_get_400_never_a_crash() {
    let s = serve(short_limits());
    let socket = s.socket.clone();
    tokio::task::spawn_blocking(move || {
        let long_header = format!(
            "GET /v1/health HTTP/1.1\r\nx-big: {}\r\n\r\n",
            "a".repeat(20_000)
        );
        let long_path = format!("GET /{} HTTP/1.1\r\n\r\n", "p".repeat(20_000));
        let mut noise = vec![0u8; 65_536];
        let mut x: u32 = 0x1234_5678;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
            ("not http", b"GARBAGE\r\n\r\n".to_vec(), &[400]),
            (
                "header without colon",
                b"GET / HTTP/1.1\r\nHost\r\n\r\n".to_vec(),
                &[400],
            ),
            (
                "bad version",
                b"GET /v1/health HTTP/9.9\r\n\r\n".to_vec(),
                &[400, 505],
            ),
            ("binary", b"\x00\x01\x02\xff\xfe\r\n\r\n".to_vec(), &[400]),
            (
                "bad content-length",
                b"GET /v1/health HTTP/1.1\r\ncontent-length: abc\r\n\r\n".to_vec(),
                &[400],
            ),
            (
                "two content-lengths",
                b"POST /v1/health HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab"
                    .to_vec(),
                &[400],
            ),
            (
                "bad chunk",
                b"POST /v1/tokens/a/refresh HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"
                    .to_vec(),
                &[400],
            ),
            (
                "bad uri",
                b"GET http://[::1 HTTP/1.1\r\n\r\n".to_vec(),
                &[400],
            ),
            // hyper recognises an HTTP/2 preface and closes without an answer (0).
            (
                "http/2 preface",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
                &[0],
            ),
            ("huge header", long_header.into_bytes(), &[431]),
            ("huge path", long_path.into_bytes(), &[400, 414, 431]),
            ("noise", noise, &[400]),
        ];
        for (what, bytes, want) in cases {
            let mut c = UnixStream::connect(&socket).unwrap();
            // The server may close before it read everything; that is fine.
            let _ = c.write_all(&bytes);
            let (got, _) = read_until_closed(&mut c, Duration::from_secs(5));
            let status = match parse_reply(&got) {
                Some(r) => r.status,
                None if got.is_empty() => 0,
                None => panic!(
                    "{what}: no HTTP answer: {:?}",
                    String::from_utf8_lossy(&got)
                ),
            };
            assert!(want.contains(&status), "{what}: {status}");
            // Still serving.
            assert_eq!(
                request(&socket, "GET", "/v1/health", &[]).status,
                200,
                "after {what}"
            );
        }
    })
    .await
    .unwrap();
    s.cancel.cancel();
}
