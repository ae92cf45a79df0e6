//! The per-account lock (`{state_dir}/{account}.lock`, an exclusive `flock`) that keeps
//! `run` and `once` from spending one refresh token twice.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use super::ensure_dir;

/// An exclusive lock on one account in the state directory, held while its refresh
/// token may be spent: by `run` for as long as it runs the account, by `once` for its
/// attempt. Released when dropped (and by the kernel when the process dies).
pub struct AccountLock {
    _lock: nix::fcntl::Flock<File>,
}

/// The outcome of [`try_lock`].
pub enum Locked {
    Acquired(AccountLock),
    /// Another process holds the account; what it wrote about itself ("pid 123 run").
    Busy {
        holder: String,
    },
}

/// Takes the lock of account `name` without waiting. `role` ("run", "once") is written
/// into the lock file for the messages of whoever finds it busy.
pub fn try_lock(dir: &Path, name: &str, role: &str) -> std::io::Result<Locked> {
    ensure_dir(dir)?;
    let lock_path = dir.join(format!("{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("failed to open {}: {e}", lock_path.display()),
            )
        })?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            // Who holds it, for messages only; a failure to write it changes nothing.
            let _ = lock
                .set_len(0)
                .and_then(|()| writeln!(&*lock, "pid {} {role}", std::process::id()));
            Ok(Locked::Acquired(AccountLock { _lock: lock }))
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            Ok(Locked::Busy {
                holder: if holder.is_empty() {
                    "another tokend".into()
                } else {
                    format!("tokend {holder}")
                },
            })
        }
        Err((_, e)) => Err(std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!("failed to lock {}: {e}", lock_path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_exclusive_and_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let Locked::Acquired(held) = try_lock(dir.path(), "a", "run").unwrap() else {
            panic!("a free lock is acquired");
        };
        match try_lock(dir.path(), "a", "once").unwrap() {
            Locked::Busy { holder } => {
                assert_eq!(holder, format!("tokend pid {} run", std::process::id()))
            }
            Locked::Acquired(_) => panic!("the lock is exclusive"),
        }
        assert!(matches!(
            try_lock(dir.path(), "b", "once").unwrap(),
            Locked::Acquired(_)
        ));
        drop(held);
        assert!(matches!(
            try_lock(dir.path(), "a", "once").unwrap(),
            Locked::Acquired(_)
        ));
    }
}
