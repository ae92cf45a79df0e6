//! One account's place in the cluster (a [`Seat`]: `{prefix}/accounts/{name}/{digest}/`):
//! the election, the sealed `record` written by compare-and-swap on its revision, the
//! members of other identities, a member's request to the leader, and the seat's
//! [`AccountSeat`](super::super::backend::AccountSeat) implementation. Not the
//! protocol built on them (`coordinate`), nor the lease the election relies on
//! (`lease`).

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::account::identity::RequestIdentity;
use crate::cluster::etcd::{Compare, EtcdError, Kv, Op};
use crate::cluster::record::{LeaderRequest, Place, Record};

use super::{name_of, KeyCheck, Lead, Member, Position, Stored};

/// The value of a record key that was created and not written yet.
const NEW: &[u8] = b"new";

impl Member {
    /// This member's seat for account `name` with `identity` (SPEC §8: shared by name
    /// and identity).
    pub fn seat(self: &Arc<Self>, name: &str, identity: &RequestIdentity) -> Seat {
        let path = self.key.account_path(&self.prefix, name, identity);
        let changed = self
            .seats
            .lock()
            .expect("never poisoned")
            .entry(path.clone())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe();
        let seat = Seat {
            member: self.clone(),
            path: path.clone(),
            name: name.to_owned(),
            changed,
        };
        let me = self.clone();
        tokio::spawn(async move { me.announce(&path).await });
        seat
    }
}

impl Position {
    fn of(kv: &Kv) -> Self {
        Position {
            revision: kv.mod_revision,
            place: Place {
                create_revision: kv.create_revision,
                version: kv.version,
            },
        }
    }

    /// Where the next write puts the record.
    fn next(self) -> Place {
        Place {
            create_revision: self.place.create_revision,
            version: self.place.version + 1,
        }
    }
}

/// One account's place in the cluster.
pub struct Seat {
    member: Arc<Member>,
    path: String,
    name: String,
    changed: watch::Receiver<u64>,
}

impl Seat {
    pub fn member(&self) -> &Arc<Member> {
        &self.member
    }

    /// `{prefix}/accounts/{name}/{digest}`.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn leader_key(&self) -> String {
        format!("{}/leader", self.path)
    }

    pub fn record_key(&self) -> String {
        format!("{}/record", self.path)
    }

    fn request_key(&self) -> String {
        format!("{}/request", self.path)
    }

    /// When the watch brought the record write of `revision`, if it did (a write seen
    /// as it happened: its age is known to a few milliseconds).
    pub fn arrived(&self, revision: i64) -> Option<Instant> {
        self.member
            .arrivals
            .lock()
            .expect("never poisoned")
            .get(&self.path)
            .filter(|(r, _)| *r == revision)
            .map(|(_, at)| *at)
    }

    /// Waits until the account's keys may have changed.
    pub async fn changed(&mut self) {
        if self.changed.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Takes the lead if nobody holds it; says who leads.
    pub async fn campaign(&self) -> Result<Lead, EtcdError> {
        if self.member.key_check() != KeyCheck::Ok {
            return Ok(Lead::Unknown);
        }
        let Some(lease) = self.member.live_lease() else {
            return Ok(Lead::Unknown);
        };
        let key = self.leader_key();
        let me = self.member.name.as_bytes().to_vec();
        let r = self
            .member
            .etcd
            .txn(
                &[Compare::CreateRevision(key.clone(), 0)],
                &[Op::Put {
                    key: key.clone(),
                    value: me,
                    lease,
                }],
                &[Op::Get(key)],
            )
            .await?;
        self.member.contact();
        if r.succeeded {
            return Ok(Lead::Me);
        }
        Ok(match r.kvs.first() {
            Some(kv) if kv.lease == lease => Lead::Me,
            Some(kv) => Lead::Other(String::from_utf8_lossy(&kv.value).into_owned()),
            None => Lead::Unknown,
        })
    }

    /// The account's record as it is in etcd now.
    pub async fn read(&self) -> Result<Stored, EtcdError> {
        let at = self.record_key();
        let kv = self.member.etcd.get(&at).await?;
        self.member.contact();
        Ok(self.judge(&at, kv))
    }

    fn judge(&self, at: &str, kv: Option<Kv>) -> Stored {
        let Some(kv) = kv else {
            return Stored::Absent;
        };
        let pos = Position::of(&kv);
        if kv.value == NEW {
            return Stored::New(pos);
        }
        match self.member.key.open(at, pos.place, &kv.value) {
            Ok(r) => Stored::Sealed(Box::new(r), pos),
            Err(e) => Stored::Refused(e, pos),
        }
    }

    /// Creates the record key (not yet a record), if this member still leads and
    /// nobody created it: a sealed record is bound to the revision that created its key.
    pub async fn create(&self) -> Result<bool, EtcdError> {
        let Some(lease) = self.member.live_lease() else {
            return Ok(false);
        };
        let at = self.record_key();
        let r = self
            .member
            .etcd
            .txn(
                &[
                    Compare::Lease(self.leader_key(), lease),
                    Compare::CreateRevision(at.clone(), 0),
                ],
                &[Op::Put {
                    key: at,
                    value: NEW.to_vec(),
                    lease: 0,
                }],
                &[],
            )
            .await?;
        self.member.contact();
        Ok(r.succeeded)
    }

    /// Writes `record` over the one at `at` if it is still there and this member still
    /// holds the lead: the claim of a link. Where the record is then.
    pub async fn claim(
        &self,
        at: Position,
        record: &Record,
    ) -> Result<Option<Position>, EtcdError> {
        let Some(lease) = self.member.live_lease() else {
            return Ok(None);
        };
        self.swap(at, record, Some(lease)).await
    }

    /// Writes `record` over the one at `at` if it is still there (whoever leads): the
    /// answer to a claimed link. Where the record is then.
    pub async fn write(
        &self,
        at: Position,
        record: &Record,
    ) -> Result<Option<Position>, EtcdError> {
        self.swap(at, record, None).await
    }

    async fn swap(
        &self,
        at: Position,
        record: &Record,
        lease: Option<i64>,
    ) -> Result<Option<Position>, EtcdError> {
        let key = self.record_key();
        let place = at.next();
        let sealed = self.member.key.seal(&key, place, record);
        let mut compare = vec![Compare::ModRevision(key.clone(), at.revision)];
        if let Some(lease) = lease {
            compare.push(Compare::Lease(self.leader_key(), lease));
        }
        let r = self
            .member
            .etcd
            .txn(
                &compare,
                &[Op::Put {
                    key,
                    value: sealed,
                    lease: 0,
                }],
                &[],
            )
            .await?;
        self.member.contact();
        Ok(r.succeeded.then_some(Position {
            revision: r.revision,
            place,
        }))
    }

    /// The records of the other identities of this account's name (the ones that open).
    pub async fn others(&self) -> Result<Vec<Record>, EtcdError> {
        let root = format!("{}/accounts/{}/", self.member.prefix, self.name);
        let (kvs, _) = self.member.etcd.get_prefix(&root).await?;
        self.member.contact();
        Ok(kvs
            .into_iter()
            .filter(|kv| kv.key.ends_with("/record") && !kv.key.starts_with(&self.path))
            .filter_map(|kv| {
                let key = kv.key.clone();
                match self.judge(&key, Some(kv)) {
                    Stored::Sealed(r, _) => Some(*r),
                    _ => None,
                }
            })
            .collect())
    }

    /// The live members of this account's name that have another identity.
    pub fn other_identities(&self) -> BTreeSet<String> {
        let root = format!("{}/accounts/", self.member.prefix);
        let p = self.member.presence.lock().expect("never poisoned");
        p.iter()
            .filter(|(path, _)| **path != self.path && name_of(&root, path) == self.name)
            .flat_map(|(_, members)| members.iter().cloned())
            .collect()
    }

    /// Asks the account's leader for a refresh.
    pub async fn ask(&self, request: &LeaderRequest) -> Result<(), EtcdError> {
        let at = self.request_key();
        let value = self.member.key.seal_request(&at, request);
        self.member
            .etcd
            .txn(
                &[],
                &[Op::Put {
                    key: at,
                    value,
                    lease: 0,
                }],
                &[],
            )
            .await?;
        self.member.contact();
        Ok(())
    }

    /// Takes a member's request to the leader, if one waits: it is removed (if nobody
    /// wrote a newer one meanwhile). The request and the revision it was written at.
    pub async fn take_request(&self) -> Result<Option<(LeaderRequest, i64)>, EtcdError> {
        let at = self.request_key();
        let Some(kv) = self.member.etcd.get(&at).await? else {
            return Ok(None);
        };
        self.member
            .etcd
            .txn(
                &[Compare::ModRevision(at.clone(), kv.mod_revision)],
                &[Op::Delete(at.clone())],
                &[],
            )
            .await?;
        self.member.contact();
        Ok(self
            .member
            .key
            .open_request(&at, &kv.value)
            .ok()
            .map(|r| (r, kv.mod_revision)))
    }

    /// Gives up the lead, if held (the account stops here, or the member leaves).
    pub async fn resign(&self) -> Result<(), EtcdError> {
        let Some(l) = *self.member.lease.borrow() else {
            return Ok(());
        };
        let members = format!("{}/members/{}", self.path, self.member.name);
        self.member
            .etcd
            .txn(
                &[Compare::Lease(self.leader_key(), l.id)],
                &[Op::Delete(self.leader_key()), Op::Delete(members.clone())],
                &[Op::Delete(members)],
            )
            .await
            .map(drop)
    }
}

impl crate::cluster::backend::AccountSeat for Seat {
    type Member = Member;
    type Error = EtcdError;

    fn member(&self) -> &Member {
        &self.member
    }
    fn status(&self) -> Arc<dyn crate::account::coordinator::ClusterStatus> {
        self.member.clone()
    }
    fn record_key(&self) -> String {
        Seat::record_key(self)
    }
    fn arrived(&self, revision: i64) -> Option<Instant> {
        Seat::arrived(self, revision)
    }
    fn changed(&mut self) -> impl std::future::Future<Output = ()> + Send {
        Seat::changed(self)
    }
    fn campaign(&self) -> impl std::future::Future<Output = Result<Lead, EtcdError>> + Send {
        Seat::campaign(self)
    }
    fn read(&self) -> impl std::future::Future<Output = Result<Stored, EtcdError>> + Send {
        Seat::read(self)
    }
    fn create(&self) -> impl std::future::Future<Output = Result<bool, EtcdError>> + Send {
        Seat::create(self)
    }
    fn claim(
        &self,
        at: Position,
        record: &Record,
    ) -> impl std::future::Future<Output = Result<Option<Position>, EtcdError>> + Send {
        Seat::claim(self, at, record)
    }
    fn write(
        &self,
        at: Position,
        record: &Record,
    ) -> impl std::future::Future<Output = Result<Option<Position>, EtcdError>> + Send {
        Seat::write(self, at, record)
    }
    fn others(&self) -> impl std::future::Future<Output = Result<Vec<Record>, EtcdError>> + Send {
        Seat::others(self)
    }
    fn other_identities(&self) -> BTreeSet<String> {
        Seat::other_identities(self)
    }
    fn ask(
        &self,
        request: &LeaderRequest,
    ) -> impl std::future::Future<Output = Result<(), EtcdError>> + Send {
        Seat::ask(self, request)
    }
    fn take_request(
        &self,
    ) -> impl std::future::Future<Output = Result<Option<(LeaderRequest, i64)>, EtcdError>> + Send
    {
        Seat::take_request(self)
    }
    fn resign(&self) -> impl std::future::Future<Output = Result<(), EtcdError>> + Send {
        Seat::resign(self)
    }
}
