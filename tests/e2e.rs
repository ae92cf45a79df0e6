//! End to end against a real OAuth2 server (django-oauth-toolkit, started by
//! `scripts/oauth-server`, which installs it on first use): `tokend once` and
//! `tokend run` with client_credentials (Basic and post) and the password grant, and
//! each issued token checked as active by the server's own introspection endpoint.
//! The server revokes a refresh token's whole family when a used one comes back (as
//! Okta and Auth0 do), so the refresh_token tests fail on any refresh token sent twice;
//! the stress test holds tokend to SPEC §6's "refresh-token chains are never lost"
//! through reloads, restarts and `tokend once` beside the daemon.

#[allow(dead_code, unused_imports)]
#[path = "it/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::{poll, Killed};

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
        self.config_with(client_secret, "")
    }

    /// [`Server::config`] with `defaults` (TOML lines) added to its `[defaults]`.
    fn config_with(&self, client_secret: &str, defaults: &str) -> PathBuf {
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
{defaults}

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

/// `tokend run -c CONFIG`, its stderr to `stderr`.
fn run(config: &Path, stderr: Stdio) -> Killed {
    let child = Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args(["run", "-c"])
        .arg(config)
        .stdin(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    Killed(child)
}

/// SIGTERM to `child` (`tokend run`), which then ends with success.
fn terminate(mut child: Killed) {
    child.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(child.0.wait().unwrap().success());
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
    let server = Server::start(8);
    let config = server.config_with("cc-secret\n", "refresh_ratio = 0.4");
    let child = run(&config, Stdio::piped());

    // 8-second tokens, refreshed at 40% (3.2 s): six generations in well under a
    // minute, and each token still valid 4.8 s after its successor is due, so that a
    // refresh that a loaded machine runs late does not leave an expired token behind
    // (with 4-second tokens refreshed at 80%, a CI run once caught one 0.8 s late).
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

    terminate(child);
    assert!(server.tokens().is_some(), "SIGTERM keeps the token files");
}

/// A token request by pw-client (HTTP Basic) with these form fields, with curl: the
/// token endpoint's JSON answer, a token or an OAuth error.
fn pw_client_token_request(server: &Server, form: &[(&str, &str)]) -> serde_json::Value {
    let mut curl = Command::new("curl");
    curl.args(["-sS", "-u", "pw-client:pw-secret"]);
    for (k, v) in form {
        curl.arg("--data-urlencode").arg(format!("{k}={v}"));
    }
    let out = curl.arg(server.url()).output().expect("curl runs");
    serde_json::from_slice(&out.stdout).expect("the token endpoint answers JSON")
}

/// Alice's tokens through the password grant: the JSON answer.
fn password_grant(server: &Server) -> serde_json::Value {
    pw_client_token_request(
        server,
        &[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", "alice-password"),
            ("scope", "full"),
        ],
    )
}

/// Uses a refresh token once: the JSON answer.
fn refresh(server: &Server, refresh_token: &str) -> serde_json::Value {
    pw_client_token_request(
        server,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ],
    )
}

/// Gets a refresh token for alice through the password grant, with curl.
fn password_grant_refresh_token(server: &Server) -> String {
    password_grant(server)["refresh_token"]
        .as_str()
        .expect("a refresh token")
        .to_owned()
}

#[test]
fn server_revokes_the_whole_family_when_a_refresh_token_is_reused() {
    // What Okta and Auth0 do, and what makes every other refresh_token test here
    // strict: one refresh token sent twice, and the chain is gone.
    let server = Server::start(60);
    let seed = password_grant_refresh_token(&server);

    let first = refresh(&server, &seed);
    let rotated = first["refresh_token"]
        .as_str()
        .unwrap_or_else(|| panic!("the first use of a refresh token works: {}", first["error"]));
    let access = first["access_token"].as_str().expect("an access token");
    assert_ne!(rotated, seed, "the refresh token rotated");
    assert!(server.is_active(access));

    let again = refresh(&server, &seed);
    assert_eq!(
        again["error"], "invalid_grant",
        "a used refresh token is refused"
    );
    assert!(again.get("access_token").is_none());

    assert!(
        !server.is_active(access),
        "reuse revoked the access token of the first use"
    );
    let successor = refresh(&server, rotated);
    assert_eq!(
        successor["error"], "invalid_grant",
        "reuse revoked the rotated refresh token too: the whole family is gone"
    );
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
        let child = run(&config, Stdio::null());
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
        terminate(child);
        seen
    };
    let first = run_until_rotations(3);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(server.path("state/rt.json")).unwrap())
            .unwrap();
    let rotated = state["chain"]["refresh_token"]
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

/// A small seeded PRNG (SplitMix64): the stress test's disturbances are random but
/// reproducible from the seed it prints.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
    }
}

/// The stress test's world: a refresh_token account run by `tokend run` (restarted
/// now and then), `tokend once` runs beside it, and every process's log in `logs/`.
struct Stress<'a> {
    server: &'a Server,
    /// Between tokend and the server: delays an answer on demand (a late answer).
    proxy: &'a SlowProxy,
    config: PathBuf,
    logs: PathBuf,
    daemon: Option<Killed>,
    /// How many daemons have been started (names their logs).
    runs: usize,
    onces: Vec<(PathBuf, Killed)>,
    start: Instant,
}

/// The output's `mode`, the account's `timeout` and its name: what config edits change.
#[derive(Clone, Copy)]
struct Tunables {
    mode: &'static str,
    timeout: &'static str,
    name: &'static str,
}

impl<'a> Stress<'a> {
    fn write_config(&self, t: Tunables) {
        let text = format!(
            r#"
[daemon]
state_dir = "state"
socket = "tokend.sock"
log_format = "text"
[[account]]
name = "{name}"
token_url = "{url}"
grant_type = "refresh_token"
client_id = "pw-client"
client_secret = {{ file = "pw-secret" }}
refresh_token = {{ file = "rt" }}
refresh_every = "1s"
min_refresh_interval = "1s"
timeout = "{timeout}"
[[account.output]]
path = "out/rt"
mode = "{mode}"
"#,
            url = self.proxy.url(self.server.url()),
            timeout = t.timeout,
            mode = t.mode,
            name = t.name,
        );
        // Atomically, as an editor that renames would: the daemon never reads half a file.
        let tmp = self.config.with_extension("toml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    fn note(&self, what: &str) {
        eprintln!("[{:>6.2}s] {what}", self.start.elapsed().as_secs_f64());
    }

    fn daemon_log(&self) -> PathBuf {
        self.logs.join(format!("run-{}.log", self.runs))
    }

    fn output(&self) -> Option<String> {
        std::fs::read_to_string(self.server.path("out/rt"))
            .ok()
            .filter(|t| !t.is_empty())
    }

    /// `tokend COMMAND -c CONFIG`, its stdout and stderr to a new file `log`.
    fn spawn_logged(&self, command: &str, log: &Path) -> Child {
        let log = std::fs::File::create(log).unwrap();
        Command::new(env!("CARGO_BIN_EXE_tokend"))
            .args([command, "-c"])
            .arg(&self.config)
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Starts `tokend run` and waits until it answers on its socket (its signal
    /// handlers are installed before that).
    fn start_daemon(&mut self) {
        assert!(self.daemon.is_none());
        self.runs += 1;
        let child = self.spawn_logged("run", &self.daemon_log());
        self.daemon = Some(Killed(child));
        let socket = self.server.path("tokend.sock");
        let up = poll(Duration::from_secs(15), || {
            if let Some(status) = self.daemon.as_mut().unwrap().0.try_wait().unwrap() {
                panic!(
                    "tokend run #{} exited at start ({status}){}",
                    self.runs,
                    self.diagnosis()
                );
            }
            std::os::unix::net::UnixStream::connect(&socket).ok()
        });
        assert!(
            up.is_some(),
            "tokend run #{} did not answer on its socket within 15 s{}",
            self.runs,
            self.diagnosis()
        );
        self.note(&format!("tokend run #{} is up", self.runs));
    }

    /// Stops the daemon with `signal` and waits for it; a SIGTERM must end it cleanly.
    fn stop_daemon(&mut self, signal: nix::sys::signal::Signal) {
        let mut daemon = self.daemon.take().expect("a daemon runs");
        daemon.signal(signal);
        // SIGTERM may wait up to 10 s for a refresh_token request already sent.
        let status = daemon.wait_for_exit(Duration::from_secs(15));
        let status = status.unwrap_or_else(|| {
            panic!(
                "tokend run #{} still runs 15 s after {signal}{}",
                self.runs,
                self.diagnosis()
            )
        });
        if signal == nix::sys::signal::Signal::SIGTERM {
            assert!(
                status.success(),
                "tokend run #{} exited with {status} on SIGTERM{}",
                self.runs,
                self.diagnosis()
            );
        }
        self.note(&format!("tokend run #{} stopped by {signal}", self.runs));
    }

    /// The daemon's config generation and last reload, from `GET /v1/daemon`.
    fn daemon_info(&self) -> Option<serde_json::Value> {
        support::daemon_info(&self.server.path("tokend.sock"))
    }

    /// SIGHUP, then waits until the daemon applied one more reload (a reload may wait
    /// for a refresh_token request in flight): its generation on `/v1/daemon`.
    fn reload(&mut self, what: &str) {
        let before = poll(Duration::from_secs(15), || self.daemon_info())
            .and_then(|v| v["generation"].as_u64())
            .unwrap_or(0);
        self.daemon
            .as_ref()
            .unwrap()
            .signal(nix::sys::signal::Signal::SIGHUP);
        let done = poll(Duration::from_secs(15), || {
            let v = self.daemon_info()?;
            assert_ne!(
                v["last_reload"]["result"],
                "refused",
                "tokend run #{} refused the reload ({what}): {v}{}",
                self.runs,
                self.diagnosis()
            );
            (v["generation"].as_u64()? > before).then_some(())
        });
        assert!(
            done.is_some(),
            "tokend run #{} applied no reload within 15 s of SIGHUP ({what}){}",
            self.runs,
            self.diagnosis()
        );
        self.note(&format!("reloaded ({what})"));
    }

    /// Starts a `tokend once` beside whatever runs now; it is checked at the end.
    fn spawn_once(&mut self) {
        let log_path = self.logs.join(format!("once-{}.log", self.onces.len() + 1));
        let child = self.spawn_logged("once", &log_path);
        self.onces.push((log_path, Killed(child)));
        self.note(&format!("tokend once #{} started", self.onces.len()));
    }

    /// Every log line (daemons, onces) that names `needle`, with its file.
    fn grep_logs(&self, needle: &str) -> Vec<String> {
        let mut found = Vec::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.logs)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            for line in text.lines().filter(|l| l.contains(needle)) {
                found.push(format!("{name}: {line}"));
            }
        }
        found
    }

    /// Token requests the server refused (400: invalid_grant and the like), from its
    /// access log.
    fn refusals_at_server(&self) -> usize {
        std::fs::read_to_string(self.server.path("srv/server.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"POST /o/token/ HTTP/1.1\" 400 "))
            .count()
    }

    /// The lines of each log up to its first invalid_grant (at most 12), and the last
    /// line of each `once`: what the processes did just before the chain broke.
    fn lead_up_to_invalid_grant(&self) -> String {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.logs)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let mut out = String::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("once-") {
                // When each `once` got its token (or failed): it may have spent the
                // refresh token a daemon then sent again.
                out.push_str(&format!(
                    "\n--- {name} ends: {}",
                    lines.last().unwrap_or(&"(nothing yet)")
                ));
            }
            if let Some(at) = lines.iter().position(|l| l.contains("invalid_grant")) {
                out.push_str(&format!("\n--- {name}, up to its first invalid_grant:\n"));
                out.push_str(&lines[at.saturating_sub(11)..=at].join("\n"));
            }
        }
        out
    }

    /// What to print when something fails: where the chain broke, if it did, and
    /// the current daemon's last log lines.
    fn diagnosis(&self) -> String {
        let broken = self.grep_logs("invalid_grant");
        let tail: Vec<String> = std::fs::read_to_string(self.daemon_log())
            .unwrap_or_default()
            .lines()
            .rev()
            .take(15)
            .map(str::to_owned)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!(
            "\n--- server refused {} token request(s) (HTTP 400); invalid_grant in the logs:\n{}{}\n--- tail of run-{}.log:\n{}",
            self.refusals_at_server(),
            if broken.is_empty() {
                "(none)".to_owned()
            } else {
                broken.join("\n")
            },
            self.lead_up_to_invalid_grant(),
            self.runs,
            tail.join("\n")
        )
    }
}

#[derive(Clone, Copy, Debug)]
enum Disturbance {
    /// SIGHUP; with an edit of the output's mode or the account's timeout first.
    Reload {
        edit: bool,
    },
    Restart(nix::sys::signal::Signal),
    /// The account renamed in the config, then SIGHUP: it resumes its chain.
    Rename,
    /// SIGTERM, the state file truncated (its copy is whole), and a start again.
    Damage,
    /// The server's next answer held back past `timeout` (within
    /// `refresh_token_timeout`): it rotated the chain, and tokend must wait for it.
    LateAnswer,
}

/// A TCP proxy in front of the server that, when asked, holds back the answer to the
/// next request it forwards for a while (the server has already answered, and rotated
/// the refresh token).
struct SlowProxy {
    addr: std::net::SocketAddr,
    /// The delay for the next answer, in milliseconds (0: none).
    next_delay: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Answers held back so far.
    delayed: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl SlowProxy {
    fn start(target: &str) -> SlowProxy {
        use std::sync::atomic::Ordering;
        let target: std::net::SocketAddr = url_authority(target).parse().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let next_delay = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delayed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        std::thread::spawn({
            let (next_delay, delayed) = (next_delay.clone(), delayed.clone());
            move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    let Ok(server) = std::net::TcpStream::connect(target) else {
                        continue;
                    };
                    let (next_delay, delayed) = (next_delay.clone(), delayed.clone());
                    let (mut c_in, mut s_out) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c_in, &mut s_out);
                    });
                    let (mut s_in, mut c_out) = (server, client);
                    // Answers, chunk by chunk: the first chunk of an answer that comes
                    // after `delay_next` is held back (connections are kept alive, so
                    // this is per answer, not per connection).
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            let n = match std::io::Read::read(&mut s_in, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let delay = next_delay.swap(0, Ordering::SeqCst);
                            if delay > 0 {
                                std::thread::sleep(Duration::from_millis(delay));
                                delayed.fetch_add(1, Ordering::SeqCst);
                            }
                            if std::io::Write::write_all(&mut c_out, &buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = c_out.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        SlowProxy {
            addr,
            next_delay,
            delayed,
        }
    }

    /// `url` with the proxy's address in place of the server's.
    fn url(&self, url: &str) -> String {
        url.replacen(url_authority(url), &self.addr.to_string(), 1)
    }

    /// Holds back the next answer for `delay`; returns how many were held back before.
    fn delay_next(&self, delay: Duration) -> u64 {
        use std::sync::atomic::Ordering;
        self.next_delay
            .store(delay.as_millis() as u64, Ordering::SeqCst);
        self.delayed.load(Ordering::SeqCst)
    }

    fn delayed(&self) -> u64 {
        self.delayed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// `host:port` of an `http://host:port/...` URL.
fn url_authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap()
}

#[test]
fn refresh_token_chain_survives_reloads_restarts_and_once_beside_the_daemon() {
    // SPEC §6: "Refresh-token chains are never lost." The server revokes the whole
    // token family when a refresh token is presented twice (Okta's and Auth0's reuse
    // detection), so a refresh token that tokend sends twice, from `run` and `once` at
    // once, or again after a reload or restart abandoned a request the server had
    // already answered, ends the chain for good: invalid_grant from then on.
    let seed: u64 = std::env::var("TOKEND_E2E_SEED")
        .ok()
        .map(|s| s.parse().expect("TOKEND_E2E_SEED is a u64"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("stress RNG seed {seed} (TOKEND_E2E_SEED={seed} replays its plan and delays)");
    let mut rng = Rng(seed);

    // 3-second tokens, refreshed every second: the chain rotates about once a second.
    let server = Server::start(3);
    let proxy = SlowProxy::start(server.url());
    let seed_token = password_grant_refresh_token(&server);
    server.write("rt", &seed_token);
    server.write("pw-secret", "pw-secret\n");
    std::fs::create_dir(server.path("logs")).unwrap();
    let mut st = Stress {
        server: &server,
        proxy: &proxy,
        config: server.path("config.toml"),
        logs: server.path("logs"),
        daemon: None,
        runs: 0,
        onces: Vec::new(),
        start: Instant::now(),
    };
    // `timeout` short, so that a late answer comes after it: a refresh_token request
    // waits for `refresh_token_timeout` (2 minutes) instead.
    let mut tunables = Tunables {
        mode: "0600",
        timeout: "2s",
        name: "rt",
    };
    st.write_config(tunables);

    // The plan: 20 reloads (every other one after a config edit), 5 restarts (2 of
    // them SIGKILL), 3 renames, 2 damaged state files and 2 late answers in a random
    // order, and 6 `once` runs started at random points.
    use nix::sys::signal::Signal::{SIGKILL, SIGTERM};
    let mut plan: Vec<Disturbance> = (0..20)
        .map(|i| Disturbance::Reload { edit: i % 2 == 1 })
        .chain([SIGTERM, SIGTERM, SIGTERM, SIGKILL, SIGKILL].map(Disturbance::Restart))
        .chain([Disturbance::Rename; 3])
        .chain([Disturbance::Damage; 2])
        .chain([Disturbance::LateAnswer; 2])
        .collect();
    rng.shuffle(&mut plan);
    let mut slots: Vec<usize> = (0..plan.len()).collect();
    rng.shuffle(&mut slots);
    let once_slots: HashSet<usize> = slots[..6].iter().copied().collect();
    eprintln!("plan: {plan:?}; `tokend once` before disturbances {once_slots:?}");

    st.start_daemon();
    let first = poll(Duration::from_secs(15), || st.output());
    assert!(
        first.is_some(),
        "no token from the seed refresh token within 15 s{}",
        st.diagnosis()
    );
    let mut edits = 0;
    for (i, disturbance) in plan.iter().enumerate() {
        if once_slots.contains(&i) {
            std::thread::sleep(rng.millis(0, 500));
            st.spawn_once();
        }
        std::thread::sleep(rng.millis(50, 700));
        match *disturbance {
            Disturbance::Reload { edit: false } => st.reload("SIGHUP"),
            Disturbance::Reload { edit: true } => {
                edits += 1;
                let what = if edits % 2 == 1 {
                    tunables.mode = if tunables.mode == "0600" {
                        "0640"
                    } else {
                        "0600"
                    };
                    format!("output mode now {}", tunables.mode)
                } else {
                    tunables.timeout = if tunables.timeout == "2s" { "3s" } else { "2s" };
                    format!("timeout now {}", tunables.timeout)
                };
                st.write_config(tunables);
                st.reload(&what);
            }
            Disturbance::Restart(SIGKILL) => {
                // A killed process cannot keep the answer to a request the server has
                // already honoured, and with reuse detection no client survives that;
                // it is not what this test is about. So SIGKILL lands just after a
                // refresh was published (its refresh token saved before that), while
                // min_refresh_interval (1 s) keeps the next request from starting.
                let now = st.output();
                let fresh = poll(Duration::from_secs(15), || {
                    st.output().filter(|t| Some(t) != now.as_ref())
                });
                assert!(
                    fresh.is_some(),
                    "no new access token within 15 s (before SIGKILL #{i}): the chain is broken or stalled{}",
                    st.diagnosis()
                );
                std::thread::sleep(rng.millis(0, 300));
                st.stop_daemon(SIGKILL);
                st.start_daemon();
            }
            Disturbance::Restart(signal) => {
                st.stop_daemon(signal);
                st.start_daemon();
            }
            Disturbance::Rename => {
                tunables.name = if tunables.name == "rt" {
                    "rt-renamed"
                } else {
                    "rt"
                };
                st.write_config(tunables);
                st.reload(&format!("renamed to {}", tunables.name));
            }
            Disturbance::Damage => {
                st.stop_daemon(SIGTERM);
                let state = server.path(&format!("state/{}.json", tunables.name));
                let whole = std::fs::read(&state).unwrap();
                std::fs::write(&state, &whole[..whole.len() / 3]).unwrap();
                st.note(&format!("{} truncated", state.display()));
                st.start_daemon();
            }
            Disturbance::LateAnswer => {
                let before = proxy.delay_next(Duration::from_secs(5));
                let held = poll(Duration::from_secs(20), || {
                    (proxy.delayed() > before).then_some(())
                });
                assert!(
                    held.is_some(),
                    "no answer was held back within 20 s{}",
                    st.diagnosis()
                );
                st.note("an answer came 5 s late (timeout is 2-3 s)");
            }
        }
    }
    st.note("disturbances done; waiting for the `tokend once` runs");

    let mut onces = std::mem::take(&mut st.onces);
    for (n, (log, child)) in onces.iter_mut().enumerate() {
        let status = child.wait_for_exit(Duration::from_secs(30));
        let text = std::fs::read_to_string(&*log).unwrap_or_default();
        let status = status.unwrap_or_else(|| {
            panic!(
                "tokend once #{} still runs after 30 s:\n{text}{}",
                n + 1,
                st.diagnosis()
            )
        });
        assert!(
            status.success(),
            "tokend once #{} failed ({status}):\n{text}{}",
            n + 1,
            st.diagnosis()
        );
    }

    // The daemon still gets fresh tokens: a new one appears, and the server holds it
    // active (a token seen just before the next rotation may already be revoked: look
    // again then).
    let last = st.output();
    let mut seen_after = Vec::new();
    let fresh = poll(Duration::from_secs(15), || {
        let t = st.output().filter(|t| Some(t) != last.as_ref())?;
        if !seen_after.contains(&t) {
            seen_after.push(t.clone());
        }
        server.is_active(&t).then_some(t)
    });
    assert!(
        fresh.is_some(),
        "after the stress no new access token the server holds active appeared within 15 s ({} new one(s) seen){}",
        seen_after.len(),
        st.diagnosis()
    );
    st.note("a new access token appeared after the stress and is active");
    assert_eq!(
        mode(&server.path("out/rt")),
        u32::from_str_radix(tunables.mode, 8).unwrap(),
        "the output has the mode of the last config"
    );

    st.stop_daemon(SIGTERM);
    let broken = st.grep_logs("invalid_grant");
    assert!(
        broken.is_empty(),
        "the chain broke: a refresh token was used twice{}",
        st.diagnosis()
    );
    assert_eq!(
        st.refusals_at_server(),
        0,
        "the server refused token requests{}",
        st.diagnosis()
    );
    // What the last daemon saved is the live end of the chain.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(server.path(&format!("state/{}.json", tunables.name))).unwrap(),
    )
    .unwrap();
    let saved = state["chain"]["refresh_token"]
        .as_str()
        .expect("the rotated refresh token is saved in state_dir");
    let answer = refresh(&server, saved);
    assert!(
        answer["access_token"].is_string(),
        "the refresh token saved at the end is the live one: {}",
        answer["error"]
    );
    // No token in any log.
    let leaked: Vec<String> = [seed_token.as_str(), saved]
        .into_iter()
        .chain(seen_after.iter().map(String::as_str))
        .flat_map(|t| st.grep_logs(t))
        .collect();
    assert!(leaked.is_empty(), "tokens in the logs: {leaked:?}");
    st.note("chain intact");
}
