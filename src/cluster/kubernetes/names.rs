//! The names, labels and annotations of the backend's objects: which Lease and Secrets
//! belong to a seat, and the keys of a record Secret. Only names: what is in the objects
//! and who writes them is `seat`'s and `lease`'s.

/// The label that ties a seat's objects together (its digest).
pub(super) const SEAT_LABEL: &str = "tokend.dev/seat";
/// The label of every seat of one account name (a keyed digest of it).
pub(super) const NAME_LABEL: &str = "tokend.dev/account";
/// The annotation that counts the record Secret's writes (part of what a record is
/// sealed to: a record copied from another write does not open).
pub(super) const VERSION: &str = "tokend.dev/version";
/// The record Secret's data key.
pub(super) const RECORD: &str = "record";
/// The value of a record Secret created and not written yet.
pub(super) const NEW: &[u8] = b"new";

/// The name of a seat's Lease.
pub(super) fn lease_name(id: &str) -> String {
    format!("tokend-{id}")
}

/// The name of a seat's record Secret.
pub(super) fn secret_name(id: &str) -> String {
    format!("tokend-{id}")
}

/// The name of a seat's Secret of requests to the leader.
pub(super) fn ask_name(id: &str) -> String {
    format!("tokend-{id}-ask")
}
