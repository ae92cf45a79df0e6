//! The Kubernetes backend of cluster mode (SPEC §8, "The Kubernetes backend"): this
//! member on the API server, and each shared account's [`KubeSeat`].
//!
//! Per shared account (a seat `tokend-{digest}`, the digest keyed by the cluster key over
//! the prefix, name and identity: no account name, URL or client id in the clear):
//! - a `coordination.k8s.io/v1` Lease elects the member that refreshes: `holderIdentity`
//!   is the member, renewed every third of `lease_ttl`; another member takes it over
//!   only after it saw the Lease unchanged for `leaseDurationSeconds` on its own
//!   monotonic clock (as client-go's leader election does: no two clocks compared), and
//!   a member that stops releases it (an empty holder: the others take it at once);
//! - a Secret holds the sealed record (the same AEAD record as on etcd), bound to the
//!   Secret's name, its `uid` and a version counter in an annotation; every write is an
//!   update conditional on the `resourceVersion` read, so a 409 means another member
//!   wrote first: the protocol re-reads and adopts, and never overwrites a newer record;
//! - a second Secret, `tokend-{digest}-ask`, carries a member's sealed request to the
//!   leader.
//!
//! The fencing of a refresh is the protocol's (`coordinate`): the claim of a link is a
//! conditional update of the record Secret made before the request, so of two members
//! that both believe they lead (a Lease taken over from a member cut off) only one
//! claim lands, and the other waits for its answer. The Lease only spares the others
//! the attempt. All objects carry `app.kubernetes.io/managed-by: tokend`; the member
//! watches Secrets and Leases by that label (from the last resourceVersion seen, listing
//! again after 410 Gone) and tells each seat when its objects changed, and a timer tells
//! a seat when its leader's Lease has gone unrenewed for its duration.
//!
//! The pieces: `member` (this member, its loops and its status), `lease` (the election
//! on Leases), `watch` (the watches), `seat` (a seat's Secrets and its `AccountSeat`),
//! `client` (the API calls), `kubeconfig` (how to reach the API server, and as whom),
//! `objects` (the wire types), `names` (the
//! names, labels and annotations of the objects), `errors` (the operator-facing error texts).

pub mod client;
mod errors;
mod kubeconfig;
mod lease;
mod member;
mod names;
mod objects;
mod seat;
mod watch;

pub use self::member::KubeMember;
pub use self::seat::KubeSeat;
