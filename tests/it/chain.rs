//! Refresh-token chains on one host (issue 19; SPEC §6 "Refresh-token chains are never
//! lost"), with `tokend run` against the fake IdP that rotates refresh tokens and
//! revokes a family when a spent one comes back (as Okta, Auth0 and Keycloak do). Every
//! test counts the refresh tokens presented at the IdP: none twice.
//!
//! - an answer with a rotated refresh token but a bad `expires_in` keeps the new one;
//! - an answer that comes after `timeout` but within `refresh_token_timeout` is waited
//!   for;
//! - a renamed account (a reload, a restart) resumes its chain;
//! - a damaged state file holds the account (the seed is never replayed) until a new
//!   seed or `tokend reseed`; the damaged file is kept aside;
//! - `expires_in` as a decimal string and a body after a byte-order mark are read.
//!
//! Not here: the chain across a reload or SIGTERM in flight, `once` next to `run`
//! (`faults`), cluster members sharing a chain (`cluster`).

use std::time::Duration;

use crate::support::fake_idp::{Expiry, FakeIdp, Reply};
use crate::support::{account_status, tokend, Daemon, Sandbox, LONG, SHORT};

const SEED: &str = "rt-seed-1";

/// A sandbox with the seed refresh token in `rt`.
fn sandbox(seed: &str) -> Sandbox {
    let sb = Sandbox::new();
    sb.write(&sb.path("rt"), &format!("{seed}\n"), 0o600);
    sb
}

/// A config with a socket and `state_dir = "state"`, and refresh_token account `name`
/// (seed in the file `rt`, a raw output `out/NAME`) with `extra` lines.
fn config(sb: &Sandbox, url: &str, name: &str, extra: &str) -> String {
    let account = crate::support::config::account(name, url)
        .public_client()
        .with("grant_type = \"refresh_token\"\nrefresh_token = { file = \"rt\" }")
        .with("min_refresh_interval = \"1s\"")
        .with(extra)
        .output(&format!("out/{name}"));
    crate::support::config::daemon(&sb.path("tokend.sock"), "state_dir = \"state\"")
        + &account.toml()
}

/// No refresh token was presented twice, and the family is alive.
fn assert_chain_whole(idp: &FakeIdp, seed: &str) {
    assert_eq!(
        idp.reused_refresh_tokens(),
        Vec::<String>::new(),
        "refresh tokens presented twice; in order: {:?}",
        idp.refresh_tokens_presented()
    );
    assert!(!idp.family_revoked(seed), "the provider revoked the chain");
}

/// Waits until the output holds a token issued after the first `n`.
fn wait_token_after(d: &Daemon, sb: &Sandbox, idp: &FakeIdp, name: &str, n: usize) -> String {
    d.wait_until(
        &format!("out/{name} to hold token #{} or later", n + 1),
        LONG,
        || {
            let t = sb.read(&format!("out/{name}"))?;
            (idp.issued().iter().position(|x| *x == t)? >= n).then_some(t)
        },
    )
}

/// Replaces the config as editors do (a rename), then SIGHUP.
fn reload(d: &Daemon, sb: &Sandbox, text: &str) {
    let tmp = sb.path(".config.toml.swp");
    sb.write(&tmp, text, 0o600);
    std::fs::rename(&tmp, sb.path("config.toml")).expect("rename the new config over");
    nix::sys::signal::kill(d.pid(), nix::sys::signal::Signal::SIGHUP).expect("signal tokend");
}

fn status(sb: &Sandbox, name: &str) -> Option<serde_json::Value> {
    account_status(&sb.path("tokend.sock"), name)
}

/// `tokend reseed a -c CONFIG`, which succeeds: what it printed.
fn reseed(sb: &Sandbox) -> String {
    let out = tokend()
        .args(["reseed", "a", "-c"])
        .arg(sb.path("config.toml"))
        .output()
        .expect("tokend reseed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_rotated_refresh_token_in_an_answer_with_a_bad_expiry_is_kept() {
    let idp = FakeIdp::start(Reply::token(3600));
    idp.seed_refresh_token(SEED);
    // The provider rotates the chain with an answer tokend cannot use as a token.
    idp.push(Reply::token_with(Expiry::Raw("0")));
    let sb = sandbox(SEED);
    let d = Daemon::start(&sb.config(&config(&sb, &idp.url(), "a", "")));
    let token = d.wait_until("a token", LONG, || sb.read("out/a"));
    assert!(idp.is_issued(&token));
    let presented = idp.refresh_tokens_presented();
    assert_eq!(presented.len(), 2, "{presented:?}");
    assert_eq!(presented[0], SEED);
    assert_eq!(
        presented[1],
        idp.refresh_issued()[0],
        "the retry sends the refresh token the bad answer carried"
    );
    assert_chain_whole(&idp, SEED);
}

#[test]
fn an_answer_after_timeout_is_waited_for_within_refresh_token_timeout() {
    let idp = FakeIdp::start(Reply::token(3600));
    idp.seed_refresh_token(SEED);
    // Answered after 3 s: past `timeout`, within `refresh_token_timeout` (2 minutes).
    idp.push(Reply::slow(Duration::from_secs(3), Reply::token(3600)));
    let sb = sandbox(SEED);
    let d = Daemon::start(&sb.config(&config(&sb, &idp.url(), "a", "timeout = \"1s\"")));
    let token = d.wait_until("the late token", LONG, || sb.read("out/a"));
    assert_eq!(token, idp.issued()[0]);
    assert_eq!(idp.requests().len(), 1, "one request, waited for");
    assert_chain_whole(&idp, SEED);
}

#[test]
fn a_refresh_token_request_that_times_out_says_the_chain_is_at_risk() {
    // No family judged here: a provider that rotated on the first request would refuse
    // the retry at once (invalid_grant), and the message this test reads would last
    // milliseconds. Every request hangs instead, so the account says it until the end.
    let idp = FakeIdp::start(Reply::slow(Duration::from_secs(30), Reply::token(3600)));
    let sb = sandbox(SEED);
    let d = Daemon::start(&sb.config(&config(
        &sb,
        &idp.url(),
        "a",
        "refresh_token_timeout = \"1s\"",
    )));
    let s = d.wait_until("the account failing", LONG, || {
        status(&sb, "a").filter(|s| s["last_error"].as_str().is_some())
    });
    let e = s["last_error"].as_str().unwrap();
    assert!(e.contains("timed out after 1s"), "{e}");
    assert!(e.contains("chain is at risk"), "{e}");
    // Retried at once: the provider's reuse grace window is the only way back.
    idp.wait_requests(2, SHORT);
}

#[test]
fn a_renamed_account_resumes_its_chain_across_a_reload_and_a_restart() {
    let idp = FakeIdp::start(Reply::token(3600));
    idp.seed_refresh_token(SEED);
    let sb = sandbox(SEED);
    let d = Daemon::start(&sb.config(&config(&sb, &idp.url(), "old", "")));
    d.wait_until("the first token", LONG, || sb.read("out/old"));
    // Renamed: the new name resumes the chain the old one rotated.
    reload(&d, &sb, &config(&sb, &idp.url(), "new", ""));
    // The token the chain has is served under the new name, with no request.
    d.wait_until("the renamed account serving", LONG, || {
        status(&sb, "new").filter(|s| s["status"] == "fresh")
    });
    assert_eq!(idp.requests().len(), 1, "the rename cost no request");
    std::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args(["refresh", "new", "--socket"])
        .arg(sb.path("tokend.sock"))
        .output()
        .expect("tokend refresh");
    wait_token_after(&d, &sb, &idp, "new", 1);
    drop(d);
    // Renamed again while tokend is stopped.
    sb.config(&config(&sb, &idp.url(), "newer", ""));
    let d = Daemon::start(&sb.path("config.toml"));
    d.wait_until("the account under its newest name", LONG, || {
        status(&sb, "newer").filter(|s| s["status"] == "fresh")
    });
    std::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args(["refresh", "newer", "--socket"])
        .arg(sb.path("tokend.sock"))
        .output()
        .expect("tokend refresh");
    wait_token_after(&d, &sb, &idp, "newer", 2);
    assert_eq!(idp.refresh_tokens_presented().len(), 3);
    assert_chain_whole(&idp, SEED);
}

#[test]
fn a_damaged_state_holds_the_account_until_a_new_seed_and_keeps_the_damage_aside() {
    let idp = FakeIdp::start(Reply::token(3600));
    idp.seed_refresh_token(SEED);
    let sb = sandbox(SEED);
    let text = config(&sb, &idp.url(), "a", "");
    let d = Daemon::start(&sb.config(&text));
    d.wait_until("the first token", LONG, || sb.read("out/a"));
    drop(d);
    // Both copies damaged: truncated, and emptied.
    let state = sb.path("state/a.json");
    let whole = std::fs::read(&state).unwrap();
    std::fs::write(&state, &whole[..whole.len() / 2]).unwrap();
    std::fs::write(sb.path("state/a.json.backup"), "").unwrap();
    let d = Daemon::start(&sb.path("config.toml"));
    let s = d.wait_until("the account held", LONG, || {
        status(&sb, "a").filter(|s| s["last_error"].as_str().is_some())
    });
    let e = s["last_error"].as_str().unwrap();
    assert!(e.contains("damaged"), "{e}");
    assert!(e.contains("tokend reseed a"), "{e}");
    assert_eq!(idp.requests().len(), 1, "the seed is not replayed");
    let aside: Vec<String> = std::fs::read_dir(sb.path("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".damaged-"))
        .collect();
    assert_eq!(aside.len(), 2, "both damaged files kept: {aside:?}");
    // Held across a restart too (the hold is saved, not only in memory).
    drop(d);
    let d = Daemon::start(&sb.path("config.toml"));
    d.wait_until("the account still held", LONG, || {
        status(&sb, "a").filter(|s| {
            s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("damaged"))
        })
    });
    // The operator gets a new refresh token from the provider and configures it.
    idp.seed_refresh_token("rt-seed-2");
    sb.write(&sb.path("rt"), "rt-seed-2\n", 0o600);
    wait_token_after(&d, &sb, &idp, "a", 1);
    let presented = idp.refresh_tokens_presented();
    assert_eq!(presented, vec![SEED.to_owned(), "rt-seed-2".to_owned()]);
    assert_chain_whole(&idp, SEED);
    assert_chain_whole(&idp, "rt-seed-2");
}

#[test]
fn reseed_starts_the_chain_again_through_the_daemon_and_without_one() {
    let idp = FakeIdp::start(Reply::token(3600));
    idp.seed_refresh_token(SEED);
    let sb = sandbox(SEED);
    let text = config(&sb, &idp.url(), "a", "");
    // A state file that is garbage before the first start (an operator's bad copy).
    std::fs::create_dir(sb.path("state")).unwrap();
    sb.write(&sb.path("state/a.json"), "not json", 0o600);
    let d = Daemon::start(&sb.config(&text));
    d.wait_until("the account held", LONG, || {
        status(&sb, "a").filter(|s| {
            s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("damaged"))
        })
    });
    assert!(idp.requests().is_empty());
    // Only root or the daemon's user may re-seed.
    let nobody = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_tokend"))
        .args(["reseed", "a", "--socket"])
        .arg(sb.path("tokend.sock"))
        .output()
        .expect("setpriv");
    assert!(!nobody.status.success());
    assert!(reseed(&sb).contains("re-seeded"));
    let token = d.wait_until("a token from the seed", LONG, || sb.read("out/a"));
    assert!(idp.is_issued(&token));
    assert_eq!(idp.refresh_tokens_presented(), vec![SEED.to_owned()]);
    drop(d);
    // Without a daemon: in state_dir, the old state kept aside.
    let said = reseed(&sb);
    assert!(said.contains("no daemon answered"), "{said}");
    assert!(said.contains("kept as"), "{said}");
    assert_chain_whole(&idp, SEED);
}

#[test]
fn expires_in_with_a_fraction_and_a_byte_order_mark_are_read() {
    let idp = FakeIdp::start(Reply::token(3600));
    idp.seed_refresh_token(SEED);
    idp.push(Reply::WithBom(Box::new(Reply::token_with(Expiry::Raw(
        "\"3600.0\"",
    )))));
    let sb = sandbox(SEED);
    let d = Daemon::start(&sb.config(&config(&sb, &idp.url(), "a", "")));
    let token = d.wait_until("the token", LONG, || sb.read("out/a"));
    assert_eq!(token, idp.issued()[0]);
    let s = d.wait_until("the account fresh", SHORT, || {
        status(&sb, "a").filter(|s| s["status"] == "fresh")
    });
    assert!(s["last_error"].is_null(), "{s}");
    assert_eq!(idp.requests().len(), 1);
}
