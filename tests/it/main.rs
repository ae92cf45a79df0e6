//! The integration tests, one binary (STYLE.md "Tests"):
//!
//! - `once`: `tokend once` against the fake IdP: the request each grant x client auth x
//!   params_in x basic_encoding sends, every output format and mode, exit codes.
//! - `daemon`: `tokend run` against the fake IdP, in real time: rotation, failures and
//!   recovery, expiry, SIGTERM, torn reads, secrets in the log, stale temporary files.
//! - `schedule`: the refresh schedule through the library API, on tokio's paused clock,
//!   against a scripted endpoint (no sockets).
//!
//! - `lifecycle`: reload, rate limits shared per provider, refused credentials held,
//!   restarts from the state directory, kill -9 during writes, hooks.
//! - `service`: sd_notify and journald, against sockets standing in for systemd's.
//! - `faults`: SPEC §6's failure classes reproduced for real: refusals and their holds,
//!   refresh-token chains against a provider that revokes reused ones, a full disk, a
//!   chown without privilege, absurd expiries and rate limits, refused reloads.
//!
//! Helpers live in `support/`.

mod cluster;
mod daemon;
mod faults;
mod hostile;
mod lifecycle;
mod once;
mod schedule;
mod service;
mod support;
