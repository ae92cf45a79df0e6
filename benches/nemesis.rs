//! Nemesis (issue #20): a campaign in the spirit of Jepsen against cluster mode, since
//! single fault scenarios miss interleavings. Three etcd members and three `tokend run`
//! members share a refresh_token account against the fake IdP of the integration tests
//! (it rotates the refresh token on every answer, and revokes the whole family when a
//! used one comes back), with short token lifetimes, while a seeded nemesis, one fault
//! at a time:
//! - stops a tokend member (SIGSTOP) for up to 3 x lease_ttl, then lets it go on;
//! - kills one (kill -9) and starts it again, or stops it (SIGTERM) and starts it again;
//! - sets the wall clock of one member (`m2`, under libfaketime) minutes ahead or back;
//! - stops (SIGSTOP) or kills an etcd member (quorum kept), then resumes or restarts it;
//! - cuts a member off from etcd (its connections go through proxies of its own).
//!
//! Every member's token file is read every 100 ms throughout; a read finds a valid token
//! when the file holds a token the IdP issued and has not seen expire. At the end it
//! prints the refresh tokens sent twice (must be 0: it exits 1 otherwise), the provider
//! requests per token lifetime, and per member the share of reads that found a valid
//! token, of all reads, of those while the member ran, and of those while it ran and was
//! not cut off from etcd.
//!
//! One exception is kept out by the nemesis itself: a kill -9 never lands while an answer
//! that rotated the refresh token is on its way to the member that asked (within 1.5 s
//! of the IdP's last request, the member is let go on and the kill comes later). That
//! answer holds the only copy of the next link, and a process that dies before saving it
//! loses the chain whatever any protocol does (SPEC §6); kills anywhere else, also
//! between a claim and its request, are fair.
//!
//! `cargo bench --bench nemesis -- --seed N --minutes M [--lifetime SECONDS] [--bin PATH]`
//! (or `benches/nemesis.sh ...`). Without `--bench` (as `cargo test --all-targets` runs
//! it) it does nothing: `scripts/test` runs a one-minute campaign.

#[allow(dead_code)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::{Rng as _, SeedableRng as _};

use support::etcd::EtcdCluster;
use support::fake_idp::{FakeIdp, Reply};
use support::proxy::Proxy;
use support::{Daemon, Sandbox};

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const TTL: Duration = Duration::from_secs(2);
const MEMBERS: usize = 3;
/// The member whose wall clock the nemesis sets.
const SKEWED: usize = 2;

struct Args {
    seed: u64,
    minutes: f64,
    lifetime: u64,
    bin: Option<PathBuf>,
    bench: bool,
}

fn args() -> Args {
    let mut a = Args {
        seed: 1,
        minutes: 1.0,
        lifetime: 20,
        bin: None,
        bench: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().unwrap_or_else(|| panic!("{name} needs a value"));
        match arg.as_str() {
            "--bench" => a.bench = true,
            "--seed" => a.seed = value("--seed").parse().expect("--seed: a number"),
            "--minutes" => a.minutes = value("--minutes").parse().expect("--minutes: a number"),
            "--lifetime" => a.lifetime = value("--lifetime").parse().expect("--lifetime: seconds"),
            "--bin" => a.bin = Some(PathBuf::from(value("--bin"))),
            // libtest's flags when run as a test.
            _ => {}
        }
    }
    a
}

/// One tokend member: its sandbox, config, proxies to etcd, and the process.
struct Member {
    name: String,
    sb: Sandbox,
    config: PathBuf,
    proxies: Vec<Proxy>,
    /// `m2`: the file libfaketime reads its clock's offset from.
    clock: Option<PathBuf>,
    daemon: Option<Daemon>,
    bin: Option<PathBuf>,
    /// The logs of its earlier runs (killed, stopped, started again).
    logs: String,
}

impl Member {
    fn new(i: usize, etcd: &EtcdCluster, idp: &FakeIdp, bin: Option<PathBuf>) -> Member {
        let sb = Sandbox::new();
        let name = format!("m{i}");
        let proxies: Vec<Proxy> = etcd
            .endpoints()
            .iter()
            .map(|e| {
                Proxy::start(
                    e.trim_start_matches("http://")
                        .parse()
                        .expect("an etcd address"),
                )
            })
            .collect();
        let endpoints: Vec<String> = proxies.iter().map(|p| format!("\"{}\"", p.url())).collect();
        let config = sb.config(&format!(
            "[daemon]\nstate_dir = \"state\"\nsocket = \"tokend.sock\"\n\n\
             [cluster]\nendpoints = [{}]\nprefix = \"/tokend/nemesis\"\nmember = \"{name}\"\n\
             lease_ttl = \"2s\"\nkey = \"{KEY}\"\n\n\
             [[account]]\nname = \"a\"\ntoken_url = \"{}\"\nclient_id = \"id\"\n\
             grant_type = \"refresh_token\"\nrefresh_token = \"rt-seed\"\nclient_auth = \"none\"\n\
             refresh_token_timeout = \"10s\"\nmin_refresh_interval = \"1s\"\n\n\
             [[account.output]]\npath = \"out/a\"\n",
            endpoints.join(", "),
            idp.url()
        ));
        let clock = (i == SKEWED).then(|| {
            let f = sb.path("clock");
            std::fs::write(&f, "+0\n").expect("write the clock file");
            f
        });
        Member {
            name,
            sb,
            config,
            proxies,
            clock,
            daemon: None,
            bin,
            logs: String::new(),
        }
    }

    /// Keeps the log of the run that ended.
    fn ended(&mut self, log: String) {
        self.logs.push_str(&log);
        self.logs.push_str("---- (stopped here) ----\n");
    }

    fn start(&mut self) {
        let mut cmd = match &self.bin {
            Some(b) => Command::new(b),
            None => support::tokend(),
        };
        cmd.arg("run").arg("-c").arg(&self.config);
        if let Some(f) = &self.clock {
            cmd.env("LD_PRELOAD", faketime_library())
                .env("FAKETIME_TIMESTAMP_FILE", f)
                .env("FAKETIME_CACHE_DURATION", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        self.daemon = Some(Daemon::spawn(cmd));
    }

    fn pid(&self) -> Option<Pid> {
        self.daemon.as_ref().map(Daemon::pid)
    }

    fn token_file(&self) -> PathBuf {
        self.sb.path("out/a")
    }
}

/// What Debian's `faketime` preloads (asked of it: no path is written here).
fn faketime_library() -> String {
    let out = Command::new("faketime")
        .args(["-f", "+0", "sh", "-c", "printf %s \"$LD_PRELOAD\""])
        .output()
        .expect("faketime runs (Debian's faketime; scripts/test installs it)");
    String::from_utf8(out.stdout).expect("a path")
}

/// Per member: reads, reads that found a valid token, the same while it ran, and while
/// it ran and was not cut off from etcd (a member cut off cannot learn the cluster's
/// next token, nor renew a refresh-token chain alone: SPEC §8).
#[derive(Debug, Default, Clone, Copy)]
struct Reads {
    total: u64,
    valid: u64,
    running: u64,
    running_valid: u64,
    connected: u64,
    connected_valid: u64,
}

/// A fault the nemesis plays, and for how long.
#[derive(Debug)]
enum Fault {
    Pause(usize, Duration),
    Kill(usize, Duration),
    Term(usize, Duration),
    Clock(i64),
    PauseEtcd(usize, Duration),
    KillEtcd(usize, Duration),
    Cut(usize, Duration),
}

fn secs(rng: &mut rand::rngs::StdRng, lo: f64, hi: f64) -> Duration {
    Duration::from_secs_f64(rng.gen_range(lo..hi))
}

fn pick(rng: &mut rand::rngs::StdRng) -> Fault {
    let member = rng.gen_range(0..MEMBERS);
    let etcd = rng.gen_range(0..3);
    match rng.gen_range(0..7) {
        0 => Fault::Pause(member, secs(rng, 0.5, 3.0 * TTL.as_secs_f64())),
        1 => Fault::Kill(member, secs(rng, 0.0, 5.0)),
        2 => Fault::Term(member, secs(rng, 0.0, 3.0)),
        3 => Fault::Clock(rng.gen_range(-300..=300)),
        4 => Fault::PauseEtcd(etcd, secs(rng, 1.0, 8.0)),
        5 => Fault::KillEtcd(etcd, secs(rng, 1.0, 8.0)),
        _ => Fault::Cut(member, secs(rng, 1.0, 10.0)),
    }
}

/// Sleeps `d`: the fault's duration or the quiet between faults (the sampler reads
/// meanwhile), not a wait for a state.
fn hold(d: Duration) {
    std::thread::sleep(d);
}

fn main() {
    let args = args();
    if !args.bench {
        println!("nemesis: run with --bench (benches/nemesis.sh --seed N --minutes M)");
        return;
    }
    let Some(mut etcd) = EtcdCluster::start(3) else {
        std::process::exit(1);
    };
    let lifetime = Duration::from_secs(args.lifetime);
    let idp = FakeIdp::start(Reply::token(args.lifetime));
    idp.seed_refresh_token("rt-seed");
    let mut members: Vec<Member> = (0..MEMBERS)
        .map(|i| Member::new(i, &etcd, &idp, args.bin.clone()))
        .collect();
    for m in &mut members {
        m.start();
    }
    // Every member serves the chain's first token before the nemesis starts.
    support::wait_until(
        "every member serving a token",
        Duration::from_secs(60),
        || {
            let t = idp.issued().first()?.clone();
            members
                .iter()
                .all(|m| support::read(&m.token_file()).as_deref() == Some(t.as_str()))
                .then_some(())
        },
    );
    let start = Instant::now();
    let requests_before = idp.requests().len();

    // The sampler: every member's token file every 100 ms.
    let files: Vec<PathBuf> = members.iter().map(Member::token_file).collect();
    let running: Arc<Vec<AtomicBool>> =
        Arc::new((0..MEMBERS).map(|_| AtomicBool::new(true)).collect());
    let cut_off: Arc<Vec<AtomicBool>> =
        Arc::new((0..MEMBERS).map(|_| AtomicBool::new(false)).collect());
    let reads: Arc<Mutex<Vec<Reads>>> = Arc::new(Mutex::new(vec![Reads::default(); MEMBERS]));
    let stop = Arc::new(AtomicBool::new(false));
    // Each stretch of reads without a valid token: member, first such read, next valid.
    let gaps: Arc<Mutex<Vec<(usize, Instant, Instant)>>> = Arc::default();
    let sampler = std::thread::spawn({
        let (running, cut_off, reads, stop, gaps) = (
            running.clone(),
            cut_off.clone(),
            reads.clone(),
            stop.clone(),
            gaps.clone(),
        );
        let expires = idp.expiry_reader();
        move || {
            let mut invalid_since: Vec<Option<Instant>> = vec![None; files.len()];
            while !stop.load(Ordering::SeqCst) {
                for (i, f) in files.iter().enumerate() {
                    let valid = std::fs::read_to_string(f)
                        .ok()
                        .as_deref()
                        .and_then(&expires)
                        .is_some_and(|e| e > Instant::now());
                    let up = running[i].load(Ordering::SeqCst);
                    let connected = up && !cut_off[i].load(Ordering::SeqCst);
                    let mut r = reads.lock().unwrap();
                    r[i].total += 1;
                    r[i].valid += u64::from(valid);
                    r[i].running += u64::from(up);
                    r[i].running_valid += u64::from(up && valid);
                    r[i].connected += u64::from(connected);
                    r[i].connected_valid += u64::from(connected && valid);
                    match (valid, invalid_since[i]) {
                        (false, None) => invalid_since[i] = Some(Instant::now()),
                        (true, Some(from)) => {
                            gaps.lock().unwrap().push((i, from, Instant::now()));
                            invalid_since[i] = None;
                        }
                        _ => {}
                    }
                }
                hold(Duration::from_millis(100));
            }
            for (i, from) in invalid_since.iter().enumerate() {
                if let Some(from) = from {
                    gaps.lock().unwrap().push((i, *from, Instant::now()));
                }
            }
        }
    });

    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let end = start + Duration::from_secs_f64(args.minutes * 60.0);
    let mut faults = 0;
    let mut skipped_kills = 0;
    let at = |t: Instant| t.duration_since(start).as_secs_f64();
    while Instant::now() < end {
        hold(secs(&mut rng, 2.0, 6.0));
        if Instant::now() >= end {
            break;
        }
        let fault = pick(&mut rng);
        println!("{:7.1}s  {fault:?}", at(Instant::now()));
        faults += 1;
        match fault {
            Fault::Pause(i, d) => {
                let Some(pid) = members[i].pid() else {
                    continue;
                };
                running[i].store(false, Ordering::SeqCst);
                kill(pid, Signal::SIGSTOP).expect("stop a member");
                hold(d);
                kill(pid, Signal::SIGCONT).expect("resume a member");
                running[i].store(true, Ordering::SeqCst);
            }
            Fault::Kill(i, d) => {
                let Some(pid) = members[i].pid() else {
                    continue;
                };
                // Stopped first: it sends nothing more while the IdP is looked at.
                kill(pid, Signal::SIGSTOP).expect("stop a member");
                hold(Duration::from_millis(50));
                let last = idp.requests().last().map(|r| r.at);
                if last.is_some_and(|l| l.elapsed() < Duration::from_millis(1500)) {
                    println!("           an answer may be on its way to it: not now");
                    kill(pid, Signal::SIGCONT).expect("resume a member");
                    skipped_kills += 1;
                    continue;
                }
                running[i].store(false, Ordering::SeqCst);
                kill(pid, Signal::SIGKILL).expect("kill a member");
                if let Some(d) = members[i].daemon.take() {
                    let log = d.log();
                    drop(d);
                    members[i].ended(log);
                }
                hold(d);
                members[i].start();
                running[i].store(true, Ordering::SeqCst);
            }
            Fault::Term(i, d) => {
                let Some(daemon) = members[i].daemon.take() else {
                    continue;
                };
                running[i].store(false, Ordering::SeqCst);
                let (status, took, log) = daemon.terminate();
                if !status.success() {
                    println!(
                        "           {}: exit {status} after {took:?}",
                        members[i].name
                    );
                }
                members[i].ended(log);
                hold(d);
                members[i].start();
                running[i].store(true, Ordering::SeqCst);
            }
            Fault::Clock(offset) => {
                let f = members[SKEWED].clock.as_ref().expect("m2 has a clock file");
                std::fs::write(f, format!("{offset:+}\n")).expect("set m2's clock");
            }
            Fault::PauseEtcd(j, d) => {
                etcd.pause(j);
                hold(d);
                etcd.resume(j);
            }
            Fault::KillEtcd(j, d) => {
                etcd.kill(j);
                hold(d);
                etcd.restart(j);
                etcd.wait_healthy(Duration::from_secs(30));
            }
            Fault::Cut(i, d) => {
                cut_off[i].store(true, Ordering::SeqCst);
                for p in &members[i].proxies {
                    p.cut();
                }
                hold(d);
                for p in &members[i].proxies {
                    p.restore();
                }
                cut_off[i].store(false, Ordering::SeqCst);
            }
        }
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    sampler.join().expect("the sampler does not panic");

    let reused = idp.reused_refresh_tokens();
    let revoked = idp.family_revoked("rt-seed");
    let requests = idp.requests().len() - requests_before;
    let per_lifetime = requests as f64 * lifetime.as_secs_f64() / elapsed.as_secs_f64();
    println!();
    println!(
        "seed {}, {:.1} min, token lifetime {} s, lease_ttl {} s: {faults} faults ({skipped_kills} kills put off)",
        args.seed,
        elapsed.as_secs_f64() / 60.0,
        args.lifetime,
        TTL.as_secs()
    );
    println!(
        "refresh tokens sent twice: {}{}",
        reused.len(),
        if revoked { " (family revoked)" } else { "" }
    );
    println!(
        "provider requests: {requests} in {:.0} s = {per_lifetime:.2} per token lifetime",
        elapsed.as_secs_f64()
    );
    let reads = reads.lock().unwrap();
    let pct = |a: u64, b: u64| {
        if b == 0 {
            100.0
        } else {
            a as f64 * 100.0 / b as f64
        }
    };
    for (m, r) in members.iter().zip(reads.iter()) {
        println!(
            "{}: {:.2}% of {} reads found a valid token ({:.2}% of {} while it ran; {:.2}% of {} while it ran and was not cut off from etcd)",
            m.name,
            pct(r.valid, r.total),
            r.total,
            pct(r.running_valid, r.running),
            r.running,
            pct(r.connected_valid, r.connected),
            r.connected
        );
    }
    // When each member read no valid token, on the faults' clock (seconds into the run).
    let gaps = gaps.lock().unwrap();
    println!("stretches without a valid token: {}", gaps.len());
    for (i, from, to) in gaps.iter() {
        println!(
            "  {}: {:7.1}s to {:7.1}s ({:.1} s)",
            members[*i].name,
            at(*from),
            at(*to),
            to.duration_since(*from).as_secs_f64()
        );
    }
    // The members' logs, for a look at what happened.
    let dir = PathBuf::from(format!("target/nemesis/seed-{}", args.seed));
    if std::fs::create_dir_all(&dir).is_ok() {
        for m in &members {
            let now = m.daemon.as_ref().map(Daemon::log).unwrap_or_default();
            let _ = std::fs::write(
                dir.join(format!("{}.log", m.name)),
                format!("{}{now}", m.logs),
            );
        }
        println!("members' logs: {}/", dir.display());
    }
    if !reused.is_empty() || revoked {
        std::process::exit(1);
    }
}
