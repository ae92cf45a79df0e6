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
    /// Credential helpers: kubectl's exec plugin, git's credential.helper, and the
    /// container tools' credHelpers (docker-credential-tokend). They ask the running
    /// daemon and answer in each tool's own protocol
    #[command(subcommand)]
    Credential(CredentialCommand),
}

/// `tokend credential ...` (SPEC §5).
#[derive(Subcommand, Debug)]
pub enum CredentialCommand {
    /// A kubectl / client-go exec credential plugin: prints an ExecCredential with the
    /// account's token and its expiry, in the apiVersion KUBERNETES_EXEC_INFO names
    /// (client.authentication.k8s.io/v1 or v1beta1; default v1)
    Kubectl(KubectlArgs),
    /// A git credential helper (git config credential.helper "/usr/bin/tokend credential
    /// git"): the account whose urls match git's URL best; a Bearer credential where git
    /// offers capability[]=authtype, else credential_username and the token
    Git(GitArgs),
    /// The container tools' credential helper (docker, podman, buildah, skopeo), also run
    /// as docker-credential-tokend: get, store, erase or list, the registry on stdin
    Docker(DockerArgs),
}

#[derive(Args, Debug)]
pub struct KubectlArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
    /// The account
    #[arg(value_name = "ACCOUNT", add = ArgValueCandidates::new(account_names))]
    pub account: String,
    /// The token must stay valid at least this long (e.g. 1m): the daemon refreshes
    /// first if it would expire sooner (no sooner than min_refresh_interval allows)
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub min_valid: Option<std::time::Duration>,
}

#[derive(Args, Debug)]
pub struct GitArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
    /// What git asks: get (a credential), store (ignored: the daemon holds the token) or
    /// erase (the server refused it: ask the daemon for a refresh); other actions are
    /// ignored, as git's protocol asks
    #[arg(value_name = "ACTION")]
    pub action: String,
}

#[derive(Args, Debug)]
pub struct DockerArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
    /// get (the registry on stdin; prints ServerURL, Username, Secret), list (the URLs
    /// you may read), store (ignored: the daemon holds the token) or erase (asks the
    /// daemon for a refresh)
    #[arg(value_name = "ACTION")]
    pub action: String,
}

/// The name the container tools run the helper by (`credHelpers` value `tokend`): the
/// packages install it as a link to `tokend`.
pub const DOCKER_HELPER: &str = "docker-credential-tokend";

/// The command line as clap should see it: `docker-credential-tokend ARGS...` is
/// `tokend credential docker ARGS...`.
pub fn args(mut argv: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let called = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == DOCKER_HELPER);
    if called {
        argv.splice(..1, ["tokend", "credential", "docker"].map(Into::into));
    }
    argv
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

/// Where `get`, `status`, `refresh` and the credential helpers find the daemon.
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
    /// For a DPoP-bound account: print the `Authorization: DPoP ...` and `DPoP: ...`
    /// header lines of one request of METHOD to URL (`curl -H @- URL`)
    #[arg(long, num_args = 2, value_names = ["METHOD", "URL"], conflicts_with_all = ["json", "min_valid"])]
    pub dpop: Option<Vec<String>>,
    /// With --dpop: the resource server's DPoP-Nonce (it may begin with "-": base64url)
    #[arg(long, value_name = "N", requires = "dpop", allow_hyphen_values = true)]
    pub nonce: Option<String>,
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

    #[test]
    fn called_as_the_docker_helper() {
        let argv = |v: &[&str]| {
            v.iter()
                .map(Into::into)
                .collect::<Vec<std::ffi::OsString>>()
        };
        assert_eq!(
            args(argv(&["/usr/bin/docker-credential-tokend", "get"])),
            argv(&["tokend", "credential", "docker", "get"])
        );
        assert_eq!(
            args(argv(&["tokend", "status"])),
            argv(&["tokend", "status"])
        );
        let cli = Cli::try_parse_from(args(argv(&["docker-credential-tokend", "list"]))).unwrap();
        assert!(matches!(
            cli.command,
            Command::Credential(CredentialCommand::Docker(DockerArgs { ref action, .. })) if action == "list"
        ));
    }

    #[test]
    fn a_dpop_nonce_may_begin_with_a_hyphen() {
        // base64url nonces begin with "-" one time in 64.
        let cli = Cli::try_parse_from([
            "tokend",
            "get",
            "fhir",
            "--dpop",
            "GET",
            "https://fhir.example/r4/Patient",
            "--nonce",
            "-PqZ3",
        ])
        .unwrap();
        let Command::Get(get) = cli.command else {
            panic!("not get: {:?}", cli.command);
        };
        assert_eq!(get.nonce.as_deref(), Some("-PqZ3"));
    }
}
