//! The integration tests, one binary (STYLE.md "Tests"):
//!
//! - `once`: `tokend once` against the fake IdP: the request each grant x client auth x
//!   params_in x basic_encoding sends, every output format and mode, exit codes.
//! - `daemon`: `tokend run` against the fake IdP, in real time: rotation, failures and
//!   recovery, expiry, SIGTERM, torn reads, secrets in the log, stale temporary files.
//! - `schedule`: the refresh schedule through the library API, on tokio's paused clock,
//!   against a scripted endpoint (no sockets).
//! - `lifecycle`: reload, rate limits shared per provider, refused credentials held,
//!   restarts from the state directory, kill -9 during writes, hooks.
//! - `service`: sd_notify and journald, against sockets standing in for systemd's.
//! - `socket`: the socket API, `get`, `status` and `refresh` end to end (by root and, for
//!   the access matrix, by test users it creates: needs root), and the server's limits
//!   against `serve_with` in-process.
//! - `faults`: SPEC §6's failure classes reproduced for real: refusals and their holds,
//!   refresh-token chains against a provider that revokes reused ones, a full disk, a
//!   chown without privilege, absurd expiries and rate limits, refused reloads.
//! - `hostile`: hostile input and least privilege: provider tokens a shell would run,
//!   hook environments, config lines never echoed, per-caller health, unsafe state_dirs.
//! - `cluster`: cluster mode's building blocks against real etcd members.
//! - `keys`: private_key_jwt and tls_client_auth against a real authorization server
//!   (oidc-provider), discovery (issuer, RFC 8414, fhir_base), `tokend jwks` and the
//!   key checks of `tokend check`.
//! - `kube`: the Kubernetes test bed: a real kube-apiserver (tests/k8s/), a service
//!   account's token and RBAC on leases and secrets, the sidecar manifest validated.
//!
//! - `credential`: the credential helpers with the real tools: kubectl's exec plugin
//!   against kube-apiserver trusting oidc-provider's JWTs, git clone and push against
//!   `git http-backend`, podman against docker-registry; each helper's failure paths.
//!
//! - `dpop`: DPoP-bound tokens (RFC 9449) against oidc-provider with DPoP on, proofs
//!   checked by a jose resource server; restart, refusals, the key kept out of sight.
//!
//! Helpers live in `support/`: the fake IdP, the daemon runner and bounded waits, a
//! plain HTTP client for the socket, the scripted endpoint, etcd members, oidc-provider
//! and the keys and certificates made for it, a Kubernetes API server, and the members of
//! a tokend cluster with the waits on them that the etcd and Kubernetes suites share. Daemon tests
//! wait on the daemon's state (its outputs, or `/v1/tokens` on its socket), and on its
//! log only where the log itself is under test.

mod chain;
mod cluster;
mod credential;
mod daemon;
mod dpop;
mod faults;
mod hostile;
mod inprocess;
mod keys;
mod kube;
mod lifecycle;
mod once;
mod schedule;
mod service;
mod socket;
mod starve;
mod support;
