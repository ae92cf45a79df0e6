//! A git server over HTTP for the git credential helper's tests: git's own
//! `git http-backend` (smart HTTP, clone and push) run as a CGI program behind
//! [`super::web`], in front of which every request must carry a token that `accept`
//! takes (the test asks the IdP which token is current). A request without one, or with
//! one `accept` refuses, gets 401 with a Basic and a Bearer challenge, as a forge does.
//!
//! Repositories live under `/repos/` in a directory of the server's own; every request
//! is recorded ([`GitServer::seen`]) with the credential it carried.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use super::web::{Request, Response, Server};

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// `basic` or `bearer`, if it carried a credential.
    pub scheme: Option<&'static str>,
    pub token: Option<String>,
    /// The Basic user name, if any.
    pub user: Option<String>,
    pub status: u16,
}

type Accept = dyn Fn(&str) -> bool + Send + Sync;

/// A running git server; stops when dropped.
pub struct GitServer {
    server: Server,
    root: tempfile::TempDir,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl GitServer {
    /// Serves the repositories it creates; `accept` judges each request's token.
    pub fn start(accept: impl Fn(&str) -> bool + Send + Sync + 'static) -> GitServer {
        let root = tempfile::tempdir().expect("a directory for repositories");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let accept: Arc<Accept> = Arc::new(accept);
        let server = Server::start({
            let (root, seen) = (root.path().to_owned(), seen.clone());
            move |req| handle(&root, &*accept, &seen, req)
        });
        GitServer { server, root, seen }
    }

    /// The base of every repository URL: `http://127.0.0.1:PORT/repos/`.
    pub fn base(&self) -> String {
        format!("{}/repos/", self.server.url())
    }

    /// The clone URL of `name` (which may hold a `/`).
    pub fn url(&self, name: &str) -> String {
        format!("{}{name}", self.base())
    }

    /// Creates the bare repository `name` with one commit (a README) on `main`, open
    /// to pushes over HTTP.
    pub fn create_repo(&self, name: &str) {
        let bare = self.root.path().join(name);
        std::fs::create_dir_all(&bare).expect("create the repository's directory");
        git(&bare, &["init", "--bare", "-q", "-b", "main", "."]);
        git(&bare, &["config", "http.receivepack", "true"]);
        let work = tempfile::tempdir().expect("a work tree");
        git(work.path(), &["init", "-q", "-b", "main", "."]);
        std::fs::write(work.path().join("README"), "seeded\n").expect("write README");
        git(work.path(), &["add", "README"]);
        git(work.path(), &["commit", "-q", "-m", "seed"]);
        let target = bare.to_string_lossy().into_owned();
        git(work.path(), &["push", "-q", &target, "main"]);
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// `git ARGS` in `dir` with a fixed identity and no user or system config; panics when
/// it fails.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "tokend test")
        .env("GIT_AUTHOR_EMAIL", "test@tokend.invalid")
        .env("GIT_COMMITTER_NAME", "tokend test")
        .env("GIT_COMMITTER_EMAIL", "test@tokend.invalid")
        .stdin(Stdio::null())
        .output()
        .expect("run git (apt-get install git)");
    assert!(
        out.status.success(),
        "git {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn handle(root: &Path, accept: &Accept, seen: &Mutex<Vec<Seen>>, req: Request) -> Response {
    let credential = req.credential();
    let ok = credential.as_ref().is_some_and(|(_, t)| accept(t));
    let resp = match req.path.strip_prefix("/repos") {
        _ if !ok => Response::new(401, "a current token, please\n")
            .header("WWW-Authenticate", "Basic realm=\"tokend test\"")
            .header("WWW-Authenticate", "Bearer realm=\"tokend test\""),
        Some(path_info) => cgi(root, path_info, &req),
        None => Response::new(404, "not here\n"),
    };
    seen.lock().unwrap().push(Seen {
        method: req.method.clone(),
        path: req.path.clone(),
        scheme: credential.as_ref().map(|(s, _)| *s),
        token: credential.map(|(_, t)| t),
        user: req.basic_user(),
        status: resp.status,
    });
    resp
}

/// Runs `git http-backend` for one request (RFC 3875), its answer as an HTTP one.
fn cgi(root: &Path, path_info: &str, req: &Request) -> Response {
    let mut cmd = Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("REQUEST_METHOD", &req.method)
        .env("PATH_INFO", path_info)
        .env("QUERY_STRING", &req.query)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("REMOTE_USER", "tokend-test")
        .env("CONTENT_LENGTH", req.body.len().to_string());
    for (header, var) in [
        ("content-type", "CONTENT_TYPE"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "GIT_PROTOCOL"),
    ] {
        if let Some(v) = req.header(header) {
            cmd.env(var, v);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run git http-backend");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let body = req.body.clone();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .expect("stdout is piped")
        .read_to_end(&mut out)
        .expect("read git http-backend's answer");
    let _ = writer.join();
    let _ = child.wait();
    parse_cgi(&out)
}

/// A CGI program's output: headers (`Status:` among them), a blank line, the body.
fn parse_cgi(out: &[u8]) -> Response {
    let (end, sep) = match (find(out, b"\r\n\r\n"), find(out, b"\n\n")) {
        (Some(a), Some(b)) if b < a => (b, 2),
        (Some(a), _) => (a, 4),
        (None, Some(b)) => (b, 2),
        (None, None) => return Response::new(502, "no CGI header\n"),
    };
    let head = String::from_utf8_lossy(&out[..end]);
    let mut resp = Response::new(200, out[end + sep..].to_vec());
    for line in head.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("status") {
            resp.status = v
                .trim()
                .split(' ')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(500);
        } else {
            resp = resp.header(k.trim(), v.trim());
        }
    }
    resp
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
