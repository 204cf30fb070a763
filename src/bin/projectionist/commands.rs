//! One function per command: it runs the engine, prints the result (tables
//! and JSON on stdout, reports on stderr) and returns the exit status.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::{self, Cli, Command};
use projectionist::db::{Database, Liveness, Session};
use projectionist::engine::{self, Context};
use projectionist::error::{ExitStatus, Failure};
use projectionist::manifest::Manifest;
use projectionist::report;

/// Prints a line on stdout; a closed pipe (`status --json | head`) ends the
/// program quietly, as it does for `cat`.
macro_rules! outln {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*), true) };
}

/// Prints on stdout, without a newline.
macro_rules! out {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*), false) };
}

fn write_stdout(args: std::fmt::Arguments, newline: bool) {
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|_| {
            if newline {
                stdout.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|_| stdout.flush());
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<ExitStatus> {
    let g = &cli.global;
    match cli.command {
        Command::Init => init(g),
        Command::Validate => validate(g).await,
        Command::Migrate(args) => migrate(g, args).await,
        Command::Boot(args) => boot(g, args).await,
        Command::Play(args) => play(g, args).await,
        Command::Notify(cli::NotifyCommand::Install {
            channel,
            dir,
            dry_run,
        }) => notify_install(g, &channel, &dir.dir, dry_run),
        Command::Status(args) => status(g, args).await,
        Command::Reset(args) => reset(g, args).await,
        Command::Retire(args) => retire(g, args).await,
        Command::Verify(args) => verify(g, args).await,
        Command::Rollback(args) => rollback(g, args).await,
        Command::Failures(args) => failures(g, args).await,
        Command::Retry(args) => retry(g, args).await,
        Command::Pause(args) => pause(g, args, true).await,
        Command::Resume(args) => pause(g, args, false).await,
        Command::Prune(args) => prune(g, args).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "projectionist",
                &mut std::io::stdout(),
            );
            Ok(ExitStatus::Success)
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(ExitStatus::Success)
        }
    }
}

fn database(g: &cli::Global) -> Result<Database> {
    match &g.database_url {
        Some(u) => Ok(Database::parse(u)?.with_liveness(Liveness {
            session: g.session_timeout,
        })),
        None => Err(Failure::Usage(
            "no database given: pass --database-url URL or set DATABASE_URL (e.g. postgres://user@host:5432/dbname)".into(),
        )
        .into()),
    }
}

fn context(g: &cli::Global) -> Result<Context> {
    let manifest = Manifest::load(&g.manifest)?;
    Ok(Context::new(manifest, database(g)?))
}

fn progress(g: &cli::Global, quiet: bool, command: &'static str) -> report::progress::Progress {
    report::progress::Progress::auto(g.quiet || quiet, command)
}

fn init(g: &cli::Global) -> Result<ExitStatus> {
    for path in engine::init::init(&g.manifest)? {
        if !g.quiet {
            outln!("wrote {}", path.display());
        }
    }
    Ok(ExitStatus::Success)
}

async fn validate(g: &cli::Global) -> Result<ExitStatus> {
    let ctx = context(g)?;
    let mut client = ctx.connect("validate", Session::Reader).await?;
    engine::validate::validate(&ctx.manifest, &mut client).await?;
    for advice in engine::validate::advice(&ctx.manifest) {
        eprintln!("warning: {advice}");
    }
    if !g.quiet {
        outln!(
            "{}: {} projectors, store {} and every handler check out against {}",
            ctx.manifest.path.display(),
            ctx.manifest.projectors.len(),
            ctx.manifest.store.table,
            ctx.database.target()
        );
    }
    Ok(ExitStatus::Success)
}

async fn migrate(g: &cli::Global, args: cli::MigrateArgs) -> Result<ExitStatus> {
    let db = database(g)?;
    // The ledger schema comes from the manifest when there is one.
    let schema = if g.manifest.exists() {
        Manifest::load(&g.manifest)?.ledger_schema
    } else {
        projectionist::manifest::DEFAULT_LEDGER_SCHEMA.to_string()
    };
    let ledger = projectionist::ledger::Ledger::new(&schema);
    let applied =
        engine::migrate::migrate(&db, &ledger, &args.dir.dir, Some(args.lock.lock_timeout)).await?;
    if !g.quiet {
        for m in &applied {
            outln!("applied {} migration V{}__{}", m.set, m.version, m.name);
        }
        if applied.is_empty() {
            outln!("nothing to apply: the database is up to date");
        }
    }
    Ok(ExitStatus::Success)
}

async fn boot(g: &cli::Global, args: cli::BootArgs) -> Result<ExitStatus> {
    let ctx = context(g)?;
    let mut opts = engine::boot::BootOptions {
        names: args.names,
        lock_timeout: (!args.no_wait).then_some(args.lock.lock_timeout),
        batch_size: args.batch.batch_size,
        writer_wait: args.writer_wait,
        adopt: args.adopt,
        allow_side_effects: args.allow_side_effects,
        ..Default::default()
    };
    if let Some(j) = args.jobs {
        opts.jobs = j;
    }
    let json = args.output.json;
    let result = engine::boot::boot(&ctx, opts, &progress(g, json, "boot")).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&result)?);
    } else if !g.quiet && !result.projectors.is_empty() {
        outln!("{}", report::boot::table(&result));
    }
    print_boot_problems(&result);
    Ok(if result.succeeded() {
        ExitStatus::Success
    } else {
        ExitStatus::Unhealthy
    })
}

/// A broken projector's report (and annotation), held-back events, late events: on stderr.
fn print_boot_problems(result: &engine::boot::BootReport) {
    if let Some(text) = report::boot::failure(result) {
        eprintln!("{text}");
        if std::env::var("GITHUB_ACTIONS").as_deref() == Ok("true")
            && let Some(a) = report::boot::github_annotation(result)
        {
            eprintln!("{a}");
        }
    }
    if let Some(h) = &result.held_back {
        eprintln!("warning: {h}");
    }
    if let Some(l) = report::boot::late_events(result) {
        eprintln!("{l}");
    }
}

async fn play(g: &cli::Global, args: cli::PlayArgs) -> Result<ExitStatus> {
    let ctx = context(g)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    let metrics = std::sync::Arc::new(report::metrics::Metrics::new());
    if let Some(addr) = args.metrics {
        let (m, s) = (metrics.clone(), shutdown.clone());
        // Bind now, so a taken port fails play at once.
        let listener = report::metrics::bind(addr).await?;
        tokio::spawn(async move {
            if let Err(e) = report::metrics::serve(listener, m, s).await {
                tracing::error!("metrics: {}", projectionist::error::render(&e));
            }
        });
    }
    let opts = engine::play::PlayOptions {
        poll: args.poll,
        batch_size: args.batch.batch_size,
    };
    engine::play::play(&ctx, opts, metrics, shutdown).await?;
    Ok(ExitStatus::Success)
}

fn notify_install(
    g: &cli::Global,
    channel: &str,
    dir: &std::path::Path,
    dry_run: bool,
) -> Result<ExitStatus> {
    let manifest = Manifest::load(&g.manifest)?;
    let (path, sql) = engine::notify::migration(&manifest, channel, dir)?;
    if dry_run {
        out!("{sql}");
    } else {
        engine::migrate::write_new(&path, &sql)?;
        if !g.quiet {
            outln!(
                "wrote {}\n  review it, run `projectionist migrate`, and set notify = \"{channel}\" under [store]",
                path.display()
            );
        }
    }
    Ok(ExitStatus::Success)
}

async fn reset(g: &cli::Global, args: cli::ResetArgs) -> Result<ExitStatus> {
    let ctx = context(g)?;
    engine::reset::check(&ctx, &args.names, args.allow_side_effects)?;
    if !args.yes {
        confirm(&format!(
            "Reset {}? Their tables are emptied and every event is replayed.",
            args.names.join(", ")
        ))?;
    }
    let opts = engine::reset::ResetOptions {
        allow_side_effects: args.allow_side_effects,
        no_replay: args.no_replay,
        in_place: args.in_place,
        boot: engine::boot::BootOptions {
            lock_timeout: Some(args.lock.lock_timeout),
            ..Default::default()
        },
    };
    let outcomes =
        engine::reset::reset(&ctx, &args.names, &opts, &progress(g, false, "reset")).await?;
    let mut status = ExitStatus::Success;
    for o in &outcomes {
        match &o.replay {
            None => {
                if !g.quiet {
                    outln!("reset {}: the next `projectionist boot` replays it", o.name)
                }
            }
            Some(r) => {
                if !g.quiet {
                    outln!("{}", report::boot::table(r));
                }
                if !r.succeeded() {
                    status = ExitStatus::Unhealthy;
                }
                print_boot_problems(r);
            }
        }
    }
    Ok(status)
}

async fn retire(g: &cli::Global, args: cli::RetireArgs) -> Result<ExitStatus> {
    let ctx = context(g)?;
    let client = ctx.connect("retire", Session::Reader).await?;
    let r = engine::retire::retire(&ctx, &client, &args.name, args.min_age, &args.dir.dir).await?;
    if args.dry_run {
        out!("{}", r.sql);
    } else {
        engine::retire::write(&r)?;
        if !g.quiet {
            outln!(
                "wrote {}\n  review it, commit it, and `projectionist migrate` applies it",
                r.path.display()
            );
        }
    }
    Ok(ExitStatus::Success)
}

async fn failures(g: &cli::Global, args: cli::FailuresArgs) -> Result<ExitStatus> {
    let ctx = context(g)?;
    let failures = engine::retry::failures(&ctx, &args.names).await?;
    if args.output.json {
        outln!("{}", serde_json::to_string_pretty(&failures)?);
    } else {
        outln!("{}", report::failures::table(&failures));
    }
    Ok(ExitStatus::Success)
}

async fn retry(g: &cli::Global, args: cli::RetryArgs) -> Result<ExitStatus> {
    let ctx = context(g)?;
    let retried = engine::retry::retry(&ctx, &args.name, &args.positions).await?;
    if args.output.json {
        outln!("{}", serde_json::to_string_pretty(&retried)?);
    } else if !g.quiet {
        outln!("{}", report::failures::retried(&args.name, &retried));
    }
    Ok(if retried.iter().all(|r| r.ok) {
        ExitStatus::Success
    } else {
        ExitStatus::Unhealthy
    })
}

async fn pause(g: &cli::Global, args: cli::PauseArgs, pause: bool) -> Result<ExitStatus> {
    let ctx = context(g)?;
    for name in &args.names {
        ctx.projector(name)?;
    }
    let done = engine::pause::set(&ctx, &args.names, pause, Some(args.lock.lock_timeout)).await?;
    if !g.quiet {
        for p in done {
            outln!(
                "{} {}: {} (was {})",
                if pause { "paused" } else { "resumed" },
                p.name,
                p.to.as_str(),
                p.from.as_str()
            );
        }
    }
    Ok(ExitStatus::Success)
}

async fn rollback(g: &cli::Global, args: cli::RollbackArgs) -> Result<ExitStatus> {
    let ctx = context(g)?;
    let json = args.output.json;
    let r = engine::rebuild::roll_back(
        &ctx,
        &args.name,
        Some(args.lock.lock_timeout),
        &progress(g, json, "rollback"),
    )
    .await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&r)?);
    } else if !g.quiet {
        outln!(
            "rolled back {}: version {} is live again (it was at position {}; readers waited {:.1} ms), version {} is kept",
            r.rolled_back.projector,
            r.rolled_back.to_version,
            r.rolled_back.kept_position,
            r.rolled_back.swap.lock_ms,
            r.rolled_back.from_version
        );
        outln!("{}", report::boot::table(&r.catch_up));
    }
    print_boot_problems(&r.catch_up);
    Ok(if r.catch_up.succeeded() {
        ExitStatus::Success
    } else {
        ExitStatus::Unhealthy
    })
}

async fn prune(g: &cli::Global, args: cli::PruneArgs) -> Result<ExitStatus> {
    let ctx = context(g)?;
    let client = ctx.connect("prune", Session::Reader).await?;
    ctx.ledger.ensure_exists(&client).await?;
    let Some(p) = engine::rebuild::prune(&ctx, &client, args.min_age, &args.dir.dir).await? else {
        if !g.quiet {
            outln!(
                "nothing to prune: no previous version has been kept for {} (--min-age)",
                humantime::format_duration(args.min_age)
            );
        }
        return Ok(ExitStatus::Success);
    };
    if args.dry_run {
        out!("{}", p.sql);
    } else {
        engine::migrate::write_new(&p.path, &p.sql)?;
        if !g.quiet {
            outln!(
                "wrote {}\n  it drops {}; review it, commit it, and `projectionist migrate` applies it",
                p.path.display(),
                p.dropped
                    .iter()
                    .map(|(n, v)| format!("{n} version {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(ExitStatus::Success)
}

async fn verify(g: &cli::Global, args: cli::VerifyArgs) -> Result<ExitStatus> {
    let ctx = context(g)?;
    let json = args.output.json;
    let v =
        engine::verify::verify(&ctx, &args.names, args.heal, &progress(g, json, "reset")).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        outln!("{}", report::verify::table(&v.results));
        if !v.healed.is_empty() {
            eprintln!("healed: reset {}", v.healed.join(", "));
            outln!("{}", report::verify::table(&v.after_heal));
        }
    }
    Ok(if v.failed() {
        ExitStatus::Unhealthy
    } else {
        ExitStatus::Success
    })
}

/// Asks on a terminal; elsewhere `--yes` is required.
fn confirm(question: &str) -> Result<()> {
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return Err(Failure::Usage("not on a terminal: pass --yes to confirm".into()).into());
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(Failure::Usage("not confirmed: nothing was changed".into()).into())
    }
}

async fn status(g: &cli::Global, args: cli::StatusArgs) -> Result<ExitStatus> {
    let ctx = context(g)?;
    let limit = args.timeout;
    // A health check answers or exits 3 within --timeout, whatever the network does.
    let client = bounded(&ctx, limit, ctx.connect("status", Session::Reader)).await?;
    if let Some(name) = &args.name {
        let report = bounded(&ctx, limit, engine::status::status(&ctx, &client)).await?;
        let Some(p) = report.projectors.iter().find(|p| &p.name == name) else {
            return Err(Failure::Usage(format!(
                "no projector `{name}` in the manifest or the ledger"
            ))
            .into());
        };
        let detail = bounded(&ctx, limit, engine::status::detail(&ctx, &client, name)).await?;
        if args.output.json {
            outln!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"projector": p, "failures": detail.failures, "holes": detail.holes})
                )?
            );
        } else {
            outln!("{}", report::status::detail(p, &detail, &report));
        }
        return Ok(if p.unhealthy(None).is_some() {
            ExitStatus::Unhealthy
        } else {
            ExitStatus::Success
        });
    }
    let Some(every) = args.watch else {
        let report = bounded(&ctx, limit, engine::status::status(&ctx, &client)).await?;
        if args.output.json {
            outln!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            outln!("{}", report::status::table(&report, g.verbose > 0));
        }
        let unhealthy = report.unhealthy(args.max_lag);
        if !g.quiet && !args.output.json {
            for u in &unhealthy {
                eprintln!("unhealthy: {u}");
            }
        }
        return Ok(if unhealthy.is_empty() {
            ExitStatus::Success
        } else {
            ExitStatus::Unhealthy
        });
    };
    watch_status(&ctx, client, every, limit, g.verbose > 0).await
}

/// `status --watch`: refreshes in place until Ctrl-C.
async fn watch_status(
    ctx: &Context,
    mut client: tokio_postgres::Client,
    every: f64,
    limit: Duration,
    verbose: bool,
) -> Result<ExitStatus> {
    let every = Duration::from_secs_f64(every.max(0.2));
    let tty = std::io::stdout().is_terminal();
    loop {
        if client.is_closed() {
            client = bounded(ctx, limit, ctx.connect("status", Session::Reader)).await?;
        }
        let report = bounded(ctx, limit, engine::status::status(ctx, &client)).await?;
        if tty {
            // Clear the screen and go home: refresh in place.
            out!("\x1b[2J\x1b[H");
        }
        outln!("{}", report::status::table(&report, verbose));
        if tty {
            outln!("\nevery {}s, Ctrl-C to stop", every.as_secs_f64());
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitStatus::Success),
        }
    }
}

/// A database call that must answer within `limit`, or the database counts as unreachable.
async fn bounded<T>(
    ctx: &Context,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Unreachable(format!(
            "the database at {} did not answer within {} (--timeout)",
            ctx.database.target(),
            humantime::format_duration(limit)
        ))
        .into()),
    }
}

/// SIGINT or SIGTERM: finish the batches in flight, then exit 0 (a second one
/// exits at once). SIGHUP is ignored: play re-reads the ledger every poll,
/// and a new manifest needs a restart.
fn spawn_signal_handler(shutdown: tokio_util::sync::CancellationToken) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        let mut stops = 0;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {
                    tracing::info!("SIGHUP ignored: play re-reads the ledger every poll; restart it to load a new manifest");
                    continue;
                }
            }
            stops += 1;
            if stops == 1 {
                tracing::info!("stopping: finishing the batches in flight");
                shutdown.cancel();
            } else {
                std::process::exit(0);
            }
        }
    });
    Ok(())
}
