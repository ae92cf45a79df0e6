//! The credential helpers (SPEC §5, issue 24) with the real tools: kubectl against a real
//! kube-apiserver whose JWT authenticator trusts oidc-provider's signed access tokens;
//! `git clone` and `git push` against `git http-backend` behind a server that takes only
//! the account's current token; podman pushing to and pulling from Debian's
//! docker-registry, whose token endpoint does the same. Then each helper's failure paths
//! (daemon not running, account unknown, no URL match, token expired with the provider
//! down), the protocols fed by hand where the machine's tool lacks a feature (git's
//! Bearer `authtype` before git 2.46), and the kubectl plugin's cost: one socket round
//! trip.
//!
//! The daemon runs as its own process on a socket anyone may connect to (a test switches
//! to nobody with `setpriv` for a reader outside an account's `access`: needs root, as CI
//! runs). The tools run with configs of the test's own, never the user's.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::config;
use crate::support::fake_idp::{FakeIdp, Reply};
use crate::support::git_http::{git, GitServer};
use crate::support::kube::{KubeApiServer, Options};
use crate::support::oidc::OidcProvider;
use crate::support::pki::Pki;
use crate::support::registry::{self, Podman, Registry};
use crate::support::{
    account_status, finish, socket_get, tokend, Daemon, Finished, Sandbox, LONG, SHORT,
};

const SECRET_ENV: &str = "TOKEND_T_SECRET";
/// `setpriv` arguments that run a program as nobody, without groups.
const NOBODY: [&str; 4] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

// ---------------------------------------------------------------------------------
// A daemon on a socket anyone may connect to.
// ---------------------------------------------------------------------------------

/// One `[[account]]` against `token_url`: client id `NAME-client`, the secret from the
/// environment, refreshes allowed a second apart; `extra` goes last.
fn account(name: &str, token_url: &str, extra: &str) -> String {
    config::account(name, token_url)
        .client_id(&format!("{name}-client"))
        .secret_env(SECRET_ENV)
        .with("min_refresh_interval = \"1s\"")
        .with(extra)
        .toml()
}

/// `tokend run` serving `accounts`; killed when dropped.
struct Running {
    daemon: Daemon,
    socket: PathBuf,
    sb: Sandbox,
}

impl Running {
    fn start(accounts: &str) -> Running {
        let sb = Sandbox::new();
        // nobody must reach the socket inside.
        std::fs::set_permissions(sb.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = sb.path("tokend.sock");
        let config = sb.config(&format!(
            "{}{accounts}",
            config::daemon(&socket, "socket_mode = \"0666\"\nlog_format = \"text\"")
        ));
        let daemon = Daemon::start_with_env(&config, &[(SECRET_ENV, "s3cret")]);
        daemon.wait_until("the daemon to answer on its socket", LONG, || {
            socket_get(&socket, "/v1/health")
        });
        Running { daemon, socket, sb }
    }

    fn sock(&self) -> &str {
        self.socket.to_str().expect("a UTF-8 path")
    }

    /// The account's current token, once it has one.
    fn token(&self, account: &str) -> String {
        self.daemon
            .wait_until(&format!("{account}'s token"), LONG, || {
                socket_get(&self.socket, &format!("/v1/tokens/{account}/raw"))
                    .filter(|(status, _)| *status == 200)
                    .map(|(_, body)| body)
            })
    }

    /// Waits until the account serves a token other than `old`; returns it.
    fn token_after(&self, account: &str, old: &str) -> String {
        self.daemon
            .wait_until(&format!("a new token for {account}"), LONG, || {
                socket_get(&self.socket, &format!("/v1/tokens/{account}/raw"))
                    .filter(|(status, body)| *status == 200 && body != old)
                    .map(|(_, body)| body)
            })
    }

    /// The number of requests the socket answered so far (`/metrics`, as root), with
    /// status `code` or any.
    fn answered(&self, code: Option<&str>) -> u64 {
        let (_, text) = socket_get(&self.socket, "/metrics").expect("/metrics answers");
        let prefix = match code {
            Some(c) => format!("tokend_http_requests_total{{listener=\"unix\",code=\"{c}\"}}"),
            None => "tokend_http_requests_total{listener=\"unix\"".to_owned(),
        };
        text.lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

/// `tokend ARGS` (through `wrapper`, e.g. [`NOBODY`]), `input` on stdin, bounded.
fn helper(wrapper: &[&str], args: &[&str], input: &str, env: &[(&str, &str)]) -> Finished {
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(env!("CARGO_BIN_EXE_tokend"));
            c
        }
        None => tokend(),
    };
    cmd.args(args)
        .env_remove("TOKEND_SOCKET")
        .env_remove("TOKEND_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    // `finish` spawns; the input goes through a file it can read on its own.
    let file = tempfile::NamedTempFile::new().expect("a file for the input");
    std::fs::write(file.path(), input).expect("write the input");
    std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    cmd.stdin(std::fs::File::open(file.path()).expect("open the input"));
    finish(cmd, SHORT)
}

/// What git writes to a helper for `url`, with `credential.useHttpPath`.
fn git_request(url: &str, authtype: bool) -> String {
    let u = url::Url::parse(url).unwrap();
    let host = match u.port() {
        Some(p) => format!("{}:{p}", u.host_str().unwrap()),
        None => u.host_str().unwrap().to_owned(),
    };
    let cap = if authtype {
        "capability[]=authtype\n"
    } else {
        ""
    };
    format!(
        "{cap}protocol={}\nhost={host}\npath={}\n\n",
        u.scheme(),
        u.path().trim_start_matches('/')
    )
}

/// The claims of a JWT (unverified: the API server verified it).
fn jwt_claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

fn assert_one_line(stderr: &str, want: &str) {
    assert!(
        stderr.contains(want) && stderr.trim_end().lines().count() == 1,
        "one line holding {want:?} on stderr, got {stderr:?}"
    );
}

// ---------------------------------------------------------------------------------
// kubectl
// ---------------------------------------------------------------------------------

const AUDIENCE: &str = "https://kubernetes.tokend.test";

/// kube-apiserver's structured authentication config: a JWT issuer (the https
/// oidc-provider, trusted through `ca`), usernames `tokend:<sub>`, and the token's `jti`
/// as an extra attribute, so the audit log tells which token each request carried.
fn authentication_config(issuer: &str, ca: &Path) -> String {
    let ca = std::fs::read_to_string(ca).expect("read the CA");
    let ca: String = ca.lines().map(|l| format!("        {l}\n")).collect();
    format!(
        r#"apiVersion: apiserver.config.k8s.io/v1
kind: AuthenticationConfiguration
jwt:
  - issuer:
      url: {issuer}
      audiences: ["{AUDIENCE}"]
      certificateAuthority: |
{ca}    claimMappings:
      username:
        claim: sub
        prefix: "tokend:"
      extra:
        - key: tokend.test/jti
          valueExpression: claims.jti
"#
    )
}

/// A kubeconfig whose users run `tokend credential kubectl kube`: `tokend` (v1),
/// `tokend-beta` (v1beta1) and `stranger` (as nobody, outside the account's access).
fn exec_kubeconfig(server: &KubeApiServer, socket: &str) -> String {
    let tokend = env!("CARGO_BIN_EXE_tokend");
    let user = |name: &str, version: &str, command: &str, pre: &[&str]| {
        let args: Vec<String> = pre
            .iter()
            .map(|s| s.to_string())
            .chain(
                ["credential", "kubectl", "kube", "--socket", socket]
                    .iter()
                    .map(|s| s.to_string()),
            )
            .collect();
        format!(
            "- name: {name}\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/{version}\n      \
             command: {command}\n      args: {}\n      interactiveMode: Never\n",
            serde_json::to_string(&args).unwrap()
        )
    };
    let mut stranger_pre: Vec<&str> = NOBODY[1..].to_vec();
    stranger_pre.push(tokend);
    let users = [
        user("tokend", "v1", tokend, &[]),
        user("tokend-beta", "v1beta1", tokend, &[]),
        user("stranger", "v1", NOBODY[0], &stranger_pre),
    ]
    .concat();
    let contexts: String = ["tokend", "tokend-beta", "stranger"]
        .iter()
        .map(|u| format!("- name: {u}\n  context:\n    cluster: t\n    user: {u}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: {}\n    \
         certificate-authority: {}\nusers:\n{users}contexts:\n{contexts}current-context: tokend\n",
        server.server(),
        server.ca_cert().display()
    )
}

/// The `jti`s of the audit log's completed `/api` requests by `tokend:kube-client`
/// (kubectl adds `?timeout=`).
fn audited_jtis(server: &KubeApiServer) -> Vec<String> {
    let log = std::fs::read_to_string(server.dir().join("audit.log")).unwrap_or_default();
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| {
            e["stage"] == "ResponseComplete"
                && e["requestURI"]
                    .as_str()
                    .is_some_and(|u| u.split('?').next() == Some("/api"))
                && e["user"]["username"] == "tokend:kube-client"
        })
        .filter_map(|e| {
            e["user"]["extra"]["tokend.test/jti"][0]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

// Named `kube...`: scripts/test runs it with the Kubernetes tests, once the API server is
// built.
#[test]
fn kubectl_authenticates_with_the_exec_plugin_and_the_next_call_takes_the_rotated_token() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let idp = OidcProvider::start(json!({
        "ttl": 600,
        "clients": [{
            "client_id": "kube-client", "client_secret": "s3cret",
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["client_credentials"], "redirect_uris": [], "response_types": [],
        }],
        "https": {"key": pki.path("server.key"), "cert": pki.path("server.crt")},
        "resource": AUDIENCE,
    }));
    let authn = dir.path().join("authentication.yaml");
    std::fs::write(
        &authn,
        authentication_config(&idp.issuer(), &pki.path("ca.crt")),
    )
    .unwrap();
    let Some(server) = KubeApiServer::start(&Options {
        authentication_config: Some(authn),
        audit: true,
        ..Options::default()
    }) else {
        return;
    };
    let d = Running::start(&account(
        "kube",
        &format!("{}/token", idp.issuer()),
        &format!(
            "ca_file = \"{}\"\nextra_params = {{ resource = \"{AUDIENCE}\" }}\n",
            pki.path("ca.crt").display()
        ),
    ));
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, exec_kubeconfig(&server, d.sock())).unwrap();
    let first = d.token("kube");
    let jti1 = jwt_claims(&first)["jti"].as_str().unwrap().to_owned();

    // The JWT authenticator reads the issuer's discovery document and keys after the
    // server is ready: the first call waits for that, bounded.
    let ok = d
        .daemon
        .wait_until("kubectl get --raw /api to succeed", LONG, || {
            let out = server.kubectl(
                &kubeconfig,
                &["--context", "tokend", "get", "--raw", "/api"],
            );
            out.success().then_some(out)
        });
    assert!(
        ok.stdout.contains("\"kind\":\"APIVersions\""),
        "{}",
        ok.stdout
    );
    d.daemon
        .wait_until("the audit log to show the first token", LONG, || {
            audited_jtis(&server).contains(&jti1).then_some(())
        });

    // A rotation: the next kubectl command (another API version) carries the new token.
    let out = helper(&[], &["refresh", "kube", "--socket", d.sock()], "", &[]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let second = d.token_after("kube", &first);
    let jti2 = jwt_claims(&second)["jti"].as_str().unwrap().to_owned();
    let out = server.kubectl(
        &kubeconfig,
        &["--context", "tokend-beta", "get", "--raw", "/api"],
    );
    assert!(
        out.success(),
        "kubectl with the rotated token: {}",
        out.stderr
    );
    let jtis = d
        .daemon
        .wait_until("the audit log to show the rotated token", LONG, || {
            let j = audited_jtis(&server);
            j.contains(&jti2).then_some(j)
        });
    assert_eq!(
        jtis.last(),
        Some(&jti2),
        "the last call carried the new token: {jtis:?}"
    );

    // A reader outside the account's access: a clear error, and kubectl fails.
    let out = server.kubectl(
        &kubeconfig,
        &["--context", "stranger", "get", "--raw", "/api"],
    );
    assert!(
        !out.success(),
        "kubectl as nobody succeeded: {}",
        out.stdout
    );
    assert!(
        out.stderr
            .contains("no account \"kube\" that you (uid 65534) may read"),
        "{}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------------
// git
// ---------------------------------------------------------------------------------

/// git 2.46 and later offer `capability[]=authtype` and send a helper's Bearer credential.
fn git_has_authtype() -> bool {
    let v = git(Path::new("."), &["--version"]);
    let mut nums = v
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (nums.next().unwrap_or(0), nums.next().unwrap_or(0)) >= (2, 46)
}

/// `git ARGS` in `dir` with tokend as the only credential helper (as the book's recipe
/// sets it) and no prompt; whatever its outcome.
fn git_with_tokend(dir: &Path, socket: &str, args: &[&str]) -> Finished {
    let helper = format!(
        "{} credential git --socket {socket}",
        env!("CARGO_BIN_EXE_tokend")
    );
    let mut cmd = Command::new("git");
    cmd.args(["-c", "credential.helper=", "-c"])
        .arg(format!("credential.helper={helper}"))
        .args(["-c", "credential.useHttpPath=true"])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "tokend test")
        .env("GIT_AUTHOR_EMAIL", "test@tokend.invalid")
        .env("GIT_COMMITTER_NAME", "tokend test")
        .env("GIT_COMMITTER_EMAIL", "test@tokend.invalid")
        .env_remove("GIT_ASKPASS")
        .env_remove("SSH_ASKPASS")
        .stdin(Stdio::null());
    finish(cmd, LONG)
}

/// A git server that takes only the current token of `idp` (and none in `refused`), a
/// daemon with account `team` for its `/repos/team/` and `host` (another provider) for
/// the whole host, and `team/app.git`.
struct GitSetup {
    d: Running,
    server: GitServer,
    team_idp: Arc<FakeIdp>,
    refused: Arc<Mutex<HashSet<String>>>,
    _host_idp: FakeIdp,
}

impl GitSetup {
    fn start() -> GitSetup {
        let team_idp = Arc::new(FakeIdp::start(Reply::token(3600)));
        team_idp.name_tokens("team");
        let host_idp = FakeIdp::start(Reply::token(3600));
        host_idp.name_tokens("host");
        let refused: Arc<Mutex<HashSet<String>>> = Arc::default();
        let server = GitServer::start({
            let (idp, refused) = (team_idp.clone(), refused.clone());
            move |t| {
                idp.issued().last().is_some_and(|c| c == t) && !refused.lock().unwrap().contains(t)
            }
        });
        server.create_repo("team/app.git");
        let root = server.base().replace("/repos/", "/");
        let d = Running::start(&format!(
            "{}{}",
            account(
                "team",
                &team_idp.url(),
                &format!(
                    "urls = [\"{}team/\"]\ncredential_username = \"tokend-bot\"",
                    server.base()
                ),
            ),
            account("host", &host_idp.url(), &format!("urls = [\"{root}\"]")),
        ));
        GitSetup {
            d,
            server,
            team_idp,
            refused,
            _host_idp: host_idp,
        }
    }

    /// Clones `team/app.git` into `dir/app`.
    fn clone(&self, dir: &Path) {
        let out = git_with_tokend(
            dir,
            self.d.sock(),
            &["clone", "-q", &self.server.url("team/app.git"), "app"],
        );
        assert_eq!(out.code(), Some(0), "git clone: {}", out.stderr);
    }

    /// Commits in `dir/app` and pushes.
    fn push(&self, dir: &Path, message: &str) -> Finished {
        let app = dir.join("app");
        git(
            &app,
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@x",
                "commit",
                "-q",
                "--allow-empty",
                "-m",
                message,
            ],
        );
        git_with_tokend(&app, self.d.sock(), &["push", "-q", "origin", "main"])
    }
}

#[test]
fn git_clones_and_pushes_over_http_with_the_token_from_tokend() {
    let s = GitSetup::start();
    let token = s.d.token("team");
    let dir = tempfile::tempdir().unwrap();
    s.clone(dir.path());
    let out = s.push(dir.path(), "first push");
    assert_eq!(out.code(), Some(0), "git push: {}", out.stderr);

    // The longest prefix won (not the host's account), in the form this git takes.
    let scheme = if git_has_authtype() {
        "bearer"
    } else {
        "basic"
    };
    let seen = s.server.seen();
    let pushed = seen
        .iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/git-receive-pack") && r.status == 200)
        .unwrap_or_else(|| panic!("no accepted push among {seen:?}"));
    assert_eq!(
        (pushed.scheme, pushed.token.as_deref()),
        (Some(scheme), Some(token.as_str()))
    );
    if scheme == "basic" {
        assert_eq!(pushed.user.as_deref(), Some("tokend-bot"));
    } else {
        println!("NOTE: git offers authtype: the push carried a Bearer token");
    }
    let log = git(
        &dir.path().join("app"),
        &["log", "--format=%s", "origin/main"],
    );
    assert_eq!(log, "first push\nseed\n");
}

#[test]
fn git_erase_after_a_refused_token_brings_one_refresh_and_the_retry_succeeds() {
    let s = GitSetup::start();
    let first = s.d.token("team");
    let dir = tempfile::tempdir().unwrap();
    s.clone(dir.path());
    let asked = s.team_idp.requests().len();

    // The server stops taking the token: git says so to the helper (erase).
    s.refused.lock().unwrap().insert(first.clone());
    let out = s.push(dir.path(), "refused");
    assert_ne!(
        out.code(),
        Some(0),
        "the push with a refused token succeeded"
    );
    let second = s.d.token_after("team", &first);
    assert_eq!(
        s.team_idp.requests().len(),
        asked + 1,
        "erase brought exactly one token request"
    );

    let out = git_with_tokend(
        &dir.path().join("app"),
        s.d.sock(),
        &["push", "-q", "origin", "main"],
    );
    assert_eq!(out.code(), Some(0), "the retried push: {}", out.stderr);
    let seen = s.server.seen();
    let last = seen.last().expect("requests");
    assert_eq!(
        (last.status, last.token.as_deref()),
        (200, Some(second.as_str()))
    );
    assert_eq!(s.team_idp.requests().len(), asked + 1);

    // An erase of a credential that is not the account's token (another helper's) asks
    // for no refresh: no 202 from the socket.
    let url = s.server.url("team/app.git");
    let other = format!(
        "{}\nusername=someone\npassword=another-helpers-secret\n\n",
        git_request(&url, false).trim_end()
    );
    let refreshes = s.d.answered(Some("202"));
    let out = helper(
        &[],
        &["credential", "git", "--socket", s.d.sock(), "erase"],
        &other,
        &[],
    );
    assert_eq!(
        (out.code(), out.stdout.as_str()),
        (Some(0), ""),
        "{}",
        out.stderr
    );
    assert_eq!(s.d.answered(Some("202")), refreshes);
}

#[test]
fn the_git_helper_answers_bearer_when_git_offers_authtype_and_basic_otherwise() {
    let s = GitSetup::start();
    let token = s.d.token("team");
    let expires = account_status(&s.d.socket, "team").unwrap()["expires_at"]
        .as_str()
        .unwrap()
        .to_owned();
    let expiry_utc =
        time::OffsetDateTime::parse(&expires, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp();
    let url = s.server.url("team/app.git");
    let args = ["credential", "git", "--socket", s.d.sock(), "get"];

    let out = helper(&[], &args, &git_request(&url, true), &[]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout,
        format!(
            "capability[]=authtype\nauthtype=Bearer\ncredential={token}\nephemeral=true\n\
             password_expiry_utc={expiry_utc}\n"
        )
    );
    let out = helper(&[], &args, &git_request(&url, false), &[]);
    assert_eq!(
        out.stdout,
        format!("username=tokend-bot\npassword={token}\npassword_expiry_utc={expiry_utc}\n")
    );
    // The host's own account for anything else on it.
    let out = helper(
        &[],
        &args,
        &git_request(&s.server.url("other.git"), false),
        &[],
    );
    assert!(
        out.stdout.starts_with("username=oauth2\npassword=host-"),
        "{}",
        out.stdout
    );
    // store keeps nothing; an action git may add one day is ignored.
    for action in ["store", "frobnicate"] {
        let input = format!(
            "{}\nusername=tokend-bot\npassword={token}\n\n",
            git_request(&url, false).trim_end()
        );
        let out = helper(
            &[],
            &["credential", "git", "--socket", s.d.sock(), action],
            &input,
            &[],
        );
        assert_eq!(
            (out.code(), out.stdout.as_str(), out.stderr.as_str()),
            (Some(0), "", "")
        );
    }
}

// ---------------------------------------------------------------------------------
// Container tools
// ---------------------------------------------------------------------------------

#[test]
fn podman_pushes_and_pulls_with_credentials_from_docker_credential_tokend() {
    if !registry::prerequisites() {
        return;
    }
    let idp = Arc::new(FakeIdp::start(Reply::token(3600)));
    idp.name_tokens("registry");
    let registry = Registry::start({
        let idp = idp.clone();
        move |t| idp.issued().last().is_some_and(|c| c == t)
    });
    let host = registry.host();
    let d = Running::start(&account(
        "registry",
        &idp.url(),
        &format!("urls = [\"http://{host}/\"]\ncredential_username = \"registry-bot\""),
    ));
    let token = d.token("registry");
    let podman = Podman::new(&host, &d.socket);

    let out = podman.run(&["login", "--get-login", &host]);
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).as_ref()
        ),
        (Some(0), "registry-bot\n"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = format!("{host}/tokend/hello:1");
    podman.import(&image);
    for args in [
        vec!["push", "--tls-verify=false", &image],
        vec!["rmi", &image],
        vec!["pull", "--tls-verify=false", &image],
    ] {
        let out = podman.run(&args);
        assert!(
            out.status.success(),
            "podman {args:?}:\n{}\n--- registry ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            registry.log()
        );
    }
    let asked = registry.token_requests();
    assert!(asked.len() >= 2, "{asked:?}");
    for r in &asked {
        assert!(r.granted, "{r:?}");
        assert_eq!(
            (r.user.as_deref(), r.token.as_deref()),
            (Some("registry-bot"), Some(token.as_str()))
        );
    }
    assert!(asked.iter().any(|r| r.scope.contains("push")), "{asked:?}");
}

#[test]
fn the_docker_helper_lists_gets_and_refreshes_on_erase() {
    let idp = FakeIdp::start(Reply::token(3600));
    idp.name_tokens("reg");
    let d = Running::start(&format!(
        "{}{}",
        account(
            "reg",
            &idp.url(),
            "urls = [\"https://registry.example.org\", \"https://index.docker.io/v1/\"]"
        ),
        account(
            "private",
            &idp.url(),
            "urls = [\"https://private.example.org/\"]\n[account.access]\nusers = [\"root\"]"
        ),
    ));
    let token = d.token("reg");
    let sock = d.sock();
    let docker = |wrapper: &[&str], action: &str, input: &str| {
        helper(
            wrapper,
            &["credential", "docker", action],
            input,
            &[("TOKEND_SOCKET", sock)],
        )
    };

    let out = docker(&[], "get", "registry.example.org\n");
    assert_eq!(out.code(), Some(0), "{}", out.stdout);
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap(),
        json!({"ServerURL": "registry.example.org", "Username": "oauth2", "Secret": token})
    );
    let out = docker(&[], "get", "https://index.docker.io/v1/");
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap()["Secret"],
        token.as_str()
    );

    // list: the URLs the caller may read, each with its user name.
    let out = docker(&[], "list", "");
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap(),
        json!({
            "https://index.docker.io/v1/": "oauth2",
            "https://private.example.org/": "oauth2",
            "https://registry.example.org/": "oauth2",
        })
    );
    let out = docker(&NOBODY, "list", "");
    assert_eq!(
        serde_json::from_str::<Value>(&out.stdout).unwrap(),
        json!({}),
        "{}",
        out.stderr
    );

    // store is accepted and keeps nothing; erase (docker logout) asks for a refresh.
    let input =
        json!({"ServerURL": "registry.example.org", "Username": "u", "Secret": "s"}).to_string();
    let out = docker(&[], "store", &input);
    assert_eq!((out.code(), out.stdout.as_str()), (Some(0), ""));
    let asked = idp.requests().len();
    let out = docker(&[], "erase", "registry.example.org\n");
    assert_eq!(
        (out.code(), out.stdout.as_str()),
        (Some(0), ""),
        "{}",
        out.stderr
    );
    d.token_after("reg", &token);
    assert!(idp.requests().len() > asked);

    // Called by its own name, as the container tools do.
    let link = d.sb.path("docker-credential-tokend");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_tokend"), &link).unwrap();
    let mut cmd = Command::new(&link);
    cmd.arg("list")
        .env("TOKEND_SOCKET", sock)
        .stdin(Stdio::null());
    let out = finish(cmd, SHORT);
    assert_eq!(out.code(), Some(0), "{}", out.stdout);
    assert!(
        out.stdout.contains("https://registry.example.org/"),
        "{}",
        out.stdout
    );
}

// ---------------------------------------------------------------------------------
// Failure paths, each helper
// ---------------------------------------------------------------------------------

#[test]
fn each_helper_fails_the_way_its_tool_expects() {
    let live_idp = FakeIdp::start(Reply::token(3600));
    let dying_idp = FakeIdp::start(Reply::token(3));
    let d = Running::start(&format!(
        "{}{}",
        account(
            "live",
            &live_idp.url(),
            "urls = [\"https://live.example/\"]"
        ),
        account(
            "dying",
            &dying_idp.url(),
            "urls = [\"https://dying.example/\"]"
        ),
    ));
    d.token("live");
    d.token("dying");
    let sock = d.sock().to_owned();
    let kubectl = |wrapper: &[&str], socket: &str, account: &str| {
        helper(
            wrapper,
            &["credential", "kubectl", account, "--socket", socket],
            "",
            &[],
        )
    };
    let git_get = |wrapper: &[&str], socket: &str, url: &str| {
        helper(
            wrapper,
            &["credential", "git", "--socket", socket, "get"],
            &git_request(url, true),
            &[],
        )
    };
    let docker_get = |wrapper: &[&str], socket: &str, registry: &str| {
        helper(
            wrapper,
            &["credential", "docker", "get"],
            registry,
            &[("TOKEND_SOCKET", socket)],
        )
    };

    // The daemon not running.
    let gone = d.sb.path("gone.sock");
    let gone = gone.to_str().unwrap();
    let out = kubectl(&[], gone, "live");
    assert_eq!((out.code(), out.stdout.as_str()), (Some(1), ""));
    assert_one_line(&out.stderr, "tokend is not running");
    let out = git_get(&[], gone, "https://live.example/x.git");
    assert_eq!((out.code(), out.stdout.as_str()), (Some(1), ""));
    assert_one_line(&out.stderr, "tokend is not running");
    let out = docker_get(&[], gone, "live.example");
    assert_eq!(out.code(), Some(1));
    assert_one_line(&out.stdout, "tokend is not running");
    assert_eq!(out.stderr, "");

    // An account that does not exist, or that the caller may not read.
    let out = kubectl(&[], &sock, "nope");
    assert_eq!((out.code(), out.stdout.as_str()), (Some(1), ""));
    assert_one_line(&out.stderr, "no account \"nope\" that you (uid 0) may read");
    let out = kubectl(&NOBODY, &sock, "live");
    assert_one_line(
        &out.stderr,
        "no account \"live\" that you (uid 65534) may read",
    );
    let out = git_get(&NOBODY, &sock, "https://live.example/x.git");
    assert_eq!(
        (out.code(), out.stdout.as_str(), out.stderr.as_str()),
        (Some(0), "", "")
    );
    let out = docker_get(&NOBODY, &sock, "live.example");
    assert_eq!(
        (out.code(), out.stdout.as_str()),
        (Some(1), "credentials not found in native keychain\n")
    );

    // No account for the URL: git asks its next helper, docker goes on without.
    for url in [
        "https://elsewhere.example/x.git",
        "http://live.example/x.git",
        "https://live.example:8443/",
    ] {
        let out = git_get(&[], &sock, url);
        assert_eq!(
            (out.code(), out.stdout.as_str(), out.stderr.as_str()),
            (Some(0), "", ""),
            "{url}"
        );
    }
    let out = docker_get(&[], &sock, "elsewhere.example");
    assert_eq!(
        (out.code(), out.stdout.as_str()),
        (Some(1), "credentials not found in native keychain\n")
    );

    // The token expired and the provider is down.
    let _closed = dying_idp.stop();
    d.daemon.wait_until("dying's token to expire", LONG, || {
        account_status(&d.socket, "dying").filter(|a| a["valid"] == false)
    });
    let out = kubectl(&[], &sock, "dying");
    assert_eq!((out.code(), out.stdout.as_str()), (Some(1), ""));
    assert_one_line(&out.stderr, "account \"dying\" has no valid token");
    let out = git_get(&[], &sock, "https://dying.example/x.git");
    assert_eq!((out.code(), out.stdout.as_str()), (Some(1), ""));
    assert_one_line(&out.stderr, "account \"dying\" has no valid token");
    let out = docker_get(&[], &sock, "dying.example");
    assert_eq!(out.code(), Some(1));
    assert_one_line(&out.stdout, "account \"dying\" has no valid token");
}

// ---------------------------------------------------------------------------------
// Cost
// ---------------------------------------------------------------------------------

#[test]
fn the_kubectl_plugin_is_one_socket_round_trip_and_fast() {
    let idp = FakeIdp::start(Reply::token(3600));
    let d = Running::start(&account("kube", &idp.url(), ""));
    d.token("kube");
    let args = ["credential", "kubectl", "kube", "--socket", d.sock()];
    let before = d.answered(None);
    let out = helper(&[], &args, "", &[]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(
        d.answered(None),
        before + 2,
        "one request of the plugin's, one /metrics"
    );
    let v: Value = serde_json::from_str(&out.stdout).expect("an ExecCredential");
    assert_eq!(v["status"]["token"], d.token("kube").as_str());

    // --min-valid: a token that lasts that long, or one line saying why there is none.
    let min = |m: &str| {
        let mut a = args.to_vec();
        a.extend(["--min-valid", m]);
        helper(&[], &a, "", &[])
    };
    let out = min("10m");
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let out = min("2h");
    assert_eq!((out.code(), out.stdout.as_str()), (Some(1), ""));
    assert_one_line(&out.stderr, "less than min_valid 2h");

    // A guard against a regression by an order of magnitude (BENCHMARKS.md has the
    // measure: a release build, hyperfine): debug build, whatever else runs beside.
    let mut times: Vec<Duration> = (0..30)
        .map(|_| {
            let mut cmd = tokend();
            cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
            let t = Instant::now();
            let status = cmd.status().expect("run tokend");
            assert!(status.success());
            t.elapsed()
        })
        .collect();
    times.sort();
    let median = times[times.len() / 2];
    assert!(
        median < Duration::from_millis(50),
        "median {median:?} of {times:?}"
    );
}
