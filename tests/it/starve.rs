//! Nothing a local user or a provider does starves the daemon (issue 19), with the real
//! binary: a local user with no access to any account floods the socket with
//! connections and keeps reconnecting, also under a low open-files limit (`prlimit
//! --nofile=256`), while root and an account's reader read and the token keeps
//! rotating (each refresh reads the secret file: a descriptor the flood must not
//! take); forty accounts on a provider that never answers do not hold back the first
//! token of an account on a healthy one; a config given by a relative path reloads, and
//! a fixed secret file ends a hold; a config that flaps between two scopes asks no
//! more often than `min_refresh_interval`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::fake_idp::{FakeIdp, Reply};
use crate::support::{account_status, socket_get, tokend, Daemon, Sandbox, LONG, SHORT};

/// The uid of the flooding stranger (nobody), and of an account's reader.
const STRANGER: u32 = 65534;
const READER: u32 = 65533;

/// The flood, as the stranger; killed when dropped.
struct Flood(Child);

/// Not a test: the flood itself, run (as the stranger) by [`Flood::start`] from this
/// test binary. It holds as many connections to the socket in `TOKEND_TEST_FLOOD` as it
/// can (up to 1,200), opens a new one whenever one is closed, and prints how many it
/// opened so far every 500; it runs until it is killed.
#[test]
#[ignore = "the flood helper, run by the flood tests as another user"]
fn flood_helper() {
    use std::io::{Read as _, Write as _};
    let Some(path) = std::env::var_os("TOKEND_TEST_FLOOD") else {
        return;
    };
    let mut live: Vec<std::os::unix::net::UnixStream> = Vec::new();
    let mut opened = 0u64;
    let mut out = std::io::stdout();
    loop {
        while live.len() < 1200 {
            match std::os::unix::net::UnixStream::connect(&path) {
                Ok(s) => {
                    s.set_nonblocking(true).expect("non-blocking");
                    live.push(s);
                    opened += 1;
                    if opened % 500 == 0 {
                        let _ = writeln!(out, "{opened}");
                        let _ = out.flush();
                    }
                }
                Err(_) => break,
            }
        }
        let mut buf = [0u8; 512];
        // Still open with nothing said: kept. Closed, or answered "busy" (then closed by
        // the server): a new one takes its place.
        live.retain_mut(
            |s| matches!(s.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Flood {
    fn start(sb: &Sandbox) -> Flood {
        let me = std::env::current_exe().expect("the test binary");
        let child = Command::new("setpriv")
            .args([
                format!("--reuid={STRANGER}"),
                format!("--regid={STRANGER}"),
                "--clear-groups".into(),
                "--".into(),
            ])
            .arg(me)
            .args([
                "--exact",
                "starve::flood_helper",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TOKEND_TEST_FLOOD", sb.path("tokend.sock"))
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("start the flood (setpriv, python3)");
        Flood(child)
    }

    /// Waits until the flood has opened `n` connections.
    fn wait_opened(&mut self, n: u64) {
        use std::io::BufRead as _;
        let out = self.0.stdout.as_mut().expect("piped");
        let mut lines = std::io::BufReader::new(out).lines();
        loop {
            let line = lines
                .next()
                .expect("the flood runs")
                .expect("the flood's output");
            if line.trim().parse::<u64>().is_ok_and(|m| m >= n) {
                return;
            }
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A config whose account `a` rotates every second, reading `secret` for each request,
/// readable over the socket (mode 0666) by [`READER`].
fn config(url: &str) -> String {
    let account = crate::support::config::account("a", url)
        .with("refresh_every = \"1s\"\nmin_refresh_interval = \"1s\"")
        .with(&format!("[account.access]\nusers = [\"{READER}\"]"))
        .output("out/a");
    crate::support::config::daemon(
        std::path::Path::new("tokend.sock"),
        "socket_mode = \"0666\"\nstate_dir = \"state\"",
    ) + &account.toml()
}

/// `tokend get a` as `uid`: its exit status and output.
fn get_as(uid: u32, socket: &Path) -> std::process::Output {
    Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
            "--".into(),
        ])
        .arg(env!("CARGO_BIN_EXE_tokend"))
        .args(["get", "a", "--socket"])
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .expect("setpriv runs")
}

fn a_flood_of_connections_starves_nobody(wrapper: &[&str]) {
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = Sandbox::new();
    // Other users reach the socket in it.
    std::fs::set_permissions(
        sb.path(""),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    sb.write(&sb.path("secret"), "client-secret\n", 0o600);
    let config = sb.config(&config(&idp.url()));
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(env!("CARGO_BIN_EXE_tokend"));
            c
        }
        None => tokend(),
    };
    cmd.arg("run").arg("-c").arg(&config).stdin(Stdio::null());
    let d = Daemon::spawn(cmd);
    let socket = sb.path("tokend.sock");
    d.wait_until("the first token", SHORT, || sb.read("out/a"));
    let mut flood = Flood::start(&sb);
    flood.wait_opened(3000);
    // Root and the account's reader read throughout; the token keeps rotating, each
    // refresh reading the secret file.
    let rotated_from = idp.issued().len();
    for i in 0..20 {
        let (status, body) = socket_get(&socket, "/v1/tokens/a/raw")
            .unwrap_or_else(|| panic!("root's read {i} got no answer\n{}", d.log()));
        assert_eq!(status, 200, "root's read {i}: {body}\n{}", d.log());
        assert!(idp.is_issued(&body));
        let reader = get_as(READER, &socket);
        assert!(
            reader.status.success(),
            "the reader's read {i}: {}\n{}",
            String::from_utf8_lossy(&reader.stderr),
            d.log()
        );
    }
    d.wait_until("three more tokens during the flood", LONG, || {
        (idp.issued().len() >= rotated_from + 3).then_some(())
    });
    let s = account_status(&socket, "a").expect("status");
    assert!(
        s["last_error"].is_null(),
        "no local failure (EMFILE) during the flood: {s}"
    );
    // The stranger itself is refused what it may not read, as before.
    let stranger = get_as(STRANGER, &socket);
    assert!(!stranger.status.success());
}

#[test]
fn a_stranger_flooding_the_socket_starves_neither_root_nor_readers_nor_refreshes() {
    a_flood_of_connections_starves_nobody(&[]);
}

#[test]
fn the_flood_starves_nobody_under_a_low_open_files_limit() {
    a_flood_of_connections_starves_nobody(&["prlimit", "--nofile=256:256", "--"]);
}

#[test]
fn a_provider_that_never_answers_holds_back_no_other_providers_first_token() {
    let dead = FakeIdp::start(Reply::Hang);
    let healthy = FakeIdp::start(Reply::token(3600));
    let sb = Sandbox::new();
    sb.write(&sb.path("secret"), "client-secret\n", 0o600);
    let mut text = "[daemon]\nsocket = \"tokend.sock\"\n".to_owned();
    // The healthy account last: without fairness it waits behind every dead request.
    for i in 0..40 {
        text += &format!(
            "[[account]]\nname = \"dead{i}\"\ntoken_url = \"{}\"\nclient_id = \"id{i}\"\n\
             client_secret = {{ file = \"secret\" }}\ntimeout = \"60s\"\n\
             [[account.output]]\npath = \"out/dead{i}\"\n",
            dead.url()
        );
    }
    text += &format!(
        "[[account]]\nname = \"healthy\"\ntoken_url = \"{}\"\nclient_id = \"id\"\n\
         client_secret = {{ file = \"secret\" }}\n[[account.output]]\npath = \"out/healthy\"\n",
        healthy.url()
    );
    let d = Daemon::start(&sb.config(&text));
    // The dead provider holds its share of the 16 slots: its requests hang 60 s.
    d.wait_until("the dead provider's requests", SHORT, || {
        (dead.requests().len() >= 8).then_some(())
    });
    // Far less than the 60 s a dead request holds its slot (within a second when idle).
    let token = d.wait_until("the healthy account's token", SHORT, || {
        sb.read("out/healthy")
    });
    assert!(healthy.is_issued(&token));
    assert!(
        dead.requests().len() < 16,
        "the dead provider held at most its share: {}",
        dead.requests().len()
    );
}

#[test]
fn a_relative_config_path_reloads_and_a_fixed_secret_file_ends_a_hold() {
    let idp = FakeIdp::start(Reply::InvalidClient);
    let sb = Sandbox::new();
    sb.write(&sb.path("secret"), "wrong\n", 0o600);
    let text = |extra: &str| {
        format!(
            "[daemon]\nsocket = \"tokend.sock\"\n\
             [[account]]\nname = \"a\"\ntoken_url = \"{}\"\nclient_id = \"id\"\n\
             client_secret = {{ file = \"secret\" }}\n{extra}\n[[account.output]]\npath = \"out/a\"\n",
            idp.url()
        )
    };
    sb.config(&text(""));
    // As people type it: a path relative to the working directory.
    let mut cmd = tokend();
    cmd.current_dir(sb.path(""))
        .args(["run", "-c", "config.toml"]);
    let d = Daemon::spawn(cmd);
    let socket = sb.path("tokend.sock");
    d.wait_until("the account held after the refusal", SHORT, || {
        account_status(&socket, "a").filter(|s| s["last_error"].as_str().is_some())
    });
    assert_eq!(idp.requests().len(), 1);
    // Fixed in place: the hold ends, the provider is asked with the new secret.
    idp.set_default(Reply::token(3600));
    std::fs::write(sb.path("secret"), "right\n").unwrap();
    let token = d.wait_until("a token after the fix", SHORT, || sb.read("out/a"));
    assert!(idp.is_issued(&token));
    assert_eq!(idp.requests()[1].basic().as_deref(), Some("id:right"));
    // Edited by an editor's rename: a second account appears.
    let tmp = sb.path(".config.swp");
    sb.write(
        &tmp,
        &(text("") + "[[account]]\nname = \"b\"\ntoken_url = \"" + &idp.url()
            + "\"\nclient_id = \"id\"\nclient_secret = { file = \"secret\" }\n[[account.output]]\npath = \"out/b\"\n"),
        0o600,
    );
    std::fs::rename(&tmp, sb.path("config.toml")).unwrap();
    d.wait_until("the reloaded account b", SHORT, || sb.read("out/b"));
    // Edited in place.
    std::fs::write(sb.path("config.toml"), text("scope = \"other\"")).unwrap();
    d.wait_until("account b removed by the in-place edit", SHORT, || {
        (!sb.path("out/b").exists()).then_some(())
    });
}

#[test]
fn a_config_flapping_between_two_scopes_asks_no_more_often_than_min_refresh_interval() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sb = Sandbox::new();
    sb.write(&sb.path("secret"), "client-secret\n", 0o600);
    let text = |scope: &str| {
        format!(
            "[daemon]\nsocket = \"tokend.sock\"\nstate_dir = \"state\"\n\
             [[account]]\nname = \"a\"\ntoken_url = \"{}\"\nclient_id = \"id\"\n\
             client_secret = {{ file = \"secret\" }}\nscope = \"{scope}\"\nmin_refresh_interval = \"30s\"\n\
             [[account.output]]\npath = \"out/a\"\n",
            idp.url()
        )
    };
    let d = Daemon::start(&sb.config(&text("x")));
    let socket = sb.path("tokend.sock");
    d.wait_until("the first token", SHORT, || sb.read("out/a"));
    let reloads = || -> u64 {
        socket_get(&socket, "/metrics")
            .and_then(|(_, m)| {
                m.lines()
                    .find(|l| l.starts_with("tokend_config_reloads_total{result=\"success\"}"))
                    .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            })
            .unwrap_or(0.0) as u64
    };
    // Each change as an editor makes it (a rename): the watcher reloads once per change.
    let change = |scope: &str| {
        let before = reloads();
        let tmp = sb.path(".config.swp");
        sb.write(&tmp, &text(scope), 0o600);
        std::fs::rename(&tmp, sb.path("config.toml")).unwrap();
        d.wait_until(&format!("the reload to scope {scope}"), SHORT, || {
            (reloads() > before).then_some(())
        });
    };
    // The first change asks at once.
    change("y");
    d.wait_until("the token for scope y", SHORT, || {
        sb.read("out/a").filter(|t| idp.issued().get(1) == Some(t))
    });
    // Flapping back and forth within the interval asks nothing more.
    for (i, scope) in ["x", "y", "x", "y"].into_iter().enumerate() {
        change(scope);
        // Restarted (a changed request starts with no state), and planning to wait.
        let next = d.wait_until("the account restarted, with its plan", SHORT, || {
            let s = account_status(&socket, "a")?;
            let at = time::OffsetDateTime::parse(
                s["next_refresh"].as_str()?,
                &time::format_description::well_known::Rfc3339,
            )
            .ok()?;
            Some(std::time::SystemTime::from(at))
        });
        let wait = next
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        assert!(
            wait > Duration::from_secs(10),
            "flap {i} to {scope}: the next request is planned in {wait:?}, not after min_refresh_interval\n{}",
            d.log()
        );
    }
    assert_eq!(idp.requests().len(), 2, "flapping asked again");
}
