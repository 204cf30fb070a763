//! `migrate`: the ledger's own schema, then the project's `migrations/`
//! (refinery `V{n}__name.sql`), under an advisory lock so that concurrent
//! migrates apply each migration once.

use std::path::Path;

use anyhow::{Context as _, Result};

use crate::db::{Database, Session};
use crate::engine::application_name;
use crate::error::Failure;
use crate::ledger::{Ledger, LockKey, Locks};

/// A migration that was applied, for the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Applied {
    /// `ledger` or `project`.
    pub set: &'static str,
    pub version: i64,
    pub name: String,
}

/// Applies the ledger's migrations, then those in `dir` (if it exists).
pub async fn migrate(
    database: &Database,
    ledger: &Ledger,
    dir: &Path,
    lock_timeout: Option<std::time::Duration>,
) -> Result<Vec<Applied>> {
    let project = load_dir(dir)?;
    let mut client = database
        .connect(&application_name("migrate"), Session::Holder)
        .await?;
    let locks = Locks::new(ledger.schema());
    locks
        .lock(database, &client, LockKey::Migrate, lock_timeout)
        .await?;
    let result = apply(&mut client, ledger, project).await;
    locks.unlock(&client, LockKey::Migrate).await.ok();
    result
}

async fn apply(
    client: &mut tokio_postgres::Client,
    ledger: &Ledger,
    project: Vec<refinery::Migration>,
) -> Result<Vec<Applied>> {
    let mut applied = Vec::new();
    client
        .batch_execute(&ledger.create_schema_sql())
        .await
        .context("creating the ledger schema")?;
    repair(client, ledger).await?;
    let (ledger_migrations, history) = ledger.migrations()?;
    let report = refinery::Runner::new(&ledger_migrations)
        .set_migration_table_name(&history)
        .run_async(client)
        .await
        .map_err(|e| anyhow::anyhow!("{}", crate::error::render(&anyhow::Error::new(e))))
        .context("applying the ledger's migrations")?;
    for m in report.applied_migrations() {
        applied.push(Applied {
            set: "ledger",
            version: m.version() as i64,
            name: m.name().to_string(),
        });
    }
    if !project.is_empty() {
        let report = refinery::Runner::new(&project)
            .run_async(client)
            .await
            .map_err(|e| anyhow::anyhow!("{}", crate::error::render(&anyhow::Error::new(e))))
            .context("applying the project's migrations")?;
        for m in report.applied_migrations() {
            applied.push(Applied {
                set: "project",
                version: m.version() as i64,
                name: m.name().to_string(),
            });
        }
    }
    Ok(applied)
}

/// A ledger whose tables were dropped by hand while its migration history
/// stayed: the tables that survive are set aside (in the schema
/// `<ledger>_before_repair`) and the ledger is created again from its
/// migrations. Projectors whose
/// rows were lost count as new; boot refuses to replay any whose tables hold
/// rows.
async fn repair(client: &mut tokio_postgres::Client, ledger: &Ledger) -> Result<()> {
    let (missing, history) = ledger.missing_tables(&*client).await?;
    if !history || missing.is_empty() {
        return Ok(());
    }
    let aside = format!("{}_before_repair", ledger.schema());
    let aside_q = crate::db::quote_ident(&aside);
    tracing::warn!(
        "the ledger lost {} although its migrations ran: recreating it; the surviving ledger tables are kept in schema {aside}",
        missing.join(", ")
    );
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {aside_q}"))
        .await?;
    for t in crate::ledger::TABLES {
        let table = ledger.table(t);
        tx.batch_execute(&format!(
            "DROP TABLE IF EXISTS {aside_q}.{t} CASCADE; ALTER TABLE IF EXISTS {table} SET SCHEMA {aside_q}"
        ))
        .await
        .with_context(|| format!("setting {table} aside"))?;
    }
    tx.batch_execute(&format!("DROP TABLE {}", ledger.table("schema_history")))
        .await
        .context("forgetting the ledger's migration history")?;
    tx.commit().await.context("repairing the ledger")?;
    Ok(())
}

/// Reads `V{n}__name.sql` files; anything else ending in `.sql` is an error.
fn load_dir(dir: &Path) -> Result<Vec<refinery::Migration>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let sql = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let m = refinery::Migration::unapplied(&stem, &sql).map_err(|e| {
            Failure::Usage(format!(
                "{}: {e}\n  migration files are named V{{n}}__name.sql (refinery), e.g. V3__add_band_index.sql",
                path.display()
            ))
        })?;
        out.push(m);
    }
    Ok(out)
}

/// One above the highest `V{n}__` in the directory.
pub fn next_version(dir: &Path) -> Result<u64> {
    if !dir.exists() {
        return Ok(1);
    }
    let mut max = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().to_string();
        if let Some(rest) = name.strip_prefix('V').or_else(|| name.strip_prefix('U'))
            && let Some((n, _)) = rest.split_once("__")
            && let Ok(n) = n.parse::<u64>()
        {
            max = max.max(n);
        }
    }
    Ok(max + 1)
}

/// Writes a new migration file; never overwrites one.
pub fn write_new(path: &Path, sql: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut f, sql.as_bytes())?;
    Ok(())
}
