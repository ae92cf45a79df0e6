//! The account map readers see: every running account by name, as a cheap snapshot.
//! The supervisor (`daemon`) alone builds it and publishes a new one on a `watch`
//! channel whenever accounts start or stop; the socket server only reads it.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::AccountView;

/// Every running account by name, as readers see them.
pub type Accounts = Arc<BTreeMap<String, AccountView>>;
