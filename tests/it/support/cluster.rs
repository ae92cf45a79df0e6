//! Members of one cluster (`tokend run` with a `[cluster]` section) for the cluster tests
//! over etcd (`cluster.rs`, `cluster/faults.rs`) and over the Kubernetes API
//! (`kube/members.rs`): each member's sandbox and config ([`Node`]), what it says on its
//! socket (token, status, leader, `/v1/cluster`), and bounded waits and checks on the
//! whole membership (one token, one leader, a new token everywhere, no refresh token
//! sent twice). The backend is only the `[cluster]` section's first lines.

use std::borrow::Borrow;
use std::path::PathBuf;
use std::time::Duration;

use super::fake_idp::FakeIdp;
use super::{Daemon, Finished, Sandbox, LONG, SHORT};

/// The cluster key the members seal records with.
pub const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
/// A client_credentials account's secret, in the member's file `secret`.
pub const CLIENT: &str = "client_secret = { file = \"secret\" }\n";

/// The `[cluster]` lines of an etcd backend on `endpoints`, under prefix `/tokend/test`.
pub fn etcd_backend(endpoints: &[String]) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "endpoints = [{}]\nprefix = \"/tokend/test\"\n",
        endpoints.join(", ")
    )
}

/// One member: its sandbox (config, `secret`, `state`, `tokend.sock`, `out/a`).
pub struct Node {
    pub name: String,
    pub sb: Sandbox,
    pub config: PathBuf,
}

impl Node {
    /// Member `m{i}` in a sandbox of its own (a client secret in `secret`), its state
    /// in `state`: the `[cluster]` section is `backend` (the backend's lines, e.g.
    /// [`etcd_backend`]), the member's name, lease_ttl 2 s and `key`; account `a` asks
    /// `token_url` as client `id` (`account`: the account's other lines, e.g.
    /// [`CLIENT`]) and writes `out/a`.
    pub fn new(i: usize, backend: &str, key: &str, token_url: &str, account: &str) -> Node {
        let sb = Sandbox::new();
        sb.write(&sb.path("secret"), "client-secret\n", 0o600);
        let name = format!("m{i}");
        let config = sb.config(&format!(
            "[daemon]\nstate_dir = \"state\"\nsocket = \"tokend.sock\"\n\n\
             [cluster]\n{backend}member = \"{name}\"\nlease_ttl = \"2s\"\nkey = \"{key}\"\n\n\
             [[account]]\nname = \"a\"\ntoken_url = \"{token_url}\"\nclient_id = \"id\"\n\
             min_refresh_interval = \"1s\"\n{account}\n\
             [[account.output]]\npath = \"out/a\"\n",
        ));
        Node { name, sb, config }
    }

    /// The config with `from` (which it must hold) replaced by `to`.
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.config).expect("the config");
        assert!(text.contains(from), "{from:?} in\n{text}");
        self.sb.write(&self.config, &text.replace(from, to), 0o600);
    }

    /// The token in its output, `None` before the first.
    pub fn token(&self) -> Option<String> {
        self.sb.read("out/a")
    }

    pub fn socket(&self) -> PathBuf {
        self.sb.path("tokend.sock")
    }

    /// Account `a`'s status (`tokend status --json`), `None` while it does not answer.
    pub fn status(&self) -> Option<serde_json::Value> {
        super::account_status(&self.socket(), "a")
    }

    /// The member account `a`'s status names as leader.
    pub fn leader(&self) -> Option<String> {
        self.status()?["leader"].as_str().map(str::to_owned)
    }

    /// `GET /v1/cluster`, when it answers 200 with JSON.
    pub fn cluster(&self) -> Option<serde_json::Value> {
        let (code, body) = super::socket_get(&self.socket(), "/v1/cluster")?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    pub fn start(&self) -> Daemon {
        Daemon::start(&self.config)
    }

    /// `tokend run` with its wall clock `offset` off (libfaketime, e.g. `+5m`); the
    /// monotonic clock is left alone, as a clock that is set leaves it. The library is
    /// preloaded into tokend itself (the `faketime` wrapper would stand between the
    /// test and the daemon's signals).
    pub fn start_skewed(&self, offset: &str) -> Daemon {
        let mut cmd = super::tokend();
        cmd.env("LD_PRELOAD", faketime_library())
            .env("FAKETIME", offset)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .arg("run")
            .arg("-c")
            .arg(&self.config);
        Daemon::spawn(cmd)
    }

    /// `tokend ARGS --socket SOCKET`, to its end (within [`LONG`]).
    pub fn cmd(&self, args: &[&str]) -> Finished {
        self.cmd_within(args, LONG)
    }

    /// `tokend ARGS --socket SOCKET`, to its end within `timeout`.
    pub fn cmd_within(&self, args: &[&str], timeout: Duration) -> Finished {
        let mut c = super::tokend();
        c.args(args).arg("--socket").arg(self.socket());
        super::finish(c, timeout)
    }

    /// `tokend check -c CONFIG`, to its end.
    pub fn check(&self) -> Finished {
        let mut c = super::tokend();
        c.arg("check").arg("-c").arg(&self.config);
        super::finish(c, SHORT)
    }
}

/// What Debian's `faketime` preloads (asked of it: no path is written here).
fn faketime_library() -> String {
    let out = std::process::Command::new("faketime")
        .args(["-f", "+0", "sh", "-c", "printf %s \"$LD_PRELOAD\""])
        .output()
        .expect("faketime runs (Debian's faketime; scripts/test installs it)");
    let lib = String::from_utf8(out.stdout).expect("a path");
    assert!(lib.contains("faketime"), "faketime preloads {lib:?}");
    lib
}

/// The index of member `name` (members are named `m<i>`).
pub fn index(name: &str) -> usize {
    name[1..].parse().expect("members are named m<i>")
}

/// kill -9 of member `i`, which runs.
pub fn kill_9(daemons: &mut [Option<Daemon>], i: usize) {
    let d = daemons[i].take().expect("a running member");
    nix::sys::signal::kill(d.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
}

/// Waits until every member in `nodes` serves one token; that token.
pub fn serving_one_token<N: Borrow<Node>>(d: &Daemon, nodes: &[N]) -> String {
    d.wait_until("every member serving one token", LONG, || {
        let t = nodes[0].borrow().token()?;
        nodes
            .iter()
            .all(|n| n.borrow().token().as_deref() == Some(t.as_str()))
            .then_some(t)
    })
}

/// Waits until every member in `nodes` names the same leader; its name.
pub fn one_leader<N: Borrow<Node>>(d: &Daemon, nodes: &[N]) -> String {
    d.wait_until("one leader known to all", LONG, || {
        let l: Vec<String> = nodes.iter().filter_map(|n| n.borrow().leader()).collect();
        (l.len() == nodes.len() && l.iter().all(|x| *x == l[0])).then(|| l[0].clone())
    })
}

/// Waits (within `timeout`) until the IdP issued a token after the first `seen` and every
/// member in `nodes` serves the latest; that token.
pub fn serving_a_new_token<N: Borrow<Node>>(
    d: &Daemon,
    idp: &FakeIdp,
    nodes: &[N],
    seen: usize,
    timeout: Duration,
) -> String {
    d.wait_until("a new token everywhere", timeout, || {
        let issued = idp.issued();
        let t = issued.last().filter(|_| issued.len() > seen)?.clone();
        nodes
            .iter()
            .all(|n| n.borrow().token().as_deref() == Some(t.as_str()))
            .then_some(t)
    })
}

/// Waits until every member in `nodes` says it is degraded (cut off from the backend).
pub fn all_degraded<N: Borrow<Node>>(d: &Daemon, nodes: &[N]) {
    for n in nodes {
        let n = n.borrow();
        d.wait_until(&format!("{} degraded", n.name), LONG, || {
            (n.status()?["degraded"] == true).then_some(())
        });
    }
}

/// No refresh token was presented twice, and the chain's family (seeded `rt-seed`) is
/// alive.
pub fn no_reuse(idp: &FakeIdp) {
    assert!(
        idp.reused_refresh_tokens().is_empty(),
        "a refresh token was sent twice: {:?}",
        idp.reused_refresh_tokens()
    );
    assert!(
        !idp.family_revoked("rt-seed"),
        "the chain's family was revoked"
    );
}

/// Three members share one request per token lifetime (4-second tokens, three of them
/// within `timeout`): every member serves the latest token, every request got a token,
/// at most one request per cycle (refreshed at about 3.2 s), and every member names the
/// same leader; its name.
pub fn one_request_per_lifetime(
    d: &Daemon,
    idp: &FakeIdp,
    nodes: &[Node],
    daemons: &[Daemon],
    timeout: Duration,
) -> String {
    d.wait_until("three tokens issued", timeout, || {
        (idp.issued().len() >= 3).then_some(())
    });
    // Every member serves the latest token within a second of its write.
    let latest = idp.issued().last().cloned().unwrap();
    for (n, d) in nodes.iter().zip(daemons) {
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
    // Over that time, one member asked: at most one request per cycle.
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
    leaders[0].clone()
}

/// Starts every member in `nodes`: they serve one token, which took one request (joining
/// members ask nothing), and member 0 names a leader. The daemons, the token and the
/// leader's name.
pub fn start_one_token_one_leader(
    idp: &FakeIdp,
    nodes: &[Node],
) -> (Vec<Option<Daemon>>, String, String) {
    let daemons: Vec<Option<Daemon>> = nodes.iter().map(|n| Some(n.start())).collect();
    let d0 = daemons[0].as_ref().unwrap();
    let token = serving_one_token(d0, nodes);
    assert_eq!(idp.requests().len(), 1, "joining members asked nothing");
    let leader = d0.wait_until("a leader", SHORT, || nodes[0].leader());
    (daemons, token, leader)
}

/// `tokend once` on the third of `nodes` beside the first two running: it adopts their
/// shared token (its output holds it) and the provider is not asked.
pub fn once_adopts_the_shared_token(idp: &FakeIdp, nodes: &[Node]) {
    let daemons: Vec<Daemon> = nodes[..2].iter().map(Node::start).collect();
    let token = serving_one_token(&daemons[0], &nodes[..2]);
    assert_eq!(idp.requests().len(), 1);
    let once = super::once(&nodes[2].config, &[]);
    assert_eq!(once.code(), Some(0), "{}", once.stderr);
    assert_eq!(nodes[2].token().as_deref(), Some(token.as_str()));
    assert_eq!(idp.requests().len(), 1, "once asked the provider nothing");
}

/// A refresh-token chain (6-second tokens, seeded `rt-seed`) through `rounds` kills -9 of
/// the leader, each restarted at once: no refresh token sent twice, the family never
/// revoked, and the chain goes on for two more rotations.
pub fn chain_through_leader_kills(idp: &FakeIdp, nodes: &[Node], rounds: usize) {
    let mut daemons: Vec<Option<Daemon>> = nodes.iter().map(|n| Some(n.start())).collect();
    for round in 0..rounds {
        let live = daemons.iter().position(Option::is_some).unwrap();
        let d = daemons[live].as_ref().unwrap();
        let seen = idp.issued().len();
        // A new token arrived and every member serves it: no request is on the wire now
        // (the next comes at 80% of 6 s), so a kill loses nothing. (A kill -9 while a
        // refresh_token request is on the wire loses the rotated token with the
        // process, in a cluster or not.)
        let latest = serving_a_new_token(d, idp, nodes, seen, LONG);
        let leader = d.wait_until("a leader", SHORT, || nodes[live].leader());
        let li = index(&leader);
        println!("round {round}: {leader} leads, serving {}", &latest[..8]);
        assert_eq!(
            idp.requests().len(),
            idp.issued().len(),
            "no request on the wire at the kill"
        );
        kill_9(&mut daemons, li);
        // Restarted at once: it comes back as a follower (or leader) of the same chain.
        daemons[li] = Some(nodes[li].start());
    }
    let d = daemons[0].as_ref().unwrap();
    let before = idp.issued().len();
    d.wait_until("two more rotations", Duration::from_secs(40), || {
        (idp.issued().len() >= before + 2).then_some(())
    });
    no_reuse(idp);
}
