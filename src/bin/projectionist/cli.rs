//! The command line: clap definitions only, with the options several
//! commands share as flattened groups. Every command's logic is in the
//! library's `engine`; `commands.rs` runs it and picks the exit code.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "projectionist",
    version,
    about = "Deploy, run and maintain the projectors of an event-sourced system whose events live in PostgreSQL",
    after_help = "Exit codes: 0 success, 1 a projector broke / is unhealthy / a check failed, 2 bad usage or manifest (nothing changed), 3 database unreachable, lost or refused, 4 a lock is held.\n\nA deploy pipeline runs:\n  projectionist migrate && projectionist boot"
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
    #[arg(
        long,
        global = true,
        default_value = "projectors.toml",
        value_name = "PATH"
    )]
    pub manifest: PathBuf,
    /// postgres:// URL or key=value string (sslmode disable|prefer|require|verify-ca|verify-full, sslrootcert; connect_timeout, keepalives*, tcp_user_timeout).
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: Option<String>,
    /// How long a silent session of projectionist's may hold its locks: the server drops it after this long, and projectionist gives up on a silent database within it.
    #[arg(long, global = true, default_value = "60s", value_parser = parse_session_timeout, value_name = "DURATION")]
    pub session_timeout: Duration,
    /// Print only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More detail in logs (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

fn parse_session_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(2) {
        return Err("at least 2s".into());
    }
    Ok(d)
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
    #[command(
        after_help = "Examples:\n  projectionist boot                 # the deploy step: exit 1 if a projector breaks\n  projectionist boot band event      # only these\n  projectionist boot --no-wait       # exit 4 if another boot runs"
    )]
    Boot(BootArgs),
    /// Keep every live projector up to date until SIGINT/SIGTERM; several may run, on one machine or many.
    #[command(
        after_help = "Examples:\n  projectionist play                         # under systemd or Kubernetes\n  projectionist play --metrics 0.0.0.0:9187  # Prometheus metrics at /metrics\n\nSIGTERM/SIGINT finish the batches in flight and exit 0; SIGHUP is ignored (play re-reads the ledger every poll; restart it to load a new manifest)."
    )]
    Play(PlayArgs),
    /// LISTEN/NOTIFY set-up for near-time play.
    #[command(
        subcommand,
        after_help = "Example:\n  projectionist notify install --channel events && projectionist migrate"
    )]
    Notify(NotifyCommand),
    /// Where every projector stands: state, position, lag, errors, late events; exit 1 when any is broken, stalled, missed late events or is over --max-lag.
    #[command(
        after_help = "Examples:\n  projectionist status                 # the table\n  projectionist status band            # one projector in detail, with its failures\n  projectionist status --json          # for scripts and monitors\n  projectionist status --max-lag 30s   # a health check: exit 1 if any is 30s behind, broken or stalled; 3 if the database does not answer within --timeout"
    )]
    Status(StatusArgs),
    /// Rebuild projectors from scratch: beside the live tables, then swapped in (or in place).
    #[command(
        after_help = "Examples:\n  projectionist reset band\n  projectionist reset band event --yes        # in scripts\n  projectionist reset band --in-place         # empty the tables and replay where they are\n  projectionist reset band --no-replay        # empty them; the next boot replays"
    )]
    Reset(ResetArgs),
    /// Write the migration that removes a projector gone from the manifest.
    #[command(
        after_help = "Examples:\n  projectionist retire old_band              # writes migrations/V{n}__retire_old_band.sql\n  projectionist retire old_band --dry-run    # prints it instead"
    )]
    Retire(RetireArgs),
    /// List recorded failures and dead letters (position, type, stream, error, when, run, resolved).
    #[command(
        after_help = "Examples:\n  projectionist failures\n  projectionist failures band --json"
    )]
    Failures(FailuresArgs),
    /// Apply a projector's dead letters again with the current handlers, in position order; exit 1 if any fails again.
    #[command(
        after_help = "Examples:\n  projectionist retry band                 # every dead letter of band\n  projectionist retry band --position 412  # only this one"
    )]
    Retry(RetryArgs),
    /// Take projectors out of play (across restarts, deploys and runners) until `resume`.
    #[command(after_help = "Example:\n  projectionist pause band")]
    Pause(PauseArgs),
    /// Put paused projectors back in the state they had.
    #[command(after_help = "Example:\n  projectionist resume band")]
    Resume(PauseArgs),
    /// Swap a kept previous version of a projector back in (the manifest's version), then catch it up.
    #[command(
        after_help = "Example (a deploy rolled back to the manifest with version 1 of band):\n  projectionist rollback band"
    )]
    Rollback(RollbackArgs),
    /// Write the migration that drops previous versions kept longer than --min-age.
    #[command(
        after_help = "Examples:\n  projectionist prune                # writes migrations/V{n}__prune_previous_versions.sql\n  projectionist prune --dry-run      # prints it instead"
    )]
    Prune(PruneArgs),
    /// Run the manifest's consistency checks at each projector's position; exit 1 on a mismatch or late events.
    #[command(
        after_help = "Examples:\n  projectionist verify\n  projectionist verify band --heal    # reset the projectors whose checks fail"
    )]
    Verify(VerifyArgs),
    /// Print shell completions.
    #[command(
        after_help = "Example:\n  projectionist completions bash > /etc/bash_completion.d/projectionist"
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    #[command(after_help = "Example:\n  projectionist man | man -l -")]
    Man,
}

/// Where migrations live.
#[derive(Args, Debug)]
pub struct DirArgs {
    /// The project's migrations directory.
    #[arg(long, default_value = "migrations", value_name = "DIR")]
    pub dir: PathBuf,
}

/// Waiting for a lock someone else holds.
#[derive(Args, Debug)]
pub struct LockArgs {
    /// How long to wait for another run holding the lock.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub lock_timeout: Duration,
}

/// Results as JSON.
#[derive(Args, Debug)]
pub struct JsonArgs {
    /// Print the result as JSON on stdout (stable keys, see the README).
    #[arg(long)]
    pub json: bool,
}

/// Batches.
#[derive(Args, Debug)]
pub struct BatchArgs {
    /// Events per batch (one transaction each).
    #[arg(long, default_value_t = 10_000, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
    pub batch_size: i64,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    #[command(flatten)]
    pub lock: LockArgs,
}

#[derive(Args, Debug)]
pub struct BootArgs {
    /// Projectors to boot (default: every one that needs it).
    pub names: Vec<String>,
    /// How many projectors boot at once (default: the number of CPUs).
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<usize>,
    #[command(flatten)]
    pub lock: LockArgs,
    /// Exit 4 at once if another boot holds the lock.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub batch: BatchArgs,
    /// How long to wait at the end for running transactions that hold committed events back.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub writer_wait: Duration,
    /// Boot this new projector over the rows its tables already hold (its handlers must be idempotent); repeatable.
    #[arg(long, value_name = "NAME")]
    pub adopt: Vec<String>,
    /// Rebuild side-effecting projectors whose version went up (their side effects run again).
    #[arg(long)]
    pub allow_side_effects: bool,
    #[command(flatten)]
    pub output: JsonArgs,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// One projector in detail (its ledger row, tables, failures, holes, late events).
    pub name: Option<String>,
    #[command(flatten)]
    pub output: JsonArgs,
    /// Refresh every SECS seconds until Ctrl-C.
    #[arg(long, value_name = "SECS")]
    pub watch: Option<f64>,
    /// Exit 1 when any projector lags more than N events or a DURATION (30s, 5m).
    #[arg(long, value_name = "N|DURATION")]
    pub max_lag: Option<projectionist::engine::status::MaxLag>,
    /// Exit 3 if the database does not answer within this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct ResetArgs {
    /// The projectors to reset.
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Do not ask (required when not on a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Reset side-effecting projectors too (their side effects run again).
    #[arg(long)]
    pub allow_side_effects: bool,
    /// Only reset (in place); the next boot replays.
    #[arg(long)]
    pub no_replay: bool,
    /// Empty the tables and replay where they are (readers see the rebuild), instead of building beside them and swapping in.
    #[arg(long)]
    pub in_place: bool,
    #[command(flatten)]
    pub lock: LockArgs,
}

#[derive(Args, Debug)]
pub struct RetireArgs {
    /// The projector to retire (already removed from the manifest).
    pub name: String,
    /// How long it must have been gone from the manifest.
    #[arg(long, default_value = "72h", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub min_age: Duration,
    /// Print the SQL instead of writing the file.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub dir: DirArgs,
}

#[derive(Args, Debug)]
pub struct FailuresArgs {
    /// Only these projectors' failures.
    pub names: Vec<String>,
    #[command(flatten)]
    pub output: JsonArgs,
}

#[derive(Args, Debug)]
pub struct RetryArgs {
    /// The projector whose dead letters are applied again.
    pub name: String,
    /// Only the dead letter at this position (repeatable).
    #[arg(long = "position", value_name = "P")]
    pub positions: Vec<i64>,
    #[command(flatten)]
    pub output: JsonArgs,
}

#[derive(Args, Debug)]
pub struct PauseArgs {
    /// The projectors.
    #[arg(required = true)]
    pub names: Vec<String>,
    #[command(flatten)]
    pub lock: LockArgs,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// The projector to roll back (the manifest says which version).
    pub name: String,
    #[command(flatten)]
    pub lock: LockArgs,
    #[command(flatten)]
    pub output: JsonArgs,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// How long a previous version is kept before it may be dropped.
    #[arg(long, default_value = "72h", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub min_age: Duration,
    /// Print the SQL instead of writing the file.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub dir: DirArgs,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Only these projectors' checks.
    pub names: Vec<String>,
    /// Reset (and replay) the projectors whose checks fail at their position.
    #[arg(long)]
    pub heal: bool,
    #[command(flatten)]
    pub output: JsonArgs,
}

#[derive(Args, Debug)]
pub struct PlayArgs {
    /// How often to look for new events without a notification (and for projectors to take over).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub poll: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub batch: BatchArgs,
}

#[derive(Subcommand, Debug)]
pub enum NotifyCommand {
    /// Write a migration adding a statement-level NOTIFY trigger on the events table.
    #[command(
        after_help = "Example:\n  projectionist notify install --channel events && projectionist migrate\n  # then set notify = \"events\" under [store]"
    )]
    Install {
        /// The channel to notify.
        #[arg(long, default_value = "events")]
        channel: String,
        #[command(flatten)]
        dir: DirArgs,
        /// Print the SQL instead of writing the file.
        #[arg(long)]
        dry_run: bool,
    },
}
