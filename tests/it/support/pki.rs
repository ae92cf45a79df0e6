//! Keys and certificates made with openssl for a test: the one CA helper of the tests
//! (a CA, a server certificate for 127.0.0.1, client certificates, and certificates
//! with the extensions a server asks for, such as etcd's).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs openssl with `args` in `dir`; panics with its stderr if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a private key `name` in `dir` with mode 0600: "rsa" (PKCS#1, 2048 bits),
/// "p256" or "p384" (SEC1), or "rsa-pkcs8" / "p384-pkcs8".
pub fn make_key(dir: &Path, name: &str, kind: &str) -> PathBuf {
    match kind {
        "rsa" => openssl(dir, &["genrsa", "-traditional", "-out", name, "2048"]),
        "rsa-pkcs8" => openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                name,
            ],
        ),
        "p256" => openssl(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                name,
            ],
        ),
        "p384" => openssl(
            dir,
            &[
                "ecparam",
                "-name",
                "secp384r1",
                "-genkey",
                "-noout",
                "-out",
                name,
            ],
        ),
        "p384-pkcs8" => openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-out",
                name,
            ],
        ),
        other => panic!("no key kind {other}"),
    }
    let path = dir.join(name);
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

/// A CA, a server certificate for 127.0.0.1, and client certificates, in one directory.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// A CA `ca.crt` (key `ca.key`) and the server's `server.crt` / `server.key`.
    pub fn new(dir: &Path) -> Pki {
        let pki = Pki {
            dir: dir.to_owned(),
        };
        pki.ca("ca");
        pki.issue(
            "server",
            "127.0.0.1",
            "subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n",
            "p256",
            "ca",
        );
        pki
    }

    /// Another CA `name.crt` / `name.key` (self-signed, P-256).
    pub fn ca(&self, name: &str) {
        make_key(&self.dir, &format!("{name}.key"), "p256");
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-x509",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN=tokend test {name}"),
                "-days",
                "2",
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }

    /// A client certificate `name.crt` with key `name.key` (kind as [`make_key`]) for the
    /// subject `CN=cn`, signed by the CA `ca`.
    pub fn client(&self, name: &str, cn: &str, kind: &str, ca: &str) -> (PathBuf, PathBuf) {
        self.issue(name, cn, "extendedKeyUsage = clientAuth\n", kind, ca)
    }

    /// A certificate `name.crt` with key `name.key` (kind as [`make_key`]) for the
    /// subject `CN=cn` with the X.509 extensions `ext` (openssl's extfile lines), signed
    /// by the CA `ca`; its paths.
    pub fn issue(
        &self,
        name: &str,
        cn: &str,
        ext: &str,
        kind: &str,
        ca: &str,
    ) -> (PathBuf, PathBuf) {
        let dir = &self.dir;
        let key = make_key(dir, &format!("{name}.key"), kind);
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("{ext}basicConstraints = CA:FALSE\n"),
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.crt"),
            ],
        );
        (dir.join(format!("{name}.crt")), key)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}
