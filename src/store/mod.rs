//! The event-store reader: the store's shape as the database sees it
//! ([`StoreShape`]: its relation, the columns or expressions of each part of
//! an event, how payloads decode), where each batch may end without skipping
//! an event ([`reader`]), and reading events for command projectors.
//!
//! The store may be a table, a partitioned table, an inheritance tree or a
//! view. Payloads may be json, jsonb, text or bytea holding UTF-8 JSON, and
//! are decoded inside PostgreSQL. `type`, `stream` and `time` may be SQL
//! expressions over the row; `filter` skips rows that are not events.

pub mod reader;

use std::collections::HashMap;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient};

pub use reader::{Holder, PassedHoles, Plan, Reader};

use crate::db::{RowExt, quote_ident, quote_literal, quote_qualified};
use crate::manifest::{Problem, Span, Store};

/// A place in the event order: the event's position, and with a transaction
/// column its transaction id (the order is then (tx, position)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub tx: Option<u64>,
    pub id: i64,
}

impl Position {
    pub const START: Position = Position { tx: None, id: 0 };

    pub fn tx_text(&self) -> Option<String> {
        self.tx.map(|t| t.to_string())
    }

    pub fn from_parts(tx: Option<String>, id: i64) -> Result<Position> {
        Ok(Position {
            tx: tx
                .map(|t| t.parse())
                .transpose()
                .context("reading an xid8")?,
            id,
        })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.id)
    }
}

/// One part of a partitioned projector's events: those whose stream hashes
/// to `index` among `count` parts. Events without a stream are in part 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Partition {
    pub index: i32,
    pub count: i32,
}

impl Partition {
    /// The parts of a projector with `count` partitions (none when it has one).
    pub fn all(count: i32) -> Vec<Partition> {
        if count <= 1 {
            return Vec::new();
        }
        (0..count).map(|index| Partition { index, count }).collect()
    }
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "partition {} of {}", self.index, self.count)
    }
}

/// The part (0 to `count` - 1, an SQL expression) an event of stream
/// `stream` (text) belongs to. `hashtextextended` is the hash PostgreSQL's
/// own hash partitioning uses, so it stays the same across versions; see
/// [`HASH_CANARY`].
pub fn partition_of(stream: &str, count: &str) -> String {
    format!("coalesce(abs(hashtextextended({stream}, 0) % {count}), 0)")
}

/// `hashtextextended('projectionist', 0)` on the servers partitions were
/// designed on: a server that hashes differently (another byte order)
/// would move events between parts, so partitioned projectors refuse it.
pub const HASH_CANARY: i64 = 1_318_145_273_096_030_278;

/// How a payload column is turned into jsonb.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    /// The quoted column.
    column: String,
    /// Its type as PostgreSQL names it (`jsonb`, `json`, `text`, `bytea`, …).
    pub type_name: String,
}

impl Payload {
    /// jsonb from a value of the column's type (`raw`: an expression of it).
    pub fn decode(&self, raw: &str) -> String {
        match self.type_name.as_str() {
            "jsonb" => raw.to_string(),
            "bytea" => format!("convert_from({raw}, 'UTF8')::jsonb"),
            _ => format!("{raw}::jsonb"),
        }
    }

    /// The column of alias `e`.
    pub fn column(&self) -> String {
        format!("e.{}", self.column)
    }
}

/// The kind of relation the store is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelationKind {
    Table,
    Partitioned,
    View,
    MaterializedView,
    Foreign,
}

/// The store, resolved against the database: the quoted relation and an SQL
/// expression for each part of an event, over the row aliased `e`.
#[derive(Clone, Debug)]
pub struct StoreShape {
    /// The quoted relation.
    pub table: String,
    /// The relation as `regclass` text.
    pub regclass: String,
    pub kind: RelationKind,
    /// The relations whose writers can add events: the store, its partitions
    /// or children, and what a view reads (oids).
    pub sources: Vec<u32>,
    position: String,
    event_type: String,
    stream: Option<String>,
    time: Option<String>,
    pub data: Payload,
    pub metadata: Option<Payload>,
    /// The quoted transaction column.
    pub transaction: Option<String>,
    filter: Option<String>,
}

/// Column types accepted for payloads.
const PAYLOAD_TYPES: [&str; 5] = ["jsonb", "json", "text", "character varying", "bytea"];
const TIME_TYPES: [&str; 2] = ["timestamp with time zone", "timestamp without time zone"];

/// A `[store]` value: a column of the relation, or an SQL expression over its row.
enum Part {
    Column { quoted: String, type_name: String },
    Expression { sql: String, type_name: String },
}

impl Part {
    /// The value over `e`, with a cast appended.
    fn sql(self, cast: &str) -> String {
        match self {
            Part::Column { quoted, .. } => format!("e.{quoted}{cast}"),
            Part::Expression { sql, .. } => format!("({sql}){cast}"),
        }
    }

    /// A time as timestamptz: a timestamp without time zone is taken as UTC.
    fn time(self) -> String {
        let utc = matches!(&self, Part::Column { type_name, .. } | Part::Expression { type_name, .. }
            if type_name == "timestamp without time zone");
        let sql = self.sql("");
        if utc {
            format!("({sql} AT TIME ZONE 'UTC')")
        } else {
            sql
        }
    }
}

/// The store's relation as the catalog has it.
struct Relation {
    table: String,
    regclass: String,
    kind: RelationKind,
    /// Column name → type.
    columns: HashMap<String, String>,
    sources: Vec<u32>,
}

impl Relation {
    async fn look_up(client: &Client, store: &Store) -> Result<Relation, Vec<Problem>> {
        let failed = |e: tokio_postgres::Error| {
            vec![Problem::new(
                store.span_of("table"),
                format!("cannot look up the events table: {e}"),
                "here",
            )]
        };
        let table = quote_qualified(&store.table);
        let row = client
            .query_opt(
                "SELECT c.oid::regclass::text, c.relkind::text, c.oid FROM pg_class c WHERE c.oid = to_regclass($1)",
                &[&table],
            )
            .await
            .map_err(failed)?;
        let Some(row) = row else {
            return Err(vec![
                Problem::new(
                    store.span_of("table"),
                    format!("the events table `{}` does not exist", store.table),
                    "no such table or view",
                )
                .help("run `projectionist migrate` first, or fix [store] table"),
            ]);
        };
        let regclass: String = row.get(0);
        let relkind: String = row.get(1);
        let oid: u32 = row.get(2);
        let kind = match relkind.as_str() {
            "r" => RelationKind::Table,
            "p" => RelationKind::Partitioned,
            "v" => RelationKind::View,
            "m" => RelationKind::MaterializedView,
            "f" => RelationKind::Foreign,
            other => {
                return Err(vec![Problem::new(
                    store.span_of("table"),
                    format!("`{regclass}` is not a table or a view (relkind {other})"),
                    "not a table or view",
                )]);
            }
        };
        let columns = client
            .query(
                "SELECT attname::text, format_type(atttypid, NULL) FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                &[&oid],
            )
            .await
            .map_err(failed)?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let sources: Vec<u32> = client
            .query_one(SOURCES, &[&oid])
            .await
            .map_err(failed)?
            .get(0);
        Ok(Relation {
            table,
            regclass,
            kind,
            columns,
            sources,
        })
    }

    /// A `[store]` value: one of the relation's columns, or (where
    /// `expressions`) an SQL expression over its row, typed by preparing it;
    /// of one of the `allowed` types, if any are given.
    async fn part(
        &self,
        client: &Client,
        (key, span): (&'static str, Span),
        value: &str,
        allowed: &[&str],
        expressions: bool,
    ) -> Result<Part, Problem> {
        let part = match self.columns.get(value) {
            Some(t) => Part::Column {
                quoted: quote_ident(value),
                type_name: t.clone(),
            },
            None if !expressions || is_identifier(value) => {
                return Err(Problem::new(
                    span,
                    format!(
                        "store.{key}: column `{value}` does not exist in {}",
                        self.regclass
                    ),
                    "no such column",
                )
                .help(format!(
                    "columns of {}: {}",
                    self.regclass,
                    sorted(self.columns.keys())
                )));
            }
            None => {
                let st = client
                    .prepare(&format!("SELECT ({value}) FROM {} e LIMIT 0", self.table))
                    .await
                    .map_err(|e| expression_problem(span.clone(), key, &e))?;
                Part::Expression {
                    sql: value.to_string(),
                    type_name: format_type(&st.columns()[0].type_().to_string()),
                }
            }
        };
        let type_name = match &part {
            Part::Column { type_name, .. } | Part::Expression { type_name, .. } => type_name,
        };
        if !allowed.is_empty() && !allowed.contains(&type_name.as_str()) {
            return Err(Problem::new(
                span,
                format!(
                    "store.{key} is {type_name}; expected {}",
                    allowed.join(", ")
                ),
                format!("{type_name}, not {}", allowed.join(" or ")),
            ));
        }
        Ok(part)
    }
}

impl StoreShape {
    /// Checks the store's relation, columns, expressions and filter; every
    /// problem points at the `[store]` key at fault.
    pub async fn inspect(client: &Client, store: &Store) -> Result<StoreShape, Vec<Problem>> {
        let rel = Relation::look_up(client, store).await?;
        let wanted: [(&'static str, Option<&String>, &[&str], bool); 7] = [
            (
                "position",
                Some(&store.position),
                &["bigint", "integer", "smallint"],
                false,
            ),
            ("type", Some(&store.event_type), &[], true),
            ("data", Some(&store.data), &PAYLOAD_TYPES, false),
            ("stream", store.stream.as_ref(), &[], true),
            ("time", store.time.as_ref(), &TIME_TYPES, true),
            ("metadata", store.metadata.as_ref(), &PAYLOAD_TYPES, false),
            ("transaction", store.transaction.as_ref(), &["xid8"], false),
        ];
        let mut problems = Vec::new();
        let mut parts: HashMap<&'static str, Part> = HashMap::new();
        for (key, value, allowed, expressions) in wanted {
            let Some(value) = value else { continue };
            match rel
                .part(
                    client,
                    (key, store.span_of(key)),
                    value,
                    allowed,
                    expressions,
                )
                .await
            {
                Ok(p) => {
                    parts.insert(key, p);
                }
                Err(p) => problems.push(p),
            }
        }
        if let Some(filter) = &store.filter {
            let sql = format!("SELECT 1 FROM {} e WHERE ({filter}) LIMIT 0", rel.table);
            if let Err(e) = client.prepare(&sql).await {
                problems.push(expression_problem(store.span_of("filter"), "filter", &e));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let (
            Some(Part::Column {
                quoted: position, ..
            }),
            Some(Part::Column {
                quoted: data,
                type_name,
            }),
        ) = (parts.remove("position"), parts.remove("data"))
        else {
            return Err(Vec::new());
        };
        let payload = |p: Option<Part>| match p {
            Some(Part::Column { quoted, type_name }) => Some(Payload {
                column: quoted,
                type_name,
            }),
            _ => None,
        };
        Ok(StoreShape {
            table: rel.table,
            regclass: rel.regclass,
            kind: rel.kind,
            sources: rel.sources,
            position,
            event_type: parts
                .remove("type")
                .map(|p| p.sql("::text"))
                .unwrap_or_default(),
            stream: parts.remove("stream").map(|p| p.sql("::text")),
            time: parts.remove("time").map(Part::time),
            data: Payload {
                column: data,
                type_name,
            },
            metadata: payload(parts.remove("metadata")),
            transaction: match parts.remove("transaction") {
                Some(Part::Column { quoted, .. }) => Some(quoted),
                _ => None,
            },
            filter: store.filter.clone(),
        })
    }

    /// The relation, aliased `e`.
    pub fn relation(&self) -> String {
        format!("{} e", self.table)
    }

    /// The position of `e`, as stored.
    pub fn position_expr(&self) -> String {
        format!("e.{}", self.position)
    }

    /// The type of `e`, as text.
    pub fn type_expr(&self) -> String {
        self.event_type.clone()
    }

    /// Whether events have a stream (`[store] stream`).
    pub fn has_stream(&self) -> bool {
        self.stream.is_some()
    }

    /// The stream of `e`, as text (NULL without one).
    pub fn stream_expr(&self) -> String {
        self.stream.clone().unwrap_or_else(|| "NULL::text".into())
    }

    /// The time of `e`, as timestamptz (NULL without one).
    pub fn time_expr(&self) -> String {
        self.time
            .clone()
            .unwrap_or_else(|| "NULL::timestamptz".into())
    }

    /// The transaction of `e`, as xid8 (NULL without a transaction column).
    pub fn tx_expr(&self) -> String {
        match &self.transaction {
            Some(t) => format!("e.{t}"),
            None => "NULL::xid8".into(),
        }
    }

    /// The `[store] filter` condition over `e` (`true` without one).
    pub fn filter_expr(&self) -> String {
        match &self.filter {
            Some(f) => format!("({f})"),
            None => "true".into(),
        }
    }

    /// The events of one part of a partitioned projector: this store with
    /// the part's condition added to its filter.
    pub fn partition(&self, part: Partition) -> StoreShape {
        let of = partition_of(&self.stream_expr(), &part.count.to_string());
        let condition = format!("{of} = {}", part.index);
        StoreShape {
            filter: Some(match &self.filter {
                Some(f) => format!("({f}) AND {condition}"),
                None => condition,
            }),
            ..self.clone()
        }
    }

    /// The reading order.
    pub fn order(&self) -> String {
        match &self.transaction {
            Some(t) => format!("e.{t}, e.{}", self.position),
            None => format!("e.{}", self.position),
        }
    }

    fn order_desc(&self) -> String {
        match &self.transaction {
            Some(t) => format!("e.{t} DESC, e.{} DESC", self.position),
            None => format!("e.{} DESC", self.position),
        }
    }

    /// The condition of events in (after, upto], over PL/pgSQL variables or
    /// parameters named by the caller (typed xid8 and bigint).
    pub fn range(&self, after_tx: &str, after: &str, upto_tx: &str, upto: &str) -> String {
        let p = &self.position;
        match &self.transaction {
            Some(t) => format!(
                "(e.{t}, e.{p}) > ({after_tx}, {after}) AND (e.{t}, e.{p}) <= ({upto_tx}, {upto})"
            ),
            None => format!("e.{p} > {after} AND e.{p} <= {upto}"),
        }
    }

    /// [`range`](Self::range) over numbered parameters from `$first`, with
    /// exactly the parameters it uses (a parameter left unused has no type).
    pub fn range_params(
        &self,
        after: Position,
        upto: Position,
        first: usize,
    ) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
        let n = |i: usize| first + i;
        match &self.transaction {
            Some(_) => (
                self.range(
                    &format!("${}::text::xid8", n(0)),
                    &format!("${}::bigint", n(1)),
                    &format!("${}::text::xid8", n(2)),
                    &format!("${}::bigint", n(3)),
                ),
                vec![
                    Box::new(after.tx_text().unwrap_or_else(|| "0".into())),
                    Box::new(after.id),
                    Box::new(upto.tx_text().unwrap_or_else(|| "0".into())),
                    Box::new(upto.id),
                ],
            ),
            None => (
                self.range(
                    "",
                    &format!("${}::bigint", n(0)),
                    "",
                    &format!("${}::bigint", n(1)),
                ),
                vec![Box::new(after.id), Box::new(upto.id)],
            ),
        }
    }

    /// The condition of events after `after`, over numbered parameters from `$first`.
    pub fn after_params(
        &self,
        after: Position,
        first: usize,
    ) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
        let p = &self.position;
        match &self.transaction {
            Some(t) => (
                format!(
                    "(e.{t}, e.{p}) > (${first}::text::xid8, ${}::bigint)",
                    first + 1
                ),
                vec![
                    Box::new(after.tx_text().unwrap_or_else(|| "0".into())),
                    Box::new(after.id),
                ],
            ),
            None => (
                format!("e.{p} > ${first}::bigint"),
                vec![Box::new(after.id)],
            ),
        }
    }

    /// Condition on the event type (`e`), for the given types (`None`: all).
    pub fn type_filter(&self, types: Option<&[String]>) -> String {
        match types {
            None => "true".into(),
            Some(types) => format!(
                "{} = ANY (ARRAY[{}]::text[])",
                self.event_type,
                if types.is_empty() {
                    "NULL".to_string()
                } else {
                    types
                        .iter()
                        .map(|t| quote_literal(t))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
        }
    }

    /// The newest event visible now (committed), whatever holds it back, and its time.
    pub async fn visible_head(
        &self,
        client: &impl GenericClient,
    ) -> Result<Option<(Position, Option<DateTime<Utc>>)>> {
        let sql = format!(
            "SELECT {tx}::text, {p}::bigint, {time} FROM {rel} ORDER BY {order} LIMIT 1",
            tx = self.tx_expr(),
            p = self.position_expr(),
            time = self.time_expr(),
            rel = self.relation(),
            order = self.order_desc(),
        );
        let row = client
            .query_opt(&sql, &[])
            .await
            .context("reading the head of the event store")?;
        row.map(|r| Ok((Position::from_parts(r.col(0)?, r.col(1)?)?, r.col(2)?)))
            .transpose()
    }

    /// The time of the event at `pos` (for BEHIND), if the store has a time.
    pub async fn time_at(
        &self,
        client: &impl GenericClient,
        pos: Position,
    ) -> Result<Option<DateTime<Utc>>> {
        if self.time.is_none() || pos.id == 0 {
            return Ok(None);
        }
        let sql = format!(
            "SELECT {} FROM {} WHERE {} = $1::bigint LIMIT 1",
            self.time_expr(),
            self.relation(),
            self.position_expr(),
        );
        match client.query_opt(&sql, &[&pos.id]).await? {
            Some(r) => r.col(0),
            None => Ok(None),
        }
    }

    /// The last event before `before` and after `after` (or `after` itself):
    /// where a projector stands when the event at `before` fails.
    pub async fn predecessor(
        &self,
        client: &impl GenericClient,
        after: Position,
        before: Position,
    ) -> Result<Position> {
        self.neighbour(client, after, before, true).await
    }

    /// The first event after `after` and before `upto` (inclusive): where a
    /// batch stood when reading its next row failed.
    pub async fn successor(
        &self,
        client: &impl GenericClient,
        after: Position,
        upto: Position,
    ) -> Result<Option<Position>> {
        let next = self.neighbour(client, after, upto, false).await?;
        Ok((next != after).then_some(next))
    }

    async fn neighbour(
        &self,
        client: &impl GenericClient,
        after: Position,
        limit: Position,
        last: bool,
    ) -> Result<Position> {
        let (cond, params) = self.range_params(after, limit, 1);
        // `before` itself is excluded when looking back from it.
        let p = &self.position;
        let exclude = match (last, &self.transaction) {
            (false, _) => String::new(),
            (true, Some(t)) => format!(" AND (e.{t}, e.{p}) <> ($3::text::xid8, $4::bigint)"),
            (true, None) => format!(" AND e.{p} <> $2::bigint"),
        };
        let sql = format!(
            "SELECT {tx}::text, {p}::bigint FROM {rel} WHERE {cond}{exclude} ORDER BY {order} LIMIT 1",
            tx = self.tx_expr(),
            p = self.position_expr(),
            rel = self.relation(),
            order = if last {
                self.order_desc()
            } else {
                self.order()
            },
        );
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|b| b.as_ref() as _).collect();
        let row = client
            .query_opt(&sql, &refs)
            .await
            .context("finding a neighbouring event")?;
        match row {
            Some(r) => Position::from_parts(r.col(0)?, r.col(1)?),
            None => Ok(after),
        }
    }

    /// The events in (after, upto] as the JSON lines of the command protocol,
    /// built by PostgreSQL: (position, type, line). At most `limit`, in order.
    pub async fn read_event_lines(
        &self,
        client: &impl GenericClient,
        after: Position,
        upto: Position,
        types: Option<&[String]>,
        limit: i64,
    ) -> Result<Vec<(Position, String, String)>> {
        let (cond, mut params) = self.range_params(after, upto, 1);
        let limit_param = params.len() + 1;
        params.push(Box::new(limit));
        let time = format!(
            "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            self.time_expr()
        );
        let metadata = match &self.metadata {
            Some(m) => m.decode(&m.column()),
            None => "NULL::jsonb".into(),
        };
        let sql = format!(
            "SELECT {tx}::text, {p}::bigint, {ty}, json_build_object('position', {p}, 'type', {ty}, \
             'stream', {stream}, 'time', {time}, 'data', {data}, 'metadata', {metadata})::text \
             FROM {rel} WHERE {cond} AND {filter} AND {types} ORDER BY {order} LIMIT ${limit_param}",
            tx = self.tx_expr(),
            p = self.position_expr(),
            ty = self.type_expr(),
            stream = self.stream_expr(),
            data = self.data.decode(&self.data.column()),
            rel = self.relation(),
            filter = self.filter_expr(),
            types = self.type_filter(types),
            order = self.order(),
        );
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|b| b.as_ref() as _).collect();
        let rows = client.query(&sql, &refs).await.context("reading events")?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    Position::from_parts(r.col(0)?, r.col(1)?)?,
                    r.col(2)?,
                    r.col(3)?,
                ))
            })
            .collect()
    }
}

/// The relations whose writers can add rows to the store: itself, its
/// partitions and inheritance children, and the relations a view reads,
/// transitively.
const SOURCES: &str = "WITH RECURSIVE rels(oid) AS ( \
       SELECT $1::oid \
       UNION \
       SELECT x.oid FROM rels r CROSS JOIN LATERAL ( \
         SELECT i.inhrelid AS oid FROM pg_inherits i WHERE i.inhparent = r.oid \
         UNION ALL \
         SELECT d.refobjid FROM pg_rewrite w JOIN pg_depend d \
           ON d.classid = 'pg_rewrite'::regclass AND d.objid = w.oid \
          AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.oid \
         WHERE w.ev_class = r.oid) x) \
     SELECT array_agg(oid) FROM rels";

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

/// tokio-postgres' type names as PostgreSQL's `format_type` writes them.
fn format_type(t: &str) -> String {
    match t {
        "timestamptz" => "timestamp with time zone".into(),
        "timestamp" => "timestamp without time zone".into(),
        "varchar" => "character varying".into(),
        "bpchar" => "character".into(),
        "int8" => "bigint".into(),
        "int4" => "integer".into(),
        "int2" => "smallint".into(),
        other => other.into(),
    }
}

fn expression_problem(span: Span, key: &str, e: &tokio_postgres::Error) -> Problem {
    let (message, hint) = if key == "filter" {
        (
            "store.filter is not a valid SQL condition over the store's row".to_string(),
            "write a boolean SQL condition over the row, e.g. NOT is_archived AND message_kind = 'E'",
        )
    } else {
        (
            format!("store.{key} is not a column or a valid SQL expression over the store's row"),
            "write a column name, or an SQL expression over the row such as message->>'type'",
        )
    };
    crate::db::problem(span, message, e, Some(hint))
}

fn sorted<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let mut v: Vec<&str> = names.map(|s| s.as_str()).collect();
    v.sort();
    v.join(", ")
}
