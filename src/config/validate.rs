//! Raw config -> typed [`Config`]. Walks every section, collects every error with its
//! line, column and key, and returns them all together.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
#[cfg(test)]
use url::form_urlencoded;

use super::keys;
use super::raw::{
    field_names, RawAccess, RawAccount, RawCluster, RawDaemon, RawOutput, RawSignal, S,
};
use super::secret::{SecretSource, SecretSpec};
use super::*;

/// Parses and validates config text; `path` names the file in errors and anchors
/// relative paths. Does not check the file's mode (see [`load`](super::load)).
pub fn parse_str(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    parse(text, path).map(|(config, _)| config)
}

/// Where the keys that the file checks of [`check_files`] report on are.
pub(super) struct Located {
    /// Every inline credential (SPEC §2).
    inline_secrets: Vec<ConfigError>,
    /// `daemon.state_dir`, if set.
    state_dir: Option<ConfigError>,
    /// Every private key and client certificate, with where it is written.
    key_files: Vec<KeyFile>,
    /// Every output's path, with where it is written.
    outputs: Vec<(PathBuf, ConfigError)>,
}

/// A `private_key`, `client_key` or `client_cert`, for the checks that read it.
struct KeyFile {
    spec: SecretSpec,
    /// Where it is written (the message left empty).
    at: ConfigError,
    what: KeyUse,
}

enum KeyUse {
    /// Signs client assertions with this algorithm (None: the key's default).
    Assertion {
        alg: Option<AssertionAlg>,
        alg_at: Option<ConfigError>,
    },
    /// The key of a client certificate.
    ClientKey,
    /// A client certificate, and the key that goes with it.
    ClientCert { key: SecretSpec },
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

/// The checks that look at files: a config that holds an inline secret must not be
/// readable by group or others, and a `state_dir` must be owned by this user and not
/// writable by group or others (like sshd's StrictModes: tokend serves what it reads
/// from there). Errors name the file, line and key.
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
    let state_dir = config.daemon.state_dir.as_deref().map(resolved);
    let mut seen: HashMap<PathBuf, PathBuf> = HashMap::new();
    let mut errors = Vec::new();
    for (path, at) in outputs {
        let real = resolved(&path);
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

/// `path` with `.` and `..` resolved as written (`out/sub/../a` is `out/a`), not
/// through the file system.
pub(crate) fn normalized(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                // `/..` is `/`.
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            other => out.push(other),
        }
    }
    out
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

struct Ctx<'a> {
    text: &'a str,
    lines: Lines,
    file: &'a Path,
    base: PathBuf,
    errors: Vec<ConfigError>,
    inline_secrets: Vec<ConfigError>,
    /// Keys whose values were dropped for a type error: not reported again as missing.
    dropped: Vec<String>,
    key_files: Vec<KeyFile>,
    /// Every output's path, and where it is written.
    outputs: Vec<(PathBuf, ConfigError)>,
    /// Every token endpoint once: accounts of one provider share it (issue #11).
    token_urls: std::collections::HashSet<Arc<TokenUrl>>,
    /// Every distinct [`Options`] once, likewise.
    options: std::collections::HashSet<Arc<Options>>,
}

/// `value`, or the equal one an earlier account has, from `known`.
fn share<T: Eq + std::hash::Hash>(
    known: &mut std::collections::HashSet<Arc<T>>,
    value: T,
) -> Arc<T> {
    if let Some(k) = known.get(&value) {
        return k.clone();
    }
    let new = Arc::new(value);
    known.insert(new.clone());
    new
}

impl Ctx<'_> {
    fn err(
        &mut self,
        span: std::ops::Range<usize>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) {
        let e = self.locate(span, key.into(), msg.into());
        self.errors.push(e);
    }

    fn locate(&self, span: std::ops::Range<usize>, key: String, message: String) -> ConfigError {
        let (line, column) = self.lines.line_col(self.text, span.start);
        ConfigError {
            file: self.file.to_owned(),
            line,
            column,
            key,
            message,
        }
    }

    /// A required key is absent (unless it was dropped for a type error, already reported).
    fn missing(&mut self, span: std::ops::Range<usize>, label: &str, key: &str, hint: &str) {
        if !self.dropped.iter().any(|d| d == &format!("{label}.{key}")) {
            self.err(span, label, format!("missing key {key:?}{hint}"));
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.base.join(p)
    }

    fn duration(&mut self, v: &Option<S<String>>, key: &str, default: Duration) -> Duration {
        self.opt_duration(v, key).unwrap_or(default)
    }

    fn opt_duration(&mut self, v: &Option<S<String>>, key: &str) -> Option<Duration> {
        let v = v.as_ref()?;
        match humantime::parse_duration(v.get_ref().trim()) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.err(v.span(), key, "must be longer than zero");
                None
            }
            Err(_) => {
                self.err(
                    v.span(),
                    key,
                    format!(
                        "{:?} is not a duration (write e.g. \"30s\", \"25m\", \"1h\")",
                        v.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn choice<T: Copy>(
        &mut self,
        v: &Option<S<String>>,
        key: &str,
        options: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(v) = v else { return default };
        match options.iter().find(|(n, _)| *n == v.get_ref()) {
            Some((_, t)) => *t,
            None => {
                let names: Vec<_> = options.iter().map(|(n, _)| *n).collect();
                self.err(
                    v.span(),
                    key,
                    format!("{:?} is not one of {}", v.get_ref(), names.join(" | ")),
                );
                default
            }
        }
    }

    /// A file mode: a string of octal digits ("0640") or a TOML octal integer (0o640).
    /// A bare decimal such as 640 is refused: it would mean 0o1200.
    fn mode(&mut self, v: &S<toml::Value>, key: &str) -> Option<u32> {
        let span = v.span();
        let mode = match v.get_ref() {
            toml::Value::String(s) if !s.is_empty() && s.chars().all(|c| c.is_digit(8)) => {
                u32::from_str_radix(s, 8).ok()
            }
            toml::Value::Integer(n) => {
                let written = &self.text[span.clone()];
                if written.starts_with("0o") {
                    u32::try_from(*n).ok()
                } else {
                    self.err(
                        span,
                        key,
                        format!("{written} is a decimal number; write the mode as \"0{written}\" or 0o{written}"),
                    );
                    return None;
                }
            }
            _ => None,
        };
        match mode {
            Some(m) if m <= 0o7777 => Some(m),
            _ => {
                self.err(span, key, "a mode is octal, as \"0640\" or 0o640");
                None
            }
        }
    }

    fn secret(&mut self, v: &S<toml::Value>, key: &str) -> Option<SecretSpec> {
        self.source(v, key, true)
    }

    /// A value read like a secret (inline, file, env, credential); an inline one counts
    /// as an inline secret if `secret`.
    fn source(&mut self, v: &S<toml::Value>, key: &str, secret: bool) -> Option<SecretSpec> {
        let parsed = SecretSource::deserialize(v.get_ref().clone())
            .map_err(|_| {
                "expected a string or one of { file = \"...\" }, { env = \"...\" }, { credential = \"...\" }"
                    .to_owned()
            })
            .and_then(|s| s.to_spec(&self.base));
        match parsed {
            Ok(spec) => {
                if secret && spec.is_inline() {
                    self.inline_secret(v.span(), key.to_owned());
                }
                Some(spec)
            }
            Err(msg) => {
                self.err(v.span(), key, msg);
                None
            }
        }
    }

    /// Notes an inline credential at `span` (SPEC §2: it makes a config readable by group
    /// or others an error).
    fn inline_secret(&mut self, span: std::ops::Range<usize>, key: String) {
        let e = self.locate(span, key, String::new());
        self.inline_secrets.push(e);
    }

    fn user(&mut self, v: &S<toml::Value>, key: &str) -> Option<u32> {
        self.principal(v, key, "user", |n| {
            nix::unistd::User::from_name(n)
                .ok()
                .flatten()
                .map(|u| u.uid.as_raw())
        })
    }

    fn group(&mut self, v: &S<toml::Value>, key: &str) -> Option<u32> {
        self.principal(v, key, "group", |n| {
            nix::unistd::Group::from_name(n)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw())
        })
    }

    fn principal(
        &mut self,
        v: &S<toml::Value>,
        key: &str,
        what: &str,
        lookup: impl Fn(&str) -> Option<u32>,
    ) -> Option<u32> {
        match v.get_ref() {
            toml::Value::Integer(n) if u32::try_from(*n).is_ok() => Some(*n as u32),
            toml::Value::String(s) if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) => {
                s.parse().ok()
            }
            toml::Value::String(s) => match lookup(s) {
                Some(id) => Some(id),
                None => {
                    self.err(
                        v.span(),
                        key,
                        format!("no {what} named {s:?} on this system"),
                    );
                    None
                }
            },
            _ => {
                self.err(
                    v.span(),
                    key,
                    format!("expected a {what} name or a numeric id"),
                );
                None
            }
        }
    }
}

/// Whether `url` points at this machine: `localhost` or a loopback address.
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Where each line of a text starts, so that locating an offset costs a binary search
/// and not a scan from the top (issue #11: with one scan per account and per error,
/// validating 10,000 accounts took time in the square of the file's size).
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines(starts)
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn line_col(&self, text: &str, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.0.partition_point(|&start| start <= offset);
        let start = self.0[line - 1];
        (line, text[start..offset].chars().count() + 1)
    }
}

pub(super) fn parse(text: &str, file: &Path) -> Result<(Config, Located), ConfigErrors> {
    let base = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut cx = Ctx {
        text,
        lines: Lines::new(text),
        file,
        base,
        errors: Vec::new(),
        inline_secrets: Vec::new(),
        dropped: Vec::new(),
        key_files: Vec::new(),
        outputs: Vec::new(),
        token_urls: Default::default(),
        options: Default::default(),
    };

    let (root, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in syntax {
            // Only the message and the span: toml's Display quotes the source line,
            // which may hold a secret.
            let span = e.span().unwrap_or(0..0);
            cx.err(span, "", e.message().to_owned());
        }
        return Err(ConfigErrors(cx.errors));
    }
    let root = root.into_inner();

    let mut daemon_raw = None;
    let mut cluster_raw = None;
    let mut defaults_raw = None;
    let mut accounts_raw = Vec::new();
    for (key, value) in &root {
        match key.get_ref().as_ref() {
            "daemon" => daemon_raw = section::<RawDaemon>(&mut cx, value, "daemon"),
            "cluster" => cluster_raw = section::<RawCluster>(&mut cx, value, "cluster"),
            "defaults" => defaults_raw = section::<RawAccount>(&mut cx, value, "defaults"),
            "account" => match value.get_ref() {
                DeValue::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let label = account_label(item, i);
                        if let Some(a) = section::<RawAccount>(&mut cx, item, &label) {
                            accounts_raw.push((label, a, item.span()));
                        }
                    }
                }
                _ => cx.err(value.span(), "account", "accounts are written [[account]]"),
            },
            other => cx.err(
                key.span(),
                other,
                "unknown key (expected [daemon], [cluster], [defaults] or [[account]])",
            ),
        }
    }

    let daemon_raw = daemon_raw.unwrap_or_default();
    let raw_state_dir_at = daemon_raw
        .state_dir
        .as_ref()
        .map(|s| cx.locate(s.span(), "daemon.state_dir".into(), String::new()));
    let daemon = daemon(&mut cx, daemon_raw);
    let cluster = cluster_raw.and_then(|c| cluster(&mut cx, c));
    let defaults = defaults_raw.unwrap_or_default();
    if let Some(n) = &defaults.name {
        cx.err(n.span(), "defaults.name", "every account has its own name");
    }
    if let Some(o) = defaults.output.as_ref().and_then(|o| o.first()) {
        cx.err(o.span(), "defaults.output", "outputs are per account");
    }

    let mut accounts = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    // Each output path, and the account and place that first named it.
    let mut seen: HashMap<PathBuf, String> = HashMap::new();
    // The state directory, as outputs are compared with it.
    let state_dir = daemon.state_dir.as_deref().map(normalized);
    for (label, raw, span) in accounts_raw {
        let paths: Vec<std::ops::Range<usize>> = raw
            .output
            .iter()
            .flatten()
            .map(|o| o.get_ref().path.as_ref().map_or(o.span(), |p| p.span()))
            .collect();
        let grant_at = raw
            .grant_type
            .as_ref()
            .or(defaults.grant_type.as_ref())
            .map_or(span.clone(), |g| g.span());
        if let Some(a) = account(
            &mut cx,
            &label,
            raw,
            &defaults,
            span.clone(),
            daemon.socket.is_some(),
        ) {
            if let Some(line) = names.get(&a.name) {
                cx.err(
                    span,
                    label,
                    format!(
                        "the name {:?} is already used by the account on line {line}",
                        a.name
                    ),
                );
                continue;
            }
            names.insert(a.name.clone(), cx.lines.line_col(text, span.start).0);
            if a.rotates() && state_dir.is_none() {
                cx.err(
                    grant_at,
                    format!("{label}.grant_type"),
                    "grant_type = \"refresh_token\" needs [daemon] state_dir: the provider rotates the refresh token, and the rotated one must survive a restart (the configured one is spent after the first refresh)",
                );
            }
            // An account that validated has one output per [[account.output]].
            for (i, (o, at)) in a.outputs.iter().zip(paths).enumerate() {
                let key = format!("{label}.output[{}].path", i + 1);
                let resolved = normalized(&o.path);
                if let Some(dir) = state_dir.as_ref().filter(|d| resolved.starts_with(d)) {
                    let message = format!(
                        "{} is inside state_dir {}: tokend keeps the refresh-token chains and saved state there, which an output must never replace",
                        o.path.display(),
                        dir.display()
                    );
                    cx.err(at.clone(), key.clone(), message);
                }
                if let Some(first) = seen.get(&resolved) {
                    let message = format!(
                        "{} is already the output of account {first}",
                        o.path.display()
                    );
                    cx.err(at, key, message);
                } else {
                    let (line, _) = cx.lines.line_col(text, at.start);
                    cx.outputs
                        .push((o.path.clone(), cx.locate(at, key, String::new())));
                    seen.insert(resolved, format!("{:?} (line {line})", a.name));
                }
            }
            accounts.push(a);
        }
    }

    if cx.errors.is_empty() {
        Ok((
            Config {
                path: file.to_owned(),
                daemon,
                accounts: accounts
                    .into_iter()
                    .map(|a| Account {
                        cluster: a.cluster && cluster.is_some(),
                        ..a
                    })
                    .collect(),
                cluster,
            },
            Located {
                inline_secrets: cx.inline_secrets,
                state_dir: raw_state_dir_at,
                key_files: cx.key_files,
                outputs: cx.outputs,
            },
        ))
    } else {
        cx.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(cx.errors))
    }
}

fn account_label(item: &toml::Spanned<DeValue<'_>>, i: usize) -> String {
    match item
        .get_ref()
        .get("name")
        .and_then(|n| n.get_ref().as_str())
    {
        Some(n) => format!("account.{n}"),
        None => format!("account[{}]", i + 1),
    }
}

/// Reports every unknown key of a section (and of its sub-tables) and every value of
/// the wrong type, then deserializes what is left, so one mistake does not hide others.
fn section<'de, T: Deserialize<'de>>(
    cx: &mut Ctx<'_>,
    value: &toml::Spanned<DeValue<'de>>,
    label: &str,
) -> Option<T> {
    let DeValue::Table(table) = value.get_ref() else {
        cx.err(value.span(), label, "expected a table");
        return None;
    };
    let mut table = table.clone();
    prune_unknown(cx, &mut table, field_names::<T>(), label);
    if label.starts_with("account") || label == "defaults" {
        if let Some(DeValue::Array(outputs)) = table.get_mut("output").map(|o| o.get_mut()) {
            for (i, o) in outputs.iter_mut().enumerate() {
                if let DeValue::Table(t) = o.get_mut() {
                    prune_unknown(
                        cx,
                        t,
                        field_names::<RawOutput>(),
                        &format!("{label}.output[{}]", i + 1),
                    );
                }
            }
        }
        for (sub, fields) in [
            ("access", field_names::<RawAccess>()),
            ("on_refresh_signal", field_names::<RawSignal>()),
        ] {
            if let Some(DeValue::Table(t)) = table.get_mut(sub).map(|o| o.get_mut()) {
                prune_unknown(cx, t, fields, &format!("{label}.{sub}"));
            }
        }
    }
    // Each round reports one type error and drops the value that caused it.
    for _ in 0..64 {
        let de = ValueDeserializer::from(toml::Spanned::new(
            value.span(),
            DeValue::Table(table.clone()),
        ));
        match T::deserialize(de) {
            Ok(v) => return Some(v),
            Err(e) => {
                let span = e.span().unwrap_or(value.span());
                let key = key_at(cx.text, span.start)
                    .map_or(label.to_owned(), |k| format!("{label}.{k}"));
                cx.err(span.clone(), key.clone(), e.message().to_owned());
                cx.dropped.push(key);
                if !remove_at(&mut table, span.start) {
                    return None;
                }
            }
        }
    }
    None
}

/// Removes the innermost key whose value spans `pos`; false if there is none.
fn remove_at(table: &mut DeTable<'_>, pos: usize) -> bool {
    let Some(key) = table
        .iter()
        .find(|(_, v)| v.span().contains(&pos))
        .map(|(k, _)| k.clone())
    else {
        return false;
    };
    let inner = match table.get_mut(&key).map(|v| v.get_mut()) {
        Some(DeValue::Table(t)) => remove_at(t, pos),
        Some(DeValue::Array(items)) => items.iter_mut().any(|item| match item.get_mut() {
            DeValue::Table(t) => remove_at(t, pos),
            _ => false,
        }),
        _ => false,
    };
    if !inner {
        table.remove(&key);
    }
    true
}

/// The key written before the value at `offset`, for serde errors that carry no key.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = &text[line_start..];
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && !key.starts_with('[')).then(|| key.to_owned())
}

fn prune_unknown(cx: &mut Ctx<'_>, table: &mut DeTable<'_>, known: &[&str], label: &str) {
    let unknown: Vec<_> = table
        .keys()
        .filter(|k| !known.contains(&k.get_ref().as_ref()))
        .cloned()
        .collect();
    for key in unknown {
        let suggestion = known
            .iter()
            .min_by_key(|k| edit_distance(k, key.get_ref()))
            .filter(|k| edit_distance(k, key.get_ref()) <= 2)
            .map(|k| format!("; did you mean {k:?}?"))
            .unwrap_or_default();
        cx.err(
            key.span(),
            format!("{label}.{}", key.get_ref()),
            format!("unknown key {:?}{suggestion}", key.get_ref()),
        );
        table.remove(&key);
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn daemon(cx: &mut Ctx<'_>, raw: RawDaemon) -> DaemonConfig {
    let d = DaemonConfig::default();
    let socket_mode = match &raw.socket_mode {
        Some(m) => cx.mode(m, "daemon.socket_mode").unwrap_or(d.socket_mode),
        None => d.socket_mode,
    };
    let log_format = cx.choice(
        &raw.log_format,
        "daemon.log_format",
        &[
            ("auto", LogFormat::Auto),
            ("journald", LogFormat::Journald),
            ("text", LogFormat::Text),
            ("json", LogFormat::Json),
        ],
        d.log_format,
    );
    let log_level = match &raw.log_level {
        Some(l) => {
            let ok = ["error", "warn", "info", "debug", "trace"];
            if !ok.contains(&l.get_ref().as_str()) {
                cx.err(
                    l.span(),
                    "daemon.log_level",
                    format!("{:?} is not one of {}", l.get_ref(), ok.join(" | ")),
                );
            }
            l.get_ref().clone()
        }
        None => d.log_level,
    };
    let max_concurrent_refreshes = match &raw.max_concurrent_refreshes {
        Some(n) if (1..=1024).contains(n.get_ref()) => *n.get_ref() as usize,
        Some(n) => {
            cx.err(
                n.span(),
                "daemon.max_concurrent_refreshes",
                "must be between 1 and 1024",
            );
            d.max_concurrent_refreshes
        }
        None => d.max_concurrent_refreshes,
    };
    let metrics_listen = raw
        .metrics_listen
        .as_ref()
        .and_then(|m| match m.get_ref().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                cx.err(
                    m.span(),
                    "daemon.metrics_listen",
                    "expected an address and port, such as \"127.0.0.1:9464\"",
                );
                None
            }
        });
    let startup_timeout = cx.duration(
        &raw.startup_timeout,
        "daemon.startup_timeout",
        d.startup_timeout,
    );
    DaemonConfig {
        socket: raw.socket.as_ref().map(|s| cx.path(s.get_ref())),
        socket_mode,
        socket_group: raw.socket_group.map(|g| g.into_inner()),
        state_dir: raw.state_dir.as_ref().map(|s| cx.path(s.get_ref())),
        log_format,
        log_level,
        max_concurrent_refreshes,
        startup_timeout,
        metrics_listen,
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// An account's key as written, or else as `[defaults]` has it.
macro_rules! pick {
    ($a:expr, $d:expr, $f:ident) => {
        $a.$f.clone().or_else(|| $d.$f.clone())
    };
}

/// What one `[[account]]` is validated with: its raw keys, the `[defaults]`, where it
/// is (for errors about a missing key) and its label (`account.msk`) for key paths.
struct At<'r> {
    a: &'r RawAccount,
    d: &'r RawAccount,
    label: &'r str,
    span: std::ops::Range<usize>,
}

impl At<'_> {
    /// The key path of `key` in this account (`account.msk.scope`).
    fn k(&self, key: &str) -> String {
        format!("{}.{key}", self.label)
    }
}

/// `grant_type`, before the keys each grant needs are looked at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum GrantKind {
    ClientCredentials,
    Password,
    RefreshToken,
}

/// An output's `format`, before `env_var` is looked at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FormatKind {
    Raw,
    Json,
    Env,
    Header,
    Directory,
}

/// Validates one account; None (and errors in `cx`) if anything about it is wrong.
fn account(
    cx: &mut Ctx<'_>,
    label: &str,
    a: RawAccount,
    d: &RawAccount,
    span: std::ops::Range<usize>,
    has_socket: bool,
) -> Option<Account> {
    let before = cx.errors.len();
    let at = At {
        a: &a,
        d,
        label,
        span: span.clone(),
    };
    let name = name(cx, &at);
    let (token_url, allow_http) = token_url(cx, &at);
    let client_id = client_id(cx, &at);
    let (client_auth, client_secret) = client_auth(cx, &at);
    let assertion = assertion(cx, &at, client_auth);
    let client_cert = client_cert(cx, &at, client_auth);
    let basic_encoding = cx.choice(
        &pick!(a, d, basic_encoding),
        &at.k("basic_encoding"),
        &[("raw", BasicEncoding::Raw), ("form", BasicEncoding::Form)],
        BasicEncoding::Raw,
    );
    let params_in = cx.choice(
        &pick!(a, d, params_in),
        &at.k("params_in"),
        &[("body", ParamsIn::Body), ("query", ParamsIn::Query)],
        ParamsIn::Body,
    );
    let grant = grant(cx, &at);
    let extra_params = pick!(a, d, extra_params)
        .map(|p| p.into_inner())
        .unwrap_or_default();
    let extra_headers = extra_headers(cx, &at);
    let proxy = proxy(cx, &at);
    let schedule = schedule(cx, &at);
    let on_expiry = cx.choice(
        &pick!(a, d, on_expiry),
        &at.k("on_expiry"),
        &[("remove", OnExpiry::Remove), ("keep", OnExpiry::Keep)],
        OnExpiry::Remove,
    );
    let on_refresh = on_refresh(cx, &at);
    let on_refresh_signal = on_refresh_signal(cx, &at);
    let hook_timeout = cx.duration(
        &pick!(a, d, hook_timeout),
        &at.k("hook_timeout"),
        Duration::from_secs(30),
    );
    let timeout = cx.duration(
        &pick!(a, d, timeout),
        &at.k("timeout"),
        Duration::from_secs(30),
    );
    let refresh_token_timeout = cx.duration(
        &pick!(a, d, refresh_token_timeout),
        &at.k("refresh_token_timeout"),
        Duration::from_secs(120),
    );
    let ca_file = pick!(a, d, ca_file).map(|c| cx.path(c.get_ref()));
    let outputs = outputs(cx, &at, &name, has_socket);
    let access = access(cx, &at);

    if cx.errors.len() > before {
        return None;
    }
    Some(Account {
        name,
        token_url: token_url?,
        allow_http,
        grant: grant?,
        client_id,
        client_secret,
        client_auth,
        assertion: assertion.map(Box::new),
        client_cert: client_cert.map(Box::new),
        basic_encoding,
        params_in,
        scope: pick!(a, d, scope).map(|s| s.into_inner()),
        options: share(
            &mut cx.options,
            Options {
                extra_params,
                extra_headers,
                ca_file,
                proxy,
                timeout,
                refresh_token_timeout,
                schedule,
                on_refresh,
                on_refresh_signal,
                hook_timeout,
                access,
            },
        ),
        on_expiry,
        outputs,
        cluster: pick!(a, d, cluster).is_none_or(|c| *c.get_ref()),
    })
}

/// `[cluster]` (SPEC §8); `None` (with errors reported) when it cannot be used.
fn cluster(cx: &mut Ctx<'_>, raw: RawCluster) -> Option<ClusterConfig> {
    let at = |s: &Option<S<String>>| s.as_ref().map_or(0..0, |v| v.span());
    if let Some(b) = &raw.backend {
        if b.get_ref() != "etcd" {
            cx.err(b.span(), "cluster.backend", "the only backend is \"etcd\"");
        }
    }
    let mut endpoints = Vec::new();
    match &raw.endpoints {
        Some(e) if !e.get_ref().is_empty() => {
            for u in e.get_ref() {
                match url::Url::parse(u) {
                    Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
                        endpoints.push(url)
                    }
                    _ => cx.err(
                        e.span(),
                        "cluster.endpoints",
                        format!("{u:?} is not an http:// or https:// URL of an etcd member"),
                    ),
                }
            }
        }
        Some(e) => cx.err(
            e.span(),
            "cluster.endpoints",
            "name at least one etcd member",
        ),
        None => cx.err(
            0..0,
            "cluster.endpoints",
            "missing key \"endpoints\" (the etcd members' client URLs)",
        ),
    }
    let prefix = match &raw.prefix {
        Some(p) if p.get_ref().starts_with('/') && p.get_ref().len() > 1 => {
            p.get_ref().trim_end_matches('/').to_owned()
        }
        Some(p) => {
            cx.err(
                p.span(),
                "cluster.prefix",
                "an etcd key prefix such as \"/tokend/prod\"",
            );
            String::new()
        }
        None => {
            cx.err(
                0..0,
                "cluster.prefix",
                "missing key \"prefix\" (members with the same prefix share accounts)",
            );
            String::new()
        }
    };
    let member = match &raw.member {
        Some(m) if valid_name(m.get_ref()) => m.get_ref().clone(),
        Some(m) => {
            cx.err(m.span(), "cluster.member", "1 to 64 of A-Z a-z 0-9 . _ -");
            String::new()
        }
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| valid_name(h))
            .unwrap_or_else(|| "tokend".into()),
    };
    let lease_ttl = cx.duration(&raw.lease_ttl, "cluster.lease_ttl", Duration::from_secs(10));
    if lease_ttl < Duration::from_secs(2) {
        cx.err(at(&raw.lease_ttl), "cluster.lease_ttl", "at least 2s");
    }
    let key = match &raw.key {
        Some(k) => {
            let spec = cx.secret(k, "cluster.key");
            if let Some(Ok(v)) = spec
                .as_ref()
                .filter(|s| s.is_inline())
                .map(SecretSpec::read)
            {
                if let Err(e) = crate::cluster::record::ClusterKey::from_hex(v.expose()) {
                    cx.err(k.span(), "cluster.key", e.to_string());
                }
            }
            spec
        }
        None => {
            cx.err(0..0, "cluster.key", "missing key \"key\" (64 hex digits, the same on every member: openssl rand -hex 32)");
            None
        }
    };
    let on_cluster_loss = cx.choice(
        &raw.on_cluster_loss,
        "cluster.on_cluster_loss",
        &[
            ("refresh", OnClusterLoss::Refresh),
            ("wait", OnClusterLoss::Wait),
        ],
        OnClusterLoss::Refresh,
    );
    let key_file = raw
        .key_file
        .as_ref()
        .and_then(|k| cx.secret(k, "cluster.key_file"));
    let password = raw
        .password
        .as_ref()
        .and_then(|p| cx.secret(p, "cluster.password"));
    Some(ClusterConfig {
        endpoints,
        prefix,
        member,
        lease_ttl,
        key: key?,
        ca_file: raw.ca_file.as_ref().map(|p| cx.path(p.get_ref())),
        cert_file: raw.cert_file.as_ref().map(|p| cx.path(p.get_ref())),
        key_file,
        username: raw.username.map(|u| u.into_inner()),
        password,
        on_cluster_loss,
    })
}

/// `name`: 1 to 64 of `[A-Za-z0-9._-]`.
fn name(cx: &mut Ctx<'_>, at: &At<'_>) -> String {
    let a = at.a;
    let name = match &a.name {
        Some(n) if valid_name(n.get_ref()) => n.get_ref().clone(),
        Some(n) => {
            cx.err(
                n.span(),
                at.k("name"),
                format!(
                    "{:?} is not a valid name: 1 to 64 of A-Z a-z 0-9 . _ -",
                    n.get_ref()
                ),
            );
            String::new()
        }
        None => {
            cx.missing(at.span.clone(), at.label, "name", "");
            String::new()
        }
    };

    name
}

/// `token_url`, `issuer` or `fhir_base`, exactly one: http(s), and plain http only to
/// loopback unless `allow_http` (also for an issuer or FHIR base: the token endpoint
/// found there is held to the same rule when it is discovered). An account that writes
/// any of the three inherits none of them from `[defaults]`.
fn token_url(cx: &mut Ctx<'_>, at: &At<'_>) -> (Option<Arc<TokenUrl>>, bool) {
    let (a, d) = (at.a, at.d);
    let allow_http = pick!(a, d, allow_http).is_some_and(|b| *b.get_ref());
    let own = a.token_url.is_some() || a.issuer.is_some() || a.fhir_base.is_some();
    let from = if own { a } else { d };
    let given: Vec<(&str, &S<String>)> = [
        ("token_url", &from.token_url),
        ("issuer", &from.issuer),
        ("fhir_base", &from.fhir_base),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    .collect();
    let Some(&(key, u)) = given.first() else {
        cx.missing(
            at.span.clone(),
            at.label,
            "token_url",
            " (or \"issuer\" or \"fhir_base\", to discover it)",
        );
        return (None, allow_http);
    };
    if let Some((other, v)) = given.get(1) {
        cx.err(
            v.span(),
            at.k(other),
            format!("{key} is set already: an account names exactly one of token_url, issuer and fhir_base"),
        );
        return (None, allow_http);
    }
    let url = match url::Url::parse(u.get_ref()) {
        Ok(url) if url.scheme() == "http" && !allow_http && !is_loopback(&url) => {
            cx.err(
                u.span(),
                at.k(key),
                format!(
                    "plain http:// to {} would send the credentials in the clear: use https://, \
                     or set allow_http = true for this account",
                    url.host_str().unwrap_or_default()
                ),
            );
            return (None, allow_http);
        }
        Ok(url) if matches!(url.scheme(), "https" | "http") && url.has_host() => {
            if !url.username().is_empty() || url.password().is_some() {
                cx.inline_secret(u.span(), at.k(key));
            }
            url
        }
        Ok(_) => {
            cx.err(u.span(), at.k(key), "must be an http:// or https:// URL");
            return (None, allow_http);
        }
        Err(e) => {
            cx.err(u.span(), at.k(key), format!("not a URL: {e}"));
            return (None, allow_http);
        }
    };
    let discovery = key != "token_url";
    if discovery && (url.fragment().is_some() || (key == "issuer" && url.query().is_some())) {
        cx.err(
            u.span(),
            at.k(key),
            format!(
                "the discovery document's address is made from it: a {key} has no {}",
                if key == "issuer" {
                    "query or fragment (RFC 8414 §2)"
                } else {
                    "fragment"
                }
            ),
        );
        return (None, allow_http);
    }
    let token_url = match key {
        "issuer" => TokenUrl::Issuer(url),
        "fhir_base" => TokenUrl::FhirBase(url),
        _ => TokenUrl::Fixed(url),
    };
    (Some(share(&mut cx.token_urls, token_url)), allow_http)
}

fn client_id(cx: &mut Ctx<'_>, at: &At<'_>) -> String {
    let (a, d) = (at.a, at.d);
    let client_id = match pick!(a, d, client_id) {
        Some(c) if !c.get_ref().is_empty() => c.into_inner(),
        Some(c) => {
            cx.err(c.span(), at.k("client_id"), "must not be empty");
            String::new()
        }
        None => {
            cx.missing(at.span.clone(), at.label, "client_id", "");
            String::new()
        }
    };
    client_id
}

/// `client_auth` and the `client_secret` it needs (or must not have).
fn client_auth(cx: &mut Ctx<'_>, at: &At<'_>) -> (ClientAuth, Option<SecretSpec>) {
    let (a, d) = (at.a, at.d);
    // Unset, it follows from the credential the account names: a private key signs
    // assertions, a client certificate alone proves the client, else a secret.
    let default = if pick!(a, d, private_key).is_some() {
        ClientAuth::PrivateKeyJwt
    } else if pick!(a, d, client_cert).is_some() && pick!(a, d, client_secret).is_none() {
        ClientAuth::TlsClientAuth
    } else {
        ClientAuth::Basic
    };
    let client_auth = cx.choice(
        &pick!(a, d, client_auth),
        &at.k("client_auth"),
        &[
            ("basic", ClientAuth::Basic),
            ("post", ClientAuth::Post),
            ("none", ClientAuth::None),
            ("private_key_jwt", ClientAuth::PrivateKeyJwt),
            ("tls_client_auth", ClientAuth::TlsClientAuth),
        ],
        default,
    );
    let client_secret =
        pick!(a, d, client_secret).and_then(|s| cx.secret(&s, &at.k("client_secret")));
    let no_secret = match client_auth {
        ClientAuth::None => Some("\"none\" sends no secret; remove it or choose basic or post"),
        ClientAuth::PrivateKeyJwt => {
            Some("\"private_key_jwt\" signs with private_key and sends no secret; remove it")
        }
        ClientAuth::TlsClientAuth => {
            Some("\"tls_client_auth\" proves the client with its certificate and sends no secret; remove it")
        }
        ClientAuth::Basic | ClientAuth::Post => None,
    };
    match (no_secret, &client_secret) {
        (Some(why), Some(_)) => {
            let s = pick!(a, d, client_secret)
                .map(|s| s.span())
                .unwrap_or(at.span.clone());
            cx.err(s, at.k("client_secret"), format!("client_auth = {why}"));
        }
        (None, None) if pick!(a, d, client_secret).is_none() => {
            cx.missing(
                at.span.clone(),
                at.label,
                "client_secret",
                " (or set client_auth = \"none\" for a public client, \"private_key_jwt\" or \"tls_client_auth\")",
            );
        }
        _ => {}
    }
    (client_auth, client_secret)
}

/// `client_auth = "private_key_jwt"`: `private_key` (required), `key_id`,
/// `assertion_alg`, `assertion_audience`, `assertion_lifetime`; with any other
/// client_auth, none of them.
fn assertion(cx: &mut Ctx<'_>, at: &At<'_>, client_auth: ClientAuth) -> Option<AssertionConfig> {
    let (a, d) = (at.a, at.d);
    let private_key = pick!(a, d, private_key);
    let key_id = pick!(a, d, key_id);
    let alg = pick!(a, d, assertion_alg);
    let audience = pick!(a, d, assertion_audience);
    let lifetime = pick!(a, d, assertion_lifetime);
    if client_auth != ClientAuth::PrivateKeyJwt {
        let spans = [
            ("private_key", private_key.map(|v| v.span())),
            ("key_id", key_id.map(|v| v.span())),
            ("assertion_alg", alg.map(|v| v.span())),
            ("assertion_audience", audience.map(|v| v.span())),
            ("assertion_lifetime", lifetime.map(|v| v.span())),
        ];
        for (key, span) in spans {
            if let Some(span) = span {
                cx.err(
                    span,
                    at.k(key),
                    "only used with client_auth = \"private_key_jwt\"",
                );
            }
        }
        return None;
    }
    let Some(pk) = &private_key else {
        cx.missing(
            at.span.clone(),
            at.label,
            "private_key",
            " (client_auth = \"private_key_jwt\" signs its client assertion with it)",
        );
        return None;
    };
    let spec = cx.secret(pk, &at.k("private_key"));
    let mut ok = spec.is_some();
    let key_id = match key_id {
        Some(k) if k.get_ref().is_empty() || k.get_ref().chars().any(char::is_control) => {
            cx.err(
                k.span(),
                at.k("key_id"),
                "a key id is a non-empty string without control characters",
            );
            ok = false;
            None
        }
        k => k.map(|k| k.into_inner()),
    };
    let alg_at = alg
        .as_ref()
        .map(|v| cx.locate(v.span(), at.k("assertion_alg"), String::new()));
    let alg = match &alg {
        Some(v) => match AssertionAlg::ALL.iter().find(|(n, _)| n == v.get_ref()) {
            Some((_, alg)) => Some(*alg),
            None => {
                let names: Vec<_> = AssertionAlg::ALL.iter().map(|(n, _)| *n).collect();
                cx.err(
                    v.span(),
                    at.k("assertion_alg"),
                    format!("{:?} is not one of {}", v.get_ref(), names.join(" | ")),
                );
                ok = false;
                None
            }
        },
        None => None,
    };
    let audience = match audience {
        Some(v) if v.get_ref().trim().is_empty() => {
            cx.err(v.span(), at.k("assertion_audience"), "must not be empty");
            ok = false;
            None
        }
        v => v.map(|v| v.into_inner()),
    };
    let lifetime_at = lifetime.as_ref().map(|v| v.span());
    let lifetime = cx.duration(
        &lifetime,
        &at.k("assertion_lifetime"),
        MAX_ASSERTION_LIFETIME,
    );
    if lifetime > MAX_ASSERTION_LIFETIME {
        cx.err(
            lifetime_at.unwrap_or(at.span.clone()),
            at.k("assertion_lifetime"),
            "at most 5m: a client assertion may not be valid longer (SMART Backend Services)",
        );
        ok = false;
    }
    let spec = spec?;
    let at_key = cx.locate(pk.span(), at.k("private_key"), String::new());
    cx.key_files.push(KeyFile {
        spec: spec.clone(),
        at: at_key,
        what: KeyUse::Assertion { alg, alg_at },
    });
    ok.then_some(AssertionConfig {
        private_key: spec,
        key_id,
        alg,
        audience,
        lifetime,
    })
}

/// `client_cert` and `client_key`, together or not at all; `client_auth =
/// "tls_client_auth"` needs them. With another client_auth they still go on the HTTP
/// client (a gateway that asks for a client certificate as well as a secret).
fn client_cert(cx: &mut Ctx<'_>, at: &At<'_>, client_auth: ClientAuth) -> Option<ClientCert> {
    let (a, d) = (at.a, at.d);
    match (pick!(a, d, client_cert), pick!(a, d, client_key)) {
        (Some(c), Some(k)) => {
            // A certificate is public: inline, it does not make the config a secret.
            let cert = cx.source(&c, &at.k("client_cert"), false);
            let key = cx.secret(&k, &at.k("client_key"));
            let (cert, key) = (cert?, key?);
            let key_at = cx.locate(k.span(), at.k("client_key"), String::new());
            let cert_at = cx.locate(c.span(), at.k("client_cert"), String::new());
            cx.key_files.push(KeyFile {
                spec: key.clone(),
                at: key_at,
                what: KeyUse::ClientKey,
            });
            cx.key_files.push(KeyFile {
                spec: cert.clone(),
                at: cert_at,
                what: KeyUse::ClientCert { key: key.clone() },
            });
            Some(ClientCert { cert, key })
        }
        (Some(c), None) => {
            cx.err(
                c.span(),
                at.k("client_cert"),
                "needs \"client_key\", the certificate's private key",
            );
            None
        }
        (None, Some(k)) => {
            cx.err(
                k.span(),
                at.k("client_key"),
                "needs \"client_cert\", the certificate (chain) of this key",
            );
            None
        }
        (None, None) => {
            if client_auth == ClientAuth::TlsClientAuth {
                cx.missing(
                    at.span.clone(),
                    at.label,
                    "client_cert",
                    " and \"client_key\" (client_auth = \"tls_client_auth\" proves the client with them)",
                );
            }
            None
        }
    }
}

/// `grant_type` and the keys of that grant (and no other grant's).
fn grant(cx: &mut Ctx<'_>, at: &At<'_>) -> Option<Grant> {
    let (a, d) = (at.a, at.d);
    let grant_kind = cx.choice(
        &pick!(a, d, grant_type),
        &at.k("grant_type"),
        &[
            ("client_credentials", GrantKind::ClientCredentials),
            ("password", GrantKind::Password),
            ("refresh_token", GrantKind::RefreshToken),
        ],
        GrantKind::ClientCredentials,
    );
    let username = pick!(a, d, username);
    let password = pick!(a, d, password);
    let refresh_token = pick!(a, d, refresh_token);
    let grant = match grant_kind {
        GrantKind::Password => {
            if username.is_none() {
                cx.err(
                    at.span.clone(),
                    at.label,
                    "grant_type = \"password\" needs \"username\"",
                );
            }
            if password.is_none() {
                cx.err(
                    at.span.clone(),
                    at.label,
                    "grant_type = \"password\" needs \"password\"",
                );
            }
            let pw = password
                .as_ref()
                .and_then(|p| cx.secret(p, &at.k("password")));
            match (username.clone(), pw) {
                (Some(u), Some(p)) => Some(Grant::Password {
                    username: u.into_inner(),
                    password: p,
                }),
                _ => None,
            }
        }
        GrantKind::RefreshToken => match &refresh_token {
            Some(r) => cx
                .secret(r, &at.k("refresh_token"))
                .map(|refresh_token| Grant::RefreshToken { refresh_token }),
            None => {
                cx.err(
                    at.span.clone(),
                    at.label,
                    "grant_type = \"refresh_token\" needs \"refresh_token\"",
                );
                None
            }
        },
        GrantKind::ClientCredentials => Some(Grant::ClientCredentials),
    };
    if grant_kind != GrantKind::Password {
        for (key, v) in [
            ("username", username.map(|u| u.span())),
            ("password", password.map(|p| p.span())),
        ] {
            if let Some(s) = v {
                cx.err(s, at.k(key), "only used with grant_type = \"password\"");
            }
        }
    }
    if grant_kind != GrantKind::RefreshToken {
        if let Some(r) = refresh_token {
            cx.err(
                r.span(),
                at.k("refresh_token"),
                "only used with grant_type = \"refresh_token\"",
            );
        }
    }

    grant
}

/// `extra_headers`: valid names; values count as inline secrets.
fn extra_headers(cx: &mut Ctx<'_>, at: &At<'_>) -> BTreeMap<String, Secret> {
    let (a, d) = (at.a, at.d);
    let extra_headers: BTreeMap<String, Secret> = pick!(a, d, extra_headers)
        .map(|p| p.into_inner())
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, Secret::new(v)))
        .collect();
    if !extra_headers.is_empty() {
        // Header values are API keys as often as not.
        if let Some(h) = pick!(a, d, extra_headers) {
            cx.inline_secret(h.span(), at.k("extra_headers"));
        }
    }
    for h in extra_headers.keys() {
        if reqwest::header::HeaderName::from_bytes(h.as_bytes()).is_err() {
            let s = pick!(a, d, extra_headers)
                .map(|p| p.span())
                .unwrap_or(at.span.clone());
            cx.err(
                s,
                at.k("extra_headers"),
                format!("{h:?} is not a valid header name"),
            );
        }
    }
    extra_headers
}

fn proxy(cx: &mut Ctx<'_>, at: &At<'_>) -> Option<Secret> {
    let (a, d) = (at.a, at.d);
    let proxy = pick!(a, d, proxy).and_then(|p| match reqwest::Proxy::all(p.get_ref()) {
        Ok(_) => {
            if url::Url::parse(p.get_ref())
                .is_ok_and(|u| !u.username().is_empty() || u.password().is_some())
            {
                cx.inline_secret(p.span(), at.k("proxy"));
            }
            Some(Secret::new(p.into_inner()))
        }
        Err(_) => {
            cx.err(
                p.span(),
                at.k("proxy"),
                "not a proxy URL (e.g. \"http://proxy.internal:3128\")",
            );
            None
        }
    });

    proxy
}

fn schedule(cx: &mut Ctx<'_>, at: &At<'_>) -> SchedulePolicy {
    let (a, d) = (at.a, at.d);
    let defaults = SchedulePolicy::default();
    let refresh_ratio = match pick!(a, d, refresh_ratio) {
        Some(r) if *r.get_ref() > 0.0 && *r.get_ref() <= 1.0 => *r.get_ref(),
        Some(r) => {
            cx.err(
                r.span(),
                at.k("refresh_ratio"),
                "must be above 0 and at most 1",
            );
            defaults.refresh_ratio
        }
        None => defaults.refresh_ratio,
    };
    SchedulePolicy {
        refresh_ratio,
        refresh_every: cx.opt_duration(&pick!(a, d, refresh_every), &at.k("refresh_every")),
        min_refresh_interval: cx.duration(
            &pick!(a, d, min_refresh_interval),
            &at.k("min_refresh_interval"),
            defaults.min_refresh_interval,
        ),
        default_lifetime: cx.duration(
            &pick!(a, d, default_lifetime),
            &at.k("default_lifetime"),
            defaults.default_lifetime,
        ),
        auth_failure_hold: cx.duration(
            &pick!(a, d, auth_failure_hold),
            &at.k("auth_failure_hold"),
            defaults.auth_failure_hold,
        ),
    }
}

fn on_refresh(cx: &mut Ctx<'_>, at: &At<'_>) -> Option<Vec<String>> {
    let (a, d) = (at.a, at.d);
    let on_refresh = match pick!(a, d, on_refresh) {
        Some(v) if v.get_ref().is_empty() || v.get_ref()[0].is_empty() => {
            cx.err(
                v.span(),
                at.k("on_refresh"),
                "expected a command and its arguments, as [\"systemctl\", \"reload\", \"app\"]",
            );
            None
        }
        v => v.map(|v| v.into_inner()),
    };
    on_refresh
}

fn on_refresh_signal(cx: &mut Ctx<'_>, at: &At<'_>) -> Option<SignalHook> {
    let (a, d) = (at.a, at.d);
    let on_refresh_signal = pick!(a, d, on_refresh_signal).and_then(|s| {
        let s = s.into_inner();
        let signal = match &s.signal {
            Some(name) => match name.get_ref().parse::<nix::sys::signal::Signal>() {
                Ok(sig) => sig,
                Err(_) => {
                    cx.err(
                        name.span(),
                        at.k("on_refresh_signal.signal"),
                        format!(
                            "{:?} is not a signal name such as \"SIGHUP\"",
                            name.get_ref()
                        ),
                    );
                    return None;
                }
            },
            None => nix::sys::signal::Signal::SIGHUP,
        };
        Some(SignalHook {
            pid_file: cx.path(s.pid_file.get_ref()),
            signal,
        })
    });
    on_refresh_signal
}

fn access(cx: &mut Ctx<'_>, at: &At<'_>) -> Access {
    let (a, d) = (at.a, at.d);
    let mut access = Access::default();
    if let Some(acc) = pick!(a, d, access) {
        let acc = acc.into_inner();
        for u in &acc.users {
            if let Some(uid) = cx.user(u, &at.k("access.users")) {
                access.users.push(uid);
            }
        }
        for g in &acc.groups {
            if let Some(gid) = cx.group(g, &at.k("access.groups")) {
                access.groups.push(gid);
            }
        }
    }

    access
}

/// The `[[account.output]]`s; an account must have one, or a socket must serve it.
fn outputs(cx: &mut Ctx<'_>, at: &At<'_>, name: &str, has_socket: bool) -> Vec<Output> {
    let mut outputs = Vec::new();
    for (i, o) in at.a.output.iter().flatten().enumerate() {
        if let Some(out) = output(cx, &format!("{}.output[{}]", at.label, i + 1), o, name) {
            outputs.push(out);
        }
    }
    // Kept for the daemon's life, once per account (issue #11).
    outputs.shrink_to_fit();
    if outputs.is_empty() && at.a.output.is_none() && !has_socket {
        cx.err(
            at.span.clone(),
            at.label,
            "no [[account.output]] and no [daemon] socket: the token would go nowhere",
        );
    }
    outputs
}

fn output(cx: &mut Ctx<'_>, label: &str, o: &S<RawOutput>, account: &str) -> Option<Output> {
    let k = |key: &str| format!("{label}.{key}");
    let raw = o.get_ref();
    let path = match &raw.path {
        Some(p) if !p.get_ref().is_empty() && !p.get_ref().ends_with('/') => {
            Some(cx.path(p.get_ref()))
        }
        Some(p) => {
            cx.err(p.span(), k("path"), "expected a file path");
            None
        }
        None => {
            cx.err(o.span(), label, "missing key \"path\"");
            None
        }
    };
    let kind = cx.choice(
        &raw.format,
        &k("format"),
        &[
            ("raw", FormatKind::Raw),
            ("json", FormatKind::Json),
            ("env", FormatKind::Env),
            ("header", FormatKind::Header),
            ("directory", FormatKind::Directory),
        ],
        FormatKind::Raw,
    );
    let format = match kind {
        FormatKind::Json => Format::Json,
        FormatKind::Env | FormatKind::Directory => {
            let var = match &raw.env_var {
                Some(v) => v.get_ref().clone(),
                None => default_env_var(account),
            };
            let ok = var
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                let s = raw.env_var.as_ref().map(|v| v.span()).unwrap_or(o.span());
                cx.err(
                    s,
                    k("env_var"),
                    format!("{var:?} is not a shell variable name"),
                );
            }
            if kind == FormatKind::Directory {
                Format::Directory { var }
            } else {
                Format::Env { var }
            }
        }
        FormatKind::Header => Format::Header,
        FormatKind::Raw => Format::Raw,
    };
    if !matches!(kind, FormatKind::Env | FormatKind::Directory) {
        if let Some(v) = &raw.env_var {
            cx.err(
                v.span(),
                k("env_var"),
                "only used with format = \"env\" or \"directory\"",
            );
        }
    }
    let mode = match &raw.mode {
        Some(m) => cx.mode(m, &k("mode")),
        None => Some(0o600),
    };
    let owner = raw.owner.as_ref().and_then(|u| cx.user(u, &k("owner")));
    let group = raw.group.as_ref().and_then(|g| cx.group(g, &k("group")));
    Some(Output {
        path: path?,
        format,
        mode: mode?,
        owner,
        group,
    })
}

/// `msk` -> `MSK_TOKEN`, `my-api.v2` -> `MY_API_V2_TOKEN`.
pub(crate) fn default_env_var(account: &str) -> String {
    let mut v: String = account
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if v.starts_with(|c: char| c.is_ascii_digit()) {
        v.insert(0, '_');
    }
    v + "_TOKEN"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        parse_str(text, Path::new("/etc/tokend/config.toml"))
    }

    fn errors(text: &str) -> Vec<ConfigError> {
        parse(text).unwrap_err().0
    }

    const MINIMAL: &str = r#"
[[account]]
name = "msk"
token_url = "https://idp.example/token"
client_id = "id"
client_secret = { file = "secrets/msk" }

[[account.output]]
path = "/run/tokend/tokens/msk"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        let a = &c.accounts[0];
        assert_eq!(a.name, "msk");
        assert_eq!(a.grant, Grant::ClientCredentials);
        assert_eq!(a.client_auth, ClientAuth::Basic);
        assert_eq!(
            a.client_secret,
            Some(SecretSpec::File("/etc/tokend/secrets/msk".into()))
        );
        assert_eq!(a.outputs[0].mode, 0o600);
        assert_eq!(a.outputs[0].format, Format::Raw);
        assert_eq!(a.options.schedule, SchedulePolicy::default());
        assert_eq!(a.options.timeout, Duration::from_secs(30));
        assert_eq!(c.daemon, DaemonConfig::default());
    }

    #[test]
    fn typo_names_key_line_and_column() {
        let text = MINIMAL.replace("token_url", "tokne_url");
        let errs = errors(&text);
        let e = errs
            .iter()
            .find(|e| e.key == "account.msk.tokne_url")
            .expect("unknown key reported");
        assert_eq!((e.line, e.column), (4, 1));
        assert!(
            e.message.contains("did you mean \"token_url\""),
            "{}",
            e.message
        );
        assert_eq!(
            e.to_string(),
            "/etc/tokend/config.toml:4:1: account.msk.tokne_url: unknown key \"tokne_url\"; did you mean \"token_url\"?"
        );
    }

    #[test]
    fn every_error_is_reported() {
        let text = r#"
[daemon]
log_format = "xml"
bogus = 1

[[account]]
name = "a"
token_url = "https://idp.example/token"
client_id = "id"
client_secret = "s"
refresh_every = "soon"
scoop = "x"

[[account.output]]
path = "/tmp/a"
mode = 640
colour = "red"

[[account]]
name = "b b"
token_url = "ftp://x"
client_id = "id"
client_auth = "none"
grant_type = "password"
"#;
        let errs = errors(text);
        let got: Vec<_> = errs
            .iter()
            .map(|e| (e.line, e.column, e.key.as_str()))
            .collect();
        for want in [
            (3, 14, "daemon.log_format"),
            (4, 1, "daemon.bogus"),
            (11, 17, "account.a.refresh_every"),
            (12, 1, "account.a.scoop"),
            (16, 8, "account.a.output[1].mode"),
            (17, 1, "account.a.output[1].colour"),
            (20, 8, "account.b b.name"),
            (21, 13, "account.b b.token_url"),
        ] {
            assert!(got.contains(&want), "missing {want:?} in {got:#?}");
        }
        assert!(errs
            .iter()
            .any(|e| e.message.contains("needs \"username\"")));
        let mode = errs.iter().find(|e| e.key.ends_with("mode")).unwrap();
        assert!(
            mode.message.contains("\"0640\" or 0o640"),
            "{}",
            mode.message
        );
    }

    #[test]
    fn modes_string_and_octal() {
        let c = parse(&MINIMAL.replace(
            "path = \"/run/tokend/tokens/msk\"",
            "path = \"/x\"\nmode = \"0640\"",
        ))
        .unwrap();
        assert_eq!(c.accounts[0].outputs[0].mode, 0o640);
        let c = parse(&MINIMAL.replace(
            "path = \"/run/tokend/tokens/msk\"",
            "path = \"/x\"\nmode = 0o644",
        ))
        .unwrap();
        assert_eq!(c.accounts[0].outputs[0].mode, 0o644);
        let e = errors(&MINIMAL.replace(
            "path = \"/run/tokend/tokens/msk\"",
            "path = \"/x\"\nmode = \"rw\"",
        ));
        assert_eq!(e[0].key, "account.msk.output[1].mode");
    }

    #[test]
    fn defaults_are_inherited_and_overridden() {
        let text = format!(
            "[defaults]\nrefresh_every = \"25m\"\ntimeout = \"5s\"\n{}\ntimeout = \"9s\"\n",
            MINIMAL.replace(
                "[[account.output]]\npath = \"/run/tokend/tokens/msk\"\n",
                ""
            )
        ) + "[[account.output]]\npath = \"/x\"\n";
        let c = parse(&text).unwrap();
        let a = &c.accounts[0];
        assert_eq!(
            a.options.schedule.refresh_every,
            Some(Duration::from_secs(25 * 60))
        );
        assert_eq!(a.options.timeout, Duration::from_secs(9));
    }

    #[test]
    fn duplicate_names_and_output_paths_are_refused() {
        let text = format!("{MINIMAL}\n{MINIMAL}");
        let errs = errors(&text);
        assert!(
            errs.iter()
                .any(|e| e.message.contains("already used by the account on line 2")),
            "{errs:#?}"
        );
        let text = format!("{MINIMAL}\n{}", MINIMAL.replace("\"msk\"", "\"other\""));
        let errs = errors(&text);
        let dup = errs
            .iter()
            .find(|e| e.message.contains("already the output of account \"msk\""))
            .unwrap_or_else(|| panic!("{errs:#?}"));
        // The second account's output path, where it is written, and the first's line.
        let line = MINIMAL.lines().count()
            + 1
            + MINIMAL.lines().position(|l| l.starts_with("path")).unwrap()
            + 1;
        assert_eq!((dup.line, dup.column), (line, 8), "{dup}");
        assert_eq!(dup.key, "account.other.output[1].path");
        let first = MINIMAL.lines().position(|l| l.starts_with("path")).unwrap() + 1;
        assert!(
            dup.message.ends_with(&format!("\"msk\" (line {first})")),
            "{dup}"
        );
    }

    #[test]
    fn a_refresh_token_account_needs_a_state_dir() {
        let rt = "[[account]]\nname = \"rt\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\n\
                  client_auth = \"none\"\ngrant_type = \"refresh_token\"\nrefresh_token = { env = \"RT\" }\n\
                  [[account.output]]\npath = \"/r\"\n";
        let errs = errors(rt);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].key, "account.rt.grant_type");
        assert_eq!((errs[0].line, errs[0].column), (6, 14));
        assert!(
            errs[0].message.contains("needs [daemon] state_dir"),
            "{}",
            errs[0]
        );
        // Inherited from [defaults], it is named where the account is.
        let inherited = format!(
            "[defaults]\ngrant_type = \"refresh_token\"\n{}",
            rt.replace("grant_type = \"refresh_token\"\n", "")
        );
        assert_eq!(errors(&inherited)[0].key, "account.rt.grant_type");
        assert!(parse(&format!("[daemon]\nstate_dir = \"/s\"\n{rt}")).is_ok());
    }

    #[test]
    fn outputs_are_compared_resolved_and_kept_out_of_the_state_dir() {
        let two = |a: &str, b: &str| {
            format!(
                "[daemon]\nstate_dir = \"/var/lib/tokend\"\n{}\n{}",
                MINIMAL.replace("/run/tokend/tokens/msk", a),
                MINIMAL
                    .replace("\"msk\"", "\"b\"")
                    .replace("/run/tokend/tokens/msk", b)
            )
        };
        let errs = errors(&two("/out/a", "/out/sub/../a"));
        assert!(
            errs.iter().any(|e| e.key == "account.b.output[1].path"
                && e.message.contains("already the output of account \"msk\"")),
            "{errs:#?}"
        );
        assert!(errors(&two("/out/./a", "/out//a")).len() == 1);
        assert!(parse(&two("/out/a", "/out/sub/a")).is_ok());
        let errs = errors(&two("/out/a", "/var/lib/tokend/b.json"));
        assert!(
            errs.iter()
                .any(|e| e.key == "account.b.output[1].path"
                    && e.message.contains("inside state_dir")),
            "{errs:#?}"
        );
        let errs = errors(&two("/var/lib/x/../tokend/sub/f", "/out/b"));
        assert!(
            errs.iter().any(|e| e.key == "account.msk.output[1].path"),
            "{errs:#?}"
        );
        assert_eq!(normalized(Path::new("/..")), PathBuf::from("/"));
        assert_eq!(normalized(Path::new("a/../../b")), PathBuf::from("../b"));
    }

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
    fn a_relative_config_path_is_made_absolute() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.toml"), MINIMAL).unwrap();
        let here = std::env::current_dir().unwrap();
        let rel = pathdiff(dir.path(), &here);
        let c = crate::config::load(&rel.join("c.toml")).unwrap();
        assert!(c.path.is_absolute(), "{}", c.path.display());
        assert_eq!(normalized(&c.path), dir.path().join("c.toml"));
    }

    /// `to` relative to `from` (both absolute), with `..` as needed.
    fn pathdiff(to: &Path, from: &Path) -> PathBuf {
        let mut up = PathBuf::new();
        let mut base = from.to_owned();
        while !to.starts_with(&base) {
            up.push("..");
            base.pop();
        }
        up.join(to.strip_prefix(&base).unwrap())
    }

    #[test]
    fn line_and_column_count_characters_and_survive_any_offset() {
        let text = "a = 1\n\u{e9}t\u{e9} = \"x\"\n\nlast";
        let lines = Lines::new(text);
        assert_eq!(lines.line_col(text, 0), (1, 1));
        assert_eq!(lines.line_col(text, 6), (2, 1));
        let eq = text.find(" = \"x").unwrap() + 1;
        assert_eq!(lines.line_col(text, eq), (2, 5), "characters, not bytes");
        // Inside a multi-byte character: the character's own column.
        assert_eq!(lines.line_col(text, 7), (2, 1));
        assert_eq!(lines.line_col(text, text.len()), (4, 5));
        assert_eq!(lines.line_col(text, text.len() + 10), (4, 5));
        assert_eq!(lines.line_col("", 0), (1, 1));
    }

    #[test]
    fn secrets_in_every_form() {
        for (src, want) in [
            ("\"inline\"", SecretSpec::Inline(Secret::new("inline"))),
            ("{ env = \"V\" }", SecretSpec::Env("V".into())),
            ("{ credential = \"c\" }", SecretSpec::Credential("c".into())),
            ("{ file = \"/abs\" }", SecretSpec::File("/abs".into())),
        ] {
            let c = parse(&MINIMAL.replace("{ file = \"secrets/msk\" }", src)).unwrap();
            assert_eq!(c.accounts[0].client_secret, Some(want));
        }
        let errs = errors(&MINIMAL.replace(
            "{ file = \"secrets/msk\" }",
            "{ file = \"a\", env = \"b\" }",
        ));
        assert_eq!(errs[0].key, "account.msk.client_secret");
    }

    #[test]
    fn syntax_errors_do_not_echo_the_line() {
        let errs = errors("[[account]]\nclient_secret = \"hunter2\nname = 1\n");
        for e in &errs {
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        assert_eq!(errs[0].line, 2);
    }

    #[test]
    fn type_errors_name_the_key() {
        let errs = errors(&MINIMAL.replace("client_id = \"id\"", "client_id = 5"));
        assert_eq!(errs[0].key, "account.msk.client_id");
        assert_eq!(errs[0].line, 5);
    }

    #[test]
    fn password_grant_and_env_default() {
        let text = MINIMAL.replace("client_id = \"id\"", "client_id = \"id\"\ngrant_type = \"password\"\nusername = \"u\"\npassword = { env = \"P\" }")
            .replace("path = \"/run/tokend/tokens/msk\"", "path = \"/x\"\nformat = \"env\"");
        let c = parse(&text).unwrap();
        let a = &c.accounts[0];
        assert_eq!(
            a.grant,
            Grant::Password {
                username: "u".into(),
                password: SecretSpec::Env("P".into())
            }
        );
        assert_eq!(
            a.outputs[0].format,
            Format::Env {
                var: "MSK_TOKEN".into()
            }
        );
        assert_eq!(default_env_var("my-api.v2"), "MY_API_V2_TOKEN");
    }

    #[test]
    fn debug_of_an_account_shows_no_secret() {
        let text = MINIMAL.replace(
            "client_id = \"id\"",
            "client_id = \"id\"\nproxy = \"http://u:proxy-pass@proxy:3128\"\nextra_headers = { \"X-Api-Key\" = \"api-key-value\" }\nclient_secret_unused = 1",
        )
        .replace("client_secret_unused = 1\n", "")
        .replace("{ file = \"secrets/msk\" }", "\"inline-secret\"");
        let text = "[daemon]\nstate_dir = \"/s\"\n".to_owned()
            + &text.replace("https://", "https://url-user:url-pass@")
            + "\n[[account]]\nname = \"pw\"\ntoken_url = \"https://idp.example/t\"\n\
               client_id = \"id\"\nclient_secret = \"inline-secret\"\ngrant_type = \"password\"\n\
               username = \"u\"\npassword = \"inline-password\"\n[[account.output]]\npath = \"/p\"\n\
               [[account]]\nname = \"rt\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\n\
               client_auth = \"none\"\ngrant_type = \"refresh_token\"\nrefresh_token = \"inline-rt\"\n\
               [[account.output]]\npath = \"/r\"\n";
        let c = parse(&text).unwrap();
        let dbg = format!("{c:?}");
        let secrets = [
            "proxy-pass",
            "api-key-value",
            "inline-secret",
            "url-pass",
            "inline-password",
            "inline-rt",
        ];
        for s in secrets {
            assert!(!dbg.contains(s), "{s} in {dbg}");
        }
        // Every type that holds one: the account, its grant, its secret specs, the
        // credentials read for a request, the request built from them.
        let creds = crate::oauth::request::Credentials {
            client_secret: Some(Secret::new("inline-secret")),
            password: Some(Secret::new("inline-password")),
            refresh_token: Some(Secret::new("inline-rt")),
            ..Default::default()
        };
        for a in &c.accounts {
            let req = crate::oauth::request::build(a, a.token_url.configured(), &creds);
            let all = format!("{a:?} {:?} {:?} {creds:?} {req:?}", a.grant, a.secrets());
            for s in secrets {
                assert!(!all.contains(s), "{s} in {all}");
            }
        }
        assert_eq!(
            c.accounts[0].options.extra_headers["X-Api-Key"].expose(),
            "api-key-value"
        );
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../config.example.toml");
        let c = parse_str(text, Path::new("config.example.toml")).unwrap();
        assert_eq!(c.accounts.len(), 2);
        let msk = &c.accounts[0];
        assert_eq!(
            (msk.name.as_str(), msk.client_auth),
            ("msk", ClientAuth::Post)
        );
        assert_eq!(msk.scope.as_deref(), Some("full"));
        let cib = &c.accounts[1];
        assert!(matches!(cib.grant, Grant::Password { .. }));
        assert_eq!(cib.client_auth, ClientAuth::Basic);
        assert_eq!(
            cib.options.schedule.refresh_every,
            Some(Duration::from_secs(25 * 60))
        );
        // The commented SMART Backend Services account parses once uncommented.
        let ehr: String = text
            .split("#[[account]]\n#name = \"ehr\"")
            .nth(1)
            .expect("the example has the SMART account")
            .lines()
            .map(|l| l.strip_prefix('#').unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let c = parse_str(
            &format!("[[account]]\nname = \"ehr\"{ehr}"),
            Path::new("config.example.toml"),
        )
        .unwrap();
        let ehr = &c.accounts[0];
        assert_eq!(ehr.client_auth, ClientAuth::PrivateKeyJwt);
        assert!(matches!(*ehr.token_url, TokenUrl::FhirBase(_)));
        assert_eq!(
            ehr.assertion.as_ref().unwrap().alg,
            Some(AssertionAlg::Rs384)
        );
    }

    /// `load` of `text` written with `mode`.
    fn load_with_mode(text: &str, mode: u32) -> Result<Config, ConfigErrors> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        crate::config::load(&path)
    }

    const REF_SECRET: &str = "[[account]]\nname = \"a\"\ntoken_url = \"https://idp.example/t\"\n\
                              client_id = \"id\"\nclient_secret = { env = \"S\" }\n";

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
    fn plain_http_is_refused_off_loopback_unless_allowed() {
        let out = "[[account.output]]\npath = \"/x\"\n";
        let http = REF_SECRET.replace("https://idp.example", "http://idp.example") + out;
        let e = parse_str(&http, Path::new("/c.toml"))
            .unwrap_err()
            .0
            .remove(0);
        assert_eq!(
            (e.key.as_str(), e.line, e.column),
            ("account.a.token_url", 3, 13)
        );
        assert!(
            e.message.contains("in the clear") && e.message.contains("allow_http"),
            "{e}"
        );
        let allowed = http.replace("client_id", "allow_http = true\nclient_id");
        assert!(parse_str(&allowed, Path::new("/c.toml")).is_ok());
        for local in [
            "http://localhost:8080",
            "http://127.0.0.1:9",
            "http://[::1]:9",
        ] {
            let text = REF_SECRET.replace("https://idp.example", local) + out;
            assert!(parse_str(&text, Path::new("/c.toml")).is_ok(), "{local}");
        }
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

    #[test]
    fn cluster_section_is_checked_with_line_and_key() {
        let out = "[[account.output]]\npath = \"/x\"\n";
        let good = format!(
            "[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"/tokend/t\"\n\
             member = \"m1\"\nkey = \"{}\"\n\n{REF_SECRET}{out}",
            "ab".repeat(32)
        );
        let c = parse_str(&good, Path::new("/c.toml")).unwrap();
        let cl = c.cluster.as_ref().unwrap();
        assert_eq!(
            (cl.member.as_str(), cl.prefix.as_str()),
            ("m1", "/tokend/t")
        );
        assert_eq!(cl.lease_ttl, Duration::from_secs(10));
        assert!(c.accounts[0].cluster, "accounts take part by default");
        let opted_out = good.replace("client_id = \"id\"", "client_id = \"id\"\ncluster = false");
        assert!(
            !parse_str(&opted_out, Path::new("/c.toml"))
                .unwrap()
                .accounts[0]
                .cluster
        );
        assert!(
            !parse_str(&format!("{REF_SECRET}{out}"), Path::new("/c.toml"))
                .unwrap()
                .accounts[0]
                .cluster
        );

        let short_key = good.replace(&"ab".repeat(32), "abcd");
        let e = parse_str(&short_key, Path::new("/c.toml"))
            .unwrap_err()
            .0
            .remove(0);
        assert_eq!(
            (e.key.as_str(), e.line, e.column),
            ("cluster.key", 5, 7),
            "{e}"
        );
        assert!(e.message.contains("64 hex digits"), "{e}");
        assert!(!e.to_string().contains("abcd"), "the key is a secret: {e}");
        let bad = good
            .replace("http://127.0.0.1:2379", "etcd:2379")
            .replace("\"/tokend/t\"", "\"tokend\"")
            .replace(
                "member = \"m1\"\n",
                "member = \"m 1\"\nlease_ttl = \"1s\"\n",
            );
        let errs = parse_str(&bad, Path::new("/c.toml")).unwrap_err().0;
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "cluster.endpoints",
            "cluster.prefix",
            "cluster.member",
            "cluster.lease_ttl",
        ] {
            assert!(keys.contains(&k), "{k} in {keys:?}");
        }
    }

    const KEYED: &str = "[[account]]\nname = \"k\"\nfhir_base = \"https://ehr.example/fhir/R4\"\n\
                         client_id = \"id\"\nclient_auth = \"private_key_jwt\"\n\
                         private_key = { file = \"key.pem\" }\n";
    const OUT: &str = "[[account.output]]\npath = \"/x\"\n";

    #[test]
    fn accounts_share_equal_token_urls_and_options() {
        let acct = |name: &str, url: &str, extra: &str| {
            format!(
                "[[account]]\nname = \"{name}\"\ntoken_url = \"{url}\"\nclient_id = \"{name}\"\n\
                 client_secret = {{ env = \"S\" }}\n{extra}\n[[account.output]]\npath = \"/x/{name}\"\n"
            )
        };
        let text = [
            "[defaults]\ntimeout = \"10s\"\n".to_owned(),
            acct("a", "https://idp.example/t", ""),
            acct("b", "https://idp.example/t", "scope = \"other\""),
            acct("c", "https://other.example/t", "refresh_every = \"5m\""),
            acct("d", "https://other.example/t", "timeout = \"10s\""),
        ]
        .concat();
        let c = parse(&text).unwrap();
        let [a, b, cc, d] = &c.accounts[..] else {
            panic!("four accounts")
        };
        assert!(Arc::ptr_eq(&a.token_url, &b.token_url));
        assert!(Arc::ptr_eq(&cc.token_url, &d.token_url));
        assert!(!Arc::ptr_eq(&a.token_url, &cc.token_url));
        assert_eq!(a.options.timeout, Duration::from_secs(10));
        assert!(
            Arc::ptr_eq(&a.options, &b.options),
            "equal settings: one copy"
        );
        assert!(
            Arc::ptr_eq(&a.options, &d.options),
            "the same value, set twice"
        );
        assert!(!Arc::ptr_eq(&a.options, &cc.options));
        assert_eq!(
            cc.options.schedule.refresh_every,
            Some(Duration::from_secs(300))
        );
        assert_eq!(a.options.schedule.refresh_every, None);
    }

    #[test]
    fn exactly_one_of_token_url_issuer_and_fhir_base() {
        let c = parse(&format!("{KEYED}key_id = \"2026-11\"\n{OUT}")).unwrap();
        let a = &c.accounts[0];
        assert_eq!(
            *a.token_url,
            TokenUrl::FhirBase(url::Url::parse("https://ehr.example/fhir/R4").unwrap())
        );
        let asrt = a.assertion.as_ref().unwrap();
        assert_eq!(asrt.key_id.as_deref(), Some("2026-11"));
        assert_eq!(
            (asrt.alg, asrt.audience.as_deref(), asrt.lifetime),
            (None, None, Duration::from_secs(300))
        );
        assert_eq!(
            asrt.private_key,
            SecretSpec::File("/etc/tokend/key.pem".into())
        );
        let both = KEYED.replace("fhir_base", "issuer = \"https://idp.example\"\nfhir_base");
        let e = &errors(&format!("{both}{OUT}"))[0];
        assert_eq!(
            (e.key.as_str(), e.line, e.column),
            ("account.k.fhir_base", 4, 13),
            "{e}"
        );
        assert!(
            e.message
                .contains("exactly one of token_url, issuer and fhir_base"),
            "{e}"
        );
        let none = KEYED.replace("fhir_base = \"https://ehr.example/fhir/R4\"\n", "");
        let e = &errors(&format!("{none}{OUT}"))[0];
        assert!(
            e.message
                .contains("missing key \"token_url\" (or \"issuer\" or \"fhir_base\""),
            "{e}"
        );
        // An account's own issuer wins over a token_url in [defaults].
        let text = format!(
            "[defaults]\ntoken_url = \"https://idp.example/t\"\n{}{OUT}",
            KEYED.replace(
                "fhir_base = \"https://ehr.example/fhir/R4\"",
                "issuer = \"https://idp.example\""
            )
        );
        assert!(matches!(
            *parse(&text).unwrap().accounts[0].token_url,
            TokenUrl::Issuer(_)
        ));
        // The http:// rule and the discovery rules.
        for (value, want) in [
            ("issuer = \"http://idp.example\"", "in the clear"),
            (
                "issuer = \"https://idp.example?x=1\"",
                "no query or fragment",
            ),
            ("fhir_base = \"https://ehr.example/fhir#x\"", "no fragment"),
            ("fhir_base = \"ftp://ehr.example\"", "http:// or https://"),
        ] {
            let text = KEYED.replace("fhir_base = \"https://ehr.example/fhir/R4\"", value);
            let e = &errors(&format!("{text}{OUT}"))[0];
            assert_eq!(e.line, 3, "{e}");
            assert!(e.message.contains(want), "{want} in {e}");
        }
        let allowed = KEYED.replace(
            "fhir_base = \"https://ehr.example/fhir/R4\"",
            "issuer = \"http://idp.example\"\nallow_http = true",
        );
        assert!(parse(&format!("{allowed}{OUT}")).unwrap().accounts[0].allow_http);
    }

    #[test]
    fn client_auth_follows_the_credential_when_unset() {
        let key_only = KEYED.replace("client_auth = \"private_key_jwt\"\n", "");
        let c = parse(&format!("{key_only}{OUT}")).unwrap();
        assert_eq!(c.accounts[0].client_auth, ClientAuth::PrivateKeyJwt);
        let cert_only = format!(
            "[[account]]\nname = \"m\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\n\
             client_cert = {{ env = \"C\" }}\nclient_key = {{ env = \"K\" }}\n{OUT}"
        );
        let c = parse(&cert_only).unwrap();
        assert_eq!(c.accounts[0].client_auth, ClientAuth::TlsClientAuth);
        let both = cert_only.replace(
            "client_id = \"id\"",
            "client_id = \"id\"\nclient_secret = { env = \"S\" }",
        );
        assert_eq!(
            parse(&both).unwrap().accounts[0].client_auth,
            ClientAuth::Basic
        );
    }

    #[test]
    fn private_key_jwt_keys_are_checked_where_they_are_written() {
        for (extra, key, want) in [
            (
                "assertion_alg = \"HS256\"\n",
                "account.k.assertion_alg",
                "not one of RS256 | RS384 | ES256 | ES384",
            ),
            (
                "assertion_lifetime = \"6m\"\n",
                "account.k.assertion_lifetime",
                "at most 5m",
            ),
            ("key_id = \"\"\n", "account.k.key_id", "non-empty"),
            (
                "assertion_audience = \" \"\n",
                "account.k.assertion_audience",
                "must not be empty",
            ),
            (
                "client_secret = \"s\"\n",
                "account.k.client_secret",
                "signs with private_key and sends no secret",
            ),
        ] {
            let e = &errors(&format!("{KEYED}{extra}{OUT}"))[0];
            assert_eq!((e.key.as_str(), e.line), (key, 7), "{e}");
            assert!(e.message.contains(want), "{want} in {e}");
        }
        let e = &errors(&format!(
            "{}{OUT}",
            KEYED.replace("private_key = { file = \"key.pem\" }\n", "")
        ))[0];
        assert!(e.message.contains("missing key \"private_key\""), "{e}");
        // Keys of private_key_jwt with another client_auth are mistakes.
        let basic = KEYED.replace(
            "client_auth = \"private_key_jwt\"",
            "client_auth = \"post\"\nclient_secret = { env = \"S\" }",
        );
        let e = &errors(&format!("{basic}key_id = \"x\"\n{OUT}"))[0];
        assert!(
            e.message
                .contains("only used with client_auth = \"private_key_jwt\""),
            "{e}"
        );
        let c = parse(&format!(
            "{KEYED}assertion_alg = \"ES384\"\nassertion_audience = \"https://ehr.example\"\nassertion_lifetime = \"1m\"\n{OUT}"
        ))
        .unwrap();
        let asrt = c.accounts[0].assertion.clone().unwrap();
        assert_eq!(asrt.alg, Some(AssertionAlg::Es384));
        assert_eq!(asrt.audience.as_deref(), Some("https://ehr.example"));
        assert_eq!(asrt.lifetime, Duration::from_secs(60));
    }

    #[test]
    fn tls_client_auth_needs_a_certificate_and_its_key() {
        let mtls = "[[account]]\nname = \"m\"\ntoken_url = \"https://idp.example/t\"\n\
                    client_id = \"id\"\nclient_auth = \"tls_client_auth\"\n";
        let e = &errors(&format!("{mtls}{OUT}"))[0];
        assert!(
            e.message
                .contains("missing key \"client_cert\" and \"client_key\""),
            "{e}"
        );
        let e = &errors(&format!(
            "{mtls}client_cert = {{ file = \"c.pem\" }}\n{OUT}"
        ))[0];
        assert_eq!(
            (e.key.as_str(), e.line),
            ("account.m.client_cert", 6),
            "{e}"
        );
        assert!(e.message.contains("needs \"client_key\""), "{e}");
        let c = parse(&format!(
            "{mtls}client_cert = \"-----BEGIN CERTIFICATE-----\"\nclient_key = {{ credential = \"m-key\" }}\n{OUT}"
        ))
        .unwrap();
        let cc = c.accounts[0].client_cert.clone().unwrap();
        assert_eq!(cc.key, SecretSpec::Credential("m-key".into()));
        // An inline certificate is no secret; an inline key is.
        let cert = include_str!("../../tests/keys/p256-cert.pem");
        let text = format!(
            "{mtls}client_cert = \"\"\"\n{cert}\"\"\"\nclient_key = {{ env = \"K\" }}\n{OUT}"
        );
        assert!(load_with_mode(&text, 0o644).is_ok());
        let text = format!(
            "{mtls}client_cert = {{ env = \"C\" }}\nclient_key = \"-----BEGIN PRIVATE KEY-----\"\n{OUT}"
        );
        let e = load_with_mode(&text, 0o644).unwrap_err().0.remove(0);
        assert_eq!(e.key, "account.m.client_key");
        // A client certificate may go with any client_auth (a gateway that wants one).
        let basic = format!(
            "{}client_secret = {{ env = \"S\" }}\nclient_cert = {{ env = \"C\" }}\nclient_key = {{ env = \"K\" }}\n{OUT}",
            mtls.replace("client_auth = \"tls_client_auth\"\n", "")
        );
        assert!(parse(&basic).unwrap().accounts[0].client_cert.is_some());
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

    #[test]
    fn a_private_key_must_parse_fit_its_algorithm_and_be_tokend_s_alone() {
        use crate::config::keys::tests::{P256_SEC1, RSA_PKCS1};
        let text = format!("{KEYED}{OUT}");
        assert!(load_in(&text, &[("key.pem", P256_SEC1, 0o600)], false).is_ok());
        assert!(
            load_in(&text, &[], false).is_ok(),
            "a missing key is left to check and to the request"
        );
        let e = load_in(&text, &[("key.pem", P256_SEC1, 0o640)], false)
            .unwrap_err()
            .0
            .remove(0);
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
        let e = load_in(&text, &[("key.pem", "junk", 0o600)], false)
            .unwrap_err()
            .0
            .remove(0);
        assert_eq!(e.key, "account.k.private_key");
        assert!(
            e.message.contains("key.pem holds no PEM private key"),
            "{e}"
        );
        let wrong = format!("{KEYED}assertion_alg = \"ES384\"\n{OUT}");
        let e = load_in(&wrong, &[("key.pem", P256_SEC1, 0o600)], false)
            .unwrap_err()
            .0
            .remove(0);
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
        let e = load_in(&text, &files(expired), true)
            .unwrap_err()
            .0
            .remove(0);
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
        let e = load_in(&text, &files(other), true).unwrap_err().0.remove(0);
        assert!(e.message.contains("is not for the key in file"), "{e}");
        let e = load_in(&text, &files("no cert"), false)
            .unwrap_err()
            .0
            .remove(0);
        assert!(e.message.contains("holds no PEM certificate"), "{e}");
        let open_key = [("c.pem", good, 0o644), ("k.pem", P256_SEC1, 0o604)];
        let e = load_in(&text, &open_key, false).unwrap_err().0.remove(0);
        assert_eq!(e.key, "account.m.client_key");
    }

    #[test]
    fn debug_shows_no_private_key_client_key_or_assertion() {
        use crate::config::keys::tests::{P256_SEC1, RSA_PKCS8};
        let text = format!(
            "[[account]]\nname = \"k\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\n\
             client_auth = \"private_key_jwt\"\nprivate_key = \"\"\"\n{RSA_PKCS8}\"\"\"\n\
             client_cert = {{ env = \"C\" }}\nclient_key = \"\"\"\n{P256_SEC1}\"\"\"\n{OUT}"
        );
        let c = parse(&text).unwrap();
        let a = &c.accounts[0];
        let pem = |p: &str| Secret::new(p.trim_end());
        let jws = crate::oauth::assertion::client_assertion(
            a,
            &pem(RSA_PKCS8),
            a.token_url.configured(),
            std::time::SystemTime::now(),
        )
        .unwrap();
        let creds = crate::oauth::request::Credentials {
            private_key: Some(pem(RSA_PKCS8)),
            client_assertion: Some(jws.clone()),
            ..Default::default()
        };
        let req = crate::oauth::request::build(a, a.token_url.configured(), &creds);
        assert!(req.body.contains(
            &form_urlencoded::byte_serialize(jws.expose().as_bytes()).collect::<String>()
        ));
        let key = crate::config::keys::PrivateKey::from_pem(&pem(RSA_PKCS8)).unwrap();
        let all = format!(
            "{c:?} {a:?} {:?} {creds:?} {req:?} {key:?} {jws:?}",
            a.secrets()
        );
        for pem in [RSA_PKCS8, P256_SEC1] {
            for line in pem.lines().filter(|l| !l.starts_with("-----")) {
                assert!(!all.contains(line), "{line} in {all}");
            }
        }
        assert!(!all.contains(&jws.expose()[..40]), "the assertion in {all}");
    }
}
