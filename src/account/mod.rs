//! One account's life: its refresh loop (`task`), the pure arithmetic of when to ask
//! the provider next (`schedule`), and the state it publishes to readers (`state`).

pub mod hooks;
pub mod persist;
pub mod registry;
pub mod schedule;
pub mod state;
pub mod task;

pub use registry::Accounts;
pub use state::{Status, TokenState};
pub use task::{spawn, spawn_with_state, AccountHandle, AccountView, Poke, Shared};
