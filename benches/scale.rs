//! Scale benchmark (issue #11): `tokend run` with N accounts against a local constant
//! token endpoint. For each N it prints the time until every account's output exists
//! ("first tokens"), the resident memory then and after an idle minute, the CPU used in
//! that minute (the threads' schedstat, in nanoseconds; RSS is read a second after the
//! last output appeared, and again after the minute), how long `tokend check` takes
//! (and its peak memory), and what a reload that changes one of the N accounts costs:
//! its CPU, and that it made exactly one request and rewrote no other account's output.
//!
//! The endpoint (hyper on a thread of this process, bound to 127.0.0.1 only) answers
//! every POST with a fresh token valid for `--lifetime` seconds (default 24 h, so the
//! minute is idle). Every account has one raw output and a scope of its own (so no two
//! share a request), a client secret in a file, and the default
//! `max_concurrent_refreshes`.
//!
//! `cargo bench --bench scale -- N... [--runs R] [--idle SECONDS] [--lifetime SECONDS]
//! [--bin PATH]` (or `benches/scale.sh N...`): each N runs R times (default 3); every
//! run is printed, then the median and the spread (min–max) of each column. `--bin`
//! measures another tokend binary (an older build, for a before/after). Run without
//! `--bench` (as `cargo test --all-targets` does) it checks one small run, briefly.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;

const BIN: &str = env!("CARGO_BIN_EXE_tokend");

struct Args {
    counts: Vec<usize>,
    runs: usize,
    idle: Duration,
    lifetime: u64,
    bin: PathBuf,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let bench = argv.iter().any(|a| a == "--bench");
    let mut a = Args {
        counts: Vec::new(),
        runs: if bench { 3 } else { 1 },
        idle: Duration::from_secs(if bench { 60 } else { 1 }),
        lifetime: 86_400,
        bin: PathBuf::from(BIN),
    };
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match arg.as_str() {
            "--bench" => {}
            "--runs" => a.runs = value("--runs").parse().expect("--runs: a number"),
            "--idle" => {
                a.idle = Duration::from_secs(value("--idle").parse().expect("--idle: seconds"))
            }
            "--lifetime" => a.lifetime = value("--lifetime").parse().expect("--lifetime: seconds"),
            "--bin" => a.bin = PathBuf::from(value("--bin")),
            n if n
                .chars()
                .all(|c| c.is_ascii_digit() || c == ',' || c == '_') =>
            {
                a.counts
                    .push(n.replace([',', '_'], "").parse().expect("a count"))
            }
            // libtest's flags when run as a test.
            _ => {}
        }
    }
    if a.counts.is_empty() {
        a.counts = if bench {
            vec![10, 1_000, 10_000]
        } else {
            vec![20]
        };
    }
    a
}

/// What one run measured.
#[derive(Clone, Default)]
struct Row {
    first_tokens: Duration,
    rss_first: u64,
    rss_idle: u64,
    hwm: u64,
    idle_cpu: Duration,
    idle_wakeups: u64,
    threads: u64,
    check: Duration,
    check_rss: u64,
    reload: Duration,
    reload_cpu: Duration,
    reload_requests: u64,
    reload_rewritten: usize,
}

fn main() {
    let args = args();
    let endpoint = Endpoint::start(args.lifetime);
    println!(
        "tokend scale benchmark: {} (load average {})",
        args.bin.display(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "{:>6} {:>4} | {:>8} {:>9} {:>9} {:>9} {:>8} {:>7} | {:>7} {:>9} | {:>7} {:>7} {:>4} {:>9}",
        "N",
        "run",
        "first",
        "RSS first",
        "RSS idle",
        "peak",
        "idle CPU",
        "wakeups",
        "check",
        "check RSS",
        "reload",
        "rl CPU",
        "reqs",
        "rewritten"
    );
    for &n in &args.counts {
        let mut rows = Vec::new();
        for run in 1..=args.runs {
            let row = measure(&args, &endpoint, n);
            print_row(&n.to_string(), &run.to_string(), &row);
            rows.push(row);
        }
        if rows.len() > 1 {
            summarize(n, &rows);
        }
        if !std::env::args().any(|a| a == "--bench") {
            // As a test: the run must have met the reload promise.
            assert_eq!(
                rows[0].reload_requests, 1,
                "a reload of one account makes one request"
            );
            assert_eq!(
                rows[0].reload_rewritten, 0,
                "a reload of one account rewrites no other output"
            );
        }
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}M", kib as f64 / 1024.0)
}

/// CPU time in milliseconds: two decimals under 10 ms (the idle minute), none above.
fn millis(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}ms")
    } else {
        format!("{ms:.0}ms")
    }
}

fn span_ms(min: Duration, max: Duration) -> String {
    format!("{}-{}", millis(min), millis(max)).replace("ms", "")
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

fn print_row(n: &str, run: &str, r: &Row) {
    println!(
        "{:>6} {:>4} | {:>8} {:>9} {:>9} {:>9} {:>8} {:>7} | {:>7} {:>9} | {:>7} {:>7} {:>4} {:>9}",
        n,
        run,
        secs(r.first_tokens),
        mib(r.rss_first),
        mib(r.rss_idle),
        mib(r.hwm),
        millis(r.idle_cpu),
        r.idle_wakeups,
        secs(r.check),
        mib(r.check_rss),
        secs(r.reload),
        millis(r.reload_cpu),
        r.reload_requests,
        r.reload_rewritten,
    );
    let _ = std::io::stdout().flush();
}

/// The median row, then each column's min–max.
fn summarize(n: usize, rows: &[Row]) {
    fn med<T: Copy + Ord>(rows: &[Row], f: impl Fn(&Row) -> T) -> (T, T, T) {
        let mut v: Vec<T> = rows.iter().map(f).collect();
        v.sort();
        (v[v.len() / 2], v[0], v[v.len() - 1])
    }
    let first = med(rows, |r| r.first_tokens);
    let rss_first = med(rows, |r| r.rss_first);
    let rss_idle = med(rows, |r| r.rss_idle);
    let hwm = med(rows, |r| r.hwm);
    let cpu = med(rows, |r| r.idle_cpu);
    let wake = med(rows, |r| r.idle_wakeups);
    let check = med(rows, |r| r.check);
    let check_rss = med(rows, |r| r.check_rss);
    let reload = med(rows, |r| r.reload);
    let reload_cpu = med(rows, |r| r.reload_cpu);
    let reqs = med(rows, |r| r.reload_requests);
    let rewritten = med(rows, |r| r.reload_rewritten);
    let median = Row {
        first_tokens: first.0,
        rss_first: rss_first.0,
        rss_idle: rss_idle.0,
        hwm: hwm.0,
        idle_cpu: cpu.0,
        idle_wakeups: wake.0,
        threads: 0,
        check: check.0,
        check_rss: check_rss.0,
        reload: reload.0,
        reload_cpu: reload_cpu.0,
        reload_requests: reqs.0,
        reload_rewritten: rewritten.0,
    };
    print_row(&n.to_string(), "med", &median);
    println!(
        "{:>6} {:>4} | {:>8} {:>9} {:>9} {:>9} {:>8} {:>7} | {:>7} {:>9} | {:>7} {:>7} {:>4} {:>9}",
        "",
        "span",
        format!("{}-{}", secs(first.1), secs(first.2)).replace('s', ""),
        format!(
            "{:.1}-{:.1}",
            rss_first.1 as f64 / 1024.0,
            rss_first.2 as f64 / 1024.0
        ),
        format!(
            "{:.1}-{:.1}",
            rss_idle.1 as f64 / 1024.0,
            rss_idle.2 as f64 / 1024.0
        ),
        format!("{:.1}-{:.1}", hwm.1 as f64 / 1024.0, hwm.2 as f64 / 1024.0),
        span_ms(cpu.1, cpu.2),
        format!("{}-{}", wake.1, wake.2),
        format!("{}-{}", secs(check.1), secs(check.2)).replace('s', ""),
        format!(
            "{:.1}-{:.1}",
            check_rss.1 as f64 / 1024.0,
            check_rss.2 as f64 / 1024.0
        ),
        format!("{}-{}", secs(reload.1), secs(reload.2)).replace('s', ""),
        span_ms(reload_cpu.1, reload_cpu.2),
        format!("{}-{}", reqs.1, reqs.2),
        format!("{}-{}", rewritten.1, rewritten.2),
    );
}

/// The config for `n` accounts; `changed` gives one account another scope.
fn config(dir: &Path, addr: SocketAddr, n: usize, changed: Option<usize>) -> String {
    let mut s = String::from("[daemon]\nlog_format = \"text\"\n\n");
    for i in 0..n {
        let scope = if changed == Some(i) {
            format!("scope-{i}-changed")
        } else {
            format!("scope-{i}")
        };
        s.push_str(&format!(
            "[[account]]\nname = \"acct{i}\"\ntoken_url = \"http://{addr}/token\"\n\
             client_id = \"client-{i}\"\nclient_secret = {{ file = \"secret\" }}\nscope = \"{scope}\"\n\
             [[account.output]]\npath = \"{}/acct{i}\"\n\n",
            dir.join("out").display()
        ));
    }
    s
}

/// Replaces `path`'s content at once (a rename), as editors and ConfigMaps do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn measure(args: &Args, endpoint: &Endpoint, n: usize) -> Row {
    let mut row = Row::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
    std::fs::set_permissions(
        dir.path().join("secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    replace(&path, &config(dir.path(), endpoint.addr, n, None));

    // `tokend check`: wall time and peak RSS (from wait4).
    let started = Instant::now();
    #[allow(clippy::zombie_processes)] // wait4 below reaps it (and reads its peak RSS)
    let child = Command::new(&args.bin)
        .args(["check", "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (ok, maxrss) = wait4(child.id());
    row.check = started.elapsed();
    row.check_rss = maxrss;
    assert!(ok, "tokend check failed");

    let log_path = dir.path().join("log");
    let log = std::fs::File::create(&log_path).unwrap();
    let requests_before = endpoint.requests();
    let started = Instant::now();
    let mut child = Command::new(&args.bin)
        .args(["run", "-c"])
        .arg(&path)
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = dir.path().join("out");
    let deadline = started + Duration::from_secs(300);
    loop {
        let have = std::fs::read_dir(&out).map_or(0, |d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.'))
            })
            .count()
        });
        if have >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {have} of {n} outputs after 300 s; log in {}",
            log_path.display()
        );
        assert!(child.try_wait().unwrap().is_none(), "tokend exited early");
        std::thread::sleep(Duration::from_millis(10));
    }
    row.first_tokens = started.elapsed();
    assert_eq!(endpoint.requests() - requests_before, n as u64);
    // A second for the daemon to see it is ready (READY=1) and settle.
    std::thread::sleep(Duration::from_secs(1));
    row.rss_first = status(pid, "VmRSS");

    let cpu = cpu_ns(pid);
    let wakeups = switches(pid);
    std::thread::sleep(args.idle);
    row.idle_cpu = Duration::from_nanos(since(&cpu_ns(pid), &cpu));
    row.idle_wakeups = since(&switches(pid), &wakeups);
    row.rss_idle = status(pid, "VmRSS");
    row.hwm = status(pid, "VmHWM");
    row.threads = status(pid, "Threads");

    // A reload that changes the first account's scope: one request, no other write.
    let stamps: Vec<(u64, i64, i64)> = (0..n)
        .map(|i| {
            let m = std::fs::metadata(out.join(format!("acct{i}"))).unwrap();
            (m.ino(), m.mtime(), m.mtime_nsec())
        })
        .collect();
    let requests = endpoint.requests();
    let cpu = cpu_ns(pid);
    let reloads = count_in(&log_path, "config reloaded");
    let started = Instant::now();
    replace(&path, &config(dir.path(), endpoint.addr, n, Some(0)));
    let mut hupped = false;
    loop {
        if count_in(&log_path, "config reloaded") > reloads && endpoint.requests() > requests {
            let m = std::fs::metadata(out.join("acct0")).unwrap();
            if (m.ino(), m.mtime(), m.mtime_nsec()) != stamps[0] {
                break;
            }
        }
        if !hupped && started.elapsed() > Duration::from_secs(5) {
            // The file watcher did not see it (some file systems): SIGHUP.
            let _ = Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status();
            hupped = true;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the reload did not finish; log in {}",
            log_path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    row.reload = started.elapsed();
    // Anything a reload wrongly sets off would happen within this second.
    std::thread::sleep(Duration::from_secs(1));
    row.reload_cpu = Duration::from_nanos(since(&cpu_ns(pid), &cpu));
    row.reload_requests = endpoint.requests() - requests;
    row.reload_rewritten = (1..n)
        .filter(|&i| {
            let m = std::fs::metadata(out.join(format!("acct{i}"))).unwrap();
            (m.ino(), m.mtime(), m.mtime_nsec()) != stamps[i]
        })
        .count();

    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = child.wait();
    row
}

fn count_in(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// A `/proc/PID/status` field, in its unit (kB for memory).
fn status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A number for each of `pid`'s threads, by thread id, that `read` takes from the
/// thread's /proc directory.
fn per_thread(pid: u32, read: impl Fn(&Path) -> Option<u64>) -> HashMap<String, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    tasks
        .filter_map(|t| {
            let t = t.ok()?;
            Some((t.file_name().into_string().ok()?, read(&t.path())?))
        })
        .collect()
}

/// Time each of `pid`'s threads spent on a CPU, in nanoseconds (the first field of
/// schedstat; utime and stime count whole 10 ms clock ticks, too coarse for an idle
/// minute).
fn cpu_ns(pid: u32) -> HashMap<String, u64> {
    let times = per_thread(pid, |task| {
        std::fs::read_to_string(task.join("schedstat"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    });
    assert!(
        !times.is_empty(),
        "no /proc/{pid}/task/*/schedstat (a kernel without CONFIG_SCHED_INFO?)"
    );
    times
}

/// Context switches of each of `pid`'s threads, by thread id.
fn switches(pid: u32) -> HashMap<String, u64> {
    per_thread(pid, |task| {
        let s = std::fs::read_to_string(task.join("status")).ok()?;
        Some(
            s.lines()
                .filter_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                })
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum(),
        )
    })
}

/// How much the threads' counters grew since `before`; threads that ended meanwhile
/// are not counted, threads that started are counted whole.
fn since(now: &HashMap<String, u64>, before: &HashMap<String, u64>) -> u64 {
    now.iter()
        .map(|(t, n)| n.saturating_sub(before.get(t).copied().unwrap_or(0)))
        .sum()
}

/// Waits for the child `pid`; whether it exited 0, and its peak RSS in KiB.
fn wait4(pid: u32) -> (bool, u64) {
    use nix::libc;
    let mut status = 0;
    // SAFETY: plain out-parameters; `pid` is our child, not yet waited for.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(r, pid as libc::pid_t, "wait4 failed");
    (
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        usage.ru_maxrss as u64,
    )
}

/// The constant token endpoint: every POST gets a fresh token.
struct Endpoint {
    addr: SocketAddr,
    count: Arc<AtomicU64>,
}

impl Endpoint {
    fn start(lifetime: u64) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let counter = count.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(serve(listener, counter, lifetime));
        });
        Endpoint { addr, count }
    }

    fn requests(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

async fn serve(listener: std::net::TcpListener, count: Arc<AtomicU64>, lifetime: u64) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let count = count.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| {
                    let count = count.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        let n = count.fetch_add(1, Ordering::SeqCst);
                        let body = format!(
                            r#"{{"access_token":"bench-token-{n:08}","token_type":"Bearer","expires_in":{lifetime}}}"#
                        );
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
