//! `verify`: the sweeper. Runs each `[[projectors.X.check]]`: its two queries
//! must return the same rows (as a multiset; column names do not matter).
//!
//! A check compares the read model with the events the projector has
//! actually consumed: both queries and the projector's committed position are
//! read in one repeatable-read snapshot, and a check may use `:position` (and
//! `:transaction`, with a transaction column) to stop its events query there.
//! A projector that is merely behind is never reported as a mismatch: a
//! check without `:position` that differs while its projector lags is
//! BEHIND, not compared. Late events (inside holes the projector passed)
//! fail verify too. `--heal` resets only the projectors whose checks fail at
//! their own position, or that missed late events.

use anyhow::{Context as _, Result};
use tokio_postgres::{Client, GenericClient};

use crate::db::Session;
use crate::engine::Context;
use crate::ledger::LateEvent;
use crate::manifest::sql_text;
use crate::report::progress::Progress;
use crate::store::{Position, StoreShape};

/// A check's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ok,
    /// The read model differs from the events it consumed.
    Mismatch,
    /// The queries differ, but the check does not use `:position` and the
    /// projector is behind the head: not comparable now.
    Behind,
    /// Events appeared inside holes the projector had passed: never applied.
    LateEvents,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "OK",
            Verdict::Mismatch => "MISMATCH",
            Verdict::Behind => "BEHIND",
            Verdict::LateEvents => "LATE EVENTS",
        }
    }

    /// Whether it fails verify (and `--heal` resets its projector).
    pub fn fails(self) -> bool {
        matches!(self, Verdict::Mismatch | Verdict::LateEvents)
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CheckResult {
    pub projector: String,
    pub check: String,
    pub result: Verdict,
    /// `result` is OK or BEHIND.
    pub ok: bool,
    /// The projector's committed position the check was compared at.
    pub position: Option<i64>,
    /// Rows of each query, as row text, sorted.
    pub projection: Vec<String>,
    pub events: Vec<String>,
}

/// What `verify` did, and `--heal` after it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Verification {
    #[serde(rename = "checks")]
    pub results: Vec<CheckResult>,
    /// Projectors reset by `--heal`.
    pub healed: Vec<String>,
    /// The checks of the healed projectors, run again.
    pub after_heal: Vec<CheckResult>,
}

impl Verification {
    /// Whether a check still fails (after healing, the checks run again).
    pub fn failed(&self) -> bool {
        if self.healed.is_empty() {
            self.results.iter().any(|r| r.result.fails())
        } else {
            self.results
                .iter()
                .filter(|r| !self.healed.contains(&r.projector))
                .chain(&self.after_heal)
                .any(|r| r.result.fails())
        }
    }
}

/// Runs the checks of `names` (empty: all); with `heal`, resets the
/// projectors whose checks fail at their position and checks them again.
pub async fn verify(
    ctx: &Context,
    names: &[String],
    heal: bool,
    progress: &Progress,
) -> Result<Verification> {
    for n in names {
        ctx.projector(n)?;
    }
    let mut client = ctx.connect("verify", Session::Reader).await?;
    ctx.ledger.ensure_exists(&client).await?;
    let shape = StoreShape::inspect(&client, &ctx.manifest.store)
        .await
        .map_err(|p| ctx.manifest.error(p))?;
    let results = checks_settled(ctx, &shape, &mut client, names).await?;
    let mut failing: Vec<String> = results
        .iter()
        .filter(|r| r.result.fails())
        .map(|r| r.projector.clone())
        .collect();
    failing.dedup();
    let mut verification = Verification {
        results,
        healed: Vec::new(),
        after_heal: Vec::new(),
    };
    if heal && !failing.is_empty() {
        tracing::warn!("healing: resetting {}", failing.join(", "));
        let opts = crate::engine::reset::ResetOptions {
            allow_side_effects: false,
            no_replay: false,
            in_place: false,
            boot: Default::default(),
        };
        crate::engine::reset::reset(ctx, &failing, &opts, progress).await?;
        verification.after_heal = checks_settled(ctx, &shape, &mut client, &failing).await?;
        verification.healed = failing;
    }
    Ok(verification)
}

/// How many times a partitioned projector's checks are run again while its
/// parts stand at different positions, and how long apart.
const UNEVEN_TRIES: u32 = 10;
const UNEVEN_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// The checks, run again for partitioned projectors whose parts stood at
/// different positions (their read model is then ahead of the lowest part:
/// not comparable), until they stand together or the tries run out (BEHIND).
async fn checks_settled(
    ctx: &Context,
    shape: &StoreShape,
    client: &mut Client,
    names: &[String],
) -> Result<Vec<CheckResult>> {
    let (mut results, mut uneven) = run_checks(ctx, shape, client, names).await?;
    for _ in 1..UNEVEN_TRIES {
        let again: Vec<String> = uneven
            .into_iter()
            .filter(|n| {
                results
                    .iter()
                    .any(|r| &r.projector == n && r.result == Verdict::Behind)
            })
            .collect();
        if again.is_empty() {
            break;
        }
        tokio::time::sleep(UNEVEN_PAUSE).await;
        let (retried, still) = run_checks(ctx, shape, client, &again).await?;
        results.retain(|r| !again.contains(&r.projector));
        results.extend(retried);
        uneven = still;
    }
    let order: Vec<&str> = ctx
        .manifest
        .projectors
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    results.sort_by_key(|r| order.iter().position(|n| *n == r.projector));
    Ok(results)
}

/// The checks of `names` (empty: all) in one snapshot; also the partitioned
/// projectors whose parts stood at different positions.
async fn run_checks(
    ctx: &Context,
    shape: &StoreShape,
    client: &mut Client,
    names: &[String],
) -> Result<(Vec<CheckResult>, Vec<String>)> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let rows = ctx.ledger.rows(&tx).await?;
    let head = shape.visible_head(&tx).await?.map(|(p, _)| p);
    let late = crate::engine::late::find(ctx, shape, &tx, names).await?;
    let parts = ctx.ledger.live_parts(&tx).await?;
    let mut results = Vec::new();
    let mut uneven_names = Vec::new();
    for p in &ctx.manifest.projectors {
        if !names.is_empty() && !names.contains(&p.name) {
            continue;
        }
        let position = rows
            .iter()
            .find(|r| r.name == p.name)
            .map(|r| r.position)
            .unwrap_or(Position::START);
        // A part ahead of the lowest has applied events past `position`.
        let uneven = parts
            .iter()
            .find(|(n, _)| *n == p.name)
            .is_some_and(|(_, parts)| parts.iter().any(|x| x.position != position));
        if uneven {
            uneven_names.push(p.name.clone());
        }
        let behind = head.is_some_and(|h| position < h);
        for c in &p.checks {
            let values = [
                ("position", format!("{}::bigint", position.id)),
                (
                    "transaction",
                    match position.tx {
                        Some(t) => format!("'{t}'::xid8"),
                        None => "NULL::xid8".into(),
                    },
                ),
            ];
            let at_position =
                sql_text::uses(&c.events, "position") || sql_text::uses(&c.projection, "position");
            let projection = rows_of(&tx, &sql_text::substitute(&c.projection, &values))
                .await
                .with_context(|| {
                    format!("check \"{}\" of `{}`: the projection query", c.name, p.name)
                })?;
            let events = rows_of(&tx, &sql_text::substitute(&c.events, &values))
                .await
                .with_context(|| {
                    format!("check \"{}\" of `{}`: the events query", c.name, p.name)
                })?;
            let result = match (projection == events, at_position, behind) {
                (true, _, _) => Verdict::Ok,
                (false, _, _) if uneven => Verdict::Behind,
                (false, false, true) => Verdict::Behind,
                (false, _, _) => Verdict::Mismatch,
            };
            results.push(CheckResult {
                projector: p.name.clone(),
                check: c.name.clone(),
                result,
                ok: !result.fails(),
                position: Some(position.id),
                projection,
                events,
            });
        }
        let missed: Vec<&LateEvent> = late.iter().filter(|l| l.projector == p.name).collect();
        if !missed.is_empty() {
            results.push(CheckResult {
                projector: p.name.clone(),
                check: "no late events".into(),
                result: Verdict::LateEvents,
                ok: false,
                position: Some(position.id),
                projection: vec![format!("{} not applied", missed.len())],
                events: missed
                    .iter()
                    .map(|l| format!("#{} {}", l.position, l.event_type.as_deref().unwrap_or("?")))
                    .collect(),
            });
        }
    }
    tx.rollback().await?;
    Ok((results, uneven_names))
}

/// Rows as text (each column as PostgreSQL prints it), sorted: a multiset.
async fn rows_of(
    client: &impl GenericClient,
    sql: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut rows: Vec<String> = client
        .simple_query(sql)
        .await?
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            _ => None,
        })
        .collect();
    rows.sort();
    Ok(rows)
}
