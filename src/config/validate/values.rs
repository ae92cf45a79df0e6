//! The kinds of value every section writes, read the same way everywhere: durations,
//! choices among names, file modes, secrets (inline, file, env, credential) and users
//! and groups (a name, looked up through the parse's [`Host`](super::Host), or an id).
//!
//! Nothing here knows which key holds which kind: the section files do.

use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;

use super::{Ctx, Key};
use crate::config::raw::S;
use crate::config::secret::{SecretSource, SecretSpec};

impl Ctx<'_> {
    pub(super) fn duration<'k>(
        &mut self,
        v: &Option<S<String>>,
        key: impl Into<Key<'k>>,
        default: Duration,
    ) -> Duration {
        self.opt_duration(v, key).unwrap_or(default)
    }

    pub(super) fn opt_duration<'k>(
        &mut self,
        v: &Option<S<String>>,
        key: impl Into<Key<'k>>,
    ) -> Option<Duration> {
        let key: Key<'k> = key.into();
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

    pub(super) fn choice<'k, T: Copy>(
        &mut self,
        v: &Option<S<String>>,
        key: impl Into<Key<'k>>,
        options: &[(&str, T)],
        default: T,
    ) -> T {
        let key: Key<'k> = key.into();
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
    pub(super) fn mode<'k>(&mut self, v: &S<toml::Value>, key: impl Into<Key<'k>>) -> Option<u32> {
        let key: Key<'k> = key.into();
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

    /// A secret: inline (noted as an inline secret), file, env or credential.
    pub(super) fn secret<'k>(
        &mut self,
        v: &S<toml::Value>,
        key: impl Into<Key<'k>>,
    ) -> Option<SecretSpec> {
        self.source(v, key, true)
    }

    /// A value read like a secret (inline, file, env, credential); an inline one counts
    /// as an inline secret if `secret`.
    pub(super) fn source<'k>(
        &mut self,
        v: &S<toml::Value>,
        key: impl Into<Key<'k>>,
        secret: bool,
    ) -> Option<SecretSpec> {
        let key: Key<'k> = key.into();
        let parsed = SecretSource::deserialize(v.get_ref().clone())
            .map_err(|_| {
                "expected a string or one of { file = \"...\" }, { env = \"...\" }, { credential = \"...\" }"
                    .to_owned()
            })
            .and_then(|s| s.to_spec(&self.base));
        match parsed {
            Ok(spec) => {
                if secret && spec.is_inline() {
                    self.inline_secret(v.span(), key);
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
    pub(super) fn inline_secret(&mut self, span: Range<usize>, key: impl Into<String>) {
        let e = self.locate(span, key, String::new());
        self.inline_secrets.push(e);
    }

    /// A user: a name (looked up through the host) or a numeric id.
    pub(super) fn user<'k>(&mut self, v: &S<toml::Value>, key: impl Into<Key<'k>>) -> Option<u32> {
        let host = self.host;
        self.principal(v, key, "user", |n| host.uid(n))
    }

    /// A group: a name (looked up through the host) or a numeric id.
    pub(super) fn group<'k>(&mut self, v: &S<toml::Value>, key: impl Into<Key<'k>>) -> Option<u32> {
        let host = self.host;
        self.principal(v, key, "group", |n| host.gid(n))
    }

    fn principal<'k>(
        &mut self,
        v: &S<toml::Value>,
        key: impl Into<Key<'k>>,
        what: &str,
        lookup: impl Fn(&str) -> Option<u32>,
    ) -> Option<u32> {
        let key: Key<'k> = key.into();
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

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, parse, MINIMAL};
    use crate::config::{Secret, SecretSpec};

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
}
