//! Benchmark of `GET /v1/tokens/{account}/raw` over the Unix socket: requests per second
//! and latency percentiles, with keep-alive and with one connection per request, for 1
//! and 4 concurrent clients. `benches/socket.sh` runs it; BENCHMARKS.md has the numbers.
//!
//! It starts the real daemon (`tokend run`, built by cargo in the bench profile) against
//! a local fake token endpoint that issues a 1,024-character token, waits for the token,
//! then drives the socket from client threads that use blocking std sockets and
//! hand-written HTTP/1.1, so that the client costs as little as possible. Each client
//! checks every answer's status line and length.
//!
//! For calibration it measures, with the same client in the same run, a floor: four
//! threads doing blocking `accept`/`read`/`write` on another socket and answering the
//! same bytes without parsing anything. On this kind of virtual machine the time a
//! sleeping vCPU takes to wake up dominates both, and it varies with what else the host
//! runs; the floor shows what the machine allowed in that run.
//!
//! `cargo bench --bench socket [-- --seconds N] [-- --runs N] [-- --bin PATH]`: each
//! scenario runs N times (default 3) and the run with the median rate is reported;
//! `--bin` measures another build of tokend, `--only keep-alive|per-request` and
//! `--clients N` run some of the scenarios. Run without `--bench` (as `cargo test
//! --all-targets` does) it only checks that every scenario works, briefly.
//!
//! `-- --instructions N` measures what the wake-ups hide: the daemon runs under
//! valgrind's callgrind, and for each mode one client sends N requests (after a
//! warm-up) while callgrind counts the instructions the daemon executes, its own and
//! the C library's (not the kernel's). The count per request does not depend on the
//! machine's load: one build's runs agree within about 2% (how often the runtime polls
//! varies), where requests per second on this kind of machine vary by 10-20%.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tokend");
const TOKEN_LEN: usize = 1024;
const PATH: &str = "/v1/tokens/bench/raw";

#[derive(Clone, Copy)]
enum Mode {
    KeepAlive,
    PerRequest,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::PerRequest => "connection per request",
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

/// The daemon's program and the arguments before `run -c CONFIG`.
struct Launcher {
    program: PathBuf,
    args: Vec<String>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    // The word after `name`, if given.
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let arg = |name: &str, default: f64| -> f64 {
        value(name).map_or(default, |s| s.parse().expect("a number"))
    };
    let seconds = arg("--seconds", 5.0);
    let runs = arg("--runs", 3.0) as usize;
    let bin = value("--bin").map_or_else(|| PathBuf::from(BIN), PathBuf::from);
    // `--only keep-alive|per-request` and `--clients N` pick scenarios (for A/B runs).
    let only = value("--only");
    assert!(
        only.is_none_or(|o| o == "keep-alive" || o == "per-request"),
        "--only: keep-alive or per-request"
    );
    let wanted_clients = arg("--clients", 0.0) as usize;
    if bench && args.iter().any(|a| a == "--instructions") {
        instructions(&bin, arg("--instructions", 0.0) as usize);
        return;
    }

    let daemon = start_daemon(&Launcher {
        program: bin.clone(),
        args: Vec::new(),
    });
    let token = fetch_token(&daemon.socket);
    assert_eq!(token.len(), TOKEN_LEN);

    let scenarios = [
        (Mode::KeepAlive, 1),
        (Mode::KeepAlive, 4),
        (Mode::PerRequest, 1),
        (Mode::PerRequest, 4),
    ];
    if !bench {
        for (mode, clients) in scenarios {
            let r = run(&daemon.socket, mode, clients, Limit::Requests(200));
            println!("smoke: {} x{clients}: {} requests ok", mode.name(), r.count);
        }
        return;
    }
    let floor = start_floor();
    println!(
        "tokend socket benchmark: {}, GET {PATH}, a {TOKEN_LEN}-character token, {runs} runs of {seconds} s per scenario (the median run shown), {} CPUs, load average {}",
        bin.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    println!();
    println!("| server | mode | clients | requests/s | p50 | p99 | p99.9 |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (mode, clients) in scenarios {
        let mode_wanted = only.is_none_or(|o| match mode {
            Mode::KeepAlive => o == "keep-alive",
            Mode::PerRequest => o == "per-request",
        });
        if !mode_wanted || (wanted_clients != 0 && clients != wanted_clients) {
            continue;
        }
        for (server, socket) in [("tokend", &daemon.socket), ("floor", &floor)] {
            // Warm up: connections, caches, the CPU's clock.
            run(
                socket,
                mode,
                clients,
                Limit::Time(Duration::from_millis(300)),
            );
            let mut results: Vec<Run> = (0..runs)
                .map(|_| {
                    run(
                        socket,
                        mode,
                        clients,
                        Limit::Time(Duration::from_secs_f64(seconds)),
                    )
                })
                .collect();
            results.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
            let r = &results[results.len() / 2];
            println!(
                "| {server} | {} | {clients} | {:.0} | {} | {} | {} |",
                mode.name(),
                r.rate(),
                micros(r.percentile(50.0)),
                micros(r.percentile(99.0)),
                micros(r.percentile(99.9)),
            );
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Instructions the daemon executes per request, for each mode with one client: see
/// the module's comment.
fn instructions(bin: &Path, requests: usize) {
    assert!(
        requests > 0,
        "--instructions N: a number of requests above 0"
    );
    let valgrind = Command::new("valgrind").arg("--version").output();
    assert!(
        valgrind.is_ok_and(|o| o.status.success()),
        "--instructions needs valgrind (Debian: apt-get install valgrind)"
    );
    println!(
        "tokend socket benchmark: {}, GET {PATH}, a {TOKEN_LEN}-character token, instructions the daemon executes per request (callgrind), {requests} requests per mode, 1 client",
        bin.display()
    );
    println!();
    println!("| mode | instructions per request |");
    println!("|---|---:|");
    for mode in [Mode::KeepAlive, Mode::PerRequest] {
        let out = tempfile::tempdir().unwrap();
        let profile = out.path().join("callgrind.out");
        let mut daemon = start_daemon(&Launcher {
            program: "valgrind".into(),
            args: vec![
                "-q".into(),
                "--tool=callgrind".into(),
                "--instr-atstart=no".into(),
                format!("--callgrind-out-file={}", profile.display()),
                bin.display().to_string(),
            ],
        });
        let _ = fetch_token(&daemon.socket);
        run(&daemon.socket, mode, 1, Limit::Requests(200));
        callgrind_control(&daemon, "on");
        let r = run(&daemon.socket, mode, 1, Limit::Requests(requests));
        callgrind_control(&daemon, "off");
        assert_eq!(r.count, requests);
        // callgrind writes its profile when the program ends; SIGKILL would lose it.
        let pid = nix::unistd::Pid::from_raw(daemon.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        daemon.child.wait().unwrap();
        let text = std::fs::read_to_string(&profile).expect("callgrind's profile");
        let total: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("totals: "))
            .expect("a totals line in callgrind's profile")
            .trim()
            .parse()
            .expect("a number of instructions");
        println!("| {} | {} |", mode.name(), total / requests as u64);
    }
}

fn callgrind_control(daemon: &Daemon, instrumentation: &str) {
    let out = Command::new("callgrind_control")
        .args(["-i", instrumentation])
        .arg(daemon.child.id().to_string())
        .output()
        .expect("callgrind_control");
    assert!(
        out.status.success(),
        "callgrind_control -i {instrumentation}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The floor: four threads that accept, read a request and write the same answer
/// tokend gives, with blocking system calls and no parsing (it answers each read that
/// ends a request head).
fn start_floor() -> PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    let path = dir.join("floor.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let answer = {
        let mut a = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\ncontent-length: {TOKEN_LEN}\r\ndate: Mon, 23 Nov 2026 01:23:05 GMT\r\n\r\n"
        )
        .into_bytes();
        a.extend(std::iter::repeat_n(b't', TOKEN_LEN));
        std::sync::Arc::new(a)
    };
    for _ in 0..4 {
        let listener = listener.try_clone().unwrap();
        let answer = answer.clone();
        std::thread::spawn(move || loop {
            let Ok((mut s, _)) = listener.accept() else {
                continue;
            };
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&answer).is_err() {
                    break;
                }
            }
        });
    }
    path
}

fn micros(ns: u64) -> String {
    format!("{:.1} µs", ns as f64 / 1000.0)
}

/// Starts `tokend run` against a fake token endpoint (`fetch_token` waits for it).
fn start_daemon(launcher: &Launcher) -> Daemon {
    let idp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = idp.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in idp.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let _ = c.read(&mut buf);
                let body = format!(
                    r#"{{"access_token":"{}","token_type":"Bearer","expires_in":3600}}"#,
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
            "[daemon]\nsocket = \"{}\"\nlog_format = \"text\"\nlog_level = \"warn\"\n\n\
             [[account]]\nname = \"bench\"\ntoken_url = \"http://{addr}/token\"\n\
             grant_type = \"client_credentials\"\nclient_id = \"id\"\n\
             client_secret = {{ env = \"TOKEND_BENCH_SECRET\" }}\n",
            socket.display()
        ),
    )
    .unwrap();
    let child = Command::new(&launcher.program)
        .args(&launcher.args)
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

fn fetch_token(socket: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = UnixStream::connect(socket) {
            let mut buf = Vec::new();
            write!(
                s,
                "GET {PATH} HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n"
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

fn run(socket: &Path, mode: Mode, clients: usize, limit: Limit) -> Run {
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let socket = socket.to_owned();
            std::thread::spawn(move || client(&socket, mode, limit))
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

/// One client: requests until the limit, returns each one's latency.
fn client(socket: &Path, mode: Mode, limit: Limit) -> Vec<u64> {
    let request = match mode {
        Mode::KeepAlive => format!("GET {PATH} HTTP/1.1\r\nhost: b\r\n\r\n"),
        Mode::PerRequest => format!("GET {PATH} HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n"),
    };
    let mut latencies = Vec::with_capacity(1 << 20);
    let mut buf = vec![0u8; 4096];
    let mut conn: Option<UnixStream> = None;
    let start = Instant::now();
    loop {
        match limit {
            Limit::Time(d) if start.elapsed() >= d => break,
            Limit::Requests(n) if latencies.len() >= n => break,
            _ => {}
        }
        let t = Instant::now();
        let mut s = match (mode, conn.take()) {
            (Mode::KeepAlive, Some(s)) => s,
            _ => UnixStream::connect(socket).expect("connect"),
        };
        s.write_all(request.as_bytes()).expect("write");
        read_answer(&mut s, &mut buf);
        latencies.push(t.elapsed().as_nanos() as u64);
        if let Mode::KeepAlive = mode {
            conn = Some(s);
        }
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
        assert_eq!(len, TOKEN_LEN);
        return;
    }
}
