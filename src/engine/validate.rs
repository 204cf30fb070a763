//! `validate`: the manifest against the database, writing nothing. The store's
//! columns and types, every owned table, every handler and check prepared
//! inside a transaction that is rolled back. All problems are reported at
//! once, each pointing at its place in the manifest.

use anyhow::Result;
use tokio_postgres::Client;

use crate::db::quote_qualified;
use crate::handlers::sql::{self, CompiledProjector};
use crate::manifest::{Manifest, Problem};
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
    for p in &manifest.projectors {
        if let Some(argv) = &p.command
            && !command_exists(&argv[0], manifest.dir())
        {
            problems.push(
                Problem::new(
                    p.span.clone(),
                    format!("the command of projector `{}` cannot be found: `{}`", p.name, argv[0]),
                    "command not found",
                )
                .help("commands run in the manifest's directory without a shell: give a program on PATH or a path to an executable"),
            );
        }
        for table in &p.tables {
            let exists: bool = tx
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL",
                    &[&quote_qualified(table)],
                )
                .await?
                .get(0);
            if !exists {
                problems.push(
                    Problem::new(
                        p.span.clone(),
                        format!("projector `{}` owns table `{table}`, which does not exist", p.name),
                        format!("tables includes \"{table}\""),
                    )
                    .help("create it in a migration (migrations/V{n}__name.sql) and run `projectionist migrate`"),
                );
            }
        }
        for h in &p.handlers {
            for statement in &h.statements {
                tx.batch_execute("SAVEPOINT projectionist_validate").await?;
                match sql::prepare(tx.client(), statement).await {
                    Ok(()) => {
                        tx.batch_execute("RELEASE SAVEPOINT projectionist_validate")
                            .await?
                    }
                    Err(e) => {
                        tx.batch_execute("ROLLBACK TO SAVEPOINT projectionist_validate")
                            .await?;
                        problems.push(db_problem(
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
        }
        for c in &p.checks {
            for (which, query) in [("projection", &c.projection), ("events", &c.events)] {
                let query = crate::manifest::sql_text::substitute(
                    query,
                    &[
                        ("position", "0::bigint".into()),
                        ("transaction", "NULL::xid8".into()),
                    ],
                );
                tx.batch_execute("SAVEPOINT projectionist_validate").await?;
                match tx.prepare(&query).await {
                    Ok(_) => {
                        tx.batch_execute("RELEASE SAVEPOINT projectionist_validate")
                            .await?
                    }
                    Err(e) => {
                        tx.batch_execute("ROLLBACK TO SAVEPOINT projectionist_validate")
                            .await?;
                        problems.push(db_problem(
                            c.span.clone(),
                            format!("the `{which}` query of check \"{}\" of projector `{}` does not prepare", c.name, p.name),
                            &e,
                        ));
                    }
                }
            }
        }
        if let Some(shape) = &shape
            && !p.handlers.is_empty()
        {
            tx.batch_execute("SAVEPOINT projectionist_validate").await?;
            match CompiledProjector::compile(shape, p).install(&tx).await {
                Ok(()) => {
                    tx.batch_execute("RELEASE SAVEPOINT projectionist_validate")
                        .await?
                }
                Err(e) => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT projectionist_validate")
                        .await?;
                    let text = crate::error::render(&e);
                    problems.push(
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
        }
    }
    tx.rollback().await?;
    match shape {
        Some(shape) if problems.is_empty() => Ok(shape),
        _ => Err(manifest.error(problems).into()),
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
    match e.as_db_error() {
        Some(db) => {
            let mut help = Vec::new();
            if let Some(d) = db.detail() {
                help.push(format!("detail: {d}"));
            }
            if let Some(h) = db.hint() {
                help.push(format!("hint: {h}"));
            }
            let p = Problem::new(span, message, db.message().to_string());
            if help.is_empty() {
                p
            } else {
                p.help(help.join("\n"))
            }
        }
        None => Problem::new(span, message, e.to_string()),
    }
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
