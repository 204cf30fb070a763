//! Prometheus metrics of `play` (`--metrics ADDR`): per projector its
//! position, lag in events and seconds, events processed, failures, state,
//! late events, dead letters waiting, holes passed and the progress of a
//! build beside it; per runner whether it reaches the database and how many
//! projectors it owns. `/healthz` answers 200 while the runner reaches the
//! database, 503 otherwise. `deploy/grafana/projectionist.json` is a
//! dashboard over exactly these names.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::ledger::{Kind, LateEvent, LedgerRow, VersionRow};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectorLabel {
    projector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    projector: String,
    state: String,
}

const STATES: [&str; 7] = [
    "booting", "live", "finished", "broken", "stalled", "retired", "paused",
];

pub struct Metrics {
    registry: Registry,
    position: Family<ProjectorLabel, Gauge>,
    lag_events: Family<ProjectorLabel, Gauge>,
    lag_seconds: Family<ProjectorLabel, Gauge<f64, AtomicU64>>,
    processed: Family<ProjectorLabel, Counter>,
    failures: Family<ProjectorLabel, Counter>,
    state: Family<StateLabel, Gauge>,
    late: Family<ProjectorLabel, Gauge>,
    dead_letters: Family<ProjectorLabel, Gauge>,
    holes: Family<ProjectorLabel, Gauge>,
    build_position: Family<ProjectorLabel, Gauge>,
    build_lag: Family<ProjectorLabel, Gauge>,
    up: Gauge,
    owned: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("projectionist");
        let m = Metrics {
            registry: Registry::default(),
            position: Family::default(),
            lag_events: Family::default(),
            lag_seconds: Family::default(),
            processed: Family::default(),
            failures: Family::default(),
            state: Family::default(),
            late: Family::default(),
            dead_letters: Family::default(),
            holes: Family::default(),
            build_position: Family::default(),
            build_lag: Family::default(),
            up: Gauge::default(),
            owned: Gauge::default(),
        };
        registry.register(
            "position",
            "Last event position whose effect is committed",
            m.position.clone(),
        );
        registry.register(
            "lag_events",
            "Events (positions) between the head and the projector",
            m.lag_events.clone(),
        );
        registry.register(
            "lag_seconds",
            "Time between the head's newest event and the projector's last processed one",
            m.lag_seconds.clone(),
        );
        registry.register(
            "events_processed",
            "Events handled by this runner",
            m.processed.clone(),
        );
        registry.register(
            "failures",
            "Handler failures seen by this runner",
            m.failures.clone(),
        );
        registry.register(
            "state",
            "1 for the projector's current state",
            m.state.clone(),
        );
        registry.register(
            "late_events",
            "Events that appeared inside holes the projector had already passed (not applied: reset it)",
            m.late.clone(),
        );
        registry.register(
            "dead_letters",
            "Events skipped by on_error = \"skip\" and waiting for `projectionist retry`",
            m.dead_letters.clone(),
        );
        registry.register(
            "holes_passed",
            "Holes in the positions the projector's live version passed (rolled-back inserts)",
            m.holes.clone(),
        );
        registry.register(
            "build_position",
            "Position of the version being built beside the live one (0: none)",
            m.build_position.clone(),
        );
        registry.register(
            "build_lag_events",
            "Events between the head and the version being built beside the live one (0: none)",
            m.build_lag.clone(),
        );
        registry.register(
            "up",
            "1 when this runner reaches the database",
            m.up.clone(),
        );
        registry.register(
            "owned_projectors",
            "Projectors this runner plays",
            m.owned.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Updates the per-projector gauges from the ledger and the head.
    pub fn observe(&self, rows: &[LedgerRow], head: i64, head_time: Option<DateTime<Utc>>) {
        for r in rows {
            let l = ProjectorLabel {
                projector: r.name.clone(),
            };
            self.position.get_or_create(&l).set(r.position.id);
            self.lag_events
                .get_or_create(&l)
                .set((head - r.position.id).max(0));
            let behind = match (head_time, r.event_time) {
                _ if r.position.id >= head => 0.0,
                (Some(h), Some(e)) => ((h - e).num_milliseconds() as f64 / 1000.0).max(0.0),
                _ => 0.0,
            };
            self.lag_seconds.get_or_create(&l).set(behind);
            for s in STATES {
                self.state
                    .get_or_create(&StateLabel {
                        projector: r.name.clone(),
                        state: s.into(),
                    })
                    .set(i64::from(r.state.as_str() == s));
            }
        }
    }

    /// Sets each projector's count of late events.
    pub fn late_events(&self, rows: &[LedgerRow], late: &[LateEvent]) {
        for r in rows {
            let n = late.iter().filter(|l| l.projector == r.name).count();
            self.late
                .get_or_create(&ProjectorLabel {
                    projector: r.name.clone(),
                })
                .set(n as i64);
        }
    }

    /// Sets each projector's dead letters waiting, holes passed and build
    /// progress (0 when it has none).
    pub fn ledger_counts(
        &self,
        rows: &[LedgerRow],
        dead_letters: &[(String, i64)],
        holes: &[(String, i64)],
        versions: &[VersionRow],
        head: i64,
    ) {
        let of = |list: &[(String, i64)], name: &str| {
            list.iter()
                .find(|(n, _)| n == name)
                .map(|x| x.1)
                .unwrap_or(0)
        };
        for r in rows {
            let l = ProjectorLabel {
                projector: r.name.clone(),
            };
            self.dead_letters
                .get_or_create(&l)
                .set(of(dead_letters, &r.name));
            self.holes.get_or_create(&l).set(of(holes, &r.name));
            let build = versions
                .iter()
                .find(|v| v.projector == r.name && v.kind == Kind::Build);
            self.build_position
                .get_or_create(&l)
                .set(build.map(|b| b.position.id).unwrap_or(0));
            self.build_lag
                .get_or_create(&l)
                .set(build.map(|b| (head - b.position.id).max(0)).unwrap_or(0));
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.get() == 1
    }

    pub fn processed(&self, name: &str, n: i64) {
        self.processed
            .get_or_create(&ProjectorLabel {
                projector: name.into(),
            })
            .inc_by(n.max(0) as u64);
    }

    pub fn failed(&self, name: &str) {
        self.failures
            .get_or_create(&ProjectorLabel {
                projector: name.into(),
            })
            .inc();
    }

    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    pub fn set_owned(&self, n: usize) {
        self.owned.set(n as i64);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding to a String");
        out
    }
}

/// Binds `addr` for [`serve`], so a taken port fails at once.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} for --metrics"))
}

/// Serves `GET /metrics` on the bound listener until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    let addr = listener.local_addr()?;
    let health = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            axum::routing::get(move || {
                let up = health.is_up();
                async move {
                    if up {
                        (axum::http::StatusCode::OK, "ok\n")
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "the database cannot be reached\n",
                        )
                    }
                }
            }),
        );
    tracing::info!("metrics on http://{addr}/metrics, health on http://{addr}/healthz");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("serving metrics")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric name the Grafana dashboard queries is one play exports.
    #[test]
    fn the_dashboard_queries_only_exported_metrics() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../deploy/grafana/projectionist.json")).unwrap();
        let mut exprs = Vec::new();
        collect_exprs(&dashboard, &mut exprs);
        assert!(exprs.len() >= 8, "{exprs:?}");
        let m = Metrics::new();
        let row = LedgerRow {
            events_processed: 7,
            ..LedgerRow::sample("p", crate::ledger::State::Live, 1, 7)
        };
        let rows = [row];
        m.observe(&rows, 10, None);
        m.late_events(&rows, &[]);
        m.ledger_counts(&rows, &[], &[], &[], 10);
        m.processed("p", 1);
        m.failed("p");
        m.set_up(true);
        m.set_owned(1);
        let exported = m.encode();
        let mut queried = Vec::new();
        for e in &exprs {
            let mut rest = e.as_str();
            while let Some(at) = rest.find("projectionist_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                queried.push(name);
            }
        }
        assert!(!queried.is_empty());
        for name in queried {
            assert!(
                exported.contains(&format!("# TYPE {name} "))
                    || exported.contains(&format!("\n{name}{{"))
                    || exported.contains(&format!("\n{name} ")),
                "the dashboard queries {name}, which play does not export:\n{exported}"
            );
        }
    }

    fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => collect_exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, out)),
            _ => {}
        }
    }
}
