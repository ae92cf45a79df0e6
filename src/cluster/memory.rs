//! What a member remembers of the cluster across its restarts: per shared account, the
//! highest record generation it has seen, in `{state_dir}/cluster/` (one small file per
//! account, written atomically). A record older than that (an etcd restored from a
//! backup, a record put back by hand) is refused loudly instead of adopted, so that a
//! member never sends a refresh token the chain has already spent.
//!
//! Without a state_dir a member remembers only while it runs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The directory under `state_dir` that holds these files.
const DIR: &str = "cluster";

#[derive(Debug, Clone)]
pub struct Memory {
    dir: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct Seen {
    /// The record's etcd key, for whoever looks into the file.
    record: String,
    generation: u64,
}

impl Memory {
    pub fn new(state_dir: Option<&Path>) -> Self {
        Memory {
            dir: state_dir.map(|d| d.join(DIR)),
        }
    }

    /// The file that remembers the record at `at`: the account's name (readable) and a
    /// digest of the key (prefix and identity).
    fn file(&self, at: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let digest = ring::digest::digest(&ring::digest::SHA256, at.as_bytes());
        let hex = crate::hex::hex(&digest.as_ref()[..12]);
        let name = at
            .rsplit('/')
            .nth(2)
            .filter(|n| !n.is_empty())
            .unwrap_or("account");
        Some(dir.join(format!("{name}-{hex}.json")))
    }

    /// The highest generation seen of the record at `at` (0 if none).
    pub fn load(&self, at: &str) -> u64 {
        let Some(f) = self.file(at) else { return 0 };
        std::fs::read(&f)
            .ok()
            .and_then(|b| serde_json::from_slice::<Seen>(&b).ok())
            .filter(|s| s.record == at)
            .map_or(0, |s| s.generation)
    }

    /// Remembers `generation` for the record at `at`.
    pub fn store(&self, at: &str, generation: u64) -> std::io::Result<()> {
        let Some(f) = self.file(at) else {
            return Ok(());
        };
        if let Some(dir) = f.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let text = serde_json::to_vec(&Seen {
            record: at.to_owned(),
            generation,
        })
        .expect("JSON always serializes");
        crate::output::atomic::write(&f, &text, 0o600, None, None)
    }
}

use std::os::unix::fs::DirBuilderExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generation_is_remembered_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let m = Memory::new(Some(dir.path()));
        let a = "/p/accounts/a/0011/record";
        let b = "/p/accounts/a/2233/record";
        assert_eq!(m.load(a), 0);
        m.store(a, 7).unwrap();
        assert_eq!(m.load(a), 7);
        assert_eq!(m.load(b), 0);
        assert!(dir.path().join("cluster").is_dir());
        let none = Memory::new(None);
        none.store(a, 3).unwrap();
        assert_eq!(none.load(a), 0);
    }
}
