//! Who is on the other end of a socket connection, and which accounts they may read.
//!
//! The kernel tells: `SO_PEERCRED` gives the uid and gid the peer had when it
//! connected, `SO_PEERGROUPS` (Linux 4.13) its supplementary groups at that moment. No
//! name service is asked on the request path. [`Peer::may_read`] is the whole access
//! decision, pure and unit-tested below.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use crate::config::Access;

/// A local caller, identified by the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    /// Its primary group.
    pub gid: u32,
    pub pid: i32,
    /// Its supplementary groups. Left empty for a privileged peer, which needs none.
    pub groups: Vec<u32>,
    /// Root or the daemon's own user: reads every account.
    pub privileged: bool,
}

impl Peer {
    /// The uid of the peer of `sock`, and whether it is privileged (root or
    /// `daemon_uid`): all that deciding on a seat takes (one system call).
    pub fn uid_of(sock: &impl AsFd, daemon_uid: u32) -> io::Result<(u32, bool)> {
        let uid = getsockopt(sock, PeerCredentials)?.uid();
        Ok((uid, uid == 0 || uid == daemon_uid))
    }

    /// The credentials of the peer of `sock`. `daemon_uid` is the daemon's effective uid.
    pub fn of(sock: &impl AsFd, daemon_uid: u32) -> io::Result<Peer> {
        let cred = getsockopt(sock, PeerCredentials)?;
        let uid = cred.uid();
        let privileged = uid == 0 || uid == daemon_uid;
        let groups = if privileged {
            Vec::new()
        } else {
            peer_groups(sock, cred.pid())?
        };
        Ok(Peer {
            uid,
            gid: cred.gid(),
            pid: cred.pid(),
            groups,
            privileged,
        })
    }

    /// Whether this peer may read an account with `access` (SPEC §4): root and the
    /// daemon's user read everything; anyone else needs their uid, their primary group
    /// or one of their supplementary groups named.
    pub fn may_read(&self, access: &Access) -> bool {
        self.privileged
            || access.users.contains(&self.uid)
            || access
                .groups
                .iter()
                .any(|g| *g == self.gid || self.groups.contains(g))
    }
}

/// The supplementary groups of the peer of `sock`, as the kernel recorded them at
/// connect time. Falls back to `/proc/PID/status` on kernels without `SO_PEERGROUPS`.
fn peer_groups(sock: &impl AsFd, pid: i32) -> io::Result<Vec<u32>> {
    let fd = sock.as_fd().as_raw_fd();
    let mut groups: Vec<nix::libc::gid_t> = vec![0; 64];
    loop {
        let mut len =
            (groups.len() * std::mem::size_of::<nix::libc::gid_t>()) as nix::libc::socklen_t;
        // SAFETY: `groups` is a live, writable buffer of `len` bytes; the kernel writes at
        // most `len` bytes to it and sets `len` to what it wrote (or needs, on ERANGE).
        // nix 0.29 has no wrapper for SO_PEERGROUPS.
        let rc = unsafe {
            nix::libc::getsockopt(
                fd,
                nix::libc::SOL_SOCKET,
                nix::libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<nix::libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // The buffer was too small; `len` says how large it must be.
            Some(nix::libc::ERANGE) if n > groups.len() => groups.resize(n, 0),
            Some(nix::libc::ENOPROTOOPT) => return proc_groups(pid),
            _ => return Err(err),
        }
    }
}

/// The `Groups:` line of `/proc/PID/status` (kernels before 4.13).
fn proc_groups(pid: i32) -> io::Result<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_proc_groups(&status)
        .ok_or_else(|| io::Error::other(format!("no Groups line in /proc/{pid}/status")))
}

fn parse_proc_groups(status: &str) -> Option<Vec<u32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    line.split_whitespace().map(|g| g.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32], privileged: bool) -> Peer {
        Peer {
            uid,
            gid,
            pid: 1,
            groups: groups.to_vec(),
            privileged,
        }
    }

    fn access(users: &[u32], groups: &[u32]) -> Access {
        Access {
            users: users.to_vec(),
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn access_matrix() {
        let acc = access(&[1001], &[2001, 2002]);
        // Named user.
        assert!(peer(1001, 100, &[], false).may_read(&acc));
        // Primary group named.
        assert!(peer(1002, 2001, &[], false).may_read(&acc));
        // Supplementary group named.
        assert!(peer(1003, 100, &[5, 2002], false).may_read(&acc));
        // Stranger: neither uid nor any group.
        assert!(!peer(1004, 100, &[5, 6], false).may_read(&acc));
        // A uid is not a gid: uid 2001 is not in group 2001.
        assert!(!peer(2001, 100, &[], false).may_read(&acc));
        // Root and the daemon's user read everything, also an account with no access.
        assert!(peer(0, 0, &[], true).may_read(&access(&[], &[])));
        assert!(peer(998, 998, &[], true).may_read(&access(&[], &[])));
        // Nobody else reads an account with no access.
        assert!(!peer(1001, 2001, &[2002], false).may_read(&access(&[], &[])));
    }

    #[test]
    fn peer_of_a_socketpair_is_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let p = Peer::of(&a, me).unwrap();
        assert_eq!(p.uid, me);
        assert_eq!(p.gid, nix::unistd::getegid().as_raw());
        assert_eq!(p.pid, std::process::id() as i32);
        assert!(p.privileged);
        // As seen by a daemon running as someone else, a non-root peer is not privileged.
        let p = Peer::of(&a, u32::MAX - 1).unwrap();
        assert_eq!(p.privileged, me == 0);
        // SO_PEERGROUPS tells this process's supplementary groups.
        let mut want: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = peer_groups(&a, p.pid).unwrap();
        want.sort();
        got.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn proc_status_groups() {
        let s = "Name:\tx\nUid:\t1\t1\t1\t1\nGroups:\t4 24 27 \nNgid:\t0\n";
        assert_eq!(parse_proc_groups(s), Some(vec![4, 24, 27]));
        assert_eq!(parse_proc_groups("Groups:\n"), Some(vec![]));
        assert_eq!(parse_proc_groups("Name: x\n"), None);
    }
}
