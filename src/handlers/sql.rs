//! SQL projectors: the handlers of one projector compiled into one PL/pgSQL
//! function, so that a batch of events is read and projected inside
//! PostgreSQL with no round trip per event.
//!
//! The function lives in `pg_temp` (one per session), reads the batch's events
//! itself, decodes the payload and metadata its handlers read (json, jsonb,
//! text or bytea holding UTF-8 JSON; one no handler reads may be anything),
//! runs the handler statements with the event's values held in
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
//!
//! A partitioned projector's function first tries the batch set-wise, in
//! waves of one event per stream (see [`set_wise`]), and falls back to the
//! event-by-event loop for a batch it cannot apply so.

use std::sync::atomic::{AtomicI64, Ordering};

use anyhow::{Context, Result};
use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

use super::set_wise::{self, CREATE_WAVE_TABLE};
use crate::db::{RowExt, quote_literal};
use crate::failure::{HandlerFailure, Origin};
use crate::manifest::Projector;
use crate::manifest::sql_text::{Statement, Value, ValueNames};
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

/// Where in an event's processing the function failed, in their order.
const STAGE_READING: i32 = 0;
const STAGE_DECODING_DATA: i32 = 1;
const STAGE_DECODING_METADATA: i32 = 2;
const STAGE_HANDLING: i32 = 3;

/// Events handled before the first re-planning (see the module's doc).
const REPLAN_AFTER: i64 = 1_000;

/// A batch is applied set-wise when its waves hold this many events on
/// average: a set-wise statement costs about as much to plan and start as
/// a dozen events cost event by event (a live tail of a few events, or a
/// stream with most of a batch's events, runs event by event).
const WAVE_SIZE: i64 = 32;

/// `pj_waves` of a batch whose set-wise attempt ran out of the statement's
/// own timeout: nothing is applied, and the batch is run again event by
/// event in a new statement, whose timeout then names the slow event.
const TIMED_OUT_SET_WISE: i64 = -1;

/// A failure that is not the handlers': a deadlock, a serialization failure,
/// or a cancellation that is not the statement's own timeout. It is raised
/// again and the caller retries the batch.
const NOT_THE_HANDLERS: &str = "pj_sqlstate IN ('40P01', '40001')
       OR (pj_sqlstate = '57014' AND NOT (current_setting('statement_timeout') NOT IN ('0', '')
           AND clock_timestamp() - statement_timestamp()
               >= current_setting('statement_timeout')::interval - interval '50 milliseconds'))";

/// Returns why a statement (with `$1` the wave) does not plan, or NULL.
const CREATE_PLAN_CHECK: &str =
    "CREATE OR REPLACE FUNCTION pg_temp.projectionist_plan_error(statement text)
RETURNS text LANGUAGE plpgsql AS $check$
BEGIN
  EXECUTE 'EXPLAIN ' || statement USING 0::bigint;
  RETURN NULL;
EXCEPTION WHEN others THEN
  RETURN SQLERRM;
END
$check$";

/// A projector's handlers, compiled for one session.
pub struct CompiledProjector {
    projector: String,
    function: String,
    create: String,
    /// The function that applies batches set-wise first, with the rewritten
    /// statements, when the projector is partitioned and every statement
    /// could be rewritten.
    set_wise: Option<(String, Vec<String>)>,
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
                // On a line of its own: the statement may end in a `--` comment.
                cases.push_str("\n        ;\n");
            }
        }
        let rewritten = set_wise_statements(projector);
        let wave_statements: String = rewritten
            .iter()
            .flatten()
            .map(|sql| {
                format!(
                    "          EXECUTE {} USING projectionist_wave_number;\n",
                    quote_literal(sql)
                )
            })
            .collect();
        let types = projector.event_types();
        let range = store.range("p_after_tx", "p_after", "p_upto_tx", "p_upto");
        let reads = ValuesRead::of(projector);
        // A payload no handler reads is not decoded: it cannot break the projector.
        let (data_raw, data) = if reads.data {
            (
                store.data.column(),
                store.data.decode("projectionist_data_raw"),
            )
        } else {
            (format!("NULL::{}", store.data.type_name), "NULL".into())
        };
        let (metadata_raw_type, metadata_raw, metadata) = match &store.metadata {
            Some(m) if reads.metadata => (
                m.type_name.clone(),
                m.column(),
                m.decode("projectionist_metadata_raw"),
            ),
            _ => ("jsonb".into(), "NULL::jsonb".into(), "NULL".into()),
        };
        let (wave_columns, wave_values) = reads.wave_values(store);
        let values = [
            ("__WAVE_SIZE__", WAVE_SIZE.to_string()),
            ("__WAVE_TABLE__", set_wise::WAVE_TABLE.to_string()),
            ("__WAVE_STATEMENTS__", wave_statements),
            ("__NOT_THE_HANDLERS__", NOT_THE_HANDLERS.to_string()),
            ("__TIMED_OUT__", TIMED_OUT_SET_WISE.to_string()),
            ("__WAVE_COLUMNS__", wave_columns),
            ("__WAVE_VALUES__", wave_values),
            ("__DATA_RAW_TYPE__", store.data.type_name.clone()),
            ("__METADATA_RAW_TYPE__", metadata_raw_type),
            ("__STAGE_READING__", STAGE_READING.to_string()),
            ("__STAGE_DECODING_DATA__", STAGE_DECODING_DATA.to_string()),
            (
                "__STAGE_DECODING_METADATA__",
                STAGE_DECODING_METADATA.to_string(),
            ),
            ("__STAGE_HANDLING__", STAGE_HANDLING.to_string()),
            ("__POSITION__", store.position_expr()),
            ("__TYPE__", store.type_expr()),
            ("__STREAM__", store.stream_expr()),
            ("__TIME__", store.time_expr()),
            ("__DATA_RAW__", data_raw),
            ("__METADATA_RAW__", metadata_raw),
            ("__TX__", store.tx_expr()),
            ("__RELATION__", store.relation()),
            ("__RANGE__", range),
            ("__FILTER__", store.filter_expr()),
            ("__TYPES__", store.type_filter(types.as_deref())),
            ("__ORDER__", store.order()),
            ("__DATA__", data),
            ("__METADATA__", metadata),
            ("__CASES__", cases),
        ];
        let body = |set_wise: bool| {
            let mut values = values.to_vec();
            values.push(("__SET_WISE__", set_wise.to_string()));
            fill(BATCH_FUNCTION, &values)
        };
        let create = |body: String| {
            let mut tag = "$projectionist_body$".to_string();
            while body.contains(&tag) {
                tag.insert(tag.len() - 1, 'x');
            }
            format!(
                "CREATE OR REPLACE FUNCTION {function}(\n  p_after_tx xid8, p_after bigint, p_upto_tx xid8, p_upto bigint, p_set_wise boolean,\n  \
             OUT pj_handled bigint, OUT pj_last_ok bigint, OUT pj_last_ok_tx text,\n  \
             OUT pj_failed_position bigint, OUT pj_failed_type text, OUT pj_failed_stream text,\n  \
             OUT pj_sqlstate text, OUT pj_message text, OUT pj_detail text, OUT pj_hint text, OUT pj_context text,\n  \
             OUT pj_failed_tx text, OUT pj_stage int, OUT pj_waves bigint)\n\
             LANGUAGE plpgsql SET jit = off AS {tag}{body}{tag}"
            )
        };
        CompiledProjector {
            projector: projector.name.clone(),
            create: create(body(false)),
            set_wise: rewritten
                .ok()
                .map(|statements| (create(body(true)), statements)),
            function,
            handled: AtomicI64::new(0),
            planned_at: AtomicI64::new(0),
        }
    }

    /// Creates the function in this session (call once per connection).
    ///
    /// A set-wise function is created only when each rewritten statement
    /// plans (`EXPLAIN`s) in this database: a rewrite can be refused where
    /// the original is fine, e.g. an event value in `ON CONFLICT DO UPDATE`,
    /// a view as the target of a `MERGE`, or a server before MERGE (15).
    pub async fn install(&self, client: &impl GenericClient) -> Result<()> {
        let mut create = &self.create;
        if let Some((set_wise_create, statements)) = &self.set_wise {
            client
                .batch_execute(&format!("{CREATE_WAVE_TABLE};\n{CREATE_PLAN_CHECK}"))
                .await
                .context("creating the table of a batch's waves")?;
            let mut refused = None;
            for statement in statements {
                let row = client
                    .query_one("SELECT pg_temp.projectionist_plan_error($1)", &[statement])
                    .await
                    .context("planning the set-wise handlers")?;
                if let Some(error) = row.col::<Option<String>>(0)? {
                    refused = Some(error);
                    break;
                }
            }
            match refused {
                None => create = set_wise_create,
                Some(error) => tracing::debug!(
                    "projector `{}` runs event by event: a set-wise statement does not plan: {error}",
                    self.projector
                ),
            }
        }
        client
            .batch_execute(create)
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
             pj_failed_stream, pj_sqlstate, pj_message, pj_detail, pj_hint, pj_context, pj_failed_tx, pj_stage, pj_waves \
             FROM {}($1::text::xid8, $2, $3::text::xid8, $4, $5)",
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
        let upto_tx = upto.tx_text();
        let mut set_wise = true;
        let row = loop {
            let row = client
                .query_one(&sql, &[&after_tx, &after.id, &upto_tx, &upto.id, &set_wise])
                .await
                .context("running a batch")?;
            match row.col::<Option<i64>>(13)? {
                Some(TIMED_OUT_SET_WISE) => {
                    tracing::debug!(
                        "projector `{}`: the batch ran out of its statement timeout set-wise; it runs again event by event",
                        self.projector
                    );
                    set_wise = false;
                }
                Some(waves) => {
                    tracing::debug!(
                        "projector `{}`: {} events applied set-wise, in {waves} waves",
                        self.projector,
                        row.col::<i64>(0)?
                    );
                    break row;
                }
                None => break row,
            }
        };
        let handled: i64 = row.col(0)?;
        self.handled.fetch_add(handled, Ordering::Relaxed);
        let Some(message) = row.col::<Option<String>>(7)? else {
            return Ok(BatchOutcome::Done { handled });
        };
        let last_ok = match row.col::<Option<i64>>(1)? {
            Some(id) => Some(Position::from_parts(row.col(2)?, id)?),
            None => None,
        };
        let stage: i32 = row.col::<Option<i32>>(12)?.unwrap_or(STAGE_HANDLING);
        let mut failure = HandlerFailure {
            origin: if stage == STAGE_HANDLING {
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
        } else if stage == STAGE_DECODING_DATA {
            failure.message = format!(
                "the event's payload is not UTF-8 JSON ({}): {}",
                shape.data.type_name, failure.message
            );
        } else if stage == STAGE_DECODING_METADATA {
            let type_name = shape.metadata.as_ref().map_or("", |m| &m.type_name);
            failure.message = format!(
                "the event's metadata is not UTF-8 JSON ({type_name}): {}",
                failure.message
            );
        }
        Ok(BatchOutcome::Failed {
            last_ok,
            failure: Box::new(failure),
        })
    }
}

/// A partitioned projector's statements rewritten set-wise, or why they
/// cannot all be (an unpartitioned projector's handlers may share state
/// across streams: it always runs event by event).
fn set_wise_statements(projector: &Projector) -> Result<Vec<String>, String> {
    if projector.partitions <= 1 {
        return Err("it is not partitioned".into());
    }
    let mut rewritten = Vec::new();
    for h in &projector.handlers {
        for s in &h.statements {
            let sql = set_wise::rewrite(s, &h.event_type).inspect_err(|why| {
                tracing::debug!(
                    "projector `{}` runs event by event: a statement of `{}`: {why}",
                    projector.name,
                    h.event_type
                )
            })?;
            rewritten.push(sql);
        }
    }
    Ok(rewritten)
}

/// The event values a projector's handlers read (its type is always read).
/// A value none reads is neither decoded nor copied into a wave: a payload
/// that does not decode breaks only a projector that reads it.
struct ValuesRead {
    position: bool,
    stream: bool,
    time: bool,
    data: bool,
    metadata: bool,
}

impl ValuesRead {
    fn of(projector: &Projector) -> ValuesRead {
        let reads = |wanted: fn(&Value) -> bool| {
            projector
                .handlers
                .iter()
                .flat_map(|h| &h.statements)
                .any(|s| s.values().any(wanted))
        };
        ValuesRead {
            position: reads(|v| matches!(v, Value::Position)),
            stream: reads(|v| matches!(v, Value::Stream)),
            time: reads(|v| matches!(v, Value::Time)),
            data: reads(|v| matches!(v, Value::Data(_))),
            metadata: reads(|v| matches!(v, Value::Metadata(_))),
        }
    }

    /// The columns of the wave table these values fill, beyond its wave,
    /// type and stream (`, pj_time, pj_data`), and the store's expressions
    /// that fill them (`, e.time AS pj_time, …`). The stream is always read
    /// (the waves are numbered by it) but written only when read.
    fn wave_values(&self, store: &StoreShape) -> (String, String) {
        let metadata = match &store.metadata {
            Some(m) => m.decode(&m.column()),
            None => "NULL::jsonb".into(),
        };
        // (column, read, its expression when not already selected)
        let candidates = [
            (
                "pj_position",
                self.position,
                Some(format!("{}::bigint", store.position_expr())),
            ),
            ("pj_stream", self.stream, None),
            ("pj_time", self.time, Some(store.time_expr())),
            (
                "pj_data",
                self.data,
                Some(store.data.decode(&store.data.column())),
            ),
            ("pj_metadata", self.metadata, Some(metadata)),
        ];
        let (mut columns, mut values) = (String::new(), String::new());
        for (column, _, expr) in candidates.into_iter().filter(|(_, read, _)| *read) {
            columns.push_str(&format!(", {column}"));
            if let Some(expr) = expr {
                values.push_str(&format!(", {expr} AS {column}"));
            }
        }
        (columns, values)
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
