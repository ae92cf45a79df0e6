//! The command line (clap). Parsing only; `main` dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use clap_complete::engine::ArgValueCandidates;

use crate::completion::account_names;
use crate::config::DEFAULT_PATH;

#[derive(Parser, Debug)]
#[command(
    name = "tokend",
    version,
    about = "Keeps OAuth2 access tokens fresh for other programs",
    long_about = "Keeps OAuth2 access tokens fresh for other programs.\n\n\
        tokend reads a list of provider accounts, refreshes each account's token on its \
        own schedule, and writes the current tokens atomically to permission-restricted \
        files. Programs read a file; nobody else handles a client secret or a password.",
    after_help = "Exit status: 0 ok, 1 runtime failure, 2 usage or configuration error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon in the foreground (what the systemd unit starts)
    Run(ConfigArg),
    /// Validate the config, and check that every secret is readable and every output
    /// directory writable
    Check(CheckArgs),
    /// Fetch tokens once, write every output, and exit: 0 only if all succeeded
    /// (init containers, cron-free one-shots)
    Once(OnceArgs),
    /// Print an account's token from the running daemon (raw, without a newline unless
    /// stdout is a terminal)
    Get(GetArgs),
    /// Show the accounts of the running daemon that you may read
    Status(StatusArgs),
    /// Ask the running daemon to refresh an account now (no sooner than its
    /// min_refresh_interval allows)
    Refresh(RefreshArgs),
    /// Print the public JSON Web Key Set (with kid and alg) of the accounts'
    /// private_key_jwt keys, to register with a provider
    Jwks(JwksArgs),
    /// Start an account's refresh-token chain again from the refresh_token configured
    /// now (after the provider issued a new one, or when its saved state is damaged).
    /// Only root or the daemon's own user. Through the running daemon, else directly
    /// in state_dir
    Reseed(ReseedArgs),
}

#[derive(Args, Debug)]
pub struct ReseedArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
    /// The account
    #[arg(value_name = "ACCOUNT", add = ArgValueCandidates::new(account_names))]
    pub account: String,
}

#[derive(Args, Debug)]
pub struct JwksArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Only these accounts (default: every account with client_auth = "private_key_jwt")
    #[arg(value_name = "ACCOUNT", add = ArgValueCandidates::new(account_names))]
    pub accounts: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ConfigArg {
    /// The config file
    #[arg(short = 'c', long = "config", env = "TOKEND_CONFIG", default_value = DEFAULT_PATH, value_name = "PATH")]
    pub config: PathBuf,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Read `{ credential = "NAME" }` secrets from DIR/NAME, as the unit's
    /// LoadCredential= would provide them (default: $CREDENTIALS_DIRECTORY)
    #[arg(long, value_name = "DIR")]
    pub credentials_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct OnceArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Only these accounts (default: all)
    #[arg(value_name = "ACCOUNT", add = ArgValueCandidates::new(account_names))]
    pub accounts: Vec<String>,
    /// Reuse a token from the state directory that is still valid this long (e.g. 10m),
    /// without asking the provider
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub min_valid: Option<std::time::Duration>,
}

/// Where `get`, `status` and `refresh` find the daemon.
#[derive(Args, Debug)]
pub struct SocketArgs {
    /// The config file; only its `[daemon] socket` is read
    #[arg(
        short = 'c',
        long = "config",
        env = "TOKEND_CONFIG",
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,
    /// The daemon's socket [default: the config's [daemon] socket, else
    /// /run/tokend/tokend.sock]
    #[arg(long, env = "TOKEND_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
    /// The account
    #[arg(value_name = "ACCOUNT", add = ArgValueCandidates::new(account_names))]
    pub account: String,
    /// Print the json format (account, access_token, token_type, expires_at, issued_at,
    /// scope) instead of the raw token
    #[arg(long)]
    pub json: bool,
    /// The token must stay valid at least this long (e.g. 10m): the daemon refreshes
    /// first if it would expire sooner (still no sooner than min_refresh_interval after
    /// its last request)
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub min_valid: Option<std::time::Duration>,
}

#[derive(Args, Debug)]
pub struct RefreshArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
    /// The account
    #[arg(value_name = "ACCOUNT", add = ArgValueCandidates::new(account_names))]
    pub account: String,
    /// Also end a hold (after refused credentials) or a provider's rate-limit wait, for
    /// one attempt now: "I fixed it, try now". Only root or the daemon's own user
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
    /// Print the daemon's JSON list instead of a table
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
