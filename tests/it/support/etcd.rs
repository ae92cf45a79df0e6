//! Real etcd members (Debian's etcd-server) on loopback ports, for cluster tests: one or
//! three members in a temporary directory, each killable and restartable, all stopped
//! when dropped. `EtcdCluster::start` returns `None` (and the test says it skipped) only
//! where no `etcd` binary exists; `scripts/test` installs it, so CI runs these tests.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use super::pki::Pki;

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    /// With TLS: the CA, the client certificate and key (PEM files in `dir`).
    tls: Option<Tls>,
}

/// Files of a TLS setup made with openssl: a CA, etcd's server certificate (for
/// 127.0.0.1), and a client certificate etcd requires.
#[derive(Clone)]
pub struct Tls {
    pub ca: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
    server_cert: std::path::PathBuf,
    server_key: std::path::PathBuf,
}

fn make_tls(dir: &std::path::Path) -> Tls {
    let pki = Pki::new(dir);
    // etcd's JSON gateway calls its own gRPC side with the server certificate as a
    // client certificate: it needs both usages.
    let (server_cert, server_key) = pki.issue(
        "etcd",
        "127.0.0.1",
        "subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth, clientAuth\n",
        "p256",
        "ca",
    );
    let (client_cert, client_key) = pki.client("client", "tokend-test", "p256", "ca");
    Tls {
        ca: pki.path("ca.crt"),
        client_cert,
        client_key,
        server_cert,
        server_key,
    }
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers; `None` without etcd.
    pub fn start(n: usize) -> Option<EtcdCluster> {
        Self::start_with(n, false)
    }

    /// [`EtcdCluster::start`], clients speaking TLS and authenticated by certificate.
    pub fn start_tls(n: usize) -> Option<EtcdCluster> {
        Self::start_with(n, true)
    }

    fn start_with(n: usize, tls: bool) -> Option<EtcdCluster> {
        if Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            println!("SKIPPED: no etcd binary (Debian's etcd-server; scripts/test installs it)");
            return None;
        }
        let dir = tempfile::tempdir().expect("a directory for etcd");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let tls = tls.then(|| make_tls(dir.path()));
        let mut c = EtcdCluster { dir, members, tls };
        for i in 0..n {
            c.launch(i);
        }
        c.wait_healthy(Duration::from_secs(30));
        Some(c)
    }

    fn launch(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let m = &self.members[i];
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let data = self.dir.path().join(&m.name);
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", m.name)))
            .expect("an etcd log file");
        let mut cmd = Command::new("etcd");
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("{scheme}://127.0.0.1:{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("{scheme}://127.0.0.1:{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-state")
            .arg("new")
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("{scheme}://127.0.0.1:{}", m.client))
            .collect()
    }

    /// The TLS files, when started with [`EtcdCluster::start_tls`].
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// The index of the member that is etcd's Raft leader now, if one says so.
    pub fn raft_leader(&self) -> Option<usize> {
        for (i, e) in self.endpoints().iter().enumerate() {
            let out = Command::new("curl")
                .args(["-sf", "-m", "1", "-d", "{}"])
                .arg(format!("{e}/v3/maintenance/status"))
                .output()
                .ok()?;
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                continue;
            };
            let me = v["header"]["member_id"].as_str().map(str::to_owned);
            if me.is_some() && me.as_deref() == v["leader"].as_str() {
                return Some(i);
            }
        }
        None
    }

    /// Turns on etcd's authentication: a `root` user, and `user` with `password` allowed
    /// to read and write under `prefix` only.
    pub fn enable_auth(&self, user: &str, password: &str, prefix: &str) {
        let endpoints = self.endpoints().join(",");
        let run = |args: &[&str]| {
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={endpoints}"))
                .args(args)
                .output()
                .expect("etcdctl runs");
            assert!(
                out.status.success(),
                "etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["user", "add", "root:root-password"]);
        run(&["user", "add", &format!("{user}:{password}")]);
        run(&["role", "add", "tokend"]);
        run(&[
            "role",
            "grant-permission",
            "tokend",
            "--prefix=true",
            "readwrite",
            prefix,
        ]);
        run(&["user", "grant-role", user, "tokend"]);
        run(&["auth", "enable"]);
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops member `i` with SIGSTOP: it hangs, its connections stay open, and the
    /// others keep their quorum.
    pub fn pause(&self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets member `i` go on after [`EtcdCluster::pause`].
    pub fn resume(&self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, i: usize, signal: nix::sys::signal::Signal) {
        if let Some(c) = &self.members[i].child {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, signal).expect("signal etcd");
        }
    }

    /// `etcdctl ARGS` against every member; its output.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .args(args)
            .output()
            .expect("etcdctl runs");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts member `i` again, on its data directory.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.launch(i);
    }

    /// Waits until some member answers a read with a quorum behind it.
    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            for e in self.endpoints() {
                let mut curl = Command::new("curl");
                if let Some(t) = &self.tls {
                    curl.arg("--cacert")
                        .arg(&t.ca)
                        .arg("--cert")
                        .arg(&t.client_cert)
                        .arg("--key")
                        .arg(&t.client_key);
                }
                let ok = curl
                    .args(["-sf", "-m", "1", "-d", "{\"key\":\"AA==\"}"])
                    .arg(format!("{e}/v3/kv/range"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
