//! One account's life: the refresh engine that alone makes requests, keeps the saved
//! state and delivers (`engine`), the schedule that drives it in `run` (`task`), the
//! pure arithmetic of when to ask the provider next and what a failure means
//! (`schedule`), who an account is (`identity`), what is kept across restarts
//! (`persist`), and what readers see (`state`, `registry`).

pub mod alarms;
pub mod coordinator;
pub mod engine;
pub mod hooks;
pub mod identity;
pub mod metrics;
pub mod persist;
pub mod registry;
pub mod schedule;
pub mod slots;
pub mod state;
pub mod task;

pub use engine::Shared;
pub use registry::{Accounts, ByName};
pub use state::{Status, TokenState};
pub use task::{
    spawn, spawn_after, spawn_coordinated, AccountHandle, AccountView, Poke, Predecessor,
};
