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
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "projectionist", &mut std::io::stdout());
            Ok(ExitStatus::Success)
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(ExitStatus::Success)
        }
    }
}
