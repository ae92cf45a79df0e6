//! The daemon in-process: no binary, no socket, no log. Started, reloaded and stopped
//! through its API ([`tokend::daemon::Daemon`]), and asserted on what it publishes: its
//! own state (generation, last reload) and each account's.

use std::time::Duration;

use tokend::account::{Accounts, Status};
use tokend::daemon::Daemon;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::support::config::{account, daemon};
use crate::support::fake_idp::{FakeIdp, Reply};
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
async fn a_reload_is_applied_or_refused_as_the_daemon_publishes_it() {
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
    let stop = CancellationToken::new();
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
}
