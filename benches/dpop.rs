//! Benchmark of `POST /v1/tokens/{account}/dpop` over the Unix socket (SPEC §9): proofs
//! per second and latency percentiles with keep-alive, for 1 and 4 concurrent clients,
//! beside plain token reads (`GET /v1/tokens/{account}/raw`) of the same daemon in the
//! same run. `benches/dpop.sh` runs it; BENCHMARKS.md has the numbers.
//!
//! Like `benches/socket.rs` (the harness both use is `benches/common`): the real daemon
//! (`tokend run`, bench profile) against a local fake token endpoint that issues a
//! 1,024-character token (`token_type` DPoP), its ES256 key made once in a temporary
//! `state_dir`; client threads with blocking std sockets and hand-written HTTP/1.1 that
//! check every answer's status and read exactly its length. Each scenario runs N times
//! (`--runs`, default 3) for `--seconds` (default 5) after a warm-up; the run with the
//! median rate is shown. Without `--bench` (as `cargo test --all-targets` runs it) it
//! only checks every scenario, briefly. `--bin PATH` measures another build of tokend
//! (one with symbols, under a profiler).

mod common;

use common::{Args, Launcher, Limit, Request, BIN, TOKEN_LEN};

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

    /// Keep-alive requests; the proofs' length varies, so no fixed body length.
    fn request(self) -> Request {
        let text = match self {
            Ask::Raw => format!("GET {RAW} HTTP/1.1\r\nhost: b\r\n\r\n"),
            Ask::Dpop => format!(
                "POST {DPOP} HTTP/1.1\r\nhost: b\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
                BODY.len()
            ),
        };
        Request {
            text,
            keep_alive: true,
            body_len: None,
        }
    }
}

fn main() {
    let args = Args::from_env();
    let seconds = args.number("--seconds", 5.0);
    let runs = args.number("--runs", 3.0) as usize;
    let bin = args.value("--bin").unwrap_or(BIN).to_owned();
    let daemon = common::start_daemon(&Launcher::direct(&bin), "DPoP", |dir, socket, addr| {
        std::fs::create_dir(dir.join("state")).unwrap();
        format!(
            "[daemon]\nsocket = \"{}\"\nstate_dir = \"state\"\nlog_format = \"text\"\nlog_level = \"warn\"\n\n\
             [[account]]\nname = \"bench\"\ntoken_url = \"http://{addr}/token\"\n\
             client_id = \"id\"\nclient_secret = {{ env = \"TOKEND_BENCH_SECRET\" }}\n\
             token_binding = \"dpop\"\nurls = [\"https://fhir.example/r4/\"]\n",
            socket.display()
        )
    });
    common::fetch_token(&daemon.socket, RAW);
    let scenarios = [(Ask::Raw, 1), (Ask::Dpop, 1), (Ask::Raw, 4), (Ask::Dpop, 4)];
    if !args.bench() {
        for (ask, clients) in scenarios {
            let r = common::run(
                &daemon.socket,
                &ask.request(),
                clients,
                Limit::Requests(200),
            );
            println!("smoke: {} x{clients}: {} requests ok", ask.name(), r.count);
        }
        return;
    }
    println!(
        "tokend DPoP benchmark: {bin}, a {TOKEN_LEN}-character token, ES256, keep-alive, {runs} runs of {seconds} s per scenario (the median run shown), {} CPUs, load average {}",
        common::cpus(),
        common::load_average()
    );
    println!();
    println!("| request | clients | requests/s | p50 | p99 | p99.9 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (ask, clients) in scenarios {
        let r = common::median_run(&daemon.socket, &ask.request(), clients, runs, seconds);
        println!("| {} | {clients} | {} |", ask.name(), r.figures());
    }
}
