//! What `benches/socket.rs` and `benches/dpop.rs` share: the command line, the fake
//! token endpoint, starting the daemon and waiting for its token, and the latency
//! harness (client threads with blocking std sockets and hand-written HTTP/1.1 that
//! check every answer's status and read exactly its length; rates and percentiles).
//! Each bench includes it with `mod common;` (in a folder, so that cargo does not take
//! it for a bench of its own).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tokend");
/// The length of the token the fake endpoint issues.
pub const TOKEN_LEN: usize = 1024;

/// The benchmark's arguments: `--bench` (cargo passes it to `cargo bench`, not to
/// `cargo test --all-targets`) and `--name value` options.
pub struct Args(Vec<String>);

impl Args {
    pub fn from_env() -> Args {
        Args(std::env::args().collect())
    }

    /// Whether cargo runs it as a benchmark (otherwise only a brief check).
    pub fn bench(&self) -> bool {
        self.has("--bench")
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }

    /// The word after `name`, if given.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }

    /// The number after `name`, or `default`.
    pub fn number(&self, name: &str, default: f64) -> f64 {
        self.value(name)
            .map_or(default, |s| s.parse().expect("a number"))
    }
}

/// The machine's CPUs, for the header of a benchmark's table.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// The load averages (1, 5 and 15 minutes), for the header of a benchmark's table.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn micros(ns: u64) -> String {
    format!("{:.1} µs", ns as f64 / 1000.0)
}

pub struct Daemon {
    pub child: Child,
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon's program and the arguments before `run -c CONFIG`.
pub struct Launcher {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl Launcher {
    /// `program` itself, with no arguments before `run`.
    pub fn direct(program: impl Into<PathBuf>) -> Launcher {
        Launcher {
            program: program.into(),
            args: Vec::new(),
        }
    }
}

/// A fake token endpoint on a loopback port that answers every request with a
/// `TOKEN_LEN`-character token of `token_type`, valid for an hour.
fn start_token_endpoint(token_type: &'static str) -> SocketAddr {
    let idp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = idp.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in idp.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let _ = c.read(&mut buf);
                let body = format!(
                    r#"{{"access_token":"{}","token_type":"{token_type}","expires_in":3600}}"#,
                    "t".repeat(TOKEN_LEN)
                );
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

/// Starts the daemon against a fake token endpoint that issues `token_type` tokens
/// (`fetch_token` waits for the first). `config` writes the configuration from the
/// daemon's temporary directory, its socket and the endpoint's address (the account
/// reads its client secret from `TOKEND_BENCH_SECRET`).
pub fn start_daemon(
    launcher: &Launcher,
    token_type: &'static str,
    config: impl FnOnce(&Path, &Path, SocketAddr) -> String,
) -> Daemon {
    let addr = start_token_endpoint(token_type);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tokend.sock");
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config(dir.path(), &socket, addr)).unwrap();
    let child = Command::new(&launcher.program)
        .args(&launcher.args)
        .args(["run", "-c"])
        .arg(&config_path)
        .env("TOKEND_BENCH_SECRET", "x")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Daemon {
        child,
        _dir: dir,
        socket,
    }
}

/// Waits (20 s at most) until `GET path` over the socket answers 200; its body.
pub fn fetch_token(socket: &Path, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = UnixStream::connect(socket) {
            let mut buf = Vec::new();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n"
            )
            .unwrap();
            s.read_to_end(&mut buf).unwrap();
            if buf.starts_with(b"HTTP/1.1 200") {
                let at = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                return String::from_utf8(buf[at..].to_vec()).unwrap();
            }
        }
        assert!(Instant::now() < deadline, "the daemon served no token");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What each client sends, again and again.
#[derive(Clone)]
pub struct Request {
    /// The whole request, head and body.
    pub text: String,
    /// One connection for all requests, or one per request.
    pub keep_alive: bool,
    /// The length every answer's body must have, if fixed.
    pub body_len: Option<usize>,
}

#[derive(Clone, Copy)]
pub enum Limit {
    Time(Duration),
    Requests(usize),
}

pub struct Run {
    pub count: usize,
    elapsed: Duration,
    /// Every request's latency in nanoseconds, sorted.
    latencies: Vec<u64>,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile(&self, p: f64) -> u64 {
        let i = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        self.latencies[i.clamp(1, self.latencies.len()) - 1]
    }

    /// The table's figures: `requests/s | p50 | p99 | p99.9`.
    pub fn figures(&self) -> String {
        format!(
            "{:.0} | {} | {} | {}",
            self.rate(),
            micros(self.percentile(50.0)),
            micros(self.percentile(99.0)),
            micros(self.percentile(99.9)),
        )
    }
}

/// `clients` threads send `request` until the limit; their latencies.
pub fn run(socket: &Path, request: &Request, clients: usize, limit: Limit) -> Run {
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let socket = socket.to_owned();
            let request = request.clone();
            std::thread::spawn(move || client(&socket, &request, limit))
        })
        .collect();
    let mut latencies: Vec<u64> = Vec::new();
    for t in threads {
        latencies.extend(t.join().expect("a client failed"));
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Run {
        count: latencies.len(),
        elapsed,
        latencies,
    }
}

/// A warm-up of 300 ms (connections, caches, the CPU's clock), then `runs` runs of
/// `seconds` each: the run with the median rate.
pub fn median_run(
    socket: &Path,
    request: &Request,
    clients: usize,
    runs: usize,
    seconds: f64,
) -> Run {
    run(
        socket,
        request,
        clients,
        Limit::Time(Duration::from_millis(300)),
    );
    let mut results: Vec<Run> = (0..runs)
        .map(|_| {
            run(
                socket,
                request,
                clients,
                Limit::Time(Duration::from_secs_f64(seconds)),
            )
        })
        .collect();
    results.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    results.swap_remove(results.len() / 2)
}

/// One client: requests until the limit, returns each one's latency.
fn client(socket: &Path, request: &Request, limit: Limit) -> Vec<u64> {
    let mut latencies = Vec::with_capacity(1 << 20);
    let mut buf = vec![0u8; 8192];
    let mut conn: Option<UnixStream> = None;
    let start = Instant::now();
    loop {
        match limit {
            Limit::Time(d) if start.elapsed() >= d => break,
            Limit::Requests(n) if latencies.len() >= n => break,
            _ => {}
        }
        let t = Instant::now();
        let mut s = match conn.take() {
            Some(s) => s,
            None => UnixStream::connect(socket).expect("connect"),
        };
        s.write_all(request.text.as_bytes()).expect("write");
        let len = read_answer(&mut s, &mut buf);
        if let Some(want) = request.body_len {
            assert_eq!(len, want);
        }
        latencies.push(t.elapsed().as_nanos() as u64);
        if request.keep_alive {
            conn = Some(s);
        }
    }
    latencies
}

/// Reads one answer: checks the status line, reads exactly the body; its length.
fn read_answer(s: &mut UnixStream, buf: &mut [u8]) -> usize {
    let mut got = 0;
    loop {
        let n = s.read(&mut buf[got..]).expect("read");
        assert!(n > 0, "the daemon closed the connection");
        got += n;
        let Some(head_end) = buf[..got].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        assert!(
            buf.starts_with(b"HTTP/1.1 200 "),
            "{}",
            String::from_utf8_lossy(&buf[..got])
        );
        let head = std::str::from_utf8(&buf[..head_end]).expect("an ASCII head");
        let len: usize = head
            .split("\r\n")
            .find_map(|l| l.strip_prefix("content-length: "))
            .expect("content-length")
            .parse()
            .expect("a number");
        let total = head_end + 4 + len;
        while got < total {
            let n = s.read(&mut buf[got..total]).expect("read");
            assert!(n > 0, "the daemon closed the connection");
            got += n;
        }
        return len;
    }
}
