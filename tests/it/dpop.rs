//! DPoP (RFC 9449, SPEC §9, issue 23) against a real authorization server with DPoP on
//! (oidc-provider, with and without server nonces) and a resource server written with
//! jose that checks every proof in full (`tests/oidc-provider/resource.mjs`): the token
//! is bound to tokend's key (cnf.jkt), readers' proofs made through `tokend get --dpop`
//! and curl pass, a replayed proof and a URL outside `urls` are refused, a restart keeps
//! the bound token and the key (no request), and the key stays out of the log (trace),
//! the state file and the socket's other answers.
//!
//! The daemon runs as its own process; the tests wait on its socket, never on a clock.

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::config;
use crate::support::oidc::{OidcProvider, ResourceServer};
use crate::support::{finish, socket_get, tokend, Daemon, Sandbox, LONG, SHORT};

const SECRET_ENV: &str = "TOKEND_T_SECRET";
/// The audience of the JWT access tokens (RFC 8707 resource indicator).
const AUDIENCE: &str = "https://fhir.example/r4";

fn provider(nonce: bool) -> OidcProvider {
    OidcProvider::start(json!({
        "ttl": 600,
        "clients": [{
            "client_id": "fhir-client", "client_secret": "s3cret",
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["client_credentials"], "redirect_uris": [], "response_types": [],
        }, {
            "client_id": "chain-client", "client_secret": "s3cret",
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["refresh_token", "authorization_code"],
            "redirect_uris": ["https://client.example/cb"], "response_types": ["code"],
        }],
        "resource": AUDIENCE,
        "dpop": {"nonce": nonce},
    }))
}

/// A daemon (log level trace) with one DPoP account `fhir` against `idp`, proofs for
/// `urls`; its state in `state/`.
struct Running {
    daemon: Daemon,
    sb: Sandbox,
}

impl Running {
    fn config(sb: &Sandbox, idp: &OidcProvider, urls: &str) -> std::path::PathBuf {
        Self::config_with(sb, idp, urls, "fhir-client", "")
    }

    /// [`Running::config`] for client `client`, with more account keys.
    fn config_with(
        sb: &Sandbox,
        idp: &OidcProvider,
        urls: &str,
        client: &str,
        extra: &str,
    ) -> std::path::PathBuf {
        let account = config::account("fhir", &format!("{}/token", idp.issuer()))
            .client_id(client)
            .secret_env(SECRET_ENV)
            .with(&format!(
                "extra_params = {{ resource = \"{AUDIENCE}\" }}\ntoken_binding = \"dpop\"\nurls = [\"{urls}\"]\n{extra}"
            ))
            .toml();
        sb.config(&format!(
            "{}{account}",
            config::daemon(
                &sb.path("tokend.sock"),
                "state_dir = \"state\"\nlog_level = \"trace\"\nlog_format = \"text\"\nsocket_mode = \"0666\""
            )
        ))
    }

    fn start(sb: Sandbox, config: &Path) -> Running {
        let daemon = Daemon::start_with_env(config, &[(SECRET_ENV, "s3cret")]);
        let r = Running { daemon, sb };
        r.daemon.wait_until("the account's token", LONG, || {
            socket_get(&r.sb.path("tokend.sock"), "/v1/tokens/fhir/raw").filter(|(s, _)| *s == 200)
        });
        r
    }

    /// Started with [`Running::config_with`] for client `client` and proofs for the
    /// resource server's `/fhir/`; with its config's path.
    fn start_for(
        sb: Sandbox,
        idp: &OidcProvider,
        rs: &ResourceServer,
        client: &str,
        extra: &str,
    ) -> (Running, std::path::PathBuf) {
        let urls = format!("{}/fhir/", rs.base());
        let config = Self::config_with(&sb, idp, &urls, client, extra);
        (Running::start(sb, &config), config)
    }

    fn socket(&self) -> String {
        self.sb.path("tokend.sock").display().to_string()
    }

    fn token(&self) -> String {
        socket_get(&self.sb.path("tokend.sock"), "/v1/tokens/fhir/raw")
            .expect("the socket answers")
            .1
    }

    /// `tokend get fhir --dpop METHOD URL [--nonce N]`.
    fn get_dpop(&self, method: &str, url: &str, nonce: Option<&str>) -> crate::support::Finished {
        let mut cmd = tokend();
        cmd.args([
            "get",
            "fhir",
            "--socket",
            &self.socket(),
            "--dpop",
            method,
            url,
        ]);
        if let Some(n) = nonce {
            cmd.args(["--nonce", n]);
        }
        finish(cmd, SHORT)
    }
}

/// `curl -H @- URL` with `headers` on stdin: the status and the body.
fn curl(url: &str, headers: &str) -> (u16, Value) {
    let mut child = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-H", "@-", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run curl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(headers.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (
        code.parse().unwrap(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// The proof of `tokend get --dpop`'s output: its second line, `DPoP: <proof>`.
fn proof_line(stdout: &str) -> &str {
    stdout
        .lines()
        .nth(1)
        .and_then(|l| l.strip_prefix("DPoP: "))
        .unwrap_or_else(|| panic!("no DPoP line in {stdout:?}"))
}

fn jwt_part(jwt: &str, i: usize) -> Value {
    let part = jwt.split('.').nth(i).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

/// The RFC 7638 thumbprint of a public JWK (EC or RSA).
fn jkt(jwk: &Value) -> String {
    let canon = match jwk["kty"].as_str() {
        Some("EC") => format!(
            "{{\"crv\":{},\"kty\":\"EC\",\"x\":{},\"y\":{}}}",
            jwk["crv"], jwk["x"], jwk["y"]
        ),
        _ => format!("{{\"e\":{},\"kty\":\"RSA\",\"n\":{}}}", jwk["e"], jwk["n"]),
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, canon.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// The resource server's nonce: the `DPoP-Nonce` of its first refusal.
fn rs_nonce(rs: &ResourceServer) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            &format!("{}/fhir/metadata", rs.base()),
        ])
        .output()
        .unwrap();
    let head = String::from_utf8(out.stdout).unwrap();
    head.lines()
        .find_map(|l| {
            l.strip_prefix("DPoP-Nonce: ")
                .or_else(|| l.strip_prefix("dpop-nonce: "))
        })
        .expect("the resource server sends a nonce")
        .trim()
        .to_owned()
}

/// The proofs of `n` requests through `tokend get --dpop` and curl, all accepted.
fn requests_pass(d: &Running, rs: &ResourceServer, nonce: &str, n: usize) {
    let threads = 4;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in (t..n).step_by(threads) {
                    let url = format!("{}/fhir/Patient/{i}?_format=json", rs.base());
                    let got = d.get_dpop("GET", &url, Some(nonce));
                    assert_eq!(got.code(), Some(0), "{}", got.stderr);
                    let (code, body) = curl(&url, &got.stdout);
                    assert_eq!(code, 200, "request {i}: {body}");
                }
            });
        }
    });
}

fn bound_and_accepted(nonce_at_the_token_endpoint: bool, requests: usize) {
    let idp = provider(nonce_at_the_token_endpoint);
    let rs = ResourceServer::start(&idp.issuer());
    let sb = Sandbox::new();
    let config = Running::config(&sb, &idp, &format!("{}/fhir/", rs.base()));
    let d = Running::start(sb, &config);

    // The token is a DPoP-bound JWT: cnf.jkt is the thumbprint of the key tokend keeps.
    let token = d.token();
    let claims = jwt_part(&token, 1);
    let got = d.get_dpop("GET", &format!("{}/fhir/metadata", rs.base()), None);
    assert_eq!(got.code(), Some(0), "{}", got.stderr);
    let mut lines = got.stdout.lines();
    assert_eq!(
        lines.next(),
        Some(format!("Authorization: DPoP {token}").as_str())
    );
    let proof = lines
        .next()
        .unwrap()
        .strip_prefix("DPoP: ")
        .unwrap()
        .to_owned();
    let jwk = jwt_part(&proof, 0)["jwk"].clone();
    assert!(jwk.get("d").is_none(), "no private part in the proof");
    assert_eq!(
        claims["cnf"]["jkt"],
        jkt(&jwk),
        "bound to tokend's key: {claims}"
    );
    let log = idp.requests_of("fhir-client");
    if nonce_at_the_token_endpoint {
        assert_eq!(log[0]["error"], "use_dpop_nonce", "{log:?}");
        assert_eq!(
            log[1]["status"], 200,
            "retried at once with the nonce: {log:?}"
        );
    }
    // One attempt, a success: the nonce's round trip is no failure.
    let (_, metrics) = socket_get(&d.sb.path("tokend.sock"), "/metrics").unwrap();
    let attempts: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tokend_refresh_attempts_total{account=\"fhir\""))
        .collect();
    assert!(
        attempts
            .iter()
            .any(|l| l.contains("result=\"success\"") && l.ends_with(" 1")),
        "{attempts:?}"
    );
    assert!(
        attempts
            .iter()
            .filter(|l| !l.contains("result=\"success\""))
            .all(|l| l.ends_with(" 0")),
        "{attempts:?}"
    );
    assert_eq!(
        log.iter().filter(|r| r["status"] == 200).count(),
        1,
        "{log:?}"
    );

    // Without the resource server's nonce: refused with one; with it: accepted.
    let (code, body) = curl(&format!("{}/fhir/metadata", rs.base()), &got.stdout);
    assert_eq!(
        (code, body["error"].as_str()),
        (401, Some("use_dpop_nonce"))
    );
    let nonce = rs_nonce(&rs);
    requests_pass(&d, &rs, &nonce, requests);
    assert_eq!(rs.stats().0, requests as u64);

    // A proof replayed is refused (jti seen), one for another URL too.
    let url = format!("{}/fhir/Patient/x", rs.base());
    let got = d.get_dpop("GET", &url, Some(&nonce));
    assert_eq!(curl(&url, &got.stdout).0, 200);
    let (code, body) = curl(&url, &got.stdout);
    assert_eq!(code, 401, "a replayed proof: {body}");
    assert!(
        body["why"].as_str().unwrap().contains("jti replayed"),
        "{body}"
    );
    let (code, body) = curl(&format!("{}/fhir/Patient/y", rs.base()), &got.stdout);
    assert!(
        code == 401 && body["why"].as_str().unwrap().contains("htu"),
        "{body}"
    );

    // Someone outside the account's `access` gets what an unknown account gets (404);
    // switching to nobody takes root, as CI runs.
    if nix::unistd::geteuid().is_root() {
        std::fs::set_permissions(
            d.sb.path(""),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_tokend"))
            .args([
                "get",
                "fhir",
                "--socket",
                &d.socket(),
                "--dpop",
                "GET",
                &url,
            ]);
        let stranger = finish(cmd, SHORT);
        assert_ne!(stranger.code(), Some(0));
        assert!(
            stranger
                .stderr
                .contains("no account \"fhir\" that you (uid 65534) may read"),
            "{}",
            stranger.stderr
        );
    }

    // A URL outside `urls`: tokend mints nothing (400).
    for outside in [
        format!("{}/admin", rs.base()),
        "https://evil.example/fhir/".to_owned(),
    ] {
        let (status, body) = post_dpop(&d, &json!({"method": "GET", "url": outside}));
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("is not under the urls"), "{body}");
        let got = d.get_dpop("GET", &outside, None);
        assert_ne!(got.code(), Some(0));
        assert!(
            got.stderr.contains("is not under the urls"),
            "{}",
            got.stderr
        );
    }
}

/// `POST /v1/tokens/fhir/dpop` with `body`, through curl on the socket.
fn post_dpop(d: &Running, body: &Value) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
            &d.socket(),
            "-d",
            &body.to_string(),
            "http://tokend/v1/tokens/fhir/dpop",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

#[test]
fn a_client_credentials_token_is_bound_and_1000_proofs_pass_a_resource_server() {
    bound_and_accepted(false, 1000);
}

#[test]
fn a_token_endpoint_that_requires_nonces_is_asked_again_with_one() {
    bound_and_accepted(true, 20);
}

#[test]
fn a_restart_keeps_the_key_and_the_bound_token_and_asks_nothing() {
    let idp = provider(false);
    let rs = ResourceServer::start(&idp.issuer());
    let sb = Sandbox::new();
    let config = Running::config(&sb, &idp, &format!("{}/fhir/", rs.base()));
    let d = Running::start(sb, &config);
    let token = d.token();
    let (_, _, log) = d.daemon.terminate();
    let before = idp.requests_of("fhir-client").len();
    let sb = d.sb;

    // The key: its own file, 0600; nowhere else in state_dir, nor in the log at trace.
    let key_file = sb.path("state/fhir.dpop.pem");
    let meta = std::fs::metadata(&key_file).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    let pem = std::fs::read_to_string(&key_file).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!log.contains(&body[..40]), "the key is in the log");
    let state = std::fs::read_to_string(sb.path("state/fhir.json")).unwrap();
    assert!(!state.contains(&body[..40]) && !state.contains("PRIVATE KEY"));
    assert!(log.contains("made a DPoP key"), "{log}");

    let d = Running::start(sb, &config);
    assert_eq!(d.token(), token, "the saved token is served again");
    let nonce = rs_nonce(&rs);
    requests_pass(&d, &rs, &nonce, 10);
    assert_eq!(
        idp.requests_of("fhir-client").len(),
        before,
        "no request after the restart"
    );
    let (_, _, log) = d.daemon.terminate();
    assert!(!log.contains(&body[..40]), "the key is in the log");
    assert!(!log.contains("made a DPoP key"), "the kept key is used");
}

#[test]
fn a_replaced_dpop_key_makes_the_restart_ask_for_a_token_bound_to_the_new_key() {
    let idp = provider(false);
    let rs = ResourceServer::start(&idp.issuer());
    let sb = Sandbox::new();
    let root = sb.path("");
    crate::support::pki::make_key(&root, "dpop.pem", "p256");
    let (d, config) = Running::start_for(
        sb,
        &idp,
        &rs,
        "fhir-client",
        "dpop_key = { file = \"dpop.pem\" }",
    );
    let old = d.token();
    d.daemon.terminate();
    let before = idp.requests_of("fhir-client").len();
    let sb = d.sb;

    // The operator replaces the key: the saved token is bound to the old one, and no
    // proof of the new key would pass with it.
    crate::support::pki::make_key(&root, "dpop.pem", "p256");
    let d = Running::start(sb, &config);
    let new = d.token();
    assert_ne!(
        new, old,
        "the token bound to the replaced key is not served"
    );
    let got = d.get_dpop("GET", &format!("{}/fhir/metadata", rs.base()), None);
    assert_eq!(got.code(), Some(0), "{}", got.stderr);
    let proof = proof_line(&got.stdout);
    let key = jkt(&jwt_part(proof, 0)["jwk"]);
    assert_eq!(
        jwt_part(&new, 1)["cnf"]["jkt"],
        key.as_str(),
        "bound to the new key"
    );
    assert_ne!(jwt_part(&old, 1)["cnf"]["jkt"], key.as_str());
    requests_pass(&d, &rs, &rs_nonce(&rs), 10);
    assert_eq!(
        idp.requests_of("fhir-client").len(),
        before + 1,
        "one request for the new key"
    );
}

#[test]
fn a_refresh_token_account_gets_bound_tokens_along_its_chain() {
    let idp = provider(true);
    let rs = ResourceServer::start(&idp.issuer());
    let sb = Sandbox::new();
    let seed = idp.refresh_token("chain-client");
    sb.write(&sb.path("seed"), &seed, 0o600);
    let (d, _) = Running::start_for(
        sb,
        &idp,
        &rs,
        "chain-client",
        "grant_type = \"refresh_token\"\nrefresh_token = { file = \"seed\" }\nmin_refresh_interval = \"1s\"",
    );
    let nonce = rs_nonce(&rs);
    let first = d.token();
    let jkt = jwt_part(&first, 1)["cnf"]["jkt"].clone();
    assert!(jkt.is_string(), "a bound token: {}", jwt_part(&first, 1));
    requests_pass(&d, &rs, &nonce, 10);

    // The next link: a new token, bound to the same key, and proofs for it pass.
    let refresh = finish(
        {
            let mut c = tokend();
            c.args(["refresh", "fhir", "--socket", &d.socket()]);
            c
        },
        SHORT,
    );
    assert_eq!(refresh.code(), Some(0), "{}", refresh.stderr);
    let second = d
        .daemon
        .wait_until("the next token of the chain", LONG, || {
            Some(d.token()).filter(|t| *t != first)
        });
    assert_eq!(jwt_part(&second, 1)["cnf"]["jkt"], jkt);
    requests_pass(&d, &rs, &nonce, 10);
    let log = idp.requests_of("chain-client");
    assert_eq!(
        log.iter().filter(|r| r["status"] == 200).count(),
        2,
        "two links: {log:?}"
    );
}

#[test]
fn private_key_jwt_with_a_configured_ps256_dpop_key_gets_a_bound_token() {
    let sb = Sandbox::new();
    let root = sb.path("");
    crate::support::pki::make_key(&root, "client.pem", "p384");
    crate::support::pki::make_key(&root, "dpop.pem", "rsa-pkcs8");
    let config = |issuer: &str, urls: &str| {
        sb.config(&format!(
            "{}[[account]]\nname = \"fhir\"\ntoken_url = \"{issuer}/token\"\nclient_id = \"pkj-client\"\n\
             client_auth = \"private_key_jwt\"\nprivate_key = {{ file = \"client.pem\" }}\n\
             extra_params = {{ resource = \"{AUDIENCE}\" }}\ntoken_binding = \"dpop\"\n\
             dpop_alg = \"PS256\"\ndpop_key = {{ file = \"dpop.pem\" }}\nurls = [\"{urls}\"]\n",
            config::daemon(&sb.path("tokend.sock"), "log_level = \"trace\"")
        ))
    };
    let path = config("https://idp.invalid", "https://fhir.invalid/");
    let mut cmd = tokend();
    cmd.args(["jwks", "-c"]).arg(&path).arg("fhir");
    let jwks: Value = serde_json::from_str(&finish(cmd, SHORT).stdout).unwrap();
    let idp = OidcProvider::start(json!({
        "ttl": 600,
        "clients": [{
            "client_id": "pkj-client",
            "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_signing_alg": "ES384",
            "jwks": jwks,
            "grant_types": ["client_credentials"], "redirect_uris": [], "response_types": [],
        }],
        "resource": AUDIENCE,
        "dpop": {"nonce": true},
    }));
    let rs = ResourceServer::start(&idp.issuer());
    let path = config(&idp.issuer(), &format!("{}/fhir/", rs.base()));
    let d = Running::start(sb, &path);
    let token = d.token();
    let got = d.get_dpop("POST", &format!("{}/fhir/Bundle", rs.base()), None);
    let proof = proof_line(&got.stdout);
    let header = jwt_part(proof, 0);
    assert_eq!(header["alg"], "PS256");
    assert_eq!(jwt_part(&token, 1)["cnf"]["jkt"], jkt(&header["jwk"]));
    let log = idp.requests_of("pkj-client");
    assert_eq!(
        (log[0]["error"].as_str(), log[1]["status"].as_u64()),
        (Some("use_dpop_nonce"), Some(200)),
        "a new assertion and proof with the nonce: {log:?}"
    );
    let nonce = rs_nonce(&rs);
    requests_pass(&d, &rs, &nonce, 10);
    let (_, _, log) = d.daemon.terminate();
    let pem = std::fs::read_to_string(d.sb.path("dpop.pem")).unwrap();
    for line in pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!log.contains(line), "a line of the DPoP key in the log");
    }
    assert!(
        !d.sb.path("state").exists() || std::fs::read_dir(d.sb.path("state")).unwrap().count() == 0,
        "a configured key is not copied"
    );
}

#[test]
fn a_server_that_ignores_the_binding_makes_the_account_fail_clearly() {
    // DPoP off at the server: it answers token_type Bearer.
    let idp = OidcProvider::start(json!({
        "ttl": 600,
        "clients": [{
            "client_id": "fhir-client", "client_secret": "s3cret",
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["client_credentials"], "redirect_uris": [], "response_types": [],
        }],
        "resource": AUDIENCE,
    }));
    let sb = Sandbox::new();
    let config = Running::config(&sb, &idp, "https://fhir.example/r4/");
    let daemon = Daemon::start_with_env(&config, &[(SECRET_ENV, "s3cret")]);
    let socket = sb.path("tokend.sock");
    let error = daemon.wait_until("the account to fail", LONG, || {
        let (_, body) = socket_get(&socket, "/v1/tokens")?;
        let v: Value = serde_json::from_str(&body).ok()?;
        v["accounts"][0]["last_error"].as_str().map(str::to_owned)
    });
    assert!(
        error.contains("not \"DPoP\"") && error.contains("ignored the DPoP proof"),
        "{error}"
    );
    let (status, _) = socket_get(&socket, "/v1/tokens/fhir/raw").unwrap();
    assert_eq!(status, 503, "no unbound token is served");
}

#[test]
fn a_follower_mints_proofs_for_the_leaders_token_and_etcd_holds_no_key_in_the_clear() {
    let Some(etcd) = crate::support::etcd::EtcdCluster::start(1) else {
        return;
    };
    let idp = provider(false);
    let rs = ResourceServer::start(&idp.issuer());
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let members: Vec<(Sandbox, Daemon)> = (0..2)
        .map(|i| {
            let sb = Sandbox::new();
            let account = config::account("fhir", &format!("{}/token", idp.issuer()))
                .client_id("fhir-client")
                .secret_env(SECRET_ENV)
                .with(&format!(
                    "extra_params = {{ resource = \"{AUDIENCE}\" }}\ntoken_binding = \"dpop\"\nurls = [\"{}/fhir/\"]",
                    rs.base()
                ))
                .toml();
            let config = sb.config(&format!(
                "{}[cluster]\nendpoints = [{}]\nprefix = \"/tokend/dpop\"\nmember = \"m{i}\"\n\
                 lease_ttl = \"2s\"\nkey = \"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"\n\n{account}",
                config::daemon(
                    &sb.path("tokend.sock"),
                    "state_dir = \"state\"\nlog_level = \"trace\"\nlog_format = \"text\""
                ),
                endpoints.join(", ")
            ));
            let d = Daemon::start_with_env(&config, &[(SECRET_ENV, "s3cret")]);
            (sb, d)
        })
        .collect();
    let status = |sb: &Sandbox| {
        crate::support::account_status(&sb.path("tokend.sock"), "fhir").unwrap_or(Value::Null)
    };
    let token = members[0]
        .1
        .wait_until("both members serving one token", LONG, || {
            let t: Vec<String> = members
                .iter()
                .filter_map(|(sb, _)| {
                    socket_get(&sb.path("tokend.sock"), "/v1/tokens/fhir/raw")
                        .filter(|(s, _)| *s == 200)
                        .map(|(_, b)| b)
                })
                .collect();
            (t.len() == 2 && t[0] == t[1]).then(|| t[0].clone())
        });
    let leader = members[0].1.wait_until("a leader known to both", LONG, || {
        let l: Vec<String> = members
            .iter()
            .filter_map(|(sb, _)| status(sb)["leader"].as_str().map(str::to_owned))
            .collect();
        (l.len() == 2 && l[0] == l[1]).then(|| l[0].clone())
    });
    let follower = if leader == "m0" { 1 } else { 0 };
    assert_eq!(
        idp.requests_of("fhir-client")
            .iter()
            .filter(|r| r["status"] == 200)
            .count(),
        1,
        "one token for the cluster"
    );

    // The follower's proofs, with its own socket, for the leader's token.
    let sb = &members[follower].0;
    let socket = sb.path("tokend.sock").display().to_string();
    let nonce = rs_nonce(&rs);
    for i in 0..20 {
        let url = format!("{}/fhir/Observation/{i}", rs.base());
        let mut cmd = tokend();
        cmd.args([
            "get", "fhir", "--socket", &socket, "--dpop", "GET", &url, "--nonce", &nonce,
        ]);
        let got = finish(cmd, SHORT);
        assert_eq!(got.code(), Some(0), "{}", got.stderr);
        assert!(got
            .stdout
            .starts_with(&format!("Authorization: DPoP {token}\n")));
        let (code, body) = curl(&url, &got.stdout);
        assert_eq!(code, 200, "a follower's proof: {body}");
    }

    // The key: in each member's own 0600 file, never in etcd in the clear nor in a log.
    let pem = std::fs::read_to_string(members[follower].0.path("state/fhir.dpop.pem")).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let leaders_pem =
        std::fs::read_to_string(members[1 - follower].0.path("state/fhir.dpop.pem")).unwrap();
    assert_eq!(pem, leaders_pem, "the follower keeps the leader's key");
    let stored = etcd.etcdctl(&["get", "--prefix", "/tokend/dpop"]);
    assert!(stored.contains("/tokend/dpop"), "{stored}");
    assert!(
        !stored.contains(&body[..40]) && !stored.contains("PRIVATE KEY"),
        "the key is in etcd in the clear"
    );
    for (_, d) in members {
        let (_, _, log) = d.terminate();
        assert!(!log.contains(&body[..40]), "the key is in the log");
    }
}
