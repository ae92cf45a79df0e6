//! The account layer's [`Coordinator`] on a member's [`Seat`]: the refresh protocol of
//! issue #20, written down for operators in the README's cluster chapter.
//!
//! - **Whose turn.** The election (a leader key under the member's lease), and
//!   `on_cluster_loss` when etcd is out of reach or this member's key is not the
//!   cluster's.
//! - **A chain advances by compare-and-swap on the record, never on leadership alone.**
//!   Right before it sends, the leader claims the link in one transaction that holds
//!   only if it still holds the lead and the record is still the one it read: the
//!   record, one generation on, says the link is in flight (member, claim id, how long
//!   to wait for it). A failed claim never sends. The answer is written by
//!   compare-and-swap on the claimed record (not on the lead): a late answer still
//!   lands if nobody took the link over, and the new link is not lost.
//! - **A link in flight** of another member: a leader waits for its answer for the
//!   claim's `wait` (the request's timeout plus `lease_ttl`), counted on its own
//!   monotonic clock from when it first saw the claim; past that it sends the link
//!   once more, and a refusal holds the account ("may have been spent by member X,
//!   which died mid-request: re-seed"). Grants that do not rotate take the link over at
//!   once (a dead member's request costs at most one extra request).
//! - **Order by generation.** Every write is one generation on from the record it
//!   replaces (the compare-and-swap guarantees it); the record is sealed bound to its
//!   generation and its place in the key's history, and each member remembers the
//!   highest generation it has seen (`memory`). A record that does not open there, or
//!   is older than what was seen, is refused loudly; a leader that holds the newest
//!   link it has seen writes it back over such a record.
//! - **Time.** A record carries the lifetime its token had left when it was written
//!   (and when that was, on etcd's clock): each member times the token on its own
//!   clock from that, never from the writer's wall clock.
//! - **Identity.** A chain's seed is named in its record by a keyed digest: a seed
//!   another identity of the account's name has spent is never sent, and members of
//!   another identity under the same name are shown on every member.

mod claim;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::backend::{AccountSeat, KeyCheck, Lead, MemberView, Position, Stored};
use super::record::{LeaderRequest, Record};
use crate::account::coordinator::{BoxFuture, Claim, ClusterStatus, Coordinator, Shared, Turn};
use crate::account::persist::{Portable, SavedToken};
use crate::config::{Account, Grant, OnClusterLoss};
use claim::ClaimBase;

pub struct Seated<S: AccountSeat> {
    seat: S,
    account: Arc<Account>,
    /// The refresh_token grant never refreshes alone: a second refresher forks the chain.
    rotates: bool,
    on_loss: OnClusterLoss,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The highest record generation seen (also across restarts: `memory`).
    seen: u64,
    /// The generation of the record this member last took or wrote: when it is `seen`,
    /// this member holds the newest link it knows of.
    holds: u64,
    /// The last record taken, timed on this member's clock.
    taken: Option<Taken>,
    /// When this member first saw other members' claims (by claim id), newest last.
    claims_seen: VecDeque<(u64, Instant)>,
    /// This member's claim: where it put the record, the record it put, and when.
    mine: Option<(Position, Record, Instant)>,
    /// The revision of this member's last claim (a request written before it is
    /// answered by it).
    last_claim: i64,
    /// A record refused (why), by the revision it was seen at: logged once.
    refused: Option<(i64, String)>,
    /// Members of other identities under this account's name, as last told.
    others_told: Option<String>,
}

/// A record as this member took it: its revision, and its token's times on this
/// member's clock.
struct Taken {
    revision: i64,
    /// Which token it held ([`token_id`]), and when that expires on the monotonic clock.
    token: Option<[u8; 32]>,
    expires: Option<Instant>,
}

/// A digest that tells tokens apart (not a copy of one).
fn token_id(t: &crate::oauth::Token) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, t.access_token.expose().as_bytes())
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// The wall-clock time (this member's, `now`) of `at` on the monotonic clock.
fn wall_of(now: SystemTime, at: Instant) -> SystemTime {
    let i = Instant::now();
    if at >= i {
        now + (at - i)
    } else {
        now - (i - at)
    }
}

impl<S: AccountSeat> Seated<S> {
    pub fn new(seat: S, account: Arc<Account>, on_loss: OnClusterLoss) -> Self {
        let seen = seat.member().memory().load(&seat.record_key());
        Seated {
            rotates: matches!(account.grant, Grant::RefreshToken { .. }),
            seat,
            account,
            on_loss,
            inner: Mutex::new(Inner {
                seen,
                ..Inner::default()
            }),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .expect("never poisoned: no panics under the lock")
    }

    fn name(&self) -> &str {
        &self.account.name
    }

    /// Cut off from the cluster (etcd out of reach long enough, or another key):
    /// refresh alone only as `on_cluster_loss` allows, and never a chain.
    fn cut_off(&self) -> Turn {
        let member = self.seat.member();
        let long_enough = member.key_check() == KeyCheck::Mismatch
            || member.unreachable_for().is_some_and(|d| d >= member.ttl());
        if long_enough && self.on_loss == OnClusterLoss::Refresh && !self.rotates {
            Turn::Alone
        } else {
            Turn::Wait
        }
    }

    /// Remembers that generation `g` was seen.
    fn saw(&self, g: u64) {
        let mut i = self.inner();
        if g > i.seen {
            i.seen = g;
            drop(i);
            if let Err(e) = self
                .seat
                .member()
                .memory()
                .store(&self.seat.record_key(), g)
            {
                tracing::error!(account = %self.name(), "failed to remember the shared record's generation: {e}");
            }
        }
    }

    /// Says, once per record, that it was refused.
    fn refuse(&self, pos: Position, why: String) {
        let mut i = self.inner();
        if i.refused.as_ref().map(|(r, _)| *r) != Some(pos.revision) {
            tracing::error!(account = %self.name(), revision = pos.revision, "refused the shared record: {why}");
        }
        i.refused = Some((pos.revision, why));
    }

    /// When this member first saw the claim `id`.
    fn first_seen(&self, id: u64) -> Instant {
        let mut i = self.inner();
        if let Some((_, at)) = i.claims_seen.iter().find(|(c, _)| *c == id) {
            return *at;
        }
        let now = Instant::now();
        i.claims_seen.push_back((id, now));
        while i.claims_seen.len() > 16 {
            i.claims_seen.pop_front();
        }
        now
    }

    /// The record as it is now, judged: a sealed record older than what was seen is
    /// refused too.
    async fn read(&self) -> Option<Stored> {
        let stored = match self.seat.read().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(account = %self.name(), "cluster: {e}");
                return None;
            }
        };
        Some(match stored {
            Stored::Sealed(r, pos) if r.generation < self.inner().seen => {
                let why = format!(
                    "its generation {} is older than generation {} seen before (an older record put back, or etcd restored from a backup)",
                    r.generation,
                    self.inner().seen
                );
                self.refuse(pos, why);
                Stored::Refused(super::record::SealError::Unauthentic, pos)
            }
            Stored::Refused(e, pos) => {
                self.refuse(pos, e.to_string());
                Stored::Refused(e, pos)
            }
            Stored::Sealed(r, pos) => {
                self.saw(r.generation);
                {
                    let mut i = self.inner();
                    i.refused = None;
                }
                if let Some(f) = &r.in_flight {
                    self.first_seen(f.claim);
                }
                if let Some(o) = r.provider_offset_ms {
                    self.seat.member().note_provider_offset(o);
                }
                Stored::Sealed(r, pos)
            }
            other => other,
        })
    }

    /// The token times of `r` (read at `pos`) on this member's clock: the lifetime it
    /// had left when written, less the record's age, from now. A record whose write was
    /// seen as it happened is as old as that; else (a member that joins later, a claim,
    /// which carries the token's times as they were written) it is timed by etcd's
    /// clock as both members see it. A token is timed once, on the monotonic clock: a
    /// step of this member's wall clock moves its times with it.
    fn times(&self, r: &Record, pos: Position) -> Option<(SystemTime, SystemTime)> {
        let saved = r.state.token.as_ref()?;
        let token = saved.to_token();
        let id = token_id(&token);
        let member = self.seat.member();
        let cached = self
            .inner()
            .taken
            .as_ref()
            .filter(|t| t.token == Some(id))
            .and_then(|t| t.expires);
        let expires = match (cached, r.token_left_ms) {
            (Some(e), _) => e,
            (None, Some(left)) => {
                let live = self
                    .seat
                    .arrived(pos.revision)
                    .filter(|_| r.in_flight.is_none());
                let age = match (live, r.written_at_ms, member.backend_latest_ms()) {
                    (Some(at), _, _) => at.elapsed().as_millis() as i64,
                    (None, Some(w), Some(b)) => b - w,
                    _ => 0,
                }
                .clamp(0, left as i64) as u64;
                Instant::now() + Duration::from_millis(left - age)
            }
            // Written without it: the writer's times are all there is.
            (None, None) => return Some((token.issued_at, token.expires_at)),
        };
        self.inner().taken = Some(Taken {
            revision: pos.revision,
            token: Some(id),
            expires: Some(expires),
        });
        let expires = wall_of(member.clock().now(), expires);
        Some((expires - token.lifetime(), expires))
    }

    /// `state` with its token timed at `times`.
    fn retimed(state: &Portable, times: Option<(SystemTime, SystemTime)>) -> Portable {
        let mut p = state.clone();
        if let (Some(t), Some((issued, expires))) = (&state.token, times) {
            let mut token = t.to_token();
            token.issued_at = issued;
            token.expires_at = expires;
            p.token = Some(SavedToken::from_token(&token));
        }
        p
    }

    /// The configured seed of the refresh_token grant, if readable.
    fn seed(&self) -> Option<String> {
        match &self.account.grant {
            Grant::RefreshToken { refresh_token } => {
                refresh_token.read().ok().map(|s| s.expose().to_owned())
            }
            _ => None,
        }
    }

    /// A new record, one generation on from `base` (or from what was seen), holding
    /// `state`.
    fn next_record(&self, base: Option<&Record>, state: Portable) -> Record {
        let member = self.seat.member();
        let generation = base.map_or(0, |b| b.generation).max(self.inner().seen) + 1;
        Record {
            generation,
            fetched_by: base.map_or_else(|| member.name().to_owned(), |b| b.fetched_by.clone()),
            token_left_ms: base.and_then(|b| b.token_left_ms),
            written_at_ms: base.and_then(|b| b.written_at_ms),
            provider_offset_ms: base.and_then(|b| b.provider_offset_ms),
            seed: base.and_then(|b| b.seed.clone()),
            in_flight: None,
            state,
        }
    }
}

impl<S: AccountSeat> Coordinator for Seated<S> {
    fn changed(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.seat.changed())
    }

    fn turn(&self) -> BoxFuture<'_, Turn> {
        Box::pin(async move {
            match self.seat.member().key_check() {
                KeyCheck::Ok => {}
                _ => return self.cut_off(),
            }
            match self.seat.campaign().await {
                Ok(Lead::Me) => Turn::Lead,
                Ok(Lead::Other(name)) => Turn::Follow(name),
                Ok(Lead::Unknown) => self.cut_off(),
                Err(e) => {
                    tracing::debug!(account = %self.name(), "cluster: {e}");
                    self.cut_off()
                }
            }
        })
    }

    fn shared(&self) -> BoxFuture<'_, Option<Shared>> {
        Box::pin(async move {
            let Stored::Sealed(r, pos) = self.read().await? else {
                return None;
            };
            let seen = self.seat.arrived(pos.revision).is_some() && r.in_flight.is_none();
            if !seen && self.seat.member().backend_latest_ms().is_none() {
                // Not seen as it was written: timed by the store's clock, of which no
                // answer told anything yet. (After one answer it is timed at once, as
                // old as it can be: a member that just started serves the cluster's
                // token within milliseconds, not once the clock is known to 150 ms.)
                self.seat.member().calibration().await;
            }
            let before = self.inner().taken.as_ref().and_then(|t| t.token);
            let times = self.times(&r, pos);
            let now = self.inner().taken.as_ref().and_then(|t| t.token);
            {
                let mut i = self.inner();
                i.holds = r.generation;
                match &mut i.taken {
                    Some(t) => t.revision = pos.revision,
                    None => {
                        i.taken = Some(Taken {
                            revision: pos.revision,
                            token: None,
                            expires: None,
                        })
                    }
                }
            }
            Some(Shared {
                state: Self::retimed(&r.state, times),
                fetched_by: r.fetched_by.clone(),
                times,
                newer: now.is_some() && now != before,
            })
        })
    }

    fn claim(&self, state: Portable) -> BoxFuture<'_, Claim> {
        Box::pin(async move {
            for _ in 0..3 {
                let Some(stored) = self.read().await else {
                    return Claim::Lost;
                };
                let (base, at, after) = match self.claim_base(stored, &state).await {
                    ClaimBase::Over { base, at, after } => (base, at, after),
                    ClaimBase::Created => continue,
                    ClaimBase::Decided(claim) => return claim,
                };
                // A dead member's request costs nothing here: no link to wait for.
                let after = if self.rotates { after } else { None };
                let record = self.claim_record(base.as_deref(), &state, after.clone());
                return self.write_claim(at, record, after).await;
            }
            Claim::Lost
        })
    }

    fn share(
        &self,
        state: Portable,
        fresh: bool,
        expires_at: Option<SystemTime>,
    ) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let Some((at, claimed, claimed_at)) = self.inner().mine.take() else {
                return false;
            };
            let member = self.seat.member();
            let now = member.clock().now();
            let mut record = self.next_record(Some(&claimed), state);
            record.generation = claimed.generation + 1;
            if fresh {
                record.fetched_by = member.name().to_owned();
            }
            // To the millisecond when the caller knows it (the state has whole seconds).
            let times = record
                .state
                .token
                .as_ref()
                .map(|t| t.to_token())
                .map(|t| (t.issued_at, expires_at.unwrap_or(t.expires_at)));
            record.token_left_ms =
                times.map(|(_, e)| e.duration_since(now).unwrap_or_default().as_millis() as u64);
            record.written_at_ms = member.backend_now_ms();
            record.provider_offset_ms = member
                .provider_minus_backend()
                .or(claimed.provider_offset_ms);
            let token = record.state.token.as_ref().map(|t| token_id(&t.to_token()));
            let expires =
                times.map(|(_, e)| Instant::now() + e.duration_since(now).unwrap_or_default());
            // A chain's answer is the only copy of its next link: it is written for as
            // long as the claim stands (until the others may take the link over), also
            // through etcd being out of reach meanwhile.
            let wait = claimed
                .in_flight
                .as_ref()
                .map_or(Duration::ZERO, |f| Duration::from_millis(f.wait_ms));
            let give_up = claimed_at + if self.rotates { wait } else { Duration::ZERO };
            loop {
                match self.seat.write(at, &record).await {
                    Ok(Some(pos)) => {
                        self.saw(record.generation);
                        let mut i = self.inner();
                        i.holds = record.generation;
                        i.taken = Some(Taken {
                            revision: pos.revision,
                            token,
                            expires,
                        });
                        return true;
                    }
                    Ok(None) => {
                        // Moved on: another took the link over, or this very write
                        // landed before an answer to it was lost (the next read tells).
                        tracing::warn!(account = %self.name(), "the shared record moved on while this member's request was out: its answer is not shared");
                        return false;
                    }
                    Err(e) if Instant::now() >= give_up => {
                        tracing::error!(account = %self.name(), "failed to share the account's state ({e}){}", if self.rotates {
                            ": the others may take the link over, and the link this member fetched is lost to them"
                        } else {
                            ""
                        });
                        return false;
                    }
                    Err(e) => {
                        tracing::debug!(account = %self.name(), "cluster: failed to share the answer, trying again: {e}");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        })
    }

    fn ask_leader(&self, force: bool) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let held = self.inner().taken.as_ref().map_or(0, |t| t.revision);
            let request = LeaderRequest {
                member: self.seat.member().name().to_owned(),
                id: rand::random(),
                force,
                held,
            };
            match self.seat.ask(&request).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(account = %self.name(), "failed to ask the leader for a refresh: {e}");
                    false
                }
            }
        })
    }

    fn asked(&self) -> BoxFuture<'_, Option<bool>> {
        Box::pin(async move {
            let (request, _) = match self.seat.take_request().await {
                Ok(r) => r?,
                Err(e) => {
                    tracing::debug!(account = %self.name(), "cluster: {e}");
                    return None;
                }
            };
            // A refresh claimed after the record the member held answers it (members
            // asking at once cause one refresh).
            let last = self.inner().last_claim;
            if !request.force && last > 0 && last >= request.held {
                tracing::debug!(account = %self.name(), member = %request.member, "a refresh since answers the member's request");
                return None;
            }
            tracing::info!(account = %self.name(), member = %request.member, force = request.force, "member asked for a refresh");
            Some(request.force)
        })
    }

    fn timed(&self, token: &crate::oauth::Token) -> Option<(SystemTime, SystemTime)> {
        let i = self.inner();
        let t = i
            .taken
            .as_ref()
            .filter(|t| t.token == Some(token_id(token)))?;
        let expires = wall_of(self.seat.member().clock().now(), t.expires?);
        Some((expires - token.lifetime(), expires))
    }

    fn provider_date(&self, date: SystemTime, received: SystemTime) {
        self.seat.member().note_provider_date(date, received);
    }

    fn warning(&self) -> Option<String> {
        let member = self.seat.member();
        let mut parts = Vec::new();
        if member.key_check() == KeyCheck::Mismatch {
            parts.push(member.mismatch_message());
        }
        let others = self.seat.other_identities();
        let told = (!others.is_empty()).then(|| {
            format!(
                "members {} share the name {:?} with another identity (token_url, grant_type, client_id, username, scope or extra_params differ): they are another account, refreshed apart; make the settings agree",
                others.into_iter().collect::<Vec<_>>().join(", "),
                self.name()
            )
        });
        {
            let mut i = self.inner();
            if told != i.others_told {
                if let Some(t) = &told {
                    tracing::error!(account = %self.name(), "{t}");
                }
                i.others_told = told.clone();
            }
            if let Some((_, why)) = &i.refused {
                parts.push(format!("refused the shared record: {why}"));
            }
        }
        parts.extend(told);
        parts.extend(member.skew_warning());
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    fn resign(&self) -> BoxFuture<'_, ()> {
        // Bounded: at shutdown the member's lease is revoked anyway.
        Box::pin(async move {
            let _ = tokio::time::timeout(Duration::from_millis(300), self.seat.resign()).await;
        })
    }

    fn me(&self) -> &str {
        self.seat.member().name()
    }

    fn status(&self) -> Arc<dyn ClusterStatus> {
        self.seat.status()
    }
}
