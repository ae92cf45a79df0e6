//! Running under systemd: the notify protocol (READY only after the first tokens are
//! written, STATUS, RELOADING around SIGHUP, WATCHDOG) against a datagram socket standing
//! in for systemd's, and the journald field mapping against one standing in for the
//! journal's (in a private mount namespace, so it sits at the journal's fixed path).

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::support::fake_idp::{FakeIdp, Reply};
use crate::support::{Daemon, Sandbox, SHORT};

fn config(sb: &Sandbox, idp: &FakeIdp, extra_daemon: &str) -> std::path::PathBuf {
    sb.write(&sb.path("secret"), "s3cret-client\n", 0o600);
    sb.config(&format!(
        r#"
[daemon]
{extra_daemon}
[[account]]
name = "a"
token_url = "{url}"
client_id = "id"
client_secret = {{ file = "secret" }}
[[account.output]]
path = "out/a"
[[account]]
name = "b"
token_url = "{url}"
client_id = "id2"
client_secret = {{ file = "secret" }}
[[account.output]]
path = "out/b"
"#,
        url = idp.url()
    ))
}

/// Receives datagrams until `pred` holds for one, or `timeout`; returns them all.
fn recv_until(sock: &UnixDatagram, timeout: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out; received {got:#?}");
        sock.set_read_timeout(Some(left)).unwrap();
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no datagram ({e}); received {got:#?}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = pred(&msg);
        got.push(msg);
        if done {
            return got;
        }
    }
}

#[test]
fn ready_comes_after_the_first_tokens_then_status_reloading_and_watchdog() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = Sandbox::new();
    let cfg = config(&sb, &idp, "");
    let notify_path = sb.path("notify");
    let sock = UnixDatagram::bind(&notify_path).unwrap();
    let daemon = Daemon::start_with_env(
        &cfg,
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );

    let got = recv_until(&sock, SHORT, |m| m.contains("READY=1"));
    let ready = got.last().unwrap();
    // READY=1 is sent only once both accounts had their first try: both files exist.
    assert!(
        sb.read("out/a").is_some() && sb.read("out/b").is_some(),
        "READY before tokens: {got:?}"
    );
    assert!(ready.contains("STATUS=2 accounts: 2 fresh"), "{ready:?}");

    recv_until(&sock, SHORT, |m| m == "WATCHDOG=1");

    nix::sys::signal::kill(daemon.pid(), nix::sys::signal::Signal::SIGHUP).unwrap();
    let got = recv_until(&sock, SHORT, |m| m.starts_with("RELOADING=1"));
    let reloading = got.last().unwrap();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading:?}");
    recv_until(&sock, SHORT, |m| m.contains("READY=1"));

    let (status, _, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    recv_until(&sock, SHORT, |m| m == "STOPPING=1");
}

#[test]
fn ready_waits_for_a_slow_provider_until_startup_timeout() {
    let idp = FakeIdp::start(Reply::Hang);
    let sb = Sandbox::new();
    let cfg = config(&sb, &idp, "startup_timeout = \"1s\"");
    let notify_path = sb.path("notify");
    let sock = UnixDatagram::bind(&notify_path).unwrap();
    let started = Instant::now();
    let daemon = Daemon::start_with_env(&cfg, &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);
    let got = recv_until(&sock, SHORT, |m| m.contains("READY=1"));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "READY before startup_timeout: {got:?}"
    );
    assert!(got.last().unwrap().contains("2 refreshing"), "{got:?}");
    drop(daemon);
}

/// Parses one datagram of the journal's native protocol into its fields.
fn journal_fields(datagram: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .expect("fields end in a newline");
        let line = &rest[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            rest = &rest[nl + 1..];
        } else {
            // KEY\n<u64 LE length><value>\n, for values holding newlines.
            let len = u64::from_le_bytes(rest[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = &rest[nl + 9..nl + 9 + len];
            fields.push((
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            ));
            rest = &rest[nl + 9 + len + 1..];
        }
    }
    fields
}

#[test]
fn journald_gets_structured_fields_and_priorities() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (a private mount namespace); CI runs as root"
    );
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = Sandbox::new();
    let cfg = config(&sb, &idp, "log_format = \"journald\"");
    let journal_dir = sb.path("journal");
    std::fs::create_dir(&journal_dir).unwrap();
    let sock = UnixDatagram::bind(journal_dir.join("socket")).unwrap();

    // /run is replaced in the daemon's own mount namespace only.
    let script = format!(
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && mount --bind {} /run/systemd/journal && exec {} run -c {}",
        journal_dir.display(),
        env!("CARGO_BIN_EXE_tokend"),
        cfg.display()
    );
    let mut child = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("unshare runs");

    let mut entries: Vec<Vec<(String, String)>> = Vec::new();
    let deadline = Instant::now() + SHORT;
    let mut buf = vec![0u8; 64 * 1024];
    while entries
        .iter()
        .filter(|e| {
            e.iter()
                .any(|(k, v)| k == "MESSAGE" && v.contains("token refreshed"))
        })
        .count()
        < 2
    {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no two refresh entries; got {entries:#?}");
        sock.set_read_timeout(Some(left)).unwrap();
        let n = sock.recv(&mut buf).expect("a journal entry");
        entries.push(journal_fields(&buf[..n]));
    }
    let _ = child.kill();
    let _ = child.wait();

    let get = |e: &Vec<(String, String)>, k: &str| {
        e.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    };
    let refreshed = entries
        .iter()
        .find(|e| get(e, "MESSAGE").is_some_and(|m| m.contains("token refreshed")))
        .unwrap();
    assert_eq!(
        get(refreshed, "PRIORITY").as_deref(),
        Some("6"),
        "info is priority 6"
    );
    assert_eq!(
        get(refreshed, "SYSLOG_IDENTIFIER").as_deref(),
        Some("tokend")
    );
    assert!(
        matches!(get(refreshed, "ACCOUNT").as_deref(), Some("a" | "b")),
        "{refreshed:?}"
    );
    assert_eq!(get(refreshed, "STATUS").as_deref(), Some("fresh"));
    let expires: u64 = get(refreshed, "EXPIRES_IN").unwrap().parse().unwrap();
    assert!((3500..=3600).contains(&expires), "{expires}");
    for e in &entries {
        for (_, v) in e {
            assert!(
                !v.contains("s3cret-client"),
                "a secret reached the journal: {e:?}"
            );
        }
    }
}
