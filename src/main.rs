//! Entry point: parse the command line, set up logging, dispatch, map the outcome to an
//! exit status. No logic lives here.

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};
use tokend::cli::{Cli, Command, CredentialCommand};
use tokend::client;
use tokend::commands::{self, Failure};
use tokend::config::{self, Config};

fn main() -> ExitCode {
    // `TOKEND_COMPLETE=SHELL tokend -- WORDS...`: the shell completion scripts asking.
    clap_complete::CompleteEnv::with_factory(Cli::command)
        .var(tokend::completion::VAR)
        .complete();
    let cli = Cli::parse_from(tokend::cli::args(std::env::args_os().collect()));
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if let Failure::Usage(e) | Failure::Runtime(e) = &f {
                eprintln!("tokend: {e:#}");
            }
            ExitCode::from(f.exit_code())
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, Failure> {
    let config = config::load(path)?;
    tokend::logging::init(config.daemon.log_format, &config.daemon.log_level);
    Ok(config)
}

/// Threads for blocking work (file I/O).
const MAX_BLOCKING_THREADS: usize = 16;

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // File writes, state saves and name lookups: short, and bounded by the refresh
        // semaphore, except at start, when every account looks for stale files at once
        // (tokio's default of 512 threads then costs tens of MiB: issue #11).
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .map_err(|e| {
            Failure::Runtime(anyhow::Error::new(e).context("failed to start the async runtime"))
        })
}

/// The credential helpers' runtime: one thread, no pool to start (kubectl runs the plugin
/// on every command).
fn helper_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            Failure::Runtime(anyhow::Error::new(e).context("failed to start the async runtime"))
        })
}

fn socket(args: &tokend::cli::SocketArgs) -> Result<std::path::PathBuf, Failure> {
    client::resolve_socket(args.socket.as_deref(), args.config.as_deref())
}

fn credential(command: CredentialCommand) -> Result<(), Failure> {
    use tokend::credential::{docker, git, kubectl};
    match command {
        CredentialCommand::Kubectl(args) => {
            let exec_info = std::env::var("KUBERNETES_EXEC_INFO").ok();
            helper_runtime()?.block_on(kubectl::run(
                &socket(&args.socket)?,
                &args.account,
                args.min_valid,
                exec_info.as_deref(),
            ))
        }
        CredentialCommand::Git(args) => {
            helper_runtime()?.block_on(git::run(&socket(&args.socket)?, &args.action))
        }
        CredentialCommand::Docker(args) => {
            helper_runtime()?.block_on(docker::run(socket(&args.socket), &args.action))
        }
    }
}

fn dispatch(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Run(args) => {
            tokend::daemon::tune_allocator();
            let config = load(&args.config)?;
            runtime()?
                .block_on(tokend::service::run(config, Default::default()))
                .map_err(Failure::Runtime)
        }
        Command::Check(args) => {
            if let Some(dir) = &args.credentials_dir {
                // Before any thread exists: nothing else reads the environment yet.
                std::env::set_var("CREDENTIALS_DIRECTORY", dir);
            }
            commands::check(&config::load_checked(&args.config.config)?)
        }
        Command::Once(args) => {
            let config = load(&args.config.config)?;
            runtime()?.block_on(commands::once(&config, &args.accounts, args.min_valid))
        }
        Command::Get(args) => {
            let socket = client::resolve_socket(
                args.socket.socket.as_deref(),
                args.socket.config.as_deref(),
            )?;
            match args.dpop.as_deref() {
                Some([method, url]) => runtime()?.block_on(client::get_dpop(
                    &socket,
                    &args.account,
                    method,
                    url,
                    args.nonce.as_deref(),
                )),
                _ => runtime()?.block_on(client::get(
                    &socket,
                    &args.account,
                    args.json,
                    args.min_valid,
                )),
            }
        }
        Command::Status(args) => {
            let socket = client::resolve_socket(
                args.socket.socket.as_deref(),
                args.socket.config.as_deref(),
            )?;
            runtime()?.block_on(client::status(&socket, args.json))
        }
        Command::Jwks(args) => commands::jwks(&config::load(&args.config.config)?, &args.accounts),
        Command::Refresh(args) => {
            let socket = client::resolve_socket(
                args.socket.socket.as_deref(),
                args.socket.config.as_deref(),
            )?;
            runtime()?.block_on(client::refresh(&socket, &args.account, args.force))
        }
        Command::Reseed(args) => {
            let socket = client::resolve_socket(
                args.socket.socket.as_deref(),
                args.socket.config.as_deref(),
            )?;
            let config = args
                .socket
                .config
                .as_deref()
                .unwrap_or(config::DEFAULT_PATH.as_ref());
            runtime()?.block_on(commands::reseed(config, &socket, &args.account))
        }
        Command::Credential(c) => credential(c),
    }
}
