//! The `projectionist` binary: parses the command line, runs the command,
//! prints errors on stderr and exits with the command's exit code. Each
//! command is one function in `commands.rs`; the engine is the library's.

mod cli;
mod commands;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use cli::Cli;
use projectionist::error;
use projectionist::manifest::ManifestError;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.quiet, cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let status = match runtime.block_on(commands::run(cli)) {
        Ok(status) => status,
        Err(e) => {
            match e.downcast_ref::<ManifestError>() {
                Some(m) => eprintln!("{m}"),
                None => eprintln!("error: {}", error::render(&e)),
            }
            error::exit_status(&e)
        }
    };
    // Connections' background tasks are not waited for.
    runtime.shutdown_background();
    ExitCode::from(status.code() as u8)
}

fn init_logging(quiet: bool, verbose: u8) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "projectionist=info",
        (false, 1) => "projectionist=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PROJECTIONIST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false)
        .without_time()
        .init();
}
