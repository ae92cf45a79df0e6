//! The steps of a claim (SPEC §8: the fenced refresh), for [`Seated`]'s
//! `Coordinator::claim`: what the record as read means for it (go on from it, create
//! it, wait for a link in flight, refuse), the record it writes, and that write. Not
//! the loop that reads and retries (`Coordinator::claim` in `coordinate`), nor the
//! sharing of a refresh's outcome after it.

use std::time::Duration;

use tokio::time::Instant;

use super::Seated;
use crate::account::coordinator::{request_timeout, Claim};
use crate::account::persist::Portable;
use crate::cluster::backend::{AccountSeat, MemberView, Position, Stored};
use crate::cluster::record::{InFlight, Record};

/// What the record as read means for a claim.
pub(super) enum ClaimBase {
    /// Claim over it: the record the claim goes on from (none: this member's state),
    /// where it is, and the member whose request died in flight, if one did.
    Over {
        base: Option<Box<Record>>,
        at: Position,
        after: Option<String>,
    },
    /// There was no record and it was created just now: read it again.
    Created,
    /// The claim is decided without a write.
    Decided(Claim),
}

impl<S: AccountSeat> Seated<S> {
    /// What `stored` means for a claim of `state`.
    pub(super) async fn claim_base(&self, stored: Stored, state: &Portable) -> ClaimBase {
        match stored {
            Stored::Absent => {
                if let Some(refused) = self.spent_elsewhere(state).await {
                    return ClaimBase::Decided(Claim::Refuse(refused));
                }
                match self.seat.create().await {
                    Ok(_) => ClaimBase::Created,
                    Err(e) => {
                        tracing::debug!(account = %self.name(), "cluster: {e}");
                        ClaimBase::Decided(Claim::Lost)
                    }
                }
            }
            Stored::New(at) => {
                if let Some(refused) = self.spent_elsewhere(state).await {
                    return ClaimBase::Decided(Claim::Refuse(refused));
                }
                ClaimBase::Over {
                    base: None,
                    at,
                    after: None,
                }
            }
            Stored::Refused(_, at) => {
                if let Some(held) = self.refused_claim(state) {
                    return ClaimBase::Decided(Claim::Refuse(held));
                }
                tracing::warn!(account = %self.name(), "writing this member's state (the newest link it has seen) back over the refused record");
                ClaimBase::Over {
                    base: None,
                    at,
                    after: None,
                }
            }
            Stored::Sealed(r, at) => {
                let mut after = None;
                if let Some(f) = &r.in_flight {
                    if let Some(wait) = self.in_flight_wait(f) {
                        return ClaimBase::Decided(wait);
                    }
                    after = Some(f.member.clone());
                }
                if self.rotates && r.state.refresh_token != state.refresh_token {
                    // Another link than this member's: take it first.
                    return ClaimBase::Decided(Claim::Lost);
                }
                ClaimBase::Over {
                    base: Some(r),
                    at,
                    after,
                }
            }
        }
    }

    /// While another member's request with the chain's current link may still be
    /// answered (a rotating chain only): the wait for it.
    fn in_flight_wait(&self, f: &InFlight) -> Option<Claim> {
        if !self.rotates {
            return None;
        }
        let until = self.first_seen(f.claim) + Duration::from_millis(f.wait_ms);
        (Instant::now() < until).then(|| Claim::Wait {
            until,
            why: format!(
                "member {} is asking the provider with the chain's current link: waiting up to {} for its answer",
                f.member,
                humantime::format_duration(Duration::from_secs(
                    until.saturating_duration_since(Instant::now()).as_secs() + 1
                ))
            ),
        })
    }

    /// The record a claim writes: one generation on from `base` (or this member's
    /// `state`), with the seed's digest, and this member's request in flight.
    pub(super) fn claim_record(
        &self,
        base: Option<&Record>,
        state: &Portable,
        after: Option<String>,
    ) -> Record {
        let member = self.seat.member();
        let mut record = self.next_record(
            base,
            match base {
                Some(b) => b.state.clone(),
                None => state.clone(),
            },
        );
        if record.seed.is_none() {
            record.seed = self.seed().map(|s| member.key().seed_digest(&s));
        }
        let wait = request_timeout(&self.account) + member.ttl();
        record.in_flight = Some(InFlight {
            member: member.name().to_owned(),
            claim: rand::random(),
            wait_ms: wait.as_millis() as u64,
            after,
        });
        record
    }

    /// Writes the claim's `record` over the one at `at`, if it is still there and this
    /// member still leads: then this member holds it and goes.
    pub(super) async fn write_claim(
        &self,
        at: Position,
        record: Record,
        after: Option<String>,
    ) -> Claim {
        match self.seat.claim(at, &record).await {
            Ok(Some(pos)) => {
                if let Some(a) = &after {
                    tracing::warn!(account = %self.name(), "member {a} died with a request on the wire (no answer within its time): sending the chain's link once more");
                }
                self.saw(record.generation);
                let mut i = self.inner();
                i.holds = record.generation;
                i.last_claim = pos.revision;
                i.mine = Some((pos, record, Instant::now()));
                Claim::Go { after }
            }
            Ok(None) => Claim::Lost,
            Err(e) => {
                tracing::debug!(account = %self.name(), "cluster: {e}");
                Claim::Lost
            }
        }
    }

    /// Where a claim on a record that does not open, or is older than what was seen,
    /// leads: this member writes its own state back over it if it holds the newest
    /// link it has seen; otherwise the account is held.
    fn refused_claim(&self, state: &Portable) -> Option<String> {
        let i = self.inner();
        let why = i
            .refused
            .as_ref()
            .map(|(_, w)| w.clone())
            .unwrap_or_else(|| "the shared record does not open".into());
        if !self.rotates || (i.seen > 0 && i.holds == i.seen && state.refresh_token.is_some()) {
            return None;
        }
        Some(format!(
            "{why}; this member does not hold the chain's newest link (generation {}), so it sends none: re-seed (tokend reseed) once the cause is known",
            i.seen
        ))
    }

    /// Before a chain starts from the configured seed: whether another identity of this
    /// account's name has spent that seed already (its record names it). Then it is
    /// never sent: why.
    async fn spent_elsewhere(&self, state: &Portable) -> Option<String> {
        if !self.rotates || state.refresh_token.is_some() {
            return None;
        }
        let digest = self
            .seed()
            .map(|s| self.seat.member().key().seed_digest(&s))?;
        let others = match self.seat.others().await {
            Ok(o) => o,
            Err(e) => {
                return Some(format!(
                    "could not make sure no other identity of this account spent its seed ({e}): not starting the chain yet"
                ))
            }
        };
        others.iter().any(|r| r.seed.as_deref() == Some(digest.as_str())).then(|| {
            format!(
                "the configured refresh_token was already spent by another identity of account {:?} (members whose token_url, grant_type, client_id, username, scope or extra_params differ from this one's): it is never sent again; make the settings agree on every member",
                self.name()
            )
        })
    }
}
