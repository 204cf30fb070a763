//! `validate`: the manifest against the database, writing nothing. The store's
//! columns and types, every owned table, every handler and check prepared
//! inside a transaction that is rolled back. All problems are reported at
//! once, each pointing at its place in the manifest.

use anyhow::Result;
use tokio_postgres::{Client, Transaction};

use crate::db::{RowExt, quote_qualified};
use crate::handlers::sql::{self, CompiledProjector};
use crate::manifest::{Manifest, Problem, Projector};
use crate::store::StoreShape;

/// Checks `manifest` against the database; on success returns the store's shape.
pub async fn validate(manifest: &Manifest, client: &mut Client) -> Result<StoreShape> {
    let shape = StoreShape::inspect(client, &manifest.store).await;
    let mut problems = Vec::new();
    let shape = match shape {
        Ok(s) => Some(s),
        Err(p) => {
            problems.extend(p);
            None
        }
    };
    let tx = client.transaction().await?;
    let mut checker = Checker { tx: &tx, problems };
    for p in &manifest.projectors {
        checker.command(p, manifest.dir());
        checker.tables(p).await?;
        checker.handlers(p).await?;
        checker.checks(p).await?;
        if let Some(shape) = &shape {
            checker.compiles(shape, p).await?;
            checker.partitions(shape, p).await?;
        }
    }
    let problems = checker.problems;
    tx.rollback().await?;
    match shape {
        Some(shape) if problems.is_empty() => Ok(shape),
        _ => Err(manifest.error(problems).into()),
    }
}

/// The checks of each projector, inside the transaction that is rolled back.
struct Checker<'a> {
    tx: &'a Transaction<'a>,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    /// A command projector's program can be found.
    fn command(&mut self, p: &Projector, dir: &std::path::Path) {
        if let Some(argv) = &p.command
            && !command_exists(&argv[0], dir)
        {
            self.problems.push(
                Problem::new(
                    p.span.clone(),
                    format!("the command of projector `{}` cannot be found: `{}`", p.name, argv[0]),
                    "command not found",
                )
                .help("commands run in the manifest's directory without a shell: give a program on PATH or a path to an executable"),
            );
        }
    }

    /// Every owned table exists.
    async fn tables(&mut self, p: &Projector) -> Result<()> {
        for table in &p.tables {
            let exists: bool = self
                .tx
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL",
                    &[&quote_qualified(table)],
                )
                .await?
                .col(0)?;
            if !exists {
                self.problems.push(
                    Problem::new(
                        p.span.clone(),
                        format!("projector `{}` owns table `{table}`, which does not exist", p.name),
                        format!("tables includes \"{table}\""),
                    )
                    .help("create it in a migration (migrations/V{n}__name.sql) and run `projectionist migrate`"),
                );
            }
        }
        Ok(())
    }

    /// Every handler statement prepares (with typed parameters).
    async fn handlers(&mut self, p: &Projector) -> Result<()> {
        for h in &p.handlers {
            for statement in &h.statements {
                let sql = statement.render(&sql::Parameters);
                if let Err(e) = self.prepares(&sql, &sql::PARAMETER_TYPES).await? {
                    self.problems.push(db_problem(
                        h.span.clone(),
                        format!(
                            "the handler of projector `{}` for {} does not prepare",
                            p.name, h.event_type
                        ),
                        &e,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Both queries of every check prepare (`:position` and `:transaction` filled in).
    async fn checks(&mut self, p: &Projector) -> Result<()> {
        for c in &p.checks {
            for (which, query) in [("projection", &c.projection), ("events", &c.events)] {
                let query = crate::manifest::sql_text::substitute(
                    query,
                    &[
                        ("position", "0::bigint".into()),
                        ("transaction", "NULL::xid8".into()),
                    ],
                );
                if let Err(e) = self.prepares(&query, &[]).await? {
                    self.problems.push(db_problem(
                        c.span.clone(),
                        format!(
                            "the `{which}` query of check \"{}\" of projector `{}` does not prepare",
                            c.name, p.name
                        ),
                        &e,
                    ));
                }
            }
        }
        Ok(())
    }

    /// The handlers compile into the batch function.
    async fn compiles(&mut self, shape: &StoreShape, p: &Projector) -> Result<()> {
        if p.handlers.is_empty() {
            return Ok(());
        }
        self.tx
            .batch_execute("SAVEPOINT projectionist_validate")
            .await?;
        match CompiledProjector::compile(shape, p).install(self.tx).await {
            Ok(()) => {
                self.tx
                    .batch_execute("RELEASE SAVEPOINT projectionist_validate")
                    .await?
            }
            Err(e) => {
                self.tx
                    .batch_execute("ROLLBACK TO SAVEPOINT projectionist_validate")
                    .await?;
                let text = crate::error::render(&e);
                self.problems.push(
                    Problem::new(
                        p.span.clone(),
                        format!(
                            "the handlers of projector `{}` do not compile as PL/pgSQL",
                            p.name
                        ),
                        text.lines().nth(1).unwrap_or("").trim().to_string(),
                    )
                    .help(text),
                );
            }
        }
        Ok(())
    }

    /// A partitioned projector needs a stream to hash, and a server that
    /// hashes text as partitions were designed for.
    async fn partitions(&mut self, shape: &StoreShape, p: &Projector) -> Result<()> {
        if p.partitions <= 1 {
            return Ok(());
        }
        let span = p.partitions_span.clone().unwrap_or_else(|| p.span.clone());
        if !shape.has_stream() {
            self.problems.push(
                Problem::new(
                    span,
                    format!(
                        "projector `{}` is partitioned by stream, and the store has no stream",
                        p.name
                    ),
                    "needs [store] stream",
                )
                .help("set `stream` in [store] (the column or expression naming each event's stream), or remove `partitions`"),
            );
            return Ok(());
        }
        let hash: i64 = self
            .tx
            .query_one("SELECT hashtextextended('projectionist', 0)", &[])
            .await?
            .col(0)?;
        if hash != crate::store::HASH_CANARY {
            self.problems.push(
                Problem::new(
                    span,
                    format!(
                        "this server hashes text differently from the servers partitions are designed for \
                         (hashtextextended('projectionist', 0) = {hash}): the events of projector `{}` would move between its partitions",
                        p.name
                    ),
                    "partitions unavailable on this server",
                )
                .help("remove `partitions` (boot then rebuilds the projector unpartitioned)"),
            );
        }
        Ok(())
    }

    /// Prepares `sql` inside a savepoint; the inner result is the statement's own error.
    async fn prepares(
        &self,
        sql: &str,
        types: &[tokio_postgres::types::Type],
    ) -> Result<Result<(), tokio_postgres::Error>> {
        self.tx
            .batch_execute("SAVEPOINT projectionist_validate")
            .await?;
        let prepared = self.tx.prepare_typed(sql, types).await.map(|_| ());
        let end = if prepared.is_ok() {
            "RELEASE SAVEPOINT projectionist_validate"
        } else {
            "ROLLBACK TO SAVEPOINT projectionist_validate"
        };
        self.tx.batch_execute(end).await?;
        Ok(prepared)
    }
}

/// Advice about a manifest that works but could work better (printed by
/// `validate`): checks that cannot be compared while their projector lags.
pub fn advice(manifest: &Manifest) -> Vec<String> {
    let mut out = Vec::new();
    for p in &manifest.projectors {
        for c in &p.checks {
            if !crate::manifest::sql_text::uses(&c.events, "position")
                && !crate::manifest::sql_text::uses(&c.projection, "position")
            {
                out.push(format!(
                    "check \"{}\" of `{}` does not use :position: verify cannot compare it while `{}` is behind the head \
                     (it says BEHIND); stop its events query at the projector's position, e.g. `AND id <= :position`",
                    c.name, p.name, p.name
                ));
            }
        }
    }
    out
}

fn db_problem(span: crate::manifest::Span, message: String, e: &tokio_postgres::Error) -> Problem {
    crate::db::problem(span, message, e, None)
}

/// A program on PATH, or a path (relative to the manifest's directory) to a file.
fn command_exists(program: &str, dir: &std::path::Path) -> bool {
    if program.contains('/') {
        return dir.join(program).is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
        .unwrap_or(false)
}
