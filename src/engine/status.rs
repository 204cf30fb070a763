//! `status`: where every projector stands. A handful of queries whatever the
//! number of projectors: the ledger, the head of the store (by its index,
//! never a scan), the transactions holding the head back, and the late
//! events (one indexed lookup per passed hole). Lag is counted in positions,
//! so it costs nothing on a store of any size.

use std::collections::HashSet;

use anyhow::Result;
use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use crate::engine::Context;
use crate::ledger::{FailureRow, HoleRow, Kind, LateEvent, LedgerRow, State, VersionRow};
use crate::manifest::Projector;
use crate::store::{Holder, StoreShape};

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
    /// Events that appeared inside holes it had passed: never applied.
    pub late_events: Vec<LateEvent>,
    /// A new version being built beside the live one.
    pub build: Option<BuildStatus>,
    /// Previous versions kept for `rollback` (until `prune`).
    pub kept_versions: Vec<i32>,
    /// Events skipped by `on_error = "skip"`, waiting for `retry`.
    pub dead_letters: i64,
    /// A partitioned projector's parts (its position is the lowest); empty
    /// when it is not partitioned.
    pub partitions: Vec<PartStatus>,
}

/// One part of a partitioned projector.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PartStatus {
    pub partition: i32,
    pub position: i64,
    pub lag: i64,
    pub events_processed: i64,
}

/// A version being built beside the live one.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BuildStatus {
    pub version: i32,
    /// booting, built (waiting to be swapped in), broken or stalled.
    pub state: String,
    pub position: i64,
    pub lag: i64,
    /// At the build's pace so far.
    pub eta_seconds: Option<f64>,
    pub error: Option<String>,
}

impl BuildStatus {
    fn of(v: &VersionRow, head: i64, now: DateTime<Utc>) -> BuildStatus {
        let done = (v.position.id - v.start_position) as f64;
        let secs = (now - v.started_at).num_milliseconds() as f64 / 1000.0;
        let lag = (head - v.position.id).max(0);
        BuildStatus {
            version: v.version,
            state: v.state.clone(),
            position: v.position.id,
            lag,
            eta_seconds: (done > 0.0 && secs > 0.0).then(|| lag as f64 / (done / secs)),
            error: v.error.clone(),
        }
    }
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

impl ProjectorStatus {
    /// Why this projector makes status exit 1, if it does.
    pub fn unhealthy(&self, max_lag: Option<MaxLag>) -> Option<String> {
        if self.state.is_unhealthy() {
            return Some(format!("{} is {}", self.name, self.state.as_str()));
        }
        if !self.late_events.is_empty() {
            return Some(format!(
                "{} missed {} late event(s) (reset it to apply them)",
                self.name,
                self.late_events.len()
            ));
        }
        if !matches!(self.state, ShownState::Ledger(State::Live | State::Booting)) {
            return None;
        }
        match max_lag {
            Some(MaxLag::Events(n)) if self.lag.unwrap_or(0) > n => Some(format!(
                "{} lags {} events (max {n})",
                self.name,
                self.lag.unwrap_or(0)
            )),
            Some(MaxLag::Seconds(s)) if self.behind_seconds.unwrap_or(0.0) > s => Some(format!(
                "{} is {:.0}s behind (max {s:.0}s)",
                self.name,
                self.behind_seconds.unwrap_or(0.0)
            )),
            _ => None,
        }
    }

    /// A projector with nothing known of it but its name, mode and state.
    pub(crate) fn blank(name: &str, mode: &str, state: ShownState) -> ProjectorStatus {
        ProjectorStatus {
            name: name.into(),
            mode: mode.into(),
            state,
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
            side_effects: false,
            tables: Vec::new(),
            events_processed: 0,
            late_events: Vec::new(),
            build: None,
            kept_versions: Vec::new(),
            dead_letters: 0,
            partitions: Vec::new(),
        }
    }

    fn new_in_manifest(p: &Projector) -> ProjectorStatus {
        ProjectorStatus {
            side_effects: p.side_effects,
            tables: p.tables.clone(),
            ..ProjectorStatus::blank(&p.name, p.mode.as_str(), ShownState::New)
        }
    }
}

impl StatusReport {
    /// Projectors over the limit, broken, stalled or with late events: what
    /// makes status exit 1.
    pub fn unhealthy(&self, max_lag: Option<MaxLag>) -> Vec<String> {
        self.projectors
            .iter()
            .filter_map(|p| p.unhealthy(max_lag))
            .collect()
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
    let holding = crate::store::reader::holders(&shape, client).await?;
    let late = crate::engine::late::find(ctx, &shape, client, &[]).await?;
    let versions = ctx.ledger.versions(client).await?;
    let dead_letters = ctx.ledger.dead_letters_waiting(client).await?;
    let parts = ctx.ledger.live_parts(client).await?;
    let now = Utc::now();
    let head = Head {
        position: head_pos,
        time: head_time,
    };
    let mut projectors: Vec<ProjectorStatus> = ctx
        .manifest
        .projectors
        .iter()
        .filter(|p| !rows.iter().any(|r| r.name == p.name))
        .map(ProjectorStatus::new_in_manifest)
        .collect();
    let in_manifest: HashSet<&str> = ctx
        .manifest
        .projectors
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    for r in &rows {
        let orphaned = !in_manifest.contains(r.name.as_str()) && r.state != State::Retired;
        let mut s = from_row(ctx, r, &rows, &head, orphaned);
        s.late_events = late
            .iter()
            .filter(|l| l.projector == r.name)
            .cloned()
            .collect();
        s.dead_letters = dead_letters
            .iter()
            .find(|(n, _)| *n == r.name)
            .map(|d| d.1)
            .unwrap_or(0);
        if let Some((_, own)) = parts.iter().find(|(n, _)| *n == r.name) {
            s.partitions = own
                .iter()
                .map(|x| PartStatus {
                    partition: x.partition,
                    position: x.position.id,
                    lag: (head_pos - x.position.id).max(0),
                    events_processed: x.events_processed,
                })
                .collect();
        }
        for v in versions.iter().filter(|v| v.projector == r.name) {
            match v.kind {
                Kind::Build => s.build = Some(BuildStatus::of(v, head_pos, now)),
                Kind::Previous => s.kept_versions.push(v.version),
            }
        }
        projectors.push(s);
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
        head,
        holding,
        projectors,
        time: now,
    })
}

/// A projector with a ledger row, as status shows it.
fn from_row(
    ctx: &Context,
    r: &LedgerRow,
    rows: &[LedgerRow],
    head: &Head,
    orphaned: bool,
) -> ProjectorStatus {
    let pos = r.position.id;
    let behind = match (head.time, r.event_time) {
        _ if pos >= head.position => Some(0.0),
        (Some(h), Some(e)) => Some(((h - e).num_milliseconds() as f64 / 1000.0).max(0.0)),
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
                        &o.name == *d && o.position.id <= pos && o.position.id < head.position
                    })
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let gone = orphaned || r.state == State::Retired;
    ProjectorStatus {
        name: r.name.clone(),
        mode: r.mode.as_str().into(),
        state: if orphaned {
            ShownState::Orphaned
        } else {
            ShownState::Ledger(r.state)
        },
        position: Some(pos),
        lag: (!gone).then(|| (head.position - pos).max(0)),
        behind_seconds: if gone { None } else { behind },
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
        late_events: Vec::new(),
        build: None,
        kept_versions: Vec::new(),
        dead_letters: 0,
        partitions: Vec::new(),
    }
}

/// One projector in detail: its failures and the holes it passed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Detail {
    pub failures: Vec<FailureRow>,
    pub holes: Vec<HoleRow>,
}

pub async fn detail(ctx: &Context, client: &Client, name: &str) -> Result<Detail> {
    Ok(Detail {
        failures: ctx.ledger.failures(client, name).await?,
        holes: ctx.ledger.holes(client, name).await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(state: ShownState, lag: i64, behind: f64) -> ProjectorStatus {
        ProjectorStatus {
            position: Some(10),
            lag: Some(lag),
            behind_seconds: Some(behind),
            version: Some(1),
            ..ProjectorStatus::blank("p", "from_beginning", state)
        }
    }

    #[test]
    fn health_broken_stalled_late_and_lag() {
        let live = ShownState::Ledger(State::Live);
        assert!(shown(live, 0, 0.0).unhealthy(None).is_none());
        assert!(
            shown(ShownState::Ledger(State::Broken), 0, 0.0)
                .unhealthy(None)
                .is_some()
        );
        assert!(
            shown(ShownState::Ledger(State::Stalled), 0, 0.0)
                .unhealthy(None)
                .is_some()
        );
        assert!(shown(ShownState::New, 0, 0.0).unhealthy(None).is_none());
        let mut late = shown(live, 0, 0.0);
        late.late_events.push(LateEvent {
            projector: "p".into(),
            position: 3,
            event_type: Some("A".into()),
        });
        assert!(late.unhealthy(None).unwrap().contains("late event"));
        assert!(
            shown(live, 101, 0.0)
                .unhealthy(Some(MaxLag::Events(100)))
                .is_some()
        );
        assert!(
            shown(live, 100, 0.0)
                .unhealthy(Some(MaxLag::Events(100)))
                .is_none()
        );
        assert!(
            shown(live, 1, 31.0)
                .unhealthy(Some(MaxLag::Seconds(30.0)))
                .is_some()
        );
        // An orphan is never over the lag limit.
        assert!(
            shown(ShownState::Orphaned, 1000, 1000.0)
                .unhealthy(Some(MaxLag::Events(1)))
                .is_none()
        );
    }

    #[test]
    fn max_lag_parses_events_and_durations() {
        assert_eq!("100".parse::<MaxLag>(), Ok(MaxLag::Events(100)));
        assert_eq!("30s".parse::<MaxLag>(), Ok(MaxLag::Seconds(30.0)));
        assert!("-1".parse::<MaxLag>().is_err());
        assert!("soon".parse::<MaxLag>().is_err());
    }
}
