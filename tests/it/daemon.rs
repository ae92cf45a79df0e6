//! `tokend run` against the fake IdP, in real time: outputs rewritten on every rotation,
//! failures that leave the last token in place, expiry, SIGTERM, torn reads, secrets
//! kept out of the log, stale temporary files. Schedules are shortened through the
//! config (`refresh_every`, `min_refresh_interval`); every wait is for a state: the
//! outputs, or the account on the daemon's socket (`/v1/tokens`). The log is waited on
//! only where it is what the test checks.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::support::fake_idp::{Expiry, FakeIdp, Reply};
use crate::support::{account_status, metric, read, Daemon, Sandbox, LONG, SHORT};

/// One account `a` with `extra` config lines and a raw output `tok`, served on the
/// socket `tokend.sock` beside the config.
fn config(url: &str, extra: &str) -> String {
    format!(
        "[daemon]\nlog_level = \"debug\"\nsocket = \"tokend.sock\"\nstate_dir = \"state\"\n\n\
         [[account]]\nname = \"a\"\ntoken_url = \"{url}\"\n\
         client_id = \"id\"\nclient_secret = \"secret\"\n{extra}\n\
         [[account.output]]\npath = \"tok\"\n"
    )
}

/// Waits until account `a`, as `GET /v1/tokens` on the daemon's socket shows it, is
/// what `f` looks for; returns what `f` returned.
fn wait_for_account<T>(
    d: &Daemon,
    sandbox: &Sandbox,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut(&serde_json::Value) -> Option<T>,
) -> T {
    let socket = sandbox.path("tokend.sock");
    d.wait_until(what, timeout, || f(&account_status(&socket, "a")?))
}

/// Waits until the output `name` holds its first token, and returns it.
fn first_token(d: &Daemon, sandbox: &Sandbox, name: &str) -> String {
    d.wait_until(&format!("{name} to be written"), SHORT, || {
        sandbox.read(name)
    })
}

#[test]
fn run_rewrites_every_output_with_each_new_token() {
    let idp = FakeIdp::start(Reply::token(2));
    let sandbox = Sandbox::new();
    let extra = "min_refresh_interval = \"1s\"\n\
                 [[account.output]]\npath = \"tok.json\"\nformat = \"json\"\nmode = \"0640\"\n\
                 [[account.output]]\npath = \"tok.env\"\nformat = \"env\"\n\
                 [[account.output]]\npath = \"tok.header\"\nformat = \"header\"\n";
    let d = Daemon::start(&sandbox.config(&config(&idp.url(), extra)));

    let mut seen: Vec<String> = Vec::new();
    for _ in 0..3 {
        let token = d.wait_until("every output to hold a new token", LONG, || {
            let raw = sandbox.read("tok")?;
            assert!(idp.is_issued(&raw), "tok holds {raw:?}, never issued");
            if seen.contains(&raw) {
                return None;
            }
            // The outputs are written one after another: wait until all agree.
            let json: serde_json::Value =
                serde_json::from_str(&sandbox.read("tok.json")?).expect("the json output is JSON");
            let agree = json["access_token"] == raw.as_str()
                && sandbox.read("tok.env")? == format!("A_TOKEN={raw}\n")
                && sandbox.read("tok.header")? == format!("Authorization: Bearer {raw}\n");
            agree.then_some(raw)
        });
        seen.push(token);
    }
    let issued = idp.issued();
    let order: Vec<_> = seen
        .iter()
        .map(|t| issued.iter().position(|i| i == t).unwrap())
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "newer tokens replace older ones: {order:?}"
    );
    assert_eq!(sandbox.mode("tok"), 0o600);
    assert_eq!(sandbox.mode("tok.json"), 0o640);
}

#[test]
fn run_keeps_the_last_token_while_the_idp_fails_then_recovers() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sandbox = Sandbox::new();
    let extra = "refresh_every = \"1s\"\nmin_refresh_interval = \"1s\"\ntimeout = \"1s\"\n";
    let d = Daemon::start(&sandbox.config(&config(&idp.url(), extra)));
    let t1 = first_token(&d, &sandbox, "tok");
    // The next refreshes meet a server error, garbage, and a provider that never answers.
    for reply in [Reply::Status(500), Reply::Malformed, Reply::Hang] {
        idp.push(reply);
    }

    let t2 = d.wait_until("a new token after the failures", LONG, || {
        let now = sandbox
            .read("tok")
            .expect("the token stays in place while failing");
        if now == t1 {
            return None;
        }
        assert!(idp.is_issued(&now), "tok holds {now:?}, never issued");
        Some(now)
    });

    let issued = idp.issued();
    assert_eq!(issued[..2], [t1, t2], "no token between the two");
    let requests = idp.requests();
    assert_eq!(requests.len(), 5, "token, 500, malformed, hang, token");
    // The hanging request was given up after the account's timeout, not sooner.
    let after_hang = requests[4].at - requests[3].at;
    assert!(after_hang >= Duration::from_millis(950), "{after_hang:?}");
    // Retries come after a backoff, never at once.
    for w in requests[1..].windows(2) {
        assert!(w[1].at - w[0].at >= Duration::from_millis(90));
    }
    // The socket serves it too, and the failures are forgotten. The recovery is logged
    // before it is published: the whole log, once the daemon stopped, tells all of it.
    wait_for_account(&d, &sandbox, "a fresh account again", SHORT, |a| {
        (a["status"] == "fresh" && a["last_error"].is_null()).then_some(())
    });
    let (status, _, log) = d.terminate();
    assert!(status.success(), "{status:?}\n{log}");
    for what in ["(recovered)", "HTTP 500", "malformed", "timed out after 1s"] {
        assert!(log.contains(what), "{what:?} not in the log:\n{log}");
    }
}

#[test]
fn run_backs_off_on_a_refused_connection_and_recovers_when_the_idp_returns() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sandbox = Sandbox::new();
    let extra = "refresh_every = \"1s\"\nmin_refresh_interval = \"1s\"\n";
    let d = Daemon::start(&sandbox.config(&config(&idp.url(), extra)));
    let t1 = first_token(&d, &sandbox, "tok");

    let closed = idp.stop();
    let error = wait_for_account(&d, &sandbox, "a failure to reach the IdP", LONG, |a| {
        let error = a["last_error"].as_str()?;
        (a["status"] == "failing").then(|| error.to_owned())
    });
    assert!(
        error.contains("failed to reach") && error.contains("Connection refused"),
        "refused, not some other failure: {error}"
    );
    assert_eq!(
        sandbox.read("tok"),
        Some(t1.clone()),
        "the last token stays"
    );

    let back = closed.reopen(Reply::token(3600));
    let t2 = d.wait_until("a token from the IdP that came back", LONG, || {
        let now = sandbox
            .read("tok")
            .expect("the token stays in place while failing");
        (now != t1).then_some(now)
    });
    assert!(
        back.is_issued(&t2),
        "{t2:?} comes from the IdP that came back"
    );
    let (status, _, log) = d.terminate();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        log.contains("failed to reach") && log.contains("Connection refused"),
        "the log tells the refusal:\n{log}"
    );
}

#[test]
fn the_refresh_token_grant_sends_the_rotated_refresh_token() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sandbox = Sandbox::new();
    let extra = "grant_type = \"refresh_token\"\nrefresh_token = \"rt-configured\"\n\
                 refresh_every = \"1s\"\nmin_refresh_interval = \"1s\"\n";
    let _d = Daemon::start(&sandbox.config(&config(&idp.url(), extra)));
    let requests = idp.wait_requests(3, LONG);
    let sent: Vec<_> = requests
        .iter()
        .map(|r| r.form()["refresh_token"].clone())
        .collect();
    let rotated = idp.refresh_issued();
    assert_eq!(
        sent,
        ["rt-configured", &rotated[0], &rotated[1]],
        "each request sends the refresh token the last answer rotated in"
    );
}

#[test]
fn a_429_waits_for_retry_after_and_for_oktas_rate_limit_reset() {
    let idp = FakeIdp::start(Reply::token(3600));
    idp.push(Reply::RetryAfter(1));
    idp.push(Reply::OktaReset(2));
    let sandbox = Sandbox::new();
    let d = Daemon::start(&sandbox.config(&config(&idp.url(), "")));
    let token = first_token(&d, &sandbox, "tok");
    assert_eq!(idp.issued(), [token]);

    let requests = idp.requests();
    assert_eq!(requests.len(), 3);
    let after_retry_after = requests[1].at - requests[0].at;
    assert!(
        after_retry_after >= Duration::from_millis(950),
        "Retry-After: 1 honoured: {after_retry_after:?}"
    );
    // The reset is in whole epoch seconds, 2 ahead: between 1 and 2 s away.
    let after_reset = requests[2].at - requests[1].at;
    assert!(
        after_reset >= Duration::from_millis(950),
        "X-Rate-Limit-Reset honoured: {after_reset:?}"
    );
}

#[test]
fn expired_token_outputs_are_removed_with_on_expiry_remove() {
    let idp = FakeIdp::start(Reply::Status(500));
    idp.push(Reply::token(2));
    let sandbox = Sandbox::new();
    let extra = "min_refresh_interval = \"1s\"\non_expiry = \"remove\"\n\
                 [[account.output]]\npath = \"tok.header\"\nformat = \"header\"\n";
    let d = Daemon::start(&sandbox.config(&config(&idp.url(), extra)));
    let t1 = first_token(&d, &sandbox, "tok");

    d.wait_until(
        "the outputs to go after the token expired",
        LONG,
        || match (sandbox.read("tok"), sandbox.read("tok.header")) {
            (None, None) => Some(()),
            (Some(t), _) => {
                assert_eq!(t, t1, "only the one token was issued");
                None
            }
            (None, Some(_)) => None,
        },
    );
    // Published (and logged before that) after the outputs are removed.
    wait_for_account(&d, &sandbox, "the account to show expired", SHORT, |a| {
        (a["status"] == "expired" && a["valid"] == false).then_some(())
    });
    assert!(
        idp.requests().len() >= 2,
        "a refresh was tried before the token expired"
    );
    assert_eq!(
        metric(
            &sandbox.path("tokend.sock"),
            "tokend_token_expirations_total{account=\"a\"}"
        ),
        Some(1.0),
        "one expiry counted"
    );
    let (status, _, log) = d.terminate();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("token expired without renewal"), "{log}");
}

#[test]
fn expired_token_outputs_stay_with_on_expiry_keep() {
    let idp = FakeIdp::start(Reply::Status(500));
    idp.push(Reply::token(2));
    let sandbox = Sandbox::new();
    let extra = "min_refresh_interval = \"1s\"\non_expiry = \"keep\"\n";
    let d = Daemon::start(&sandbox.config(&config(&idp.url(), extra)));
    let t1 = first_token(&d, &sandbox, "tok");

    wait_for_account(&d, &sandbox, "the account to show expired", LONG, |a| {
        (a["status"] == "expired" && a["valid"] == false).then_some(())
    });
    // `expired` is also what a failed attempt after the expiry publishes; the counter
    // tells that the expiry itself was handled, and its outputs kept.
    let socket = sandbox.path("tokend.sock");
    d.wait_until("the expiry handled", LONG, || {
        metric(&socket, "tokend_token_expirations_total{account=\"a\"}").filter(|v| *v >= 1.0)
    });
    assert_eq!(sandbox.read("tok"), Some(t1), "kept after expiry");
}

#[test]
fn sigterm_stops_run_within_a_second_and_keeps_token_files() {
    let idp = FakeIdp::start(Reply::Hang);
    idp.push(Reply::token(3600));
    let sandbox = Sandbox::new();
    let extra = "refresh_every = \"1s\"\nmin_refresh_interval = \"1s\"\n";
    let d = Daemon::start(&sandbox.config(&config(&idp.url(), extra)));
    let t1 = first_token(&d, &sandbox, "tok");
    // The second request hangs: SIGTERM arrives while the daemon waits on the provider.
    idp.wait_requests(2, LONG);

    let (status, took, log) = d.terminate();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        took < Duration::from_secs(1),
        "stopped after {took:?}\n{log}"
    );
    assert_eq!(sandbox.read("tok"), Some(t1), "token files are kept");
}

#[test]
fn readers_never_see_a_partial_or_empty_token_while_tokens_rotate() {
    const ROTATIONS: usize = 100;
    let idp = FakeIdp::start(Reply::Token {
        expiry: Expiry::In(1),
        len: 20..3000,
    });
    let sandbox = Sandbox::new();
    let extra = "refresh_every = \"20ms\"\nmin_refresh_interval = \"10ms\"\n\
                 [[account.output]]\npath = \"tok.header\"\nformat = \"header\"\n";
    let d = Daemon::start(&sandbox.config(&config(&idp.url(), extra)));
    // Written after tok.header (outputs are written in order): both exist from here on.
    first_token(&d, &sandbox, "tok");

    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + LONG;
    let reader = |name: &str, strip: fn(&str) -> Option<&str>| {
        let path = sandbox.path(name);
        let mut seen = HashSet::new();
        let mut reads = 0u64;
        while !stop.load(Ordering::Relaxed) && reads < 5_000_000 && Instant::now() < deadline {
            let text = read(&path)
                .unwrap_or_else(|| panic!("{name} vanished after {reads} reads\n{}", d.log()));
            let token = strip(&text).unwrap_or_else(|| panic!("{name}: malformed {text:?}"));
            assert!(
                !token.is_empty() && idp.is_issued(token),
                "{name}: read {} bytes that are no whole issued token: {text:?}\n{}",
                text.len(),
                d.log()
            );
            seen.insert(token.to_owned());
            reads += 1;
        }
        (seen.len(), reads)
    };
    let (raw, header) = std::thread::scope(|s| {
        let raw = s.spawn(|| reader("tok", |t| Some(t)));
        let header = s.spawn(|| {
            reader("tok.header", |t| {
                t.strip_prefix("Authorization: Bearer ")?.strip_suffix('\n')
            })
        });
        // Stops the readers also when this wait fails.
        let _stop = StopOnDrop(&stop);
        d.wait_until("the tokens to rotate", LONG, || {
            (idp.issued().len() > ROTATIONS || raw.is_finished() || header.is_finished())
                .then_some(())
        });
        stop.store(true, Ordering::Relaxed);
        // A reader's own failure is the one to report.
        let join = |h: std::thread::ScopedJoinHandle<'_, (usize, u64)>| {
            h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
        };
        let (raw, header) = (join(raw), join(header));
        (raw, header)
    });
    assert!(
        idp.issued().len() > ROTATIONS,
        "{} tokens issued",
        idp.issued().len()
    );
    // Each reader saw many rotations, not one file that stood still.
    for (name, (distinct, reads)) in [("tok", raw), ("tok.header", header)] {
        assert!(
            distinct >= ROTATIONS / 4,
            "{name}: {distinct} tokens in {reads} reads"
        );
    }
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Distinctive secret values, each searched for in the log.
const CLIENT_SECRET: &str = "cs-Zq8vLx3Kp0wE";
const CLIENT_SECRET_2: &str = "cs2-Hy5mWn7Rt1oP";
const PASSWORD: &str = "pw-Jf2kBd9Qs4aZ";
const REFRESH_TOKEN: &str = "rt-Vc6gNe1Ua8yX";

/// Runs two accounts (password grant with Basic; refresh_token grant with post and the
/// fields in the query) through rotations and an `invalid_client`, and returns the log.
fn log_through_rotations_and_a_failure(log_level: &str, env: &[(&str, &str)]) -> String {
    let idp = FakeIdp::start(Reply::InvalidClient);
    for _ in 0..6 {
        idp.push(Reply::token(3600));
    }
    let sandbox = Sandbox::new();
    sandbox.write(
        &sandbox.path("client-secret"),
        &format!("{CLIENT_SECRET}\n"),
        0o600,
    );
    let text = format!(
        r#"
[daemon]
log_level = "{log_level}"
log_format = "text"
state_dir = "state"
socket = "tokend.sock"

[defaults]
refresh_every = "1s"
min_refresh_interval = "1s"

[[account]]
name = "okta"
token_url = "{url}"
grant_type = "password"
client_id = "okta-id"
client_secret = {{ file = "client-secret" }}
username = "svc-account"
password = "{PASSWORD}"
scope = "api"

[[account.output]]
path = "okta"

[[account]]
name = "rt"
token_url = "{url}"
grant_type = "refresh_token"
client_id = "rt-id"
client_secret = "{CLIENT_SECRET_2}"
client_auth = "post"
params_in = "query"
refresh_token = {{ env = "TEST_REFRESH_TOKEN" }}

[[account.output]]
path = "rt"
format = "json"
"#,
        url = idp.url()
    );
    let mut env = env.to_vec();
    env.push(("TEST_REFRESH_TOKEN", REFRESH_TOKEN));
    let d = Daemon::start_with_env(&sandbox.config(&text), &env);
    // Both accounts got to the refusal: each had its rotations before.
    for name in ["okta", "rt"] {
        d.wait_until(&format!("{name} refused"), LONG, || {
            crate::support::account_status(&sandbox.path("tokend.sock"), name).filter(|a| {
                a["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("invalid_client"))
            })
        });
    }
    let (status, _, log) = d.terminate();
    assert!(status.success(), "{status:?}\n{log}");

    let issued = idp.issued();
    assert_eq!(issued.len(), 6);
    assert!(log.contains("token refreshed"), "{log}");
    assert!(log.contains("invalid_client"), "{log}");
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("okta-id:{CLIENT_SECRET}"));
    let mut secrets = vec![
        CLIENT_SECRET.to_owned(),
        CLIENT_SECRET_2.to_owned(),
        PASSWORD.to_owned(),
        REFRESH_TOKEN.to_owned(),
        basic,
    ];
    let rotated = idp.refresh_issued();
    assert!(
        !rotated.is_empty(),
        "the refresh_token grant got rotated refresh tokens"
    );
    secrets.extend(rotated);
    for t in &issued {
        // The whole token, and its tail (a cut-off token is a leak too).
        secrets.push(t.clone());
        secrets.push(t[t.len() - 20..].to_owned());
    }
    for s in &secrets {
        assert!(!log.contains(s.as_str()), "{s:?} is in the log:\n{log}");
    }
    log
}

#[test]
fn secrets_and_tokens_stay_out_of_the_log_with_rust_log_trace() {
    let log = log_through_rotations_and_a_failure("info", &[("RUST_LOG", "trace")]);
    assert!(log.contains("TRACE"), "RUST_LOG=trace took effect:\n{log}");
}

#[test]
fn secrets_and_tokens_stay_out_of_the_log_with_log_level_trace() {
    log_through_rotations_and_a_failure("trace", &[]);
}

#[test]
fn stale_temporary_files_are_removed_at_start() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sandbox = Sandbox::new();
    std::fs::create_dir(sandbox.path("tokens")).unwrap();
    let stale = [".tok.abc123.tokend-tmp", ".tok.Zz9.tokend-tmp"];
    let kept = [
        "other.txt",
        ".unrelated.abc123.tokend-tmp",
        "tok.abc123.tokend-tmp",
    ];
    for name in stale.iter().chain(&kept) {
        std::fs::write(sandbox.path(&format!("tokens/{name}")), "half a tok").unwrap();
    }
    let text = config(&idp.url(), "").replace("path = \"tok\"", "path = \"tokens/tok\"");
    let d = Daemon::start(&sandbox.config(&text));
    first_token(&d, &sandbox, "tokens/tok");

    for name in stale {
        assert!(
            !sandbox.path(&format!("tokens/{name}")).exists(),
            "{name} removed"
        );
    }
    for name in kept {
        assert!(
            sandbox.path(&format!("tokens/{name}")).exists(),
            "{name} kept"
        );
    }
}
