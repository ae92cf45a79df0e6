//! A real Kubernetes API server on loopback, for the Kubernetes backend's tests (SPEC §8):
//! kube-apiserver, kubectl and etcd built from the Go module proxy by `tests/k8s/build.sh`,
//! started and stopped by `tests/k8s/apiserver.sh` (one place for the flags, also usable by
//! hand). Here: an admin kubeconfig, namespaces, service accounts, RBAC objects from YAML,
//! service-account tokens minted through the TokenRequest API (`kubectl create token`) and
//! kubeconfigs that carry them. kubectl does all the talking; no Kubernetes client here.
//!
//! [`KubeApiServer::shared`] is one server for the whole test binary (a test takes a
//! namespace of its own); [`KubeApiServer::start`] is a server of the test's own, stopped
//! when dropped. Either way the script's watchdog stops the servers when the test binary
//! is gone, even killed. Without the programs (or openssl, curl, python3) these return
//! `None` and the test says it skipped, except where `CI` is set: there a missing
//! prerequisite fails the test (`scripts/test` builds and installs them).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Bounds one kubectl command (the API server answers in milliseconds; a loaded CI
/// machine with cargo building beside it is slower).
const KUBECTL: Duration = Duration::from_secs(60);
/// Bounds `apiserver.sh start` (its own bound, KUBE_START_TIMEOUT, is 180 s per server).
const START: Duration = Duration::from_secs(400);

/// What [`KubeApiServer::start`] starts the API server with (the shared one: the default).
#[derive(Default, Clone)]
pub struct Options {
    /// `--authentication-config`: a structured AuthenticationConfiguration
    /// (`apiserver.config.k8s.io/v1`), e.g. a JWT issuer a kubectl credential plugin's
    /// tokens come from. The API server re-reads it when it changes.
    pub authentication_config: Option<PathBuf>,
    /// An audit log of every request (level Metadata) in `dir()/audit.log`.
    pub audit: bool,
    /// More kube-apiserver flags, as is.
    pub extra_flags: Vec<String>,
}

/// A running kube-apiserver and its etcd. See the module's documentation.
pub struct KubeApiServer {
    dir: PathBuf,
    /// The directory's owner for a server of one test's own (removed on drop).
    _tmp: Option<tempfile::TempDir>,
    bin: PathBuf,
    server: String,
    shared: bool,
}

/// What a finished kubectl did.
pub struct Kubectl {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Kubectl {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn script(name: &str) -> PathBuf {
    repo().join("tests/k8s").join(name)
}

/// Where build.sh puts the programs: `K8S_BIN`, else what `build.sh bindir` says.
fn bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("K8S_BIN") {
        return Ok(dir.into());
    }
    let out = Command::new("bash")
        .arg(script("build.sh"))
        .arg("bindir")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run tests/k8s/build.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tests/k8s/build.sh bindir failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Why the API server cannot be started here, if it cannot.
fn missing() -> Option<String> {
    let bin = match bin_dir() {
        Ok(b) => b,
        Err(e) => return Some(e),
    };
    for p in ["kube-apiserver", "kubectl", "etcd"] {
        if !bin.join(p).is_file() {
            return Some(format!(
                "no {} (tests/k8s/build.sh builds it)",
                bin.join(p).display()
            ));
        }
    }
    for tool in ["openssl", "curl", "python3"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!("no {tool} (apt-get install {tool})"));
        }
    }
    None
}

/// `None` (and a SKIPPED line) where a prerequisite is missing; a panic instead in CI.
fn prerequisites() -> Option<PathBuf> {
    if let Some(why) = missing() {
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
        assert!(
            !ci,
            "CI is set, so the Kubernetes tests must run, but: {why}"
        );
        println!("SKIPPED: no Kubernetes API server: {why}");
        return None;
    }
    Some(bin_dir().expect("bin_dir worked a moment ago"))
}

/// Runs `cmd` to its end, for at most `timeout` (killed if it takes longer).
fn run(mut cmd: Command, what: &str, timeout: Duration) -> Kubectl {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for a child") {
            break s;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Kubectl {
        status,
        stdout: out.join().expect("the stdout reader does not panic"),
        stderr: err.join().expect("the stderr reader does not panic"),
    }
}

impl KubeApiServer {
    /// A server of this test's own, stopped when dropped (`&Options::default()` for the
    /// plain one); `None` where it cannot run (outside CI).
    pub fn start(options: &Options) -> Option<KubeApiServer> {
        let bin = prerequisites()?;
        let tmp = tempfile::Builder::new()
            .prefix("tokend-kube-")
            .tempdir()
            .expect("a directory for the API server");
        let dir = tmp.path().to_path_buf();
        let mut server = Self::launch(bin, dir, options, false);
        server._tmp = Some(tmp);
        Some(server)
    }

    /// One server for the whole test binary, started by the first test that asks; it
    /// stops (and its directory goes) when the test binary exits. Tests that share it
    /// each work in a namespace of their own.
    pub fn shared() -> Option<&'static KubeApiServer> {
        static SHARED: OnceLock<Option<KubeApiServer>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let bin = prerequisites()?;
                // Kept past the test binary's end for the watchdog to remove: a static
                // is never dropped.
                let dir = tempfile::Builder::new()
                    .prefix("tokend-kube-shared-")
                    .tempdir()
                    .expect("a directory for the API server")
                    .keep();
                Some(Self::launch(bin, dir, &Options::default(), true))
            })
            .as_ref()
    }

    fn launch(bin: PathBuf, dir: PathBuf, options: &Options, shared: bool) -> KubeApiServer {
        let mut cmd = Command::new("bash");
        cmd.arg(script("apiserver.sh"))
            .arg("start")
            .arg(&dir)
            .args(&options.extra_flags)
            .env("K8S_BIN", &bin)
            .env("KUBE_OWNER_PID", std::process::id().to_string())
            .env_remove("KUBECONFIG")
            .env_remove("KUBE_AUTHENTICATION_CONFIG")
            .env_remove("KUBE_AUDIT");
        if shared {
            cmd.env("KUBE_OWNER_REMOVE_DIR", "1");
        }
        if let Some(c) = &options.authentication_config {
            cmd.env("KUBE_AUTHENTICATION_CONFIG", c);
        }
        if options.audit {
            cmd.env("KUBE_AUDIT", "1");
        }
        let out = run(cmd, "tests/k8s/apiserver.sh start", START);
        assert!(
            out.success(),
            "tests/k8s/apiserver.sh start failed:\n{}{}",
            out.stdout,
            out.stderr
        );
        let server = std::fs::read_to_string(dir.join("server"))
            .expect("apiserver.sh start writes DIR/server")
            .trim()
            .to_owned();
        KubeApiServer {
            dir,
            _tmp: None,
            bin,
            server,
            shared,
        }
    }

    /// The API server's URL, `https://127.0.0.1:PORT` (also its service-account issuer).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The directory with the certificates, keys, logs and kubeconfigs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM) of the API server's serving certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A kubeconfig for a cluster admin (group `system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// kube-apiserver's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kube-apiserver.log")).unwrap_or_default()
    }

    /// `kubectl --kubeconfig KUBECONFIG ARGS...`, whatever its outcome.
    pub fn kubectl(&self, kubeconfig: &Path, args: &[&str]) -> Kubectl {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--request-timeout=30s")
            .args(args)
            .env_remove("KUBECONFIG")
            // kubectl's cache of discovery answers, out of the user's home.
            .env("KUBECACHEDIR", self.dir.join("kubectl-cache"));
        run(cmd, &format!("kubectl {}", args.join(" ")), KUBECTL)
    }

    /// kubectl as the admin; panics when it fails; its standard output.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = self.kubectl(&self.admin_kubeconfig(), args);
        assert!(
            out.success(),
            "kubectl {} (as admin) failed:\n{}",
            args.join(" "),
            out.stderr
        );
        out.stdout
    }

    /// Writes `yaml` to a file of its own in [`KubeApiServer::dir`]; its path.
    pub fn yaml_file(&self, yaml: &str) -> PathBuf {
        let file = tempfile::Builder::new()
            .prefix("object-")
            .suffix(".yaml")
            .tempfile_in(&self.dir)
            .expect("a file for the YAML");
        std::fs::write(file.path(), yaml).expect("write the YAML");
        file.into_temp_path()
            .keep()
            .expect("keep the YAML file for kubectl")
    }

    /// `kubectl apply -n NAMESPACE -f` the objects of `yaml`, as the admin (Roles,
    /// RoleBindings, anything).
    pub fn apply(&self, namespace: &str, yaml: &str) {
        let file = self.yaml_file(yaml);
        self.admin(&["apply", "-n", namespace, "-f", &file.to_string_lossy()]);
    }

    pub fn create_namespace(&self, name: &str) {
        self.admin(&["create", "namespace", name]);
    }

    pub fn create_service_account(&self, namespace: &str, name: &str) {
        self.admin(&["create", "serviceaccount", "-n", namespace, name]);
    }

    /// A token for the service account, minted through the TokenRequest API
    /// (`kubectl create token`), valid for `lifetime` (the API server allows 10 minutes
    /// at least).
    pub fn create_token(
        &self,
        namespace: &str,
        service_account: &str,
        lifetime: Duration,
    ) -> String {
        let duration = format!("--duration={}s", lifetime.as_secs());
        self.admin(&[
            "create",
            "token",
            "-n",
            namespace,
            service_account,
            &duration,
        ])
        .trim()
        .to_owned()
    }

    /// Writes a kubeconfig to `path` (mode 0600) that reaches this server with `token`
    /// and has `namespace` as its default.
    pub fn write_kubeconfig(&self, path: &Path, token: &str, namespace: &str) {
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: tokend-test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
             users:\n\
             - name: token\n  user:\n    token: {token}\n\
             contexts:\n\
             - name: token\n  context:\n    cluster: tokend-test\n    user: token\n    namespace: {namespace}\n\
             current-context: token\n",
            server = self.server,
            ca = self.ca_cert().display(),
        );
        std::fs::write(path, text).expect("write a kubeconfig");
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod a kubeconfig");
    }

    /// Mints a token for the service account ([`KubeApiServer::create_token`], 1 hour)
    /// and writes a kubeconfig for it into [`KubeApiServer::dir`]; its path.
    pub fn service_account_kubeconfig(&self, namespace: &str, service_account: &str) -> PathBuf {
        let token = self.create_token(namespace, service_account, Duration::from_secs(3600));
        let path = self
            .dir
            .join(format!("{namespace}.{service_account}.kubeconfig"));
        self.write_kubeconfig(&path, &token, namespace);
        path
    }

    fn stop(&self) {
        let mut cmd = Command::new("bash");
        cmd.arg(script("apiserver.sh")).arg("stop").arg(&self.dir);
        let out = run(cmd, "tests/k8s/apiserver.sh stop", Duration::from_secs(60));
        if !out.success() {
            eprintln!("tests/k8s/apiserver.sh stop failed:\n{}", out.stderr);
        }
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        // The shared one lives in a static, never dropped: its watchdog stops it.
        if !self.shared {
            self.stop();
        }
    }
}
