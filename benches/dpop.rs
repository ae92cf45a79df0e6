//! Benchmark of `POST /v1/tokens/{account}/dpop` over the Unix socket (SPEC §9): proofs
//! per second and latency percentiles with keep-alive, for 1 and 4 concurrent clients,
//! beside plain token reads (`GET /v1/tokens/{account}/raw`) of the same daemon in the
//! same run. `benches/dpop.sh` runs it; BENCHMARKS.md has the numbers.
//!
//! Like `benches/socket.rs`: the real daemon (`tokend run`, bench profile) against a
//! local fake token endpoint that issues a 1,024-character token (`token_type` DPoP),
//! its ES256 key made once in a temporary `state_dir`; client threads with blocking std
//! sockets and hand-written HTTP/1.1 that check every answer's status and read exactly
//! its length. Each scenario runs N times (`--runs`, default 3) for `--seconds` (default
//! 5) after a warm-up; the run with the median rate is shown. Without `--bench` (as
//! `cargo test --all-targets` runs it) it only checks every scenario, briefly.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tokend");
const TOKEN_LEN: usize = 1024;
const RAW: &str = "/v1/tokens/bench/raw";
const DPOP: &str = "/v1/tokens/bench/dpop";
const BODY: &str = r#"{"method":"GET","url":"https://fhir.example/r4/Patient/123?_format=json"}"#;

#[derive(Clone, Copy)]
enum Ask {
    Raw,
    Dpop,
}

impl Ask {
    fn name(self) -> &'static str {
        match self {
            Ask::Raw => "GET .../raw",
            Ask::Dpop => "POST .../dpop",
        }
    }

    fn request(self) -> String {
        match self {
            Ask::Raw => format!("GET {RAW} HTTP/1.1\r\nhost: b\r\n\r\n"),
            Ask::Dpop => format!(
                "POST {DPOP} HTTP/1.1\r\nhost: b\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
                BODY.len()
            ),
        }
    }
}

struct Daemon {
    child: Child,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let arg = |name: &str, default: f64| -> f64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |s| s.parse().expect("a number"))
    };
    let seconds = arg("--seconds", 5.0);
    let runs = arg("--runs", 3.0) as usize;
    let daemon = start_daemon();
    wait_for_token(&daemon.socket);
    let scenarios = [(Ask::Raw, 1), (Ask::Dpop, 1), (Ask::Raw, 4), (Ask::Dpop, 4)];
    if !bench {
        for (ask, clients) in scenarios {
            let r = run(&daemon.socket, ask, clients, Limit::Requests(200));
            println!("smoke: {} x{clients}: {} requests ok", ask.name(), r.count);
        }
        return;
    }
    println!(
        "tokend DPoP benchmark: {BIN}, a {TOKEN_LEN}-character token, ES256, keep-alive, {runs} runs of {seconds} s per scenario (the median run shown), {} CPUs, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split(' ')
            .next()
            .unwrap_or("?")
    );
    println!();
    println!("| request | clients | requests/s | p50 | p99 | p99.9 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (ask, clients) in scenarios {
        run(
            &daemon.socket,
            ask,
            clients,
            Limit::Time(Duration::from_millis(300)),
        );
        let mut results: Vec<Run> = (0..runs)
            .map(|_| {
                run(
                    &daemon.socket,
                    ask,
                    clients,
                    Limit::Time(Duration::from_secs_f64(seconds)),
                )
            })
            .collect();
        results.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
        let r = &results[results.len() / 2];
        println!(
            "| {} | {clients} | {:.0} | {} | {} | {} |",
            ask.name(),
            r.rate(),
            micros(r.percentile(50.0)),
            micros(r.percentile(99.0)),
            micros(r.percentile(99.9)),
        );
    }
}

fn micros(ns: u64) -> String {
    format!("{:.1} µs", ns as f64 / 1000.0)
}

/// Starts `tokend run` with one DPoP account against a fake token endpoint.
fn start_daemon() -> Daemon {
    let idp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = idp.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in idp.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let _ = c.read(&mut buf);
                let body = format!(
                    r#"{{"access_token":"{}","token_type":"DPoP","expires_in":3600}}"#,
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
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tokend.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = \"{}\"\nstate_dir = \"state\"\nlog_format = \"text\"\nlog_level = \"warn\"\n\n\
             [[account]]\nname = \"bench\"\ntoken_url = \"http://{addr}/token\"\n\
             client_id = \"id\"\nclient_secret = {{ env = \"TOKEND_BENCH_SECRET\" }}\n\
             token_binding = \"dpop\"\nurls = [\"https://fhir.example/r4/\"]\n",
            socket.display()
        ),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&config)
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

fn wait_for_token(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = UnixStream::connect(socket) {
            let mut buf = Vec::new();
            write!(
                s,
                "GET {RAW} HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n"
            )
            .unwrap();
            s.read_to_end(&mut buf).unwrap();
            if buf.starts_with(b"HTTP/1.1 200") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the daemon served no token");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Clone, Copy)]
enum Limit {
    Time(Duration),
    Requests(usize),
}

struct Run {
    count: usize,
    elapsed: Duration,
    /// Every request's latency in nanoseconds, sorted.
    latencies: Vec<u64>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> u64 {
        let i = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        self.latencies[i.clamp(1, self.latencies.len()) - 1]
    }
}

fn run(socket: &Path, ask: Ask, clients: usize, limit: Limit) -> Run {
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let socket = socket.to_owned();
            std::thread::spawn(move || client(&socket, ask, limit))
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

/// One client on one keep-alive connection: requests until the limit.
fn client(socket: &Path, ask: Ask, limit: Limit) -> Vec<u64> {
    let request = ask.request();
    let mut latencies = Vec::with_capacity(1 << 20);
    let mut buf = vec![0u8; 8192];
    let mut s = UnixStream::connect(socket).expect("connect");
    let start = Instant::now();
    loop {
        match limit {
            Limit::Time(d) if start.elapsed() >= d => break,
            Limit::Requests(n) if latencies.len() >= n => break,
            _ => {}
        }
        let t = Instant::now();
        s.write_all(request.as_bytes()).expect("write");
        read_answer(&mut s, &mut buf);
        latencies.push(t.elapsed().as_nanos() as u64);
    }
    latencies
}

/// Reads one answer: checks the status line, reads exactly the body.
fn read_answer(s: &mut UnixStream, buf: &mut [u8]) {
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
        return;
    }
}
