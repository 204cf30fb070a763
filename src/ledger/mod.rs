//! The ledger: projectionist's own schema in the database (positions, states,
//! failures, passed holes, late events) and the advisory locks that keep runs
//! apart ([`locks`]). Every SQL statement on a ledger table lives here.
//!
//! `projectionist.projectors` is part of the contract (teams query it), so its
//! columns only ever grow. The schema is applied by refinery migrations
//! embedded in the binary, with the schema name of `[ledger] schema`.

pub mod locks;
pub mod operator;
pub mod partitions;
pub mod versions;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use tokio_postgres::{GenericClient, Row};

pub use locks::{LockHolder, LockKey, Locks};
pub use operator::FailureRecord;
pub use versions::{Kind, VersionRow};

use crate::db::{RowExt, quote_ident};
use crate::error::Failure;
use crate::failure::HandlerFailure;
use crate::manifest::{Mode, Projector};
use crate::store::{Partition, PassedHoles, Position, StoreShape};

/// The ledger's migrations, in order. `__SCHEMA__` is the quoted schema.
const MIGRATIONS: &[(&str, &str)] = &[
    ("V1__ledger", include_str!("migrations/V1__ledger.sql")),
    (
        "V2__holes_per_projector",
        include_str!("migrations/V2__holes_per_projector.sql"),
    ),
    ("V3__versions", include_str!("migrations/V3__versions.sql")),
    (
        "V4__operator_tools",
        include_str!("migrations/V4__operator_tools.sql"),
    ),
    (
        "V5__partitions",
        include_str!("migrations/V5__partitions.sql"),
    ),
];

/// The columns of `projectors` projectionist reads and writes, with their types.
const PROJECTOR_COLUMNS: &[(&str, &str)] = &[
    ("name", "text"),
    ("mode", "text"),
    ("state", "text"),
    ("position", "bigint"),
    ("tx", "xid8"),
    ("event_time", "timestamp with time zone"),
    ("version", "integer"),
    ("side_effects", "boolean"),
    ("tables", "text[]"),
    ("events_processed", "bigint"),
    ("error", "text"),
    ("error_detail", "text"),
    ("error_hint", "text"),
    ("error_position", "bigint"),
    ("error_type", "text"),
    ("error_stream", "text"),
    ("error_at", "timestamp with time zone"),
    ("missing_since", "timestamp with time zone"),
    ("updated_at", "timestamp with time zone"),
    ("paused_state", "text"),
    ("partitions", "integer"),
];

/// The ledger's tables, for checking that none was dropped (and for setting
/// the survivors aside when one was).
pub(crate) const TABLES: [&str; 6] = [
    "projectors",
    "failures",
    "holes",
    "late_events",
    "versions",
    "partitions",
];

/// The states that have a ledger row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Booting,
    Live,
    Finished,
    Broken,
    Stalled,
    Retired,
    /// A version built beside the live one, at the head, waiting to be swapped in.
    Built,
    /// An operator paused it: play leaves it alone until `resume`.
    Paused,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Booting => "booting",
            State::Live => "live",
            State::Finished => "finished",
            State::Broken => "broken",
            State::Stalled => "stalled",
            State::Retired => "retired",
            State::Built => "built",
            State::Paused => "paused",
        }
    }

    fn parse(s: &str) -> Result<State> {
        Ok(match s {
            "booting" => State::Booting,
            "live" => State::Live,
            "finished" => State::Finished,
            "broken" => State::Broken,
            "stalled" => State::Stalled,
            "retired" => State::Retired,
            "built" => State::Built,
            "paused" => State::Paused,
            other => return Err(altered(format!("unknown state `{other}`"))),
        })
    }
}

fn altered(what: String) -> anyhow::Error {
    Failure::Usage(format!(
        "the ledger holds {what}: was it altered by hand? Restore the row from the ledger's history or a backup"
    ))
    .into()
}

/// One row of `projectionist.projectors`.
#[derive(Clone, Debug)]
pub struct LedgerRow {
    pub name: String,
    pub mode: Mode,
    pub state: State,
    pub position: Position,
    pub event_time: Option<DateTime<Utc>>,
    pub version: i32,
    pub side_effects: bool,
    pub tables: Vec<String>,
    pub events_processed: i64,
    pub error: Option<String>,
    pub error_position: Option<i64>,
    pub error_type: Option<String>,
    pub missing_since: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The parts its events are split into (1: not partitioned).
    pub partitions: i32,
}

#[cfg(test)]
impl LedgerRow {
    /// A from-beginning row at position `position` for unit tests.
    pub fn sample(name: &str, state: State, version: i32, position: i64) -> LedgerRow {
        LedgerRow {
            name: name.into(),
            mode: Mode::FromBeginning,
            state,
            position: Position {
                tx: None,
                id: position,
            },
            event_time: None,
            version,
            side_effects: false,
            tables: Vec::new(),
            events_processed: 0,
            error: None,
            error_position: None,
            error_type: None,
            missing_since: None,
            updated_at: chrono::Utc::now(),
            partitions: 1,
        }
    }
}

/// What a recorded failure did to its projector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The projector is now broken.
    Broken,
    /// It will be tried again (on_error = "retry").
    Retried,
    /// The event was skipped (on_error = "skip"): a dead letter.
    DeadLetter,
}

/// The run that recorded something: named in the failures table and told to
/// command projectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Run {
    Boot,
    Play,
    Reset,
    /// `retry`: dead letters applied again.
    Retry,
}

impl Run {
    pub fn as_str(self) -> &'static str {
        match self {
            Run::Boot => "boot",
            Run::Play => "play",
            Run::Reset => "reset",
            Run::Retry => "retry",
        }
    }
}

/// A recorded failure, as `status NAME` lists them.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FailureRow {
    pub position: i64,
    pub event_type: Option<String>,
    pub error: String,
    pub run: String,
    pub dead_letter: bool,
    pub at: DateTime<Utc>,
}

/// A batch's worth of passed holes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HoleRow {
    pub first_position: i64,
    pub last_position: i64,
    pub holes: i64,
    pub passed_at: DateTime<Utc>,
}

/// A run of holes in the positions: `n` holes of `len` positions, the first
/// starting at `lo`, each next one `stride` positions further.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoleRun {
    pub lo: i64,
    pub len: i64,
    pub stride: i64,
    pub n: i64,
}

impl HoleRun {
    /// The last position of the run's last hole.
    pub fn last(&self) -> i64 {
        self.lo + self.stride * (self.n - 1) + self.len - 1
    }

    /// The holes between `after` and the sorted `positions`, as runs: a hole
    /// joins the run before it when it is as long and as far from the one
    /// before as the run's others are.
    pub fn find(after: i64, positions: &[i64]) -> Vec<HoleRun> {
        let mut runs: Vec<HoleRun> = Vec::new();
        let mut prev = after;
        for &p in positions {
            let (lo, len) = (prev + 1, p - prev - 1);
            prev = p;
            if len <= 0 {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.len == len && r.n == 1 => {
                    r.stride = lo - r.lo;
                    r.n = 2;
                }
                Some(r) if r.len == len && r.lo + r.stride * r.n == lo => r.n += 1,
                _ => runs.push(HoleRun {
                    lo,
                    len,
                    stride: 0,
                    n: 1,
                }),
            }
        }
        runs
    }
}

/// An event that appeared inside a hole its projector had already passed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LateEvent {
    pub projector: String,
    pub position: i64,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
}

/// The ledger record a run moves: a projector's live row, or the row of the
/// version being built beside it (its `versions.id`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    Live,
    Build(i64),
}

/// Whose record: the projector, the version its runner plays (its
/// handlers), which of its records, and of a partitioned projector which
/// part (whose position the runner moves; the state stays the record's).
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    pub name: &'a str,
    pub version: i32,
    pub record: Record,
    pub partition: Option<Partition>,
}

/// A move of a projector's position, guarded by where it was and its version.
#[derive(Clone, Copy, Debug)]
pub struct Advance<'a> {
    pub subject: Subject<'a>,
    pub from: Position,
    pub to: Position,
    /// The time of the event at `to`, if the store has one.
    pub event_time: Option<DateTime<Utc>>,
    /// Events handled on the way.
    pub handled: i64,
}

/// A ledger record read from a row of a query (in the order of its columns).
trait FromRow: Sized {
    fn from_row(r: &Row) -> Result<Self>;
}

/// Runs a query and reads each row as a `T`; `what` says what it was doing.
async fn select<T: FromRow>(
    client: &impl GenericClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    what: &'static str,
) -> Result<Vec<T>> {
    client
        .query(sql, params)
        .await
        .context(what)?
        .iter()
        .map(T::from_row)
        .collect()
}

impl FromRow for HoleRow {
    fn from_row(r: &Row) -> Result<HoleRow> {
        Ok(HoleRow {
            first_position: r.col(0)?,
            last_position: r.col(1)?,
            holes: r.col(2)?,
            passed_at: r.col(3)?,
        })
    }
}

impl FromRow for FailureRow {
    fn from_row(r: &Row) -> Result<FailureRow> {
        Ok(FailureRow {
            position: r.col(0)?,
            event_type: r.col(1)?,
            error: r.col(2)?,
            run: r.col(3)?,
            dead_letter: r.col(4)?,
            at: r.col(5)?,
        })
    }
}

impl FromRow for LateEvent {
    fn from_row(r: &Row) -> Result<LateEvent> {
        Ok(LateEvent {
            projector: r.col(0)?,
            position: r.col(1)?,
            event_type: r.col(2)?,
        })
    }
}

/// Where the ledger lives, and the SQL to reach it.
#[derive(Clone, Debug)]
pub struct Ledger {
    schema: String,
    quoted: String,
}

const ROW_COLUMNS: &str = "name, mode, state, position, tx::text, event_time, version, side_effects, tables, \
     events_processed, error, error_position, error_type, missing_since, updated_at, partitions";

/// The same columns, of a version being built.
const BUILD_ROW_COLUMNS: &str = "projector, mode, state, position, tx::text, event_time, version, false, tables, \
     events_processed, error, error_position, error_type, NULL::timestamptz, updated_at, partitions";

impl Ledger {
    pub fn new(schema: &str) -> Ledger {
        Ledger {
            schema: schema.to_string(),
            quoted: quote_ident(schema),
        }
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// `"schema".table`.
    pub fn table(&self, name: &str) -> String {
        format!("{}.{}", self.quoted, name)
    }

    /// The ledger's migrations, for refinery, and the name of their history table.
    pub fn migrations(&self) -> Result<(Vec<refinery::Migration>, String)> {
        let migrations = MIGRATIONS
            .iter()
            .map(|(name, sql)| {
                refinery::Migration::unapplied(name, &sql.replace("__SCHEMA__", &self.quoted))
                    .context("embedded ledger migration")
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((migrations, self.table("schema_history")))
    }

    pub fn create_schema_sql(&self) -> String {
        format!("CREATE SCHEMA IF NOT EXISTS {}", self.quoted)
    }

    /// The ledger's tables that are missing, and whether its migration
    /// history exists (tables missing with a history: dropped by hand).
    pub async fn missing_tables(&self, client: &impl GenericClient) -> Result<(Vec<String>, bool)> {
        let mut missing = Vec::new();
        for t in TABLES {
            let exists: bool = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.table(t)])
                .await
                .context("looking for the ledger")?
                .col(0)?;
            if !exists {
                missing.push(self.table(t));
            }
        }
        let history: bool = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&self.table("schema_history")],
            )
            .await?
            .col(0)?;
        Ok((missing, history))
    }

    /// Fails with a clear message when the ledger has not been migrated,
    /// lost a table, or has a column altered by hand.
    pub async fn ensure_exists(&self, client: &impl GenericClient) -> Result<()> {
        let (missing, history) = self.missing_tables(client).await?;
        if missing.is_empty() {
            self.check_migrated(client).await?;
            return self.check_columns(client).await;
        }
        let text = if history && missing.len() < TABLES.len() + 1 {
            format!(
                "the ledger lost {} although its migrations ran (dropped by hand?)\n  \
                 run `projectionist migrate`: it recreates the missing tables. Projectors whose rows are gone \
                 then count as new, and boot refuses to replay any whose tables already hold rows \
                 (reset them, or adopt them with `projectionist boot --adopt NAME`)",
                missing.join(", ")
            )
        } else {
            format!(
                "the ledger schema `{}` is not in this database: run `projectionist migrate` first",
                self.schema
            )
        };
        Err(Failure::Usage(text).into())
    }

    /// Every ledger migration of this projectionist was applied.
    async fn check_migrated(&self, client: &impl GenericClient) -> Result<()> {
        let applied: Option<i32> = client
            .query_one(
                &format!("SELECT max(version) FROM {}", self.table("schema_history")),
                &[],
            )
            .await
            .context("reading the ledger's migration history")?
            .col(0)?;
        let needed = MIGRATIONS.len() as i32;
        if applied.unwrap_or(0) < needed {
            return Err(Failure::Usage(format!(
                "the ledger schema `{}` is at migration V{} and this projectionist needs V{needed}: \
                 run `projectionist migrate` first",
                self.schema,
                applied.unwrap_or(0)
            ))
            .into());
        }
        Ok(())
    }

    /// The contract's columns of `projectors` have the types projectionist
    /// reads and writes: a column altered by hand is named, before anything
    /// reads or writes it.
    async fn check_columns(&self, client: &impl GenericClient) -> Result<()> {
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[&self.table("projectors")],
            )
            .await
            .context("reading the ledger's columns")?;
        let mut wrong = Vec::new();
        for (column, expected) in PROJECTOR_COLUMNS {
            let found = rows.iter().find_map(|r| {
                let name: String = r.try_get(0).ok()?;
                (name == *column)
                    .then(|| r.try_get::<_, String>(1).ok())
                    .flatten()
            });
            match found {
                Some(t) if t == *expected => {}
                Some(t) => wrong.push(format!("`{column}` is {t}, expected {expected}")),
                None => wrong.push(format!("`{column}` is missing (expected {expected})")),
            }
        }
        if wrong.is_empty() {
            return Ok(());
        }
        Err(Failure::Usage(format!(
            "the ledger table {} was altered by hand: {}\n  \
             restore the column{} (see the ledger's migrations), e.g. \
             ALTER TABLE {} ALTER COLUMN … TYPE …; nothing was changed",
            self.table("projectors"),
            wrong.join("; "),
            if wrong.len() == 1 { "" } else { "s" },
            self.table("projectors"),
        ))
        .into())
    }

    pub async fn rows(&self, client: &impl GenericClient) -> Result<Vec<LedgerRow>> {
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM {} ORDER BY name",
            self.table("projectors")
        );
        select(client, &sql, &[], "reading the ledger").await
    }

    pub async fn row(&self, client: &impl GenericClient, name: &str) -> Result<Option<LedgerRow>> {
        self.one_row(client, name, "").await
    }

    /// Locks a projector's record (its live row, or its build's) for the rest
    /// of the transaction and reads it: a batch starts here, so it sees the
    /// record as it is and nobody changes it (a rebuild, a reset, a swap)
    /// until the batch commits. A part of a partitioned projector shares the
    /// record's lock with the other parts (they run side by side) and locks
    /// its own row, whose position it reads.
    pub async fn lock_row(
        &self,
        client: &impl GenericClient,
        name: &str,
        record: Record,
        partition: Option<Partition>,
    ) -> Result<Option<LedgerRow>> {
        let locking = match partition {
            None => " FOR NO KEY UPDATE",
            Some(_) => " FOR KEY SHARE",
        };
        let row = match record {
            Record::Live => self.one_row(client, name, locking).await?,
            Record::Build(id) => {
                let sql = format!(
                    "SELECT {BUILD_ROW_COLUMNS} FROM {} WHERE id = $1 AND kind = 'build'{locking}",
                    self.table("versions")
                );
                let rows: Vec<LedgerRow> =
                    select(client, &sql, &[&id], "reading a build's ledger row").await?;
                rows.into_iter().next()
            }
        };
        match (row, partition) {
            (Some(mut row), Some(part)) => {
                let Some(own) = self.lock_part(client, name, record, part).await? else {
                    return Ok(None);
                };
                row.position = own.position;
                row.event_time = own.event_time;
                Ok(Some(row))
            }
            (row, _) => Ok(row),
        }
    }

    async fn one_row(
        &self,
        client: &impl GenericClient,
        name: &str,
        locking: &str,
    ) -> Result<Option<LedgerRow>> {
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM {} WHERE name = $1{locking}",
            self.table("projectors")
        );
        let rows: Vec<LedgerRow> = select(client, &sql, &[&name], "reading the ledger").await?;
        Ok(rows.into_iter().next())
    }

    /// The table and condition (on `$1`, text) of a subject's record.
    fn target(&self, s: &Subject<'_>) -> (String, String, String) {
        match s.record {
            Record::Live => (
                self.table("projectors"),
                "name = $1".into(),
                s.name.to_string(),
            ),
            Record::Build(id) => (
                self.table("versions"),
                "id = $1::text::bigint".into(),
                id.to_string(),
            ),
        }
    }

    /// The table and condition (on `$1`, text) of the row holding a
    /// subject's position: its record's, or its part's.
    fn position_target(&self, s: &Subject<'_>) -> (String, String, String) {
        match s.partition {
            None => self.target(s),
            Some(part) => (
                self.table("partitions"),
                format!(
                    "projector = $1 AND {} AND partition = {}",
                    partitions::record_condition(s.record),
                    part.index
                ),
                s.name.to_string(),
            ),
        }
    }

    /// Records when projectors first went missing from the manifest, and
    /// forgets it for those that came back.
    pub async fn note_missing(
        &self,
        client: &impl GenericClient,
        present: &[String],
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET missing_since = CASE WHEN name = ANY($1) THEN NULL ELSE coalesce(missing_since, now()) END \
                     WHERE (name = ANY($1)) = (missing_since IS NOT NULL)",
                    self.table("projectors")
                ),
                &[&present],
            )
            .await
            .context("recording projectors missing from the manifest")?;
        Ok(())
    }

    /// Moves a projector's position, or fails: the guard that keeps two
    /// runners from both applying a batch, and a runner of another version
    /// from writing into this one.
    pub async fn advance(&self, client: &impl GenericClient, a: &Advance<'_>) -> Result<()> {
        let (table, key, id) = self.position_target(&a.subject);
        let n = client
            .execute(
                &format!(
                    "UPDATE {table} SET position = $3, tx = $4::text::xid8, event_time = coalesce($5, event_time), \
                     events_processed = events_processed + $6, updated_at = now() \
                     WHERE {key} AND position = $2 AND tx IS NOT DISTINCT FROM $7::text::xid8 AND version = $8"
                ),
                &[
                    &id,
                    &a.from.id,
                    &a.to.id,
                    &a.to.tx_text(),
                    &a.event_time,
                    &a.handled,
                    &a.from.tx_text(),
                    &a.subject.version,
                ],
            )
            .await
            .context("updating the position")?;
        if n != 1 {
            anyhow::bail!(
                "the ledger row of projector `{}`{} changed while this run held it (its position moved from {}, or its version is no longer {}): another runner is playing it",
                a.subject.name,
                a.subject
                    .partition
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default(),
                a.from,
                a.subject.version
            );
        }
        if a.subject.partition.is_some() {
            self.refresh_parts(client, a.subject.name, a.subject.record)
                .await?;
        }
        Ok(())
    }

    /// Sets the state of a projector's record (clearing the error when it plays again).
    pub async fn set_state(
        &self,
        client: &impl GenericClient,
        subject: &Subject<'_>,
        state: State,
    ) -> Result<()> {
        let clear = if matches!(
            state,
            State::Live | State::Finished | State::Booting | State::Built
        ) {
            ", error = NULL, error_detail = NULL, error_hint = NULL, error_position = NULL, error_type = NULL, error_stream = NULL, error_at = NULL"
        } else {
            ""
        };
        let (table, key, id) = self.target(subject);
        client
            .execute(
                &format!("UPDATE {table} SET state = $2, updated_at = now(){clear} WHERE {key}"),
                &[&id, &state.as_str()],
            )
            .await
            .context("updating a projector's state")?;
        Ok(())
    }

    /// Records a failure; with [`FailureKind::Broken`] also marks the projector broken.
    pub async fn record_failure(
        &self,
        client: &impl GenericClient,
        subject: &Subject<'_>,
        run: Run,
        f: &HandlerFailure,
        kind: FailureKind,
    ) -> Result<()> {
        let dead_letter = kind == FailureKind::DeadLetter;
        if kind == FailureKind::Broken {
            let (table, key, id) = self.target(subject);
            client
                .execute(
                    &format!(
                        "UPDATE {table} SET state = 'broken', error = $2, error_detail = $3, error_hint = $4, \
                         error_position = $5, error_type = $6, error_stream = $7, error_at = now(), updated_at = now() \
                         WHERE {key}"
                    ),
                    &[&id, &f.message, &f.detail, &f.hint, &f.position, &f.event_type, &f.stream],
                )
                .await
                .context("marking a projector broken")?;
        }
        let name = subject.name;
        let sqlstate = (!f.sqlstate.is_empty()).then_some(f.sqlstate.as_str());
        client
            .execute(
                &format!(
                    "INSERT INTO {} (projector, run, position, type, stream, error, detail, hint, sqlstate, dead_letter, version) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    self.table("failures")
                ),
                &[
                    &name, &run.as_str(), &f.position, &f.event_type, &f.stream, &f.message, &f.detail, &f.hint,
                    &sqlstate, &dead_letter, &subject.version,
                ],
            )
            .await
            .context("recording a failure")?;
        Ok(())
    }

    /// Creates (or re-creates, for a rebuild) a projector's row at `position`,
    /// state booting; a rebuild forgets its late events, and the holes it
    /// passed are no longer its own (they stay known to be passable).
    pub async fn start(
        &self,
        client: &impl GenericClient,
        p: &Projector,
        position: Position,
        event_time: Option<DateTime<Utc>>,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "INSERT INTO {} (name, mode, state, position, tx, event_time, version, side_effects, tables, partitions) \
                     VALUES ($1, $2, 'booting', $3, $4::text::xid8, $5, $6, $7, $8, $9) \
                     ON CONFLICT (name) DO UPDATE SET mode = EXCLUDED.mode, state = 'booting', position = EXCLUDED.position, \
                       tx = EXCLUDED.tx, event_time = EXCLUDED.event_time, version = EXCLUDED.version, \
                       side_effects = EXCLUDED.side_effects, tables = EXCLUDED.tables, partitions = EXCLUDED.partitions, \
                       events_processed = 0, \
                       error = NULL, error_detail = NULL, error_hint = NULL, error_position = NULL, error_type = NULL, \
                       error_stream = NULL, error_at = NULL, missing_since = NULL, updated_at = now()",
                    self.table("projectors")
                ),
                &[
                    &p.name,
                    &p.mode.as_str(),
                    &position.id,
                    &position.tx_text(),
                    &event_time,
                    &p.version,
                    &p.side_effects,
                    &p.tables,
                    &p.partitions,
                ],
            )
            .await
            .context("recording a projector in the ledger")?;
        self.start_parts(
            client,
            (&p.name, p.version, p.partitions),
            Record::Live,
            (position, event_time),
        )
        .await?;
        self.supersede_dead_letters(client, &p.name).await?;
        client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE projector = $1",
                    self.table("late_events")
                ),
                &[&p.name],
            )
            .await
            .context("forgetting a rebuilt projector's late events")?;
        // Its holes stay known to be passable, but are no longer its own.
        client
            .execute(
                &format!(
                    "UPDATE {} SET projector = NULL WHERE projector = $1",
                    self.table("holes")
                ),
                &[&p.name],
            )
            .await
            .context("forgetting a rebuilt projector's holes")?;
        Ok(())
    }

    /// Resumes an existing row: booting again, with the manifest's current facts.
    pub async fn resume(&self, client: &impl GenericClient, p: &Projector) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET state = 'booting', mode = $2, side_effects = $3, tables = $4, updated_at = now() WHERE name = $1",
                    self.table("projectors")
                ),
                &[&p.name, &p.mode.as_str(), &p.side_effects, &p.tables],
            )
            .await
            .context("resuming a projector")?;
        Ok(())
    }

    /// Records the holes a projector passes in (from, to], in the batch's
    /// transaction: the positions are read again there (by the index), and
    /// the holes between them kept as runs (see [`HoleRun`]), so a store whose
    /// positions step by 1,000 costs a short row per batch.
    pub async fn record_holes(
        &self,
        client: &impl GenericClient,
        shape: &StoreShape,
        subject: &Subject<'_>,
        (from, to): (Position, Position),
        holes: PassedHoles,
    ) -> Result<()> {
        let name = subject.name;
        let p = shape.position_expr();
        let sql = format!(
            "SELECT array(SELECT {p}::bigint FROM {rel} WHERE {p} > $1::bigint AND {p} <= $2::bigint ORDER BY {p})",
            rel = shape.relation(),
        );
        let positions: Vec<i64> = client
            .query_one(&sql, &[&from.id, &to.id])
            .await
            .context("reading the positions of a batch")?
            .col(0)?;
        let runs = HoleRun::find(from.id, &positions);
        let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
            return Ok(());
        };
        let (first, last) = (first.lo, last.last());
        let column = |f: fn(&HoleRun) -> i64| runs.iter().map(f).collect::<Vec<i64>>();
        client
            .execute(
                &format!(
                    "INSERT INTO {} (projector, first_position, last_position, lo, len, stride, n, first_seen, version, version_id, \
                       partition, partitions) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                    self.table("holes")
                ),
                &[
                    &name,
                    &first,
                    &last,
                    &column(|r| r.lo),
                    &column(|r| r.len),
                    &column(|r| r.stride),
                    &column(|r| r.n),
                    &holes.first_seen,
                    &subject.version,
                    &match subject.record {
                        Record::Live => None,
                        Record::Build(id) => Some(id),
                    },
                    &subject.partition.map(|p| p.index),
                    &subject.partition.map(|p| p.count),
                ],
            )
            .await
            .context("recording passed holes")?;
        Ok(())
    }

    /// The query that tells which of a batch's holes (`$1` first and `$2`
    /// last positions) some projector passed before, by the index of each:
    /// they are known to be passable (only a late event can fill them). A
    /// hole that shrank since is not known, and waits as a new one would.
    pub fn known_holes_sql(&self) -> String {
        format!(
            "SELECT g.i::int FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS g(lo, hi, i) \
             WHERE EXISTS (SELECT 1 FROM {} h \
               CROSS JOIN LATERAL unnest(h.lo, h.len, h.stride, h.n) AS x(lo, len, stride, n) \
               WHERE int8range(h.first_position, h.last_position, '[]') @> int8range(g.lo, g.hi, '[]') \
                 AND x.len = g.hi - g.lo + 1 AND g.lo BETWEEN x.lo AND x.lo + x.stride * (x.n - 1) \
                 AND (g.lo = x.lo OR (x.stride > 0 AND (g.lo - x.lo) % x.stride = 0)))",
            self.table("holes")
        )
    }

    /// The latest batches of holes a projector passed.
    pub async fn holes(&self, client: &impl GenericClient, name: &str) -> Result<Vec<HoleRow>> {
        let sql = format!(
            "SELECT first_position, last_position, (SELECT sum(x) FROM unnest(n) x)::bigint, passed_at \
             FROM {} WHERE projector = $1 ORDER BY first_position DESC LIMIT 10",
            self.table("holes")
        );
        select(client, &sql, &[&name], "reading passed holes").await
    }

    /// The last failures of a projector, newest first.
    pub async fn failures(
        &self,
        client: &impl GenericClient,
        name: &str,
    ) -> Result<Vec<FailureRow>> {
        let sql = format!(
            "SELECT position, type, error, run, dead_letter, at FROM {} WHERE projector = $1 \
             ORDER BY at DESC, id DESC LIMIT 10",
            self.table("failures")
        );
        select(client, &sql, &[&name], "reading failures").await
    }

    /// Events that appeared inside holes the projectors had already passed:
    /// one indexed lookup per distinct hole, whatever the number of projectors.
    /// `names` limits the projectors (empty: all). At most 1000 are returned.
    pub async fn late_events(
        &self,
        client: &impl GenericClient,
        shape: &StoreShape,
        names: &[String],
    ) -> Result<Vec<LateEvent>> {
        if shape.transaction.is_some() {
            // Read in (transaction, position) order below the horizon: an event
            // cannot appear behind a reader, so there are no holes to fill.
            return Ok(Vec::new());
        }
        let sql = format!(
            "WITH g AS (SELECT h.projector, h.partition, h.partitions, x.pj_lo, x.pj_len, x.pj_stride, x.pj_n FROM {holes} h \
                CROSS JOIN LATERAL unnest(h.lo, h.len, h.stride, h.n) AS x(pj_lo, pj_len, pj_stride, pj_n) \
                WHERE h.projector IS NOT NULL AND h.version_id IS NULL \
                  AND (cardinality($1::text[]) = 0 OR h.projector = ANY($1))), \
             d AS (SELECT DISTINCT pj_lo, pj_len, pj_stride, pj_n FROM g), \
             f AS (SELECT d.pj_lo, d.pj_len, d.pj_stride, d.pj_n, l.pj_position, l.pj_type, l.pj_stream FROM d CROSS JOIN LATERAL ( \
                SELECT {pos}::bigint AS pj_position, {ty} AS pj_type, {stream} AS pj_stream FROM {rel} \
                WHERE {pos} >= d.pj_lo AND {pos} <= d.pj_lo + d.pj_stride * (d.pj_n - 1) + d.pj_len - 1 \
                  AND (d.pj_stride = 0 OR ({pos} - d.pj_lo) % d.pj_stride < d.pj_len) AND {filter} \
                ORDER BY {pos} LIMIT 100) l) \
             SELECT DISTINCT g.projector, f.pj_position, f.pj_type FROM g JOIN f USING (pj_lo, pj_len, pj_stride, pj_n) \
             WHERE g.partition IS NULL OR {part} = g.partition \
             ORDER BY 1, 2 LIMIT 1000",
            part = crate::store::partition_of("f.pj_stream", "g.partitions"),
            stream = shape.stream_expr(),
            holes = self.table("holes"),
            pos = shape.position_expr(),
            ty = shape.type_expr(),
            rel = shape.relation(),
            filter = shape.filter_expr(),
        );
        select(
            client,
            &sql,
            &[&names],
            "looking for events inside passed holes",
        )
        .await
    }

    /// Remembers late events; returns those not seen before (to alert once).
    pub async fn note_late_events(
        &self,
        client: &impl GenericClient,
        late: &[LateEvent],
    ) -> Result<Vec<LateEvent>> {
        if late.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = late.iter().map(|l| l.projector.as_str()).collect();
        let positions: Vec<i64> = late.iter().map(|l| l.position).collect();
        let types: Vec<Option<&str>> = late.iter().map(|l| l.event_type.as_deref()).collect();
        let sql = format!(
            "INSERT INTO {} (projector, position, type) SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[]) \
             ON CONFLICT DO NOTHING RETURNING projector, position, type",
            self.table("late_events")
        );
        select(
            client,
            &sql,
            &[&names, &positions, &types],
            "recording late events",
        )
        .await
    }
}

impl FromRow for LedgerRow {
    fn from_row(r: &Row) -> Result<LedgerRow> {
        let mode: String = r.col(1)?;
        let state: String = r.col(2)?;
        Ok(LedgerRow {
            name: r.col(0)?,
            mode: Mode::parse(&mode).ok_or_else(|| altered(format!("unknown mode `{mode}`")))?,
            state: State::parse(&state)?,
            position: Position::from_parts(r.col(4)?, r.col(3)?)?,
            event_time: r.col(5)?,
            version: r.col(6)?,
            side_effects: r.col(7)?,
            tables: r.col(8)?,
            events_processed: r.col(9)?,
            error: r.col(10)?,
            error_position: r.col(11)?,
            error_type: r.col(12)?,
            missing_since: r.col(13)?,
            updated_at: r.col(14)?,
            partitions: r.col(15)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::HoleRun;

    fn run(lo: i64, len: i64, stride: i64, n: i64) -> HoleRun {
        HoleRun { lo, len, stride, n }
    }

    #[test]
    fn holes_are_found_as_runs() {
        // Dense: no holes.
        assert_eq!(HoleRun::find(0, &[1, 2, 3]), vec![]);
        // Positions stepping by 1,000: one run, however long.
        let step: Vec<i64> = (1..=5).map(|i| i * 1000).collect();
        assert_eq!(HoleRun::find(0, &step), vec![run(1, 999, 1000, 5)]);
        assert_eq!(run(1, 999, 1000, 5).last(), 4999);
        // Scattered holes (rolled-back ids): a run of one each, or two that happen to line up.
        assert_eq!(
            HoleRun::find(10, &[11, 13, 14, 17, 20]),
            vec![run(12, 1, 0, 1), run(15, 2, 3, 2)]
        );
        assert_eq!(
            HoleRun::find(0, &[2, 4, 7]),
            vec![run(1, 1, 2, 2), run(5, 2, 0, 1)]
        );
        // Every hole of every case is covered, and nothing else.
        for (after, positions) in [
            (10, vec![11, 13, 14, 17, 20]),
            (0, vec![2, 4, 7, 8, 12, 16, 20]),
        ] {
            let runs = HoleRun::find(after, &positions);
            for x in after + 1..=*positions.last().unwrap() {
                let in_hole = runs.iter().any(|r| {
                    (0..r.n).any(|k| x >= r.lo + k * r.stride && x < r.lo + k * r.stride + r.len)
                });
                assert_eq!(in_hole, !positions.contains(&x), "position {x}");
            }
        }
    }
}
