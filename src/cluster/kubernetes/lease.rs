//! The election of the member that refreshes a shared account, on a
//! `coordination.k8s.io/v1` Lease per seat: taking it (or over it, after it went
//! unrenewed for its duration on this member's monotonic clock), renewing the ones it
//! holds, telling a seat its leader's Lease lapsed, and releasing it.
//!
//! Not here: what this member knows of each Lease (`member`'s `LeaseView`) and the
//! member's loop that drives the renewals (`member`), the watch that brings other
//! members' renewals (`watch`), the record Secret (`seat`).

use std::time::Duration;

use tokio::time::Instant;

use super::client::{micro_time, KubeError, Lease, LeaseSpec, Resource};
use super::member::KubeMember;
use super::names::lease_name;
use super::seat::KubeSeat;
use crate::cluster::member::{KeyCheck, Lead};

impl KubeMember {
    /// Renews every Lease this member holds.
    pub(super) async fn renew_all(&self) {
        let held: Vec<(String, Lease)> = {
            let seats = self.seats.lock().expect("never poisoned");
            seats
                .iter()
                .filter_map(|(id, s)| s.lease.mine.as_ref().map(|(l, _)| (id.clone(), l.clone())))
                .collect()
        };
        for (id, mut l) in held {
            l.spec.renew_time = Some(micro_time(self.clock.now()));
            let sent = Instant::now();
            let r = self.outcome(
                "update leases",
                self.kube
                    .update(Resource::Leases, &lease_name(&id), &l)
                    .await,
            );
            let mut seats = self.seats.lock().expect("never poisoned");
            let Some(s) = seats.get_mut(&id) else {
                continue;
            };
            match r {
                Ok(Some(new)) => {
                    if s.lease.mine.is_some() {
                        s.lease.mine = Some((new, sent + self.ttl));
                    }
                }
                Ok(None) => {
                    tracing::warn!(member = %self.name, seat = %id, "the account's Lease changed under this member: its lead is lost");
                    s.lease.mine = None;
                    s.changed.send_modify(|n| *n += 1);
                }
                Err(_) => {
                    if s.lease
                        .mine
                        .as_ref()
                        .is_some_and(|(_, until)| Instant::now() >= *until)
                    {
                        tracing::warn!(member = %self.name, seat = %id, "the API server did not renew the account's Lease within its time to live: the lead is lost");
                        s.lease.mine = None;
                        s.changed.send_modify(|n| *n += 1);
                    }
                }
            }
        }
    }

    /// Tells each seat whose leader's Lease went unrenewed for its duration.
    pub(super) fn lapse_others(&self) {
        let mut seats = self.seats.lock().expect("never poisoned");
        for s in seats.values_mut() {
            if let Some((_, _, seen, dur, told)) = &mut s.lease.other {
                if !*told && seen.elapsed() >= *dur {
                    *told = true;
                    s.changed.send_modify(|n| *n += 1);
                }
            }
        }
    }

    pub(super) async fn release(&self, id: &str, mut l: Lease) {
        l.spec.holder_identity = None;
        l.spec.lease_duration_seconds = Some(1);
        l.spec.renew_time = Some(micro_time(self.clock.now()));
        match self
            .kube
            .update(Resource::Leases, &lease_name(id), &l)
            .await
        {
            Ok(_) => {
                tracing::debug!(member = %self.name, seat = %id, "released the account's Lease")
            }
            Err(e) => tracing::warn!(member = %self.name, "failed to release a Lease: {e}"),
        }
    }
}

impl KubeSeat {
    /// Whether this member surely holds the Lease now (with a tenth of its time to live
    /// to spare for the request that relies on it).
    pub(super) fn leads(&self) -> bool {
        let ttl = self.member.ttl;
        self.member
            .with_seat(&self.id, |s| {
                s.lease
                    .mine
                    .as_ref()
                    .is_some_and(|(_, until)| Instant::now() + ttl / 10 < *until)
            })
            .unwrap_or(false)
    }

    pub(super) fn spec(&self, transitions: i64) -> LeaseSpec {
        let now = micro_time(self.member.clock.now());
        LeaseSpec {
            holder_identity: Some(self.member.name.clone()),
            lease_duration_seconds: Some(self.member.ttl.as_secs().max(1) as i64),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
        }
    }

    pub(super) fn hold(&self, l: Lease, sent: Instant) {
        let until = sent + self.member.ttl;
        self.member.with_seat(&self.id, |s| {
            s.lease.mine = Some((l, until));
            s.lease.other = None;
        });
    }

    /// Takes the seat's Lease if it is free or lapsed; who leads.
    pub(super) async fn elect(&self) -> Result<Lead, KubeError> {
        if self.member.key_check.borrow().clone() != KeyCheck::Ok {
            return Ok(Lead::Unknown);
        }
        if self.leads() {
            return Ok(Lead::Me);
        }
        let m = &self.member;
        let name = lease_name(&self.id);
        for _ in 0..2 {
            let sent = Instant::now();
            let current: Option<Lease> =
                m.outcome("get leases", m.kube.get(Resource::Leases, &name).await)?;
            let Some(mut l) = current else {
                let new = Lease::new(self.meta(name.clone()), self.spec(0));
                match m.outcome("create leases", m.kube.create(Resource::Leases, &new).await)? {
                    Some(l) => {
                        self.hold(l, sent);
                        return Ok(Lead::Me);
                    }
                    None => continue,
                }
            };
            let holder = l.spec.holder_identity.clone().unwrap_or_default();
            let rv = l.metadata.resource_version.clone().unwrap_or_default();
            let dur = Duration::from_secs(l.spec.lease_duration_seconds.unwrap_or(1).max(1) as u64);
            let free = if holder.is_empty() || holder == m.name {
                true
            } else {
                // Lapsed when this member saw it unchanged for its duration.
                let seen = m
                    .with_seat(&self.id, |s| match &s.lease.other {
                        Some((h, r, at, _, _)) if *h == holder && *r == rv => Some(*at),
                        _ => {
                            s.lease.other =
                                Some((holder.clone(), rv.clone(), Instant::now(), dur, false));
                            None
                        }
                    })
                    .flatten();
                seen.is_some_and(|at| at.elapsed() >= dur)
            };
            if !free {
                return Ok(Lead::Other(holder));
            }
            let transitions = l.spec.lease_transitions.unwrap_or(0) + i64::from(holder != m.name);
            let mut spec = self.spec(transitions);
            if holder == m.name {
                spec.acquire_time = l.spec.acquire_time.clone();
            }
            l.spec = spec;
            l.metadata.labels = self.meta(String::new()).labels;
            match m.outcome(
                "update leases",
                m.kube.update(Resource::Leases, &name, &l).await,
            )? {
                Some(l) => {
                    if holder != m.name {
                        tracing::info!(member = %m.name, seat = %self.id, previous = %holder, "took over the account's Lease");
                    }
                    self.hold(l, sent);
                    return Ok(Lead::Me);
                }
                None => continue,
            }
        }
        Ok(Lead::Unknown)
    }
}
