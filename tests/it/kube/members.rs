//! Cluster mode on the Kubernetes backend (SPEC §8, issue #22): `tokend run` members
//! against the real API server (`support/kube.rs`) and the fake IdP, each member with a
//! service account of its own limited by the Role tokend ships (leases and secrets: get,
//! list, watch, create, update). One namespace per test on the shared server.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::fake_idp::{FakeIdp, Reply};
use crate::support::kube::KubeApiServer;
use crate::support::{Daemon, Sandbox, LONG, SHORT};

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const ALL: [&str; 5] = ["get", "list", "watch", "create", "update"];

struct Node {
    name: String,
    sb: Sandbox,
    config: PathBuf,
}

impl Node {
    fn token(&self) -> Option<String> {
        self.sb.read("out/a")
    }

    fn leader(&self) -> Option<String> {
        crate::support::account_status(&self.sb.path("tokend.sock"), "a")?["leader"]
            .as_str()
            .map(str::to_owned)
    }

    fn cluster(&self) -> Option<serde_json::Value> {
        let (code, body) = crate::support::socket_get(&self.sb.path("tokend.sock"), "/v1/cluster")?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }
}

/// A namespace of the test's own, and `n` members (`m0`, ...) each with a service
/// account (`verbs` on leases and secrets) and a kubeconfig of its own, sharing account
/// `a` (`extra` lines).
fn nodes(
    kube: &KubeApiServer,
    ns: &str,
    idp: &FakeIdp,
    n: usize,
    verbs: &[&str],
    extra: &str,
) -> Vec<Node> {
    kube.create_namespace(ns);
    (0..n)
        .map(|i| {
            let name = format!("m{i}");
            kube.create_service_account(ns, &name);
            kube.apply(ns, &super::role(ns, &name, verbs));
            let kubeconfig = kube.service_account_kubeconfig(ns, &name);
            let sb = Sandbox::new();
            sb.write(&sb.path("secret"), "client-secret\n", 0o600);
            let config = sb.config(&format!(
                "[daemon]\nstate_dir = \"state\"\nsocket = \"tokend.sock\"\n\n\
                 [cluster]\nbackend = \"kubernetes\"\nkubeconfig = \"{}\"\nnamespace = \"{ns}\"\n\
                 member = \"{name}\"\nlease_ttl = \"2s\"\nkey = \"{KEY}\"\n\n\
                 [[account]]\nname = \"a\"\ntoken_url = \"{}\"\nclient_id = \"id\"\n\
                 client_secret = {{ file = \"secret\" }}\nmin_refresh_interval = \"1s\"\n{extra}\n\
                 [[account.output]]\npath = \"out/a\"\n",
                kubeconfig.display(),
                idp.url()
            ));
            Node { name, sb, config }
        })
        .collect()
}

/// Waits until every member serves one token; that token.
fn serving_one_token(d: &Daemon, nodes: &[&Node]) -> String {
    d.wait_until("every member serving one token", LONG, || {
        let t = nodes[0].token()?;
        nodes
            .iter()
            .all(|n| n.token().as_deref() == Some(t.as_str()))
            .then_some(t)
    })
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
    let daemons: Vec<Daemon> = nodes.iter().map(|n| Daemon::start(&n.config)).collect();
    // Three lifetimes of 4-second tokens (refreshed at about 3.2 s).
    daemons[0].wait_until("three tokens issued", Duration::from_secs(40), || {
        (idp.issued().len() >= 3).then_some(())
    });
    let latest = idp.issued().last().cloned().unwrap();
    for (n, d) in nodes.iter().zip(&daemons) {
        d.wait_until(
            &format!("{} serving the latest token", n.name),
            SHORT,
            || {
                n.token()
                    .filter(|t| *t == latest || idp.issued().last() == Some(t))
            },
        );
    }
    let requests = idp.requests();
    assert_eq!(
        requests.len(),
        idp.issued().len(),
        "every request got a token"
    );
    let span = requests.last().unwrap().at - requests[0].at;
    assert!(
        (requests.len() as f64) <= span.as_secs_f64() / 3.0 + 1.5,
        "{} requests in {span:?} for 3 members",
        requests.len()
    );
    let leaders: Vec<String> = nodes.iter().filter_map(Node::leader).collect();
    assert_eq!(
        leaders.len(),
        3,
        "every member knows who leads: {leaders:?}"
    );
    assert!(leaders.iter().all(|l| *l == leaders[0]), "{leaders:?}");
    for n in &nodes {
        let v = n.cluster().expect("/v1/cluster answers");
        assert_eq!(v["member"], n.name.as_str());
        assert_eq!(v["reachable"], true, "{v}");
    }

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
    assert_eq!(held.trim(), leaders[0]);

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
    let mut daemons: Vec<Option<Daemon>> = nodes
        .iter()
        .map(|n| Some(Daemon::start(&n.config)))
        .collect();
    let all: Vec<&Node> = nodes.iter().collect();
    let token = serving_one_token(daemons[0].as_ref().unwrap(), &all);
    assert_eq!(idp.requests().len(), 1, "joining members asked nothing");
    let leader = daemons[0]
        .as_ref()
        .unwrap()
        .wait_until("a leader", SHORT, || nodes[0].leader());
    let li: usize = leader[1..].parse().unwrap();

    // kill -9: another member leads within lease_ttl (2 s) + 1 s.
    let d = daemons[li].take().unwrap();
    nix::sys::signal::kill(d.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
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
    let ni: usize = next[1..].parse().unwrap();
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
    assert!(d.log().contains("may not update secrets"), "{}", d.log());
}
