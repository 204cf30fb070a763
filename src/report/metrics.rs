//! Prometheus metrics of `play` (`--metrics ADDR`): per projector its
//! position, lag in events and seconds, events processed, failures and state;
//! per runner whether it reaches the database and how many projectors it owns.

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

use crate::ledger::{LateEvent, LedgerRow};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectorLabel {
    projector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    projector: String,
    state: String,
}

const STATES: [&str; 6] = [
    "booting", "live", "finished", "broken", "stalled", "retired",
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
    let app = axum::Router::new().route(
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
    );
    tracing::info!("metrics on http://{addr}/metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("serving metrics")
}
