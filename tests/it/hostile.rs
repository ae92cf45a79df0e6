//! Hostile input and least privilege (SPEC §2, §3, §4, §6), with the real binary: a
//! provider's token that a shell would run never reaches an env file; hooks see nothing
//! of tokend's environment; `get`/`status` never print the config's source line; a
//! caller's `/v1/health` counts only the accounts it may read; a `state_dir` others can
//! write is refused; `check --credentials-dir` checks `{ credential = ... }` secrets
//! outside the unit.

use std::path::Path;

use crate::support::fake_idp::{FakeIdp, Reply};
use crate::support::{finish, tokend, Daemon, Sandbox, LONG, SHORT};

fn sandbox() -> Sandbox {
    let sb = Sandbox::new();
    sb.write(&sb.path("secret"), "client-secret\n", 0o600);
    sb
}

fn account(name: &str, url: &str, extra: &str) -> String {
    crate::support::config::account(name, url)
        .client_id(&format!("id-{name}"))
        .with(extra)
        .output(&format!("out/{name}"))
        .toml()
}

#[test]
fn a_token_a_shell_would_run_never_reaches_an_env_file() {
    let idp = FakeIdp::start(Reply::Literal("x;touch${IFS}pwned;".into(), 3600));
    idp.push(Reply::Literal("good-token.1".into(), 2));
    let sb = sandbox();
    let extra =
        "min_refresh_interval = \"1s\"\n[[account.output]]\npath = \"out/a.env\"\nformat = \"env\"";
    let d = Daemon::start(&sb.config(&format!(
        "[daemon]\nsocket = \"tokend.sock\"\n{}",
        account("a", &idp.url(), extra)
    )));
    d.wait_until("the good token in the env file", SHORT, || {
        sb.read("out/a.env")
            .filter(|t| t == "A_TOKEN=good-token.1\n")
    });
    // The next token holds shell syntax: raw takes it (visible ASCII), env keeps the last.
    d.wait_until("the hostile token in the raw output", LONG, || {
        sb.read("out/a").filter(|t| t.starts_with("x;"))
    });
    let status = d.wait_until("the account failing with the reason", SHORT, || {
        crate::support::account_status(&sb.path("tokend.sock"), "a")
            .filter(|s| s["status"] == "failing")
    });
    assert!(
        status["last_error"].as_str().unwrap().contains("b64token"),
        "{status}"
    );
    assert_eq!(sb.read("out/a.env").unwrap(), "A_TOKEN=good-token.1\n");
    // Sourcing it, as the SPEC advertises, runs nothing.
    let sourced = std::process::Command::new("sh")
        .arg("-c")
        .arg(". ./out/a.env && echo \"$A_TOKEN\"")
        .current_dir(sb.path(""))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&sourced.stdout), "good-token.1\n");
    assert!(!sb.path("pwned").exists());
    assert_eq!(
        idp.requests().len(),
        2,
        "a bad env file costs no further request"
    );
}

#[test]
fn hooks_see_only_path_lang_the_account_and_the_expiry() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = Sandbox::new();
    let creds = sb.path("creds");
    std::fs::create_dir(&creds).unwrap();
    let hook = format!(
        "on_refresh = [\"sh\", \"-c\", \"env > {}\"]",
        sb.path("hook.env").display()
    );
    let text = account("a", &idp.url(), &hook)
        .replace("{ file = \"secret\" }", "{ env = \"TOKEND_TEST_SECRET\" }");
    let d = Daemon::start_with_env(
        &sb.config(&text),
        &[
            ("TOKEND_TEST_SECRET", "env-s3cret-value"),
            ("CREDENTIALS_DIRECTORY", creds.to_str().unwrap()),
            ("LANG", "C.UTF-8"),
        ],
    );
    let env = d.wait_until("the hook's environment", SHORT, || {
        sb.read("hook.env")
            .filter(|e| e.contains("TOKEND_EXPIRES_AT="))
    });
    assert_eq!(
        idp.requests()[0].basic().unwrap(),
        "id-a:env-s3cret-value",
        "the secret did come from the environment"
    );
    let mut names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        // What sh itself sets, not anything of tokend's.
        .filter(|k| !["PWD", "SHLVL", "_", "OLDPWD"].contains(k))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["LANG", "PATH", "TOKEND_ACCOUNT", "TOKEND_EXPIRES_AT"],
        "{env}"
    );
    assert!(!env.contains("env-s3cret-value"));
    assert!(env.contains("TOKEND_ACCOUNT=a\n"));
    let expires = env
        .lines()
        .find_map(|l| l.strip_prefix("TOKEND_EXPIRES_AT="))
        .unwrap();
    assert!(
        expires.len() == 20 && expires.ends_with('Z'),
        "RFC 3339 UTC: {expires}"
    );
}

#[test]
fn get_and_status_never_print_the_configs_source_line() {
    let sb = Sandbox::new();
    let cfg = sb.config(
        "[daemon]\nsocket = \"x.sock\"\n[[account]]\nname = \"a\"\nclient_secret = \"inline-s3cret\" oops\n",
    );
    for cmd in ["status", "get"] {
        let mut c = tokend();
        c.arg(cmd).arg("-c").arg(&cfg);
        if cmd == "get" {
            c.arg("a");
        }
        let out = finish(c, SHORT);
        assert_eq!(out.code(), Some(2), "{cmd}: {}", out.stderr);
        assert!(out.stderr.contains("line 5"), "{cmd}: {}", out.stderr);
        assert!(
            !out.stderr.contains("inline-s3cret"),
            "{cmd}: {}",
            out.stderr
        );
    }
}

/// Runs `argv` as uid/gid 65534 with no supplementary groups.
fn as_nobody(argv: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(argv)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("setpriv runs")
}

#[test]
fn health_counts_only_the_accounts_the_caller_may_read() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: needs root to connect as another user");
        return;
    }
    let idp = FakeIdp::start(Reply::token(3600));
    let refusing = FakeIdp::start(Reply::InvalidClient);
    let sb = sandbox();
    // The sandbox is traversable by uid 65534; only the socket is theirs to use.
    std::fs::set_permissions(
        sb.path(""),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let visible = account("mine", &idp.url(), "[account.access]\nusers = [\"65534\"]");
    let hidden = account("hidden", &refusing.url(), "");
    let sock = sb.path("tokend.sock");
    let d = Daemon::start(&sb.config(&format!(
        "[daemon]\nsocket = \"tokend.sock\"\nsocket_mode = \"0666\"\n{visible}\n{hidden}"
    )));
    d.wait_until("hidden failing, mine fresh", SHORT, || {
        let h = crate::support::account_status(&sock, "hidden")?;
        let m = crate::support::account_status(&sock, "mine")?;
        (h["status"] == "failing" && m["status"] == "fresh").then_some(())
    });
    let (root_code, _) = crate::support::socket_get(&sock, "/v1/health").unwrap();
    assert_eq!(root_code, 503, "root sees the failing account");
    let out = as_nobody(&[
        "curl",
        "-sS",
        "--unix-socket",
        sock.to_str().unwrap(),
        "-w",
        "\n%{http_code}",
        "http://tokend/v1/health",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n200"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("hidden"), "{text}");
}

#[test]
fn a_state_dir_others_can_write_is_refused_at_start_and_by_check() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = sandbox();
    let state = sb.path("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let cfg = sb.config(&format!(
        "[daemon]\nstate_dir = \"state\"\n{}",
        account("a", &idp.url(), "")
    ));
    for cmd in ["run", "once", "check"] {
        let mut c = tokend();
        c.arg(cmd).arg("-c").arg(&cfg);
        let out = finish(c, SHORT);
        assert_eq!(out.code(), Some(2), "{cmd}: {}", out.stderr);
        let want = format!("{}:2:13: daemon.state_dir:", cfg.display());
        assert!(out.stderr.contains(&want), "{cmd}: {}", out.stderr);
        assert!(
            out.stderr.contains("writable by group or others"),
            "{}",
            out.stderr
        );
    }
    assert!(
        idp.requests().is_empty(),
        "nothing asked with a planted state"
    );
}

#[test]
fn check_reads_credentials_from_credentials_dir() {
    let sb = Sandbox::new();
    let creds = sb.path("creds");
    std::fs::create_dir(&creds).unwrap();
    sb.write(&creds.join("msk-secret"), "s3cret\n", 0o600);
    let cfg = sb.config(
        "[[account]]\nname = \"a\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\n\
         client_secret = { credential = \"msk-secret\" }\n[[account.output]]\npath = \"out/a\"\n",
    );
    let check = |dir: Option<&Path>| {
        let mut c = tokend();
        c.arg("check").arg("-c").arg(&cfg);
        if let Some(d) = dir {
            c.arg("--credentials-dir").arg(d);
        }
        c.stdout(std::process::Stdio::piped());
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = check(None);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("--credentials-dir"),
        "the failure says how: {out}"
    );
    let (code, out) = check(Some(&creds));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("credential msk-secret"), "{out}");
    assert!(!out.contains("s3cret"));
}
