//! The TOML text into raw sections, recovering from every mistake so that all of them
//! are reported at once: syntax errors (located, never quoting the line: it may hold a
//! secret), unknown keys with a did-you-mean, values of the wrong type (reported, then
//! dropped), and the line and column of any byte offset.
//!
//! Nothing here knows what a key means or checks a value beyond its TOML type: the
//! section files (`daemon`, `cluster`, `account`, ...) do.

use std::ops::Range;

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::Ctx;
use crate::config::raw::{
    field_names, RawAccess, RawAccount, RawCluster, RawDaemon, RawOutput, RawSignal,
};

/// Where each line of a text starts, so that locating an offset costs a binary search
/// and not a scan from the top (issue #11: with one scan per account and per error,
/// validating 10,000 accounts took time in the square of the file's size).
pub(super) struct Lines(Vec<usize>);

impl Lines {
    pub(super) fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines(starts)
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub(super) fn line_col(&self, text: &str, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.0.partition_point(|&start| start <= offset);
        let start = self.0[line - 1];
        (line, text[start..offset].chars().count() + 1)
    }
}

/// One `[[account]]` as written: its label (`account.msk`), its keys, and where it is.
pub(super) type RawEntry = (String, RawAccount, Range<usize>);

/// The file's sections, each with its unknown keys and mistyped values reported and left
/// out; a section that is absent is empty.
pub(super) struct Sections {
    pub(super) daemon: RawDaemon,
    pub(super) cluster: Option<RawCluster>,
    pub(super) defaults: RawAccount,
    pub(super) accounts: Vec<RawEntry>,
}

/// Reads the text into its sections; None after syntax errors (reported in `cx`, and
/// nothing else is looked at).
pub(super) fn sections(cx: &mut Ctx<'_>) -> Option<Sections> {
    let (root, syntax) = DeTable::parse_recoverable(cx.text);
    if !syntax.is_empty() {
        for e in syntax {
            // Only the message and the span: toml's Display quotes the source line,
            // which may hold a secret.
            let span = e.span().unwrap_or(0..0);
            cx.err(span, "", e.message().to_owned());
        }
        return None;
    }
    let root = root.into_inner();

    let mut daemon = None;
    let mut cluster = None;
    let mut defaults = None;
    let mut accounts = Vec::new();
    // Taken apart as it is read: each section's table is deserialized from itself.
    for (key, value) in root {
        match key.get_ref().as_ref() {
            "daemon" => daemon = section::<RawDaemon>(cx, value, "daemon"),
            "cluster" => cluster = section::<RawCluster>(cx, value, "cluster"),
            "defaults" => defaults = section::<RawAccount>(cx, value, "defaults"),
            "account" => {
                let span = value.span();
                match value.into_inner() {
                    DeValue::Array(items) => {
                        for (i, item) in items.into_iter().enumerate() {
                            let label = account_label(&item, i);
                            let at = item.span();
                            if let Some(a) = section::<RawAccount>(cx, item, &label) {
                                accounts.push((label, a, at));
                            }
                        }
                    }
                    _ => cx.err(span, "account", "accounts are written [[account]]"),
                }
            }
            other => cx.err(
                key.span(),
                other,
                "unknown key (expected [daemon], [cluster], [defaults] or [[account]])",
            ),
        }
    }
    Some(Sections {
        daemon: daemon.unwrap_or_default(),
        cluster,
        defaults: defaults.unwrap_or_default(),
        accounts,
    })
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
    value: toml::Spanned<DeValue<'de>>,
    label: &str,
) -> Option<T> {
    let span = value.span();
    let DeValue::Table(mut table) = value.into_inner() else {
        cx.err(span, label, "expected a table");
        return None;
    };
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
            span.clone(),
            DeValue::Table(table.clone()),
        ));
        match T::deserialize(de) {
            Ok(v) => return Some(v),
            Err(e) => {
                let at = e.span().unwrap_or(span.clone());
                let key =
                    key_at(cx.text, at.start).map_or(label.to_owned(), |k| format!("{label}.{k}"));
                cx.err(at.clone(), key.clone(), e.message().to_owned());
                cx.dropped.push(key);
                if !remove_at(&mut table, at.start) {
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

/// Reports (and removes) every key of `table` that is not one of `known`, with the
/// nearest known key when it is at most two edits away.
fn prune_unknown(cx: &mut Ctx<'_>, table: &mut DeTable<'_>, known: &[&str], label: &str) {
    let unknown: Vec<_> = table
        .keys()
        .filter(|k| !known.contains(&k.get_ref().as_ref()))
        .cloned()
        .collect();
    for key in unknown {
        let suggestion = did_you_mean(known, key.get_ref())
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

/// The first of `known` nearest to `key` (Levenshtein distance), if at most 2 edits away.
fn did_you_mean<'k>(known: &[&'k str], key: &str) -> Option<&'k str> {
    known
        .iter()
        .copied()
        .min_by_key(|k| strsim::levenshtein(k, key))
        .filter(|k| strsim::levenshtein(k, key) <= 2)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, MINIMAL};
    use super::*;

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
    fn every_mistyped_value_of_every_section_is_reported_once() {
        // Three type errors in one account (three rounds of the recovery), one in the
        // next, one in [daemon], and an unknown key: each reported once, at its key.
        let text = format!(
            "[daemon]\nstartup_timeout = 5\n\n{}\n{}",
            MINIMAL
                .replace(
                    "client_id = \"id\"",
                    "client_id = 5\nscope = []\ntimeout = true"
                )
                .replace("name = \"msk\"", "name = \"msk\"\nscoep = \"x\""),
            MINIMAL
                .replace("\"msk\"", "\"other\"")
                .replace("/msk", "/other")
                .replace("client_id = \"id\"", "client_id = [1]"),
        );
        let mut keys: Vec<String> = errors(&text).into_iter().map(|e| e.key).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "account.msk.client_id",
                "account.msk.scoep",
                "account.msk.scope",
                "account.msk.timeout",
                "account.other.client_id",
                "daemon.startup_timeout",
            ]
        );
        // A list of accounts that is not an array of tables.
        let e = &errors("account = 5\n")[0];
        assert_eq!((e.key.as_str(), e.line), ("account", 1));
    }

    /// The hand-written distance that `strsim` replaced, kept to show they agree.
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

    /// Every known key of a section, and its typos: one or two characters dropped,
    /// doubled, swapped or changed, and the other keys.
    fn typos(known: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = known.iter().map(|k| k.to_string()).collect();
        for k in known {
            let c: Vec<char> = k.chars().collect();
            for i in 0..c.len() {
                let mut v = c.clone();
                v.remove(i);
                out.push(v.iter().collect());
                let mut v = c.clone();
                v.insert(i, c[i]);
                out.push(v.iter().collect());
                let mut v = c.clone();
                v[i] = 'x';
                out.push(v.iter().collect());
                if i + 1 < c.len() {
                    let mut v = c.clone();
                    v.swap(i, i + 1);
                    out.push(v.iter().collect());
                    let mut v = c.clone();
                    v.drain(i..i + 2);
                    out.push(v.iter().collect());
                }
            }
            out.push(format!("{k}_é"));
        }
        out
    }

    #[test]
    fn did_you_mean_is_what_the_hand_written_distance_gave() {
        let mut suggested = 0;
        for known in [
            field_names::<RawDaemon>(),
            field_names::<RawCluster>(),
            field_names::<RawAccount>(),
            field_names::<RawOutput>(),
            field_names::<RawAccess>(),
            field_names::<RawSignal>(),
        ] {
            for key in typos(known) {
                for k in known {
                    assert_eq!(
                        strsim::levenshtein(k, &key),
                        edit_distance(k, &key),
                        "{k} {key}"
                    );
                }
                let before = known
                    .iter()
                    .copied()
                    .min_by_key(|k| edit_distance(k, &key))
                    .filter(|k| edit_distance(k, &key) <= 2);
                assert_eq!(did_you_mean(known, &key), before, "{key}");
                suggested += usize::from(before.is_some());
            }
        }
        assert!(suggested > 1000, "{suggested}");
        assert_eq!(did_you_mean(&["scope", "scopes"], "scoop"), Some("scope"));
        assert_eq!(did_you_mean(&["token_url"], "tokenurl"), Some("token_url"));
        assert_eq!(did_you_mean(&["token_url"], "url"), None);
    }

    #[test]
    fn unknown_keys_of_every_table_are_named_with_the_nearest_known_one() {
        let text = MINIMAL
            .replace("client_id", "clientid")
            .replace(
                "[[account.output]]",
                "access = { user = [] }\non_refresh_signal = { pid_file = \"/p\", signl = \"HUP\" }\n[[account.output]]",
            )
            + "colour = 1\n";
        let got: Vec<(String, String)> = errors(&text)
            .into_iter()
            .map(|e| (e.key, e.message))
            .collect();
        for (key, message) in [
            (
                "account.msk.clientid",
                "unknown key \"clientid\"; did you mean \"client_id\"?",
            ),
            (
                "account.msk.access.user",
                "unknown key \"user\"; did you mean \"users\"?",
            ),
            (
                "account.msk.on_refresh_signal.signl",
                "unknown key \"signl\"; did you mean \"signal\"?",
            ),
            ("account.msk.output[1].colour", "unknown key \"colour\""),
        ] {
            assert!(
                got.iter().any(|(k, m)| k == key && m.starts_with(message)),
                "{key}: {message} in {got:#?}"
            );
        }
    }
}
