//! The one place that writes token files. A write is atomic (SPEC §3): a temporary file
//! in the target's directory, created with its final mode and owner, written, fsynced,
//! renamed over the target, and the directory fsynced. Readers see the old file or the
//! new one, never a partial, empty or mixed one, even if the daemon is killed mid-write.

use std::fs::{File, Permissions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::Path;

const TEMP_SUFFIX: &str = ".tokend-tmp";

fn temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    format!(".{name}.")
}

/// Atomically replaces `path` with `content`, with `mode` and optional owner and group.
pub fn write(
    path: &Path,
    content: &[u8],
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(path))
        .suffix(TEMP_SUFFIX)
        .permissions(Permissions::from_mode(mode & 0o600))
        .tempfile_in(dir)?;
    let file = tmp.as_file();
    // Owner first, then the mode: chown clears set-id bits, and the umask narrowed the
    // mode the file was created with.
    if owner.is_some() || group.is_some() {
        nix::unistd::fchown(
            std::os::fd::AsRawFd::as_raw_fd(file),
            owner.map(nix::unistd::Uid::from_raw),
            group.map(nix::unistd::Gid::from_raw),
        )
        .map_err(std::io::Error::from)?;
    }
    file.set_permissions(Permissions::from_mode(mode))?;
    tmp.write_all(content)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

/// Removes temporary files a killed writer left beside `path`; returns how many.
pub fn clean_stale(path: &Path) -> usize {
    let (Some(dir), prefix) = (path.parent(), temp_prefix(path)) else {
        return 0;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with(&prefix) && n.ends_with(TEMP_SUFFIX)
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn writes_with_the_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tok");
        write(&path, b"one", 0o640, None, None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);
        let ino = std::fs::metadata(&path).unwrap().ino();
        write(&path, b"two", 0o600, None, None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
        assert_ne!(
            std::fs::metadata(&path).unwrap().ino(),
            ino,
            "renamed, not rewritten in place"
        );
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("tok")]);
    }

    #[test]
    fn stale_temp_files_are_removed_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok");
        std::fs::write(dir.path().join(".tok.abc123.tokend-tmp"), "x").unwrap();
        std::fs::write(dir.path().join(".other.abc123.tokend-tmp"), "x").unwrap();
        std::fs::write(dir.path().join("tok"), "keep").unwrap();
        assert_eq!(clean_stale(&path), 1);
        assert!(dir.path().join(".other.abc123.tokend-tmp").exists());
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }
}
