//! Cluster mode under the faults fleets have (issue #20), `tokend run` members against
//! real etcd members and the fake IdP that rotates refresh tokens and revokes a family
//! when one comes back: a leader paused (SIGSTOP) exactly before and exactly during its
//! request, one that dies mid-request, members whose clocks are minutes off (under
//! libfaketime), a member with another cluster key, an older record put back with
//! etcdctl, a hung etcd member, a leader killed as its token falls due, refresh requests
//! made on members that do not lead, and members that share a name but not its identity.
//!
//! Every test checks that no refresh token was sent twice (but where the test is the
//! documented exception: a member that died mid-request), and the pace of requests.
//! Token files are read every 100 ms where a test promises valid tokens throughout, and
//! a token counts as valid by the IdP's clock, not the member's.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};

use crate::support::cluster::{
    etcd_backend, index, no_reuse, one_leader, serving_one_token, Node, CLIENT, KEY,
};
use crate::support::etcd::EtcdCluster;
use crate::support::fake_idp::{FakeIdp, Reply};
use crate::support::proxy::{HookProxy, Stage};
use crate::support::{Daemon, LONG, SHORT};

const OTHER_KEY: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
const TTL: Duration = Duration::from_secs(2);

/// A refresh_token account whose requests may take 10 s: a leader paused for
/// 3 x lease_ttl (6 s) mid-request still gets its answer.
const ROTATING: &str = "grant_type = \"refresh_token\"\nrefresh_token = \"rt-seed\"\n\
                        client_auth = \"none\"\nrefresh_token_timeout = \"10s\"\n";

/// Member `m{i}` of a cluster on `endpoints`, sharing account `a` at `token_url`
/// (`grant`: [`ROTATING`] or [`CLIENT`], and any other lines), sealing with `key`.
fn node(i: usize, endpoints: &[String], token_url: &str, key: &str, grant: &str) -> Node {
    Node::new(i, &etcd_backend(endpoints), key, token_url, grant)
}

fn nodes(n: usize, endpoints: &[String], token_url: &str, grant: &str) -> Vec<Node> {
    (0..n)
        .map(|i| node(i, endpoints, token_url, KEY, grant))
        .collect()
}

/// etcd of `members` members, the fake IdP issuing tokens of `lifetime` in a
/// refresh-token family seeded `rt-seed`, and `n` members with a [`ROTATING`] account
/// on it; `None` where etcd is not installed.
fn rotating_cluster(
    members: usize,
    lifetime: Duration,
    n: usize,
) -> Option<(EtcdCluster, FakeIdp, Vec<Node>)> {
    let etcd = EtcdCluster::start(members)?;
    let idp = FakeIdp::start(Reply::token(lifetime.as_secs()));
    idp.seed_refresh_token("rt-seed");
    let nodes = nodes(n, &etcd.endpoints(), &idp.url(), ROTATING);
    Some((etcd, idp, nodes))
}

/// The etcd key of account `a`'s shared record.
fn record_key(etcd: &EtcdCluster) -> String {
    etcd.etcdctl(&["get", "--prefix", "--keys-only", "/tokend/test/accounts/a/"])
        .lines()
        .find(|k| k.ends_with("/record"))
        .expect("the account's record")
        .to_owned()
}

/// Waits until every member in `nodes` serves the `n`-th token the IdP issued (1-based).
fn serving_issued(d: &Daemon, idp: &FakeIdp, nodes: &[&Node], n: usize, what: &str) -> String {
    d.wait_until(what, LONG, || {
        let t = idp.issued().get(n - 1)?.clone();
        nodes
            .iter()
            .all(|node| node.token().as_deref() == Some(t.as_str()))
            .then_some(t)
    })
}

/// Waits until every member in `nodes` names the same leader; its index.
fn leader_index(d: &Daemon, nodes: &[&Node]) -> usize {
    index(&one_leader(d, nodes))
}

/// The members but `i`.
fn all_but(nodes: &[Node], i: usize) -> Vec<&Node> {
    nodes
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, n)| n)
        .collect()
}

/// Waits until the members but `li` name the same leader, another than `li`; its index.
fn another_leader(d: &Daemon, nodes: &[Node], li: usize) -> usize {
    let others = all_but(nodes, li);
    d.wait_until("another member leading", LONG, || {
        let l = others[0].leader()?;
        let i: usize = l[1..].parse().ok()?;
        (i != li && others[1].leader().as_deref() == Some(l.as_str())).then_some(i)
    })
}

/// Token requests no closer together than a token's refresh point allows: at most one
/// per token lifetime for the cluster (`lifetime` x `refresh_ratio` 0.8, less the 10%
/// jitter and `slack`).
fn paced(idp: &FakeIdp, lifetime: Duration, slack: Duration) {
    let reqs = idp.requests();
    let floor = lifetime.mul_f64(0.8 * 0.9).saturating_sub(slack);
    for w in reqs.windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(
            gap >= floor,
            "two requests {gap:?} apart (at most one per {floor:?}): {:?}",
            reqs.iter().map(|r| r.at - reqs[0].at).collect::<Vec<_>>()
        );
    }
}

/// Reads every member's token file every 100 ms, and tells whether it held a token the
/// IdP still considers valid.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Counts>>>,
}

#[derive(Debug, Default, Clone)]
struct Counts {
    valid: usize,
    total: usize,
    /// When the first few reads found no valid token, from the start.
    misses: Vec<Duration>,
}

impl Sampler {
    fn start(nodes: &[&Node], idp: &FakeIdp) -> Sampler {
        let paths: Vec<PathBuf> = nodes.iter().map(|n| n.sb.path("out/a")).collect();
        let expires = idp.expiry_reader();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut counts = vec![Counts::default(); paths.len()];
                let start = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    for (p, c) in paths.iter().zip(counts.iter_mut()) {
                        let token = std::fs::read_to_string(p).ok();
                        let valid = token
                            .as_deref()
                            .and_then(&expires)
                            .is_some_and(|e| e > Instant::now());
                        c.total += 1;
                        if valid {
                            c.valid += 1;
                        } else if c.misses.len() < 20 {
                            c.misses.push(start.elapsed());
                        }
                    }
                    // The sampling period itself, not a wait for a state.
                    std::thread::sleep(Duration::from_millis(100));
                }
                counts
            }
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Counts> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("the sampler does not panic")
    }
}

/// A leader is paused with SIGSTOP for 3 x lease_ttl exactly at `stage` of its request
/// (before it reaches the IdP, or while its answer is on the way). Another member takes
/// the lead, is asked to refresh, and waits for the link in flight; the paused leader's
/// request is answered once it goes on, its answer is written (the record still holds
/// the link it spent), and the chain goes on with no refresh token sent twice.
fn paused_leader(stage: Stage) {
    let Some(etcd) = EtcdCluster::start(1) else {
        return;
    };
    let idp = FakeIdp::start(Reply::token(30));
    idp.seed_refresh_token("rt-seed");
    let proxy = HookProxy::start(idp.addr());
    let nodes = nodes(3, &etcd.endpoints(), &proxy.url_for(&idp.url()), ROTATING);
    let all: Vec<&Node> = nodes.iter().collect();
    let daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
    let d0 = &daemons[0];
    serving_one_token(d0, &all);
    let li = leader_index(d0, &all);
    let pid = daemons[li].pid();
    // When the leader was stopped, and when it went on.
    type Window = Option<(Instant, Option<Instant>)>;
    let window: Arc<Mutex<Window>> = Arc::default();
    proxy.arm(Box::new({
        let window = window.clone();
        move |at| {
            if at == stage {
                kill(pid, Signal::SIGSTOP).expect("stop the leader");
                *window.lock().unwrap() = Some((Instant::now(), None));
                // The fault itself: the leader stays stopped this long.
                std::thread::sleep(3 * TTL);
                kill(pid, Signal::SIGCONT).expect("resume the leader");
                window.lock().unwrap().as_mut().unwrap().1 = Some(Instant::now());
            }
            true
        }
    }));
    let poke = nodes[li].cmd(&["refresh", "a"]);
    assert_eq!(poke.code(), Some(0), "{}", poke.stderr);
    let stopped = d0.wait_until("the leader stopped", LONG, || {
        window.lock().unwrap().map(|(s, _)| s)
    });
    // Another member leads once the stopped one's lease lapsed; it is asked to refresh,
    // and finds the link in flight.
    let ni = another_leader(d0, &nodes, li);
    let took = stopped.elapsed();
    let poke = nodes[ni].cmd(&["refresh", "a"]);
    assert_eq!(poke.code(), Some(0), "{}", poke.stderr);
    // It puts the refresh off for the stopped leader's request (counted, and said in
    // its log).
    daemons[ni].wait_until(
        "the new leader waiting for the link in flight",
        SHORT,
        || {
            crate::support::metric(
                &nodes[ni].socket(),
                "tokend_cluster_link_waits_total{account=\"a\"}",
            )
            .filter(|v| *v >= 1.0)
        },
    );
    let resumed = d0.wait_until("the leader resumed", LONG, || {
        window.lock().unwrap().and_then(|(_, r)| r)
    });
    println!(
        "m{li} stopped at {stage:?}; m{ni} led after {took:?}; resumed after {:?}",
        resumed - stopped
    );
    // Nobody asked the IdP while the leader was stopped: the new leader waited.
    let during = idp
        .requests()
        .iter()
        .filter(|r| r.at > stopped && r.at < resumed)
        .count();
    assert_eq!(during, 0, "a request while the leader was stopped");
    // The stopped leader's answer reaches every member.
    serving_issued(
        d0,
        &idp,
        &all,
        2,
        "every member serving the stopped leader's token",
    );
    assert_eq!(idp.requests().len(), 2, "the new leader did not ask again");
    // And the chain goes on from it: one more refresh, asked on a member that does not lead.
    let leader = leader_index(d0, &all);
    let asker = (0..3).find(|i| *i != leader).unwrap();
    let poke = nodes[asker].cmd(&["refresh", "a"]);
    assert_eq!(poke.code(), Some(0), "{}", poke.stderr);
    serving_issued(
        d0,
        &idp,
        &all,
        3,
        "every member serving the next link's token",
    );
    assert_eq!(idp.requests().len(), 3);
    no_reuse(&idp);
}

#[test]
fn a_leader_stopped_exactly_before_its_request_sends_it_once_and_nobody_else_sends_its_link() {
    paused_leader(Stage::Request);
}

#[test]
fn a_leader_stopped_while_its_request_is_on_the_wire_has_its_late_answer_written() {
    paused_leader(Stage::Answer);
}

#[test]
fn a_leader_that_dies_mid_request_is_waited_for_then_its_link_is_tried_once_and_a_refusal_holds() {
    let Some(etcd) = EtcdCluster::start(1) else {
        return;
    };
    let idp = FakeIdp::start(Reply::token(30));
    idp.seed_refresh_token("rt-seed");
    let proxy = HookProxy::start(idp.addr());
    // Requests of 4 s: the others wait 4 s + lease_ttl for a dead member's answer.
    let grant = ROTATING.replace("timeout = \"10s\"", "timeout = \"4s\"");
    assert_ne!(grant, ROTATING);
    let nodes = nodes(3, &etcd.endpoints(), &proxy.url_for(&idp.url()), &grant);
    let all: Vec<&Node> = nodes.iter().collect();
    let daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
    serving_one_token(&daemons[0], &all);
    let li = leader_index(&daemons[0], &all);
    // Waits go through a member that lives.
    let d0 = &daemons[(li + 1) % 3];
    let pid = daemons[li].pid();
    let killed: Arc<Mutex<Option<Instant>>> = Arc::default();
    proxy.arm(Box::new({
        let killed = killed.clone();
        move |at| {
            if at == Stage::Answer {
                // The IdP rotated the link; the leader dies before it hears of it.
                kill(pid, Signal::SIGKILL).expect("kill the leader");
                *killed.lock().unwrap() = Some(Instant::now());
                return false;
            }
            true
        }
    }));
    let poke = nodes[li].cmd(&["refresh", "a"]);
    assert_eq!(poke.code(), Some(0), "{}", poke.stderr);
    let killed_at = d0.wait_until("the leader killed", LONG, || *killed.lock().unwrap());
    let live = all_but(&nodes, li);
    let ni = another_leader(d0, &nodes, li);
    let poke = nodes[ni].cmd(&["refresh", "a"]);
    assert_eq!(poke.code(), Some(0), "{}", poke.stderr);
    let reqs = d0.wait_until("the link tried once more", Duration::from_secs(30), || {
        let r = idp.requests();
        (r.len() >= 3).then_some(r)
    });
    let waited = reqs[2].at - killed_at;
    println!("m{li} killed mid-request; m{ni} sent its link again {waited:?} later");
    assert!(
        waited >= Duration::from_secs(4),
        "the dead member's request was not waited for: {waited:?}"
    );
    // The documented exception: that one link, sent once more, refused.
    let spent = idp.refresh_tokens_presented()[1].clone();
    assert_eq!(idp.reused_refresh_tokens(), vec![spent]);
    let message = format!("may have been spent by member m{li}, which died mid-request: re-seed");
    for n in &live {
        d0.wait_until(&format!("{} holding with why", n.name), LONG, || {
            let s = n.status()?;
            let e = s["last_error"].as_str()?;
            (s["status"] == "failing" && e.contains(&message)).then_some(())
        });
    }
    // Held: nobody tries again.
    let after = idp.requests().len();
    let poke = live[0].cmd(&["refresh", "a"]);
    assert_eq!(poke.code(), Some(0));
    d0.wait_until("the refresh declined", SHORT, || {
        live[0]
            .status()
            .filter(|s| s["status"] != "refreshing")
            .map(|_| ())
    });
    assert_eq!(idp.requests().len(), after);
}

/// One member's wall clock is `offset` off (libfaketime). It leads first, hands over on
/// SIGTERM, comes back as a follower: every member serves a valid token throughout and
/// refreshes on time, and the skewed member says its clock is off (status, log, metric).
fn skewed_member(offset: &str, ahead: bool) {
    let lifetime = Duration::from_secs(8);
    let Some((_etcd, idp, nodes)) = rotating_cluster(1, lifetime, 3) else {
        return;
    };
    let all: Vec<&Node> = nodes.iter().collect();
    let skewed = nodes[0].start_skewed(offset);
    skewed.wait_until("m0 leading", LONG, || {
        (nodes[0].leader().as_deref() == Some("m0")).then_some(())
    });
    let d1 = nodes[1].start();
    let _d2 = nodes[2].start();
    serving_one_token(&d1, &all);
    let leading = Sampler::start(&all, &idp);
    // Two refreshes by the skewed leader.
    serving_issued(&d1, &idp, &all, 3, "two refreshes by the skewed leader");
    let word = if ahead { "ahead of" } else { "behind" };
    let said = skewed.wait_until("m0 saying its clock is off", LONG, || {
        let w = nodes[0].status()?["cluster_warning"].as_str()?.to_owned();
        w.contains(&format!("{word} the provider's clock"))
            .then_some(w)
    });
    println!("m0: {said}");
    let (_, metrics) = crate::support::socket_get(&nodes[0].socket(), "/metrics").unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("tokend_cluster_clock_skew_seconds{account=\"a\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let skew: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        (skew.abs() - 300.0).abs() < 5.0 && (skew > 0.0) == ahead,
        "{line}"
    );
    let mut counts = leading.finish();
    // It hands over; the others refresh on time.
    let others = Sampler::start(&all[1..], &idp);
    let (status, _, log) = skewed.terminate();
    assert!(status.success(), "{log}");
    assert!(
        log.contains(&format!("{word} the provider's clock")),
        "{log}"
    );
    let issued = idp.issued().len();
    serving_issued(
        &d1,
        &idp,
        &all[1..],
        issued + 2,
        "two refreshes after the handover",
    );
    // Back as a follower: it serves the cluster's tokens, timed on its own clock.
    let skewed = nodes[0].start_skewed(offset);
    serving_one_token(&d1, &all);
    let following = Sampler::start(&all, &idp);
    let issued = idp.issued().len();
    serving_issued(
        &d1,
        &idp,
        &all,
        issued + 2,
        "two more refreshes with m0 following",
    );
    counts.extend(others.finish());
    counts.extend(following.finish());
    let names = [
        "m0 leading",
        "m1",
        "m2",
        "m1 (m0 away)",
        "m2 (m0 away)",
        "m0 following",
        "m1",
        "m2",
    ];
    for (n, c) in names.iter().zip(&counts) {
        let share = c.valid as f64 / c.total as f64;
        println!(
            "{n}: {}/{} reads valid ({:.1}%), misses at {:?}",
            c.valid,
            c.total,
            share * 100.0,
            c.misses
        );
        assert!(
            c.valid as f64 >= 0.99 * c.total as f64,
            "{n}: {c:?}\n--- m1 ---\n{}\n--- m2 ---\n{}",
            d1.log(),
            _d2.log()
        );
    }
    no_reuse(&idp);
    paced(&idp, lifetime, Duration::from_millis(500));
    drop(skewed);
}

#[test]
fn a_member_five_minutes_ahead_serves_and_refreshes_on_time_and_says_its_clock_is_off() {
    skewed_member("+5m", true);
}

#[test]
fn a_member_five_minutes_behind_serves_and_refreshes_on_time_and_says_its_clock_is_off() {
    skewed_member("-5m", false);
}

#[test]
fn a_member_with_another_cluster_key_takes_no_part_and_says_why() {
    let Some((etcd, idp, mut nodes)) = rotating_cluster(1, Duration::from_secs(6), 2) else {
        return;
    };
    nodes.push(node(2, &etcd.endpoints(), &idp.url(), OTHER_KEY, ROTATING));
    let d0 = nodes[0].start();
    let _d1 = nodes[1].start();
    serving_one_token(&d0, &[&nodes[0], &nodes[1]]);
    let d2 = nodes[2].start();
    let why = "does not open the key check";
    d2.wait_until("m2 saying why it takes no part", LONG, || {
        let s = nodes[2].status()?;
        let w = s["cluster_warning"].as_str()?;
        (w.contains(why) && s["degraded"] == true && s["leader"].is_null()).then_some(())
    });
    let check = nodes[2].check();
    assert_eq!(check.code(), Some(1), "{}", check.stdout);
    assert!(
        check.stdout.contains("FAIL  cluster member m2") && check.stdout.contains(why),
        "{}",
        check.stdout
    );
    let (_, cluster) = crate::support::socket_get(&nodes[2].socket(), "/v1/cluster").unwrap();
    assert!(cluster.contains(why), "{cluster}");
    // Two rotations of the others' chain: m2 never sends anything, never serves.
    let issued = idp.issued().len();
    serving_issued(
        &d0,
        &idp,
        &[&nodes[0], &nodes[1]],
        issued + 2,
        "two more rotations",
    );
    assert_eq!(nodes[2].token(), None);
    let presented = idp.refresh_tokens_presented();
    assert_eq!(
        presented.iter().filter(|t| *t == "rt-seed").count(),
        1,
        "the seed was sent again: {presented:?}"
    );
    no_reuse(&idp);
    // Said in the log too (read whole once m2 has stopped: read live, the line may still
    // be in the pipe when the status shows the warning).
    let (_, _, log) = d2.terminate();
    assert!(log.contains(why), "said in the log too:\n{log}");
}

#[test]
fn an_older_record_put_back_is_refused_by_every_member_and_the_chain_goes_on() {
    let lifetime = Duration::from_secs(6);
    let Some((etcd, idp, nodes)) = rotating_cluster(1, lifetime, 3) else {
        return;
    };
    let d0 = nodes[0].start();
    let _d1 = nodes[1].start();
    let two = [&nodes[0], &nodes[1]];
    serving_one_token(&d0, &two);
    let record_key = record_key(&etcd);
    let old = etcd.etcdctl(&["get", "--print-value-only", &record_key]);
    let old = old.trim_end_matches('\n').to_owned();
    assert!(old.starts_with("2."), "{old}");
    serving_issued(&d0, &idp, &two, 3, "two more rotations");
    // An older record put back over the newer one (a restore, or anyone with write
    // access), and a member with an empty state_dir joins right then.
    etcd.etcdctl(&["put", &record_key, &old]);
    let d2 = nodes[2].start();
    for (n, d) in [(&nodes[0], &d0), (&nodes[2], &d2)] {
        d.wait_until(&format!("{} refusing the record", n.name), LONG, || {
            let w = n.status()?["cluster_warning"].as_str()?.to_owned();
            w.contains("refused the shared record").then_some(())
        });
        println!("{} refused it", n.name);
    }
    // The chain goes on from its newest link, and the new member serves it.
    let issued = idp.issued().len();
    serving_issued(
        &d0,
        &idp,
        &[&nodes[0], &nodes[1], &nodes[2]],
        issued + 2,
        "two more rotations, served by all",
    );
    no_reuse(&idp);
    paced(&idp, lifetime, Duration::from_millis(500));
}

#[test]
fn a_hung_etcd_member_is_left_behind_and_every_member_keeps_a_valid_token() {
    let lifetime = Duration::from_secs(6);
    let Some((etcd, idp, nodes)) = rotating_cluster(3, lifetime, 3) else {
        return;
    };
    let all: Vec<&Node> = nodes.iter().collect();
    let daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
    let d0 = &daemons[0];
    serving_one_token(d0, &all);
    one_leader(d0, &all);
    let sampler = Sampler::start(&all, &idp);
    serving_issued(d0, &idp, &all, 2, "a rotation before the fault");
    // Every member talks to etcd member 0 first: it hangs (quorum kept) for 3 x lease_ttl.
    let before = idp.issued().len();
    etcd.pause(0);
    let hung = Instant::now();
    // The fault lasts 3 x lease_ttl at least, and until a rotation happened meanwhile
    // (bounded: on a slow machine the failover and the next refresh can take longer
    // than a fixed window); the sampler watches throughout.
    while hung.elapsed() < 3 * TTL
        || (idp.issued().len() == before && hung.elapsed() < 3 * TTL + 5 * lifetime)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    etcd.resume(0);
    let during = idp.issued().len() - before;
    println!(
        "while etcd member 0 hung for {:?}: {during} rotations",
        hung.elapsed()
    );
    assert!(during >= 1, "no rotation while an etcd member hung");
    let issued = idp.issued().len();
    serving_issued(d0, &idp, &all, issued + 1, "a rotation after the fault");
    let counts = sampler.finish();
    for (n, c) in nodes.iter().zip(&counts) {
        println!(
            "{}: {}/{} reads valid, misses at {:?}",
            n.name, c.valid, c.total, c.misses
        );
        assert_eq!(
            c.valid, c.total,
            "{} went without a valid token: {c:?}",
            n.name
        );
    }
    no_reuse(&idp);
    paced(&idp, lifetime, Duration::from_millis(500));
}

#[test]
fn a_leader_killed_as_its_token_falls_due_is_replaced_in_time_and_no_member_goes_without_a_valid_token(
) {
    let Some(etcd) = EtcdCluster::start(1) else {
        return;
    };
    let lifetime = Duration::from_secs(20);
    let idp = FakeIdp::start(Reply::token(lifetime.as_secs()));
    let proxy = HookProxy::start(idp.addr());
    let nodes = nodes(3, &etcd.endpoints(), &proxy.url_for(&idp.url()), CLIENT);
    let all: Vec<&Node> = nodes.iter().collect();
    let daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
    let first = serving_one_token(&daemons[0], &all);
    let li = leader_index(&daemons[0], &all);
    let pid = daemons[li].pid();
    let sampler = Sampler::start(&all, &idp);
    let killed: Arc<Mutex<Option<Instant>>> = Arc::default();
    proxy.arm(Box::new({
        let killed = killed.clone();
        move |at| {
            // The token fell due: the leader dies as it asks, before the IdP hears it.
            kill(pid, Signal::SIGKILL).expect("kill the leader");
            *killed.lock().unwrap() = Some(Instant::now());
            let _ = at;
            false
        }
    }));
    let live = all_but(&nodes, li);
    let live_daemon = &daemons[(li + 1) % 3];
    let killed_at = live_daemon.wait_until(
        "the leader killed as its token fell due",
        Duration::from_secs(30),
        || *killed.lock().unwrap(),
    );
    let second = serving_issued(
        live_daemon,
        &idp,
        &live,
        2,
        "the new leader's token everywhere",
    );
    assert_ne!(first, second);
    let reqs = idp.requests();
    let took = reqs[1].at - killed_at;
    println!("leader m{li} killed as its token fell due; the next token {took:?} later");
    assert!(
        took <= TTL + Duration::from_secs(3),
        "the new leader refreshed {took:?} after the kill (lease_ttl 2 s)"
    );
    let counts = sampler.finish();
    for (i, c) in counts.iter().enumerate() {
        println!(
            "m{i}: {}/{} reads valid, misses at {:?}",
            c.valid, c.total, c.misses
        );
        if i != li {
            assert_eq!(c.valid, c.total, "m{i} went without a valid token: {c:?}");
        }
    }
    assert_eq!(reqs.len(), 2, "one request per token lifetime");
}

#[test]
fn refresh_and_get_min_valid_on_any_member_cause_exactly_one_refresh_for_the_cluster() {
    let Some(etcd) = EtcdCluster::start(1) else {
        return;
    };
    let idp = FakeIdp::start(Reply::token(3600));
    let nodes = nodes(3, &etcd.endpoints(), &idp.url(), CLIENT);
    let all: Vec<&Node> = nodes.iter().collect();
    let daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
    let d0 = &daemons[0];
    serving_one_token(d0, &all);
    let li = leader_index(d0, &all);
    let followers: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    let mut n = 1;
    // `refresh` on a member that does not lead: the leader refreshes, once.
    let out = nodes[followers[0]].cmd(&["refresh", "a"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    n += 1;
    serving_issued(d0, &idp, &all, n, "the refresh asked on a follower");
    // On both followers at once: one refresh.
    let spawn = |i: usize| {
        let socket = nodes[i].socket();
        std::thread::spawn(move || {
            let mut c = crate::support::tokend();
            c.args(["refresh", "a", "--socket"]).arg(socket);
            crate::support::finish(c, LONG)
        })
    };
    let both: Vec<_> = followers.iter().map(|i| spawn(*i)).collect();
    for t in both {
        assert_eq!(t.join().unwrap().code(), Some(0));
    }
    n += 1;
    serving_issued(d0, &idp, &all, n, "the refresh asked on both followers");
    // Whatever else was asked is answered by then; nothing more comes.
    let settled = Instant::now();
    d0.wait_until("no further request", SHORT, || {
        (settled.elapsed() > 3 * TTL).then_some(())
    });
    assert_eq!(
        idp.requests().len(),
        n,
        "one refresh for requests made at once"
    );
    // `get --min-valid` on a follower: the leader refreshes first, once.
    let out = nodes[followers[1]].cmd(&["get", "a", "--min-valid", "3599s"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    n += 1;
    let latest = serving_issued(d0, &idp, &all, n, "the refresh get --min-valid asked for");
    assert_eq!(out.stdout.trim(), latest);
    // A refusal holds the cluster; `refresh --force` on a follower ends it for one try.
    idp.push(Reply::InvalidClient);
    let out = nodes[followers[0]].cmd(&["refresh", "a"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    n += 1;
    for node in &all {
        d0.wait_until(&format!("{} held", node.name), LONG, || {
            node.status()
                .filter(|s| s["status"] == "failing")
                .map(|_| ())
        });
    }
    assert_eq!(idp.requests().len(), n);
    let out = nodes[followers[1]].cmd(&["refresh", "a"]);
    assert_eq!(out.code(), Some(0));
    let out = nodes[followers[1]].cmd(&["refresh", "--force", "a"]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    n += 1;
    let d = d0;
    d.wait_until("a token after the forced refresh", LONG, || {
        let t = idp.issued().last()?.clone();
        (idp.requests().len() == n && all.iter().all(|x| x.token().as_deref() == Some(t.as_str())))
            .then_some(())
    });
    assert_eq!(idp.requests().len(), n, "held: only the forced request");
}

#[test]
fn members_that_share_a_name_but_not_its_identity_say_so_and_a_spent_seed_is_never_sent() {
    let Some((etcd, idp, mut nodes)) = rotating_cluster(1, Duration::from_secs(3600), 2) else {
        return;
    };
    // The same provider spelled another way: another identity, the same seed.
    let elsewhere = idp.url().replace("127.0.0.1", "localhost");
    nodes.push(node(2, &etcd.endpoints(), &elsewhere, KEY, ROTATING));
    let d0 = nodes[0].start();
    let _d1 = nodes[1].start();
    serving_one_token(&d0, &[&nodes[0], &nodes[1]]);
    let d2 = nodes[2].start();
    d2.wait_until("m2 refusing to send the spent seed", LONG, || {
        let s = nodes[2].status()?;
        s["last_error"]
            .as_str()?
            .contains("already spent by another identity")
            .then_some(())
    });
    for (n, others) in [(&nodes[0], "m2"), (&nodes[1], "m2"), (&nodes[2], "m0, m1")] {
        d0.wait_until(
            &format!("{} saying who else shares the name", n.name),
            LONG,
            || {
                let w = n.status()?["cluster_warning"].as_str()?.to_owned();
                w.contains(&format!("members {others} share the name"))
                    .then_some(())
            },
        );
    }
    assert_eq!(idp.refresh_tokens_presented(), vec!["rt-seed".to_owned()]);
    assert_eq!(nodes[2].token(), None);
    no_reuse(&idp);
    // Said in the log too (read whole once m2 has stopped: see above).
    let (_, _, log) = d2.terminate();
    assert!(
        log.contains("share the name"),
        "said in the log too:\n{log}"
    );
}

#[test]
fn a_member_that_saw_a_newer_generation_refuses_an_older_record_and_sends_nothing() {
    let Some((etcd, idp, nodes)) = rotating_cluster(1, Duration::from_secs(3600), 2) else {
        return;
    };
    let d0 = nodes[0].start();
    serving_one_token(&d0, &[&nodes[0]]);
    let record_key = record_key(&etcd);
    // m1 remembers a far newer generation of this record than etcd holds: etcd was
    // restored from an old backup, say (the record opens at its place, and is older).
    let state = nodes[1].sb.path("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    tokend::cluster::memory::Memory::new(Some(&state))
        .store(&record_key, 1000)
        .unwrap();
    let d1 = nodes[1].start();
    d1.wait_until("m1 saying why it refused the record", LONG, || {
        let w = nodes[1].status()?["cluster_warning"].as_str()?.to_owned();
        (w.contains("refused the shared record")
            && w.contains("older than generation 1000 seen before"))
        .then_some(())
    });
    // Made leader (m0 stops), it sends nothing: it does not hold the chain's newest link.
    let (status, _, _) = d0.terminate();
    assert!(status.success());
    d1.wait_until("m1 leading", LONG, || {
        (nodes[1].leader().as_deref() == Some("m1")).then_some(())
    });
    let poke = nodes[1].cmd(&["refresh", "a"]);
    assert_eq!(poke.code(), Some(0), "{}", poke.stderr);
    d1.wait_until("m1 holding with why", LONG, || {
        let e = nodes[1].status()?["last_error"].as_str()?.to_owned();
        e.contains("does not hold the chain's newest link")
            .then_some(())
    });
    assert_eq!(idp.requests().len(), 1, "m1 sent a link");
    assert_eq!(nodes[1].token(), None);
    no_reuse(&idp);
}

/// Clock ticks of CPU (user and system) process `pid` has used.
fn cpu_ticks(pid: nix::unistd::Pid) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the member runs");
    // Fields after the command (which may hold spaces), from the state on: utime and
    // stime are the 12th and 13th.
    let after = &stat[stat.rfind(')').expect("(comm)") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Token requests member `node` made itself, as its metrics count them.
fn own_attempts(node: &Node) -> u64 {
    let (status, text) =
        crate::support::socket_get(&node.socket(), "/metrics").expect("the member's metrics");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| l.starts_with("tokend_refresh_attempts_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn a_member_paused_past_a_compaction_adopts_the_latest_record_quietly_and_asks_nothing() {
    let Some(mut etcd) = EtcdCluster::start(3) else {
        return;
    };
    let lifetime = Duration::from_secs(4);
    let idp = FakeIdp::start(Reply::token(lifetime.as_secs()));
    let nodes = nodes(3, &etcd.endpoints(), &idp.url(), CLIENT);
    for n in &nodes {
        // A lease of 6 s: the renewals and watch checks of a usual deployment's pace
        // (lease_ttl 15 s by default), not of the 2 s the other tests take.
        let text = std::fs::read_to_string(&n.config).expect("the config");
        n.sb.config(&text.replace("lease_ttl = \"2s\"", "lease_ttl = \"6s\""));
    }
    let all: Vec<&Node> = nodes.iter().collect();
    let daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
    serving_one_token(&daemons[0], &all);
    let leader = leader_index(&daemons[0], &all);
    let f = (leader + 1) % 3;
    let (follower, d) = (&nodes[f], &daemons[leader]);
    let others: Vec<&Node> = all
        .iter()
        .copied()
        .filter(|n| n.name != follower.name)
        .collect();
    assert_eq!(own_attempts(follower), 0, "{} never led", follower.name);

    // Stopped while the others write two more records.
    kill(daemons[f].pid(), Signal::SIGSTOP).unwrap();
    let before = idp.issued().len();
    serving_issued(
        d,
        &idp,
        &others,
        before + 2,
        "two tokens while it is stopped",
    );
    // etcd compacted past the revision its watch had reached, and the etcd member it
    // watched through (every member talks to member 0 first) killed: its watch must
    // start again, from a revision that is gone.
    let header = etcd.etcdctl(&["get", "/tokend/test", "--prefix", "-w", "json"]);
    let header: serde_json::Value = serde_json::from_str(&header).expect("etcdctl's json");
    let revision = header["header"]["revision"].as_u64().expect("a revision");
    etcd.etcdctl(&["compact", &revision.to_string()]);
    etcd.kill(0);
    // The next token lives a minute: the CPU measured below is the member's own, not
    // that of adopting the cluster's rotations.
    idp.push(Reply::token(60));
    let issued = idp.issued().len();
    serving_issued(
        d,
        &idp,
        &others,
        issued + 1,
        "the others on the two members left",
    );

    kill(daemons[f].pid(), Signal::SIGCONT).unwrap();
    let latest = d.wait_until("the resumed member serving the latest token", LONG, || {
        let t = idp.issued().last()?.clone();
        (follower.token()? == t).then_some(t)
    });
    println!("{} adopted token #{}", follower.name, idp.issued().len());
    // Quiet from then on: a watch that restarts in a loop costs CPU, and nothing of
    // what it adopts sends it to the provider.
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .expect("a clock tick rate") as u64;
    // The third member, which was never stopped, is the measure of a follower's work.
    let third = 3 - leader - f;
    let start = [f, third].map(|i| cpu_ticks(daemons[i].pid()));
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(10) {
        // The measurement's window, not a wait for a state; the member keeps up meanwhile.
        std::thread::sleep(Duration::from_millis(200));
    }
    let ms = |i: usize, from: u64| {
        Duration::from_millis((cpu_ticks(daemons[i].pid()) - from) * 1000 / ticks_per_second)
    };
    let (used, usual) = (ms(f, start[0]), ms(third, start[1]));
    println!(
        "{} used {used:?} of CPU in 10 s after it adopted ({}, never stopped: {usual:?})",
        follower.name, nodes[third].name
    );
    assert!(used < Duration::from_millis(100), "{used:?} of CPU in 10 s");
    assert_eq!(
        own_attempts(follower),
        0,
        "the resumed member asked the provider:\n{}",
        daemons[f].log()
    );
    let status = follower.status().expect("its status");
    assert_ne!(status["refreshed_by"], follower.name.as_str(), "{status}");
    assert_ne!(follower.token(), None);
    assert!(idp.is_issued(&latest));
}
