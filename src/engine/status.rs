//! `status`: where every projector stands. A handful of queries whatever the
//! number of projectors: the ledger, the head of the store (by its index, never
//! a scan), and the transactions holding the head back. Lag is counted in
//! positions, so it costs nothing on a store of any size.

use std::collections::HashSet;

use anyhow::Result;
use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use crate::engine::Context;
use crate::ledger::State;
use crate::store::StoreShape;

/// A projector's state as status shows it: the ledger's, or derived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShownState {
    /// In the manifest, never booted.
    New,
    /// In the ledger, no longer in the manifest.
    Orphaned,
    #[serde(untagged)]
    Ledger(State),
}

impl ShownState {
    pub fn as_str(self) -> &'static str {
        match self {
            ShownState::New => "new",
            ShownState::Orphaned => "orphaned",
            ShownState::Ledger(s) => s.as_str(),
        }
    }

    pub fn is_unhealthy(self) -> bool {
        matches!(self, ShownState::Ledger(State::Broken | State::Stalled))
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Head {
    pub position: i64,
    pub time: Option<DateTime<Utc>>,
}

/// A running transaction that holds the head back.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Holder {
    pub pid: i32,
    pub seconds: f64,
    pub application: String,
    pub state: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ProjectorStatus {
    pub name: String,
    pub mode: String,
    pub state: ShownState,
    pub position: Option<i64>,
    /// Events (positions) between the head and the projector.
    pub lag: Option<i64>,
    /// Time between the head's newest event and the projector's last processed one.
    pub behind_seconds: Option<f64>,
    pub updated_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub error_position: Option<i64>,
    pub error_type: Option<String>,
    pub missing_since: Option<DateTime<Utc>>,
    /// `after` projectors it is waiting for (behind it at the head).
    pub waiting_for: Vec<String>,
    pub version: Option<i32>,
    pub side_effects: bool,
    pub tables: Vec<String>,
    pub events_processed: i64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct StatusReport {
    pub head: Head,
    pub holding: Vec<Holder>,
    pub projectors: Vec<ProjectorStatus>,
    pub time: DateTime<Utc>,
}

/// A lag limit for `--max-lag`: a number of events or a duration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaxLag {
    Events(i64),
    Seconds(f64),
}

impl std::str::FromStr for MaxLag {
    type Err = String;
    fn from_str(s: &str) -> Result<MaxLag, String> {
        if let Ok(n) = s.parse::<i64>() {
            return if n >= 0 {
                Ok(MaxLag::Events(n))
            } else {
                Err("a lag is never negative".into())
            };
        }
        humantime::parse_duration(s)
            .map(|d| MaxLag::Seconds(d.as_secs_f64()))
            .map_err(|e| format!("expected a number of events (1000) or a duration (30s, 5m): {e}"))
    }
}

impl StatusReport {
    /// Projectors over the limit, broken or stalled: what makes status exit 1.
    pub fn unhealthy(&self, max_lag: Option<MaxLag>) -> Vec<String> {
        let mut out = Vec::new();
        for p in &self.projectors {
            if p.state.is_unhealthy() {
                out.push(format!("{} is {}", p.name, p.state.as_str()));
                continue;
            }
            if !matches!(p.state, ShownState::Ledger(State::Live | State::Booting)) {
                continue;
            }
            match max_lag {
                Some(MaxLag::Events(n)) if p.lag.unwrap_or(0) > n => out.push(format!(
                    "{} lags {} events (max {n})",
                    p.name,
                    p.lag.unwrap_or(0)
                )),
                Some(MaxLag::Seconds(s)) if p.behind_seconds.unwrap_or(0.0) > s => {
                    out.push(format!(
                        "{} is {:.0}s behind (max {s:.0}s)",
                        p.name,
                        p.behind_seconds.unwrap_or(0.0)
                    ))
                }
                _ => {}
            }
        }
        out
    }
}

/// Gathers the status of every projector in the manifest and the ledger.
pub async fn status(ctx: &Context, client: &Client) -> Result<StatusReport> {
    ctx.ledger.ensure_exists(client).await?;
    let shape = StoreShape::inspect(client, &ctx.manifest.store)
        .await
        .map_err(|p| ctx.manifest.error(p))?;
    let rows = ctx.ledger.rows(client).await?;
    let (head_pos, head_time) = match shape.visible_head(client).await? {
        Some((p, t)) => (p.id, t),
        None => (0, None),
    };
    let holding = holders(client, &shape).await?;
    let now = Utc::now();

    let in_manifest: HashSet<&str> = ctx
        .manifest
        .projectors
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let mut projectors = Vec::new();
    for p in &ctx.manifest.projectors {
        match rows.iter().find(|r| r.name == p.name) {
            Some(_) => {}
            None => projectors.push(ProjectorStatus {
                name: p.name.clone(),
                mode: p.mode.as_str().into(),
                state: ShownState::New,
                position: None,
                lag: None,
                behind_seconds: None,
                updated_at: None,
                error: None,
                error_position: None,
                error_type: None,
                missing_since: None,
                waiting_for: Vec::new(),
                version: None,
                side_effects: p.side_effects,
                tables: p.tables.clone(),
                events_processed: 0,
            }),
        }
    }
    for r in &rows {
        let orphaned = !in_manifest.contains(r.name.as_str()) && r.state != State::Retired;
        let pos = r.position.id;
        let caught_up = pos >= head_pos;
        let behind = match (head_time, r.event_time) {
            _ if caught_up => Some(0.0),
            (Some(h), Some(e)) => Some(((h - e).num_milliseconds() as f64 / 1000.0).max(0.0)),
            (Some(_), None) => None,
            _ => None,
        };
        let waiting_for = ctx
            .manifest
            .projector(&r.name)
            .map(|p| {
                p.after
                    .iter()
                    .filter(|d| {
                        rows.iter().any(|o| {
                            &o.name == *d && o.position.id <= pos && o.position.id < head_pos
                        })
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        projectors.push(ProjectorStatus {
            name: r.name.clone(),
            mode: r.mode.clone(),
            state: if orphaned {
                ShownState::Orphaned
            } else {
                ShownState::Ledger(r.state)
            },
            position: Some(pos),
            lag: if orphaned || r.state == State::Retired {
                None
            } else {
                Some((head_pos - pos).max(0))
            },
            behind_seconds: if orphaned || r.state == State::Retired {
                None
            } else {
                behind
            },
            updated_at: Some(r.updated_at),
            error: r.error.clone(),
            error_position: r.error_position,
            error_type: r.error_type.clone(),
            missing_since: r.missing_since,
            waiting_for,
            version: Some(r.version),
            side_effects: r.side_effects,
            tables: r.tables.clone(),
            events_processed: r.events_processed,
        });
    }
    // Manifest order first, then the ledger's others by name.
    let order: Vec<&str> = ctx
        .manifest
        .projectors
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    projectors.sort_by_key(|p| {
        (
            order
                .iter()
                .position(|n| *n == p.name)
                .unwrap_or(usize::MAX),
            p.name.clone(),
        )
    });
    Ok(StatusReport {
        head: Head {
            position: head_pos,
            time: head_time,
        },
        holding,
        projectors,
        time: now,
    })
}

/// Transactions that hold the head back: with a transaction column, the
/// oldest transactions with an xid; without, writers on the events table.
/// Only those running for more than a second are worth a line.
async fn holders(client: &Client, shape: &StoreShape) -> Result<Vec<Holder>> {
    let sql = if shape.transaction.is_some() {
        "SELECT pid, extract(epoch FROM clock_timestamp() - xact_start)::float8, application_name, state \
         FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
           AND datname = current_database() \
           AND xact_start < clock_timestamp() - interval '1 second' \
         ORDER BY xact_start LIMIT 3"
            .to_string()
    } else {
        "SELECT a.pid, extract(epoch FROM clock_timestamp() - a.xact_start)::float8, a.application_name, a.state \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'relation' AND l.relation = $1::text::regclass AND l.mode = 'RowExclusiveLock' \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND a.pid <> pg_backend_pid() AND a.xact_start < clock_timestamp() - interval '1 second' \
         ORDER BY a.xact_start LIMIT 3"
            .to_string()
    };
    let rows = if shape.transaction.is_some() {
        client.query(&sql, &[]).await?
    } else {
        client.query(&sql, &[&shape.regclass]).await?
    };
    Ok(rows
        .into_iter()
        .map(|r| Holder {
            pid: r.get(0),
            seconds: r.get::<_, Option<f64>>(1).unwrap_or(0.0),
            application: r.get::<_, Option<String>>(2).unwrap_or_default(),
            state: r.get::<_, Option<String>>(3).unwrap_or_default(),
        })
        .collect())
}

/// One projector in detail: its failures and the holes passed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Detail {
    pub failures: Vec<FailureRow>,
    pub holes: Vec<(i64, i64, DateTime<Utc>)>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct FailureRow {
    pub position: i64,
    pub event_type: Option<String>,
    pub error: String,
    pub run: String,
    pub dead_letter: bool,
    pub at: DateTime<Utc>,
}

pub async fn detail(ctx: &Context, client: &Client, name: &str) -> Result<Detail> {
    let failures = client
        .query(
            &format!(
                "SELECT position, type, error, run, dead_letter, at FROM {} WHERE projector = $1 ORDER BY at DESC, id DESC LIMIT 10",
                ctx.ledger.table("failures")
            ),
            &[&name],
        )
        .await?
        .into_iter()
        .map(|r| FailureRow {
            position: r.get(0),
            event_type: r.get(1),
            error: r.get(2),
            run: r.get(3),
            dead_letter: r.get(4),
            at: r.get(5),
        })
        .collect();
    let holes = client
        .query(
            &format!(
                "SELECT first_position, last_position, passed_at FROM {} ORDER BY first_position DESC LIMIT 10",
                ctx.ledger.table("holes")
            ),
            &[],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok(Detail { failures, holes })
}
