//! Cluster mode's building blocks against real etcd members (SPEC §8): the etcd client
//! (leases, guarded transactions as an election uses them, watches, failing over to
//! another member) and sealed records stored and read back through it.

use std::time::Duration;

use tokend::cluster::etcd::{Compare, Etcd, Event, Op};
use tokend::cluster::record::{ClusterKey, Place, Record};

use crate::support::etcd::EtcdCluster;

/// A portable state holding just a refresh token (opaque to these tests).
fn portable(rt: &str) -> tokend::account::persist::Portable {
    tokend::account::persist::Portable {
        token: None,
        refresh_token: Some(rt.into()),
        wait: None,
        refusals: 0,
        last_error: None,
        dpop_key: None,
    }
}

/// A record of generation `generation` fetched by `by`, holding refresh token `rt`.
fn record(generation: u64, by: &str, rt: &str) -> Record {
    Record {
        generation,
        fetched_by: by.into(),
        state: portable(rt),
        token_left_ms: None,
        written_at_ms: None,
        provider_offset_ms: None,
        seed: None,
        in_flight: None,
    }
}

fn client(endpoints: &[String]) -> Etcd {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    Etcd::new(
        http,
        endpoints.iter().map(|e| e.parse().unwrap()).collect(),
        None,
        Duration::from_secs(2),
        tokend::clock::Clock::System,
    )
}

#[tokio::test]
async fn an_election_key_has_one_holder_until_its_lease_goes() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let etcd = client(&cluster.endpoints());
    let key = "/t/accounts/a/x/leader";
    let (la, lb) = (
        etcd.grant(Duration::from_secs(5)).await.unwrap().0,
        etcd.grant(Duration::from_secs(5)).await.unwrap().0,
    );
    let campaign = |who: &'static str, lease: i64| {
        let etcd = &etcd;
        async move {
            etcd.txn(
                &[Compare::CreateRevision(key.into(), 0)],
                &[Op::Put {
                    key: key.into(),
                    value: who.as_bytes().to_vec(),
                    lease,
                }],
                &[Op::Get(key.into())],
            )
            .await
            .unwrap()
        }
    };
    assert!(campaign("a", la).await.succeeded);
    let lost = campaign("b", lb).await;
    assert!(!lost.succeeded);
    assert_eq!(lost.kvs[0].value, b"a", "the loser learns who leads");
    assert_eq!(lost.kvs[0].lease, la);
    assert!(etcd.keepalive(la).await.unwrap().is_some());

    // A write guarded by the lead fails once the lead is gone.
    let guarded = |lease: i64| {
        let etcd = &etcd;
        async move {
            etcd.txn(
                &[Compare::Lease(key.into(), lease)],
                &[Op::Put {
                    key: "/t/accounts/a/x/record".into(),
                    value: b"sealed".to_vec(),
                    lease: 0,
                }],
                &[],
            )
            .await
            .unwrap()
            .succeeded
        }
    };
    assert!(guarded(la).await);
    etcd.revoke(la).await.unwrap();
    assert!(
        etcd.get(key).await.unwrap().is_none(),
        "the lease took the key"
    );
    assert!(!guarded(la).await, "a deposed leader's write fails");
    assert!(campaign("b", lb).await.succeeded, "the next one takes over");
    assert!(
        etcd.keepalive(la).await.unwrap().is_none(),
        "a revoked lease stays gone"
    );
}

#[tokio::test]
async fn a_watch_sees_puts_and_deletes_under_its_prefix_only() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let etcd = std::sync::Arc::new(client(&cluster.endpoints()));
    let (_, rev) = etcd.get_prefix("/w/").await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let watcher = tokio::spawn({
        let etcd = etcd.clone();
        async move { etcd.watch(0, "/w/", rev + 1, &tx).await }
    });
    let put = |k: &'static str| {
        let etcd = etcd.clone();
        async move {
            etcd.txn(
                &[],
                &[Op::Put {
                    key: k.into(),
                    value: b"v".to_vec(),
                    lease: 0,
                }],
                &[],
            )
            .await
            .unwrap()
        }
    };
    put("/other").await;
    put("/w/a").await;
    etcd.txn(&[], &[Op::Delete("/w/a".into())], &[])
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let Event::Put(kv) = first else {
        panic!("{first:?}")
    };
    assert_eq!((kv.key.as_str(), kv.value.as_slice()), ("/w/a", &b"v"[..]));
    let second = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(second, Event::Delete { ref key, .. } if key == "/w/a"),
        "{second:?}"
    );
    watcher.abort();
}

#[tokio::test]
async fn calls_fail_over_to_a_member_that_answers() {
    let Some(mut cluster) = EtcdCluster::start(3) else {
        return;
    };
    let etcd = client(&cluster.endpoints());
    etcd.txn(
        &[],
        &[Op::Put {
            key: "/f/k".into(),
            value: b"1".to_vec(),
            lease: 0,
        }],
        &[],
    )
    .await
    .unwrap();
    cluster.kill(0);
    let kv = etcd
        .get("/f/k")
        .await
        .unwrap()
        .expect("read through another member");
    assert_eq!(kv.value, b"1");
    cluster.kill(1);
    assert!(
        etcd.get("/f/k").await.is_err(),
        "one member of three has no quorum: an error, not a stale answer"
    );
    cluster.restart(1);
    cluster.wait_healthy(Duration::from_secs(30));
    assert_eq!(etcd.get("/f/k").await.unwrap().unwrap().value, b"1");
}

#[tokio::test]
async fn a_sealed_record_round_trips_through_etcd_and_shows_no_token() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let etcd = client(&cluster.endpoints());
    let key = ClusterKey::from_hex(&"ab".repeat(32)).unwrap();
    let at = "/s/accounts/a/x/record";
    let record = record(1, "host-a", "tok-in-etcd rt-in-etcd");
    // A new key: created at the put's revision, version 1.
    let (_, rev) = etcd.get_prefix("/s/").await.unwrap();
    let place = Place {
        create_revision: rev + 1,
        version: 1,
    };
    let sealed = key.seal(at, place, &record);
    etcd.txn(
        &[],
        &[Op::Put {
            key: at.into(),
            value: sealed,
            lease: 0,
        }],
        &[],
    )
    .await
    .unwrap();
    let stored = etcd.get(at).await.unwrap().unwrap();
    let raw = String::from_utf8_lossy(&stored.value).into_owned();
    assert!(!raw.contains("tok-in-etcd") && !raw.contains("rt-in-etcd"));
    let found = Place {
        create_revision: stored.create_revision,
        version: stored.version,
    };
    assert_eq!(found, place);
    assert!(key.open(at, found, &stored.value).unwrap() == record);
    // Put back as it was, over itself: the key's version moved on, and it is refused.
    etcd.txn(
        &[],
        &[Op::Put {
            key: at.into(),
            value: stored.value.clone(),
            lease: 0,
        }],
        &[],
    )
    .await
    .unwrap();
    let again = etcd.get(at).await.unwrap().unwrap();
    let moved = Place {
        create_revision: again.create_revision,
        version: again.version,
    };
    assert!(key.open(at, moved, &again.value).is_err());
}

mod election {
    use super::*;
    use tokend::cluster::member::{Lead, Member, Settings, Stored};
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn identity() -> tokend::account::identity::RequestIdentity {
        let text = "[[account]]\nname = \"a\"\ntoken_url = \"https://idp.example/t\"\n\
                    client_id = \"id\"\nclient_secret = \"s\"\n[[account.output]]\npath = \"/x\"\n";
        let c = tokend::config::parse_str(text, std::path::Path::new("/c.toml")).unwrap();
        tokend::account::identity::RequestIdentity::of(&c.accounts[0])
    }

    fn member(
        cluster: &EtcdCluster,
        name: &str,
        ttl: Duration,
    ) -> (std::sync::Arc<Member>, CancellationToken) {
        let cancel = CancellationToken::new();
        let m = Member::start(
            client(&cluster.endpoints()),
            settings(name, ttl),
            cancel.clone(),
            &tokio_util::task::TaskTracker::new(),
        );
        (m, cancel)
    }

    fn settings(name: &str, ttl: Duration) -> Settings {
        Settings {
            key: ClusterKey::from_hex(KEY).unwrap(),
            prefix: "/tokend/test".into(),
            name: name.into(),
            ttl,
            clock: tokend::clock::Clock::System,
            memory: tokend::cluster::memory::Memory::new(None),
        }
    }

    /// Campaigns until `seat` leads, for at most `limit`; how long it took.
    async fn lead_within(seat: &tokend::cluster::member::Seat, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if seat.campaign().await.ok() == Some(Lead::Me) {
                return start.elapsed();
            }
            assert!(start.elapsed() < limit, "no lead within {limit:?}");
            // Bounded poll of a remote state: the watch would do too, this is simpler.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn one_member_leads_the_other_follows_and_sees_each_record() {
        let Some(cluster) = EtcdCluster::start(1) else {
            return;
        };
        let ttl = Duration::from_secs(2);
        let (a, _ca) = member(&cluster, "host-a", ttl);
        let (b, _cb) = member(&cluster, "host-b", ttl);
        let never = CancellationToken::new();
        a.wait_for_lease(&never).await;
        b.wait_for_lease(&never).await;
        let sa = a.seat("a", &identity());
        let mut sb = b.seat("a", &identity());
        assert_eq!(sa.campaign().await.unwrap(), Lead::Me);
        assert_eq!(sb.campaign().await.unwrap(), Lead::Other("host-a".into()));
        // The leader creates the record's key, then writes by compare-and-swap on it.
        assert!(!sb.create().await.unwrap(), "a follower cannot create it");
        assert!(sa.create().await.unwrap());
        let Stored::New(at) = sa.read().await.unwrap() else {
            panic!("a new record key")
        };
        let written = sa
            .claim(at, &record(1, "host-a", "rt-1"))
            .await
            .unwrap()
            .expect("the leader's claim holds");
        assert!(
            sb.claim(written, &record(2, "host-b", "rt-2"))
                .await
                .unwrap()
                .is_none(),
            "a follower cannot claim"
        );
        assert!(
            sa.claim(at, &record(2, "host-a", "rt-2"))
                .await
                .unwrap()
                .is_none(),
            "not over a record that moved on"
        );
        tokio::time::timeout(Duration::from_secs(5), sb.changed())
            .await
            .expect("the follower is told");
        let Stored::Sealed(seen, _) = sb.read().await.unwrap() else {
            panic!("a sealed record")
        };
        assert_eq!((seen.generation, seen.fetched_by.as_str()), (1, "host-a"));
        // An answer is written whoever leads, if the record is still the claimed one.
        assert!(sb
            .write(written, &record(2, "host-b", "rt-2"))
            .await
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn a_stopped_leader_hands_over_at_once_and_a_dead_one_within_the_lease() {
        let Some(cluster) = EtcdCluster::start(1) else {
            return;
        };
        let ttl = Duration::from_secs(2);
        let never = CancellationToken::new();
        // Stopped (SIGTERM): the lease is revoked, the lead free at once.
        let (a, stop_a) = member(&cluster, "host-a", ttl);
        let (b, stop_b) = member(&cluster, "host-b", ttl);
        a.wait_for_lease(&never).await;
        b.wait_for_lease(&never).await;
        let sa = a.seat("a", &identity());
        let sb = b.seat("a", &identity());
        assert_eq!(sa.campaign().await.unwrap(), Lead::Me);
        stop_a.cancel();
        let handover = lead_within(&sb, Duration::from_secs(5)).await;
        println!("handover after a stop: {handover:?}");
        assert!(
            handover < ttl,
            "handover waited for the lease: {handover:?}"
        );

        // Dead: host-d leads from a runtime of its own that then vanishes, the way a
        // kill -9 ends a process: its keep-alive stops and nothing is revoked.
        stop_b.cancel();
        let (c, _cc) = member(&cluster, "host-c", ttl);
        c.wait_for_lease(&never).await;
        let sc = c.seat("a", &identity());
        let endpoints = cluster.endpoints();
        let (led_tx, led_rx) = std::sync::mpsc::channel();
        let (die_tx, die_rx) = std::sync::mpsc::channel::<()>();
        let dying = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let d = Member::start(
                    client(&endpoints),
                    settings("host-d", ttl),
                    CancellationToken::new(),
                    &tokio_util::task::TaskTracker::new(),
                );
                d.wait_for_lease(&CancellationToken::new()).await;
                let sd = d.seat("a", &identity());
                // host-b handed over too: host-d campaigns first and leads.
                led_tx
                    .send(lead_within(&sd, Duration::from_secs(5)).await)
                    .unwrap();
                let _ = tokio::task::spawn_blocking(move || die_rx.recv()).await;
            });
            rt.shutdown_background();
        });
        // Not blocking this runtime: host-c's keep-alive runs on it.
        let took = tokio::task::spawn_blocking(move || led_rx.recv().unwrap())
            .await
            .unwrap();
        println!("host-d led after {took:?}");
        assert_eq!(sc.campaign().await.unwrap(), Lead::Other("host-d".into()));
        let _ = die_tx.send(());
        tokio::task::spawn_blocking(move || dying.join().unwrap())
            .await
            .unwrap();
        let failover = lead_within(&sc, ttl * 4).await;
        println!("failover after a death: {failover:?}");
        assert!(
            failover <= ttl + Duration::from_secs(1) + Duration::from_millis(500),
            "{failover:?}"
        );
        assert!(!sa.create().await.unwrap(), "the stopped one cannot write");
    }
}

/// `tokend run` members of one cluster against real etcd and the fake IdP.
mod members {
    use std::time::Instant;

    use crate::support::cluster::{
        all_degraded, chain_through_leader_kills, etcd_backend, index, kill_9,
        once_adopts_the_shared_token, one_leader, one_request_per_lifetime, serving_one_token,
        start_one_token_one_leader, Node, CLIENT, KEY,
    };
    use crate::support::fake_idp::{FakeIdp, Reply};
    use crate::support::{Daemon, LONG, SHORT};

    use super::*;

    /// `n` members (`m0`, `m1`, ...) sharing account `a` (`extra` lines), each with its
    /// own sandbox, outputs and state_dir.
    fn nodes(etcd: &EtcdCluster, idp: &FakeIdp, n: usize, extra: &str) -> Vec<Node> {
        nodes_via(etcd.endpoints(), idp, n, extra, None)
    }

    /// [`nodes`] on the etcd members at `direct`, the last member reaching etcd through
    /// `last_via` instead when given.
    fn nodes_via(
        direct: Vec<String>,
        idp: &FakeIdp,
        n: usize,
        extra: &str,
        last_via: Option<String>,
    ) -> Vec<Node> {
        (0..n)
            .map(|i| {
                let mine: Vec<String> = match (&last_via, i + 1 == n) {
                    (Some(via), true) => vec![via.clone()],
                    _ => direct.clone(),
                };
                Node::new(
                    i,
                    &etcd_backend(&mine),
                    KEY,
                    &idp.url(),
                    &format!("{CLIENT}{extra}"),
                )
            })
            .collect()
    }

    /// Waits until every member shows the leader's failure (the leader's failure is the
    /// cluster's): `failing`, or `expired` once a short test token ran out, with the error.
    fn all_failing(d: &Daemon, nodes: &[Node]) {
        for n in nodes {
            d.wait_until(&format!("{} failing", n.name), LONG, || {
                let s = n.status()?;
                let failed = s["status"] == "failing" || s["status"] == "expired";
                (failed && s["last_error"].is_string()).then_some(())
            });
        }
    }

    #[test]
    fn one_request_per_cycle_for_the_cluster_and_every_member_serves_it() {
        let Some(etcd) = EtcdCluster::start(1) else {
            return;
        };
        let idp = FakeIdp::start(Reply::token(4));
        let nodes = nodes(&etcd, &idp, 3, "");
        let daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
        // Three cycles of 4-second tokens (refreshed at about 3.2 s).
        let leader =
            one_request_per_lifetime(&daemons[0], &idp, &nodes, &daemons, Duration::from_secs(30));
        for t in &idp.issued()[..3] {
            assert!(idp.is_issued(t));
        }
        for n in &nodes {
            let v = n.cluster().expect("/v1/cluster answers 200");
            assert_eq!(v["member"], n.name.as_str());
            assert_eq!(v["reachable"], true);
            assert_eq!(v["accounts"][0]["account"], "a");
            assert_eq!(v["accounts"][0]["leader"], leader.as_str());
            let (_, metrics) = crate::support::socket_get(&n.socket(), "/metrics").unwrap();
            let leading = if n.name == leader { 1 } else { 0 };
            assert!(
                metrics.contains(&format!("tokend_cluster_leader{{account=\"a\"}} {leading}")),
                "{metrics}"
            );
            assert!(metrics.contains("tokend_cluster_degraded{account=\"a\"} 0"));
            let check = n.check();
            assert!(check.stdout.contains("etcd reachable"), "{}", check.stdout);
        }
    }

    /// Issue #22 (and #12's gap): `tokend once` beside a running cluster adopts the
    /// shared token: its output holds it, and the provider is not asked.
    #[test]
    fn once_beside_a_running_cluster_adopts_the_shared_token() {
        let Some(etcd) = EtcdCluster::start(1) else {
            return;
        };
        let idp = FakeIdp::start(Reply::token(3600));
        let nodes = nodes(&etcd, &idp, 3, "");
        once_adopts_the_shared_token(&idp, &nodes);
    }

    #[test]
    fn a_killed_leader_is_replaced_within_the_lease_and_a_stopped_one_at_once() {
        let Some(etcd) = EtcdCluster::start(1) else {
            return;
        };
        let idp = FakeIdp::start(Reply::token(3600));
        let nodes = nodes(&etcd, &idp, 3, "refresh_every = \"12s\"");
        let (mut daemons, token, leader) = start_one_token_one_leader(&idp, &nodes);
        let li = index(&leader);

        // kill -9 the leader: another leads within lease_ttl + 1 s.
        kill_9(&mut daemons, li);
        let other = (li + 1) % 3;
        let t0 = Instant::now();
        let (new_leader, took) =
            daemons[other]
                .as_ref()
                .unwrap()
                .wait_until("a new leader", LONG, || {
                    nodes[other]
                        .leader()
                        .filter(|l| *l != leader)
                        .map(|l| (l, t0.elapsed()))
                });
        println!("failover after kill -9: {took:?} (lease_ttl 2 s) to {new_leader}");
        // The inherited token is good: nobody asks before it is due.
        assert_eq!(
            idp.requests().len(),
            1,
            "the new leader inherited the token"
        );
        assert_eq!(nodes[other].token().unwrap(), token);

        // SIGTERM the new leader: handover at once.
        let ni = index(&new_leader);
        let last = (0..3).find(|i| *i != li && *i != ni).unwrap();
        let t1 = Instant::now();
        let (status, _, log) = daemons[ni].take().unwrap().terminate();
        assert!(status.success(), "{log}");
        let took =
            daemons[last]
                .as_ref()
                .unwrap()
                .wait_until("the last member leading", LONG, || {
                    (nodes[last].leader().as_deref() == Some(nodes[last].name.as_str()))
                        .then(|| t1.elapsed())
                });
        println!("handover after SIGTERM: {took:?}");
        assert_eq!(idp.requests().len(), 1);
        // It refreshes when due (refresh_every 12 s), and only it.
        daemons[last]
            .as_ref()
            .unwrap()
            .wait_until("the next token", LONG, || {
                nodes[last].token().filter(|t| *t != token)
            });
        assert_eq!(idp.requests().len(), 2);
    }

    #[test]
    fn a_wrong_password_is_tried_once_per_hold_for_the_whole_cluster_also_across_a_leader_kill() {
        let Some(etcd) = EtcdCluster::start(1) else {
            return;
        };
        let idp = FakeIdp::start(Reply::InvalidGrant);
        let extra = "grant_type = \"password\"\nusername = \"svc\"\npassword = \"wrong\"\n\
                     auth_failure_hold = \"3s\"";
        let nodes = nodes(&etcd, &idp, 3, extra);
        let mut daemons: Vec<Option<Daemon>> = nodes.iter().map(|n| Some(n.start())).collect();
        let leader = {
            let d0 = daemons[0].as_ref().unwrap();
            d0.wait_until("the first refusal", SHORT, || {
                idp.requests().first().map(|_| ())
            });
            let leader = d0.wait_until("a leader", SHORT, || nodes[0].leader());
            // Every member holds (the hold is the cluster's).
            all_failing(d0, &nodes);
            leader
        };
        // Kill the leader: its successor honours the hold.
        let li = index(&leader);
        kill_9(&mut daemons, li);
        let live = daemons.iter().flatten().next().unwrap();
        let reqs = live.wait_until("the third refusal", Duration::from_secs(30), || {
            let r = idp.requests();
            (r.len() >= 3).then_some(r)
        });
        let gaps: Vec<Duration> = reqs.windows(2).map(|w| w[1].at - w[0].at).collect();
        println!("gaps between the cluster's login attempts: {gaps:?}");
        let tolerance = Duration::from_millis(300);
        assert!(gaps[0] >= Duration::from_secs(3) - tolerance, "{gaps:?}");
        assert!(
            gaps[1] >= Duration::from_secs(6) - tolerance,
            "the hold doubled: {gaps:?}"
        );
    }

    #[test]
    fn a_refresh_token_chain_survives_leader_kills_with_no_token_sent_twice() {
        let Some(etcd) = EtcdCluster::start(1) else {
            return;
        };
        let idp = FakeIdp::start(Reply::token(6));
        idp.seed_refresh_token("rt-seed");
        let extra =
            "grant_type = \"refresh_token\"\nrefresh_token = \"rt-seed\"\nclient_auth = \"none\"";
        let nodes = nodes(&etcd, &idp, 3, extra);
        for n in &nodes {
            n.edit_config("client_secret = { file = \"secret\" }\n", "");
        }
        chain_through_leader_kills(&idp, &nodes, 3);
    }

    #[test]
    fn without_etcd_quorum_members_serve_on_and_refresh_alone_then_converge_again() {
        let Some(mut etcd) = EtcdCluster::start(3) else {
            return;
        };
        let idp = FakeIdp::start(Reply::token(8));
        let nodes = nodes(&etcd, &idp, 3, "");
        let daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
        let d0 = &daemons[0];
        let first = serving_one_token(d0, &nodes);
        d0.wait_until("a leader", SHORT, || nodes[0].leader());
        let (before, lost_at) = (idp.requests().len(), Instant::now());
        // Two of three etcd members die: no quorum.
        etcd.kill(1);
        etcd.kill(2);
        all_degraded(d0, &nodes);
        // Said by health (still 200: the token is valid) and by `tokend status`.
        let (code, body) = crate::support::socket_get(&nodes[0].socket(), "/v1/health").unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"degraded\":[\"a\"]"), "{body}");
        let status = nodes[0].cmd_within(&["status"], SHORT);
        // "fresh, degraded", or "refreshing, degraded" when the 8 s token falls due now.
        assert!(status.stdout.contains(", degraded"), "{}", status.stdout);
        // Tokens keep being served; when due (8 s tokens, at about 6.4 s), each member
        // refreshes on its own: at most one request per member per cycle.
        d0.wait_until("tokens refreshed alone", LONG, || {
            nodes
                .iter()
                .all(|n| n.token().is_some_and(|t| t != first))
                .then_some(())
        });
        let alone = idp.requests().len() - before;
        let cycles = lost_at.elapsed().as_secs_f64() / 6.0;
        println!(
            "without quorum: {alone} requests in {:?}",
            lost_at.elapsed()
        );
        assert!(
            alone as f64 <= 3.0 * (cycles + 1.0),
            "{alone} requests for 3 members in {cycles:.1} cycles"
        );
        // Quorum back: one leader again, and one request per cycle.
        etcd.restart(1);
        etcd.restart(2);
        etcd.wait_healthy(Duration::from_secs(30));
        // One leader again, known to all.
        one_leader(d0, &nodes);
        let (mark, at) = (idp.requests().len(), Instant::now());
        d0.wait_until("two more cycles", Duration::from_secs(40), || {
            (at.elapsed() > Duration::from_secs(14)).then_some(())
        });
        let after = idp.requests().len() - mark;
        println!("with quorum again: {after} requests in {:?}", at.elapsed());
        assert!(after <= 3, "{after} requests in two to three cycles");
        for n in &nodes {
            assert!(n.token().is_some());
        }
    }

    #[test]
    fn a_member_cut_off_from_etcd_serves_on_refreshes_alone_and_rejoins() {
        let Some(etcd) = EtcdCluster::start(1) else {
            return;
        };
        let target: std::net::SocketAddr = etcd.endpoints()[0]
            .trim_start_matches("http://")
            .parse()
            .unwrap();
        let proxy = crate::support::proxy::Proxy::start(target);
        let idp = FakeIdp::start(Reply::token(6));
        let nodes = nodes_via(etcd.endpoints(), &idp, 3, "", Some(proxy.url()));
        // m2 joins once m0 and m1 have a leader: it follows, and its cut is no failover.
        let mut daemons: Vec<Daemon> = nodes[..2]
            .iter()
            .map(|n| Daemon::start(&n.config))
            .collect();
        one_leader(&daemons[0], &nodes[..2]);
        daemons.push(Daemon::start(&nodes[2].config));
        let d0 = &daemons[0];
        serving_one_token(d0, &nodes);
        let first_leader = one_leader(d0, &nodes);
        assert_ne!(first_leader, "m2");
        let cut_off = &nodes[2];
        let (mark, at, before) = (idp.requests().len(), Instant::now(), cut_off.token());
        proxy.cut();
        d0.wait_until("m2 degraded, m0 not", LONG, || {
            let s2 = cut_off.status()?;
            let s0 = nodes[0].status()?;
            (s2["degraded"] == true && s0["degraded"].is_null()).then_some(())
        });
        // m2 refreshes on its own when due; the others go on with their leader.
        let alone = d0.wait_until("m2 with a token it fetched alone", LONG, || {
            // Cut off, it can have a new token only by asking the provider itself.
            cut_off.token().filter(|t| Some(t) != before.as_ref())
        });
        assert!(idp.is_issued(&alone));
        let cycles = at.elapsed().as_secs_f64() / 4.8;
        let during = idp.requests().len() - mark;
        println!(
            "while m2 was cut off: {during} requests in {:?}",
            at.elapsed()
        );
        assert!(
            during as f64 <= 2.0 * (cycles + 1.0),
            "{during} requests in {cycles:.1} cycles: one for the cluster, one for m2"
        );
        // Back: m2 follows the leader again and serves the cluster's token.
        proxy.restore();
        d0.wait_until("m2 following and serving the cluster's token", LONG, || {
            let s2 = cut_off.status()?;
            let t0 = nodes[0].token()?;
            (s2["degraded"].is_null()
                && s2["leader"].as_str().is_some()
                && cut_off.token().as_deref() == Some(t0.as_str()))
            .then_some(())
        });
    }

    #[test]
    fn killing_etcds_raft_leader_costs_no_provider_request() {
        let Some(mut etcd) = EtcdCluster::start(3) else {
            return;
        };
        let idp = FakeIdp::start(Reply::token(3600));
        let nodes = nodes(&etcd, &idp, 3, "refresh_every = \"8s\"");
        let daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
        let d0 = &daemons[0];
        one_leader(d0, &nodes);
        // A leader can be known before its first request is on the wire.
        let first = d0.wait_until("the first request", SHORT, || {
            idp.requests().first().map(|r| r.at)
        });
        let raft = d0.wait_until("etcd's Raft leader", SHORT, || etcd.raft_leader());
        etcd.kill(raft);
        // Two refresh cycles (8 s) on the remaining two etcd members: one request each.
        d0.wait_until("two more tokens", Duration::from_secs(30), || {
            (idp.requests().len() >= 3).then_some(())
        });
        let reqs = idp.requests();
        let gaps: Vec<Duration> = reqs.windows(2).map(|w| w[1].at - w[0].at).collect();
        println!("requests after killing etcd's Raft leader: gaps {gaps:?}");
        for g in &gaps {
            assert!(*g >= Duration::from_secs(7), "an extra request: {gaps:?}");
        }
        assert!(reqs[0].at == first);
        let l: Vec<String> = nodes.iter().filter_map(Node::leader).collect();
        assert!(l.len() == 3 && l.iter().all(|x| *x == l[0]), "{l:?}");
    }

    #[test]
    fn a_rate_limit_is_the_clusters_also_across_a_leader_kill() {
        let Some(etcd) = EtcdCluster::start(1) else {
            return;
        };
        let idp = FakeIdp::start(Reply::token(4));
        let nodes = nodes(&etcd, &idp, 3, "");
        let mut daemons: Vec<Option<Daemon>> = nodes.iter().map(|n| Some(n.start())).collect();
        let leader = {
            let d0 = daemons[0].as_ref().unwrap();
            serving_one_token(d0, &nodes);
            // Long enough that every member is seen waiting before it ends, under load too.
            idp.push(Reply::RetryAfter(12));
            d0.wait_until("the 429", LONG, || {
                (idp.requests().len() >= 2).then_some(())
            });
            // Every member learns the wait before the leader goes.
            all_failing(d0, &nodes);
            d0.wait_until("a leader", SHORT, || nodes[0].leader())
        };
        let li = index(&leader);
        kill_9(&mut daemons, li);
        let live = daemons.iter().flatten().next().unwrap();
        let reqs = live.wait_until(
            "the request after the wait",
            Duration::from_secs(30),
            || {
                let r = idp.requests();
                (r.len() >= 3).then_some(r)
            },
        );
        let gap = reqs[2].at - reqs[1].at;
        println!("after a 429 with Retry-After 12 and a leader kill: next request {gap:?} later");
        assert!(gap >= Duration::from_millis(11_700), "{gap:?}");
    }

    #[test]
    fn members_reach_etcd_over_tls_with_client_certificates() {
        let Some(etcd) = EtcdCluster::start_tls(1) else {
            return;
        };
        let tls = etcd.tls().unwrap().clone();
        let idp = FakeIdp::start(Reply::token(3600));
        let nodes = nodes(&etcd, &idp, 2, "");
        for n in &nodes {
            n.edit_config(
                "lease_ttl = \"2s\"\n",
                &format!(
                    "lease_ttl = \"2s\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = {{ file = \"{}\" }}\n",
                    tls.ca.display(),
                    tls.client_cert.display(),
                    tls.client_key.display()
                ),
            );
        }
        let daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
        daemons[0].wait_until("one leader known to both, one token", SHORT, || {
            let l: Vec<String> = nodes.iter().filter_map(Node::leader).collect();
            let t = nodes[0].token()?;
            (l.len() == 2 && l[0] == l[1] && nodes[1].token().as_deref() == Some(t.as_str()))
                .then_some(())
        });
        assert_eq!(idp.requests().len(), 1);
        // Without the client certificate etcd refuses: check says so.
        let text = std::fs::read_to_string(&nodes[0].config).unwrap();
        let no_cert: String = text
            .lines()
            .filter(|l| !l.starts_with("cert_file") && !l.starts_with("key_file"))
            .map(|l| format!("{l}\n"))
            .collect();
        nodes[0].sb.write(&nodes[0].config, &no_cert, 0o600);
        let check = nodes[0].check();
        assert_eq!(check.code(), Some(1), "{}", check.stdout);
        assert!(
            check.stdout.contains("FAIL  cluster member m0"),
            "{}",
            check.stdout
        );
    }

    #[test]
    fn members_authenticate_to_etcd_with_a_user_and_password() {
        let Some(etcd) = EtcdCluster::start(1) else {
            return;
        };
        etcd.enable_auth("tokend", "etcd-s3cret", "/tokend/test/");
        let idp = FakeIdp::start(Reply::token(3600));
        let nodes = nodes(&etcd, &idp, 2, "");
        for n in &nodes {
            n.edit_config(
                "lease_ttl = \"2s\"\n",
                "lease_ttl = \"2s\"\nusername = \"tokend\"\npassword = { file = \"etcd-password\" }\n",
            );
            n.sb.write(&n.sb.path("etcd-password"), "etcd-s3cret\n", 0o600);
        }
        let daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
        one_leader(&daemons[0], &nodes);
        serving_one_token(&daemons[0], &nodes);
        assert_eq!(idp.requests().len(), 1);
        for d in &daemons {
            assert!(!d.log().contains("etcd-s3cret"));
        }
        // A wrong password: check says so, and names no secret.
        nodes[0]
            .sb
            .write(&nodes[0].sb.path("etcd-password"), "wrong\n", 0o600);
        let check = nodes[0].check();
        assert_eq!(check.code(), Some(1), "{}", check.stdout);
        assert!(
            check.stdout.contains("authentication failed"),
            "{}",
            check.stdout
        );
        assert!(!check.stdout.contains("wrong"));
    }
}

mod faults;
