//! Secrets: where they come from (inline, file, environment, systemd credential) and the
//! `Secret` wrapper that never shows its value in `Debug` or `Display`.
//!
//! Reading happens here and only here, so every read error names the source (path,
//! variable, credential) and never the value.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A secret value. `Debug` and `Display` print `<redacted>`; the value is reachable only
/// through [`Secret::expose`], which makes every use visible in review. Its memory is
/// zeroed when it is dropped.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl zeroize::Zeroize for Secret {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(self);
    }
}

impl zeroize::ZeroizeOnDrop for Secret {}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a secret is read from, as written in the config.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SecretSource {
    Inline(Secret),
    Ref(SecretRef),
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    file: Option<PathBuf>,
    env: Option<String>,
    credential: Option<String>,
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// A validated secret source.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum SecretSpec {
    Inline(Secret),
    File(PathBuf),
    Env(String),
    Credential(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("failed to read secret file {path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("environment variable {0} is not set or not valid UTF-8")]
    Env(String),
    #[error("credential {name} needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=), which is not set; outside the unit, `tokend check --credentials-dir DIR` reads credentials from DIR")]
    NoCredentialsDirectory { name: String },
    #[error("secret from {0} is empty")]
    Empty(String),
    #[error("secret from {0} is not valid UTF-8")]
    NotUtf8(String),
}

impl SecretSource {
    /// Turns the raw form into a spec; `base` resolves relative file paths.
    pub(crate) fn to_spec(&self, base: &Path) -> Result<SecretSpec, String> {
        match self {
            SecretSource::Inline(s) => Ok(SecretSpec::Inline(s.clone())),
            SecretSource::Ref(r) => match (&r.file, &r.env, &r.credential) {
                (Some(f), None, None) => Ok(SecretSpec::File(base.join(f))),
                (None, Some(e), None) if !e.is_empty() => Ok(SecretSpec::Env(e.clone())),
                (None, None, Some(c)) if valid_credential_name(c) => {
                    Ok(SecretSpec::Credential(c.clone()))
                }
                (None, None, Some(_)) => {
                    Err("a credential name is a file name: no '/', not empty".into())
                }
                _ => Err(
                    "expected a string or exactly one of { file = \"...\" }, { env = \"...\" }, { credential = \"...\" }"
                        .into(),
                ),
            },
        }
    }
}

fn valid_credential_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline(<redacted>)"),
            SecretSource::Ref(r) => r.fmt(f),
        }
    }
}

impl SecretSpec {
    pub fn is_inline(&self) -> bool {
        matches!(self, SecretSpec::Inline(_))
    }

    /// The file this secret is read from, if any (watched for changes by the daemon).
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            SecretSpec::File(p) => Some(p.clone()),
            SecretSpec::Credential(name) => credentials_dir().map(|d| d.join(name)),
            _ => None,
        }
    }

    /// Where the secret comes from, for messages: never the value.
    pub fn describe(&self) -> String {
        match self {
            SecretSpec::Inline(_) => "the inline value".into(),
            SecretSpec::File(p) => format!("file {}", p.display()),
            SecretSpec::Env(v) => format!("environment variable {v}"),
            SecretSpec::Credential(c) => format!("credential {c}"),
        }
    }

    /// Reads the secret now. A single trailing newline (as `echo` writes) is dropped.
    pub fn read(&self) -> Result<Secret, SecretError> {
        let value = match self {
            SecretSpec::Inline(s) => return Ok(s.clone()),
            SecretSpec::File(path) => read_file(path)?,
            SecretSpec::Env(var) => zeroize::Zeroizing::new(
                std::env::var(var).map_err(|_| SecretError::Env(var.clone()))?,
            ),
            SecretSpec::Credential(name) => {
                let dir = credentials_dir()
                    .ok_or_else(|| SecretError::NoCredentialsDirectory { name: name.clone() })?;
                read_file(&dir.join(name))?
            }
        };
        let trimmed = value
            .strip_suffix("\r\n")
            .or_else(|| value.strip_suffix('\n'))
            .unwrap_or(&value);
        if trimmed.is_empty() {
            return Err(SecretError::Empty(self.describe()));
        }
        Ok(Secret(trimmed.to_owned()))
    }
}

/// Secrets read for one pass over many accounts (the daemon's look at every account's
/// secret files after an event): a file that several accounts name is read once, and
/// every account in the pass sees the same contents. The values are dropped, and
/// zeroed, with it.
#[derive(Default)]
pub struct SecretReads {
    files: std::collections::HashMap<PathBuf, Option<Secret>>,
}

impl SecretReads {
    /// [`SecretSpec::read`], or what it read for the same file earlier in this pass;
    /// `None` when it cannot be read.
    pub fn read(&mut self, spec: &SecretSpec) -> Option<Secret> {
        match spec.path() {
            Some(path) => self
                .files
                .entry(path)
                .or_insert_with(|| spec.read().ok())
                .clone(),
            None => spec.read().ok(),
        }
    }
}

fn credentials_dir() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
}

fn read_file(path: &Path) -> Result<zeroize::Zeroizing<String>, SecretError> {
    let bytes =
        zeroize::Zeroizing::new(std::fs::read(path).map_err(|source| SecretError::File {
            path: path.to_owned(),
            source,
        })?);
    match std::str::from_utf8(&bytes) {
        Ok(s) => Ok(zeroize::Zeroizing::new(s.to_owned())),
        Err(_) => Err(SecretError::NotUtf8(format!("file {}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_reads_each_secret_file_once_and_the_next_pass_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "first\n").unwrap();
        let spec = SecretSpec::File(path.clone());
        let value = |s: Option<Secret>| s.map(|s| s.expose().to_owned());
        let mut pass = SecretReads::default();
        assert_eq!(value(pass.read(&spec)).as_deref(), Some("first"));
        // Changed within the pass: every account of the pass sees what the first read.
        std::fs::write(&path, "second\n").unwrap();
        assert_eq!(value(pass.read(&spec.clone())).as_deref(), Some("first"));
        assert_eq!(pass.files.len(), 1);
        // The next pass reads it again.
        let mut next = SecretReads::default();
        assert_eq!(value(next.read(&spec)).as_deref(), Some("second"));
        // Unreadable: None, remembered for the pass like a value.
        let missing = SecretSpec::File(dir.path().join("missing"));
        assert!(next.read(&missing).is_none());
        std::fs::write(dir.path().join("missing"), "late").unwrap();
        assert!(next.read(&missing).is_none());
        assert_eq!(
            value(SecretReads::default().read(&missing)).as_deref(),
            Some("late")
        );
        // Not a file: read each time, nothing kept.
        let inline = SecretSpec::Inline(Secret::new("inline"));
        assert_eq!(value(next.read(&inline)).as_deref(), Some("inline"));
        assert_eq!(next.files.len(), 2);
    }

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{s}"), "<redacted>");
        let spec = SecretSpec::Inline(s);
        assert!(!format!("{spec:?}").contains("hunter2"));
    }

    #[test]
    fn secrets_are_zeroed() {
        fn zeroed_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroed_on_drop::<Secret>();
        let mut s = Secret::new("hunter2");
        let ptr = s.0.as_ptr();
        let len = s.0.len();
        zeroize::Zeroize::zeroize(&mut s);
        // The same allocation, still owned by `s`: its bytes are zero now.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
        assert!(bytes.iter().all(|b| *b == 0), "{bytes:?}");
        assert_eq!(s.expose(), "");
    }

    #[test]
    fn file_secret_drops_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "abc\n").unwrap();
        assert_eq!(
            SecretSpec::File(path.clone()).read().unwrap().expose(),
            "abc"
        );
        std::fs::write(&path, "\n").unwrap();
        let err = SecretSpec::File(path).read().unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = SecretSpec::File("/nonexistent/tokend-secret".into())
            .read()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/tokend-secret"));
    }
}
