//! `on_refresh` (a command, no shell) and `on_refresh_signal` (a signal to the process
//! named by a pid file). Both run after every output of the account is written, from the
//! account's own task, so never two at once for one account; both are bounded in time.
//! A failure is logged and not retried: the next rotation runs the hook again.
//!
//! A hook runs with an empty environment but `PATH`, `LANG`, `TOKEND_ACCOUNT` and
//! `TOKEND_EXPIRES_AT` (SPEC §6): tokend's own environment may hold secrets (`{ env =
//! ... }`), `CREDENTIALS_DIRECTORY` and `NOTIFY_SOCKET`, none of which a hook may see.

use std::process::Stdio;
use std::time::SystemTime;

use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::config::Account;

/// The search path a hook gets when tokend has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs the hooks of `account` for a token that expires at `expires_at`.
pub async fn run(account: &Account, expires_at: SystemTime) {
    if let Some(argv) = &account.options.on_refresh {
        run_command(account, argv, expires_at).await;
    }
    if let Some(sig) = &account.options.on_refresh_signal {
        let result = std::fs::read_to_string(&sig.pid_file)
            .map_err(|e| format!("failed to read pid file {}: {e}", sig.pid_file.display()))
            .and_then(|s| {
                s.trim()
                    .parse::<i32>()
                    .ok()
                    .filter(|p| *p > 1)
                    .ok_or_else(|| {
                        format!("pid file {} holds no process id", sig.pid_file.display())
                    })
            })
            .and_then(|pid| {
                kill(Pid::from_raw(pid), sig.signal)
                    .map_err(|e| format!("failed to signal process {pid}: {e}"))
            });
        match result {
            Ok(()) => {
                tracing::debug!(account = %account.name, signal = %sig.signal, "on_refresh_signal sent")
            }
            Err(e) => tracing::warn!(account = %account.name, "on_refresh_signal: {e}"),
        }
    }
}

async fn run_command(account: &Account, argv: &[String], expires_at: SystemTime) {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
        )
        .env("TOKEND_ACCOUNT", &account.name)
        .env("TOKEND_EXPIRES_AT", crate::clock::rfc3339(expires_at));
    if let Some(lang) = std::env::var_os("LANG") {
        cmd.env("LANG", lang);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(account = %account.name, "on_refresh: failed to start {:?}: {e}", argv[0]);
            return;
        }
    };
    match tokio::time::timeout(account.options.hook_timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => {
            tracing::debug!(account = %account.name, "on_refresh hook finished")
        }
        Ok(Ok(status)) => {
            tracing::warn!(account = %account.name, "on_refresh: {:?} failed: {status}", argv[0])
        }
        Ok(Err(e)) => {
            tracing::warn!(account = %account.name, "on_refresh: failed to wait for {:?}: {e}", argv[0])
        }
        Err(_) => {
            let _ = child.kill().await;
            tracing::warn!(
                account = %account.name,
                "on_refresh: {:?} killed after hook_timeout ({:?})",
                argv[0],
                account.options.hook_timeout
            );
        }
    }
}
