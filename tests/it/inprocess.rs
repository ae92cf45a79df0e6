//! The daemon in process: no binary, no log. Started, told to reload and stopped
//! through its API ([`tokend::daemon::Daemon`] and its [`Control`] stream), and asserted
//! on what it publishes: its own state (generation, last reload) and each account's.
//! Where time matters it runs on tokio's paused clock against scripted endpoints, so
//! "nothing happens for 40 minutes" is proven exactly, in no time.

use std::time::Duration;

use tokend::account::{Accounts, Status};
use tokend::clock::Clock;
use tokend::daemon::{Control, Daemon, Wiring};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::support::config::{account, daemon};
use crate::support::fake_idp::{FakeIdp, Reply};
use crate::support::scripted::{ScriptedConnect, Step, VIRTUAL_DAY};
use crate::support::Sandbox;

const WAIT: Duration = Duration::from_secs(20);

fn config(sb: &Sandbox, accounts: &[(&str, &FakeIdp)]) -> String {
    let mut text = daemon(&sb.path("tokend.sock"), "state_dir = \"state\"");
    for (name, idp) in accounts {
        text.push_str(
            &account(name, &idp.url())
                .output(&format!("out/{name}"))
                .toml(),
        );
    }
    text
}

/// Waits until account `name` is published with `status`.
async fn wait_status(views: &mut watch::Receiver<Accounts>, name: &str, status: Status) {
    let view = timeout(WAIT, views.wait_for(|v| v.contains_key(name)))
        .await
        .unwrap_or_else(|_| panic!("account {name} never started"))
        .expect("the daemon publishes")[name]
        .clone();
    let mut state = view.state.clone();
    timeout(WAIT, state.wait_for(|s| s.status == status))
        .await
        .unwrap_or_else(|_| panic!("account {name} never {status:?}"))
        .expect("the account publishes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_is_applied_or_refused_as_the_daemon_publishes_it_on_the_socket_the_test_bound() {
    let (idp_a, idp_b) = (
        FakeIdp::start(Reply::token(3600)),
        FakeIdp::start(Reply::token(3600)),
    );
    let sb = Sandbox::new();
    sb.write(&sb.path("secret"), "s3cret", 0o600);
    let path = sb.config(&config(&sb, &[("a", &idp_a)]));
    let loaded = tokend::config::load(&path).expect("a valid config");

    let mut d = Daemon::new(loaded).expect("the daemon");
    d.start().await.expect("started");
    let (mut views, mut info) = (d.views(), d.info());
    // The socket API on a listener this test bound, served from what the daemon
    // publishes.
    let sock = sb.path("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    listener.set_nonblocking(true).expect("non-blocking");
    let stop = CancellationToken::new();
    let serving = tokio::spawn(tokend::server::serve_daemon(
        listener,
        d.views(),
        Some(d.info()),
        d.metrics(),
        stop.clone(),
        tokend::server::Limits::default(),
    ));
    let running = tokio::spawn({
        let stop = stop.clone();
        async move {
            d.run(stop).await;
            d.shutdown().await;
        }
    });
    wait_status(&mut views, "a", Status::Fresh).await;
    assert_eq!(info.borrow().generation, 1);
    assert_eq!(
        sb.read("out/a").as_deref(),
        Some(idp_a.issued()[0].as_str())
    );

    // Account b added (the file is replaced, as editors do): generation 2, b served.
    sb.config(&config(&sb, &[("a", &idp_a), ("b", &idp_b)]));
    let now = timeout(WAIT, info.wait_for(|i| i.generation == 2))
        .await
        .expect("the edit is seen and applied")
        .expect("the daemon publishes")
        .clone();
    assert_eq!(now.last_reload.as_ref().map(|r| r.errors.len()), Some(0));
    wait_status(&mut views, "b", Status::Fresh).await;
    assert_eq!(idp_a.requests().len(), 1, "a is not asked again");
    let on_socket = {
        let sock = sock.clone();
        tokio::task::spawn_blocking(move || crate::support::daemon_info(&sock))
            .await
            .expect("no panic")
            .expect("GET /v1/daemon answers")
    };
    assert_eq!(on_socket["generation"], 2, "{on_socket}");
    assert_eq!(on_socket["last_reload"]["result"], "ok", "{on_socket}");

    // A broken config is refused: the generation stays, the error is told, b serves on.
    sb.config("[[account]]\nname = \"a\"\n");
    let refused = timeout(
        WAIT,
        info.wait_for(|i| i.last_reload.as_ref().is_some_and(|r| !r.errors.is_empty())),
    )
    .await
    .expect("the broken edit is seen")
    .expect("the daemon publishes")
    .clone();
    assert_eq!(refused.generation, 2);
    let errors = refused.last_reload.clone().unwrap().errors.join("\n");
    assert!(
        errors.contains("token_url"),
        "names what is missing: {errors}"
    );
    assert!(views.borrow().contains_key("b"), "b runs on");
    assert_eq!(idp_b.requests().len(), 1);

    stop.cancel();
    timeout(WAIT, running)
        .await
        .expect("stops within the grace")
        .expect("no panic");
    timeout(WAIT, serving)
        .await
        .expect("the server stops")
        .expect("no panic")
        .expect("served");
}

/// The daemon on tokio's paused clock, against [`ScriptedConnect`], told what to do
/// through its control stream only (no signals, no file watch).
struct Paused {
    controls: mpsc::Sender<Control>,
    views: watch::Receiver<Accounts>,
    info: watch::Receiver<std::sync::Arc<tokend::daemon::DaemonState>>,
    stop: CancellationToken,
    running: tokio::task::JoinHandle<()>,
}

impl Paused {
    async fn start(path: &std::path::Path, connect: ScriptedConnect) -> Paused {
        let loaded = tokend::config::load(path).expect("a valid config");
        let (wiring, controls) = Wiring::new(Clock::tokio(), connect);
        let mut d = Daemon::wired(loaded, wiring.without_file_watch());
        d.start().await.expect("started");
        let (views, info) = (d.views(), d.info());
        let stop = CancellationToken::new();
        let running = tokio::spawn({
            let stop = stop.clone();
            async move {
                d.run(stop).await;
                d.shutdown().await;
            }
        });
        Paused {
            controls,
            views,
            info,
            stop,
            running,
        }
    }

    /// Tells the daemon `control` and waits until the config's generation is `n`.
    async fn reload_to(&mut self, control: Control, n: u64) {
        self.controls
            .send(control)
            .await
            .expect("the daemon listens");
        timeout(VIRTUAL_DAY, self.info.wait_for(|i| i.generation == n))
            .await
            .expect("the reload is applied")
            .expect("the daemon publishes");
    }

    fn status(&self, name: &str) -> (Status, Option<String>) {
        let s = self.views.borrow()[name].state.borrow().clone();
        (s.status, s.last_error.map(|e| e.to_string()))
    }

    async fn stop(self) {
        self.stop.cancel();
        self.running.await.expect("no panic");
    }
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_changes_one_of_20_accounts_asks_once_and_moves_no_other_schedule() {
    const N: usize = 20;
    const HOUR: Duration = Duration::from_secs(3600);
    let sb = Sandbox::new();
    sb.write(&sb.path("secret"), "s3cret", 0o600);
    let config = |changed: Option<usize>| {
        let mut text = daemon(&sb.path("tokend.sock"), "");
        for i in 0..N {
            let scope = match changed {
                Some(c) if c == i => format!("scope = \"s{i}-changed\""),
                _ => format!("scope = \"s{i}\""),
            };
            let a = account(&format!("a{i}"), "https://idp.invalid/token").with(&scope);
            text.push_str(&a.toml());
        }
        text
    };
    let path = sb.config(&config(None));
    let connect = ScriptedConnect::new(Step::Token(HOUR));
    let mut d = Paused::start(&path, connect.clone()).await;
    let started = tokio::time::Instant::now();
    for i in 0..N {
        connect.endpoint(&format!("a{i}")).wait_calls(1).await;
    }

    sb.config(&config(Some(7)));
    d.reload_to(Control::Reload, 2).await;
    connect.endpoint("a7").wait_calls(2).await;
    // 40 minutes on: nothing else was asked (the others' refreshes are due at 80% of
    // their hour, jittered by up to 5%: 45.6 to 48 minutes after their first).
    tokio::time::sleep_until(started + 40 * Duration::from_secs(60)).await;
    let calls: Vec<usize> = (0..N)
        .map(|i| connect.endpoint(&format!("a{i}")).calls().len())
        .collect();
    let mut want = vec![1; N];
    want[7] = 2;
    assert_eq!(
        calls, want,
        "requests per account 40 minutes after the reload"
    );
    // Their schedule was not moved by the reload: each refreshes by 48 minutes.
    for i in (0..N).filter(|i| *i != 7) {
        let calls = connect.endpoint(&format!("a{i}")).wait_calls(2).await;
        let gap = calls[1] - calls[0];
        assert!(
            gap <= 48 * Duration::from_secs(60) && gap >= Duration::from_secs(45 * 60 + 36),
            "a{i} refreshed {gap:?} after its first token"
        );
    }
    d.stop().await;
}

/// A wrong password is held for auth_failure_hold (it would lock the account); fixed in
/// its file, it is asked at once when the daemon hears of it through `control` (the file
/// watch's event, or SIGHUP where there is no watch).
async fn a_refused_password_is_held_until_fixed(control: Control) {
    let sb = Sandbox::new();
    sb.write(&sb.path("secret"), "s3cret", 0o600);
    sb.write(&sb.path("password"), "wrong-password\n", 0o600);
    let okta = account("okta", "https://idp.invalid/token")
        .with("grant_type = \"password\"\nusername = \"svc\"\npassword = { file = \"password\" }");
    let path = sb.config(&format!(
        "{}{}",
        daemon(&sb.path("tokend.sock"), ""),
        okta.toml()
    ));
    let connect = ScriptedConnect::new(Step::Token(Duration::from_secs(1800)));
    connect.script("okta", Clock::tokio(), [Step::InvalidGrant]);
    let mut d = Paused::start(&path, connect.clone()).await;
    let first = connect.endpoint("okta").wait_calls(1).await[0];

    // Held for auth_failure_hold (15 minutes): 14 minutes on, still one request.
    tokio::time::sleep_until(first + Duration::from_secs(14 * 60)).await;
    assert_eq!(connect.endpoint("okta").calls().len(), 1);
    let (status, error) = d.status("okta");
    assert_eq!(status, Status::Failing);
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("invalid_grant")),
        "{error:?}"
    );

    // The operator fixes the password: asked at once.
    sb.write(&sb.path("password"), "right-password\n", 0o600);
    let fixed = tokio::time::Instant::now();
    d.controls.send(control).await.expect("the daemon listens");
    let calls = connect.endpoint("okta").wait_calls(2).await;
    assert!(
        calls[1] - fixed < Duration::from_secs(1),
        "asked {:?} after the fix",
        calls[1] - fixed
    );
    let mut state = d.views.borrow()["okta"].state.clone();
    timeout(VIRTUAL_DAY, state.wait_for(|s| s.status == Status::Fresh))
        .await
        .expect("fresh with the right password")
        .expect("the account publishes");
    // The config is the same: a look at the files applies no new generation, a reload
    // one that changes no account.
    let generation = d.info.borrow().generation;
    assert_eq!(generation, if control == Control::Reload { 2 } else { 1 });
    d.reload_to(Control::Reload, generation + 1).await;
    assert_eq!(connect.endpoint("okta").calls().len(), 2);
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_refused_password_is_held_until_its_file_changes_then_asked_at_once() {
    a_refused_password_is_held_until_fixed(Control::FilesChanged).await;
}

#[tokio::test(start_paused = true)]
async fn a_refused_password_fixed_then_sighup_is_asked_at_once_without_a_file_watch() {
    a_refused_password_is_held_until_fixed(Control::Reload).await;
}

#[tokio::test(start_paused = true)]
async fn a_full_disk_costs_no_provider_request_for_as_long_as_it_lasts() {
    use crate::faults::{fill, Tmpfs};
    let sb = Sandbox::new();
    sb.write(&sb.path("secret"), "s3cret", 0o600);
    let Some(_tmpfs) = Tmpfs::mount(&sb.path("out"), "16k") else {
        return;
    };
    fill(&sb.path("out/filler"));
    let a = account("a", "https://idp.invalid/token").output("out/a");
    let path = sb.config(&format!(
        "{}{}",
        daemon(&sb.path("tokend.sock"), ""),
        a.toml()
    ));
    let connect = ScriptedConnect::new(Step::Token(Duration::from_secs(3600)));
    let d = Paused::start(&path, connect.clone()).await;
    let first = connect.endpoint("a").wait_calls(1).await[0];
    let mut state = d.views.borrow()["a"].state.clone();
    timeout(
        VIRTUAL_DAY,
        state.wait_for(|s| {
            s.status == Status::Failing
                && s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("No space left on device"))
        }),
    )
    .await
    .expect("failing on the full disk")
    .expect("the account publishes");

    // 40 minutes of a full disk (the write retried with backoff meanwhile): still the
    // one request; the token fetched is kept for when there is room.
    tokio::time::sleep_until(first + Duration::from_secs(40 * 60)).await;
    assert_eq!(connect.endpoint("a").calls().len(), 1);
    assert_eq!(sb.read("out/a"), None);

    std::fs::remove_file(sb.path("out/filler")).expect("remove the filler");
    // The next retry of the write (at most the backoff's 5 minutes away) succeeds.
    timeout(VIRTUAL_DAY, state.wait_for(|s| s.status == Status::Fresh))
        .await
        .expect("fresh once the token is written")
        .expect("the account publishes");
    assert_eq!(
        sb.read("out/a").as_deref(),
        Some("tok-1"),
        "the token fetched before"
    );
    assert_eq!(connect.endpoint("a").calls().len(), 1);
    d.stop().await;
}
