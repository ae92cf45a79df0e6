//! One shared account's seat ([`KubeSeat`], handed out by [`KubeMember::seat`]): the
//! record Secret (sealed to its name, `uid` and version annotation, written by updates
//! conditional on the resourceVersion read), the `-ask` Secret that carries a request to the leader, the other seats of
//! the same account name; and its [`AccountSeat`] implementation.
//!
//! Not here: the Lease election (`lease`, which `campaign` asks), the member
//! (`member`), the API calls (`client`).

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

use super::client::{KubeError, ObjectMeta, Resource, SecretObject, MANAGED_BY};
use super::member::{KubeMember, LeaseView, SeatState};
use super::names::{ask_name, secret_name, NAME_LABEL, NEW, RECORD, VERSION};
use crate::account::coordinator::ClusterStatus;
use crate::account::identity::RequestIdentity;
use crate::cluster::backend::AccountSeat;
use crate::cluster::member::{Lead, Position, Stored};
use crate::cluster::record::{LeaderRequest, Place, Record};

/// One shared account's Lease and Secrets.
pub struct KubeSeat {
    pub(super) member: Arc<KubeMember>,
    /// The keyed digest that names its objects.
    pub(super) id: String,
    /// The keyed digest of the account's name (its label).
    pub(super) name_id: String,
    pub(super) changed: watch::Receiver<u64>,
}

impl KubeMember {
    /// This member's seat for account `name` with `identity`.
    pub fn seat(self: &Arc<Self>, name: &str, identity: &RequestIdentity) -> KubeSeat {
        let path = self.key.account_path(&self.prefix, name, identity);
        let id = self
            .key
            .seed_digest(&format!("tokend-kubernetes-seat\0{path}"));
        let name_id = self
            .key
            .seed_digest(&format!("tokend-kubernetes-name\0{}\0{name}", self.prefix));
        let changed = self
            .seats
            .lock()
            .expect("never poisoned")
            .entry(id.clone())
            .or_insert_with(|| SeatState {
                changed: watch::Sender::new(0),
                lease: LeaseView::default(),
                arrival: None,
                taken: None,
            })
            .changed
            .subscribe();
        KubeSeat {
            member: self.clone(),
            id,
            name_id,
            changed,
        }
    }
}

impl KubeSeat {
    pub(super) fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name,
            labels: self.member.labels(Some(&self.id), Some(&self.name_id)),
            ..ObjectMeta::default()
        }
    }

    fn position(s: &SecretObject) -> Option<Position> {
        let revision = s.metadata.resource_version.as_deref()?.parse().ok()?;
        let uid = s.metadata.uid.as_deref().unwrap_or_default();
        let d = ring::digest::digest(&ring::digest::SHA256, uid.as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&d.as_ref()[..8]);
        Some(Position {
            revision,
            place: Place {
                create_revision: i64::from_be_bytes(b) & i64::MAX,
                version: s
                    .metadata
                    .annotations
                    .get(VERSION)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            },
        })
    }

    fn judge(&self, at: &str, s: &SecretObject) -> Stored {
        let Some(pos) = Self::position(s) else {
            return Stored::Absent;
        };
        let value = s.get(RECORD).unwrap_or_default();
        if value == NEW {
            return Stored::New(pos);
        }
        match self.member.key.open(at, pos.place, &value) {
            Ok(r) => Stored::Sealed(Box::new(r), pos),
            Err(e) => Stored::Refused(e, pos),
        }
    }

    async fn swap(
        &self,
        at: Position,
        record: &Record,
        lead: bool,
    ) -> Result<Option<Position>, KubeError> {
        if lead && !self.leads() {
            return Ok(None);
        }
        let name = secret_name(&self.id);
        let place = Place {
            create_revision: at.place.create_revision,
            version: at.place.version + 1,
        };
        let mut s = SecretObject::new(self.meta(name.clone()));
        s.metadata.resource_version = Some(at.revision.to_string());
        s.metadata
            .annotations
            .insert(VERSION.into(), place.version.to_string());
        s.set(
            RECORD,
            &self.member.key.seal(&self.record_key(), place, record),
        );
        let r = self.member.outcome(
            "update secrets",
            self.member.kube.update(Resource::Secrets, &name, &s).await,
        )?;
        Ok(r.and_then(|s| Self::position(&s))
            .filter(|p| p.place == place))
    }
}

impl AccountSeat for KubeSeat {
    type Member = KubeMember;
    type Error = KubeError;

    fn member(&self) -> &KubeMember {
        &self.member
    }

    fn status(&self) -> Arc<dyn ClusterStatus> {
        self.member.clone()
    }

    fn record_key(&self) -> String {
        format!(
            "kubernetes:{}/secrets/{}",
            self.member.namespace(),
            secret_name(&self.id)
        )
    }

    fn arrived(&self, revision: i64) -> Option<Instant> {
        self.member
            .with_seat(&self.id, |s| s.arrival)
            .flatten()
            .filter(|(r, _)| *r == revision)
            .map(|(_, at)| at)
    }

    async fn changed(&mut self) {
        if self.changed.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    async fn campaign(&self) -> Result<Lead, KubeError> {
        self.elect().await
    }

    async fn read(&self) -> Result<Stored, KubeError> {
        let m = &self.member;
        let s: Option<SecretObject> = m.outcome(
            "get secrets",
            m.kube.get(Resource::Secrets, &secret_name(&self.id)).await,
        )?;
        Ok(match s {
            None => Stored::Absent,
            Some(s) => self.judge(&self.record_key(), &s),
        })
    }

    async fn create(&self) -> Result<bool, KubeError> {
        if !self.leads() {
            return Ok(false);
        }
        let mut s = SecretObject::new(self.meta(secret_name(&self.id)));
        s.metadata.annotations.insert(VERSION.into(), "1".into());
        s.set(RECORD, NEW);
        let m = &self.member;
        Ok(
            m.outcome("create secrets", m.kube.create(Resource::Secrets, &s).await)?
                .is_some(),
        )
    }

    async fn claim(&self, at: Position, record: &Record) -> Result<Option<Position>, KubeError> {
        self.swap(at, record, true).await
    }

    async fn write(&self, at: Position, record: &Record) -> Result<Option<Position>, KubeError> {
        self.swap(at, record, false).await
    }

    async fn others(&self) -> Result<Vec<Record>, KubeError> {
        let m = &self.member;
        let selector = format!(
            "{}={},{NAME_LABEL}={}",
            MANAGED_BY.0, MANAGED_BY.1, self.name_id
        );
        let (items, _) = m.outcome(
            "list secrets",
            m.kube
                .list::<SecretObject>(Resource::Secrets, &selector)
                .await,
        )?;
        let mine = secret_name(&self.id);
        Ok(items
            .iter()
            .filter(|s| s.metadata.name != mine && !s.metadata.name.ends_with("-ask"))
            .filter_map(|s| {
                let at = format!("kubernetes:{}/secrets/{}", m.namespace(), s.metadata.name);
                match self.judge(&at, s) {
                    Stored::Sealed(r, _) => Some(*r),
                    _ => None,
                }
            })
            .collect())
    }

    fn other_identities(&self) -> BTreeSet<String> {
        // Presence is not tracked on this backend (a Lease per member and account would
        // double the objects): the records of other identities still guard the seed.
        BTreeSet::new()
    }

    async fn ask(&self, request: &LeaderRequest) -> Result<(), KubeError> {
        let m = &self.member;
        let name = ask_name(&self.id);
        let at = format!("kubernetes:{}/secrets/{name}", m.namespace());
        let value = m.key.seal_request(&at, request);
        for _ in 0..3 {
            let current: Option<SecretObject> =
                m.outcome("get secrets", m.kube.get(Resource::Secrets, &name).await)?;
            let done = match current {
                None => {
                    let mut s = SecretObject::new(self.meta(name.clone()));
                    s.set("request", &value);
                    m.outcome("create secrets", m.kube.create(Resource::Secrets, &s).await)?
                        .is_some()
                }
                Some(mut s) => {
                    s.set("request", &value);
                    m.outcome(
                        "update secrets",
                        m.kube.update(Resource::Secrets, &name, &s).await,
                    )?
                    .is_some()
                }
            };
            if done {
                return Ok(());
            }
        }
        Err(KubeError::Unreachable(
            "the request to the leader kept changing under this member".into(),
        ))
    }

    async fn take_request(&self) -> Result<Option<(LeaderRequest, i64)>, KubeError> {
        let m = &self.member;
        let name = ask_name(&self.id);
        let Some(mut s) = m.kube.get::<SecretObject>(Resource::Secrets, &name).await? else {
            return Ok(None);
        };
        let Some(value) = s.get("request").filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let rv = s.metadata.resource_version.clone().unwrap_or_default();
        if m.with_seat(&self.id, |st| st.taken.as_ref() == Some(&rv))
            .unwrap_or(false)
        {
            return Ok(None);
        }
        s.data.remove("request");
        let Some(cleared) = m.outcome(
            "update secrets",
            m.kube.update(Resource::Secrets, &name, &s).await,
        )?
        else {
            // Someone wrote a newer request meanwhile: it is taken next time.
            return Ok(None);
        };
        m.with_seat(&self.id, |st| {
            st.taken = cleared.metadata.resource_version.clone()
        });
        let at = format!("kubernetes:{}/secrets/{name}", m.namespace());
        Ok(m.key
            .open_request(&at, &value)
            .ok()
            .map(|r| (r, rv.parse().unwrap_or(0))))
    }

    async fn resign(&self) -> Result<(), KubeError> {
        let held = self
            .member
            .with_seat(&self.id, |s| s.lease.mine.take().map(|(l, _)| l))
            .flatten();
        if let Some(l) = held {
            self.member.release(&self.id, l).await;
        }
        Ok(())
    }
}
