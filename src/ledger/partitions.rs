//! The parts of partitioned projectors (`partitions` table): each part's
//! own position, and the record's position kept as the lowest of its parts.
//!
//! A part's row belongs to a record like the holes do: `version_id` NULL
//! for the live record, else the build's or kept version's row, so the parts
//! go with their version through a swap and a rollback.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use tokio_postgres::{GenericClient, Row};

use super::{FromRow, Ledger, Record, select};
use crate::db::RowExt;
use crate::store::{Partition, Position};

/// One part's row.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PartRow {
    pub partition: i32,
    pub partitions: i32,
    #[serde(rename = "position", serialize_with = "position_id")]
    pub position: Position,
    pub event_time: Option<DateTime<Utc>>,
    pub events_processed: i64,
    pub updated_at: DateTime<Utc>,
}

fn position_id<S: serde::Serializer>(p: &Position, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_i64(p.id)
}

impl PartRow {
    pub fn part(&self) -> Partition {
        Partition {
            index: self.partition,
            count: self.partitions,
        }
    }
}

const PART_COLUMNS: &str =
    "partition, partitions, position, tx::text, event_time, events_processed, updated_at";

impl FromRow for PartRow {
    fn from_row(r: &Row) -> Result<PartRow> {
        Ok(PartRow {
            partition: r.col(0)?,
            partitions: r.col(1)?,
            position: Position::from_parts(r.col(3)?, r.col(2)?)?,
            event_time: r.col(4)?,
            events_processed: r.col(5)?,
            updated_at: r.col(6)?,
        })
    }
}

/// The condition on `version_id` of a record's parts.
pub(super) fn record_condition(record: Record) -> String {
    match record {
        Record::Live => "version_id IS NULL".into(),
        Record::Build(id) => format!("version_id = {id}"),
    }
}

impl Ledger {
    /// Locks one part's row for the rest of the transaction and reads it.
    pub(super) async fn lock_part(
        &self,
        client: &impl GenericClient,
        name: &str,
        record: Record,
        part: Partition,
    ) -> Result<Option<PartRow>> {
        self.read_part(client, name, record, part, " FOR NO KEY UPDATE")
            .await
    }

    /// One part's row of a record, with `suffix` (a row lock, or nothing).
    async fn read_part(
        &self,
        client: &impl GenericClient,
        name: &str,
        record: Record,
        part: Partition,
        suffix: &str,
    ) -> Result<Option<PartRow>> {
        let sql = format!(
            "SELECT {PART_COLUMNS} FROM {} WHERE projector = $1 AND {} AND partition = $2 \
             AND partitions = $3{suffix}",
            self.table("partitions"),
            record_condition(record)
        );
        let rows: Vec<PartRow> = select(
            client,
            &sql,
            &[&name, &part.index, &part.count],
            "reading a partition's ledger row",
        )
        .await?;
        Ok(rows.into_iter().next())
    }

    /// The parts of a projector's record, in order (none: not partitioned).
    pub async fn parts(
        &self,
        client: &impl GenericClient,
        name: &str,
        record: Record,
    ) -> Result<Vec<PartRow>> {
        let sql = format!(
            "SELECT {PART_COLUMNS} FROM {} WHERE projector = $1 AND {} ORDER BY partition",
            self.table("partitions"),
            record_condition(record)
        );
        select(client, &sql, &[&name], "reading partitions").await
    }

    /// One live part's row, as it is now.
    pub async fn part(
        &self,
        client: &impl GenericClient,
        name: &str,
        part: Partition,
    ) -> Result<Option<PartRow>> {
        self.read_part(client, name, Record::Live, part, "").await
    }

    /// The parts of every live partitioned projector, by projector.
    pub async fn live_parts(
        &self,
        client: &impl GenericClient,
    ) -> Result<Vec<(String, Vec<PartRow>)>> {
        let rows = client
            .query(
                &format!(
                    "SELECT projector, {PART_COLUMNS} FROM {} WHERE version_id IS NULL \
                     ORDER BY projector, partition",
                    self.table("partitions")
                ),
                &[],
            )
            .await
            .context("reading partitions")?;
        let mut by: Vec<(String, Vec<PartRow>)> = Vec::new();
        for r in rows {
            let name: String = r.col(0)?;
            let part = PartRow {
                partition: r.col(1)?,
                partitions: r.col(2)?,
                position: Position::from_parts(r.col(4)?, r.col(3)?)?,
                event_time: r.col(5)?,
                events_processed: r.col(6)?,
                updated_at: r.col(7)?,
            };
            match by.last_mut() {
                Some((n, parts)) if *n == name => parts.push(part),
                _ => by.push((name, vec![part])),
            }
        }
        Ok(by)
    }

    /// Starts a record's parts afresh at `position` (the record starts or
    /// is rebuilt): `partitions` rows, or none when it is not partitioned.
    pub(super) async fn start_parts(
        &self,
        client: &impl GenericClient,
        (name, version, partitions): (&str, i32, i32),
        record: Record,
        (position, event_time): (Position, Option<DateTime<Utc>>),
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE projector = $1 AND {}",
                    self.table("partitions"),
                    record_condition(record)
                ),
                &[&name],
            )
            .await
            .context("forgetting the old partitions")?;
        if partitions <= 1 {
            return Ok(());
        }
        let version_id = match record {
            Record::Live => None,
            Record::Build(id) => Some(id),
        };
        client
            .execute(
                &format!(
                    "INSERT INTO {} (projector, version_id, partition, partitions, version, position, tx, event_time) \
                     SELECT $1, $2, k, $3, $4, $5, $6::text::xid8, $7 FROM generate_series(0, $3 - 1) k",
                    self.table("partitions")
                ),
                &[
                    &name,
                    &version_id,
                    &partitions,
                    &version,
                    &position.id,
                    &position.tx_text(),
                    &event_time,
                ],
            )
            .await
            .context("recording the partitions")?;
        Ok(())
    }

    /// Brings a partitioned record's position up to the lowest of its parts
    /// (and its count of events to their sum), in the transaction that moved
    /// a part. The record's row is locked first, so the parts are read after
    /// any other part's move that locked it before has committed: the
    /// record never lags behind its parts once they are at rest.
    pub(super) async fn refresh_parts(
        &self,
        client: &impl GenericClient,
        name: &str,
        record: Record,
    ) -> Result<()> {
        let (table, key) = match record {
            Record::Live => (self.table("projectors"), "r.name = $1".to_string()),
            Record::Build(id) => (
                self.table("versions"),
                format!("r.projector = $1 AND r.id = {id}"),
            ),
        };
        client
            .execute(
                &format!("SELECT 1 FROM {table} r WHERE {key} FOR NO KEY UPDATE"),
                &[&name],
            )
            .await
            .context("locking a partitioned projector's row")?;
        client
            .execute(
                &format!(
                    "UPDATE {table} r SET position = m.position, tx = m.tx, event_time = m.event_time, \
                       events_processed = m.events, updated_at = now() \
                     FROM (SELECT p.position, p.tx, p.event_time, \
                             sum(p.events_processed) OVER ()::bigint AS events \
                           FROM {parts} p WHERE p.projector = $1 AND {cond} \
                           ORDER BY coalesce(p.tx, '0'::xid8), p.position LIMIT 1) m \
                     WHERE {key} AND ((coalesce(m.tx, '0'::xid8), m.position) > (coalesce(r.tx, '0'::xid8), r.position) \
                       OR ((m.tx, m.position) IS NOT DISTINCT FROM (r.tx, r.position) AND m.events <> r.events_processed))",
                    parts = self.table("partitions"),
                    cond = record_condition(record).replace("version_id", "p.version_id"),
                ),
                &[&name],
            )
            .await
            .context("updating a partitioned projector's position")?;
        Ok(())
    }

    /// Inside a swap's transaction: the live parts go with the version kept
    /// as `kept`, and the parts of `incoming` become the live ones.
    pub(super) async fn exchange_parts(
        &self,
        client: &impl GenericClient,
        name: &str,
        kept: i64,
        incoming: i64,
    ) -> Result<()> {
        // Two steps: a part's row is unique per record, so the live parts
        // leave before the incoming ones arrive.
        client
            .execute(
                &format!(
                    "UPDATE {} SET version_id = $2 WHERE projector = $1 AND version_id IS NULL",
                    self.table("partitions")
                ),
                &[&name, &kept],
            )
            .await
            .context("keeping the partitions of the previous version")?;
        client
            .execute(
                &format!(
                    "UPDATE {} SET version_id = NULL WHERE projector = $1 AND version_id = $2",
                    self.table("partitions")
                ),
                &[&name, &incoming],
            )
            .await
            .context("handing the partitions over")?;
        Ok(())
    }
}
