//! The refresh schedule of one account's real task, on tokio's paused clock, against a
//! scripted endpoint: when it refreshes, how it backs off, how long a refused credential
//! holds it, what it publishes while failing. Times are exact here: a paused clock only
//! moves to the next timer.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokend::clock::Clock;

use tokend::account::Status;
use tokio::time::Instant;

use crate::support::scripted::{Running, Step};

const HOUR: Duration = Duration::from_secs(3600);

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

const MIN: Duration = secs(60);

/// Asserts `gap` is `nominal`, or up to 5% (the refresh jitter) sooner.
fn assert_jittered(gap: Duration, nominal: Duration) {
    assert!(
        gap <= nominal && gap >= nominal.mul_f64(0.95),
        "{gap:?} is not within 5% below {nominal:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn refresh_happens_at_refresh_ratio_of_the_lifetime() {
    let r = Running::start("refresh_ratio = 0.8", Step::Token(secs(1000)), []);
    let calls = r.endpoint.wait_calls(6).await;
    assert_eq!(calls[0], r.started, "the first request goes out at once");
    let gaps = Running::gaps(&calls);
    for gap in &gaps {
        assert_jittered(*gap, secs(800));
    }
    assert!(
        gaps.iter().any(|g| *g != gaps[0]),
        "the jitter varies: {gaps:?}"
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn refresh_happens_at_refresh_every_when_that_is_sooner() {
    // A day-long token: refresh_every (25 min) is sooner than 80% of the lifetime.
    let r = Running::start("refresh_every = \"25m\"", Step::Token(secs(24 * 3600)), []);
    for gap in Running::gaps(&r.endpoint.wait_calls(4).await) {
        assert_jittered(gap, 25 * MIN);
    }
    r.stop().await;

    // A 30-min token: 80% of it (24 min) is sooner than refresh_every.
    let r = Running::start("refresh_every = \"25m\"", Step::Token(30 * MIN), []);
    for gap in Running::gaps(&r.endpoint.wait_calls(4).await) {
        assert_jittered(gap, 24 * MIN);
    }
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn refresh_is_never_sooner_than_min_refresh_interval() {
    let r = Running::start("min_refresh_interval = \"30s\"", Step::Token(secs(10)), []);
    for gap in Running::gaps(&r.endpoint.wait_calls(4).await) {
        assert_eq!(gap, secs(30));
    }
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn refresh_now_waits_for_min_refresh_interval_and_pokes_coalesce() {
    let r = Running::start("min_refresh_interval = \"30s\"", Step::Token(60 * MIN), []);
    r.wait_state("the first token", |s| s.status == Status::Fresh)
        .await;
    for _ in 0..3 {
        r.handle.view.refresh_now();
    }
    let calls = r.endpoint.wait_calls(3).await;
    assert_eq!(
        calls[1] - calls[0],
        secs(30),
        "asked for at once, refreshed after min_refresh_interval"
    );
    assert_jittered(calls[2] - calls[1], 48 * MIN);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_exponentially_with_full_jitter_capped_at_5_minutes() {
    const CALLS: usize = 16;
    let r = Running::start("", Step::ServerError, []);
    let calls = r.endpoint.wait_calls(CALLS).await;
    let gaps = Running::gaps(&calls);
    let mut fractions = Vec::new();
    for (i, gap) in gaps.iter().enumerate() {
        // After the n-th failure in a row: uniform in [0, min(5 min, 1 s x 2^(n-1))],
        // with a floor against a hot loop.
        let ceiling = secs(1 << i).min(5 * MIN);
        assert!(
            *gap <= ceiling && *gap >= Duration::from_millis(100),
            "after failure {}: {gap:?}, ceiling {ceiling:?}",
            i + 1
        );
        fractions.push(gap.as_secs_f64() / ceiling.as_secs_f64());
    }
    // Full jitter, not a fixed fraction of the ceiling (each of these fails by chance
    // with a probability far below 1e-9).
    assert!(fractions.iter().any(|f| *f < 0.9), "{fractions:?}");
    assert!(fractions.iter().any(|f| *f > 0.1), "{fractions:?}");
    let capped: Duration = gaps[9..].iter().sum();
    assert!(capped > 2 * MIN, "the steps grew to minutes: {gaps:?}");
    let state = r.state();
    assert_eq!(state.failures as usize, CALLS);
    assert_eq!(state.status, Status::Failing);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_backoff() {
    let mut queue = vec![Step::ServerError; 8];
    queue.extend([Step::Token(10 * MIN), Step::ServerError]);
    let r = Running::start("", Step::Token(10 * MIN), queue);
    let calls = r.endpoint.wait_calls(11).await;
    let gaps = Running::gaps(&calls);
    assert_jittered(gaps[8], 8 * MIN);
    assert!(
        gaps[9] <= secs(1),
        "the first failure after a success backs off from 1 s again: {gaps:?}"
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn invalid_grant_holds_for_15_minutes() {
    let r = Running::start("", Step::Token(60 * MIN), [Step::InvalidGrant]);
    let s = r
        .wait_state("the refusal", |s| {
            s.failures == 1 && s.status == Status::Failing
        })
        .await;
    assert!(
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("invalid_grant")),
        "{s:?}"
    );
    // Asking does not shorten the hold: a wrong password must not lock the account.
    r.handle.view.refresh_now();
    let calls = r.endpoint.wait_calls(2).await;
    assert_eq!(
        calls[1] - calls[0],
        15 * MIN,
        "exactly one request in the hold"
    );
    r.wait_state("the token after the hold", |s| s.status == Status::Fresh)
        .await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn invalid_client_holds_for_auth_failure_hold_doubled_on_each_further_refusal() {
    let r = Running::start(
        "auth_failure_hold = \"2m\"",
        Step::Token(60 * MIN),
        [
            Step::InvalidClient,
            Step::InvalidClient,
            Step::InvalidClient,
        ],
    );
    let calls = r.endpoint.wait_calls(4).await;
    assert_eq!(Running::gaps(&calls), [2 * MIN, 4 * MIN, 8 * MIN]);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_token_stays_published_through_failures_until_it_expires() {
    let lifetime = secs(100);
    let r = Running::start("", Step::ServerError, [Step::Token(lifetime)]);
    let first = r
        .wait_state("the first token", |s| s.status == Status::Fresh)
        .await;
    let token = first.token.clone().expect("a fresh state holds a token");
    let expires = r.started + lifetime;

    // Every state published before the expiry still holds the token: record them all,
    // up to the first one published after it.
    let watcher = tokio::spawn({
        let mut rx = r.handle.view.state.clone();
        async move {
            let mut seen: Vec<(Instant, Status, Option<String>)> = Vec::new();
            while rx.changed().await.is_ok() {
                let s = rx.borrow_and_update().clone();
                let t = s.token.map(|t| t.access_token.expose().to_owned());
                seen.push((Instant::now(), s.status, t));
                if Instant::now() >= expires {
                    break;
                }
            }
            seen
        }
    });

    let failing = r.wait_state("a failure", |s| s.failures >= 1).await;
    assert!(Instant::now() < expires);
    assert_eq!(failing.status, Status::Failing);
    assert_eq!(failing.token.as_ref(), Some(&token));
    assert!(failing.valid_token(r.clock.now()).is_some());

    let expired = r
        .wait_state("the expiry", |s| s.status == Status::Expired)
        .await;
    assert!(Instant::now() >= expires, "not expired before its time");
    assert!(expired.valid_token(r.clock.now()).is_none());

    let seen = watcher.await.expect("the watcher does not panic");
    assert!(seen.len() >= 3, "{seen:?}");
    for (at, status, t) in seen.iter().filter(|(at, ..)| *at < expires) {
        assert_eq!(
            t.as_deref(),
            Some(token.access_token.expose()),
            "at {:?}",
            *at - r.started
        );
        assert_ne!(*status, Status::Expired, "at {:?}", *at - r.started);
    }
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_on_429_delays_the_next_try_at_least_that_long() {
    let r = Running::start(
        "",
        Step::Token(60 * MIN),
        [Step::RetryAfter(secs(120)), Step::RetryAfter(30 * MIN)],
    );
    let gaps = Running::gaps(&r.endpoint.wait_calls(3).await);
    assert!(gaps[0] >= secs(120), "{gaps:?}");
    assert!(gaps[1] >= 30 * MIN, "{gaps:?}");
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stopping_cancels_a_request_that_hangs() {
    let r = Running::start("", Step::Hang, []);
    r.endpoint.wait_calls(1).await;
    r.wait_state("the request under way", |s| s.status == Status::Refreshing)
        .await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_refresh_due_during_a_suspend_happens_on_resume() {
    // While the machine sleeps the wall clock runs on and the monotonic one stands still:
    // the token's refresh falls due "during" the sleep and must happen at once on resume.
    static SKEW_MS: AtomicU64 = AtomicU64::new(0);
    let clock = Clock::tokio_with_skew(&SKEW_MS);
    let run = Running::start_with_clock("", Step::Token(HOUR), [], clock);
    run.endpoint.wait_calls(1).await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    SKEW_MS.store(HOUR.as_millis() as u64, Ordering::Relaxed);
    let resumed = Instant::now();
    let calls = run.endpoint.wait_calls(2).await;
    let after = calls[1] - resumed;
    assert!(
        after <= Duration::from_secs(30),
        "refreshed {after:?} after resume, not at once"
    );
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_wall_clock_set_by_hours_neither_refreshes_nor_expires_a_valid_token() {
    // The wall clock set (by hand, or stepped by NTP) moves neither the monotonic nor
    // the boot clock: the token has the lifetime the provider gave it, in real seconds.
    static SLEPT_MS: AtomicU64 = AtomicU64::new(0);
    static SET_MS: AtomicI64 = AtomicI64::new(0);
    let clock = Clock::tokio_with(&SLEPT_MS, &SET_MS);
    let r = Running::start_with_clock("refresh_ratio = 0.8", Step::Token(HOUR), [], clock);
    r.endpoint.wait_calls(1).await;
    let first = r
        .wait_state("the first token", |s| s.status == Status::Fresh)
        .await
        .token
        .expect("a token");
    tokio::time::sleep(10 * MIN).await;

    let five_hours: i64 = 5 * 3600 * 1000;
    SET_MS.store(five_hours, Ordering::Relaxed);
    let ahead = r
        .wait_state("the token timed anew, five hours later", |s| {
            s.token
                .as_ref()
                .is_some_and(|t| t.expires_at > first.expires_at + 4 * HOUR)
        })
        .await;
    assert_eq!(ahead.status, Status::Fresh, "served on");
    let t = ahead.token.unwrap();
    let moved = t.expires_at.duration_since(first.expires_at).unwrap();
    assert!(
        moved.abs_diff(5 * HOUR) <= secs(2),
        "moved by as much as the clock: {moved:?}"
    );
    assert_eq!(t.access_token, first.access_token, "the same token");

    SET_MS.store(-five_hours, Ordering::Relaxed);
    let behind = r
        .wait_state("the token timed anew, five hours earlier", |s| {
            s.token
                .as_ref()
                .is_some_and(|t| t.expires_at + 4 * HOUR < first.expires_at)
        })
        .await;
    assert_eq!(behind.status, Status::Fresh, "served on");
    assert_eq!(r.endpoint.calls().len(), 1, "no request for either jump");

    // Refreshed at 80% of the lifetime, as if nobody had touched the clock.
    let calls = r.endpoint.wait_calls(2).await;
    assert_jittered(calls[1] - calls[0], 48 * MIN);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_account_whose_task_panics_is_restarted_with_backoff_and_serves_again() {
    let r = Running::start("", Step::Token(HOUR), [Step::Panic]);
    let failing = r
        .wait_state("the task's death published", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("restarting"))
        })
        .await;
    assert_eq!(failing.status, Status::Failing);
    assert!(
        failing.last_error.unwrap().contains("scripted panic"),
        "the cause is told"
    );
    let fresh = r
        .wait_state("a token from the restarted task", |s| {
            s.status == Status::Fresh
        })
        .await;
    assert!(fresh.token.is_some());
    let calls = r.endpoint.calls();
    assert_eq!(calls.len(), 2, "one request that died, one that served");
    assert!(
        calls[1] - calls[0] >= secs(1),
        "restarted with backoff, not in a hot loop: {:?}",
        calls[1] - calls[0]
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_waiting_account_has_no_task_and_wakes_for_its_plan_a_poke_and_a_stop() {
    // Issue #11: ten thousand accounts wait in a few hundred bytes each, not a task each.
    let r = Running::start("refresh_every = \"10m\"", Step::Token(HOUR), []);
    r.wait_state("the first token", |s| s.status == Status::Fresh)
        .await;
    r.wait_parked().await;

    // Its plan: the alarm starts its task again when the refresh falls due.
    let calls = r.endpoint.wait_calls(2).await;
    assert_jittered(calls[1] - calls[0], 10 * MIN);
    r.wait_parked().await;

    // A poke (after min_refresh_interval) does too.
    tokio::time::sleep(secs(60)).await;
    r.handle.view.refresh_now();
    let poked = Instant::now();
    let calls = r.endpoint.wait_calls(3).await;
    assert!(
        calls[2] - poked < secs(1),
        "asked {:?} after the poke",
        calls[2] - poked
    );
    r.wait_parked().await;

    // And a stop: its farewell runs (its state is handed on), then it is gone.
    let predecessor = r.handle.stop(false, Vec::new());
    r.wait_parked().await;
    assert!(predecessor.is_done(), "the stopped account's task finished");
    assert_eq!(r.endpoint.calls().len(), 3, "no request on the way out");
}
