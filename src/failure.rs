//! Why a command failed, and so the exit status: decided here, once (STYLE.md: 0 ok,
//! 1 runtime failure, 2 usage or configuration error). The commands and the socket
//! client return it; `main` maps it to the process's exit code.

use crate::config::ConfigErrors;

/// Why a command failed, and so its exit status.
#[derive(Debug)]
pub enum Failure {
    /// Bad usage or configuration: exit 2 (systemd's RestartPreventExitStatus=2).
    Usage(anyhow::Error),
    /// Anything else: exit 1.
    Runtime(anyhow::Error),
    /// A runtime failure already told, in the form the caller's protocol wants (a
    /// credential helper's error message on stdout): exit 1, nothing more on stderr.
    Reported,
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Runtime(_) | Failure::Reported => 1,
        }
    }
}

impl From<ConfigErrors> for Failure {
    fn from(e: ConfigErrors) -> Self {
        Failure::Usage(e.into())
    }
}
