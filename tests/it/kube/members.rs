//! Cluster mode on the Kubernetes backend (SPEC §8, issue #22): `tokend run` members
//! against the real API server (`support/kube.rs`) and the fake IdP, each member with a
//! service account of its own limited by the Role tokend ships (leases and secrets: get,
//! list, watch, create, update). One namespace per test on the shared server.

use std::time::{Duration, Instant};

use crate::support::cluster::{
    all_degraded, chain_through_leader_kills, index, kill_9, once_adopts_the_shared_token,
    one_request_per_lifetime, serving_a_new_token, serving_one_token, start_one_token_one_leader,
    Node, CLIENT, KEY,
};
use crate::support::fake_idp::{FakeIdp, Reply};
use crate::support::kube::KubeApiServer;
use crate::support::{Daemon, LONG, SHORT};

const ALL: [&str; 5] = ["get", "list", "watch", "create", "update"];

/// A namespace of the test's own, and `n` members (`m0`, ...) each with a service
/// account (every verb on leases, `secret_verbs` on secrets) and a kubeconfig of its
/// own, sharing account `a` (`extra` lines).
fn nodes(
    kube: &KubeApiServer,
    ns: &str,
    idp: &FakeIdp,
    n: usize,
    secret_verbs: &[&str],
    extra: &str,
) -> Vec<Node> {
    kube.create_namespace(ns);
    (0..n)
        .map(|i| {
            let name = format!("m{i}");
            kube.create_service_account(ns, &name);
            kube.apply(ns, &super::role_for(ns, &name, &ALL, secret_verbs));
            let kubeconfig = kube.service_account_kubeconfig(ns, &name);
            let backend = format!(
                "backend = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespace = \"{ns}\"\n",
                kubeconfig.display()
            );
            Node::new(i, &backend, KEY, &idp.url(), &format!("{CLIENT}{extra}"))
        })
        .collect()
}

/// Done when 1 and 9: three members, one provider request per token lifetime, the same
/// token everywhere, and the API server's objects show nothing in the clear.
#[test]
fn kube_members_share_one_request_per_lifetime_and_the_secret_shows_nothing_in_clear() {
    let Some(kube) = KubeApiServer::shared() else {
        return;
    };
    let ns = "kube-share";
    let idp = FakeIdp::start(Reply::token(4));
    let nodes = nodes(kube, ns, &idp, 3, &ALL, "");
    let daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
    // Three lifetimes of 4-second tokens (refreshed at about 3.2 s).
    let leader =
        one_request_per_lifetime(&daemons[0], &idp, &nodes, &daemons, Duration::from_secs(40));
    for n in &nodes {
        let v = n.cluster().expect("/v1/cluster answers");
        assert_eq!(v["member"], n.name.as_str());
        assert_eq!(v["reachable"], true, "{v}");
        assert_eq!(v["accounts"][0]["leader"], leader.as_str(), "{v}");
    }
    let check = nodes[0].check();
    assert!(
        check
            .stdout
            .contains("the Kubernetes API server is reachable; 1 Lease(s) of tokend"),
        "{}",
        check.stdout
    );

    // Who leads, as the operator sees it.
    let held = kube.admin(&[
        "get",
        "lease",
        "-n",
        ns,
        "-l",
        "app.kubernetes.io/managed-by=tokend",
        "-o",
        "jsonpath={.items[*].spec.holderIdentity}",
    ]);
    assert_eq!(held.trim(), leader);

    // Done when 9: nothing in the clear.
    let yaml = kube.admin(&["get", "secret", "-n", ns, "-o", "yaml"]);
    let leases = kube.admin(&["get", "lease", "-n", ns, "-o", "yaml"]);
    assert!(
        yaml.contains("app.kubernetes.io/managed-by: tokend"),
        "{yaml}"
    );
    for (what, text) in [("secrets", &yaml), ("leases", &leases)] {
        for t in idp.issued() {
            assert!(!text.contains(&t), "a token in the {what}");
        }
        for clear in [
            "client-secret",
            "\"a\"",
            "name: a\n",
            &idp.url(),
            "127.0.0.1",
        ] {
            assert!(
                !text.contains(clear),
                "{clear:?} in the clear in the {what}:\n{text}"
            );
        }
    }
    // Nor base64 of a token (a Secret's data is only base64).
    {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        for t in idp.issued() {
            assert!(!yaml.contains(&b64.encode(t.as_bytes())));
        }
    }
}

/// Done when 2: kill -9 of the leader, another leads within lease_ttl + 1 s and the
/// inherited token costs no request; SIGTERM hands over in under a second.
#[test]
fn kube_a_killed_leader_is_replaced_within_the_lease_and_a_stopped_one_at_once() {
    let Some(kube) = KubeApiServer::shared() else {
        return;
    };
    let ns = "kube-failover";
    let idp = FakeIdp::start(Reply::token(3600));
    let nodes = nodes(kube, ns, &idp, 3, &ALL, "refresh_every = \"30s\"");
    let (mut daemons, token, leader) = start_one_token_one_leader(&idp, &nodes);
    let li = index(&leader);

    // kill -9: another member leads within lease_ttl (2 s) + 1 s.
    kill_9(&mut daemons, li);
    let killed = Instant::now();
    let others: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    let watcher = daemons[others[0]].as_ref().unwrap();
    let next = watcher.wait_until("a new leader", LONG, || {
        let l: Vec<String> = others.iter().filter_map(|i| nodes[*i].leader()).collect();
        (l.len() == 2 && l[0] == l[1] && l[0] != leader).then(|| l[0].clone())
    });
    let failover = killed.elapsed();
    println!("failover after kill -9: {failover:?}");
    assert!(
        failover <= Duration::from_secs(3) + Duration::from_millis(500),
        "{failover:?}"
    );
    for i in &others {
        assert_eq!(nodes[*i].token().as_deref(), Some(token.as_str()));
    }
    assert_eq!(
        idp.requests().len(),
        1,
        "the inherited token cost no request"
    );

    // SIGTERM of the new leader: the last member leads in under a second.
    let ni = index(&next);
    let last = others.iter().copied().find(|i| *i != ni).unwrap();
    let (status, _, _) = daemons[ni].take().unwrap().terminate();
    assert!(status.success());
    let stopped = Instant::now();
    daemons[last]
        .as_ref()
        .unwrap()
        .wait_until("the last member leading", SHORT, || {
            (nodes[last].leader().as_deref() == Some(nodes[last].name.as_str())).then_some(())
        });
    let handover = stopped.elapsed();
    println!("handover after SIGTERM: {handover:?}");
    assert!(handover < Duration::from_secs(1), "{handover:?}");
    assert_eq!(idp.requests().len(), 1, "the handover cost no request");
}

/// Done when 5: a member whose Role lacks `update` on secrets says so (verb, resource,
/// namespace, the Role to apply), and its output keeps the last token.
#[test]
fn kube_a_role_without_update_on_secrets_is_a_clear_error_and_the_token_stays() {
    let Some(kube) = KubeApiServer::shared() else {
        return;
    };
    let ns = "kube-rbac-update";
    let idp = FakeIdp::start(Reply::token(3600));
    // Update on leases, not on secrets: the member leads, and fails where it writes
    // the token (with neither, which it met first depended on timing).
    let nodes = nodes(kube, ns, &idp, 1, &ALL[..4], "");
    let n = &nodes[0];
    // The last token, from an earlier run without the cluster.
    std::fs::create_dir_all(n.sb.path("out")).unwrap();
    n.sb.write(&n.sb.path("out/a"), "last-token\n", 0o600);
    let d = Daemon::start(&n.config);
    let problem = d.wait_until("the RBAC problem in /v1/cluster", LONG, || {
        n.cluster()?["problem"].as_str().map(str::to_owned)
    });
    for word in ["update", "secrets", ns, "Role"] {
        assert!(problem.contains(word), "{word:?} in {problem:?}");
    }
    assert_eq!(idp.requests().len(), 0, "no claim landed: nothing sent");
    assert_eq!(n.token().as_deref().map(str::trim), Some("last-token"));
    // The log as a whole once the daemon has stopped: read live, the line written just
    // before the problem showed may still be in the pipe.
    let (_, _, log) = d.terminate();
    assert!(log.contains("may not update secrets"), "{log}");
}

/// Done when 4: a refresh-token chain through 10 leader kills (each restarted at once):
/// no refresh token sent twice, the family never revoked.
#[test]
fn kube_a_refresh_token_chain_survives_ten_leader_kills_with_no_token_sent_twice() {
    let Some(kube) = KubeApiServer::shared() else {
        return;
    };
    let ns = "kube-chain";
    let idp = FakeIdp::start(Reply::token(6));
    idp.seed_refresh_token("rt-seed");
    let extra =
        "grant_type = \"refresh_token\"\nrefresh_token = \"rt-seed\"\nclient_auth = \"none\"";
    let nodes = nodes(kube, ns, &idp, 3, &ALL, extra);
    for n in &nodes {
        n.edit_config("client_secret = { file = \"secret\" }\n", "");
    }
    chain_through_leader_kills(&idp, &nodes, 10);
}

/// Done when 6, in-cluster: the member finds the API server through
/// KUBERNETES_SERVICE_HOST/PORT and the service account's directory (token, ca.crt,
/// namespace); the token file is replaced by a new token and the old one revoked (its
/// bound Secret deleted): the member goes on without a restart.
#[test]
fn kube_a_rotated_service_account_token_file_is_read_again_in_cluster() {
    let Some(kube) = KubeApiServer::shared() else {
        return;
    };
    let ns = "kube-rotate";
    let idp = FakeIdp::start(Reply::token(3600));
    let mut nodes = nodes(kube, ns, &idp, 1, &ALL, "");
    let n = nodes.remove(0);
    // The pod's service account directory.
    let sa = n.sb.path("serviceaccount");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::copy(kube.ca_cert(), sa.join("ca.crt")).unwrap();
    std::fs::write(sa.join("namespace"), ns).unwrap();
    // A token bound to a Secret: deleting the Secret revokes it.
    let mint = |bound: &str| {
        kube.admin(&["create", "secret", "generic", bound, "-n", ns]);
        kube.admin(&[
            "create",
            "token",
            "m0",
            "-n",
            ns,
            "--bound-object-kind=Secret",
            &format!("--bound-object-name={bound}"),
            "--duration=3600s",
        ])
        .trim()
        .to_owned()
    };
    let write_token = |t: &str| {
        // As the kubelet does: a new file renamed over the old.
        let tmp = sa.join(".token.new");
        std::fs::write(&tmp, t).unwrap();
        std::fs::rename(&tmp, sa.join("token")).unwrap();
    };
    write_token(&mint("bound-1"));
    let text = std::fs::read_to_string(&n.config).unwrap();
    let kubeconfig_line = text
        .lines()
        .find(|l| l.starts_with("kubeconfig = "))
        .unwrap()
        .to_owned();
    n.edit_config(&format!("{kubeconfig_line}\n"), "");
    let server = url::Url::parse(kube.server()).unwrap();
    let host = server.host_str().unwrap().to_owned();
    let port = server.port_or_known_default().unwrap().to_string();
    let d = Daemon::start_with_env(
        &n.config,
        &[
            ("KUBERNETES_SERVICE_HOST", host.as_str()),
            ("KUBERNETES_SERVICE_PORT", port.as_str()),
            ("TOKEND_SERVICEACCOUNT_DIR", sa.to_str().unwrap()),
        ],
    );
    d.wait_until("a token", LONG, || n.token());
    d.wait_until("leading", SHORT, || {
        (n.leader().as_deref() == Some("m0")).then_some(())
    });

    write_token(&mint("bound-2"));
    kube.admin(&["delete", "secret", "bound-1", "-n", ns]);
    // The member renews its Lease every third of lease_ttl: with the old token only, it
    // would lose the lead and say 401. A refresh asked now must go through it.
    let before = idp.requests().len();
    let refresh = n.cmd_within(&["refresh", "a"], SHORT);
    assert_eq!(refresh.code(), Some(0), "{}", refresh.stderr);
    d.wait_until("the refresh through the new token", LONG, || {
        (idp.requests().len() > before).then_some(())
    });
    d.wait_until("the refreshed token shared", LONG, || {
        let t = n.token()?;
        (idp.issued().last() == Some(&t)).then_some(())
    });
    let v = n.cluster().unwrap();
    assert_eq!(v["reachable"], true, "{v}");
    assert!(v["problem"].is_null(), "{v}");
    let (_, _, log) = d.terminate();
    assert!(log.contains("the service account token changed"), "{log}");
}

/// Done when 7: `tokend once` beside a running cluster (an init container of a new
/// replica) adopts the shared token: its output holds it, and the provider is not asked.
#[test]
fn kube_once_beside_a_running_cluster_adopts_the_shared_token() {
    let Some(kube) = KubeApiServer::shared() else {
        return;
    };
    let ns = "kube-once";
    let idp = FakeIdp::start(Reply::token(3600));
    let nodes = nodes(kube, ns, &idp, 3, &ALL, "");
    once_adopts_the_shared_token(&idp, &nodes);
}

/// The kube-apiserver process of `kube` (from apiserver.sh's DIR/pids).
fn apiserver_pid(kube: &KubeApiServer) -> nix::unistd::Pid {
    let pids = std::fs::read_to_string(kube.dir().join("pids")).unwrap();
    let pid = pids
        .lines()
        .find(|l| l.ends_with("kube-apiserver"))
        .and_then(|l| l.split_whitespace().next())
        .expect("apiserver.sh lists kube-apiserver's pid");
    nix::unistd::Pid::from_raw(pid.parse().unwrap())
}

/// Done when 3: the API server stopped (SIGSTOP: it answers nothing) for 3 x lease_ttl,
/// then going on: every member serves on meanwhile (degraded), then they converge on one
/// leader and one token, and no record is refused (none older put over a newer one).
#[test]
fn kube_the_api_server_stopped_for_three_lease_ttls_members_serve_on_then_converge() {
    let Some(kube) = KubeApiServer::start(&Default::default()) else {
        return;
    };
    let ns = "kube-outage";
    let idp = FakeIdp::start(Reply::token(8));
    let nodes = nodes(&kube, ns, &idp, 3, &ALL, "");
    let daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
    let d0 = &daemons[0];
    serving_one_token(d0, &nodes);
    d0.wait_until("a leader", SHORT, || nodes[0].leader());

    let apiserver = apiserver_pid(&kube);
    nix::sys::signal::kill(apiserver, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    all_degraded(d0, &nodes);
    // Serving on: each output holds a token the IdP issued and that has not expired.
    let during = idp.issued();
    for n in &nodes {
        let t = n.token().expect("a token meanwhile");
        assert!(
            during.contains(&t),
            "{} serves a token the IdP issued",
            n.name
        );
    }
    // 3 x lease_ttl (2 s) in all, measured from the stop; a bound on a fault's length,
    // not a wait for a state.
    let outage = Duration::from_secs(6);
    std::thread::sleep(outage.saturating_sub(stopped.elapsed()));
    nix::sys::signal::kill(apiserver, nix::sys::signal::Signal::SIGCONT).unwrap();

    let converged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::support::wait_until("one leader known to all, none degraded", LONG, || {
            let mut leaders = Vec::new();
            for n in &nodes {
                let s = n.status()?;
                // Said only when true.
                if s["degraded"] == true {
                    return None;
                }
                leaders.push(s["leader"].as_str()?.to_owned());
            }
            leaders
                .iter()
                .all(|l| *l == leaders[0])
                .then(|| leaders[0].clone())
        })
    }));
    let Ok(leader) = converged else {
        for (n, d) in nodes.iter().zip(&daemons) {
            eprintln!("--- {}: {:?}\n{}", n.name, n.status(), d.log());
        }
        panic!("no convergence after the outage");
    };
    println!("after the outage {leader} leads");
    // The next token the leader fetches reaches every member.
    let seen = idp.issued().len();
    serving_a_new_token(d0, &idp, &nodes, seen, Duration::from_secs(30));
    for d in &daemons {
        assert!(
            !d.log().contains("refused the shared record"),
            "{}",
            d.log()
        );
    }
}

/// Clear errors for what operators get wrong, each keeping the member's last token: a
/// member with another cluster key takes no part and says so; one whose namespace is
/// not its Role's is refused naming the namespace; a record Secret altered by hand is
/// refused loudly, and the leader writes its state back over it.
#[test]
fn kube_another_key_a_wrong_namespace_and_an_altered_secret_are_said_clearly() {
    let Some(kube) = KubeApiServer::shared() else {
        return;
    };
    let ns = "kube-mistakes";
    let idp = FakeIdp::start(Reply::token(3600));
    let nodes = nodes(kube, ns, &idp, 3, &ALL, "");
    let other_key = "ff".repeat(32);
    nodes[1].edit_config(KEY, &other_key);
    nodes[2].edit_config(
        &format!("namespace = \"{ns}\""),
        "namespace = \"kube-elsewhere\"",
    );
    for n in &nodes[1..] {
        std::fs::create_dir_all(n.sb.path("out")).unwrap();
        n.sb.write(&n.sb.path("out/a"), "last-token\n", 0o600);
    }
    let d0 = Daemon::start(&nodes[0].config);
    d0.wait_until("m0 serving", LONG, || nodes[0].token());
    let d1 = Daemon::start(&nodes[1].config);
    let d2 = Daemon::start(&nodes[2].config);
    let problem = |n: &Node, d: &Daemon| {
        d.wait_until(&format!("{}'s problem said", n.name), LONG, || {
            n.cluster()?["problem"].as_str().map(str::to_owned)
        })
    };
    let p1 = problem(&nodes[1], &d1);
    assert!(p1.contains("another cluster.key"), "{p1}");
    let p2 = problem(&nodes[2], &d2);
    for word in [
        "may not get secrets",
        "\"kube-elsewhere\"",
        "cluster.namespace",
    ] {
        assert!(p2.contains(word), "{word:?} in {p2:?}");
    }
    assert_eq!(
        nodes[2].token().as_deref().map(str::trim),
        Some("last-token")
    );
    assert!(!p1.contains(KEY) && !p1.contains(&other_key));

    // The record Secret altered by hand.
    let names = kube.admin(&[
        "get",
        "secrets",
        "-n",
        ns,
        "-l",
        "app.kubernetes.io/managed-by=tokend",
        "-o",
        "name",
    ]);
    let record = names
        .lines()
        .find(|l| !l.ends_with("-ask") && !l.contains("keycheck"))
        .expect("the record Secret")
        .to_owned();
    kube.admin(&[
        "patch",
        &record,
        "-n",
        ns,
        "-p",
        r#"{"data":{"record":"dGFtcGVyZWQ="}}"#,
    ]);
    d0.wait_until("m0 saying it refused the record", LONG, || {
        let w = nodes[0].status()?["cluster_warning"].as_str()?.to_owned();
        w.contains("refused the shared record").then_some(())
    });
    let served = nodes[0].token().unwrap();
    assert!(idp.is_issued(&served), "m0 serves on");
    // The leader writes its state back: the record opens again.
    let d0_refresh = nodes[0].cmd_within(&["refresh", "a"], SHORT);
    assert_eq!(d0_refresh.code(), Some(0), "{}", d0_refresh.stderr);
    d0.wait_until("the record written back", LONG, || {
        let data = kube.admin(&["get", &record, "-n", ns, "-o", "jsonpath={.data.record}"]);
        (data.trim() != "dGFtcGVyZWQ=").then_some(())
    });
}
