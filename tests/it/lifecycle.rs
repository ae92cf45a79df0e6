//! Never down, never locked out (SPEC §6), with `tokend run` against the fake IdP in
//! real time: reload by rename-over, in-place write and SIGHUP; a broken config keeps
//! the running one; rate limits shared per provider; refused credentials held until
//! the secret file changes; a restart served from the state directory; kill -9 during
//! writes; hooks after every rotation. Waits are on outputs, or on the account as the
//! daemon's socket shows it; on the log only where the log is what is checked (a
//! refused reload, SIGHUP, a killed hook: none of them has a state of its own).

use std::time::{Duration, Instant};

use crate::support::fake_idp::{FakeIdp, Reply};
use crate::support::{account_status, socket_get, Daemon, Sandbox, LONG, SHORT};

/// The `[daemon]` key that serves the socket `tokend.sock` in the sandbox.
fn socket_key(sb: &Sandbox) -> String {
    format!("socket = \"{}\"\n", sb.path("tokend.sock").display())
}

/// A config of `accounts` served on the sandbox's socket.
fn with_socket(sb: &Sandbox, accounts: &str) -> String {
    format!("[daemon]\n{}{accounts}", socket_key(sb))
}

/// Waits until every account of `names` is fresh, as the daemon's socket shows it.
///
/// A test that edits the config right after waits on this, not on the outputs: the
/// daemon watches its files only once it serves (the outputs may be written before),
/// and an edit it does not see is never applied.
fn wait_fresh(d: &Daemon, sb: &Sandbox, names: &[&str]) {
    let socket = sb.path("tokend.sock");
    for name in names {
        d.wait_until(&format!("{name} to be fresh on the socket"), SHORT, || {
            let a = account_status(&socket, name)?;
            (a["status"] == "fresh").then_some(())
        });
    }
}

fn account(name: &str, url: &str, client_id: &str, extra: &str) -> String {
    crate::support::config::account(name, url)
        .client_id(client_id)
        .with(extra)
        .output(&format!("out/{name}"))
        .toml()
}

fn sandbox() -> Sandbox {
    let sb = Sandbox::new();
    sb.write(&sb.path("secret"), "client-secret\n", 0o600);
    sb
}

/// Replaces the config the way editors do: a new file renamed over the old one.
fn rename_over(sb: &Sandbox, text: &str) {
    let tmp = sb.path(".config.toml.swp");
    sb.write(&tmp, text, 0o600);
    std::fs::rename(&tmp, sb.path("config.toml")).unwrap();
}

/// Requests the IdP got from `client_id`.
fn requests_from(idp: &FakeIdp, client_id: &str) -> usize {
    idp.requests()
        .iter()
        .filter(|r| {
            r.basic()
                .is_some_and(|b| b.starts_with(&format!("{client_id}:")))
        })
        .count()
}

#[test]
fn reload_adds_removes_and_keeps_unchanged_accounts_without_new_requests() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = sandbox();
    let url = idp.url();
    let a = account("a", &url, "id-a", "");
    let b = account("b", &url, "id-b", "");
    let d = Daemon::start(&sb.config(&with_socket(&sb, &format!("{a}\n{b}"))));
    wait_fresh(&d, &sb, &["a", "b"]);
    d.wait_until("both tokens", SHORT, || {
        sb.read("out/a").and(sb.read("out/b"))
    });
    let token_a = sb.read("out/a").unwrap();

    // Rename-over: b goes, c comes, a stays as it was.
    let c = account("c", &url, "id-c", "");
    rename_over(&sb, &with_socket(&sb, &format!("{a}\n{c}")));
    d.wait_until("c's token", SHORT, || sb.read("out/c"));
    d.wait_until("b's output removed", SHORT, || {
        sb.read("out/b").is_none().then_some(())
    });
    assert_eq!(sb.read("out/a").unwrap(), token_a, "a keeps its token");
    assert_eq!(
        requests_from(&idp, "id-a"),
        1,
        "an unchanged account asks nothing"
    );

    // In place (truncate and write), an output-only change: a's token moves to a new
    // path with a new mode, without asking the provider.
    let a2 = a.replace("path = \"out/a\"", "path = \"out/a2\"\nmode = \"0640\"");
    std::fs::write(
        sb.path("config.toml"),
        with_socket(&sb, &format!("{a2}\n{c}")),
    )
    .unwrap();
    d.wait_until("a's token at its new path", SHORT, || sb.read("out/a2"));
    assert_eq!(sb.read("out/a2").unwrap(), token_a);
    assert_eq!(sb.mode("out/a2"), 0o640);
    d.wait_until("a's old output removed", SHORT, || {
        sb.read("out/a").is_none().then_some(())
    });
    assert_eq!(
        requests_from(&idp, "id-a"),
        1,
        "an output-only change asks nothing"
    );

    // A changed request restarts the account: a new token.
    let a3 = a2.replace("client_id = \"id-a\"", "client_id = \"id-a3\"");
    rename_over(&sb, &with_socket(&sb, &format!("{a3}\n{c}")));
    d.wait_until("a's new token", SHORT, || {
        sb.read("out/a2").filter(|t| *t != token_a)
    });
    assert_eq!(requests_from(&idp, "id-a3"), 1);
}

#[test]
fn a_reload_that_changes_one_of_200_accounts_asks_once_and_rewrites_no_other_output() {
    // Issue #11: a reload touches only what changed, however many accounts there are.
    use std::os::unix::fs::MetadataExt as _;
    const N: usize = 200;
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = sandbox();
    let url = idp.url();
    let config = |changed: Option<usize>| {
        (0..N)
            .map(|i| {
                let scope = match changed {
                    Some(c) if c == i => format!("scope = \"s{i}-changed\""),
                    _ => format!("scope = \"s{i}\""),
                };
                account(&format!("a{i}"), &url, &format!("id-{i}"), &scope)
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let d = Daemon::start(&sb.config(&with_socket(&sb, &config(None))));
    let socket = sb.path("tokend.sock");
    let stamp = |i: usize| {
        std::fs::metadata(sb.path(&format!("out/a{i}")))
            .ok()
            .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()))
    };
    d.wait_until("every account's token", LONG, || {
        (0..N).all(|i| stamp(i).is_some()).then_some(())
    });
    let before: Vec<_> = (0..N).map(stamp).collect();
    let asked = idp.requests().len();
    assert_eq!(asked, N, "one request per account");

    let since = d.wait_until("the daemon's socket", SHORT, || {
        crate::support::daemon_info(&socket)
    });
    rename_over(&sb, &with_socket(&sb, &config(Some(7))));
    let reloaded = crate::support::wait_reload(&d, &socket, &since);
    assert_eq!(reloaded["last_reload"]["result"], "ok", "{reloaded}");
    d.wait_until("a7's new token", SHORT, || {
        (stamp(7) != before[7]).then_some(())
    });
    // That nothing else is asked later either is proven on a paused clock:
    // `inprocess::a_reload_that_changes_one_of_20_accounts_asks_once_and_moves_no_other_schedule`.
    assert_eq!(idp.requests().len(), asked + 1, "exactly one request: a7's");
    assert_eq!(requests_from(&idp, "id-7"), 2);
    let rewritten: Vec<usize> = (0..N)
        .filter(|&i| i != 7 && stamp(i) != before[i])
        .collect();
    assert!(rewritten.is_empty(), "outputs rewritten: {rewritten:?}");
}

#[test]
fn a_broken_config_keeps_the_running_one_and_sighup_reloads() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = sandbox();
    let url = idp.url();
    let a = account("a", &url, "id-a", "");
    let d = Daemon::start(&sb.config(&with_socket(&sb, &a)));
    wait_fresh(&d, &sb, &["a"]);
    d.wait_until("a's token", SHORT, || sb.read("out/a"));
    let daemon = |sb: &Sandbox| {
        let (status, body) = socket_get(&sb.path("tokend.sock"), "/v1/daemon")?;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).ok()
    };
    let first = daemon(&sb).expect("GET /v1/daemon");
    assert_eq!(first["generation"], 1);
    assert!(first["last_reload"].is_null(), "{first}");
    assert_eq!(
        first["config"],
        sb.path("config.toml").display().to_string()
    );

    rename_over(&sb, &with_socket(&sb, &format!("{a}\ntokne_url = 1\n")));
    let refused = d.wait_until("the reload refused", SHORT, || {
        daemon(&sb).filter(|v| v["last_reload"]["result"] == "refused")
    });
    assert_eq!(
        refused["generation"], 1,
        "the running config stays: {refused}"
    );
    let errors = refused["last_reload"]["errors"].to_string();
    assert!(
        errors.contains("tokne_url"),
        "the error names the key: {errors}"
    );
    assert!(errors.contains("config.toml:"), "and where: {errors}");
    // `tokend status` shows it, without the journal.
    let status = crate::support::tokend()
        .args(["status", "--socket"])
        .arg(sb.path("tokend.sock"))
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(
        shown.contains("REFUSED, still running generation 1"),
        "{shown}"
    );
    assert!(shown.contains("tokne_url"), "{shown}");
    // Others may not see it (the socket opened to them for this).
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(sb.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        sb.path("tokend.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let nobody = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
        ])
        .arg(sb.path("tokend.sock"))
        .arg("http://tokend/v1/daemon")
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&nobody.stdout).into_owned();
    assert_eq!(code, "403", "nobody may not read /v1/daemon");

    // SIGHUP with a valid config: applied.
    let b = account("b", &url, "id-b", "");
    let text = with_socket(&sb, &format!("{a}\n{b}"));
    // Written where the watcher would also see it; SIGHUP must reload by itself too.
    std::fs::write(sb.path("config.toml"), &text).unwrap();
    nix::sys::signal::kill(d.pid(), nix::sys::signal::Signal::SIGHUP).unwrap();
    let applied = d.wait_until("the reload applied", SHORT, || {
        daemon(&sb).filter(|v| v["last_reload"]["result"] == "ok")
    });
    assert!(applied["generation"].as_u64().unwrap() >= 2, "{applied}");
    d.wait_until("b's token", SHORT, || sb.read("out/b"));
    assert_eq!(
        requests_from(&idp, "id-a"),
        1,
        "a survived both reloads untouched"
    );
    let (status, _, log) = d.terminate();
    assert!(status.success(), "{log}");
}

fn rate_limited_siblings_wait(limit: Reply, at_least: Duration) {
    // Both accounts on one token_url; refreshing every second once the limit is over.
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = sandbox();
    let url = idp.url();
    let extra = "refresh_every = \"1s\"\nmin_refresh_interval = \"1s\"";
    let d = Daemon::start(&sb.config(&format!(
        "{}\n{}",
        account("a", &url, "id-a", extra),
        account("b", &url, "id-b", extra)
    )));
    d.wait_until("both tokens", SHORT, || {
        sb.read("out/a").and(sb.read("out/b"))
    });
    idp.push(limit);
    // The request that got the 429 (counting requests would race a rotation that
    // starts between the push and the count).
    let limited = d.wait_until("the 429 to go out", LONG, || {
        idp.requests()
            .into_iter()
            .find(|r| r.status == 429)
            .map(|r| r.at)
    });
    // A sibling's request already on its way when the 429 went out does not count:
    // look at the first one that started well after.
    let after = d.wait_until("a request after the limit", LONG, || {
        idp.requests()
            .into_iter()
            .map(|r| r.at)
            .find(|at| *at > limited + Duration::from_millis(200))
    });
    let gap = after.duration_since(limited);
    assert!(
        gap >= at_least,
        "the next request (from either account) came {gap:?} after the 429"
    );
}

#[test]
fn retry_after_on_429_holds_every_account_on_that_provider() {
    rate_limited_siblings_wait(Reply::RetryAfter(3), Duration::from_millis(2900));
}

#[test]
fn okta_rate_limit_reset_holds_every_account_on_that_provider() {
    // X-Rate-Limit-Reset is in whole epoch seconds: 3 s ahead is at least 2 s away.
    rate_limited_siblings_wait(Reply::OktaReset(3), Duration::from_secs(2));
}

#[test]
fn invalid_grant_holds_the_account_until_the_password_file_changes() {
    let idp = FakeIdp::start(Reply::InvalidGrant);
    let sb = sandbox();
    sb.write(&sb.path("password"), "wrong-password\n", 0o600);
    let extra =
        "grant_type = \"password\"\nusername = \"svc\"\npassword = { file = \"password\" }\n\
                 min_refresh_interval = \"1s\"";
    let d = Daemon::start(&sb.config(&format!(
        "[daemon]\n{}{}",
        socket_key(&sb),
        account("okta", &idp.url(), "id", extra)
    )));
    // Held: failing, the next attempt about 15 minutes (auth_failure_hold) away.
    let socket = sb.path("tokend.sock");
    d.wait_until("okta to be held", SHORT, || {
        let a = account_status(&socket, "okta")?;
        let next = time::OffsetDateTime::parse(
            a["next_refresh"].as_str()?,
            &time::format_description::well_known::Rfc3339,
        )
        .expect("next_refresh is RFC 3339");
        let left = next - time::OffsetDateTime::now_utc();
        let held = a["status"] == "failing"
            && left > time::Duration::minutes(14)
            && left <= time::Duration::seconds(905);
        held.then_some(())
    });
    // Not a stream of logins: one request, and the next planned 15 minutes on (that
    // none comes meanwhile is proven on a paused clock:
    // `inprocess::a_refused_password_is_held_until_its_file_changes_then_asked_at_once`).
    assert_eq!(
        idp.requests().len(),
        1,
        "exactly one request within the hold"
    );

    // The operator fixes the password: asked again at once, and the token comes.
    idp.push(Reply::token(3600));
    sb.write(&sb.path("password"), "right-password\n", 0o600);
    let reqs = idp.wait_requests(2, SHORT);
    assert_eq!(reqs[1].form()["password"], "right-password");
    d.wait_until("the token", SHORT, || sb.read("out/okta"));
    let (status, _, log) = d.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("retry_in=900"), "the hold is logged:\n{log}");
    assert!(!log.contains("wrong-password") && !log.contains("right-password"));
}

#[test]
fn a_restart_serves_the_saved_token_without_a_request() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = sandbox();
    let cfg = sb.config(&format!(
        "[daemon]\nstate_dir = \"state\"\n{}{}",
        socket_key(&sb),
        account("a", &idp.url(), "id", "")
    ));
    let socket = sb.path("tokend.sock");
    let d = Daemon::start(&cfg);
    let token = d.wait_until("a's token", SHORT, || sb.read("out/a"));
    assert_eq!(sb.mode("state/a.json"), 0o600);
    let (status, _, _) = d.terminate();
    assert!(status.success());

    // Outputs in /run vanish with a reboot: the saved token is written again.
    std::fs::remove_file(sb.path("out/a")).unwrap();
    for _ in 0..3 {
        let d = Daemon::start(&cfg);
        let served = d.wait_until("this daemon to serve a's token", SHORT, || {
            socket_get(&socket, "/v1/tokens/a/raw").and_then(|(code, t)| (code == 200).then_some(t))
        });
        assert_eq!(served, token);
        assert_eq!(d.wait_until("a's token", SHORT, || sb.read("out/a")), token);
        let (status, _, log) = d.terminate();
        assert!(status.success(), "{log}");
        assert!(log.contains("serving the saved token"), "{log}");
    }
    assert_eq!(idp.requests().len(), 1, "three restarts, zero requests");

    // `once --min-valid` reuses it too; asking for more than it has left asks anew.
    let out = crate::support::once(&cfg, &["--min-valid", "10m"]);
    assert_eq!(out.code(), Some(0));
    assert_eq!(idp.requests().len(), 1);
    let out = crate::support::once(&cfg, &["--min-valid", "2h"]);
    assert_eq!(out.code(), Some(0));
    assert_eq!(idp.requests().len(), 2);
}

#[test]
fn kill_9_during_writes_leaves_outputs_and_state_whole() {
    // Long tokens, rotated as fast as the config allows; killed at random moments.
    let idp = FakeIdp::start(Reply::Token {
        expiry: crate::support::fake_idp::Expiry::In(1),
        len: 2000..8000,
    });
    let sb = sandbox();
    let extra = "min_refresh_interval = \"1s\"\n[[account.output]]\npath = \"out/a.json\"\nformat = \"json\"";
    let cfg = sb.config(&format!(
        "[daemon]\nstate_dir = \"state\"\n{}{}",
        socket_key(&sb),
        account("a", &idp.url(), "id", extra)
    ));
    let started = Instant::now();
    for i in 0..50u64 {
        let d = Daemon::start(&cfg);
        // 0 to 40 ms in: during start-up, the first fetch or the writes.
        std::thread::sleep(Duration::from_millis(i * 7919 % 41));
        nix::sys::signal::kill(d.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
        drop(d);
        if let Some(raw) = sb.read("out/a") {
            assert!(
                idp.is_issued(&raw),
                "round {i}: out/a holds a partial or unknown token"
            );
        }
        if let Some(json) = sb.read("out/a.json") {
            let v: serde_json::Value =
                serde_json::from_str(&json).unwrap_or_else(|e| panic!("round {i}: {e}"));
            assert!(idp.is_issued(v["access_token"].as_str().unwrap()));
        }
        if let Some(state) = sb.read("state/a.json") {
            serde_json::from_str::<serde_json::Value>(&state)
                .unwrap_or_else(|e| panic!("round {i}: state {e}"));
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "50 rounds take seconds"
        );
    }
    // A last clean run removes whatever temporary files the kills left; stopped cleanly,
    // it leaves none of its own (a rotation may be writing while it runs).
    // The killed rounds' temporary files: these must go (the new daemon's own come and
    // go while it writes, once a second here).
    let stale = tmp_files(&sb);
    let d = Daemon::start(&cfg);
    // Wait on this daemon's own state, not on files the killed rounds left behind (an
    // `out/a` from round 49 is there before this process even parsed its config, and a
    // SIGTERM before its handlers exist kills it with the default action). Every killed
    // round was reaped, so whoever answers on the socket is this process, and it binds
    // the socket after its signal streams exist; then its account task must have
    // cleaned the stale temporary files away.
    let socket = sb.path("tokend.sock");
    d.wait_until("the new daemon to answer on its socket", SHORT, || {
        account_status(&socket, "a")
    });
    let mut left = Vec::new();
    let whole = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        d.wait_until("the new daemon's clean-up and a whole token", SHORT, || {
            // The killed rounds' files first: out/a may be round 49's for a while.
            left = tmp_files(&sb);
            left.retain(|f| stale.contains(f));
            if !left.is_empty() {
                return None;
            }
            sb.read("out/a").filter(|t| idp.is_issued(t))
        })
    }));
    assert!(
        whole.is_ok(),
        "killed rounds' temporary files left: {left:?}"
    );
    let (status, _, log) = d.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("tokend started"), "{log}");
    let leftovers = tmp_files(&sb);
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The temporary files (`*.tokend-tmp`) in `out/` and `state/`.
fn tmp_files(sb: &Sandbox) -> Vec<String> {
    ["out", "state"]
        .iter()
        .filter_map(|d| Some((d, std::fs::read_dir(sb.path(d)).ok()?)))
        .flat_map(|(d, entries)| {
            entries
                .flatten()
                .map(move |e| format!("{d}/{}", e.file_name().to_string_lossy()))
        })
        .filter(|n| n.ends_with(".tokend-tmp"))
        .collect()
}

#[test]
fn on_refresh_runs_once_per_rotation_after_every_output_is_written() {
    let idp = FakeIdp::start(Reply::token(2));
    let sb = sandbox();
    // The hook appends what the outputs hold when it runs, one line per run.
    let script = sb.path("hook.sh");
    sb.write(
        &script,
        &format!(
            "printf '%s %s\\n' \"$(cat {})\" \"$TOKEND_ACCOUNT\" >> {}\n",
            sb.path("out/a.env").display(),
            sb.path("hook.log").display()
        ),
        0o700,
    );
    let hook = format!(
        "on_refresh = [\"sh\", \"{}\"]\nmin_refresh_interval = \"1s\"\n\
         [[account.output]]\npath = \"out/a.env\"\nformat = \"env\"",
        script.display()
    );
    let d = Daemon::start(&sb.config(&account("a", &idp.url(), "id", &hook)));
    let lines = d.wait_until("three hook runs", LONG, || {
        let log = sb.read("hook.log")?;
        let lines: Vec<String> = log.lines().map(str::to_owned).collect();
        (lines.len() >= 3).then_some(lines)
    });
    let issued = idp.issued();
    for (i, line) in lines.iter().take(3).enumerate() {
        // The last output (env) already held the rotation's token when the hook ran.
        assert_eq!(line, &format!("A_TOKEN={} a", issued[i]), "run {i}");
    }
}

#[test]
fn a_configmap_symlink_swap_reloads() {
    // The layout kubelet gives a ConfigMap volume: config.toml -> ..data/config.toml,
    // ..data -> ..<timestamp>/, swapped by renaming a new symlink over ..data.
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = sandbox();
    let url = idp.url();
    let dir = sb.path("cm");
    let version = |n: u32, text: &str| {
        let v = dir.join(format!("..v{n}"));
        std::fs::create_dir_all(&v).unwrap();
        sb.write(&v.join("config.toml"), text, 0o600);
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..v{n}"), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
    };
    let secret = sb.path("secret");
    let a = account("a", &url, "id-a", "").replace(
        "file = \"secret\"",
        &format!("file = \"{}\"", secret.display()),
    );
    let out = |n: &str| format!("path = \"{}\"", sb.path(&format!("out/{n}")).display());
    version(
        1,
        &with_socket(&sb, &a.replace("path = \"out/a\"", &out("a"))),
    );
    std::os::unix::fs::symlink("..data/config.toml", dir.join("config.toml")).unwrap();
    let d = Daemon::start(&dir.join("config.toml"));
    wait_fresh(&d, &sb, &["a"]);
    d.wait_until("a's token", SHORT, || sb.read("out/a"));

    let b = account("b", &url, "id-b", "").replace(
        "file = \"secret\"",
        &format!("file = \"{}\"", secret.display()),
    );
    version(
        2,
        &with_socket(
            &sb,
            &format!(
                "{}\n{}",
                a.replace("path = \"out/a\"", &out("a")),
                b.replace("path = \"out/b\"", &out("b"))
            ),
        ),
    );
    d.wait_until("b's token after the swap", SHORT, || sb.read("out/b"));
    assert_eq!(requests_from(&idp, "id-a"), 1);
}

#[test]
fn identical_accounts_are_fetched_once_and_fan_out() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = sandbox();
    let url = idp.url();
    // Same endpoint, client, secret, grant and scope; different names and outputs.
    let d = Daemon::start(&sb.config(&format!(
        "{}\n{}\n{}",
        account("a", &url, "same", ""),
        account("b", &url, "same", ""),
        account("c", &url, "other", "")
    )));
    let (a, b) = d.wait_until("a's and b's tokens", SHORT, || {
        Some((sb.read("out/a")?, sb.read("out/b")?))
    });
    d.wait_until("c's token", SHORT, || sb.read("out/c"));
    assert_eq!(a, b, "one token for both");
    assert_eq!(
        requests_from(&idp, "same"),
        1,
        "asked once for the two identical accounts"
    );
    assert_eq!(requests_from(&idp, "other"), 1);
}

#[test]
fn once_in_a_cron_loop_keeps_the_hold_after_refused_credentials() {
    let idp = FakeIdp::start(Reply::InvalidGrant);
    let sb = sandbox();
    sb.write(&sb.path("password"), "wrong-password\n", 0o600);
    let extra = "grant_type = \"password\"\nusername = \"svc\"\npassword = { file = \"password\" }";
    let cfg = sb.config(&format!(
        "[daemon]\nstate_dir = \"state\"\n{}",
        account("okta", &idp.url(), "id", extra)
    ));
    let first = crate::support::once(&cfg, &[]);
    assert_eq!(first.code(), Some(1));
    assert!(first.stderr.contains("invalid_grant"), "{}", first.stderr);
    for _ in 0..3 {
        let again = crate::support::once(&cfg, &[]);
        assert_eq!(again.code(), Some(1));
        assert!(again.stderr.contains("holding for"), "{}", again.stderr);
    }
    assert_eq!(idp.requests().len(), 1, "four runs, one login attempt");

    idp.push(Reply::token(3600));
    sb.write(&sb.path("password"), "right-password\n", 0o600);
    let fixed = crate::support::once(&cfg, &[]);
    assert_eq!(fixed.code(), Some(0), "{}", fixed.stderr);
    assert_eq!(idp.requests().len(), 2);
}

#[test]
fn on_refresh_signal_signals_the_process_in_the_pid_file() {
    let idp = FakeIdp::start(Reply::token(2));
    let sb = sandbox();
    // A process that counts the SIGHUPs it gets.
    let hups = sb.path("hups");
    let mut app = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap 'echo hup >> {}' HUP; while :; do sleep 0.05; done",
            hups.display()
        ))
        .spawn()
        .unwrap();
    sb.write(&sb.path("app.pid"), &format!("{}\n", app.id()), 0o644);
    let extra = format!(
        "min_refresh_interval = \"1s\"\non_refresh_signal = {{ pid_file = \"{}\", signal = \"SIGHUP\" }}",
        sb.path("app.pid").display()
    );
    let d = Daemon::start(&sb.config(&account("a", &idp.url(), "id", &extra)));
    let count = d.wait_until("two signals", LONG, || {
        let n = sb.read("hups")?.lines().count();
        (n >= 2).then_some(n)
    });
    let _ = app.kill();
    let _ = app.wait();
    assert!(count <= idp.issued().len(), "one signal per token at most");
}

#[test]
fn a_hook_that_hangs_is_killed_after_hook_timeout_and_rotation_goes_on() {
    let idp = FakeIdp::start(Reply::token(2));
    let sb = sandbox();
    // Each run of the hook writes its pid (`exec`: the pid of the sleep) and hangs.
    let pids = sb.path("hook.pids");
    let extra = format!(
        "min_refresh_interval = \"1s\"\non_refresh = [\"sh\", \"-c\", \"echo $$ >> {}; exec sleep 1000\"]\nhook_timeout = \"1s\"",
        pids.display()
    );
    let d = Daemon::start(&sb.config(&account("a", &idp.url(), "id", &extra)));
    // The n-th run of the hook, once it is gone: killed, and reaped.
    let killed = |n: usize, timeout: Duration| {
        d.wait_until(&format!("hook run {n} killed"), timeout, || {
            let text = sb.read("hook.pids")?;
            let pid: i32 = text.lines().nth(n - 1)?.trim().parse().ok()?;
            let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err();
            gone.then_some(())
        })
    };
    killed(1, SHORT);
    // The next rotations still come: a hanging hook does not stall the account.
    idp.wait_requests(3, LONG);
    killed(2, LONG);
}

#[test]
fn a_directory_output_keeps_its_files_consistent_through_rotations() {
    let idp = FakeIdp::start(Reply::token(2));
    let sb = sandbox();
    let extra = "min_refresh_interval = \"1s\"\n[[account.output]]\npath = \"out/a.d\"\nformat = \"directory\"\nmode = \"0640\"";
    let d = Daemon::start(&sb.config(&account("a", &idp.url(), "id", extra)));
    let dir = sb.path("out/a.d");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        // One version, read through the `..data` link once: all four files agree.
        let token = d.wait_until("a new version of the directory", LONG, || {
            let version = dir.join(std::fs::read_link(dir.join("..data")).ok()?);
            let raw = std::fs::read_to_string(version.join("raw")).ok()?;
            if seen.contains(&raw) {
                return None;
            }
            let env = std::fs::read_to_string(version.join("env")).ok()?;
            let header = std::fs::read_to_string(version.join("header")).ok()?;
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(version.join("json")).ok()?).ok()?;
            assert_eq!(env, format!("A_TOKEN={raw}\n"));
            assert_eq!(header, format!("Authorization: Bearer {raw}\n"));
            assert_eq!(json["access_token"], raw.as_str());
            Some(raw)
        });
        assert!(idp.is_issued(&token));
        seen.push(token);
    }
    assert_eq!(sb.mode("out/a.d/raw"), 0o640);
    let (status, _, log) = d.terminate();
    assert!(status.success(), "{log}");
    let mut entries: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("..") || n == "..data")
        .collect();
    entries.sort();
    assert_eq!(entries, ["..data", "env", "header", "json", "raw"]);
    let versions = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("..") && e.file_name() != "..data")
        .count();
    assert_eq!(versions, 1, "old versions are removed");
}
