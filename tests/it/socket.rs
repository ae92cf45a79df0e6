//! The socket API end to end (SPEC §4, and §5 `get`, `status` and `refresh`): a real
//! `tokend run` against the fake IdP (one per account, issuing tokens named after it),
//! asked over its real Unix socket, by root and by test users switched to with
//! `setpriv`; and the server's limits (slow clients, a thousand connections, garbage)
//! against `tokend::server::serve_with` in-process.
//!
//! The access matrix needs root to create users and switch to them; CI runs as root.
//! Run elsewhere, those tests fail with "needs root" rather than passing unseen.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::fake_idp::{FakeIdp, Reply};
use crate::support::http::{parse_answer, request, Answer};
use crate::support::{
    finish, free_port, socket_get, tokend, tokend_via, wait_until, Daemon, Finished, Sandbox, LONG,
    SHORT,
};

const SECRET_ENV: &str = "TOKEND_T_SECRET";

// ---------------------------------------------------------------------------------
// A daemon serving a socket anyone may connect to, against one fake IdP per account.
// ---------------------------------------------------------------------------------

/// A fake IdP for `account`: tokens `ACCOUNT-<n>-...` that live `lifetime` seconds.
fn idp_for(account: &str, lifetime: u64) -> FakeIdp {
    let idp = FakeIdp::start(Reply::token(lifetime));
    idp.name_tokens(account);
    idp
}

/// One `[[account]]` table. `extra` goes last (so it may open `[account.access]`).
fn account(name: &str, url: &str, extra: &str) -> String {
    let interval = if extra.contains("min_refresh_interval") {
        ""
    } else {
        "min_refresh_interval = \"1s\"\n"
    };
    crate::support::config::account(name, url)
        .secret_env(SECRET_ENV)
        .with(&format!(
            "grant_type = \"client_credentials\"\n{interval}{extra}"
        ))
        .toml()
}

/// A daemon serving account `name` (tokens of an hour from an IdP of its own, `extra`
/// lines) and account `down`, whose provider answers 503, once `name` serves a token:
/// the two IdPs (to keep), the daemon and that token.
fn beside_a_down_account(name: &str, extra: &str) -> ([FakeIdp; 2], Running, String) {
    let (up, down) = (idp_for(name, 3600), FakeIdp::start(Reply::Status(503)));
    let d = Running::start(
        "",
        &[
            account(name, &up.url(), extra),
            account("down", &down.url(), ""),
        ]
        .concat(),
    );
    let token = d.token(name);
    ([up, down], d, token)
}

/// `tokend run` and the sandbox holding its config and socket; killed when dropped.
struct Running {
    daemon: Daemon,
    sb: Sandbox,
    socket: PathBuf,
    config: PathBuf,
}

impl Running {
    /// Starts a daemon serving `accounts` on a socket anyone may connect to; `daemon`
    /// adds `[daemon]` keys.
    fn start(daemon: &str, accounts: &str) -> Running {
        let sb = Sandbox::new();
        // Test users must reach the socket inside.
        std::fs::set_permissions(sb.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = sb.path("tokend.sock");
        let text = format!(
            "[daemon]\nsocket = \"{}\"\nsocket_mode = \"0666\"\nlog_format = \"text\"\n{daemon}\n\n{accounts}",
            socket.display()
        );
        Running::spawn(sb, socket, &text)
    }

    /// Starts `tokend run` on the config `text`, which serves `socket`, and waits until
    /// it answers there.
    fn spawn(sb: Sandbox, socket: PathBuf, text: &str) -> Running {
        let config = sb.config(text);
        let daemon = Daemon::start_with_env(&config, &[(SECRET_ENV, "s3cret")]);
        daemon.wait_until("the daemon to answer on its socket", LONG, || {
            socket_get(&socket, "/v1/health")
        });
        Running {
            daemon,
            sb,
            socket,
            config,
        }
    }

    fn get(&self, path: &str) -> Answer {
        request(&self.socket, "GET", path, &[])
    }

    /// Waits until `account` serves a token, and returns it.
    fn token(&self, account: &str) -> String {
        self.wait(&format!("{account}'s token"), || {
            let r = self.get(&format!("/v1/tokens/{account}/raw"));
            (r.status == 200).then(|| r.text())
        })
    }

    /// Waits until account `down`, the first in `/v1/tokens`, has failed; the list then.
    fn down_failing(&self) -> Value {
        self.wait("down's first failure", || {
            let l = self.get("/v1/tokens").json();
            (l["accounts"][0]["status"] == "failing").then_some(l)
        })
    }

    /// Waits (bounded by [`LONG`]) until `f` finds what it looks for; the daemon's log
    /// is in the panic message when it does not.
    fn wait<T>(&self, what: &str, f: impl FnMut() -> Option<T>) -> T {
        self.daemon.wait_until(what, LONG, f)
    }

    /// `tokend ARGS` as this process's user (root, or the daemon's own user).
    fn tokend(&self, args: &[&str]) -> Finished {
        let mut cmd = tokend();
        cmd.args(args);
        finish(cmd, SHORT)
    }
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

/// The wrapper that runs a program as `user`, with the groups the user database gives
/// them.
fn setpriv(user: &TestUser) -> [String; 5] {
    [
        "setpriv".to_owned(),
        format!("--reuid={}", user.uid),
        format!("--regid={}", user.gid),
        "--init-groups".to_owned(),
        "--".to_owned(),
    ]
}

/// `tokend ARGS` as `user`.
fn tokend_as(user: &TestUser, args: &[&str]) -> Finished {
    let wrapper = setpriv(user);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut cmd = tokend_via(&wrapper);
    cmd.args(args);
    finish(cmd, SHORT)
}

/// `curl` as `user`: (HTTP status, body).
fn curl_as(user: &TestUser, socket: &Path, path: &str) -> (u16, String) {
    curl_method_as(user, socket, "GET", path)
}

/// `curl -X METHOD` as `user`: (HTTP status, body).
fn curl_method_as(user: &TestUser, socket: &Path, method: &str, path: &str) -> (u16, String) {
    let [program, wrapper @ ..] = setpriv(user);
    let out = Command::new(program)
        .args(wrapper)
        .args([
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
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
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
    let names = ["by-user", "by-primary", "by-supp", "nobody"];
    let idps = names.map(|a| idp_for(a, 3600));
    let access = [
        "[account.access]\nusers = [\"tokend-t-user\"]".to_owned(),
        format!("[account.access]\ngroups = [\"{G_PRIMARY}\"]"),
        format!("[account.access]\ngroups = [\"{G_SUPP}\"]"),
        String::new(),
    ];
    let accounts: String = (0..names.len())
        .map(|i| account(names[i], &idps[i].url(), &access[i]))
        .collect();
    let d = Running::start("", &accounts);
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
        let out = tokend_as(u, &["get", "--socket", sock, "by-supp"]);
        if may.contains(&"by-supp") {
            assert!(out.status.success());
            assert!(out.stdout.starts_with("by-supp-"));
        } else {
            assert_eq!(out.code(), Some(1));
            let err = &out.stderr;
            assert!(err.contains("no account \"by-supp\" that you"), "{err}");
        }
        let out = tokend_as(u, &["status", "--socket", sock]);
        assert!(out.status.success());
        let table = &out.stdout;
        for a in ["by-user", "by-primary", "by-supp", "nobody"] {
            assert_eq!(table.contains(a), may.contains(&a), "{user}: {table}");
        }
    }
    // Root reads everything.
    let list = d.get("/v1/tokens").json();
    assert_eq!(list["accounts"].as_array().unwrap().len(), 4);
    assert_eq!(d.get("/v1/tokens/nobody/raw").status, 200);

    // A socket the user may not open: a clear message.
    let idp = idp_for("x", 3600);
    let closed = Running::start("", &account("x", &idp.url(), ""));
    std::fs::set_permissions(&closed.socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = tokend_as(
        &users[3],
        &["status", "--socket", closed.socket.to_str().unwrap()],
    );
    assert_eq!(out.code(), Some(1));
    let err = &out.stderr;
    assert!(
        err.contains("permission denied on") && err.contains("mode 0600"),
        "{err}"
    );
}

#[test]
fn token_endpoints_serve_json_raw_and_list() {
    let idp = idp_for("msk", 3600);
    let d = Running::start("", &account("msk", &idp.url(), "scope = \"full\""));
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
    // As the provider sent it (the fake IdP says "bearer").
    assert_eq!(j["token_type"], "bearer");
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
    let (_idps, d, _) = beside_a_down_account("up", "");
    // Wait for the first failure to be recorded.
    let list = d.down_failing();
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

    // `down` retries on a short backoff: refreshing during a try, failing between two.
    let h = d.wait("/v1/health between two of down's tries", || {
        let r = d.get("/v1/health");
        assert_eq!(r.status, 503);
        let h = r.json();
        (h["not_ready"][0]["status"] != "refreshing").then_some(h)
    });
    assert_eq!(h["status"], "unhealthy");
    assert_eq!(h["not_ready"].as_array().unwrap().len(), 1);
    assert_eq!(h["not_ready"][0]["account"], "down");
    assert_eq!(h["not_ready"][0]["status"], "failing");
}

#[test]
fn errors_are_json_with_the_right_status() {
    let idp = idp_for("a", 3600);
    let d = Running::start("", &account("a", &idp.url(), ""));
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
    // Also when the server answers and closes long before the body is sent (the
    // client's writes then fail: the answer is still there to read).
    let r = request(
        &d.socket,
        "POST",
        "/v1/tokens/a/refresh",
        &vec![b'x'; 4 << 20],
    );
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
    let idp = idp_for("a", 3600);
    let d = Running::start("", &account("a", &idp.url(), ""));
    let first = d.token("a");
    let r = request(&d.socket, "POST", "/v1/tokens/a/refresh", &[]);
    assert_eq!(r.status, 202);
    assert_eq!(
        r.json(),
        serde_json::json!({"account": "a", "status": "accepted"})
    );
    // A new token comes, no sooner than min_refresh_interval (1 s) after the first.
    let second = d.wait("a new token", || {
        let t = d.get("/v1/tokens/a/raw").text();
        (t != first).then_some(t)
    });
    assert!(second.starts_with("a-"));
    assert_eq!(idp.requests().len(), 2);
}

/// Waits until `account` is held after refused credentials: failing, its next refresh
/// more than ten minutes away (`auth_failure_hold` is 15 minutes).
fn wait_held(d: &Running, account: &str) {
    d.wait(&format!("{account} to be held"), || {
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
    let idp = FakeIdp::start(Reply::InvalidGrant);
    let d = Running::start("", &account("held", &idp.url(), ""));
    let sock = d.socket.to_str().unwrap();
    // invalid_grant: held, the provider asked once.
    wait_held(&d, "held");
    assert_eq!(idp.requests().len(), 1);

    // Forced (this process is the daemon's user): the hold ends for one attempt, which
    // a plain refresh cannot do; refused again, the account is held again.
    let r = request(&d.socket, "POST", "/v1/tokens/held/refresh?force=true", &[]);
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(
        r.json(),
        serde_json::json!({"account": "held", "status": "accepted"})
    );
    idp.wait_requests(2, LONG);
    wait_held(&d, "held");
    assert_eq!(idp.requests().len(), 2, "one attempt");

    // `tokend refresh --force`, the socket from the config.
    let out = d.tokend(&[
        "refresh",
        "-c",
        d.config.to_str().unwrap(),
        "--force",
        "held",
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "forced refresh of held requested: a hold or rate-limit wait is ended for one attempt\n"
    );
    idp.wait_requests(3, LONG);
    wait_held(&d, "held");

    // `tokend refresh`, plain: accepted (the engine declines it while held).
    let out = d.tokend(&["refresh", "--socket", sock, "held"]);
    assert_eq!(out.code(), Some(0));
    assert_eq!(out.stdout, "refresh of held requested\n");

    // Failures: exit 1 and the reason.
    let out = d.tokend(&["refresh", "--socket", sock, "--force", "nope"]);
    assert_eq!(out.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = &out.stderr;
    assert!(err.contains("no account \"nope\" that you"), "{err}");
    let missing = d.sb.path("missing.sock");
    let out = d.tokend(&["refresh", "--socket", missing.to_str().unwrap(), "held"]);
    assert_eq!(out.code(), Some(1));
    let err = &out.stderr;
    assert!(err.contains("tokend is not running"), "{err}");
}

#[test]
fn force_takes_root_or_the_daemons_user() {
    let users = test_users();
    let user = |name: &str| users.iter().find(|u| u.name == name).unwrap();
    let (reader, stranger) = (user("tokend-t-user"), user("tokend-t-stranger"));
    let idp = FakeIdp::start(Reply::InvalidGrant);
    let d = Running::start(
        "",
        &account(
            "held",
            &idp.url(),
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
    let out = tokend_as(reader, &["refresh", "--socket", sock, "--force", "held"]);
    assert_eq!(out.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = &out.stderr;
    assert!(err.contains("takes root or the daemon's own user"), "{err}");
    let out = tokend_as(reader, &["refresh", "--socket", sock, "held"]);
    assert_eq!(out.code(), Some(0));
    assert_eq!(out.stdout, "refresh of held requested\n");
    let out = tokend_as(stranger, &["refresh", "--socket", sock, "--force", "held"]);
    assert_eq!(out.code(), Some(1));
    let err = &out.stderr;
    assert!(err.contains("no account \"held\" that you"), "{err}");

    // None of that ended the hold; root's force does.
    assert_eq!(idp.requests().len(), 1);
    let out = d.tokend(&["refresh", "--socket", sock, "--force", "held"]);
    assert_eq!(out.code(), Some(0));
    idp.wait_requests(2, LONG);
}

#[test]
fn min_valid_refreshes_first_within_min_refresh_interval() {
    let (short, held) = (idp_for("short", 100), idp_for("held", 100));
    let d = Running::start(
        "",
        &[
            account("short", &short.url(), ""),
            account("held", &held.url(), "min_refresh_interval = \"1h\""),
        ]
        .concat(),
    );
    let first = d.token("short");
    d.token("held");
    // Valid long enough: served as is.
    let r = d.get("/v1/tokens/short/raw?min_valid=30");
    assert_eq!((r.status, r.text()), (200, first.clone()));
    // Wait until fewer than 99 s are left, then ask for 99: the daemon refreshes first.
    d.wait("short's token to have less than 98 s left", || {
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
    assert!(out.status.success(), "{}", out.stderr);
    let second = out.stdout;
    assert!(second.starts_with("short-") && second != first, "{second}");

    // Longer than the provider's tokens live: refused at once, the provider not asked.
    let asked = || (short.requests().len(), held.requests().len());
    let before = asked();
    let r = d.get("/v1/tokens/short?min_valid=2h");
    assert_eq!(r.status, 503);
    assert_eq!(r.error(), "expires_too_soon");
    assert!(r.header("retry-after").is_some());
    assert_eq!(asked(), before);

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
    let (idp_a, idp_b) = (idp_for("a", 3600), idp_for("b", 3600));
    let port = free_port();
    let d = Running::start(
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
        &[
            account("a", &idp_a.url(), ""),
            account("b", &idp_b.url(), ""),
        ]
        .concat(),
    );
    let tokens = [d.token("a"), d.token("b")];
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
    for t in &tokens {
        assert!(!m.contains(t.as_str()), "no token in the metrics");
    }

    // A reload is counted.
    nix::sys::signal::kill(d.daemon.pid(), nix::sys::signal::Signal::SIGHUP).unwrap();
    d.wait("the reload to be counted", || {
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
        parse_answer(&raw).unwrap()
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

/// The socket's second thread waits on the listener only once an account binds its
/// tokens with DPoP (whose proofs are CPU that a second thread spreads): before, every
/// new connection woke it for nothing to accept. With bearer accounts one thread
/// watches the socket; after a reload adds a DPoP account, two (given two CPUs).
#[test]
fn a_second_socket_thread_accepts_only_once_an_account_uses_dpop() {
    let idp = idp_for("a", 3600);
    let d = Running::start("state_dir = \"state\"", &account("a", &idp.url(), ""));
    d.token("a");
    assert_eq!(listener_watchers(d.daemon.pid(), &d.socket), 1);

    let since = crate::support::daemon_info(&d.socket).unwrap();
    let dpop = account(
        "bound",
        &idp.url(),
        "token_binding = \"dpop\"\nurls = [\"https://fhir.example/r4/\"]\n",
    );
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, format!("{text}\n{dpop}")).unwrap();
    nix::sys::signal::kill(d.daemon.pid(), nix::sys::signal::Signal::SIGHUP).unwrap();
    let info = crate::support::wait_reload(&d.daemon, &d.socket, &since);
    assert_eq!(info["last_reload"]["result"], "ok", "{info}");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    d.daemon.wait_until("the second socket thread", SHORT, || {
        (listener_watchers(d.daemon.pid(), &d.socket) == cpus.min(2)).then_some(())
    });
    // With two threads accepting, every connection still gets its answer.
    for _ in 0..50 {
        assert_eq!(d.get("/v1/tokens/a/raw").status, 200);
    }
}

/// How many descriptors of the listening socket at `socket` are registered in one of
/// `pid`'s epoll instances (`/proc/PID/fdinfo`): one per socket thread that accepts.
fn listener_watchers(pid: nix::unistd::Pid, socket: &Path) -> usize {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let inode: u64 = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        // Num RefCount Protocol Flags Type St Inode Path; 00010000: listening.
        .find(|f| f.len() == 8 && f[3] == "00010000" && Path::new(f[7]) == socket)
        .map(|f| f[6].parse().unwrap())
        .expect("the listening socket in /proc/net/unix");
    let mut registered = std::collections::BTreeSet::new();
    let fdinfo = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    for entry in std::fs::read_dir(fdinfo).unwrap().flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        // tfd:       13 events: 8000201d data: ...  pos:0 ino:b7315b9 sdev:9
        for line in info.lines().filter(|l| l.starts_with("tfd:")) {
            let f: Vec<_> = line.split_whitespace().collect();
            let ino = f.iter().find_map(|w| w.strip_prefix("ino:"));
            if ino.and_then(|i| u64::from_str_radix(i, 16).ok()) == Some(inode) {
                registered.insert(f[1].to_owned());
            }
        }
    }
    registered.len()
}

#[test]
fn socket_file_lifecycle() {
    let idp = idp_for("a", 3600);
    let sb = Sandbox::new();
    let socket = sb.path("t.sock");
    // A stale socket file from a daemon that was killed.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let gid = if nix::unistd::geteuid().is_root() {
        4242
    } else {
        nix::unistd::getegid().as_raw()
    };
    let accounts = account("a", &idp.url(), "");
    let daemon_keys = format!(
        "socket = \"{}\"\nsocket_mode = \"0660\"\nsocket_group = \"{gid}\"",
        socket.display()
    );
    let d = Running::spawn(
        sb,
        socket.clone(),
        &format!("[daemon]\n{daemon_keys}\n\n{accounts}"),
    );
    d.token("a");
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o7777, 0o660);
    assert_eq!(meta.gid(), gid);

    // A second daemon on the same socket: refused, clearly, and the first unharmed.
    let mut second = tokend();
    second
        .args(["run", "-c"])
        .arg(&d.config)
        .env(SECRET_ENV, "x");
    let out = finish(second, SHORT);
    assert_eq!(out.code(), Some(1));
    let err = &out.stderr;
    assert!(
        err.contains("another tokend is already serving on"),
        "{err}"
    );
    assert_eq!(d.get("/v1/tokens/a/raw").status, 200);

    // SIGTERM: stops within a second, removes the socket (the sandbox stays until the
    // end, so a socket left behind would be seen).
    let Running { daemon, sb, .. } = d;
    let (status, took, log) = daemon.terminate();
    assert!(status.success(), "{status}\n{log}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert!(!socket.exists());
    drop(sb);
}

#[test]
fn get_and_status_end_to_end() {
    let (_idps, d, token) = beside_a_down_account("msk", "scope = \"full\"");
    let sock = d.socket.to_str().unwrap();

    // Raw: exactly the token, no newline (stdout is no terminal here).
    let out = d.tokend(&["get", "--socket", sock, "msk"]);
    assert!(out.status.success());
    assert_eq!(out.stdout, token);
    // The socket from the config, from -c and from TOKEND_CONFIG.
    let out = d.tokend(&["get", "-c", d.config.to_str().unwrap(), "msk"]);
    assert_eq!(out.stdout, token);
    let mut cmd = tokend();
    cmd.args(["get", "msk"]).env("TOKEND_CONFIG", &d.config);
    assert_eq!(finish(cmd, SHORT).stdout, token);
    // --json: the json output format.
    let out = d.tokend(&["get", "--socket", sock, "--json", "msk"]);
    assert!(out.status.success());
    let j: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(j["access_token"], token.as_str());
    assert_eq!(j["account"], "msk");
    assert_eq!(j["scope"], "full");

    // Failures: exit 1 and a clear message.
    let out = d.tokend(&["get", "--socket", sock, "nope"]);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("no account \"nope\""));
    // `down` retries its 503s on a short backoff: between two tries it is failing, during
    // one refreshing; each look below is taken between two tries.
    d.down_failing();
    let out = d.wait("`get down` between two of its tries", || {
        let out = d.tokend(&["get", "--socket", sock, "down"]);
        (!out.stderr.contains("(refreshing")).then_some(out)
    });
    assert_eq!(out.code(), Some(1));
    let err = &out.stderr;
    assert!(
        err.contains("account \"down\" has no valid token (failing:"),
        "{err}"
    );
    let missing = d.sb.path("missing.sock");
    let out = d.tokend(&["status", "--socket", missing.to_str().unwrap()]);
    assert_eq!(out.code(), Some(1));
    let err = &out.stderr;
    assert!(err.contains("tokend is not running"), "{err}");

    // status: a table, or the JSON list.
    let out = d.wait("`status` between two of down's tries", || {
        let out = d.tokend(&["status", "--socket", sock]);
        (!out.stdout.contains("down     refreshing")).then_some(out)
    });
    assert!(out.status.success());
    let table = out.stdout;
    let lines: Vec<&str> = table.lines().take_while(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 3, "{table}");
    // Then, for root, the daemon's own line (GET /v1/daemon).
    assert!(
        table.contains("(generation 1, loaded "),
        "the config's generation: {table}"
    );
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
    let j: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(j["accounts"].as_array().unwrap().len(), 2);
}

#[test]
fn docs_curl_examples_work() {
    // The book's chapters on the socket API and the metrics, every line of them.
    let doc = ["socket-api.md", "metrics.md"]
        .map(|chapter| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("docs/src")
                .join(chapter);
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .join("\n");
    let idp = idp_for("msk", 3600);
    let port = free_port();
    let d = Running::start(
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
        &account("msk", &idp.url(), ""),
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
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_tokend")).parent().unwrap();
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
    metrics: Arc<tokend::account::metrics::Metrics>,
    cancel: tokio_util::sync::CancellationToken,
}

fn serve(limits: tokend::server::Limits) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let (listener, file) = tokend::server::bind_unix(&socket, 0o600, None).unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(tokend::account::Accounts::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    let metrics = Arc::new(tokend::account::metrics::Metrics::new());
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
        let r = parse_answer(&got).unwrap();
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
            while !buf[..got].ends_with(b"\n") || !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
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
        let r = parse_answer(&got).unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.error(), "busy");
        // One closes: served again.
        held.pop();
        wait_until("a connection to be served again", LONG, || {
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
            let status = match parse_answer(&got) {
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
