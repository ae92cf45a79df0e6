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

/// What the tests of the state directory build their accounts and tokens from.
#[cfg(test)]
mod fixtures {
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use crate::config::{parse_str, Account, Secret};
    use crate::oauth::Token;

    pub(super) fn account(scope: &str) -> Account {
        let text = format!(
            "[[account]]\nname = \"a\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\nclient_secret = {{ env = \"S\" }}\nscope = \"{scope}\"\n[[account.output]]\npath = \"/x\"\n"
        );
        parse_str(&text, Path::new("/c.toml"))
            .unwrap()
            .accounts
            .remove(0)
    }

    pub(super) fn rt_account(seed: &str, scope: &str) -> Account {
        let text = format!(
            "[daemon]\nstate_dir = \"/s\"\n[[account]]\nname = \"a\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\n\
             client_auth = \"none\"\ngrant_type = \"refresh_token\"\nrefresh_token = \"{seed}\"\nscope = \"{scope}\"\n\
             [[account.output]]\npath = \"/x\"\n"
        );
        parse_str(&text, Path::new("/c.toml"))
            .unwrap()
            .accounts
            .remove(0)
    }

    pub(super) fn token(now: SystemTime, lifetime: u64) -> Token {
        Token {
            access_token: Secret::new("tok"),
            token_type: "Bearer".into(),
            issued_at: now,
            expires_at: now + Duration::from_secs(lifetime),
            scope: None,
            refresh_token: None,
            extra: Default::default(),
        }
    }
}
