//! The `projectionist` binary: parses the command line, runs the engine,
//! prints results on stdout and errors on stderr, and exits with the code of
//! PRODUCT.md.

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser};

use cli::{Cli, Command};
use projectionist::db::Database;
use projectionist::engine::{self, Context};
use projectionist::error::{self, ExitStatus, Failure};
use projectionist::manifest::{Manifest, ManifestError};
use projectionist::report;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.quiet, cli.global.verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let status = match runtime.block_on(run(cli)) {
        Ok(status) => status,
        Err(e) => {
            match e.downcast_ref::<ManifestError>() {
                Some(m) => eprintln!("{m}"),
                None => eprintln!("error: {}", error::render(&e)),
            }
            error::exit_status(&e)
        }
    };
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

fn database(url: &Option<String>) -> Result<Database> {
    match url {
        Some(u) => Database::parse(u),
        None => Err(Failure::Usage(
            "no database given: pass --database-url URL or set DATABASE_URL (e.g. postgres://user@host:5432/dbname)".into(),
        )
        .into()),
    }
}

fn context(cli: &cli::Global) -> Result<Context> {
    let manifest = Manifest::load(&cli.manifest)?;
    Ok(Context::new(manifest, database(&cli.database_url)?))
}

async fn run(cli: Cli) -> Result<ExitStatus> {
    let g = &cli.global;
    match cli.command {
        Command::Init => {
            for path in engine::init::init(&g.manifest)? {
                if !g.quiet {
                    println!("wrote {}", path.display());
                }
            }
            Ok(ExitStatus::Success)
        }
        Command::Validate => {
            let ctx = context(g)?;
            let mut client = ctx.connect("validate").await?;
            engine::validate::validate(&ctx.manifest, &mut client).await?;
            if !g.quiet {
                println!(
                    "{}: {} projectors, store {} and every handler check out against {}",
                    ctx.manifest.path.display(),
                    ctx.manifest.projectors.len(),
                    ctx.manifest.store.table,
                    ctx.database.target()
                );
            }
            Ok(ExitStatus::Success)
        }
        Command::Migrate(args) => {
            let db = database(&g.database_url)?;
            // The ledger schema comes from the manifest when there is one.
            let schema = if g.manifest.exists() {
                Manifest::load(&g.manifest)?.ledger_schema
            } else {
                "projectionist".to_string()
            };
            let ledger = projectionist::ledger::Ledger::new(&schema);
            let applied =
                engine::migrate::migrate(&db, &ledger, &args.dir, Some(args.lock_timeout)).await?;
            if !g.quiet {
                for m in &applied {
                    println!("applied {} migration V{}__{}", m.set, m.version, m.name);
                }
                if applied.is_empty() {
                    println!("nothing to apply: the database is up to date");
                }
            }
            Ok(ExitStatus::Success)
        }
        Command::Boot(args) => {
            let ctx = context(g)?;
            let mut opts = engine::boot::BootOptions {
                names: args.names,
                lock_timeout: (!args.no_wait).then_some(args.lock_timeout),
                batch_size: args.batch_size,
                writer_wait: args.writer_wait,
                ..Default::default()
            };
            if let Some(j) = args.jobs {
                opts.jobs = j;
            }
            let progress = report::progress::Progress::auto(g.quiet || args.json, "boot");
            let result = engine::boot::boot(&ctx, opts, &progress).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else if !g.quiet && !result.projectors.is_empty() {
                println!("{}", report::boot::table(&result));
            }
            if let Some(text) = report::boot::failure(&result) {
                eprintln!("{text}");
                if std::env::var("GITHUB_ACTIONS").as_deref() == Ok("true")
                    && let Some(a) = report::boot::github_annotation(&result)
                {
                    eprintln!("{a}");
                }
            }
            if let Some(h) = &result.held_back {
                eprintln!("warning: {h}");
            }
            Ok(if result.succeeded() {
                ExitStatus::Success
            } else {
                ExitStatus::Unhealthy
            })
        }
        Command::Status(args) => status(g, args).await,
        Command::Play(args) => {
            let ctx = context(g)?;
            let shutdown = tokio_util::sync::CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
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
                batch_size: args.batch_size,
            };
            engine::play::play(&ctx, opts, metrics, shutdown).await?;
            Ok(ExitStatus::Success)
        }
        Command::Notify(cli::NotifyCommand::Install {
            channel,
            dir,
            dry_run,
        }) => {
            let manifest = Manifest::load(&g.manifest)?;
            let (path, sql) = engine::notify::migration(&manifest, &channel, &dir)?;
            if dry_run {
                print!("{sql}");
            } else {
                engine::migrate::write_new(&path, &sql)?;
                if !g.quiet {
                    println!(
                        "wrote {}\n  review it, run `projectionist migrate`, and set notify = \"{channel}\" under [store]",
                        path.display()
                    );
                }
            }
            Ok(ExitStatus::Success)
        }
        Command::Reset(args) => {
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
                boot: engine::boot::BootOptions {
                    lock_timeout: Some(args.lock_timeout),
                    ..Default::default()
                },
            };
            let progress = report::progress::Progress::auto(g.quiet, "reset");
            let outcomes = engine::reset::reset(&ctx, &args.names, &opts, &progress).await?;
            let mut status = ExitStatus::Success;
            for o in &outcomes {
                match &o.replay {
                    None => {
                        if !g.quiet {
                            println!("reset {}: the next `projectionist boot` replays it", o.name)
                        }
                    }
                    Some(r) => {
                        if !g.quiet {
                            println!("{}", report::boot::table(r));
                        }
                        if let Some(text) = report::boot::failure(r) {
                            eprintln!("{text}");
                            status = ExitStatus::Unhealthy;
                        }
                    }
                }
            }
            Ok(status)
        }
        Command::Retire(args) => {
            let ctx = context(g)?;
            let client = ctx.connect("retire").await?;
            let r =
                engine::retire::retire(&ctx, &client, &args.name, args.min_age, &args.dir).await?;
            if args.dry_run {
                print!("{}", r.sql);
            } else {
                engine::retire::write(&r)?;
                if !g.quiet {
                    println!(
                        "wrote {}\n  review it, commit it, and `projectionist migrate` applies it",
                        r.path.display()
                    );
                }
            }
            Ok(ExitStatus::Success)
        }
        Command::Verify(args) => {
            let ctx = context(g)?;
            let mut client = ctx.connect("verify").await?;
            let results = engine::verify::verify(&ctx, &mut client, &args.names).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                println!("{}", report::verify::table(&results));
            }
            let failing: Vec<String> = {
                let mut v: Vec<String> = results
                    .iter()
                    .filter(|r| !r.ok)
                    .map(|r| r.projector.clone())
                    .collect();
                v.dedup();
                v
            };
            if failing.is_empty() {
                return Ok(ExitStatus::Success);
            }
            if args.heal {
                eprintln!("healing: resetting {}", failing.join(", "));
                let opts = engine::reset::ResetOptions {
                    allow_side_effects: false,
                    no_replay: false,
                    boot: Default::default(),
                };
                let progress = report::progress::Progress::auto(g.quiet, "reset");
                engine::reset::reset(&ctx, &failing, &opts, &progress).await?;
                let again = engine::verify::verify(&ctx, &mut client, &failing).await?;
                if !args.json {
                    println!("{}", report::verify::table(&again));
                }
                if again.iter().all(|r| r.ok) {
                    return Ok(ExitStatus::Success);
                }
            }
            Ok(ExitStatus::Unhealthy)
        }
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
    let client = ctx.connect("status").await?;
    if let Some(name) = &args.name {
        let report = engine::status::status(&ctx, &client).await?;
        let Some(p) = report.projectors.iter().find(|p| &p.name == name) else {
            return Err(Failure::Usage(format!(
                "no projector `{name}` in the manifest or the ledger"
            ))
            .into());
        };
        let detail = engine::status::detail(&ctx, &client, name).await?;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"projector": p, "failures": detail.failures, "holes": detail.holes})
                )?
            );
        } else {
            println!("{}", report::status::detail(p, &detail, &report));
        }
        return Ok(if p.state.is_unhealthy() {
            ExitStatus::Unhealthy
        } else {
            ExitStatus::Success
        });
    }
    let Some(every) = args.watch else {
        let report = engine::status::status(&ctx, &client).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!("{}", report::status::table(&report, g.verbose > 0));
        }
        let unhealthy = report.unhealthy(args.max_lag);
        for u in &unhealthy {
            if !g.quiet && !args.json {
                eprintln!("unhealthy: {u}");
            }
        }
        return Ok(if unhealthy.is_empty() {
            ExitStatus::Success
        } else {
            ExitStatus::Unhealthy
        });
    };
    let every = std::time::Duration::from_secs_f64(every.max(0.2));
    let tty = std::io::stdout().is_terminal();
    loop {
        let report = engine::status::status(&ctx, &client).await?;
        if tty {
            // Clear the screen and go home: refresh in place.
            print!("\x1b[2J\x1b[H");
        }
        println!("{}", report::status::table(&report, g.verbose > 0));
        if tty {
            println!("\nevery {}s, Ctrl-C to stop", every.as_secs_f64());
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitStatus::Success),
        }
    }
}

/// SIGINT or SIGTERM: finish the batches in flight, then exit 0. A second one exits at once.
fn spawn_signal_handler(shutdown: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        for n in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n == 0 {
                tracing::info!("stopping: finishing the batches in flight");
                shutdown.cancel();
            } else {
                std::process::exit(0);
            }
        }
    });
}
