//! tokend keeps OAuth2 access tokens fresh for other programs.
//!
//! How a token flows: [`config`] turns the TOML file into validated accounts. The
//! [`daemon`] supervisor starts each [`account`]: a task while it has something to do,
//! parked as data with an alarm while it waits ([`account::alarms`]); its task fetches
//! through an [`oauth::Endpoint`] (request building and response parsing live in
//! [`oauth`], with private_key_jwt assertions, client certificates and the discovery of
//! a token endpoint; keys are parsed in [`config::keys`]), writes every output
//! atomically through [`output`], runs its hooks, and
//! publishes its state on a channel of its own for readers. [`account::schedule`] decides,
//! purely, when to ask again and what a failure means; [`account::engine`] is the one
//! lifecycle (lock, restore, attempt, classify, save, deliver) that `run` and `once`
//! share. With `[cluster]`, [`cluster`] decides which tokend of many refreshes each
//! account and carries the result to the others over etcd. Readers ask the [`server`]
//! over its socket ([`client`]), which [`service`] wires to the daemon's published state; the credential helpers of kubectl, git and container
//! tools ([`credential`]) are such readers, each speaking its tool's protocol.

pub mod account;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod commands;
pub mod completion;
pub mod config;
pub mod credential;
pub mod daemon;
pub mod failure;
pub mod hex;
pub mod logging;
pub mod oauth;
pub mod output;
pub mod server;
pub mod service;
pub mod systemd;
pub mod watch;
