//! The DPoP key tokend makes for an account that names no `dpop_key` (SPEC §9):
//! `state_dir/NAME.dpop.pem`, PKCS#8 PEM, mode 0600, written atomically, made once and
//! kept, so that a restart keeps using the tokens already bound to it (and asks the
//! provider nothing). The state file (`NAME.json`) never holds the key.
//!
//! A key that no longer fits `dpop_alg` (the algorithm was changed) is replaced by a new
//! one: tokens bound to the old one are refreshed anyway when the request changes.

use std::path::{Path, PathBuf};

use super::ensure_dir;
use crate::config::{DpopAlg, Secret};
use crate::oauth::dpop::DpopKey;
use crate::output::atomic;

/// Where an account's own DPoP key is kept.
pub fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.dpop.pem"))
}

/// The account's kept key, or a new one (saved before it is used). Errors say which file
/// and why, never the key.
pub fn load_or_make(dir: &Path, name: &str, alg: DpopAlg) -> Result<(DpopKey, Secret), String> {
    let file = path(dir, name);
    match std::fs::read_to_string(&file) {
        Ok(pem) => match DpopKey::from_pem(&Secret::new(pem.clone()), alg) {
            Ok(key) => return Ok((key, Secret::new(pem))),
            Err(e) => {
                tracing::warn!(account = %name, "the DPoP key in {} {e}: making a new one", file.display());
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(format!(
                "failed to read the DPoP key {}: {e}",
                file.display()
            ))
        }
    }
    let (key, pem) =
        DpopKey::generate(alg).map_err(|e| format!("failed to make a DPoP key: {e}"))?;
    save(dir, name, &pem)?;
    tracing::info!(account = %name, jkt = %key.thumbprint(), "made a DPoP key, kept in {}", file.display());
    Ok((key, pem))
}

/// Keeps `pem` as the account's key (mode 0600, atomically): one it made, or the one a
/// cluster's leader shares.
pub fn save(dir: &Path, name: &str, pem: &Secret) -> Result<(), String> {
    let file = path(dir, name);
    ensure_dir(dir)
        .and_then(|()| atomic::write(&file, pem.expose().as_bytes(), 0o600, None, None))
        .map_err(|e| format!("failed to save the DPoP key to {}: {e}", file.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn a_key_is_made_once_with_mode_0600_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (first, pem) = load_or_make(dir.path(), "fhir", DpopAlg::Es256).unwrap();
        assert!(pem.expose().contains("PRIVATE KEY"));
        let meta = std::fs::metadata(path(dir.path(), "fhir")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let (again, _) = load_or_make(dir.path(), "fhir", DpopAlg::Es256).unwrap();
        assert_eq!(first.thumbprint(), again.thumbprint());
        // Another algorithm: a new key of its kind.
        let (p384, _) = load_or_make(dir.path(), "fhir", DpopAlg::Es384).unwrap();
        assert_ne!(p384.thumbprint(), first.thumbprint());
        assert_eq!(p384.alg(), DpopAlg::Es384);
        let state = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect::<Vec<_>>();
        assert_eq!(state, ["fhir.dpop.pem"], "no temporary file left");
    }
}
