//! A container registry that checks tokens, for the container tools' credential helper
//! (`docker-credential-tokend`): Debian's `docker-registry` (distribution 2.8) with token
//! authentication, and its token endpoint here ([`super::web`]): a client that presents
//! a password `accept` takes (the account's current token, by asking the IdP) gets a
//! registry token for what it asked (an ES256 JWT signed with a key whose self-signed
//! certificate is the registry's `rootcertbundle`, sent in `x5c`); anyone else gets 401.
//!
//! Also here: [`Podman`], podman with storage of its own (vfs, under a temporary
//! directory), an auth file whose `credHelpers` name `tokend` for the registry, and
//! `docker-credential-tokend` (a link to the binary under test) on its `PATH`.
//!
//! Without `docker-registry`, `podman`, `runc` or `openssl` [`prerequisites`] says why
//! and the test skips, except where `CI` is set: there it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use super::pki::{openssl, Pki};
use super::web::{Request, Response, Server};

/// The registry's `service` (the tokens' audience) and the token issuer it trusts.
const SERVICE: &str = "tokend-test-registry";
const ISSUER: &str = "tokend-test-token-issuer";

/// Why the registry tests cannot run here, if they cannot; panics instead under `CI`.
pub fn prerequisites() -> bool {
    let missing: Vec<&str> = ["docker-registry", "podman", "runc", "openssl", "tar"]
        .into_iter()
        .filter(|tool| {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .map_or(true, |s| !s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    assert!(
        !ci,
        "CI is set, so the container tools' tests must run, but {missing:?} are missing (scripts/test installs them)"
    );
    println!("SKIPPED: no {missing:?} (apt-get install docker-registry podman runc)");
    false
}

/// One request to the token endpoint.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub user: Option<String>,
    /// The password it presented.
    pub token: Option<String>,
    pub scope: String,
    pub granted: bool,
}

/// A running registry and its token endpoint; both stop when dropped.
pub struct Registry {
    child: Child,
    port: u16,
    _tokens: Server,
    seen: Arc<Mutex<Vec<TokenRequest>>>,
    dir: tempfile::TempDir,
}

impl Registry {
    pub fn start(accept: impl Fn(&str) -> bool + Send + Sync + 'static) -> Registry {
        let dir = tempfile::tempdir().expect("a directory for the registry");
        let signer = Signer::new(dir.path());
        let seen: Arc<Mutex<Vec<TokenRequest>>> = Arc::default();
        let tokens = Server::start({
            let seen = seen.clone();
            move |req| token_endpoint(&signer, &accept, &seen, &req)
        });
        let realm = tokens.url();
        // A free port, chosen again if another process takes it before the registry binds
        // it (as tests/k8s/apiserver.sh does).
        for attempt in 1..=3 {
            let port = super::free_port();
            let mut child = spawn(dir.path(), port, &realm);
            let up = super::wait_until("the registry to answer or exit", super::LONG, || {
                if answers(port) {
                    return Some(true);
                }
                child
                    .try_wait()
                    .expect("wait for docker-registry")
                    .map(|_| false)
            });
            if up {
                return Registry {
                    child,
                    port,
                    _tokens: tokens,
                    seen,
                    dir,
                };
            }
            let log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
            assert!(
                attempt < 3 && log.contains("address already in use"),
                "docker-registry did not start:\n{log}"
            );
        }
        unreachable!("the loop returns or panics")
    }

    /// `127.0.0.1:PORT`, as the container tools name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Every request to the token endpoint so far.
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `docker-registry serve` on `port` with token authentication at `realm`.
fn spawn(dir: &Path, port: u16, realm: &str) -> Child {
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {data}\n\
             http:\n  addr: 127.0.0.1:{port}\nauth:\n  token:\n    realm: {realm}/token\n    \
             service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {bundle}\n",
            data = dir.join("data").display(),
            bundle = dir.join("token.crt").display(),
        ),
    )
    .expect("write the registry's config");
    let log = std::fs::File::create(dir.join("registry.log")).expect("a log file");
    Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone a file"))
        .stderr(log)
        .spawn()
        .expect("start docker-registry")
}

/// Whether a registry (not any server) answers on `port`: `GET /v2/` names the API.
fn answers(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let mut answer = String::new();
    s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_ok()
        && s.read_to_string(&mut answer).is_ok()
        && answer
            .to_ascii_lowercase()
            .contains("docker-distribution-api-version: registry/2.0")
}

/// Signs registry tokens: an EC P-256 key and its self-signed certificate, made with
/// openssl.
struct Signer {
    key: EcdsaKeyPair,
    /// The certificate, DER in standard base64 (the `x5c` header).
    x5c: String,
}

impl Signer {
    fn new(dir: &Path) -> Signer {
        // A self-signed P-256 certificate, as a CA is.
        Pki {
            dir: dir.to_owned(),
        }
        .ca("token");
        openssl(
            dir,
            &[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                "token.key",
                "-outform",
                "DER",
                "-out",
                "token.p8",
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-in",
                "token.crt",
                "-outform",
                "DER",
                "-out",
                "token.der",
            ],
        );
        let rng = ring::rand::SystemRandom::new();
        let p8 = std::fs::read(dir.join("token.p8")).expect("read the PKCS#8 key");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &p8, &rng)
            .expect("a P-256 key");
        let der = std::fs::read(dir.join("token.der")).expect("read the certificate");
        Signer {
            key,
            x5c: base64::engine::general_purpose::STANDARD.encode(der),
        }
    }

    /// A registry token granting `access` to `subject`, valid five minutes.
    fn token(&self, subject: &str, access: serde_json::Value) -> String {
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + 300,
            "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", rand::random::<u64>()),
            "access": access,
        });
        let input = format!("{}.{}", b64(&header), b64(&claims));
        let sig = self
            .key
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .expect("sign a registry token");
        format!(
            "{input}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.as_ref())
        )
    }
}

/// `GET /token?service=...&scope=repository:NAME:ACTIONS`: the registry's token
/// endpoint (the Docker registry token authentication protocol).
fn token_endpoint(
    signer: &Signer,
    accept: &(dyn Fn(&str) -> bool + Send + Sync),
    seen: &Mutex<Vec<TokenRequest>>,
    req: &Request,
) -> Response {
    let scopes: Vec<String> = url::form_urlencoded::parse(req.query.as_bytes())
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.into_owned())
        .collect();
    let token = req.credential().map(|(_, t)| t);
    let granted = token.as_deref().is_some_and(accept);
    seen.lock().unwrap().push(TokenRequest {
        user: req.basic_user(),
        token: token.clone(),
        scope: scopes.join(" "),
        granted,
    });
    if !granted {
        return Response::new(401, r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#)
            .header("WWW-Authenticate", "Basic realm=\"tokend test registry\"")
            .header("Content-Type", "application/json");
    }
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|s| {
            let mut parts = s.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({
                "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let jwt = signer.token(
        &req.basic_user().unwrap_or_default(),
        serde_json::Value::Array(access),
    );
    let body = serde_json::json!({"token": jwt, "access_token": jwt, "expires_in": 300});
    Response::new(200, body.to_string()).header("Content-Type", "application/json")
}

/// podman with storage of its own, and `docker-credential-tokend` on its `PATH`,
/// named by the auth file's `credHelpers` for `registry`.
pub struct Podman {
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Podman {
    pub fn new(registry: &str, socket: &Path) -> Podman {
        let dir = tempfile::tempdir().expect("a directory for podman");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("create bin/");
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_tokend"),
            bin.join("docker-credential-tokend"),
        )
        .expect("link docker-credential-tokend");
        std::fs::write(
            dir.path().join("auth.json"),
            serde_json::json!({"credHelpers": {registry: "tokend"}}).to_string(),
        )
        .expect("write the auth file");
        Podman {
            dir,
            socket: socket.to_owned(),
        }
    }

    /// `podman ARGS...`, whatever its outcome (bounded).
    pub fn run(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        let path = format!(
            "{}:{}",
            d.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("timeout");
        cmd.arg("120")
            .arg("podman")
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args(["--storage-driver", "vfs", "--runtime", "runc"])
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "none"])
            .args(args)
            .env("PATH", path)
            .env("REGISTRY_AUTH_FILE", d.join("auth.json"))
            .env("TOKEND_SOCKET", &self.socket)
            .env("HOME", d)
            .env("XDG_RUNTIME_DIR", d.join("runroot"))
            .env_remove("TOKEND_CONFIG")
            .stdin(Stdio::null());
        cmd.output().expect("run podman")
    }

    /// A one-file image made with `podman import`, tagged `name`.
    pub fn import(&self, name: &str) {
        let d = self.dir.path();
        let content = d.join("content");
        std::fs::create_dir_all(&content).expect("create the image's content");
        std::fs::write(content.join("hello.txt"), "made by tokend's tests\n").expect("write");
        let tar = d.join("layer.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(&content)
            .arg("-cf")
            .arg(&tar)
            .arg("hello.txt")
            .output()
            .expect("run tar");
        assert!(out.status.success(), "tar failed: {out:?}");
        let out = self.run(&["import", &tar.to_string_lossy(), name]);
        assert!(
            out.status.success(),
            "podman import failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
