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
//!
//! Helpers live in `support/`.

mod daemon;
mod lifecycle;
mod once;
mod schedule;
mod service;
mod support;
