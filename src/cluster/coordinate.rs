//! The account layer's [`Coordinator`] on etcd: whose turn it is (the election, and
//! `on_cluster_loss` when etcd is out of reach), the shared record read and written
//! through the account's [`Seat`].

use std::sync::atomic::{AtomicU64, Ordering};

use super::member::{Lead, Seat};
use super::record::Record;
use crate::account::coordinator::{BoxFuture, Coordinator, Shared, Turn};
use crate::account::persist::Portable;
use crate::config::OnClusterLoss;

pub struct Seated {
    seat: Seat,
    /// The refresh_token grant never refreshes alone: a second refresher forks the chain.
    rotates: bool,
    on_loss: OnClusterLoss,
    /// The highest record generation seen, so a write is always newer.
    generation: AtomicU64,
}

impl Seated {
    pub fn new(seat: Seat, rotates: bool, on_loss: OnClusterLoss) -> Self {
        Seated {
            seat,
            rotates,
            on_loss,
            generation: AtomicU64::new(0),
        }
    }

    fn cut_off(&self) -> Turn {
        let member = self.seat.member();
        let long_enough = member.unreachable_for().is_some_and(|d| d >= member.ttl());
        if long_enough && self.on_loss == OnClusterLoss::Refresh && !self.rotates {
            Turn::Alone
        } else {
            Turn::Wait
        }
    }

    async fn record(&self) -> Option<Record> {
        match self.seat.read().await {
            Ok(Some(r)) => {
                self.generation.fetch_max(r.generation, Ordering::SeqCst);
                Some(r)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!("cluster: {e}");
                None
            }
        }
    }
}

/// The token's issue time in a portable state (Unix seconds), for "never older over
/// newer"; none sorts first.
fn issued(p: &Portable) -> Option<u64> {
    p.token.as_ref().map(|t| t.issued_at_secs())
}

impl Coordinator for Seated {
    fn changed(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.seat.changed())
    }

    fn turn(&self) -> BoxFuture<'_, Turn> {
        Box::pin(async move {
            match self.seat.campaign().await {
                Ok(Lead::Me) => Turn::Lead,
                Ok(Lead::Other(name)) => Turn::Follow(name),
                Ok(Lead::Unknown) => self.cut_off(),
                Err(e) => {
                    tracing::debug!("cluster: {e}");
                    self.cut_off()
                }
            }
        })
    }

    fn shared(&self) -> BoxFuture<'_, Option<Shared>> {
        Box::pin(async move {
            let r = self.record().await?;
            Some(Shared {
                state: r.state.clone(),
                fetched_by: r.fetched_by.clone(),
            })
        })
    }

    fn share(&self, state: Portable) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            // A newer shared token is never overwritten by an older one (a member that
            // was cut off comes back with what it fetched meanwhile).
            if let Some(current) = self.record().await {
                if issued(&current.state) > issued(&state) {
                    return true;
                }
            }
            let record = Record {
                generation: self.generation.fetch_add(1, Ordering::SeqCst) + 1,
                fetched_by: self.seat.member().name().to_owned(),
                state,
            };
            match self.seat.publish(&record).await {
                Ok(written) => written,
                Err(e) => {
                    tracing::warn!("cluster: failed to share the account's state: {e}");
                    false
                }
            }
        })
    }

    fn resign(&self) -> BoxFuture<'_, ()> {
        // Bounded: at shutdown the member's lease is revoked anyway.
        Box::pin(async move {
            let _ = tokio::time::timeout(std::time::Duration::from_millis(300), self.seat.resign())
                .await;
        })
    }

    fn me(&self) -> &str {
        self.seat.member().name()
    }

    fn status(&self) -> std::sync::Arc<dyn crate::account::coordinator::ClusterStatus> {
        self.seat.member().clone()
    }
}
