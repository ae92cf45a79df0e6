//! The seam through which another layer coordinates an account's refreshes with other
//! tokend instances (cluster mode, SPEC §8), without the account layer knowing how: the
//! schedule (`task`) asks whether it may refresh, hands over what it fetched, and
//! adopts what others fetched. The cluster layer implements it on etcd.

use std::future::Future;
use std::pin::Pin;

use super::persist::Portable;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Whether this instance may ask the provider now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turn {
    /// It leads the account: it refreshes, and shares what it got.
    Lead,
    /// Another instance leads (by name): it waits for what that one shares.
    Follow(String),
    /// Cut off from the others for long enough, and allowed to refresh on its own.
    Alone,
    /// Cut off, and not allowed to refresh on its own (or not yet).
    Wait,
}

/// What others shared about the account.
pub struct Shared {
    pub state: Portable,
    /// The instance that fetched the token.
    pub fetched_by: String,
}

pub trait Coordinator: Send + Sync + 'static {
    /// Resolves when what others shared, or who leads, may have changed.
    fn changed(&mut self) -> BoxFuture<'_, ()>;
    /// Claims the lead if nobody holds it, and says whose turn it is.
    fn turn(&self) -> BoxFuture<'_, Turn>;
    /// The latest shared state, if any (and readable).
    fn shared(&self) -> BoxFuture<'_, Option<Shared>>;
    /// Shares this instance's state; false if it no longer leads (nothing written).
    fn share(&self, state: Portable) -> BoxFuture<'_, bool>;
    /// Gives up the lead, if held (the account stops here).
    fn resign(&self) -> BoxFuture<'_, ()>;
    /// This instance's name, for `refreshed_by`.
    fn me(&self) -> &str;
    /// This instance's place in its cluster, for readers.
    fn status(&self) -> std::sync::Arc<dyn ClusterStatus>;
}

/// What readers may know about this instance's place in its cluster (`/v1/cluster`).
pub trait ClusterStatus: Send + Sync + 'static {
    /// This member's name.
    fn member(&self) -> &str;
    /// Whether etcd answered within the lease's time to live.
    fn reachable(&self) -> bool;
}
