//! The event-store reader: the store's shape as the database sees it, its
//! heads, batch boundaries, gap safety, and streaming reads.
//!
//! Gap safety is what keeps an event from being skipped when transactions
//! commit out of order:
//! - with `[store].transaction` (an xid8 column), events are ordered by
//!   (transaction id, position) and read only below the oldest transaction
//!   still running in this database (see [`HORIZON`]), so nothing can appear
//!   behind a reader;
//! - without it, a hole in the positions is held while a transaction that may
//!   still fill it is alive (it holds a write lock on the table and began
//!   before the hole was first seen), and passed once none is; each passed
//!   hole is recorded in the ledger.

use std::collections::HashMap;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use crate::db::{quote_ident, quote_literal, quote_qualified};
use crate::manifest::{Problem, Store};

/// The oldest transaction id that may still insert an event: the lowest
/// running one of *this* database (top-level xids of its backends and its
/// prepared transactions), or the snapshot's xmax when none runs.
///
/// `pg_snapshot_xmin` alone would do, but it is cluster-wide: one long
/// transaction in another database would hold every projector back. Other
/// databases cannot insert into this table, so they are left out. Without the
/// privilege to see other roles' backends, the cluster-wide xmin is used.
pub const HORIZON: &str = "SELECT CASE WHEN NOT (pg_has_role('pg_read_all_stats', 'MEMBER') \
       OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)) \
     THEN pg_snapshot_xmin(pg_current_snapshot()) \
     ELSE coalesce((SELECT min(x) FROM pg_snapshot_xip(pg_current_snapshot()) x \
        WHERE (x::text::bigint % 4294967296) IN ( \
          SELECT backend_xid::text::bigint FROM pg_stat_activity \
           WHERE datname = current_database() AND backend_xid IS NOT NULL \
          UNION ALL SELECT transaction::text::bigint FROM pg_prepared_xacts \
           WHERE database = current_database())), \
        pg_snapshot_xmax(pg_current_snapshot())) END";

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

/// The store, resolved against the database: quoted names and column types.
#[derive(Clone, Debug)]
pub struct StoreShape {
    pub table: String,
    /// The table's name as `regclass` text (for pg_locks).
    pub regclass: String,
    pub position: String,
    pub event_type: String,
    pub data: String,
    pub stream: Option<String>,
    pub time: Option<String>,
    pub metadata: Option<String>,
    pub transaction: Option<String>,
    data_is_json: bool,
    metadata_is_json: bool,
    time_has_zone: bool,
}

/// Where a reader must stop for now, and why.
#[derive(Clone, Debug)]
pub struct SafeHead {
    /// Everything up to here may be read.
    pub position: Position,
    /// The newest event visible at all (may be beyond `position`).
    pub visible: Position,
    /// The transactions holding the head back: (pid, seconds running).
    pub held_by: Vec<(i32, f64)>,
}

impl SafeHead {
    pub fn is_held(&self) -> bool {
        self.visible > self.position
    }
}

impl StoreShape {
    /// Checks the store's table and columns exist with usable types.
    pub async fn inspect(client: &Client, store: &Store) -> Result<StoreShape, Vec<Problem>> {
        let span = store.span.clone();
        let table = quote_qualified(&store.table);
        let row = client
            .query_opt("SELECT to_regclass($1)::text", &[&table])
            .await
            .map_err(|e| {
                vec![Problem::new(
                    span.clone(),
                    format!("cannot look up the events table: {e}"),
                    "here",
                )]
            })?;
        let regclass: Option<String> = row.and_then(|r| r.get(0));
        let Some(regclass) = regclass else {
            return Err(vec![
                Problem::new(
                    span,
                    format!("the events table `{}` does not exist", store.table),
                    "store.table",
                )
                .help("run `projectionist migrate` first, or fix [store] table"),
            ]);
        };
        let cols: HashMap<String, String> = client
            .query(
                "SELECT attname::text, atttypid::regtype::text FROM pg_attribute \
                 WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
                &[&regclass],
            )
            .await
            .map_err(|e| {
                vec![Problem::new(
                    span.clone(),
                    format!("cannot read the events table's columns: {e}"),
                    "here",
                )]
            })?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();

        let mut problems = Vec::new();
        let mut check = |key: &str, col: &Option<String>, allowed: &[&str]| -> Option<String> {
            let col = col.as_ref()?;
            match cols.get(col) {
                None => {
                    problems.push(
                        Problem::new(
                            span.clone(),
                            format!("store.{key}: column `{col}` does not exist in {regclass}"),
                            format!("{key} = \"{col}\""),
                        )
                        .help(format!("columns of {regclass}: {}", sorted(cols.keys()))),
                    );
                    None
                }
                Some(t) if !allowed.is_empty() && !allowed.contains(&t.as_str()) => {
                    problems.push(Problem::new(
                        span.clone(),
                        format!(
                            "store.{key}: column `{col}` is {t}; expected {}",
                            allowed.join(" or ")
                        ),
                        format!("{key} = \"{col}\""),
                    ));
                    None
                }
                Some(t) => Some(t.clone()),
            }
        };
        let position = check(
            "position",
            &Some(store.position.clone()),
            &["bigint", "integer", "smallint"],
        );
        let typ = check(
            "type",
            &Some(store.event_type.clone()),
            &["text", "character varying", "character", "name"],
        );
        let data = check("data", &Some(store.data.clone()), &["jsonb", "json"]);
        check("stream", &store.stream, &[]);
        let time = check(
            "time",
            &store.time,
            &["timestamp with time zone", "timestamp without time zone"],
        );
        let metadata = check("metadata", &store.metadata, &["jsonb", "json"]);
        check("transaction", &store.transaction, &["xid8"]);
        if !problems.is_empty() || position.is_none() || typ.is_none() || data.is_none() {
            return Err(problems);
        }
        Ok(StoreShape {
            table,
            regclass,
            position: quote_ident(&store.position),
            event_type: quote_ident(&store.event_type),
            data: quote_ident(&store.data),
            stream: store.stream.as_deref().map(quote_ident),
            time: store.time.as_deref().map(quote_ident),
            metadata: store.metadata.as_deref().map(quote_ident),
            transaction: store.transaction.as_deref().map(quote_ident),
            data_is_json: data.as_deref() == Some("json"),
            metadata_is_json: metadata.as_deref() == Some("json"),
            time_has_zone: time.as_deref() != Some("timestamp without time zone"),
        })
    }

    /// `SELECT` list of an event, aliased `e`: position, type, stream text,
    /// time as timestamptz, data and metadata as jsonb, tx as text.
    pub fn select_list(&self) -> String {
        let stream = self
            .stream
            .as_ref()
            .map(|s| format!("e.{s}::text"))
            .unwrap_or_else(|| "NULL::text".into());
        let time = match &self.time {
            Some(t) if self.time_has_zone => format!("e.{t}"),
            Some(t) => format!("(e.{t} AT TIME ZONE 'UTC')"),
            None => "NULL::timestamptz".into(),
        };
        let data = if self.data_is_json {
            format!("e.{}::jsonb", self.data)
        } else {
            format!("e.{}", self.data)
        };
        let metadata = match &self.metadata {
            Some(m) if self.metadata_is_json => format!("e.{m}::jsonb"),
            Some(m) => format!("e.{m}"),
            None => "NULL::jsonb".into(),
        };
        let tx = self
            .transaction
            .as_ref()
            .map(|t| format!("e.{t}"))
            .unwrap_or_else(|| "NULL::xid8".into());
        format!(
            "e.{}::bigint, e.{}::text, {stream}, {time}, {data}, {metadata}, {tx}",
            self.position, self.event_type
        )
    }

    /// The WHERE condition of events after `$a` up to `$u` (both inclusive-exclusive as
    /// (after, upto]) and the ORDER BY, for parameters named by the caller.
    pub fn range(
        &self,
        after_tx: &str,
        after: &str,
        upto_tx: &str,
        upto: &str,
    ) -> (String, String) {
        let p = &self.position;
        match &self.transaction {
            Some(t) => (
                format!(
                    "(e.{t}, e.{p}) > ({after_tx}, {after}) AND (e.{t}, e.{p}) <= ({upto_tx}, {upto})"
                ),
                format!("e.{t}, e.{p}"),
            ),
            None => (
                format!("e.{p} > {after} AND e.{p} <= {upto}"),
                format!("e.{p}"),
            ),
        }
    }

    /// Condition on the event type (`e`), for the given types (`None`: all).
    pub fn type_filter(&self, types: Option<&[String]>) -> String {
        match types {
            None => "true".into(),
            Some(types) => format!(
                "e.{} = ANY (ARRAY[{}]::text[])",
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

    /// The newest event visible now (committed), whatever holds it back.
    pub async fn visible_head(
        &self,
        client: &Client,
    ) -> Result<Option<(Position, Option<DateTime<Utc>>)>> {
        let (order, tx) = self.order_desc();
        let sql = format!(
            "SELECT {tx}, e.{p}::bigint, {time} FROM {t} e ORDER BY {order} LIMIT 1",
            p = self.position,
            t = self.table,
            time = self.time_expr(),
        );
        let row = client
            .query_opt(&sql, &[])
            .await
            .context("reading the head of the event store")?;
        row.map(|r| Ok((Position::from_parts(r.get(0), r.get(1))?, r.get(2))))
            .transpose()
    }

    fn order_desc(&self) -> (String, String) {
        match &self.transaction {
            Some(t) => (
                format!("e.{t} DESC, e.{} DESC", self.position),
                format!("e.{t}::text"),
            ),
            None => (format!("e.{} DESC", self.position), "NULL::text".into()),
        }
    }

    fn time_expr(&self) -> String {
        match &self.time {
            Some(t) if self.time_has_zone => format!("e.{t}"),
            Some(t) => format!("(e.{t} AT TIME ZONE 'UTC')"),
            None => "NULL::timestamptz".into(),
        }
    }

    /// The time of the event at `pos` (for BEHIND), if the store has a time column.
    pub async fn time_at(
        &self,
        client: &impl tokio_postgres::GenericClient,
        pos: Position,
    ) -> Result<Option<DateTime<Utc>>> {
        if self.time.is_none() || pos.id == 0 {
            return Ok(None);
        }
        let sql = format!(
            "SELECT {} FROM {} e WHERE e.{} = $1",
            self.time_expr(),
            self.table,
            self.position
        );
        Ok(client
            .query_opt(&sql, &[&pos.id])
            .await?
            .and_then(|r| r.get(0)))
    }

    /// The last position that can be read now without skipping an event that
    /// a running transaction may still commit behind it.
    pub async fn safe_head(
        &self,
        client: &Client,
        after: Position,
        holes: &mut HoleTracker,
    ) -> Result<SafeHead> {
        let Some((visible, _)) = self.visible_head(client).await? else {
            return Ok(SafeHead {
                position: after,
                visible: after,
                held_by: Vec::new(),
            });
        };
        if visible <= after {
            return Ok(SafeHead {
                position: after,
                visible,
                held_by: Vec::new(),
            });
        }
        match &self.transaction {
            Some(t) => {
                let sql = format!(
                    "SELECT e.{t}::text, e.{p}::bigint FROM {tab} e \
                     WHERE e.{t} < ({HORIZON}) \
                     ORDER BY e.{t} DESC, e.{p} DESC LIMIT 1",
                    p = self.position,
                    tab = self.table
                );
                let safe = match client.query_opt(&sql, &[]).await? {
                    Some(r) => Position::from_parts(r.get(0), r.get(1))?.max(after),
                    None => after,
                };
                let held_by = if safe < visible {
                    self.oldest_transactions(client).await?
                } else {
                    Vec::new()
                };
                Ok(SafeHead {
                    position: safe,
                    visible,
                    held_by,
                })
            }
            None => self.safe_head_by_holes(client, after, visible, holes).await,
        }
    }

    async fn safe_head_by_holes(
        &self,
        client: &Client,
        after: Position,
        visible: Position,
        holes: &mut HoleTracker,
    ) -> Result<SafeHead> {
        let p = &self.position;
        let sql = format!(
            "SELECT s.lo, s.hi, clock_timestamp() FROM ( \
               SELECT lag(e.{p}, 1, $1::bigint) OVER (ORDER BY e.{p}) + 1 AS lo, e.{p} - 1 AS hi \
               FROM {tab} e WHERE e.{p} > $1 AND e.{p} <= $2) s \
             WHERE s.lo <= s.hi AND NOT EXISTS ( \
               SELECT 1 FROM {holes} h WHERE h.first_position <= s.lo AND h.last_position >= s.hi) \
             ORDER BY s.lo LIMIT 1",
            tab = self.table,
            holes = holes.table,
        );
        loop {
            let Some(row) = client.query_opt(&sql, &[&after.id, &visible.id]).await? else {
                return Ok(SafeHead {
                    position: visible,
                    visible,
                    held_by: Vec::new(),
                });
            };
            let (lo, hi, now): (i64, i64, DateTime<Utc>) = (row.get(0), row.get(1), row.get(2));
            let first_seen = *holes.first_seen.entry(lo).or_insert(now);
            let held_by = self.writers_since(client, first_seen).await?;
            if !held_by.is_empty() {
                return Ok(SafeHead {
                    position: Position {
                        tx: None,
                        id: lo - 1,
                    },
                    visible,
                    held_by,
                });
            }
            client
                .execute(
                    &format!(
                        "INSERT INTO {} (first_position, last_position, first_seen) VALUES ($1, $2, $3) \
                         ON CONFLICT (first_position) DO UPDATE SET last_position = greatest({0}.last_position, EXCLUDED.last_position)",
                        holes.table
                    ),
                    &[&lo, &hi, &first_seen],
                )
                .await
                .context("recording a passed hole")?;
            holes.first_seen.remove(&lo);
            tracing::info!(
                "passed a hole in the positions at {lo}..={hi}: no running transaction can fill it (a rolled-back insert)"
            );
        }
    }

    /// Transactions that hold a write lock on the events table and began no later than `since`.
    async fn writers_since(
        &self,
        client: &Client,
        since: DateTime<Utc>,
    ) -> Result<Vec<(i32, f64)>> {
        let rows = client
            .query(
                "SELECT coalesce(l.pid, 0), coalesce(extract(epoch FROM clock_timestamp() - a.xact_start), 0)::float8 \
                 FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'relation' AND l.relation = $1::text::regclass AND l.granted \
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND l.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock') \
                   AND l.pid IS DISTINCT FROM pg_backend_pid() \
                   AND (a.pid IS NULL OR a.xact_start IS NULL OR a.xact_start <= $2)",
                &[&self.regclass, &since],
            )
            .await
            .context("looking for transactions that may fill a hole")?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The running transactions with an xid, oldest first (what holds xmin back).
    async fn oldest_transactions(&self, client: &Client) -> Result<Vec<(i32, f64)>> {
        let rows = client
            .query(
                "SELECT pid, coalesce(extract(epoch FROM clock_timestamp() - xact_start), 0)::float8 \
                 FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
                   AND datname = current_database() \
                 ORDER BY age(backend_xid) DESC LIMIT 3",
                &[],
            )
            .await?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Where a `from_now` projector starts: the newest committed event now,
    /// once nothing before it can still appear. Everything committed is
    /// history and is never played; waiting (up to `wait`) for the
    /// transactions that may still commit behind it keeps a new event from
    /// being skipped.
    pub async fn release_head(
        &self,
        client: &Client,
        ledger_schema: &str,
        wait: std::time::Duration,
    ) -> Result<Position> {
        let mut holes = HoleTracker::new(ledger_schema);
        let Some((visible, _)) = self.visible_head(client).await? else {
            return Ok(Position::START);
        };
        let deadline = std::time::Instant::now() + wait;
        loop {
            let safe = self.safe_head(client, Position::START, &mut holes).await?;
            if safe.position >= visible {
                return Ok(visible);
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!(
                    "starting at {visible} while transactions {:?} (pid, seconds) still run: an event they commit behind it is not played",
                    safe.held_by
                );
                return Ok(visible);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The end of the next batch: the `size`-th event after `after`, or `limit`.
    pub async fn batch_end(
        &self,
        client: &Client,
        after: Position,
        limit: Position,
        size: i64,
    ) -> Result<Position> {
        if after >= limit {
            return Ok(limit);
        }
        match &self.transaction {
            // Positions are dense enough that a range of `size` ids is a batch of about `size` events.
            None => Ok(Position {
                tx: None,
                id: (after.id.saturating_add(size)).min(limit.id),
            }),
            Some(_) => {
                let (cond, order) = self.range("$1::text::xid8", "$2", "$3::text::xid8", "$4");
                let sql = format!(
                    "SELECT e.{t}::text, e.{p}::bigint FROM {tab} e WHERE {cond} ORDER BY {order} OFFSET $5 LIMIT 1",
                    t = self.transaction.as_ref().unwrap(),
                    p = self.position,
                    tab = self.table
                );
                let after_tx = after.tx_text().unwrap_or_else(|| "0".into());
                let limit_tx = limit.tx_text();
                let params: [&(dyn ToSql + Sync); 5] =
                    [&after_tx, &after.id, &limit_tx, &limit.id, &(size - 1)];
                match client.query_opt(&sql, &params).await? {
                    Some(r) => Position::from_parts(r.get(0), r.get(1)),
                    None => Ok(limit),
                }
            }
        }
    }

    /// The last event before `before` and after `after` (or `after` itself):
    /// where a projector stands when the event at `before` fails.
    pub async fn predecessor(
        &self,
        client: &impl tokio_postgres::GenericClient,
        after: Position,
        before: Position,
    ) -> Result<Position> {
        let p = &self.position;
        let (sql, params_tx): (String, bool) = match &self.transaction {
            Some(t) => (
                format!(
                    "SELECT e.{t}::text, e.{p}::bigint FROM {tab} e \
                     WHERE (e.{t}, e.{p}) < ($1::text::xid8, $2) AND (e.{t}, e.{p}) > ($3::text::xid8, $4) \
                     ORDER BY e.{t} DESC, e.{p} DESC LIMIT 1",
                    tab = self.table
                ),
                true,
            ),
            None => (
                format!(
                    "SELECT NULL::text, e.{p}::bigint FROM {tab} e WHERE e.{p} < $2 AND e.{p} > $4 \
                     AND $1::text IS NULL AND $3::text IS NULL ORDER BY e.{p} DESC LIMIT 1",
                    tab = self.table
                ),
                false,
            ),
        };
        let before_tx = if params_tx { before.tx_text() } else { None };
        let after_tx = if params_tx {
            Some(after.tx_text().unwrap_or_else(|| "0".into()))
        } else {
            None
        };
        let row = client
            .query_opt(&sql, &[&before_tx, &before.id, &after_tx, &after.id])
            .await
            .context("finding the event before a failing one")?;
        match row {
            Some(r) => Position::from_parts(r.get(0), r.get(1)),
            None => Ok(after),
        }
    }

    /// The events in (after, upto] as the JSON lines of the command protocol,
    /// built by PostgreSQL: (position, type, line). At most `limit`, in order.
    pub async fn read_event_lines(
        &self,
        client: &impl tokio_postgres::GenericClient,
        after: Position,
        upto: Position,
        types: Option<&[String]>,
        limit: i64,
    ) -> Result<Vec<(Position, String, String)>> {
        let (cond, order) = self.range("$1::text::xid8", "$2", "$3::text::xid8", "$4");
        let stream = self
            .stream
            .as_ref()
            .map(|s| format!("e.{s}::text"))
            .unwrap_or_else(|| "NULL::text".into());
        let time = format!(
            "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            self.time_expr()
        );
        let data = if self.data_is_json {
            format!("e.{}::jsonb", self.data)
        } else {
            format!("e.{}", self.data)
        };
        let metadata = match &self.metadata {
            Some(m) => format!("e.{m}::jsonb"),
            None => "NULL::jsonb".into(),
        };
        let tx = self
            .transaction
            .as_ref()
            .map(|t| format!("e.{t}::text"))
            .unwrap_or_else(|| "NULL::text".into());
        let sql = format!(
            "SELECT {tx}, e.{p}::bigint, e.{ty}::text, json_build_object('position', e.{p}, 'type', e.{ty}, \
             'stream', {stream}, 'time', {time}, 'data', {data}, 'metadata', {metadata})::text \
             FROM {tab} e WHERE {cond} AND {filter} ORDER BY {order} LIMIT $5",
            p = self.position,
            ty = self.event_type,
            tab = self.table,
            filter = self.type_filter(types),
        );
        let after_tx = after.tx_text().unwrap_or_else(|| "0".into());
        let upto_tx = upto.tx_text();
        let rows = client
            .query(&sql, &[&after_tx, &after.id, &upto_tx, &upto.id, &limit])
            .await
            .context("reading events")?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    Position::from_parts(r.get(0), r.get(1))?,
                    r.get(2),
                    r.get(3),
                ))
            })
            .collect()
    }
}

/// Holes seen but not yet passed, with when each was first seen (server time),
/// and the ledger table where passed holes are recorded.
#[derive(Debug)]
pub struct HoleTracker {
    table: String,
    first_seen: HashMap<i64, DateTime<Utc>>,
}

impl HoleTracker {
    pub fn new(ledger_schema: &str) -> HoleTracker {
        HoleTracker {
            table: format!("{}.holes", quote_ident(ledger_schema)),
            first_seen: HashMap::new(),
        }
    }
}

fn sorted<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let mut v: Vec<&str> = names.map(|s| s.as_str()).collect();
    v.sort();
    v.join(", ")
}
