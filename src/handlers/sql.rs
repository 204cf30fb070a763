//! SQL projectors: the handlers of one projector compiled into one PL/pgSQL
//! function, so that a batch of events is read and projected inside
//! PostgreSQL with no round trip per event.
//!
//! The function lives in `pg_temp` (one per session), reads the batch's events
//! itself, decodes each payload (json, jsonb, text or bytea holding UTF-8
//! JSON), runs the handler statements with the event's values held in
//! PL/pgSQL variables (PL/pgSQL binds them as parameters: event data never
//! becomes SQL text), and catches the first failure to report the failing
//! event's position, type and stream with the database's message, detail and
//! hint. The caller commits the batch together with the position update.
//!
//! A statement or lock timeout is the failure of the event it interrupted
//! (`query_canceled` is caught explicitly: it is not part of `others`). A
//! deadlock, a serialization failure or a cancellation from outside is not
//! the handler's fault: it is raised again, and the caller retries the batch.
//!
//! The function runs with `jit` off. The planner cannot estimate a batch's
//! range (a row comparison), so on a store of millions of events it costs
//! the batch's reading as a scan of a large part of the store, and JIT would
//! compile it, inlined and optimized, for every batch: at 10M events that
//! was 40% of a boot's time. A handler statement, run once per event, never
//! gains from being compiled either.
//!
//! PostgreSQL keeps the plans of the handler statements for the session. A
//! plan made while a read model is nearly empty (the first events of a boot)
//! is a sequential scan, and it would be kept while the table grows to
//! millions of rows: each later event would scan the whole table. The plans
//! are therefore made again each time the events handled in the session have
//! doubled, so they follow the tables' growth at a cost of a few re-plannings.

use std::sync::atomic::{AtomicI64, Ordering};

use anyhow::{Context, Result};
use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

use crate::db::{RowExt, quote_literal};
use crate::failure::{HandlerFailure, Origin};
use crate::manifest::Projector;
use crate::manifest::sql_text::{Statement, ValueNames};
use crate::store::{Position, StoreShape};

/// Names of the PL/pgSQL variables that hold the current event.
struct Variables;

impl ValueNames for Variables {
    fn position(&self) -> &str {
        "projectionist_position"
    }
    fn event_type(&self) -> &str {
        "projectionist_type"
    }
    fn stream(&self) -> &str {
        "projectionist_stream"
    }
    fn time(&self) -> &str {
        "projectionist_time"
    }
    fn data(&self) -> &str {
        "projectionist_data"
    }
    fn metadata(&self) -> &str {
        "projectionist_metadata"
    }
}

/// Parameters `$1`…`$6`, for preparing a handler on its own (validate).
pub struct Parameters;

/// The parameter types of [`Parameters`].
pub const PARAMETER_TYPES: [Type; 6] = [
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::JSONB,
    Type::JSONB,
];

impl ValueNames for Parameters {
    fn position(&self) -> &str {
        "$1"
    }
    fn event_type(&self) -> &str {
        "$2"
    }
    fn stream(&self) -> &str {
        "$3"
    }
    fn time(&self) -> &str {
        "$4"
    }
    fn data(&self) -> &str {
        "$5"
    }
    fn metadata(&self) -> &str {
        "$6"
    }
}

/// What a batch did.
#[derive(Debug)]
pub enum BatchOutcome {
    /// Every event up to the batch's end was projected.
    Done { handled: i64 },
    /// A handler failed; nothing of the batch was kept. `last_ok` is the last
    /// event before the failing one that was handled (run the batch again up
    /// to it to keep that progress).
    Failed {
        last_ok: Option<Position>,
        failure: Box<HandlerFailure>,
    },
}

/// The PL/pgSQL body of a batch function, with `__TOKEN__`s for the store's
/// expressions and the handlers.
const BATCH_FUNCTION: &str = include_str!("batch_function.plpgsql");

/// Where in an event's processing the function failed.
const STAGE_READING: i32 = 0;
const STAGE_DECODING: i32 = 1;

/// Events handled before the first re-planning (see the module's doc).
const REPLAN_AFTER: i64 = 1_000;

/// A projector's handlers, compiled for one session.
pub struct CompiledProjector {
    function: String,
    create: String,
    /// Events handled in this session, and how many had been when the
    /// session's plans were last made.
    handled: AtomicI64,
    planned_at: AtomicI64,
}

impl CompiledProjector {
    pub fn compile(store: &StoreShape, projector: &Projector) -> CompiledProjector {
        let function = format!("pg_temp.projectionist_batch_{}", projector.name);
        let mut cases = String::new();
        for h in &projector.handlers {
            cases.push_str(&format!(
                "      WHEN {} THEN\n",
                quote_literal(&h.event_type)
            ));
            for s in &h.statements {
                cases.push_str("        ");
                cases.push_str(&plpgsql_statement(s));
                cases.push_str(";\n");
            }
        }
        let types = projector.event_types();
        let range = store.range("p_after_tx", "p_after", "p_upto_tx", "p_upto");
        let (metadata_raw_type, metadata_raw, metadata) = match &store.metadata {
            Some(m) => (
                m.type_name.clone(),
                m.column(),
                m.decode("projectionist_metadata_raw"),
            ),
            None => ("jsonb".into(), "NULL::jsonb".into(), "NULL".into()),
        };
        let body = fill(
            BATCH_FUNCTION,
            &[
                ("__DATA_RAW_TYPE__", store.data.type_name.clone()),
                ("__METADATA_RAW_TYPE__", metadata_raw_type),
                ("__STAGE_READING__", STAGE_READING.to_string()),
                ("__STAGE_DECODING__", STAGE_DECODING.to_string()),
                ("__POSITION__", store.position_expr()),
                ("__TYPE__", store.type_expr()),
                ("__STREAM__", store.stream_expr()),
                ("__TIME__", store.time_expr()),
                ("__DATA_RAW__", store.data.column()),
                ("__METADATA_RAW__", metadata_raw),
                ("__TX__", store.tx_expr()),
                ("__RELATION__", store.relation()),
                ("__RANGE__", range),
                ("__FILTER__", store.filter_expr()),
                ("__TYPES__", store.type_filter(types.as_deref())),
                ("__ORDER__", store.order()),
                ("__DATA__", store.data.decode("projectionist_data_raw")),
                ("__METADATA__", metadata),
                ("__CASES__", cases),
            ],
        );
        let mut tag = "$projectionist_body$".to_string();
        while body.contains(&tag) {
            tag.insert(tag.len() - 1, 'x');
        }
        let create = format!(
            "CREATE OR REPLACE FUNCTION {function}(\n  p_after_tx xid8, p_after bigint, p_upto_tx xid8, p_upto bigint,\n  \
             OUT pj_handled bigint, OUT pj_last_ok bigint, OUT pj_last_ok_tx text,\n  \
             OUT pj_failed_position bigint, OUT pj_failed_type text, OUT pj_failed_stream text,\n  \
             OUT pj_sqlstate text, OUT pj_message text, OUT pj_detail text, OUT pj_hint text, OUT pj_context text,\n  \
             OUT pj_failed_tx text, OUT pj_stage int)\n\
             LANGUAGE plpgsql SET jit = off AS {tag}{body}{tag}"
        );
        CompiledProjector {
            function,
            create,
            handled: AtomicI64::new(0),
            planned_at: AtomicI64::new(0),
        }
    }

    /// Creates the function in this session (call once per connection).
    pub async fn install(&self, client: &impl GenericClient) -> Result<()> {
        client
            .batch_execute(&self.create)
            .await
            .context("compiling the handlers into a PL/pgSQL function")
    }

    /// Projects the events in (after, upto] inside the caller's transaction.
    pub async fn run(
        &self,
        shape: &StoreShape,
        client: &impl GenericClient,
        after: Position,
        upto: Position,
    ) -> Result<BatchOutcome> {
        let sql = format!(
            "SELECT pj_handled, pj_last_ok, pj_last_ok_tx, pj_failed_position, pj_failed_type, \
             pj_failed_stream, pj_sqlstate, pj_message, pj_detail, pj_hint, pj_context, pj_failed_tx, pj_stage \
             FROM {}($1::text::xid8, $2, $3::text::xid8, $4)",
            self.function
        );
        let handled = self.handled.load(Ordering::Relaxed);
        if handled >= REPLAN_AFTER.max(2 * self.planned_at.load(Ordering::Relaxed)) {
            client
                .batch_execute("DISCARD PLANS")
                .await
                .context("discarding the handlers' plans")?;
            self.planned_at.store(handled, Ordering::Relaxed);
        }
        let after_tx = after.tx_text().or_else(|| Some("0".into()));
        let row = client
            .query_one(&sql, &[&after_tx, &after.id, &upto.tx_text(), &upto.id])
            .await
            .context("running a batch")?;
        let handled: i64 = row.col(0)?;
        self.handled.fetch_add(handled, Ordering::Relaxed);
        let Some(message) = row.col::<Option<String>>(7)? else {
            return Ok(BatchOutcome::Done { handled });
        };
        let last_ok = match row.col::<Option<i64>>(1)? {
            Some(id) => Some(Position::from_parts(row.col(2)?, id)?),
            None => None,
        };
        let stage: i32 = row.col::<Option<i32>>(12)?.unwrap_or(2);
        let mut failure = HandlerFailure {
            origin: if stage == 2 {
                Origin::Handler
            } else {
                Origin::Event
            },
            position: row.col::<Option<i64>>(3)?.unwrap_or_default(),
            tx: row
                .col::<Option<String>>(11)?
                .map(|t| t.parse())
                .transpose()
                .context("reading an xid8")?,
            event_type: row.col::<Option<String>>(4)?.unwrap_or_default(),
            stream: row.col(5)?,
            sqlstate: row.col::<Option<String>>(6)?.unwrap_or_default(),
            message,
            detail: row.col::<Option<String>>(8)?.filter(|s| !s.is_empty()),
            hint: row.col::<Option<String>>(9)?.filter(|s| !s.is_empty()),
            context: row.col::<Option<String>>(10)?.filter(|s| !s.is_empty()),
        };
        if stage == STAGE_READING {
            // Reading the next row failed (a type, stream or time expression):
            // the failing event is the one after the last handled.
            let from = last_ok.unwrap_or(after);
            let at = shape.successor(client, from, upto).await?.unwrap_or(upto);
            failure.position = at.id;
            failure.tx = at.tx;
            failure.event_type = String::new();
            failure.stream = None;
            failure.message = format!("reading the event failed: {}", failure.message);
        } else if stage == STAGE_DECODING {
            failure.message = format!(
                "the event's payload is not UTF-8 JSON ({}): {}",
                shape.data.type_name, failure.message
            );
        }
        Ok(BatchOutcome::Failed {
            last_ok,
            failure: Box::new(failure),
        })
    }
}

/// Fills the `__TOKEN__`s of a template in one pass: the values (the store's
/// expressions, the handlers' SQL) are never searched for tokens themselves.
fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len() * 2);
    let mut rest = template;
    while let Some(at) = rest.find("__") {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        match values.iter().find(|(token, _)| rest.starts_with(token)) {
            Some((token, value)) => {
                out.push_str(value);
                rest = &rest[token.len()..];
            }
            None => {
                out.push_str("__");
                rest = &rest[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A handler statement as PL/pgSQL: a leading SELECT becomes PERFORM (its rows are discarded).
fn plpgsql_statement(statement: &Statement) -> String {
    let sql = statement.render(&Variables);
    if statement.keyword() == "select" {
        let at = crate::manifest::sql_text::code_start(&sql);
        format!("{}PERFORM{}", &sql[..at], &sql[at + "select".len()..])
    } else {
        sql
    }
}
