//! Token outputs: what goes into a file (`render`, pure) and how it gets there
//! (`atomic`, the one place in the daemon that writes token files).

pub mod atomic;
pub mod render;

use crate::config::{Account, Format, OnExpiry};
use crate::oauth::Token;

/// Writes every output of `account` with `token`. Stops at the first failure; each file
/// is either the old or the new version, never a mix.
pub fn write_all(account: &Account, token: &Token) -> std::io::Result<()> {
    for out in &account.outputs {
        let written = match &out.format {
            Format::Directory { var } => {
                let files = render::files(var, &account.name, token);
                let files: Vec<(&str, &[u8])> = files
                    .iter()
                    .map(|(n, c)| (*n, c.expose().as_bytes()))
                    .collect();
                atomic::write_dir(&out.path, &files, out.mode, out.owner, out.group)
            }
            format => {
                let content = render::render(format, &account.name, token);
                let bytes = content.expose().as_bytes();
                atomic::write(&out.path, bytes, out.mode, out.owner, out.group)
            }
        };
        written.map_err(|e| {
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
