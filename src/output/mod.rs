//! Token outputs: what goes into a file (`render`, pure) and how it gets there
//! (`atomic`, the one place in the daemon that writes token files).

pub mod atomic;
pub mod render;

use std::path::Path;

use crate::config::{Account, OnExpiry};
use crate::oauth::Token;

/// Writes every output of `account` with `token`. Stops at the first failure; each file
/// is either the old or the new version, never a mix.
pub fn write_all(account: &Account, token: &Token) -> std::io::Result<()> {
    for out in &account.outputs {
        let content = render::render(&out.format, &account.name, token);
        atomic::write(
            &out.path,
            content.expose().as_bytes(),
            out.mode,
            out.owner,
            out.group,
        )
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("failed to write {}: {e}", out.path.display()),
            )
        })?;
    }
    Ok(())
}

/// Removes every output of `account` (an expired token with `on_expiry = "remove"`).
pub fn remove_all(account: &Account) -> std::io::Result<()> {
    if account.on_expiry == OnExpiry::Keep {
        return Ok(());
    }
    for out in &account.outputs {
        match std::fs::remove_file(&out.path) {
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

/// Removes temporary files a killed daemon left next to `account`'s outputs.
pub fn clean_stale(account: &Account) -> usize {
    account
        .outputs
        .iter()
        .map(|o| atomic::clean_stale(Path::new(&o.path)))
        .sum()
}
