//! The state directory: each account's current token, the rotated refresh token of its
//! chain, and the wait before its next request (backoff, a provider's rate limit, a hold
//! after refused credentials, with the counts that make them grow), so that a restart
//! or a crash loop does not ask the provider again while a token is still fresh, nor
//! sooner than planned.
//!
//! `saved` is the model, `file` the state file, `lock` the per-account lock, `dpop_key`
//! the DPoP key tokend made for an account. Only the
//! refresh engine (`engine`) reads and writes these.

pub mod dpop_key;
mod file;
mod lock;
mod saved;

use std::os::unix::fs::DirBuilderExt as _;
use std::path::Path;

pub use file::{load, load_for, reseed, retire, retire_unknown, save, Loaded};
pub use lock::{try_lock, AccountLock, Locked};
pub use saved::{Portable, Saved, SavedToken, Wait, WaitKind};

/// Creates the state directory (0700) if it is missing.
fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}
