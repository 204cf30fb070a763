//! What operators do to the ledger by hand: pause and resume projectors,
//! and the failures and dead letters `failures` lists and `retry` applies
//! again.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use tokio_postgres::{GenericClient, Row};

use super::{FromRow, Ledger, State, select};
use crate::db::RowExt;
use crate::error::Failure;

/// A recorded failure (or dead letter), as `failures` lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FailureRecord {
    pub id: i64,
    pub projector: String,
    pub position: i64,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub stream: Option<String>,
    pub error: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    pub sqlstate: Option<String>,
    /// The run that recorded it (boot, play, reset, retry).
    pub run: String,
    /// Skipped by `on_error = "skip"`: waiting for `retry`.
    pub dead_letter: bool,
    pub at: DateTime<Utc>,
    /// When `retry` applied it with success.
    pub resolved_at: Option<DateTime<Utc>>,
    /// `retry` (applied again) or `rebuild` (its projector replayed every event since).
    pub resolved_by: Option<String>,
    pub version: Option<i32>,
}

impl FromRow for FailureRecord {
    fn from_row(r: &Row) -> Result<FailureRecord> {
        Ok(FailureRecord {
            id: r.col(0)?,
            projector: r.col(1)?,
            position: r.col(2)?,
            event_type: r.col(3)?,
            stream: r.col(4)?,
            error: r.col(5)?,
            detail: r.col(6)?,
            hint: r.col(7)?,
            sqlstate: r.col(8)?,
            run: r.col(9)?,
            dead_letter: r.col(10)?,
            at: r.col(11)?,
            resolved_at: r.col(12)?,
            version: r.col(13)?,
            resolved_by: r.col(14)?,
        })
    }
}

const FAILURE_COLUMNS: &str = "id, projector, position, type, stream, error, detail, hint, sqlstate, run, \
     dead_letter, at, resolved_at, version, resolved_by";

impl Ledger {
    /// Every recorded failure of `names` (empty: all), oldest first.
    pub async fn failure_records(
        &self,
        client: &impl GenericClient,
        names: &[String],
    ) -> Result<Vec<FailureRecord>> {
        let sql = format!(
            "SELECT {FAILURE_COLUMNS} FROM {} WHERE cardinality($1::text[]) = 0 OR projector = ANY($1) \
             ORDER BY projector, at, id",
            self.table("failures")
        );
        select(client, &sql, &[&names], "reading failures").await
    }

    /// A projector's dead letters waiting for `retry` (only those at
    /// `positions`, when given), one per position, in position order.
    pub async fn dead_letters(
        &self,
        client: &impl GenericClient,
        name: &str,
        positions: &[i64],
    ) -> Result<Vec<FailureRecord>> {
        let sql = format!(
            "SELECT DISTINCT ON (position) {FAILURE_COLUMNS} FROM {} \
             WHERE projector = $1 AND dead_letter AND resolved_at IS NULL \
               AND (cardinality($2::bigint[]) = 0 OR position = ANY($2)) \
             ORDER BY position, id",
            self.table("failures")
        );
        select(client, &sql, &[&name, &positions], "reading dead letters").await
    }

    /// The dead letters waiting, per projector.
    pub async fn dead_letters_waiting(
        &self,
        client: &impl GenericClient,
    ) -> Result<Vec<(String, i64)>> {
        client
            .query(
                &format!(
                    "SELECT projector, count(DISTINCT position) FROM {} \
                     WHERE dead_letter AND resolved_at IS NULL GROUP BY 1",
                    self.table("failures")
                ),
                &[],
            )
            .await
            .context("counting dead letters")?
            .iter()
            .map(|r| Ok((r.col(0)?, r.col(1)?)))
            .collect()
    }

    /// Marks a projector's dead letters at `position` applied.
    pub async fn resolve(
        &self,
        client: &impl GenericClient,
        name: &str,
        position: i64,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET resolved_at = now(), resolved_by = 'retry' WHERE projector = $1 AND position = $2 \
                     AND dead_letter AND resolved_at IS NULL",
                    self.table("failures")
                ),
                &[&name, &position],
            )
            .await
            .context("marking a dead letter applied")?;
        Ok(())
    }

    /// A projector's record starts again (a rebuild, a swap): every event is
    /// played again into the new read model, the dead letters' included, so
    /// none is left for `retry`.
    pub(super) async fn supersede_dead_letters(
        &self,
        client: &impl GenericClient,
        name: &str,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET resolved_at = now(), resolved_by = 'rebuild' WHERE projector = $1 \
                     AND dead_letter AND resolved_at IS NULL",
                    self.table("failures")
                ),
                &[&name],
            )
            .await
            .context("resolving the dead letters of a rebuilt projector")?;
        Ok(())
    }

    /// A kept version comes back live (`rollback`): the dead letters it had
    /// waiting when a swap set it aside wait again (its tables never got them).
    pub(super) async fn reopen_dead_letters(
        &self,
        client: &impl GenericClient,
        name: &str,
        version: i32,
        kept_since: DateTime<Utc>,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET resolved_at = NULL, resolved_by = NULL WHERE projector = $1 \
                     AND dead_letter AND resolved_by = 'rebuild' AND version = $2 AND resolved_at >= $3",
                    self.table("failures")
                ),
                &[&name, &version, &kept_since],
            )
            .await
            .context("reopening the dead letters of a version rolled back to")?;
        Ok(())
    }

    /// The holes passed by each projector's live version.
    pub async fn holes_passed(&self, client: &impl GenericClient) -> Result<Vec<(String, i64)>> {
        client
            .query(
                &format!(
                    "SELECT h.projector, sum(x)::bigint FROM {} h CROSS JOIN LATERAL unnest(h.n) x \
                     WHERE h.projector IS NOT NULL AND h.version_id IS NULL GROUP BY 1",
                    self.table("holes")
                ),
                &[],
            )
            .await
            .context("counting passed holes")?
            .iter()
            .map(|r| Ok((r.col(0)?, r.col(1)?)))
            .collect()
    }

    /// Pauses a projector (remembering its state); returns that state.
    pub async fn pause(&self, client: &impl GenericClient, name: &str) -> Result<State> {
        let row = client
            .query_opt(
                &format!(
                    "UPDATE {} SET paused_state = state, state = 'paused', paused_at = now(), updated_at = now() \
                     WHERE name = $1 AND state NOT IN ('paused', 'retired') RETURNING paused_state",
                    self.table("projectors")
                ),
                &[&name],
            )
            .await
            .context("pausing a projector")?;
        match row {
            Some(r) => State::parse(&r.col::<String>(0)?),
            None => Err(self.not_pausable(client, name, "paused").await),
        }
    }

    /// Resumes a paused projector in the state it had; returns that state.
    pub async fn unpause(&self, client: &impl GenericClient, name: &str) -> Result<State> {
        let row = client
            .query_opt(
                &format!(
                    "UPDATE {} SET state = coalesce(paused_state, 'live'), paused_state = NULL, paused_at = NULL, \
                     updated_at = now() WHERE name = $1 AND state = 'paused' RETURNING state",
                    self.table("projectors")
                ),
                &[&name],
            )
            .await
            .context("resuming a projector")?;
        match row {
            Some(r) => State::parse(&r.col::<String>(0)?),
            None => Err(self.not_pausable(client, name, "resumed").await),
        }
    }

    /// Why a projector cannot be paused or resumed.
    async fn not_pausable(
        &self,
        client: &impl GenericClient,
        name: &str,
        what: &str,
    ) -> anyhow::Error {
        let why = match self.row(client, name).await {
            Ok(Some(r)) if r.state == State::Paused => "it is paused already".to_string(),
            Ok(Some(r)) => format!("it is {}", r.state.as_str()),
            Ok(None) => "it has no ledger row (boot it first)".to_string(),
            Err(e) => return e,
        };
        Failure::Usage(format!("projector `{name}` cannot be {what}: {why}")).into()
    }
}
