//! The config checks that touch the system, run by [`load`](super::load) after the pure
//! parse in `validate`: the config file's mode when it holds an inline secret, the
//! `state_dir`'s owner and mode, the private keys and client certificates (tokend's
//! alone, parsed, fit for their use and, for `tokend check`, valid now), and the outputs
//! as the file system resolves them. [`System`] answers the names the parse asks about
//! (users, groups, this host) from the system.
//!
//! Nothing here reads TOML or decides what a key means: `validate` does, and hands over
//! where each key that names a file is written ([`Located`]).

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::keys;
use super::validate::{normalized, Host, KeyFile, KeyUse, Located};
use super::{Config, ConfigError, ConfigErrors};

/// The machine's own answers to the names a config uses: the user and group databases
/// (NSS) and the host name.
pub(super) struct System;

impl Host for System {
    fn uid(&self, user: &str) -> Option<u32> {
        nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    }

    fn gid(&self, group: &str) -> Option<u32> {
        nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }

    fn hostname(&self) -> Option<String> {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
    }
}

/// How much [`check_files`] looks at.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Checks {
    /// What decides whether a config may run, whenever it is loaded: the same answer
    /// tomorrow as today.
    Load,
    /// Also what changes with time (a certificate that expired): `tokend check`. A
    /// daemon that restarts after a certificate expired still starts, and serves its
    /// other accounts.
    Full,
}

/// The checks that look at files: each private key and client certificate
/// ([`check_key_file`]), a config that holds an inline secret must not be readable by
/// group or others, a `state_dir` must be owned by this user and not writable by group
/// or others (like sshd's StrictModes: tokend serves what it reads from there), and no
/// two outputs may resolve to one file or into `state_dir`. Errors name the file, line
/// and key.
pub(super) fn check_files(
    config: &Config,
    located: Located,
    path: &Path,
    checks: Checks,
) -> Result<(), ConfigErrors> {
    let mut errors = Vec::new();
    for k in located.key_files {
        if let Err(e) = check_key_file(&k, checks) {
            errors.push(e);
        }
    }
    if let Some(first) = located.inline_secrets.into_iter().next() {
        match std::fs::metadata(path) {
            Err(e) => errors.push(ConfigError {
                message: format!("failed to stat the config file: {e}"),
                ..first
            }),
            Ok(meta) if meta.mode() & 0o077 != 0 => errors.push(ConfigError {
                message: format!(
                    "an inline secret in a config file that group or others can read (mode {:04o}); \
                     chmod 600 the file or use {{ file = ... }}, {{ env = ... }} or {{ credential = ... }}",
                    meta.mode() & 0o777
                ),
                ..first
            }),
            Ok(_) => {}
        }
    }
    if let (Some(dir), Some(at)) = (&config.daemon.state_dir, located.state_dir) {
        if let Err(message) = state_dir_is_safe(dir) {
            errors.push(ConfigError { message, ..at });
        }
    }
    errors.extend(outputs_resolved_apart(config, located.outputs));
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Outputs compared as the file system resolves them (a symbolic link in a directory
/// of the path): two outputs that are one file, or one inside `state_dir`, are refused
/// like two that are spelled alike (the pure parse compares spellings, `..` resolved).
fn outputs_resolved_apart(
    config: &Config,
    outputs: Vec<(PathBuf, ConfigError)>,
) -> Vec<ConfigError> {
    let mut resolver = Resolver::default();
    let state_dir = config.daemon.state_dir.as_deref().map(resolved);
    let mut seen: HashMap<PathBuf, PathBuf> = HashMap::new();
    let mut errors = Vec::new();
    for (path, at) in outputs {
        let real = resolver.resolved(&path);
        if let Some(dir) = state_dir.as_ref().filter(|d| real.starts_with(d)) {
            errors.push(ConfigError {
                message: format!(
                    "{} is inside state_dir (it resolves to {}, in {}): tokend keeps the refresh-token chains and saved state there, which an output must never replace",
                    path.display(),
                    real.display(),
                    dir.display()
                ),
                ..at.clone()
            });
        }
        match seen.get(&real) {
            Some(first) => errors.push(ConfigError {
                message: format!(
                    "{} and {} are one file ({}): two outputs would overwrite each other",
                    path.display(),
                    first.display(),
                    real.display()
                ),
                ..at
            }),
            None => {
                seen.insert(real, path);
            }
        }
    }
    errors
}

/// [`resolved`] for many outputs, most of them in a few directories: each directory is
/// resolved once (following every link of a path is a system call per component, seven
/// for `/run/tokend/tokens/name` where it does not exist yet: 70,000 at 10,000 accounts,
/// on every reload). Whether an output's own name is a symbolic link is an `lstat` of it
/// for the first outputs of a directory; from the [`LIST_FROM`]th on, the directory is
/// listed once instead (the listing's file types name its links: a `getdents` call for
/// hundreds of names, where an `lstat` of each output was one call each, 10,000 on every
/// reload). A few outputs in a large shared directory (`/tmp`) never cost its listing.
#[derive(Default)]
struct Resolver {
    dirs: HashMap<PathBuf, Dir>,
}

/// The outputs in one directory from which [`Resolver`] lists it rather than look at
/// each output's name.
const LIST_FROM: usize = 8;

/// A directory of outputs, as [`Resolver`] keeps it.
#[derive(Debug)]
struct Dir {
    /// The directory as the file system resolves it.
    real: PathBuf,
    /// The outputs looked up in it so far.
    outputs: usize,
    listing: Listing,
}

/// What [`Resolver`] knows of a directory's names.
#[derive(Debug, PartialEq)]
enum Listing {
    /// Not listed (yet): each name is looked at.
    No,
    /// The names in it that are symbolic links (or whose type the listing could not tell).
    Links(HashSet<OsString>),
    /// It could not be listed: each name is looked at.
    Unlistable,
}

impl Dir {
    fn new(dir: &Path) -> Dir {
        Dir {
            real: resolved(dir),
            outputs: 0,
            listing: Listing::No,
        }
    }

    fn list(dir: &Path) -> Listing {
        match std::fs::read_dir(dir) {
            // Not there yet: nor is any name in it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Listing::Links(HashSet::new()),
            Err(_) => Listing::Unlistable,
            Ok(entries) => entries
                .map(|e| e.map(|e| (e.file_type().map(|t| t.is_symlink()), e.file_name())))
                .filter(|e| !matches!(e, Ok((Ok(false), _))))
                .map(|e| e.map(|(_, name)| name))
                .collect::<Result<HashSet<_>, _>>()
                .map_or(Listing::Unlistable, Listing::Links),
        }
    }

    /// Whether `name` in this directory (`path` being both) must be resolved whole: a
    /// symbolic link, or a name that cannot be looked at. A name that is not there is
    /// the directory's.
    fn follows(&mut self, dir: &Path, path: &Path, name: &OsStr) -> bool {
        self.outputs += 1;
        if self.outputs == LIST_FROM && self.listing == Listing::No {
            self.listing = Dir::list(dir);
        }
        match &self.listing {
            Listing::Links(links) => links.contains(name),
            Listing::No | Listing::Unlistable => match std::fs::symlink_metadata(path) {
                Ok(meta) => meta.file_type().is_symlink(),
                Err(e) => e.kind() != std::io::ErrorKind::NotFound,
            },
        }
    }
}

impl Resolver {
    fn resolved(&mut self, path: &Path) -> PathBuf {
        let path = normalized(path);
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return resolved(&path);
        };
        if parent.as_os_str().is_empty() {
            return resolved(&path);
        }
        let dir = match self.dirs.get_mut(parent) {
            Some(dir) => dir,
            None => self
                .dirs
                .entry(parent.to_owned())
                .or_insert_with(|| Dir::new(parent)),
        };
        if dir.follows(parent, &path, name) {
            return resolved(&path);
        }
        dir.real.join(name)
    }
}

/// `path` as the file system resolves it: the longest part that exists, with its
/// symbolic links followed, and the rest as written (`.` and `..` resolved).
fn resolved(path: &Path) -> PathBuf {
    let path = normalized(path);
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            let mut out = real;
            out.extend(rest.iter().rev());
            return normalized(&out);
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return path,
        }
    }
}

/// A private key must be tokend's alone, parse, and fit its `assertion_alg`; a client
/// certificate must parse (and, for `tokend check`, be valid now and belong to its key).
/// A file that cannot be read yet is left to `tokend check` and to the request that
/// needs it (a local failure then): it may be provisioned after tokend starts.
fn check_key_file(k: &KeyFile, checks: Checks) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError {
        message,
        ..k.at.clone()
    };
    let secret = !matches!(k.what, KeyUse::ClientCert { .. });
    if let (true, Some(path)) = (secret, k.spec.path()) {
        if let Ok(meta) = std::fs::metadata(&path) {
            if meta.mode() & 0o077 != 0 {
                return Err(err(format!(
                    "{} holds a private key that group or others can read (mode {:04o}): \
                     chmod 600 it, owned by tokend's user",
                    path.display(),
                    meta.mode() & 0o777
                )));
            }
        }
    }
    let Ok(pem) = k.spec.read() else {
        return Ok(());
    };
    let source = k.spec.describe();
    match &k.what {
        KeyUse::Assertion { alg, alg_at } => {
            let key = keys::PrivateKey::from_pem(&pem).map_err(|e| err(format!("{source} {e}")))?;
            if let Some(alg) = alg {
                key.check_alg(*alg).map_err(|e| ConfigError {
                    message: format!("{source} {e}"),
                    ..alg_at.clone().unwrap_or_else(|| k.at.clone())
                })?;
            }
        }
        KeyUse::Dpop { alg } => {
            let key = keys::PrivateKey::from_pem(&pem).map_err(|e| err(format!("{source} {e}")))?;
            alg.check_key(&key)
                .map_err(|e| err(format!("{source} {e}")))?;
        }
        KeyUse::ClientKey => {}
        KeyUse::ClientCert { key } => {
            let info = keys::certificate_info(pem.expose().as_bytes())
                .map_err(|e| err(format!("{source} {e}")))?;
            if checks == Checks::Full {
                let now = std::time::SystemTime::now();
                if info.not_after <= now {
                    return Err(err(format!(
                        "{source}: the certificate ({}) expired at {}",
                        info.subject,
                        crate::clock::rfc3339(info.not_after)
                    )));
                }
                if info.not_before > now {
                    return Err(err(format!(
                        "{source}: the certificate ({}) is not valid before {}",
                        info.subject,
                        crate::clock::rfc3339(info.not_before)
                    )));
                }
                // Keys of the kinds tokend signs with are compared; TLS takes others too.
                if let Some(k) = key
                    .read()
                    .ok()
                    .and_then(|p| keys::PrivateKey::from_pem(&p).ok())
                {
                    if k.spki_bits() != info.public_key {
                        return Err(err(format!(
                            "{source}: the certificate ({}) is not for the key in {}",
                            info.subject,
                            key.describe()
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether `dir` may hold tokend's state: missing (tokend creates it, 0700), or a
/// directory owned by this process's user that group and others cannot write.
pub(crate) fn state_dir_is_safe(dir: &Path) -> Result<(), String> {
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("failed to stat {}: {e}", dir.display())),
    };
    let me = nix::unistd::geteuid().as_raw();
    let fix = format!(
        "tokend serves the tokens it reads from there: `chown {me} {0}` and `chmod 0700 {0}`",
        dir.display()
    );
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if meta.uid() != me {
        return Err(format!(
            "{} is owned by uid {}, not by tokend's user (uid {me}); {fix}",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {:04o}); {fix}",
            dir.display(),
            meta.mode() & 0o777
        ));
    }
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::config::validate::tests::{KEYED, MINIMAL, OUT, REF_SECRET};

    #[test]
    fn outputs_that_are_one_file_through_a_link_are_refused_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("state"), dir.path().join("state-link"))
            .unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        let text = format!(
            "[daemon]\nstate_dir = \"state\"\n{}\n{}",
            MINIMAL.replace("/run/tokend/tokens/msk", "real/a"),
            MINIMAL
                .replace("\"msk\"", "\"b\"")
                .replace("/run/tokend/tokens/msk", "link/a")
        );
        std::fs::write(dir.path().join("config.toml"), &text).unwrap();
        let errs = crate::config::load(&dir.path().join("config.toml"))
            .unwrap_err()
            .0;
        assert!(
            errs.iter()
                .any(|e| e.key == "account.b.output[1].path" && e.message.contains("are one file")),
            "{errs:#?}"
        );
        let text = text.replace("link/a", "state-link/b.json");
        std::fs::write(dir.path().join("config.toml"), &text).unwrap();
        let errs = crate::config::load(&dir.path().join("config.toml"))
            .unwrap_err()
            .0;
        assert!(
            errs.iter()
                .any(|e| e.key == "account.b.output[1].path"
                    && e.message.contains("inside state_dir")),
            "{errs:#?}"
        );
    }

    #[test]
    fn outputs_resolved_through_their_directory_are_what_each_path_resolves_to() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("real/sub")).unwrap();
        std::fs::write(d.join("real/file"), "").unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("link")).unwrap();
        std::os::unix::fs::symlink(d.join("real/file"), d.join("real/to-file")).unwrap();
        std::os::unix::fs::symlink(d.join("nowhere"), d.join("dangling")).unwrap();
        let paths = [
            "real/a",
            "real/file",
            "real/to-file",
            "link/a",
            "link/file",
            "link/to-file",
            "link/sub/../a",
            "dangling/a",
            "missing/deeper/a",
            "real/file/a",
        ];
        let mut resolver = Resolver::default();
        for p in paths {
            let p = d.join(p);
            assert_eq!(resolver.resolved(&p), resolved(&p), "{}", p.display());
        }
        // Through the cache, the second time round too.
        for p in paths {
            let p = d.join(p);
            assert_eq!(resolver.resolved(&p), resolved(&p), "{}", p.display());
        }
        let real = std::fs::canonicalize(d).unwrap();
        assert_eq!(
            resolver.resolved(&d.join("link/to-file")),
            real.join("real/file")
        );
        assert_eq!(resolver.resolved(&d.join("link/a")), real.join("real/a"));
        // real, link, dangling, missing/deeper, and real/file (a file).
        assert_eq!(resolver.dirs.len(), 5, "{:?}", resolver.dirs);
    }

    #[test]
    fn a_directory_is_listed_once_it_holds_enough_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("file"), "").unwrap();
        std::os::unix::fs::symlink(d.join("file"), d.join("link")).unwrap();
        std::fs::write(d.join("other"), "").unwrap();
        let mut resolver = Resolver::default();
        let check = |resolver: &mut Resolver, name: &str| {
            let p = d.join(name);
            assert_eq!(resolver.resolved(&p), resolved(&p), "{name}");
        };
        // Fewer than LIST_FROM outputs: each name looked at, the directory not listed.
        check(&mut resolver, "link");
        for i in 2..LIST_FROM {
            check(&mut resolver, &format!("out{i}"));
        }
        assert_eq!(resolver.dirs[d].listing, Listing::No);
        // The LIST_FROM-th: listed, and its links known from the listing.
        check(&mut resolver, "file");
        assert_eq!(
            resolver.dirs[d].listing,
            Listing::Links(HashSet::from(["link".into()]))
        );
        for name in ["link", "file", "other", "missing"] {
            check(&mut resolver, name);
        }
        // A directory not there yet holds no names once listed.
        for i in 0..LIST_FROM + 1 {
            check(&mut resolver, &format!("missing/out{i}"));
        }
        assert_eq!(
            resolver.dirs[&d.join("missing")].listing,
            Listing::Links(HashSet::new())
        );
        // One that cannot be listed (a file): each name looked at, as below LIST_FROM.
        for i in 0..LIST_FROM + 1 {
            check(&mut resolver, &format!("file/out{i}"));
        }
        assert_eq!(resolver.dirs[&d.join("file")].listing, Listing::Unlistable);
    }

    /// `load` of `text` written with `mode`.
    pub(crate) fn load_with_mode(text: &str, mode: u32) -> Result<Config, ConfigErrors> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        crate::config::load(&path)
    }

    #[test]
    fn credentials_in_headers_proxies_and_urls_count_as_inline_secrets() {
        let out = "[[account.output]]\npath = \"/x\"\n";
        for (extra, key, line) in [
            (
                "extra_headers = { \"X-Api-Key\" = \"k-123\" }\n",
                "account.a.extra_headers",
                6,
            ),
            (
                "proxy = \"http://user:pw@proxy.example:3128\"\n",
                "account.a.proxy",
                6,
            ),
        ] {
            let text = format!("{REF_SECRET}{extra}{out}");
            assert!(
                load_with_mode(&text, 0o600).is_ok(),
                "{extra}: fine at 0600"
            );
            let e = load_with_mode(&text, 0o644).unwrap_err().0.remove(0);
            assert_eq!((e.key.as_str(), e.line), (key, line), "{e}");
            assert!(e.message.contains("group or others can read"), "{e}");
            assert!(!e.to_string().contains("k-123") && !e.to_string().contains("pw@"));
        }
        let text = REF_SECRET.replace("https://idp", "https://u:p@idp") + out;
        let e = load_with_mode(&text, 0o640).unwrap_err().0.remove(0);
        assert_eq!(e.key, "account.a.token_url");
        let plain = format!("{REF_SECRET}proxy = \"http://proxy.example:3128\"\n{out}");
        assert!(
            load_with_mode(&plain, 0o644).is_ok(),
            "a proxy without a password is no secret"
        );
    }

    #[test]
    fn a_state_dir_others_can_write_or_someone_else_owns_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let text = format!(
            "[daemon]\nstate_dir = \"state\"\n\n{REF_SECRET}[[account.output]]\npath = \"/x\"\n"
        );
        std::fs::write(&path, &text).unwrap();
        let state = dir.path().join("state");
        assert!(
            crate::config::load(&path).is_ok(),
            "missing: tokend makes it 0700"
        );
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(crate::config::load(&path).is_ok());
        for mode in [0o770, 0o702, 0o777] {
            std::fs::set_permissions(&state, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = crate::config::load(&path).unwrap_err().0.remove(0);
            assert_eq!(
                (e.key.as_str(), e.line, e.column),
                ("daemon.state_dir", 2, 13),
                "{e}"
            );
            assert!(e.message.contains("writable by group or others"), "{e}");
        }
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&state, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let e = crate::config::load(&path).unwrap_err().0.remove(0);
            assert!(e.message.contains("owned by uid 65534"), "{e}");
        }
    }

    /// Writes `files` and a config `text` into a directory; `load`s or `load_checked`s it.
    fn load_in(
        text: &str,
        files: &[(&str, &str, u32)],
        full: bool,
    ) -> Result<Config, ConfigErrors> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        for (name, content, mode) in files {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        if full {
            crate::config::load_checked(&path)
        } else {
            crate::config::load(&path)
        }
    }

    /// The first error `load_in` reports; panics if the config loads.
    fn first_error(text: &str, files: &[(&str, &str, u32)], full: bool) -> ConfigError {
        load_in(text, files, full).unwrap_err().0.remove(0)
    }

    #[test]
    fn a_private_key_must_parse_fit_its_algorithm_and_be_tokend_s_alone() {
        use crate::config::keys::tests::{P256_SEC1, RSA_PKCS1};
        let text = format!("{KEYED}{OUT}");
        assert!(load_in(&text, &[("key.pem", P256_SEC1, 0o600)], false).is_ok());
        assert!(
            load_in(&text, &[], false).is_ok(),
            "a missing key is left to check and to the request"
        );
        let e = first_error(&text, &[("key.pem", P256_SEC1, 0o640)], false);
        assert_eq!(
            (e.key.as_str(), e.line, e.column),
            ("account.k.private_key", 6, 15),
            "{e}"
        );
        assert!(
            e.message.contains("group or others can read (mode 0640)")
                && e.message.contains("chmod 600"),
            "{e}"
        );
        let e = first_error(&text, &[("key.pem", "junk", 0o600)], false);
        assert_eq!(e.key, "account.k.private_key");
        assert!(
            e.message.contains("key.pem holds no PEM private key"),
            "{e}"
        );
        let wrong = format!("{KEYED}assertion_alg = \"ES384\"\n{OUT}");
        let e = first_error(&wrong, &[("key.pem", P256_SEC1, 0o600)], false);
        assert_eq!(
            (e.key.as_str(), e.line, e.column),
            ("account.k.assertion_alg", 7, 17),
            "{e}"
        );
        assert!(
            e.message.contains(
                "holds an EC P-256 key, but assertion_alg = \"ES384\" needs an EC P-384 key"
            ),
            "{e}"
        );
        let rsa = format!("{KEYED}assertion_alg = \"RS256\"\n{OUT}");
        let ok = load_in(&rsa, &[("key.pem", RSA_PKCS1, 0o600)], false).unwrap();
        assert!(!format!("{ok:?}").contains(&RSA_PKCS1.lines().nth(1).unwrap()[..20]));
    }

    #[test]
    fn check_refuses_an_expired_certificate_that_run_still_starts_with() {
        use crate::config::keys::tests::P256_SEC1;
        let text = format!(
            "[[account]]\nname = \"m\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\n\
             client_auth = \"tls_client_auth\"\nclient_cert = {{ file = \"c.pem\" }}\n\
             client_key = {{ file = \"k.pem\" }}\n{OUT}"
        );
        let good = include_str!("../../tests/keys/p256-cert.pem");
        let expired = include_str!("../../tests/keys/p256-expired-cert.pem");
        let other = include_str!("../../tests/keys/rsa-cert.pem");
        let files = |cert: &'static str| [("c.pem", cert, 0o644), ("k.pem", P256_SEC1, 0o600)];
        assert!(load_in(&text, &files(good), true).is_ok());
        assert!(
            load_in(&text, &files(expired), false).is_ok(),
            "run starts (and serves the others)"
        );
        let e = first_error(&text, &files(expired), true);
        assert_eq!(
            (e.key.as_str(), e.line, e.column),
            ("account.m.client_cert", 6, 15),
            "{e}"
        );
        assert!(
            e.message
                .contains("(CN=tokend-expired) expired at 2020-01-02T00:00:00Z"),
            "{e}"
        );
        let e = first_error(&text, &files(other), true);
        assert!(e.message.contains("is not for the key in file"), "{e}");
        let e = first_error(&text, &files("no cert"), false);
        assert!(e.message.contains("holds no PEM certificate"), "{e}");
        let open_key = [("c.pem", good, 0o644), ("k.pem", P256_SEC1, 0o604)];
        let e = first_error(&text, &open_key, false);
        assert_eq!(e.key, "account.m.client_key");
    }
}
