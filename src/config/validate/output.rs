//! An account's `[[account.output]]`s: path, format (and its `env_var`), mode, owner and
//! group; and the outputs compared across accounts as spelled ([`Spelled`]), with `.`
//! and `..` resolved by [`normalized`].
//!
//! Nothing here looks at the file system: `files` compares the outputs again as it
//! resolves them (symbolic links), and `output` (the crate's layer) writes them.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::{At, Ctx, Key};
use crate::config::raw::{RawAccount, RawOutput, S};
use crate::config::{Account, Format, Output};

/// An output's `format`, before `env_var` is looked at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FormatKind {
    Raw,
    Json,
    Env,
    Header,
    Directory,
}

/// The `[[account.output]]`s; an account must have one, or a socket must serve it.
pub(super) fn outputs(cx: &mut Ctx<'_>, at: &At<'_>, name: &str, has_socket: bool) -> Vec<Output> {
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

/// One `[[account.output]]`; `account` names the default `env_var`.
fn output(cx: &mut Ctx<'_>, label: &str, o: &S<RawOutput>, account: &str) -> Option<Output> {
    let k = |key: &'static str| Key::new(label, key);
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
        k("format"),
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
        Some(m) => cx.mode(m, k("mode")),
        None => Some(0o600),
    };
    let owner = raw.owner.as_ref().and_then(|u| cx.user(u, k("owner")));
    let group = raw.group.as_ref().and_then(|g| cx.group(g, k("group")));
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

/// Where each of an account's outputs has its path written (the output itself when it
/// has none).
pub(super) fn path_spans(raw: &RawAccount) -> Vec<Range<usize>> {
    raw.output
        .iter()
        .flatten()
        .map(|o| o.get_ref().path.as_ref().map_or(o.span(), |p| p.span()))
        .collect()
}

/// The outputs of all accounts so far, compared as spelled (`.` and `..` resolved, not
/// through the file system): no two are one file, and none is inside `state_dir`.
pub(super) struct Spelled {
    /// The state directory, as outputs are compared with it.
    state_dir: Option<PathBuf>,
    /// Each output path, and the account and place that first named it.
    seen: HashMap<PathBuf, String>,
}

impl Spelled {
    pub(super) fn new(state_dir: Option<&Path>) -> Self {
        Spelled {
            state_dir: state_dir.map(normalized),
            seen: HashMap::new(),
        }
    }

    /// Checks the outputs of `account` (an account that validated has one per
    /// `[[account.output]]`, whose paths are written at `spans`), and keeps each new
    /// one, with where it is written, for the file checks.
    pub(super) fn check(
        &mut self,
        cx: &mut Ctx<'_>,
        label: &str,
        account: &Account,
        spans: Vec<Range<usize>>,
    ) {
        for (i, (o, at)) in account.outputs.iter().zip(spans).enumerate() {
            let key = format!("{label}.output[{}].path", i + 1);
            let resolved = normalized(&o.path);
            if let Some(dir) = self.state_dir.as_ref().filter(|d| resolved.starts_with(d)) {
                let message = format!(
                    "{} is inside state_dir {}: tokend keeps the refresh-token chains and saved state there, which an output must never replace",
                    o.path.display(),
                    dir.display()
                );
                cx.err(at.clone(), key.clone(), message);
            }
            if let Some(first) = self.seen.get(&resolved) {
                let message = format!(
                    "{} is already the output of account {first}",
                    o.path.display()
                );
                cx.err(at, key, message);
            } else {
                let (line, _) = cx.lines.line_col(cx.text, at.start);
                cx.outputs
                    .push((o.path.clone(), cx.locate(at, key, String::new())));
                self.seen
                    .insert(resolved, format!("{:?} (line {line})", account.name));
            }
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

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, parse, MINIMAL};
    use super::*;

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
    fn formats_take_an_env_var_only_where_they_write_one() {
        let out = |o: &str| MINIMAL.replace("path = \"/run/tokend/tokens/msk\"", o);
        let c = parse(&out("path = \"/d\"\nformat = \"directory\"")).unwrap();
        assert_eq!(
            c.accounts[0].outputs[0].format,
            Format::Directory {
                var: "MSK_TOKEN".into()
            }
        );
        let c = parse(&out("path = \"/h\"\nformat = \"header\"\nmode = \"0644\"")).unwrap();
        assert_eq!(
            (
                &c.accounts[0].outputs[0].format,
                c.accounts[0].outputs[0].mode
            ),
            (&Format::Header, 0o644)
        );
        for (o, key, want) in [
            (
                "path = \"/j\"\nformat = \"json\"\nenv_var = \"X\"",
                "account.msk.output[1].env_var",
                "only used with format = \"env\" or \"directory\"",
            ),
            (
                "path = \"/e\"\nformat = \"env\"\nenv_var = \"1X\"",
                "account.msk.output[1].env_var",
                "\"1X\" is not a shell variable name",
            ),
            (
                "path = \"/d/\"",
                "account.msk.output[1].path",
                "expected a file path",
            ),
            (
                "format = \"raw\"",
                "account.msk.output[1]",
                "missing key \"path\"",
            ),
        ] {
            let e = &errors(&out(o))[0];
            assert_eq!((e.key.as_str(), e.message.as_str()), (key, want), "{o}");
        }
        let none = MINIMAL.replace(
            "[[account.output]]\npath = \"/run/tokend/tokens/msk\"\n",
            "",
        );
        let e = &errors(&none)[0];
        assert!(e.message.contains("the token would go nowhere"), "{e}");
        assert!(parse(&format!("[daemon]\nsocket = \"/s\"\n{none}")).is_ok());
        assert_eq!(default_env_var("9lives"), "_9LIVES_TOKEN");
    }
}
