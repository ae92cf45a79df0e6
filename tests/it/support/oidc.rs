//! A real authorization server for the key tests: panva's oidc-provider, pinned in
//! `tests/oidc-provider/` and installed once into the cache by its `install.sh` (node
//! and npm must be there: scripts/test installs Debian's when node is missing), run by
//! `tests/oidc-provider/server.mjs` on loopback ports, killed when dropped.
//!
//! Also here: keys and certificates made with openssl for a test (a CA, a server
//! certificate for 127.0.0.1, client certificates), and a plain HTTP GET for the
//! server's test routes (`/test/log`, `/test/issued`).

use std::io::{BufRead as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// How long the server may take to install (first use) and to start.
const START: Duration = Duration::from_secs(300);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The installed node_modules, installed on first use (once per test binary).
fn modules() -> &'static Path {
    static MODULES: OnceLock<PathBuf> = OnceLock::new();
    MODULES.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo().join("tests/oidc-provider/install.sh"))
            .stdin(Stdio::null())
            .output()
            .expect("run tests/oidc-provider/install.sh");
        assert!(
            out.status.success(),
            "installing oidc-provider failed (node and npm are needed: apt-get install nodejs npm):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("node_modules")
    })
}

/// A running oidc-provider.
pub struct OidcProvider {
    child: Child,
    pub port: u16,
    /// The mutual-TLS port (0 without `tls` in the config).
    pub tls_port: u16,
    /// The issuer itself is on https (`https` in the config).
    https: bool,
    _dir: tempfile::TempDir,
}

impl OidcProvider {
    /// Starts a server with `config` (see server.mjs: `ttl`, `clients`, `tls`, `https`,
    /// `resource`).
    pub fn start(config: serde_json::Value) -> OidcProvider {
        let modules = modules();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("config.json");
        std::fs::write(&conf, config.to_string()).unwrap();
        let mut child = Command::new("node")
            .arg(repo().join("tests/oidc-provider/server.mjs"))
            .arg(&conf)
            .env("OIDC_PROVIDER_MODULES", modules)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node (apt-get install nodejs)");
        let stderr = child.stderr.take().unwrap();
        // Drained so that a chatty server never blocks; shown if it does not start.
        let (etx, erx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::BufReader::new(stderr).read_to_string(&mut text);
            let _ = etx.send(text);
        });
        let line = first_line(&mut child);
        let mut words = line.split_whitespace();
        let (port, tls_port) = match (words.next(), words.next(), words.next()) {
            (Some("READY"), Some(p), Some(q)) => (p.parse().unwrap(), q.parse().unwrap()),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "oidc-provider did not start ({line:?}):\n{}",
                    erx.recv_timeout(Duration::from_secs(5)).unwrap_or_default()
                );
            }
        };
        OidcProvider {
            child,
            port,
            tls_port,
            https: config["https"].is_object(),
            _dir: dir,
        }
    }

    /// The issuer: `http://127.0.0.1:P` (`https://` with `https` in the config).
    pub fn issuer(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The mutual-TLS side: `https://127.0.0.1:Q`.
    pub fn tls_base(&self) -> String {
        format!("https://127.0.0.1:{}", self.tls_port)
    }

    /// Every token request so far: `client_id`, `status`, `error`, `tls`.
    pub fn log(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&get(self.port, "/test/log")).expect("the log is JSON")
    }

    /// The token requests of `client_id` so far.
    pub fn requests_of(&self, client_id: &str) -> Vec<serde_json::Value> {
        self.log()
            .into_iter()
            .filter(|r| r["client_id"] == client_id)
            .collect()
    }

    /// A refresh token of a grant made for `client_id` (the seed of a refresh_token
    /// account).
    pub fn refresh_token(&self, client_id: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(&get(
            self.port,
            &format!("/test/refresh_token?client_id={client_id}"),
        ))
        .expect("JSON");
        v["refresh_token"]
            .as_str()
            .expect("a refresh token")
            .to_owned()
    }

    /// The access tokens the server issued so far.
    pub fn issued(&self) -> Vec<String> {
        serde_json::from_str(&get(self.port, "/test/issued")).expect("the list is JSON")
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DPoP resource server (`tests/oidc-provider/resource.mjs`, with jose) that trusts
/// `issuer`'s JWT access tokens and checks every proof in full; killed when dropped.
pub struct ResourceServer {
    child: Child,
    pub port: u16,
}

impl ResourceServer {
    pub fn start(issuer: &str) -> ResourceServer {
        let mut child = Command::new("node")
            .arg(repo().join("tests/oidc-provider/resource.mjs"))
            .arg(issuer)
            .env("OIDC_PROVIDER_MODULES", modules())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node (apt-get install nodejs)");
        let line = first_line(&mut child);
        let port = match line.strip_prefix("READY ") {
            Some(p) => p.trim().parse().unwrap(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the resource server did not start ({line:?})");
            }
        };
        ResourceServer { child, port }
    }

    /// `http://127.0.0.1:P`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many requests it accepted and refused so far.
    pub fn stats(&self) -> (u64, u64) {
        let v: serde_json::Value =
            serde_json::from_str(&get(self.port, "/test/stats")).expect("stats are JSON");
        (v["ok"].as_u64().unwrap(), v["refused"].as_u64().unwrap())
    }
}

impl Drop for ResourceServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first line `child` writes on its (piped) stdout, within [`START`]; empty if none.
/// The rest is drained to the end: node dies of EPIPE writing to a closed stdout.
fn first_line(child: &mut Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = std::io::BufReader::new(stdout);
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        let _ = tx.send(line);
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
    rx.recv_timeout(START).unwrap_or_default()
}

/// GET `path` from 127.0.0.1:`port` (HTTP/1.0: the answer ends with the connection).
fn get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the server");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "GET {path}: {head}\n{body}"
    );
    body.to_owned()
}
