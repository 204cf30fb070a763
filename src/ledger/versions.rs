//! A projector's versions other than the live one (`versions` table): the
//! build being made beside the live tables, and the previous versions kept
//! for `rollback` until `prune`.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use tokio_postgres::{GenericClient, Row};

use super::{FromRow, Ledger, LedgerRow, Record, State, altered, select};
use crate::db::RowExt;
use crate::manifest::{Mode, Projector};
use crate::store::Position;

/// Whether a version is being built, or was live once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Build,
    Previous,
}

/// One row of `versions`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VersionRow {
    pub id: i64,
    pub projector: String,
    pub version: i32,
    pub kind: Kind,
    pub mode: Mode,
    /// booting, built, broken, stalled (a build); kept (a previous version).
    pub state: String,
    #[serde(skip)]
    pub position: Position,
    pub events_processed: i64,
    #[serde(skip)]
    pub event_time: Option<DateTime<Utc>>,
    pub start_position: i64,
    pub started_at: DateTime<Utc>,
    /// The live tables' names.
    pub tables: Vec<String>,
    /// Where this version's tables are now (same order as `tables`).
    pub stored: Vec<String>,
    /// Indexes and sequences renamed on the way into the previous schema:
    /// `{"schema.stored_name": "original_name"}`.
    #[serde(skip)]
    pub renamed: serde_json::Value,
    pub error: Option<String>,
    pub kept_since: Option<DateTime<Utc>>,
    /// The parts its events are split into (1: not partitioned).
    pub partitions: i32,
}

const VERSION_COLUMNS: &str = "id, projector, version, kind, mode, state, position, tx::text, events_processed, \
     event_time, start_position, started_at, tables, stored, renamed, error, kept_since, partitions";

impl FromRow for VersionRow {
    fn from_row(r: &Row) -> Result<VersionRow> {
        let kind: String = r.col(3)?;
        let mode: String = r.col(4)?;
        Ok(VersionRow {
            id: r.col(0)?,
            projector: r.col(1)?,
            version: r.col(2)?,
            kind: match kind.as_str() {
                "build" => Kind::Build,
                "previous" => Kind::Previous,
                other => return Err(altered(format!("unknown version kind `{other}`"))),
            },
            mode: Mode::parse(&mode).ok_or_else(|| altered(format!("unknown mode `{mode}`")))?,
            state: r.col(5)?,
            position: Position::from_parts(r.col(7)?, r.col(6)?)?,
            events_processed: r.col(8)?,
            event_time: r.col(9)?,
            start_position: r.col(10)?,
            started_at: r.col(11)?,
            tables: r.col(12)?,
            stored: r.col(13)?,
            renamed: r.col(14)?,
            error: r.col(15)?,
            kept_since: r.col(16)?,
            partitions: r.col(17)?,
        })
    }
}

impl Ledger {
    /// Every version other than the live ones (builds and previous versions).
    pub async fn versions(&self, client: &impl GenericClient) -> Result<Vec<VersionRow>> {
        let sql = format!(
            "SELECT {VERSION_COLUMNS} FROM {} ORDER BY projector, kind, version, id",
            self.table("versions")
        );
        select(client, &sql, &[], "reading the projectors' versions").await
    }

    /// The build of a projector, if one is under way.
    pub async fn build(
        &self,
        client: &impl GenericClient,
        name: &str,
    ) -> Result<Option<VersionRow>> {
        let sql = format!(
            "SELECT {VERSION_COLUMNS} FROM {} WHERE projector = $1 AND kind = 'build'",
            self.table("versions")
        );
        let rows: Vec<VersionRow> = select(client, &sql, &[&name], "reading a build").await?;
        Ok(rows.into_iter().next())
    }

    /// The latest kept previous version `version` of a projector.
    pub async fn previous(
        &self,
        client: &impl GenericClient,
        name: &str,
        version: i32,
    ) -> Result<Option<VersionRow>> {
        let sql = format!(
            "SELECT {VERSION_COLUMNS} FROM {} WHERE projector = $1 AND kind = 'previous' AND version = $2 \
             ORDER BY kept_since DESC, id DESC LIMIT 1",
            self.table("versions")
        );
        let rows: Vec<VersionRow> = select(
            client,
            &sql,
            &[&name, &version],
            "reading a previous version",
        )
        .await?;
        Ok(rows.into_iter().next())
    }

    /// Records a new build of `p` at `start` (its tables are `stored`, in
    /// the build schema); returns its id.
    pub async fn start_build(
        &self,
        client: &impl GenericClient,
        p: &Projector,
        (start, time): (Position, Option<DateTime<Utc>>),
        stored: &[String],
    ) -> Result<i64> {
        let id: i64 = client
            .query_one(
                &format!(
                    "INSERT INTO {} (projector, version, kind, mode, state, position, tx, event_time, \
                       start_position, tables, stored, partitions) \
                     VALUES ($1, $2, 'build', $3, 'booting', $4, $5::text::xid8, $6, $4, $7, $8, $9) RETURNING id",
                    self.table("versions")
                ),
                &[
                    &p.name,
                    &p.version,
                    &p.mode.as_str(),
                    &start.id,
                    &start.tx_text(),
                    &time,
                    &p.tables,
                    &stored,
                    &p.partitions,
                ],
            )
            .await
            .context("recording a build")?
            .col(0)?;
        self.start_parts(
            client,
            (&p.name, p.version, p.partitions),
            Record::Build(id),
            (start, time),
        )
        .await?;
        Ok(id)
    }

    /// Forgets a version's record (its tables are dropped by the caller);
    /// the holes it passed stay known to be passable.
    pub async fn forget_version(&self, client: &impl GenericClient, id: i64) -> Result<()> {
        client
            .execute(
                &format!("DELETE FROM {} WHERE id = $1", self.table("versions")),
                &[&id],
            )
            .await
            .context("forgetting a version")?;
        client
            .execute(
                &format!(
                    "UPDATE {} SET projector = NULL, version_id = NULL WHERE version_id = $1",
                    self.table("holes")
                ),
                &[&id],
            )
            .await
            .context("forgetting a version's holes")?;
        Ok(())
    }

    /// A build resumes: state booting again.
    pub async fn resume_build(&self, client: &impl GenericClient, id: i64) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET state = 'booting', error = NULL, error_detail = NULL, error_hint = NULL, \
                     error_position = NULL, error_type = NULL, error_stream = NULL, error_at = NULL, \
                     updated_at = now() WHERE id = $1",
                    self.table("versions")
                ),
                &[&id],
            )
            .await
            .context("resuming a build")?;
        Ok(())
    }

    /// Inside a swap's transaction: the version `incoming` becomes the live
    /// row of its projector (state `state`), and the live version until now
    /// is kept as a previous version whose tables are `stored`.
    pub async fn exchange(
        &self,
        client: &impl GenericClient,
        incoming: &VersionRow,
        state: State,
        (live, stored, renamed): (&LedgerRow, &[String], &serde_json::Value),
    ) -> Result<()> {
        let kept: i64 = client
            .query_one(
                &format!(
                    "INSERT INTO {} (projector, version, kind, mode, state, position, tx, event_time, \
                       events_processed, tables, stored, renamed, kept_since, partitions) \
                     VALUES ($1, $2, 'previous', $3, 'kept', $4, $5::text::xid8, $6, $7, $8, $9, $10, now(), $11) \
                     RETURNING id",
                    self.table("versions")
                ),
                &[
                    &live.name,
                    &live.version,
                    &live.mode.as_str(),
                    &live.position.id,
                    &live.position.tx_text(),
                    &live.event_time,
                    &live.events_processed,
                    &live.tables,
                    &stored,
                    renamed,
                    &live.partitions,
                ],
            )
            .await
            .context("keeping the previous version")?
            .col(0)?;
        // The holes each version passed go with it.
        client
            .execute(
                &format!(
                    "UPDATE {} SET version_id = CASE WHEN version_id IS NULL THEN $2::bigint ELSE NULL END \
                     WHERE projector = $1 AND (version_id IS NULL OR version_id = $3::bigint)",
                    self.table("holes")
                ),
                &[&live.name, &kept, &incoming.id],
            )
            .await
            .context("handing the holes over")?;
        self.exchange_parts(client, &live.name, kept, incoming.id)
            .await?;
        client
            .execute(
                &format!(
                    "UPDATE {} SET version = $2, mode = $3, state = $4, position = $5, tx = $6::text::xid8, \
                       event_time = $7, events_processed = $8, tables = $9, partitions = $10, error = NULL, error_detail = NULL, \
                       error_hint = NULL, error_position = NULL, error_type = NULL, error_stream = NULL, \
                       error_at = NULL, updated_at = now() WHERE name = $1",
                    self.table("projectors")
                ),
                &[
                    &incoming.projector,
                    &incoming.version,
                    &incoming.mode.as_str(),
                    &state.as_str(),
                    &incoming.position.id,
                    &incoming.position.tx_text(),
                    &incoming.event_time,
                    &incoming.events_processed,
                    &incoming.tables,
                    &incoming.partitions,
                ],
            )
            .await
            .context("making the new version live")?;
        // The dead letters were the old version's: the new one applied every
        // event (a rollback's version gets back those it had waiting).
        self.supersede_dead_letters(client, &incoming.projector)
            .await?;
        if let (Kind::Previous, Some(since)) = (incoming.kind, incoming.kept_since) {
            self.reopen_dead_letters(client, &incoming.projector, incoming.version, since)
                .await?;
        }
        // Late events were the old version's: the new one read every event.
        client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE projector = $1",
                    self.table("late_events")
                ),
                &[&incoming.projector],
            )
            .await
            .context("forgetting the old version's late events")?;
        self.forget_version(client, incoming.id).await
    }
}
