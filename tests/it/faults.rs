//! Fault tests (SPEC §5, §6; STYLE.md principle 13): each reproduces a fault for real,
//! with `tokend run` or `tokend once` against the fake IdP, in real time, and watches
//! the state the process it started leaves: the IdP's recorded requests, the output and
//! `state_dir` files, `tokend status --json` and `/v1/health` on the daemon's socket,
//! exit codes.
//!
//! - refusals: a 403 with an empty body (Glewlwyd) or `access_denied` (Auth0) is held for
//!   `auth_failure_hold`, also across `once` runs; holds double on each further refusal,
//!   survive a restart, and end when a secret file changes.
//! - refresh-token chains against a provider that revokes a family on reuse (Okta,
//!   Auth0): a reload or SIGTERM while a refresh_token request is in flight, `once` next
//!   to `run`, a changed scope, an account removed and added back.
//! - local write failures (a full tmpfs, a chown without the privilege) cost no provider
//!   request and show as `failing` with the OS error.
//! - absurd expiries and rate-limit waits are capped (1 year, 1 hour); Okta's reset
//!   header on a 500 or an `invalid_scope` is no rate limit.
//! - a reload whose changed account cannot start is refused as a whole.
//! - expired outputs are removed after a restart while the provider fails.
//! - `once` honours a rate-limit wait that an earlier run saved.
//!
//! Not here: the schedule's arithmetic (`schedule`, paused clock), the happy paths
//! (`daemon`, `lifecycle`, `once`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::support::fake_idp::{Expiry, FakeIdp, Reply, Request, YEAR_9999};
use crate::support::{account_status, once, socket_get, Daemon, Sandbox, LONG, SHORT};

/// How much earlier than its lower bound a request may arrive (whole-second clocks,
/// scheduling jitter of the test machine).
const TOLERANCE: Duration = Duration::from_millis(150);

/// A sandbox with a client secret in `secret`.
fn sandbox() -> Sandbox {
    let sb = Sandbox::new();
    sb.write(&sb.path("secret"), "client-secret\n", 0o600);
    sb
}

/// The `[daemon]` section: a socket in the sandbox and `state_dir = "state"`.
fn daemon_section(sb: &Sandbox) -> String {
    crate::support::config::daemon(&socket(sb), "state_dir = \"state\"")
}

fn socket(sb: &Sandbox) -> PathBuf {
    sb.path("tokend.sock")
}

/// Account `name` with `extra` lines, a raw output `out/NAME` and a json one
/// `out/NAME.json`.
fn account(name: &str, url: &str, extra: &str) -> String {
    crate::support::config::account(name, url)
        .client_id(&format!("id-{name}"))
        .with(extra)
        .output(&format!("out/{name}"))
        .json_output(&format!("out/{name}.json"))
        .toml()
}

/// Replaces the config the way editors do, then sends SIGHUP (the watcher may reload
/// too; a reload of an unchanged text is a no-op).
fn reload(d: &Daemon, sb: &Sandbox, text: &str) {
    let tmp = sb.path(".config.toml.swp");
    sb.write(&tmp, text, 0o600);
    std::fs::rename(&tmp, sb.path("config.toml")).expect("rename the new config over");
    nix::sys::signal::kill(d.pid(), nix::sys::signal::Signal::SIGHUP).expect("signal tokend");
}

/// The `expires_at` of a json output, as a system time.
fn expires_at(json: &str) -> SystemTime {
    let v: serde_json::Value = serde_json::from_str(json).expect("the json output is JSON");
    rfc3339(v["expires_at"].as_str().expect("expires_at is a string"))
}

fn rfc3339(s: &str) -> SystemTime {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s:?} is no RFC 3339 time: {e}"));
    SystemTime::from(t)
}

/// When the account's next attempt is due, from its status: `next_attempt`, or (for the
/// current wire format) `next_refresh`.
fn next_attempt(status: &serde_json::Value) -> Option<SystemTime> {
    status["next_attempt"]
        .as_str()
        .or(status["next_refresh"].as_str())
        .map(rfc3339)
}

/// Waits until the IdP got `n` requests; on a timeout the daemon's log is shown.
fn wait_requests(d: &Daemon, idp: &FakeIdp, n: usize) -> Vec<Request> {
    d.wait_until(&format!("{n} requests at the IdP"), LONG, || {
        let r = idp.requests();
        (r.len() >= n).then_some(r)
    })
}

/// Waits until `out/NAME` holds the `i`-th issued token or a later one.
fn wait_for_token_from(d: &Daemon, sb: &Sandbox, idp: &FakeIdp, name: &str, i: usize) -> String {
    d.wait_until(
        &format!("out/{name} to hold token #{i} or later"),
        LONG,
        || {
            let t = sb.read(&format!("out/{name}"))?;
            (idp.issued().iter().position(|x| *x == t)? >= i).then_some(t)
        },
    )
}

/// The requests that reached the IdP after `since`.
fn requests_after(idp: &FakeIdp, since: Instant) -> usize {
    idp.requests().iter().filter(|r| r.at > since).count()
}

/// The chain of refresh tokens was never forked: no refresh token presented twice, and
/// the family is alive, its current refresh token the last one handed out.
fn assert_chain_whole(idp: &FakeIdp, seed: &str) {
    assert_eq!(
        idp.reused_refresh_tokens(),
        Vec::<String>::new(),
        "refresh tokens presented twice; presented in order: {:?}",
        idp.refresh_tokens_presented()
    );
    assert!(!idp.family_revoked(seed), "the provider revoked the chain");
    assert_eq!(
        idp.current_refresh_token(seed),
        idp.refresh_issued().last().cloned(),
        "the last rotated refresh token is the family's current one"
    );
}

// ---- 1. a 403 is a refusal -------------------------------------------------------

fn a_403_is_held(reply: Reply) {
    // The daemon: one request, none during the 2 s hold, the next after it.
    let idp = FakeIdp::start(reply.clone());
    let sb = sandbox();
    let extra = "auth_failure_hold = \"2s\"\nmin_refresh_interval = \"1s\"";
    let d = Daemon::start(&sb.config(&format!(
        "{}{}",
        daemon_section(&sb),
        account("a", &idp.url(), extra)
    )));
    let first = wait_requests(&d, &idp, 1)[0].at;
    // Failing once its answer is taken in (it is "refreshing" until then), and all
    // through the hold; refused again after it, failing again.
    d.wait_until("status failing after the refusal", SHORT, || {
        let s = account_status(&socket(&sb), "a")?;
        (s["status"] == "failing").then_some(())
    });
    // The next request is the first after the refusal: none came within the hold.
    let second = wait_requests(&d, &idp, 2)[1].at;
    assert!(
        second - first >= Duration::from_secs(2) - TOLERANCE,
        "a refused request is not retried within auth_failure_hold: asked again {:?} after the refusal\n{}",
        second - first,
        d.log()
    );
    drop(d);

    // `once`, twice on one state_dir: the hold is recorded and honoured.
    let idp = FakeIdp::start(reply);
    let sb = sandbox();
    let cfg = sb.config(&format!(
        "[daemon]\nstate_dir = \"state\"\n{}",
        account("a", &idp.url(), "auth_failure_hold = \"10m\"")
    ));
    for run in 0..2 {
        let out = once(&cfg, &[]);
        assert_eq!(out.code(), Some(1), "run {run}: {}", out.stderr);
    }
    assert_eq!(idp.requests().len(), 1, "two `once` runs, one request");
}

#[test]
fn a_403_with_an_empty_body_is_refused_and_held() {
    a_403_is_held(Reply::Forbidden);
}

#[test]
fn a_403_access_denied_is_refused_and_held() {
    a_403_is_held(Reply::AccessDenied);
}

// ---- 2. holds grow, survive a restart, end with a new secret ---------------------

#[test]
fn refusal_holds_double_survive_a_restart_and_end_when_the_secret_changes() {
    let idp = FakeIdp::start(Reply::InvalidGrant);
    let sb = sandbox();
    sb.write(&sb.path("password"), "wrong-password\n", 0o600);
    let extra =
        "grant_type = \"password\"\nusername = \"svc\"\npassword = { file = \"password\" }\n\
                 auth_failure_hold = \"1s\"\nmin_refresh_interval = \"1s\"";
    let cfg = sb.config(&format!(
        "{}{}",
        daemon_section(&sb),
        account("a", &idp.url(), extra)
    ));
    let hold = Duration::from_secs(1);
    let d = Daemon::start(&cfg);
    // Refusals 1, 2, 3: the gaps are at least 1 s and 2 s.
    let reqs = d.wait_until("three refused requests", LONG, || {
        let r = idp.requests();
        (r.len() >= 3).then_some(r)
    });
    // The IdP records a request when it arrives; the daemon saves the third hold (4 s)
    // when the answer came, and publishes it after: wait for that before stopping it.
    d.wait_until("the third hold to be published", SHORT, || {
        let a = account_status(&socket(&sb), "a")?;
        let next = time::OffsetDateTime::parse(
            a["next_refresh"].as_str()?,
            &time::format_description::well_known::Rfc3339,
        )
        .expect("next_refresh is RFC 3339");
        // The second hold (2 s) ended when the third request went out.
        (next - time::OffsetDateTime::now_utc() > time::Duration::milliseconds(2500)).then_some(())
    });
    for n in 1..3 {
        let gap = reqs[n].at - reqs[n - 1].at;
        let least = hold * 2u32.pow(n as u32 - 1);
        assert!(
            gap >= least - TOLERANCE,
            "gap {n} is {gap:?}, less than {least:?}"
        );
    }
    // The third hold is saved after the provider's answer arrives: stop only then.
    d.wait_until("the third refusal saved", LONG, || {
        sb.read("state/a.json")
            .filter(|s| s.contains("\"refusals\":3"))
    });
    let (status, _, log) = d.terminate();
    assert!(status.success(), "{log}");
    let third = reqs[2].at;

    // The restarted daemon still holds 4 s after the third refusal.
    let d = Daemon::start(&cfg);
    let fourth = d.wait_until("the fourth refused request", LONG, || {
        idp.requests().get(3).map(|r| r.at)
    });
    let gap = fourth - third;
    assert!(
        gap >= hold * 4 - TOLERANCE,
        "after a restart the hold began anew: the fourth request came {gap:?} after the third"
    );

    // Now held for 8 s: the operator fixes the password, the account asks at once.
    idp.push(Reply::token(3600));
    let changed = Instant::now();
    sb.write(&sb.path("password"), "right-password\n", 0o600);
    let fifth = wait_requests(&d, &idp, 5)[4].clone();
    assert_eq!(fifth.form()["password"], "right-password");
    assert!(
        fifth.at - changed < Duration::from_secs(3),
        "asked {:?} after the secret changed, still held",
        fifth.at - changed
    );
    let token = d.wait_until("the token", SHORT, || sb.read("out/a"));
    assert!(idp.is_issued(&token));
}

// ---- 3. refresh-token chains ------------------------------------------------------

const SEED: &str = "rt-seed";

/// A refresh_token account `chain` seeded from the file `rt`, whose seed the IdP knows.
fn chain_setup(idp: &FakeIdp, sb: &Sandbox, extra: &str) -> String {
    idp.seed_refresh_token(SEED);
    sb.write(&sb.path("rt"), &format!("{SEED}\n"), 0o600);
    let extra = format!(
        "grant_type = \"refresh_token\"\nrefresh_token = {{ file = \"rt\" }}\n\
         min_refresh_interval = \"1s\"\n{extra}"
    );
    format!(
        "{}{}",
        daemon_section(sb),
        account("chain", &idp.url(), &extra)
    )
}

#[test]
fn a_reload_during_a_refresh_token_request_keeps_the_rotated_refresh_token() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = sandbox();
    let text = chain_setup(&idp, &sb, "refresh_every = \"2s\"");
    let d = Daemon::start(&sb.config(&text));
    d.wait_until("the first token", SHORT, || sb.read("out/chain"));
    // The second refresh is slow; a reload comes while it is in flight.
    idp.push(Reply::slow(Duration::from_secs(2), Reply::token(3600)));
    wait_requests(&d, &idp, 2);
    let mode_only = text.replace(
        "path = \"out/chain\"\n",
        "path = \"out/chain\"\nmode = \"0640\"\n",
    );
    reload(&d, &sb, &mode_only);
    let third = wait_requests(&d, &idp, 3)[2].clone();
    let rotated = idp.refresh_issued();
    assert_eq!(
        third.refresh_token().as_deref(),
        Some(rotated[1].as_str()),
        "the next request presents what the slow answer rotated in: {:?}\n{}",
        idp.refresh_tokens_presented(),
        d.log()
    );
    wait_for_token_from(&d, &sb, &idp, "chain", 2);
    assert_chain_whole(&idp, SEED);
}

#[test]
fn sigterm_during_a_refresh_token_request_waits_for_the_answer_and_saves_it() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = sandbox();
    let cfg = sb.config(&chain_setup(&idp, &sb, "refresh_every = \"2s\""));
    let d = Daemon::start(&cfg);
    d.wait_until("the first token", SHORT, || sb.read("out/chain"));
    idp.push(Reply::slow(Duration::from_secs(2), Reply::token(3600)));
    wait_requests(&d, &idp, 2);
    let (status, took, log) = d.terminate();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        took < Duration::from_secs(10),
        "waited {took:?}, more than 10 s"
    );
    let rotated = idp.refresh_issued();
    assert_eq!(
        rotated.len(),
        2,
        "the slow answer rotated the refresh token"
    );

    // The restarted daemon refreshes with the refresh token the slow answer carried.
    let d = Daemon::start(&cfg);
    let third = wait_requests(&d, &idp, 3)[2].clone();
    assert_eq!(
        third.refresh_token().as_deref(),
        Some(rotated[1].as_str()),
        "the rotated refresh token was not saved before the daemon stopped: presented {:?}\n{log}",
        idp.refresh_tokens_presented()
    );
    wait_for_token_from(&d, &sb, &idp, "chain", 2);
    assert_chain_whole(&idp, SEED);
}

#[test]
fn once_next_to_run_takes_the_daemons_token_without_asking() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = sandbox();
    let cfg = sb.config(&chain_setup(&idp, &sb, ""));
    let d = Daemon::start(&cfg);
    // Both outputs: they are written one after the other.
    let token = d.wait_until("the daemon's token in both outputs", SHORT, || {
        sb.read("out/chain.json").and(sb.read("out/chain"))
    });
    // Outputs in /run vanish; an init container runs `once` while the daemon runs.
    std::fs::remove_file(sb.path("out/chain")).expect("remove the output");
    std::fs::remove_file(sb.path("out/chain.json")).expect("remove the json output");
    let out = once(&cfg, &[]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(
        sb.read("out/chain").as_deref(),
        Some(token.as_str()),
        "once wrote the daemon's token"
    );
    assert!(sb.read("out/chain.json").is_some());
    assert_eq!(
        idp.requests().len(),
        1,
        "once asked the provider while the daemon runs the account: presented {:?}",
        idp.refresh_tokens_presented()
    );
    assert_chain_whole(&idp, SEED);
    let (status, _, log) = d.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn a_changed_scope_keeps_the_refresh_token_chain() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = sandbox();
    let text = chain_setup(&idp, &sb, "scope = \"read\"");
    let d = Daemon::start(&sb.config(&text));
    d.wait_until("the first token", SHORT, || sb.read("out/chain"));
    reload(
        &d,
        &sb,
        &text.replace("scope = \"read\"", "scope = \"read write\""),
    );
    let second = wait_requests(&d, &idp, 2)[1].clone();
    assert_eq!(
        second.form().get("scope").map(String::as_str),
        Some("read write")
    );
    assert_eq!(
        second.refresh_token().as_deref(),
        Some(idp.refresh_issued()[0].as_str()),
        "the restarted account presents the rotated refresh token, not the seed"
    );
    wait_for_token_from(&d, &sb, &idp, "chain", 1);
    assert_chain_whole(&idp, SEED);
}

#[test]
fn a_removed_account_retires_its_state_and_resumes_the_chain_when_added_back() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = sandbox();
    // Refreshed every 2 s: added back, it asks soon even though its saved token is fresh.
    let text = chain_setup(&idp, &sb, "refresh_every = \"2s\"");
    let other = account("other", &idp.url(), "");
    let d = Daemon::start(&sb.config(&format!("{text}\n{other}")));
    d.wait_until("both tokens", SHORT, || {
        sb.read("out/chain").and(sb.read("out/other"))
    });

    // Removed: outputs go, the state moves to state/retired/.
    let without = format!("{}{other}", daemon_section(&sb));
    reload(&d, &sb, &without);
    d.wait_until("chain's outputs removed", SHORT, || {
        sb.read("out/chain").is_none().then_some(())
    });
    let retired = d.wait_until("chain's state in state/retired/", SHORT, || {
        std::fs::read_dir(sb.path("state/retired"))
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("chain"))
    });
    assert!(
        sb.path("state/retired").join(&retired).is_file(),
        "{retired} is a file"
    );

    // Retired: the account asks nothing more. Its last rotated refresh token is the one
    // to resume from.
    let asked = idp.refresh_tokens_presented().len();
    let last_rotated = idp.refresh_issued().last().cloned();

    // Added back: the chain resumes from the rotated refresh token.
    reload(&d, &sb, &format!("{text}\n{other}"));
    let presented = d.wait_until("chain to ask again", LONG, || {
        idp.refresh_tokens_presented().get(asked).cloned()
    });
    assert_eq!(
        Some(presented),
        last_rotated,
        "the account added back presents its last rotated refresh token"
    );
    d.wait_until("chain's token", SHORT, || {
        sb.read("out/chain").filter(|t| idp.is_issued(t))
    });
    assert_chain_whole(&idp, SEED);
}

// ---- 4. local write failures ------------------------------------------------------

/// A tmpfs mounted on a directory; unmounted when dropped.
pub(crate) struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (with a message) where mounting is not possible: not root, no privilege.
    pub(crate) fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: mounting a tmpfs needs root");
            return None;
        }
        std::fs::create_dir_all(dir).expect("create the mount point");
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: mount -t tmpfs failed (no CAP_SYS_ADMIN here?)");
            return None;
        }
        Some(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem of `path` with the file `path`, up to ENOSPC.
pub(crate) fn fill(path: &Path) {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).expect("create the filler");
    let chunk = [0u8; 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("failed to fill {}: {e}", path.display()),
        }
    }
    let _ = f.sync_all();
}

/// Waits until the account is `failing` with `os_error` in its status; asserts that
/// the provider was asked once, and returns the status. (That a failed write costs no
/// provider request however long it lasts is proven on a paused clock:
/// `inprocess::a_full_disk_costs_no_provider_request_for_as_long_as_it_lasts`.)
fn failing_locally(d: &Daemon, sb: &Sandbox, idp: &FakeIdp, os_error: &str) -> serde_json::Value {
    let status = d.wait_until(&format!("status failing with {os_error:?}"), LONG, || {
        let s = account_status(&socket(sb), "a")?;
        (s["status"] == "failing" && s["last_error"].as_str()?.contains(os_error)).then_some(s)
    });
    assert_eq!(
        idp.requests().len(),
        1,
        "a failed local write cost provider requests:\n{}",
        d.log()
    );
    status
}

#[test]
fn a_full_disk_costs_no_provider_request_and_the_same_token_lands_when_space_returns() {
    let sb = sandbox();
    let Some(_tmpfs) = Tmpfs::mount(&sb.path("out"), "16k") else {
        return;
    };
    fill(&sb.path("out/filler"));
    let idp = FakeIdp::start(Reply::token(3600));
    let d = Daemon::start(&sb.config(&format!(
        "{}{}",
        daemon_section(&sb),
        account("a", &idp.url(), "min_refresh_interval = \"1s\"")
    )));
    failing_locally(&d, &sb, &idp, "No space left on device");
    assert_eq!(sb.read("out/a"), None);

    std::fs::remove_file(sb.path("out/filler")).expect("remove the filler");
    let token = d.wait_until("the output once there is space", LONG, || sb.read("out/a"));
    assert_eq!(
        idp.issued(),
        [token],
        "the token fetched before is the one written"
    );
    assert_eq!(idp.requests().len(), 1, "still no second request");
}

#[test]
fn a_chown_without_privilege_costs_no_provider_request() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: switching to an unprivileged user needs root");
        return;
    }
    let sb = sandbox();
    let idp = FakeIdp::start(Reply::token(3600));
    // group 0: the unprivileged daemon is no member, so the chown gets EPERM.
    let extra = "min_refresh_interval = \"1s\"";
    let text = format!("{}{}", daemon_section(&sb), account("a", &idp.url(), extra)).replacen(
        "path = \"out/a\"\n",
        "path = \"out/a\"\ngroup = \"0\"\n",
        1,
    );
    let cfg = sb.config(&text);
    std::fs::create_dir(sb.path("out")).expect("create out/");
    // The sandbox belongs to the unprivileged user the daemon runs as.
    let nobody = nix::unistd::Uid::from_raw(65534);
    let nogroup = nix::unistd::Gid::from_raw(65534);
    for entry in [sb.path(""), sb.path("secret"), sb.path("out"), cfg.clone()] {
        nix::unistd::chown(&entry, Some(nobody), Some(nogroup)).expect("chown the sandbox");
    }
    let mut cmd = crate::support::tokend_via(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]);
    cmd.arg("run").arg("-c").arg(&cfg);
    let d = Daemon::spawn(cmd);
    failing_locally(&d, &sb, &idp, "Operation not permitted");
    assert_eq!(sb.read("out/a"), None, "no output with the wrong group");
}

// ---- 5. absurd expiries -------------------------------------------------------------

fn an_absurd_expiry_is_capped(expiry: Expiry) {
    let idp = FakeIdp::start(Reply::token_with(expiry.clone()));
    let sb = sandbox();
    let d = Daemon::start(&sb.config(&format!(
        "{}{}",
        daemon_section(&sb),
        account("a", &idp.url(), "")
    )));
    let json = d.wait_until("the json output", SHORT, || sb.read("out/a.json"));
    let raw = sb.read("out/a").expect("the raw output is written first");
    assert!(idp.is_issued(&raw), "{expiry:?}: out/a holds {raw:?}");
    let cap = SystemTime::now() + Duration::from_secs(366 * 24 * 3600);
    let at = expires_at(&json);
    assert!(
        at <= cap,
        "{expiry:?}: expires_at {json} is more than a year away"
    );
    // Published after the outputs are written: wait until the attempt is over.
    let status = d.wait_until("the attempt to be published", SHORT, || {
        account_status(&socket(&sb), "a")
            .filter(|s| s["status"] != "refreshing" && s["status"] != "pending")
    });
    assert_eq!(status["status"], "fresh", "{expiry:?}: {status}");
    let health = socket_get(&socket(&sb), "/v1/health");
    assert_eq!(
        health.as_ref().map(|h| h.0),
        Some(200),
        "{expiry:?}: {health:?}\n{}",
        d.log()
    );
    assert_eq!(idp.requests().len(), 1, "{expiry:?}: no request loop");
}

#[test]
fn an_expires_in_string_of_u64_max_is_capped_at_a_year() {
    an_absurd_expiry_is_capped(Expiry::InString(u64::MAX));
}

#[test]
fn a_jwt_exp_of_1e20_is_capped_at_a_year() {
    an_absurd_expiry_is_capped(Expiry::JwtExp(1e20));
}

#[test]
fn an_expires_in_past_year_9999_is_capped_at_a_year() {
    an_absurd_expiry_is_capped(Expiry::In(300_000_000_000));
}

// ---- 6. rate-limit caps and what is no rate limit -----------------------------------

#[test]
fn a_retry_after_in_year_9999_waits_at_most_an_hour_also_after_a_restart() {
    let idp = FakeIdp::start(Reply::token(3600));
    idp.push(Reply::RetryAfterDate(YEAR_9999.to_owned()));
    let sb = sandbox();
    let cfg = sb.config(&format!(
        "{}{}",
        daemon_section(&sb),
        account("a", &idp.url(), "min_refresh_interval = \"1s\"")
    ));
    let within_an_hour = |d: &Daemon| {
        let mut seen = serde_json::Value::Null;
        let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            d.wait_until("the next attempt in the status", SHORT, || {
                seen = account_status(&socket(&sb), "a")?;
                next_attempt(&seen)
            })
        }))
        .unwrap_or_else(|_| panic!("no next attempt in the status: {seen}"));
        let status = &seen;
        let cap = SystemTime::now() + Duration::from_secs(3600) + Duration::from_secs(5);
        assert!(
            next <= cap,
            "the next attempt is over an hour away: {status}"
        );
    };
    let d = Daemon::start(&cfg);
    wait_requests(&d, &idp, 1);
    d.wait_until("the 429 in the status", SHORT, || {
        account_status(&socket(&sb), "a")?["last_error"]
            .as_str()
            .map(|_| ())
    });
    within_an_hour(&d);
    let (status, _, log) = d.terminate();
    assert!(status.success(), "{log}");

    let d = Daemon::start(&cfg);
    within_an_hour(&d);
    assert_eq!(
        idp.requests().len(),
        1,
        "the restarted daemon honours the (capped) wait"
    );
}

fn okta_reset_on_a_non_429_is_transient(reply: Reply) {
    let idp = FakeIdp::start(Reply::token(3600));
    idp.push(Reply::with_okta_reset(600, reply));
    let sb = sandbox();
    let d = Daemon::start(&sb.config(&format!(
        "{}{}",
        daemon_section(&sb),
        account("a", &idp.url(), "min_refresh_interval = \"1s\"")
    )));
    let reqs = wait_requests(&d, &idp, 2);
    let gap = reqs[1].at - reqs[0].at;
    // Transient backoff starts at 1 s (full jitter), so well within 5 s; a rate limit
    // would have waited 10 minutes.
    assert!(
        gap < Duration::from_secs(5),
        "retried {gap:?} later:\n{}",
        d.log()
    );
    d.wait_until("the token", SHORT, || sb.read("out/a"));
}

#[test]
fn a_500_with_oktas_reset_header_is_no_rate_limit() {
    okta_reset_on_a_non_429_is_transient(Reply::Status(500));
}

#[test]
fn invalid_scope_with_oktas_reset_header_is_no_rate_limit() {
    okta_reset_on_a_non_429_is_transient(Reply::InvalidScope);
}

// ---- 7. a reload that cannot start an account is refused as a whole -----------------

#[test]
fn a_reload_whose_changed_account_cannot_start_is_refused_as_a_whole() {
    let idp = FakeIdp::start(Reply::token(2));
    let sb = sandbox();
    let extra = "min_refresh_interval = \"1s\"";
    let partner = account("partner", &idp.url(), extra);
    let text = format!("{}{partner}", daemon_section(&sb));
    let d = Daemon::start(&sb.config(&text));
    let before = d.wait_until("partner's token", SHORT, || sb.read("out/partner"));

    // Two changes in one reload: partner gets a CA file that does not exist, and a new
    // account comes. Neither applies.
    let broken = partner.replace(
        "min_refresh_interval",
        "ca_file = \"missing.pem\"\nmin_refresh_interval",
    );
    let newcomer = account("newcomer", &idp.url(), "");
    let since = d.wait_until("the daemon's socket", SHORT, || {
        crate::support::daemon_info(&socket(&sb))
    });
    let reloaded = Instant::now();
    reload(
        &d,
        &sb,
        &format!("{}{broken}\n{newcomer}", daemon_section(&sb)),
    );
    let outcome = crate::support::wait_reload(&d, &socket(&sb), &since);
    assert_eq!(outcome["last_reload"]["result"], "refused", "{outcome}");
    let errors = outcome["last_reload"]["errors"].to_string();
    assert!(
        errors.contains("partner") && errors.contains("missing.pem"),
        "the refusal names the account and its problem: {errors}"
    );

    // partner keeps its outputs and goes on refreshing with its old settings.
    let later = d.wait_until("partner to refresh after the refused reload", LONG, || {
        let t = sb.read("out/partner")?;
        (t != before && requests_after(&idp, reloaded) > 0).then_some(t)
    });
    assert!(idp.is_issued(&later));
    assert!(
        idp.requests()
            .iter()
            .all(|r| r.basic().is_some_and(|b| b.starts_with("id-partner:"))),
        "the new account did not start"
    );
    assert_eq!(sb.read("out/newcomer"), None);
}

// ---- 8. expired outputs after a restart ---------------------------------------------

#[test]
fn expired_outputs_are_removed_after_a_restart_while_the_provider_fails() {
    let idp = FakeIdp::start(Reply::token(2));
    let sb = sandbox();
    let cfg = sb.config(&format!(
        "{}{}",
        daemon_section(&sb),
        account("a", &idp.url(), "min_refresh_interval = \"1s\"")
    ));
    let d = Daemon::start(&cfg);
    d.wait_until("the json output", SHORT, || sb.read("out/a.json"));
    let (status, _, log) = d.terminate();
    assert!(status.success(), "{log}");
    // What the outputs hold now, after the last rotation before the stop.
    let json = sb
        .read("out/a.json")
        .expect("token files are kept on SIGTERM");
    let expiry = expires_at(&json);

    idp.set_default(Reply::Status(500));
    crate::support::wait_until("the token to expire", LONG, || {
        // expires_at is in whole seconds, perhaps cut down: a second more.
        (SystemTime::now() > expiry + Duration::from_millis(1100)).then_some(())
    });
    let d = Daemon::start(&cfg);
    d.wait_until("the expired outputs to be removed", LONG, || {
        (sb.read("out/a").is_none() && sb.read("out/a.json").is_none()).then_some(())
    });
}

// ---- 9. once honours a saved rate-limit wait ----------------------------------------

#[test]
fn once_honours_a_rate_limit_wait_saved_by_an_earlier_run() {
    let idp = FakeIdp::start(Reply::token(3600));
    idp.push(Reply::RetryAfter(600));
    let sb = sandbox();
    let cfg = sb.config(&format!(
        "[daemon]\nstate_dir = \"state\"\n{}",
        account("a", &idp.url(), "")
    ));
    let first = once(&cfg, &[]);
    assert_eq!(first.code(), Some(1), "{}", first.stderr);
    assert_eq!(idp.requests().len(), 1);

    let second = once(&cfg, &[]);
    assert_eq!(second.code(), Some(1), "{}", second.stderr);
    assert_eq!(
        idp.requests().len(),
        1,
        "the second once asked within the saved wait"
    );
    assert!(
        second.stderr.to_lowercase().contains("wait"),
        "the message says it waits: {}",
        second.stderr
    );
}
