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
//! The daemon, the fake token endpoint and the clients are `benches/common`'s, which
//! `benches/dpop.rs` shares.
//!
//! `-- --instructions N` measures what the wake-ups hide: the daemon runs under
//! valgrind's callgrind, and for each mode one client sends N requests (after a
//! warm-up) while callgrind counts the instructions the daemon executes, its own and
//! the C library's (not the kernel's). The count per request does not depend on the
//! machine's load: one build's runs agree within about 2% (how often the runtime polls
//! varies), where requests per second on this kind of machine vary by 10-20%.

mod common;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Args, Daemon, Launcher, Limit, Request, BIN, TOKEN_LEN};

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

    /// The request each client sends; every answer is the whole token.
    fn request(self) -> Request {
        let (text, keep_alive) = match self {
            Mode::KeepAlive => (format!("GET {PATH} HTTP/1.1\r\nhost: b\r\n\r\n"), true),
            Mode::PerRequest => (
                format!("GET {PATH} HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n"),
                false,
            ),
        };
        Request {
            text,
            keep_alive,
            body_len: Some(TOKEN_LEN),
        }
    }
}

fn main() {
    let args = Args::from_env();
    let bench = args.bench();
    let seconds = args.number("--seconds", 5.0);
    let runs = args.number("--runs", 3.0) as usize;
    let bin = args
        .value("--bin")
        .map_or_else(|| PathBuf::from(BIN), PathBuf::from);
    // `--only keep-alive|per-request` and `--clients N` pick scenarios (for A/B runs).
    let only = args.value("--only");
    assert!(
        only.is_none_or(|o| o == "keep-alive" || o == "per-request"),
        "--only: keep-alive or per-request"
    );
    let wanted_clients = args.number("--clients", 0.0) as usize;
    if bench && args.has("--instructions") {
        instructions(&bin, args.number("--instructions", 0.0) as usize);
        return;
    }

    let daemon = start_daemon(&Launcher::direct(&bin));
    let token = common::fetch_token(&daemon.socket, PATH);
    assert_eq!(token.len(), TOKEN_LEN);

    let scenarios = [
        (Mode::KeepAlive, 1),
        (Mode::KeepAlive, 4),
        (Mode::PerRequest, 1),
        (Mode::PerRequest, 4),
    ];
    if !bench {
        for (mode, clients) in scenarios {
            let r = common::run(
                &daemon.socket,
                &mode.request(),
                clients,
                Limit::Requests(200),
            );
            println!("smoke: {} x{clients}: {} requests ok", mode.name(), r.count);
        }
        return;
    }
    let floor = start_floor();
    println!(
        "tokend socket benchmark: {}, GET {PATH}, a {TOKEN_LEN}-character token, {runs} runs of {seconds} s per scenario (the median run shown), {} CPUs, load average {}",
        bin.display(),
        common::cpus(),
        common::load_average()
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
            let r = common::median_run(socket, &mode.request(), clients, runs, seconds);
            println!(
                "| {server} | {} | {clients} | {} |",
                mode.name(),
                r.figures()
            );
        }
    }
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
        let _ = common::fetch_token(&daemon.socket, PATH);
        common::run(&daemon.socket, &mode.request(), 1, Limit::Requests(200));
        callgrind_control(&daemon, "on");
        let r = common::run(
            &daemon.socket,
            &mode.request(),
            1,
            Limit::Requests(requests),
        );
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

/// Starts the daemon with one client-credentials account (`common::fetch_token`
/// waits for its token).
fn start_daemon(launcher: &Launcher) -> Daemon {
    common::start_daemon(launcher, "Bearer", |_, socket, addr| {
        format!(
            "[daemon]\nsocket = \"{}\"\nlog_format = \"text\"\nlog_level = \"warn\"\n\n\
             [[account]]\nname = \"bench\"\ntoken_url = \"http://{addr}/token\"\n\
             grant_type = \"client_credentials\"\nclient_id = \"id\"\n\
             client_secret = {{ env = \"TOKEND_BENCH_SECRET\" }}\n",
            socket.display()
        )
    })
}
