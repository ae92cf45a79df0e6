//! Helpers for the integration tests: a [`Sandbox`] directory for configs and outputs,
//! the real binary run once ([`once`]) or as a daemon ([`Daemon`], stderr captured),
//! bounded waiting on state ([`wait_until`]), the fake IdP ([`fake_idp`]), a plain
//! HTTP client for the daemon's socket ([`http`]), and the servers credential helpers'
//! tools talk to: git over HTTP ([`git_http`]) and a container registry ([`registry`]),
//! both on a small HTTP server ([`web`]).
//!
//! Nothing here sleeps to wait for a state: it polls the state itself, inside a timeout
//! that only bounds a failure.

pub mod cluster;
pub mod config;
pub mod etcd;
pub mod fake_idp;
pub mod git_http;
pub mod http;
pub mod kube;
pub mod oidc;
pub mod pki;
pub mod proxy;
pub mod registry;
pub mod scripted;
pub mod web;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Bounds a wait for something that normally takes well under a second.
pub const SHORT: Duration = Duration::from_secs(10);
/// Bounds a wait through backoffs and rotations.
pub const LONG: Duration = Duration::from_secs(20);
/// How often [`wait_until`] looks again.
const POLL: Duration = Duration::from_millis(5);

/// The binary under test.
pub fn tokend() -> Command {
    clean_env(Command::new(env!("CARGO_BIN_EXE_tokend")))
}

/// The binary under test, started through `wrapper` (e.g. `setpriv --reuid=65534 ...`),
/// which runs the program named by its last argument.
pub fn tokend_via(wrapper: &[&str]) -> Command {
    let (program, args) = wrapper.split_first().expect("a wrapper program");
    let mut cmd = Command::new(program);
    cmd.args(args).arg(env!("CARGO_BIN_EXE_tokend"));
    clean_env(cmd)
}

fn clean_env(mut cmd: Command) -> Command {
    // What the tests do not set must not come from the environment of `cargo test`.
    for var in [
        "RUST_LOG",
        "TOKEND_CONFIG",
        "TOKEND_SOCKET",
        "JOURNAL_STREAM",
        "NOTIFY_SOCKET",
        "CREDENTIALS_DIRECTORY",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// A loopback port free right now (bound and released: whoever binds it next gets it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Polls `f` until it returns `Some`, for at most `timeout`; panics naming `what`.
pub fn wait_until<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll(timeout, f).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls `f` until it gives a value, at most `timeout` (`None` then, for a caller that
/// says more about what it waited for than [`wait_until`] would).
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// A temporary directory holding a test's config, secrets and outputs.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `config.toml` with mode 0600 (it may hold inline secrets); returns its path.
    pub fn config(&self, text: &str) -> PathBuf {
        let path = self.path("config.toml");
        self.write(&path, text, 0o600);
        path
    }

    pub fn write(&self, path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).expect("write a test file");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .expect("chmod a test file");
    }

    /// The content of `name`, `None` if it does not exist.
    pub fn read(&self, name: &str) -> Option<String> {
        read(&self.path(name))
    }

    /// The permission bits of `name`.
    pub fn mode(&self, name: &str) -> u32 {
        std::fs::metadata(self.path(name))
            .expect("the file exists")
            .permissions()
            .mode()
            & 0o7777
    }
}

/// The content of `path`, `None` if it does not exist; panics on any other error.
pub fn read(path: &Path) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("failed to read {}: {e}", path.display()),
    }
}

/// What a finished `tokend` command did.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs `tokend once -c CONFIG ARGS...` and waits (bounded) for it to finish.
pub fn once(config: &Path, args: &[&str]) -> Finished {
    let mut cmd = tokend();
    cmd.arg("once").arg("-c").arg(config).args(args);
    // A bound, not a measure: `once` makes up to three attempts with up to 5 s between
    // them when they fail transiently, which on a loaded machine can pass 10 s.
    finish(cmd, 3 * LONG)
}

/// Runs `cmd` to its end, for at most `timeout` (killed if it takes longer).
pub fn finish(mut cmd: Command, timeout: Duration) -> Finished {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tokend");
    let mut child = Killed(child);
    let stdout = child.0.stdout.take().expect("stdout is piped");
    let stderr = child.0.stderr.take().expect("stderr is piped");
    let out_reader =
        std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let status = wait_until("tokend to exit", timeout, || {
        child.0.try_wait().expect("wait for tokend")
    });
    Finished {
        status,
        stdout: out_reader.join().expect("the stdout reader does not panic"),
        stderr: reader.join().expect("the stderr reader does not panic"),
    }
}

/// `tokend status --json --socket SOCKET`: the account list, `None` while the daemon
/// does not answer (not up yet, or gone).
pub fn status_json(socket: &Path) -> Option<serde_json::Value> {
    let mut cmd = tokend();
    cmd.arg("status").arg("--json").arg("--socket").arg(socket);
    let out = finish(cmd, SHORT);
    if out.code() != Some(0) {
        return None;
    }
    Some(serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tokend status --json printed no JSON ({e}): {:?}",
            out.stdout
        )
    }))
}

/// The value of the metric line `series` (name and labels as the daemon writes them,
/// e.g. `tokend_token_expirations_total{account="a"}`) on the socket's `/metrics`; `None`
/// if the socket does not answer or has no such line.
pub fn metric(socket: &Path, series: &str) -> Option<f64> {
    let (status, text) = socket_get(socket, "/metrics")?;
    if status != 200 {
        return None;
    }
    text.lines().find_map(|l| {
        let value = l.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// One account's entry of [`status_json`].
pub fn account_status(socket: &Path, account: &str) -> Option<serde_json::Value> {
    status_json(socket)?["accounts"]
        .as_array()?
        .iter()
        .find(|a| a["account"] == account)
        .cloned()
}

/// `GET path` on the daemon's socket, by hand (HTTP/1.0-style: the answer ends when
/// the connection closes): the status code and the body, `None` if it does not answer.
pub fn socket_get(socket: &Path, path: &str) -> Option<(u16, String)> {
    let answer = http::try_request(socket, "GET", path, &[], SHORT)?;
    Some((
        answer.status,
        String::from_utf8_lossy(&answer.body).into_owned(),
    ))
}

/// `GET /v1/daemon` on the daemon's socket (as root): the config's generation and the
/// last reload's outcome.
pub fn daemon_info(socket: &Path) -> Option<serde_json::Value> {
    let (status, body) = socket_get(socket, "/v1/daemon")?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

/// Waits until the daemon on `socket` has reloaded its config to generation `n` or later,
/// or refused a reload after generation `n - 1` (`last_reload.result`, `refused`):
/// a reload's outcome as state, not as a log line. Returns `/v1/daemon`'s answer.
pub fn wait_reload(d: &Daemon, socket: &Path, since: &serde_json::Value) -> serde_json::Value {
    let at = since["last_reload"]["at"].clone();
    let generation = since["generation"].as_u64().unwrap_or(0);
    d.wait_until("a reload's outcome on /v1/daemon", SHORT, || {
        daemon_info(socket).filter(|v| {
            v["generation"].as_u64().unwrap_or(0) > generation
                || (v["last_reload"]["result"] == "refused" && v["last_reload"]["at"] != at)
        })
    })
}

/// A child process that does not outlive a failed test: killed (SIGKILL) and reaped
/// when dropped, also when the test panics.
pub struct Killed(pub Child);

// Used by tests/e2e.rs, which shares this module.
#[allow(dead_code)]
impl Killed {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.0.id() as i32)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).unwrap();
    }

    /// Waits (polling) for the process to exit, at most `timeout`.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll(timeout, || self.0.try_wait().unwrap())
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// What the daemon wrote on stderr so far, and a way to wait for more.
#[derive(Default)]
struct Log {
    text: Mutex<String>,
    changed: Condvar,
}

/// `tokend run`, with stderr captured; killed when dropped.
pub struct Daemon {
    child: Child,
    log: Arc<Log>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    pub fn start(config: &Path) -> Daemon {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = tokend();
        cmd.arg("run").arg("-c").arg(config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd)
    }

    /// Starts `cmd` (the binary under test with its arguments, perhaps through a
    /// wrapper that execs it: [`tokend_via`]) as the daemon.
    pub fn spawn(mut cmd: Command) -> Daemon {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tokend run");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Log::default());
        let reader = std::thread::spawn({
            let log = log.clone();
            move || {
                let mut buf = [0u8; 8192];
                loop {
                    let n = match std::io::Read::read(&mut stderr, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let mut text = log.text.lock().unwrap_or_else(|e| e.into_inner());
                    text.push_str(&String::from_utf8_lossy(&buf[..n]));
                    log.changed.notify_all();
                }
            }
        });
        Daemon {
            child,
            log,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// Everything on stderr so far.
    pub fn log(&self) -> String {
        self.log
            .text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// [`wait_until`], with the daemon's log in the panic message.
    pub fn wait_until<T>(&self, what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_until(what, timeout, f)
        })) {
            Ok(v) => v,
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{msg}\n--- tokend's log ---\n{}", self.log())
            }
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit: the status, how long it took from
    /// the signal, and the whole log.
    pub fn terminate(mut self) -> (ExitStatus, Duration, String) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM)
            .expect("signal tokend");
        let sent = Instant::now();
        let deadline = sent + SHORT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for tokend") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "tokend did not exit within {SHORT:?} of SIGTERM:\n{}",
                self.log()
            );
            // Fine-grained: this poll bounds how precisely the exit time is measured.
            std::thread::sleep(Duration::from_millis(1));
        };
        let took = sent.elapsed();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        (status, took, self.log())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
