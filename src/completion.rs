//! Shell completion: clap_complete's dynamic engine. The installed scripts (bash, zsh,
//! fish; `cargo xtask dist` writes them) call `TOKEND_COMPLETE=SHELL tokend -- WORDS...`,
//! and `main` answers from the clap definitions before anything else runs: subcommands,
//! options, and, through [`account_names`], the accounts of the config.
//!
//! What does not live here: the command line itself (`cli`), and the scripts (the xtask
//! crate). Nothing here validates a config or reads a secret: completing must be quick and
//! quiet, whoever asks and whatever the file holds.

use std::ffi::OsString;
use std::path::PathBuf;

use clap_complete::engine::CompletionCandidate;

use crate::config::DEFAULT_PATH;

/// The environment variable that turns `tokend` into its own completer. Not clap's
/// default `COMPLETE`, which a daemon's environment could hold for other reasons.
pub const VAR: &str = "TOKEND_COMPLETE";

/// The `[[account]] name`s of the config the command line being completed names (`-c`,
/// `--config`, else `TOKEND_CONFIG`, else the default path). None when the file cannot
/// be read or parsed: completion offers nothing rather than an error.
pub fn account_names() -> Vec<CompletionCandidate> {
    let path = config_path(std::env::args_os().collect());
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    names(&text)
        .into_iter()
        .map(CompletionCandidate::new)
        .collect()
}

/// The config path: `args` are the completer's own (`tokend -- tokend get -c FILE ...`);
/// the words after `--` are the line being completed.
fn config_path(args: Vec<OsString>) -> PathBuf {
    let words = match args.iter().position(|a| a == "--") {
        Some(i) => &args[i + 1..],
        None => &args[..],
    };
    let mut found = None;
    let mut words = words.iter();
    while let Some(w) = words.next() {
        let w = w.to_string_lossy();
        if w == "-c" || w == "--config" {
            found = words.next().map(PathBuf::from);
        } else if let Some(p) = w.strip_prefix("--config=") {
            found = Some(PathBuf::from(p));
        } else if let Some(p) = w.strip_prefix("-c").filter(|p| !p.is_empty()) {
            found = Some(PathBuf::from(p));
        }
    }
    found
        .or_else(|| std::env::var_os("TOKEND_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

/// The names of `[[account]]` tables, in order, as plain TOML (no validation).
fn names(text: &str) -> Vec<String> {
    let Ok(table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let Some(accounts) = table.get("account").and_then(|a| a.as_array()) else {
        return Vec::new();
    };
    accounts
        .iter()
        .filter_map(|a| a.get("name")?.as_str().map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(words: &[&str]) -> PathBuf {
        config_path(words.iter().map(OsString::from).collect())
    }

    #[test]
    fn config_path_is_read_from_the_line_being_completed() {
        assert_eq!(
            path(&["tokend", "--", "tokend", "get", "-c", "a.toml", ""]),
            PathBuf::from("a.toml")
        );
        assert_eq!(
            path(&["tokend", "--", "tokend", "--config=b.toml", "get"]),
            PathBuf::from("b.toml")
        );
        assert_eq!(
            path(&["tokend", "--", "tokend", "once", "-cc.toml"]),
            PathBuf::from("c.toml")
        );
    }

    #[test]
    fn names_are_the_accounts_in_order() {
        let text = "[daemon]\nsocket = \"x\"\n[[account]]\nname = \"msk\"\n[[account.output]]\npath = \"p\"\n\
                    [[account]]\nname = 'cibmtr'\n[[account]]\ntoken_url = \"no name\"\n";
        assert_eq!(names(text), ["msk", "cibmtr"]);
        assert!(names("not = [toml").is_empty());
    }
}
