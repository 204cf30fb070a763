//! The ledger: projectionist's own schema in the database (positions, states,
//! failures, passed holes) and the advisory locks that keep runs apart.
//!
//! `projectionist.projectors` is part of the contract (teams query it), so its
//! columns only ever grow. The schema is applied by refinery migrations
//! embedded in the binary, with the schema name of `[ledger] schema`.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use tokio_postgres::{Client, GenericClient, Row};

use crate::db::quote_ident;
use crate::store::Position;

/// The ledger's migrations, in order. `__SCHEMA__` is the quoted schema.
const MIGRATIONS: &[(&str, &str)] = &[("V1__ledger", include_str!("migrations/V1__ledger.sql"))];

/// The states of PRODUCT.md that have a ledger row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Booting,
    Live,
    Finished,
    Broken,
    Stalled,
    Retired,
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
            other => anyhow::bail!("unknown state `{other}` in the ledger"),
        })
    }
}

/// One row of `projectionist.projectors`.
#[derive(Clone, Debug)]
pub struct LedgerRow {
    pub name: String,
    pub mode: String,
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

/// Where the ledger lives, and the SQL to reach it.
#[derive(Clone, Debug)]
pub struct Ledger {
    schema: String,
    quoted: String,
}

const ROW_COLUMNS: &str = "name, mode, state, position, tx::text, event_time, version, side_effects, tables, \
     events_processed, error, error_position, error_type, missing_since, updated_at";

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

    /// Fails with a clear message when the ledger has not been migrated.
    pub async fn ensure_exists(&self, client: &Client) -> Result<()> {
        let exists: bool = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&self.table("projectors")],
            )
            .await?
            .get(0);
        if !exists {
            return Err(crate::error::Failure::Usage(format!(
                "the ledger schema `{}` is not in this database: run `projectionist migrate` first",
                self.schema
            ))
            .into());
        }
        Ok(())
    }

    pub async fn rows(&self, client: &impl GenericClient) -> Result<Vec<LedgerRow>> {
        let rows = client
            .query(
                &format!(
                    "SELECT {ROW_COLUMNS} FROM {} ORDER BY name",
                    self.table("projectors")
                ),
                &[],
            )
            .await
            .context("reading the ledger")?;
        rows.iter().map(row).collect()
    }

    pub async fn row(&self, client: &impl GenericClient, name: &str) -> Result<Option<LedgerRow>> {
        let r = client
            .query_opt(
                &format!(
                    "SELECT {ROW_COLUMNS} FROM {} WHERE name = $1",
                    self.table("projectors")
                ),
                &[&name],
            )
            .await
            .context("reading the ledger")?;
        r.as_ref().map(row).transpose()
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

    /// Moves a projector's position from `expected` to `to`, or fails: the
    /// guard that keeps two runners from both applying a batch.
    pub async fn advance(
        &self,
        client: &impl GenericClient,
        name: &str,
        expected: Position,
        to: Position,
        event_time: Option<DateTime<Utc>>,
        handled: i64,
    ) -> Result<()> {
        let n = client
            .execute(
                &format!(
                    "UPDATE {} SET position = $3, tx = $4::text::xid8, event_time = coalesce($5, event_time), \
                     events_processed = events_processed + $6, updated_at = now() \
                     WHERE name = $1 AND position = $2 AND tx IS NOT DISTINCT FROM $7::text::xid8",
                    self.table("projectors")
                ),
                &[
                    &name,
                    &expected.id,
                    &to.id,
                    &to.tx_text(),
                    &event_time,
                    &handled,
                    &expected.tx_text(),
                ],
            )
            .await
            .context("updating the position")?;
        if n != 1 {
            anyhow::bail!(
                "the position of projector `{name}` moved away from {expected} while this run held it: another runner is playing it"
            );
        }
        Ok(())
    }

    pub async fn set_state(
        &self,
        client: &impl GenericClient,
        name: &str,
        state: State,
    ) -> Result<()> {
        let clear = if matches!(state, State::Live | State::Finished | State::Booting) {
            ", error = NULL, error_detail = NULL, error_hint = NULL, error_position = NULL, error_type = NULL, error_stream = NULL, error_at = NULL"
        } else {
            ""
        };
        client
            .execute(
                &format!(
                    "UPDATE {} SET state = $2, updated_at = now(){clear} WHERE name = $1",
                    self.table("projectors")
                ),
                &[&name, &state.as_str()],
            )
            .await
            .context("updating a projector's state")?;
        Ok(())
    }

    /// Records a failure; with [`FailureKind::Broken`] also marks the projector broken.
    pub async fn record_failure(
        &self,
        client: &impl GenericClient,
        name: &str,
        run: &str,
        f: &crate::handlers::sql::HandlerFailure,
        kind: FailureKind,
    ) -> Result<()> {
        let dead_letter = kind == FailureKind::DeadLetter;
        if kind == FailureKind::Broken {
            client
                .execute(
                    &format!(
                        "UPDATE {} SET state = 'broken', error = $2, error_detail = $3, error_hint = $4, \
                         error_position = $5, error_type = $6, error_stream = $7, error_at = now(), updated_at = now() \
                         WHERE name = $1",
                        self.table("projectors")
                    ),
                    &[&name, &f.message, &f.detail, &f.hint, &f.position, &f.event_type, &f.stream],
                )
                .await
                .context("marking a projector broken")?;
        }
        client
            .execute(
                &format!(
                    "INSERT INTO {} (projector, run, position, type, stream, error, detail, hint, sqlstate, dead_letter) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    self.table("failures")
                ),
                &[
                    &name, &run, &f.position, &f.event_type, &f.stream, &f.message, &f.detail, &f.hint,
                    &f.sqlstate, &dead_letter,
                ],
            )
            .await
            .context("recording a failure")?;
        Ok(())
    }

    /// Creates (or re-creates, for a rebuild) a projector's row at `position`, state booting.
    pub async fn start(
        &self,
        client: &impl GenericClient,
        p: &crate::manifest::Projector,
        position: Position,
        event_time: Option<DateTime<Utc>>,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "INSERT INTO {} (name, mode, state, position, tx, event_time, version, side_effects, tables) \
                     VALUES ($1, $2, 'booting', $3, $4::text::xid8, $5, $6, $7, $8) \
                     ON CONFLICT (name) DO UPDATE SET mode = EXCLUDED.mode, state = 'booting', position = EXCLUDED.position, \
                       tx = EXCLUDED.tx, event_time = EXCLUDED.event_time, version = EXCLUDED.version, \
                       side_effects = EXCLUDED.side_effects, tables = EXCLUDED.tables, events_processed = 0, \
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
                ],
            )
            .await
            .context("recording a projector in the ledger")?;
        Ok(())
    }

    /// Resumes an existing row: booting again, with the manifest's current facts.
    pub async fn resume(
        &self,
        client: &impl GenericClient,
        p: &crate::manifest::Projector,
    ) -> Result<()> {
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
}

fn row(r: &Row) -> Result<LedgerRow> {
    Ok(LedgerRow {
        name: r.get(0),
        mode: r.get(1),
        state: State::parse(r.get(2))?,
        position: Position::from_parts(r.get(4), r.get(3))?,
        event_time: r.get(5),
        version: r.get(6),
        side_effects: r.get(7),
        tables: r.get(8),
        events_processed: r.get(9),
        error: r.get(10),
        error_position: r.get(11),
        error_type: r.get(12),
        missing_since: r.get(13),
        updated_at: r.get(14),
    })
}

/// Advisory locks, keyed by the ledger schema so two ledgers never collide.
#[derive(Clone, Debug)]
pub struct Locks {
    namespace: String,
}

/// Who holds a lock, for the message of the one who waits.
#[derive(Clone, Debug)]
pub struct LockHolder {
    pub pid: i32,
    pub application: String,
    pub client: Option<String>,
    pub since: Option<DateTime<Utc>>,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({}", self.pid, self.application)?;
        if let Some(c) = &self.client {
            write!(f, " from {c}")?;
        }
        write!(f, ")")?;
        if let Some(s) = self.since {
            write!(f, " since {}", s.format("%Y-%m-%d %H:%M:%S UTC"))?;
        }
        Ok(())
    }
}

impl Locks {
    pub fn new(ledger_schema: &str) -> Locks {
        Locks {
            namespace: format!("projectionist:{ledger_schema}"),
        }
    }

    /// Tries a session-level lock once.
    pub async fn try_lock(&self, client: &Client, key: &str) -> Result<bool> {
        Ok(client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext($1), hashtext($2))",
                &[&self.namespace, &key],
            )
            .await
            .context("taking an advisory lock")?
            .get(0))
    }

    /// Tries a transaction-level lock (released at commit or rollback).
    pub async fn try_xact_lock(&self, client: &impl GenericClient, key: &str) -> Result<bool> {
        Ok(client
            .query_one(
                "SELECT pg_try_advisory_xact_lock(hashtext($1), hashtext($2))",
                &[&self.namespace, &key],
            )
            .await
            .context("taking an advisory lock")?
            .get(0))
    }

    pub async fn unlock(&self, client: &Client, key: &str) -> Result<()> {
        client
            .execute(
                "SELECT pg_advisory_unlock(hashtext($1), hashtext($2))",
                &[&self.namespace, &key],
            )
            .await?;
        Ok(())
    }

    /// Waits for a lock up to `timeout` (`None`: fail at once), saying who holds it.
    pub async fn lock(
        &self,
        client: &Client,
        key: &str,
        what: &str,
        timeout: Option<std::time::Duration>,
    ) -> Result<()> {
        if self.try_lock(client, key).await? {
            return Ok(());
        }
        let holder = self.holder(client, key).await?;
        let who = holder
            .as_ref()
            .map(|h| h.to_string())
            .unwrap_or_else(|| "another session".into());
        let Some(timeout) = timeout else {
            return Err(crate::error::Failure::Locked(format!(
                "{what} is locked by {who}\n  wait for it to finish (drop --no-wait to wait up to --lock-timeout)"
            ))
            .into());
        };
        tracing::warn!("waiting for {what}: locked by {who}");
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_note = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            if self.try_lock(client, key).await? {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(crate::error::Failure::Locked(format!(
                    "gave up waiting for {what} after {}: locked by {who}\n  raise --lock-timeout, or find out why it runs so long",
                    humantime::format_duration(timeout)
                ))
                .into());
            }
            if last_note.elapsed() >= std::time::Duration::from_secs(10) {
                tracing::warn!("still waiting for {what}: locked by {who}");
                last_note = tokio::time::Instant::now();
            }
        }
    }

    pub async fn holder(&self, client: &Client, key: &str) -> Result<Option<LockHolder>> {
        let row = client
            .query_opt(
                "SELECT a.pid, coalesce(nullif(a.application_name, ''), 'unknown'), a.client_addr::text, a.backend_start \
                 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND l.classid::bigint = (hashtext($1)::bigint & 4294967295) \
                   AND l.objid::bigint = (hashtext($2)::bigint & 4294967295) \
                 LIMIT 1",
                &[&self.namespace, &key],
            )
            .await?;
        Ok(row.map(|r| LockHolder {
            pid: r.get(0),
            application: r.get(1),
            client: r.get(2),
            since: r.get(3),
        }))
    }
}
