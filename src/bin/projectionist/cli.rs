//! The command line: clap definitions only. Every command's logic is in the
//! library's `engine`; `main.rs` maps results to exit codes.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "projectionist",
    version,
    about = "Deploy, run and maintain the projectors of an event-sourced system whose events live in PostgreSQL",
    after_help = "Exit codes: 0 success, 1 a projector broke / is unhealthy / a check failed, 2 bad usage or manifest (nothing changed), 3 database unreachable or refused, 4 a lock is held.\n\nA deploy pipeline runs:\n  projectionist migrate && projectionist boot"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct Global {
    /// The manifest.
    #[arg(long, global = true, default_value = "projectors.toml", value_name = "PATH")]
    pub manifest: PathBuf,
    /// postgres:// URL or key=value string (sslmode disable|prefer|require|verify-ca|verify-full, sslrootcert).
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Print only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More detail in logs (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write a commented starter projectors.toml and migrations/ (never overwrites).
    #[command(after_help = "Example:\n  projectionist init && $EDITOR projectors.toml")]
    Init,
    /// Check the manifest, then against the database the store's columns, owned tables and every handler; writes nothing.
    #[command(after_help = "Example:\n  projectionist validate --manifest deploy/projectors.toml")]
    Validate,
    /// Apply the ledger schema and the project's migrations/ (refinery V{n}__name.sql), under a lock.
    #[command(after_help = "Example:\n  projectionist migrate && projectionist boot")]
    Migrate(MigrateArgs),
    /// Boot new, interrupted, broken and stalled projectors (and rebuild those whose version rose) to the head.
    #[command(after_help = "Examples:\n  projectionist boot                 # the deploy step: exit 1 if a projector breaks\n  projectionist boot band event      # only these\n  projectionist boot --no-wait       # exit 4 if another boot runs")]
    Boot(BootArgs),
    /// Print shell completions.
    #[command(after_help = "Example:\n  projectionist completions bash > /etc/bash_completion.d/projectionist")]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    #[command(after_help = "Example:\n  projectionist man | man -l -")]
    Man,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The project's migrations directory.
    #[arg(long, default_value = "migrations", value_name = "DIR")]
    pub dir: PathBuf,
    /// How long to wait for a concurrent migrate.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub lock_timeout: Duration,
}

#[derive(Args, Debug)]
pub struct BootArgs {
    /// Projectors to boot (default: every one that needs it).
    pub names: Vec<String>,
    /// How many projectors boot at once (default: the number of CPUs).
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,
    /// How long to wait for another boot, or a runner holding a projector.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub lock_timeout: Duration,
    /// Exit 4 at once if another boot holds the lock.
    #[arg(long)]
    pub no_wait: bool,
    /// Events per batch (one transaction each).
    #[arg(long, default_value_t = 10_000, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
    pub batch_size: i64,
    /// How long to wait at the end for running transactions that hold committed events back.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub writer_wait: Duration,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}
