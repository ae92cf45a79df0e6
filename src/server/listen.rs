//! Binding the listeners: the Unix socket (mode, group, a stale file replaced, a live
//! daemon refused, the file removed when its guard drops) and the optional TCP
//! `metrics_listen`. Serving lives in `mod.rs`.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

/// Pending connections the kernel queues before `accept`: enough for a burst of a
/// thousand clients (the default 128 would make non-blocking connects fail with EAGAIN).
const BACKLOG: i32 = 1024;

/// The socket file, removed when this is dropped (on shutdown, also after an error or a
/// panic) unless another process has replaced it since.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device, inode and change time: an inode number alone is soon reused.
    id: (u64, u64, i64, i64),
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if file_id(&m) == self.id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("failed to remove the socket {}: {e}", self.path.display());
                }
            }
            _ => {}
        }
    }
}

fn file_id(m: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

/// Binds the Unix socket at `path` with `mode` and, if given, `group` (a name or a
/// number). A socket file nobody answers on is replaced; one a live daemon answers on
/// is an error, as is any other kind of file at `path`.
pub fn bind_unix(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> anyhow::Result<(std::os::unix::net::UnixListener, SocketFile)> {
    let gid = group.map(resolve_group).transpose()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("failed to create the socket's directory {}", dir.display())
            })?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match probe(path) {
            Ok(true) => bail!(
                "another tokend is already serving on {}; stop it first (or set another [daemon] socket)",
                path.display()
            ),
            Ok(false) => {
                tracing::info!("replacing the stale socket {}", path.display());
                std::fs::remove_file(path).with_context(|| {
                    format!("failed to remove the stale socket {}", path.display())
                })?;
            }
            Err(e) => bail!("failed to check whether {} is in use: {e}", path.display()),
        },
        Ok(_) => bail!(
            "{} exists and is not a socket; not replacing it",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => bail!("failed to inspect {}: {e}", path.display()),
    }

    let addr = UnixAddr::new(path).map_err(|e| {
        anyhow::anyhow!(
            "socket path {} is unusable: {e} (at most 107 bytes)",
            path.display()
        )
    })?;
    let fd = new_socket().context("failed to create a Unix socket")?;
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)
        .with_context(|| format!("failed to bind the socket {}", path.display()))?;
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("failed to inspect {}", path.display()))?;
    // From here on the guard removes the file if anything fails. Nobody can connect
    // before `listen`, so setting mode and group now leaves no window.
    let mut guard = SocketFile {
        path: path.to_owned(),
        id: file_id(&meta),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("failed to set mode {mode:04o} on {}", path.display()))?;
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).with_context(
            || {
                format!(
                    "failed to give {} to group {} (the daemon must run as root or be a member)",
                    path.display(),
                    group.unwrap_or_default()
                )
            },
        )?;
    }
    // Changing mode and group changed the change time.
    guard.id = std::fs::symlink_metadata(path)
        .map(|m| file_id(&m))
        .with_context(|| format!("failed to inspect {}", path.display()))?;
    socket::listen(&fd, Backlog::new(BACKLOG).expect("1024 is a valid backlog"))
        .with_context(|| format!("failed to listen on {}", path.display()))?;
    // Non-blocking already (SOCK_NONBLOCK), as tokio needs it.
    Ok((std::os::unix::net::UnixListener::from(fd), guard))
}

/// Binds the TCP listener for `/metrics` and `/v1/health` (non-blocking, as tokio
/// needs it; std sets SO_REUSEADDR).
pub fn bind_tcp(addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("failed to listen on metrics_listen {addr}"))?;
    listener
        .set_nonblocking(true)
        .context("failed to make the metrics listener non-blocking")?;
    Ok(listener)
}

fn new_socket() -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
}

/// Whether a live process answers on the socket at `path`. A non-blocking connect: a
/// daemon whose backlog is full (EAGAIN) is alive too, and nothing here can hang.
fn probe(path: &Path) -> io::Result<bool> {
    let fd = new_socket()?;
    let addr = UnixAddr::new(path)?;
    match socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
        Ok(()) | Err(Errno::EAGAIN) => Ok(true),
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn resolve_group(name: &str) -> anyhow::Result<u32> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        return name
            .parse()
            .with_context(|| format!("socket_group {name:?} is not a valid gid"));
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => bail!("socket_group {name:?}: no such group"),
        Err(e) => bail!("socket_group {name:?}: failed to look it up: {e}"),
    }
}

/// Raises the soft limit on open files to the hard limit, as Go's runtime does: every
/// connection takes a descriptor, and systemd's default soft limit of 1024 is below
/// what a daemon serving many readers and accounts needs. Returns the soft limit now.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => hard,
        Err(e) => {
            tracing::warn!("failed to raise the open-file limit from {soft} to {hard}: {e}");
            soft
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_replaced_live_refused_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");

        // A stale socket: bound, never listened on, its owner gone.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (listener, guard) = bind_unix(&path, 0o640, None).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o7777, 0o640);

        // A live one: refused, and left alone.
        let err = bind_unix(&path, 0o640, None).unwrap_err().to_string();
        assert!(err.contains("already serving"), "{err}");
        assert!(path.exists());

        drop(listener);
        drop(guard);
        assert!(!path.exists(), "the guard removes the socket");

        // Not a socket: refused.
        std::fs::write(&path, "x").unwrap();
        let err = bind_unix(&path, 0o640, None).unwrap_err().to_string();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
    }

    #[test]
    fn guard_leaves_a_replaced_socket_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (listener, guard) = bind_unix(&path, 0o600, None).unwrap();
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(guard);
        assert!(path.exists(), "another process's socket stays");
        drop(other);
    }

    #[test]
    fn socket_group_by_number_and_unknown_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let gid = nix::unistd::getegid().as_raw();
        let (_l, _g) = bind_unix(&path, 0o660, Some(&gid.to_string())).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), gid);
        let err = bind_unix(
            &dir.path().join("t.sock"),
            0o660,
            Some("tokend-no-such-group"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no such group"), "{err}");
    }
}
