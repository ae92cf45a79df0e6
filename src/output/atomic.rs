//! The one place that writes token files. A write is atomic (SPEC §3): a temporary file
//! in the target's directory, created with its final mode and owner, written, fsynced,
//! renamed over the target, and the directory fsynced. Readers see the old file or the
//! new one, never a partial, empty or mixed one, even if the daemon is killed mid-write.
//! Directories made for an output get their mode and group here too, set explicitly
//! rather than left to the process umask (the unit runs with `UMask=0077`).

use std::collections::HashMap;
use std::fs::{File, Permissions};
use std::io::Write as _;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
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
    create_dirs(dir, mode, owner, group)?;
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

/// The mode of a directory that holds files of `mode` (SPEC §3): the owner (tokend, which
/// keeps writing there) gets rwx; the group and others get r-x when the files' mode lets
/// them read, never write (that would let them replace a token). When the files belong
/// to another owner, who is neither tokend nor necessarily in the group, others get search
/// (x) alone: that user can reach its file by name, and the file's own 0600-style mode
/// keeps everyone else out.
fn dir_mode(mode: u32, owner: Option<u32>) -> u32 {
    let mut dir = 0o700;
    if mode & 0o040 != 0 {
        dir |= 0o050;
    }
    if mode & 0o004 != 0 {
        dir |= 0o005;
    }
    if owner.is_some_and(|o| o != nix::unistd::geteuid().as_raw()) {
        dir |= 0o001;
    }
    dir
}

/// Gives a directory tokend made the output's group and [`dir_mode`]. The owner stays
/// tokend: it must keep renaming files in there. Explicit chown and chmod, not the mode
/// given to mkdir, which the umask narrows.
fn set_dir_access(
    dir: &Path,
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> std::io::Result<()> {
    if let Some(group) = group {
        nix::unistd::chown(dir, None, Some(nix::unistd::Gid::from_raw(group)))
            .map_err(std::io::Error::from)?;
    }
    std::fs::set_permissions(dir, Permissions::from_mode(dir_mode(mode, owner)))
}

/// Creates `dir` and its missing ancestors, each with [`set_dir_access`]. Directories
/// that exist already are left as they are: they are the operator's.
fn create_dirs(
    dir: &Path,
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d);
        at = d.parent();
    }
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => set_dir_access(d, mode, owner, group)?,
            // Made by someone else meanwhile (another account's output): theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The symlink a `directory` output's files resolve through, as kubelet names it.
const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// Replaces the files of a `directory` output all at once, the way kubelet updates a
/// volume: the new files go into a fresh `..XXXXXX` directory, then the `..data`
/// symlink is renamed over to point at it; each `dir/NAME` is a symlink to
/// `..data/NAME`. A reader that opens files through `..data` sees one version of all.
pub fn write_dir(
    dir: &Path,
    files: &[(&str, &[u8])],
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> std::io::Result<()> {
    create_dirs(dir, mode, owner, group)?;
    // The output's directory is tokend's own, also when an earlier tokend (or an earlier
    // mode) made it: it gets the current mode and group.
    if std::fs::metadata(dir)?.uid() == nix::unistd::geteuid().as_raw() {
        set_dir_access(dir, mode, owner, group)?;
    }
    let version = tempfile::Builder::new().prefix("..").tempdir_in(dir)?;
    set_dir_access(version.path(), mode, owner, group)?;
    for (name, content) in files {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o600)
            .open(version.path().join(name))?;
        if owner.is_some() || group.is_some() {
            nix::unistd::fchown(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                owner.map(nix::unistd::Uid::from_raw),
                group.map(nix::unistd::Gid::from_raw),
            )
            .map_err(std::io::Error::from)?;
        }
        f.set_permissions(Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()?;
    }
    File::open(version.path())?.sync_all()?;
    let version = version.keep();
    let version_name = version
        .file_name()
        .expect("a temporary directory has a name")
        .to_owned();

    let tmp = dir.join(DATA_TMP);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&version_name, &tmp)?;
    std::fs::rename(&tmp, dir.join(DATA))?;
    for (name, _) in files {
        let link = dir.join(name);
        let target = Path::new(DATA).join(name);
        if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            std::os::unix::fs::symlink(&target, &tmp)?;
            std::fs::rename(&tmp, &link)?;
        }
    }
    File::open(dir)?.sync_all()?;
    clean_stale_dir(dir);
    Ok(())
}

/// Removes a `directory` output: its links, `..data` and its versions, then the
/// directory itself if nothing else is in it.
pub fn remove_dir(dir: &Path) -> std::io::Result<()> {
    let entries = std::fs::read_dir(dir)?;
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        let ours =
            name.starts_with("..") || std::fs::read_link(&path).is_ok_and(|t| t.starts_with(DATA));
        if !ours {
            continue;
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Removes versions of a `directory` output that `..data` no longer points at (left by
/// an earlier write, or by a killed daemon); returns how many.
pub fn clean_stale_dir(dir: &Path) -> usize {
    let current = std::fs::read_link(dir.join(DATA)).ok();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let n = name.to_string_lossy();
            n.starts_with("..") && n != DATA && current.as_deref() != Some(Path::new(&name))
        })
        .filter(|e| {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(e.path()).is_ok()
            } else {
                std::fs::remove_file(e.path()).is_ok()
            }
        })
        .count()
}

/// [`clean_stale`] for every output in `dir` at once, by file name (mapped to whose
/// output it is): the directory is read once. Returns the owner of each file removed.
pub fn clean_stale_among<T: Copy>(dir: &Path, names: &HashMap<String, T>) -> Vec<T> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if !n.starts_with('.') || !n.ends_with(TEMP_SUFFIX) {
            continue;
        }
        // `.{name}.{random}.tokend-tmp`, and a name may hold dots: each one is tried.
        let owner = n[1..]
            .match_indices('.')
            .find_map(|(at, _)| names.get(&n[1..1 + at]));
        if let Some(owner) = owner {
            if std::fs::remove_file(e.path()).is_ok() {
                removed.push(*owner);
            }
        }
    }
    removed
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

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn one_read_of_a_directory_finds_every_outputs_stale_files() {
        let dir = tempfile::tempdir().unwrap();
        let names: HashMap<String, usize> = [("tok".to_owned(), 1), ("a.b".to_owned(), 2)].into();
        let stale = [
            ".tok.abc.tokend-tmp",
            ".a.b.x1.tokend-tmp",
            ".tok.tokend-tmp",
        ];
        let kept = [
            "tok",
            ".other.abc.tokend-tmp",
            "tok.abc.tokend-tmp",
            ".a.abc.tokend-tmp",
            ".tok.abc",
        ];
        for n in stale.iter().chain(&kept) {
            std::fs::write(dir.path().join(n), "x").unwrap();
        }
        let mut removed = clean_stale_among(dir.path(), &names);
        removed.sort();
        assert_eq!(removed, [1, 1, 2]);
        for n in kept {
            assert!(dir.path().join(n).exists(), "{n} kept");
        }
        // The same verdicts as one account's own look.
        for n in stale {
            std::fs::write(dir.path().join(n), "x").unwrap();
        }
        assert_eq!(clean_stale(&dir.path().join("tok")), 2);
    }

    #[test]
    fn directory_modes_follow_who_may_read() {
        assert_eq!(dir_mode(0o600, None), 0o700);
        assert_eq!(dir_mode(0o640, None), 0o750);
        assert_eq!(dir_mode(0o644, None), 0o755);
        assert_eq!(dir_mode(0o660, None), 0o750, "never group write");
        assert_eq!(dir_mode(0o604, None), 0o705);
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(dir_mode(0o600, Some(me)), 0o700);
        assert_eq!(dir_mode(0o600, Some(me + 1)), 0o701, "the owner can search");
    }

    /// The unit runs with `UMask=0077`; made directories must not inherit it (SPEC §3).
    /// The umask is per process, and only ever narrower here, so other tests running
    /// meanwhile at most make files more private than asked, never less.
    #[test]
    fn made_directories_get_the_outputs_mode_and_group_whatever_the_umask() {
        use nix::sys::stat::{umask, Mode};
        let before = umask(Mode::from_bits_truncate(0o077));
        let dir = tempfile::tempdir().unwrap();
        // A group tokend belongs to: its own.
        let gid = nix::unistd::getegid().as_raw();

        let path = dir.path().join("a/b/tok");
        write(&path, b"one", 0o644, None, Some(gid)).unwrap();
        let out = dir.path().join("c/msk.d");
        write_dir(&out, &[("raw", b"one")], 0o640, None, Some(gid)).unwrap();
        let version = std::fs::read_link(out.join(DATA)).unwrap();
        let private = dir.path().join("p/tok");
        write(&private, b"one", 0o600, None, None).unwrap();
        umask(before);

        for (d, want) in [
            (dir.path().join("a"), 0o755),
            (dir.path().join("a/b"), 0o755),
            (dir.path().join("c"), 0o750),
            (out.clone(), 0o750),
            (out.join(&version), 0o750),
            (dir.path().join("p"), 0o700),
        ] {
            assert_eq!(mode_of(&d), want, "{}", d.display());
            assert_eq!(std::fs::metadata(&d).unwrap().gid(), gid);
        }
        assert_eq!(mode_of(&path), 0o644);
        assert_eq!(mode_of(&out.join(&version).join("raw")), 0o640);
        assert_eq!(
            mode_of(dir.path()),
            0o700,
            "an existing directory is left alone"
        );
    }

    #[test]
    fn a_directory_output_made_too_private_is_opened_up() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("msk.d");
        std::fs::create_dir(&out).unwrap();
        std::fs::set_permissions(&out, Permissions::from_mode(0o700)).unwrap();
        write_dir(&out, &[("raw", b"one")], 0o644, None, None).unwrap();
        assert_eq!(mode_of(&out), 0o755);
    }

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
    fn a_directory_output_switches_every_file_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("msk.d");
        write_dir(
            &out,
            &[("raw", b"one"), ("env", b"T=one\n")],
            0o640,
            None,
            None,
        )
        .unwrap();
        assert_eq!(std::fs::read(out.join("raw")).unwrap(), b"one");
        let first = std::fs::read_link(out.join(DATA)).unwrap();
        write_dir(
            &out,
            &[("raw", b"two"), ("env", b"T=two\n")],
            0o640,
            None,
            None,
        )
        .unwrap();
        assert_eq!(std::fs::read(out.join("raw")).unwrap(), b"two");
        assert_eq!(std::fs::read(out.join("env")).unwrap(), b"T=two\n");
        assert_eq!(
            std::fs::metadata(out.join("raw")).unwrap().mode() & 0o7777,
            0o640
        );
        assert_eq!(
            std::fs::read_link(out.join("raw")).unwrap(),
            Path::new("..data/raw")
        );
        assert!(!out.join(&first).exists(), "the old version is gone");
        let mut names: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        assert_eq!(
            names.len(),
            4,
            "raw, env, ..data and one version: {names:?}"
        );

        std::fs::create_dir(out.join("..stale")).unwrap();
        assert_eq!(clean_stale_dir(&out), 1);
        remove_dir(&out).unwrap();
        assert!(!out.exists());
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
