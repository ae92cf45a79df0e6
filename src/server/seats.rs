//! Who gets a connection: the seats of one listener, shared fairly between the local
//! users who connect (issue 19: one user's flood of connections must not keep root,
//! the daemon's user or an account's readers out).
//!
//! A listener has [`Limits::max_connections`](super::Limits) seats. The last
//! [`PRIVILEGED_SEATS`] are only for root and the daemon's own user, who always get
//! one; every other user holds at most [`Seats::per_peer`] at once. A connection past
//! its share is answered 503 "busy" and closed at once, which costs a descriptor for
//! microseconds. How many seats there are at all is decided from the open-files limit
//! ([`max_connections_for`]), so that a flood never takes the descriptors that
//! refreshes, secrets, state and outputs need.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Seats that only root and the daemon's own user may take.
pub const PRIVILEGED_SEATS: usize = 16;

/// Descriptors kept for the daemon's own work whatever the socket does: the runtime,
/// listeners, the journal and the file watcher, and for each refresh in flight its
/// connection, secret, state and output files.
fn reserve(max_concurrent_refreshes: usize) -> u64 {
    64 + 6 * max_concurrent_refreshes as u64
}

/// How many connections a listener may hold with `fd_limit` open files (the soft
/// limit, raised at start) and `refreshes` concurrent refreshes: at most `wanted`, and
/// never so many that, with the other listener's as many again, the daemon would run
/// out of descriptors for its own work. At least the privileged seats and a few more.
pub fn max_connections_for(wanted: usize, fd_limit: u64, refreshes: usize) -> usize {
    let spare = fd_limit.saturating_sub(reserve(refreshes)) / 2;
    (spare as usize).min(wanted).max(PRIVILEGED_SEATS + 8)
}

/// Who holds a seat.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Holder {
    /// Root or the daemon's own user.
    Privileged,
    /// Any other local user, by uid.
    User(u32),
    /// A client of the TCP monitoring listener (no uid).
    Remote,
}

/// The seats of one listener.
#[derive(Clone)]
pub struct Seats(Arc<Mutex<State>>);

struct State {
    total: usize,
    /// Seats taken, by anyone.
    taken: usize,
    /// Seats taken by unprivileged peers (they may not take the privileged ones).
    shared_taken: usize,
    by: HashMap<Holder, usize>,
}

/// A seat taken: given back when dropped.
pub struct Seat {
    seats: Seats,
    holder: Holder,
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut s = self
            .seats
            .0
            .lock()
            .expect("never poisoned: no panics under the lock");
        s.taken -= 1;
        if self.holder != Holder::Privileged {
            s.shared_taken -= 1;
        }
        if let Some(n) = s.by.get_mut(&self.holder) {
            *n -= 1;
            if *n == 0 {
                s.by.remove(&self.holder);
            }
        }
    }
}

impl Seats {
    pub fn new(total: usize) -> Self {
        Seats(Arc::new(Mutex::new(State {
            total,
            taken: 0,
            shared_taken: 0,
            by: HashMap::new(),
        })))
    }

    /// The most seats one unprivileged user (or all TCP clients together) may hold.
    pub fn per_peer(total: usize) -> usize {
        let shared = total.saturating_sub(PRIVILEGED_SEATS);
        (shared / 4).max(4).min(shared)
    }

    /// A seat for `holder`, if its share allows one.
    pub fn take(&self, holder: Holder) -> Option<Seat> {
        let mut s = self
            .0
            .lock()
            .expect("never poisoned: no panics under the lock");
        let shared = s.total.saturating_sub(PRIVILEGED_SEATS);
        let mine = s.by.get(&holder).copied().unwrap_or(0);
        let allowed = match holder {
            Holder::Privileged => s.taken < s.total,
            Holder::User(_) | Holder::Remote => {
                s.taken < s.total && s.shared_taken < shared && mine < Self::per_peer(s.total)
            }
        };
        if !allowed {
            return None;
        }
        s.taken += 1;
        if holder != Holder::Privileged {
            s.shared_taken += 1;
        }
        *s.by.entry(holder).or_default() += 1;
        drop(s);
        Some(Seat {
            seats: self.clone(),
            holder,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flooding_user_takes_its_share_and_root_and_others_keep_theirs() {
        let seats = Seats::new(64);
        let share = Seats::per_peer(64);
        assert_eq!(share, 12);
        let flood: Vec<Seat> = std::iter::from_fn(|| seats.take(Holder::User(1000)))
            .take(1000)
            .collect();
        assert_eq!(flood.len(), share, "one user holds its share, no more");
        let reader: Vec<Seat> = std::iter::from_fn(|| seats.take(Holder::User(1001)))
            .take(1000)
            .collect();
        assert_eq!(reader.len(), share, "another user still gets a full share");
        // Users together fill the shared seats; root still gets the privileged ones.
        let mut others = Vec::new();
        for uid in 2000..2100 {
            others.extend(std::iter::from_fn(|| seats.take(Holder::User(uid))).take(1000));
        }
        assert_eq!(
            flood.len() + reader.len() + others.len(),
            64 - PRIVILEGED_SEATS
        );
        let root: Vec<Seat> = std::iter::from_fn(|| seats.take(Holder::Privileged))
            .take(1000)
            .collect();
        assert_eq!(root.len(), PRIVILEGED_SEATS);
        drop(flood);
        assert!(seats.take(Holder::User(1000)).is_some(), "seats come back");
        assert!(
            seats.take(Holder::Privileged).is_some(),
            "and root may take any"
        );
    }

    #[test]
    fn the_descriptor_limit_bounds_the_seats() {
        assert_eq!(max_connections_for(1024, 1 << 20, 16), 1024);
        // prlimit --nofile=256 with 16 refreshes: (256 - 160) / 2.
        assert_eq!(max_connections_for(1024, 256, 16), 48);
        assert_eq!(max_connections_for(1024, 64, 16), PRIVILEGED_SEATS + 8);
    }
}
