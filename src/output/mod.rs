//! Token outputs: what goes into a file (`render`, pure) and how it gets there
//! (`atomic`, the one place in the daemon that writes token files).

pub mod atomic;
pub mod render;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::config::{Account, Format, OnExpiry};
use crate::oauth::Token;

/// Writes every output of `account` with `token`; each file is either the old or the
/// new version, never a mix. An output that fails (a full disk, a token that cannot be
/// an env file) does not stop the others; the first failure is returned, naming its path.
pub fn write_all(account: &Account, token: &Token) -> std::io::Result<()> {
    let mut first = None;
    for out in &account.outputs {
        let written = match &out.format {
            Format::Directory { var } => render::files(var, &account.name, token)
                .map_err(std::io::Error::other)
                .and_then(|files| {
                    let files: Vec<(&str, &[u8])> = files
                        .iter()
                        .map(|(n, c)| (*n, c.expose().as_bytes()))
                        .collect();
                    atomic::write_dir(&out.path, &files, out.mode, out.owner, out.group)
                }),
            format => render::render(format, &account.name, token)
                .map_err(std::io::Error::other)
                .and_then(|content| {
                    let bytes = content.expose().as_bytes();
                    atomic::write(&out.path, bytes, out.mode, out.owner, out.group)
                }),
        };
        if let Err(e) = written {
            first.get_or_insert(std::io::Error::new(
                e.kind(),
                format!("failed to write {}: {e}", out.path.display()),
            ));
        }
    }
    first.map_or(Ok(()), Err)
}

/// Removes every output of `account` (an expired token with `on_expiry = "remove"`).
pub fn remove_all(account: &Account) -> std::io::Result<()> {
    if account.on_expiry == OnExpiry::Keep {
        return Ok(());
    }
    for out in &account.outputs {
        let removed = match out.format {
            Format::Directory { .. } => atomic::remove_dir(&out.path),
            _ => std::fs::remove_file(&out.path),
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("failed to remove {}: {e}", out.path.display()),
                ))
            }
        }
    }
    Ok(())
}

/// [`clean_stale`] for many accounts at once (the daemon's start): each directory is
/// read once, not once for each account with an output in it (issue #11: ten thousand
/// outputs in one directory made that 10^8 entries read). Returns how many files were
/// removed for each account, in the order of `accounts`.
pub fn clean_stale_all(accounts: &[Arc<Account>]) -> Vec<usize> {
    let mut removed = vec![0; accounts.len()];
    let mut dirs: HashMap<&Path, HashMap<String, usize>> = HashMap::new();
    for (i, a) in accounts.iter().enumerate() {
        for o in &a.outputs {
            match (&o.format, o.path.parent(), o.path.file_name()) {
                (Format::Directory { .. }, _, _) => removed[i] += atomic::clean_stale_dir(&o.path),
                (_, Some(dir), Some(name)) => {
                    dirs.entry(dir)
                        .or_default()
                        .insert(name.to_string_lossy().into_owned(), i);
                }
                _ => {}
            }
        }
    }
    for (dir, names) in dirs {
        for i in atomic::clean_stale_among(dir, &names) {
            removed[i] += 1;
        }
    }
    removed
}

/// Removes temporary files a killed daemon left next to (or inside) `account`'s outputs.
pub fn clean_stale(account: &Account) -> usize {
    account
        .outputs
        .iter()
        .map(|o| match o.format {
            Format::Directory { .. } => atomic::clean_stale_dir(&o.path),
            _ => atomic::clean_stale(&o.path),
        })
        .sum()
}
