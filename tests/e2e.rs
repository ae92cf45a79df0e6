//! End to end against a real OAuth2 server (django-oauth-toolkit, started by
//! `scripts/oauth-server`, which installs it on first use): `tokend once` and
//! `tokend run` with client_credentials (Basic and post) and the password grant, and
//! each issued token checked as active by the server's own introspection endpoint.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running server; stopped when dropped (also when a test panics).
struct Server {
    dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Server {
    fn start(lifetime_secs: u32) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(repo().join("scripts/oauth-server"))
            .args(["start", "--dir"])
            .arg(dir.path().join("srv"))
            .args(["--lifetime", &lifetime_secs.to_string()])
            .stdin(Stdio::null())
            .output()
            .expect("scripts/oauth-server runs");
        assert!(
            out.status.success(),
            "oauth-server start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Server { dir, env }
    }

    fn url(&self) -> &str {
        &self.env["TOKEN_URL"]
    }

    /// Asks the server whether it issued `token` and still considers it active.
    fn is_active(&self, token: &str) -> bool {
        let introspect = self.url().replace("/o/token/", "/o/introspect/");
        let out = Command::new("curl")
            .args(["-sS", "-u", "cc-client:cc-secret", "--data-urlencode"])
            .arg(format!("token={token}"))
            .arg(introspect)
            .output()
            .expect("curl runs");
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("introspection answers JSON");
        v["active"] == true
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a file into the test directory, with mode 0600.
    fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        p
    }

    /// A config with the three kinds of account the providers need.
    fn config(&self, client_secret: &str) -> PathBuf {
        self.write("cc-secret", client_secret);
        self.write("pw-secret", "pw-secret\n");
        self.write("password", "alice-password\n");
        let url = self.url();
        self.write(
            "config.toml",
            &format!(
                r#"
[defaults]
token_url = "{url}"
min_refresh_interval = "1s"
scope = "full"

[[account]]
name = "cc-post"
client_id = "cc-client"
client_secret = {{ file = "cc-secret" }}
client_auth = "post"
[[account.output]]
path = "out/cc-post"
mode = "0640"
[[account.output]]
path = "out/cc-post.json"
format = "json"

[[account]]
name = "cc-basic"
client_id = "cc-client"
client_secret = {{ file = "cc-secret" }}
[[account.output]]
path = "out/cc-basic.header"
format = "header"
mode = "0644"

[[account]]
name = "password"
grant_type = "password"
client_id = "pw-client"
client_secret = {{ file = "pw-secret" }}
username = "alice"
password = {{ file = "password" }}
[[account.output]]
path = "out/password.env"
format = "env"
env_var = "PW_TOKEN"
"#
            ),
        )
    }

    /// The tokens in the three outputs, as the files hold them now.
    fn tokens(&self) -> Option<[String; 3]> {
        let read = |n: &str| std::fs::read_to_string(self.path("out").join(n)).ok();
        let raw = read("cc-post")?;
        let header = read("cc-basic.header")?;
        let env = read("password.env")?;
        Some([
            raw,
            header
                .strip_prefix("Authorization: Bearer ")?
                .strip_suffix('\n')?
                .to_owned(),
            env.strip_prefix("PW_TOKEN=")?
                .strip_suffix('\n')?
                .to_owned(),
        ])
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/oauth-server"))
            .args(["stop", "--dir"])
            .arg(self.dir.path().join("srv"))
            .stdin(Stdio::null())
            .output();
    }
}

fn tokend(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args(args)
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o777
}

#[test]
fn once_fetches_every_grant_and_client_auth_from_a_real_server() {
    let server = Server::start(60);
    let config = server.config("cc-secret\n");
    let out = tokend(&["once"], &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let tokens = server.tokens().expect("every output written");
    for t in &tokens {
        assert!(
            server.is_active(t),
            "the server issued {t:.4}... and holds it active"
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(server.path("out/cc-post.json")).unwrap())
            .unwrap();
    assert_eq!(json["access_token"], tokens[0].as_str());
    assert_eq!(json["scope"], "full");
    assert_eq!(mode(&server.path("out/cc-post")), 0o640);
    assert_eq!(mode(&server.path("out/cc-basic.header")), 0o644);
    assert_eq!(mode(&server.path("out/password.env")), 0o600);

    let check = tokend(&["check"], &config);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

#[test]
fn once_reports_the_providers_error_and_exits_1() {
    let server = Server::start(60);
    let config = server.config("not-the-secret\n");
    let out = tokend(&["once", "cc-post", "cc-basic"], &config);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid_client"), "{stderr}");
    assert!(
        stderr.contains("cc-post") && stderr.contains("cc-basic"),
        "{stderr}"
    );
    assert!(!stderr.contains("not-the-secret"), "{stderr}");
    assert!(!server.path("out/cc-post").exists());
}

#[test]
fn run_keeps_tokens_fresh_through_five_rotations() {
    let server = Server::start(4);
    let config = server.config("cc-secret\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args(["run", "-c"])
        .arg(&config)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // 4-second tokens, refreshed at 80%: six generations in well under a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut generations: Vec<[String; 3]> = Vec::new();
    while generations.len() < 6 {
        assert!(
            Instant::now() < deadline,
            "only {} generations in 60 s",
            generations.len()
        );
        if let Some(t) = server.tokens() {
            if generations
                .last()
                .is_none_or(|last| last.iter().zip(&t).all(|(a, b)| a != b))
            {
                for tok in &t {
                    assert!(
                        server.is_active(tok),
                        "an output holds a token the server does not know"
                    );
                }
                generations.push(t);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(mode(&server.path("out/cc-post")), 0o640);
    assert_eq!(mode(&server.path("out/password.env")), 0o600);
    let all: HashSet<&String> = generations.iter().flatten().collect();
    assert_eq!(
        all.len(),
        18,
        "every generation has new tokens for every account"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
    assert!(server.tokens().is_some(), "SIGTERM keeps the token files");
}

/// Gets a refresh token for alice through the password grant, with curl.
fn password_grant_refresh_token(server: &Server) -> String {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-u",
            "pw-client:pw-secret",
            "-d",
            "grant_type=password",
        ])
        .args([
            "-d",
            "username=alice",
            "-d",
            "password=alice-password",
            "-d",
            "scope=full",
        ])
        .arg(server.url())
        .output()
        .expect("curl runs");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the token endpoint answers JSON");
    v["refresh_token"]
        .as_str()
        .expect("a refresh token")
        .to_owned()
}

#[test]
fn refresh_token_rotation_survives_a_restart() {
    // The server rotates refresh tokens and refuses a used one: a daemon that kept
    // using the configured token after the first rotation would get invalid_grant.
    let server = Server::start(3);
    let seed = password_grant_refresh_token(&server);
    server.write("rt", &seed);
    server.write("pw-secret", "pw-secret\n");
    let config = server.write(
        "config.toml",
        &format!(
            r#"
[daemon]
state_dir = "state"
[[account]]
name = "rt"
token_url = "{}"
grant_type = "refresh_token"
client_id = "pw-client"
client_secret = {{ file = "pw-secret" }}
refresh_token = {{ file = "rt" }}
min_refresh_interval = "1s"
[[account.output]]
path = "out/rt"
"#,
            server.url()
        ),
    );
    let out = server.path("out/rt");
    let run_until_rotations = |n: usize| -> Vec<String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tokend"))
            .args(["run", "-c"])
            .arg(&config)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut seen: Vec<String> = Vec::new();
        while seen.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} tokens in 40 s",
                seen.len()
            );
            if let Ok(t) = std::fs::read_to_string(&out) {
                if seen.last() != Some(&t) {
                    assert!(
                        server.is_active(&t),
                        "the output holds a token the server does not know"
                    );
                    seen.push(t);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert!(child.wait().unwrap().success());
        seen
    };
    let first = run_until_rotations(3);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(server.path("state/rt.json")).unwrap())
            .unwrap();
    let rotated = state["refresh_token"]
        .as_str()
        .expect("a rotated refresh token is saved");
    assert_ne!(rotated, seed, "the saved refresh token is the rotated one");
    assert_eq!(mode(&server.path("state/rt.json")), 0o600);
    // Restarted: the configured refresh token was used up long ago; the saved one works.
    let second = run_until_rotations(3);
    assert!(second
        .iter()
        .all(|t| !first.contains(t) || t == first.last().unwrap()));
}
