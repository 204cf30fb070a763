//! `status` for people: the projector table with its footer, and one
//! projector in detail. Terminal width is respected on a terminal; piped
//! output is plain and never wrapped.

use std::io::IsTerminal;

use chrono::{DateTime, Utc};
use comfy_table::{Cell, Color, ContentArrangement, Table, presets::NOTHING};

use crate::engine::status::{Detail, ProjectorStatus, ShownState, StatusReport};
use crate::ledger::State;

/// `42s`, `5m`, `3h 2m`, `3d 2h`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn ago(then: DateTime<Utc>, now: DateTime<Utc>) -> String {
    format!(
        "{} ago",
        duration((now - then).num_milliseconds() as f64 / 1000.0)
    )
}

fn new_table() -> Table {
    let mut t = Table::new();
    t.load_style(NOTHING);
    if std::io::stdout().is_terminal() {
        t.set_content_arrangement(ContentArrangement::Dynamic);
        if std::env::var_os("NO_COLOR").is_some() {
            t.force_no_tty();
        }
    } else {
        t.set_content_arrangement(ContentArrangement::Disabled);
        t.force_no_tty();
    }
    t
}

fn error_text(p: &ProjectorStatus, now: DateTime<Utc>, verbose: bool) -> String {
    if p.state == ShownState::Orphaned {
        return match p.missing_since {
            Some(t) => format!("removed from manifest {}", ago(t, now)),
            None => "not in the manifest".into(),
        };
    }
    if !p.late_events.is_empty() {
        let first = &p.late_events[0];
        return format!(
            "{} late event(s) not applied (#{} {}…): reset it",
            p.late_events.len(),
            first.position,
            first.event_type.as_deref().unwrap_or("?")
        );
    }
    if let Some(b) = &p.build
        && p.error.is_none()
    {
        return match (&b.error, b.state.as_str()) {
            (Some(e), _) => format!(
                "build v{} broken: {}",
                b.version,
                e.lines().next().unwrap_or("")
            ),
            (None, "built") => format!("v{} built, waiting to be swapped in", b.version),
            (None, state) => format!(
                "building v{} ({state}): position {}, lag {}{}",
                b.version,
                b.position,
                b.lag,
                b.eta_seconds
                    .map(|s| format!(", ETA {}", duration(s)))
                    .unwrap_or_default()
            ),
        };
    }
    if !p.waiting_for.is_empty() && p.state == ShownState::Ledger(State::Live) {
        return format!("waits for {}", p.waiting_for.join(", "));
    }
    if p.error.is_none() && p.dead_letters > 0 {
        return format!(
            "{} dead letter(s) waiting: projectionist retry {}",
            p.dead_letters, p.name
        );
    }
    let Some(e) = &p.error else {
        return String::new();
    };
    let first = e.lines().next().unwrap_or("");
    let text = match (p.error_position, &p.error_type) {
        (Some(pos), Some(t)) => format!("#{pos} {t}: {first}"),
        _ => first.to_string(),
    };
    if verbose || text.chars().count() <= 60 {
        if verbose {
            format!("{}{}", text, &e[first.len()..])
        } else {
            text
        }
    } else {
        format!("{}…", text.chars().take(59).collect::<String>())
    }
}

/// The status table and its footer.
pub fn table(report: &StatusReport, verbose: bool) -> String {
    let mut t = new_table();
    t.set_header(vec![
        "PROJECTOR",
        "MODE",
        "STATE",
        "POSITION",
        "LAG",
        "BEHIND",
        "UPDATED",
        "ERROR",
    ]);
    let now = report.time;
    for p in &report.projectors {
        let state = Cell::new(p.state.as_str()).fg(match p.state {
            ShownState::Ledger(State::Live | State::Finished) => Color::Green,
            ShownState::Ledger(State::Broken) => Color::Red,
            ShownState::Ledger(State::Stalled | State::Booting | State::Paused)
            | ShownState::Orphaned => Color::Yellow,
            _ => Color::Reset,
        });
        t.add_row(vec![
            Cell::new(&p.name),
            Cell::new(&p.mode),
            state,
            Cell::new(
                p.position
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| "-".into()),
            ),
            Cell::new(p.lag.map(|x| x.to_string()).unwrap_or_else(|| "-".into())),
            Cell::new(p.behind_seconds.map(duration).unwrap_or_else(|| "-".into())),
            Cell::new(
                p.updated_at
                    .map(|u| ago(u, now))
                    .unwrap_or_else(|| "-".into()),
            ),
            Cell::new(error_text(p, now, verbose)),
        ]);
    }
    let mut out = t.to_string();
    out.push_str(&format!(
        "\n\nhead: position {}{}",
        report.head.position,
        report
            .head
            .time
            .map(|h| format!(
                " at {} ({})",
                h.format("%Y-%m-%d %H:%M:%S UTC"),
                ago(h, now)
            ))
            .unwrap_or_default()
    ));
    for h in &report.holding {
        out.push_str(&format!("\nheld back by: {h}"));
    }
    out
}

/// One projector in detail: its ledger row, failures, late events and holes.
pub fn detail(p: &ProjectorStatus, d: &Detail, report: &StatusReport) -> String {
    let now = report.time;
    let mut out = String::new();
    for (k, v) in fields(p, report) {
        out.push_str(&format!("{k:<14}{v}\n"));
    }
    out.push_str("\nlast failures:\n");
    if d.failures.is_empty() {
        out.push_str("  none\n");
    } else {
        let mut t = new_table();
        t.set_header(vec!["POSITION", "TYPE", "RUN", "WHEN", "ERROR"]);
        for f in &d.failures {
            t.add_row(vec![
                f.position.to_string(),
                f.event_type.clone().unwrap_or_default(),
                if f.dead_letter {
                    format!("{} (skipped)", f.run)
                } else {
                    f.run.clone()
                },
                ago(f.at, now),
                f.error.clone(),
            ]);
        }
        out.push_str(&t.to_string());
        out.push('\n');
    }
    if !p.late_events.is_empty() {
        out.push_str(&format!(
            "\nlate events (appeared inside holes it had passed; not applied: `projectionist reset {}` applies them):\n",
            p.name
        ));
        for l in &p.late_events {
            out.push_str(&format!(
                "  #{} {}\n",
                l.position,
                l.event_type.as_deref().unwrap_or("?")
            ));
        }
    }
    out.push_str("\npassed holes in the positions (latest batches):\n");
    if d.holes.is_empty() {
        out.push_str("  none\n");
    }
    for h in &d.holes {
        out.push_str(&format!(
            "  {} hole(s) in {}..={}, passed {}\n",
            h.holes,
            h.first_position,
            h.last_position,
            ago(h.passed_at, now)
        ));
    }
    out.trim_end().to_string()
}

/// The ledger row's fields as `status NAME` lists them.
fn fields(p: &ProjectorStatus, report: &StatusReport) -> Vec<(&'static str, String)> {
    let now = report.time;
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let mut out = vec![
        ("projector", p.name.clone()),
        ("mode", p.mode.clone()),
        ("state", p.state.as_str().to_string()),
        ("position", or_dash(p.position.map(|x| x.to_string()))),
        ("head", report.head.position.to_string()),
        ("lag", or_dash(p.lag.map(|x| format!("{x} events")))),
        ("behind", or_dash(p.behind_seconds.map(duration))),
        ("updated", or_dash(p.updated_at.map(|u| ago(u, now)))),
        ("version", or_dash(p.version.map(|v| v.to_string()))),
        (
            "side effects",
            if p.side_effects { "yes" } else { "no" }.to_string(),
        ),
        (
            "tables",
            if p.tables.is_empty() {
                "-".into()
            } else {
                p.tables.join(", ")
            },
        ),
        (
            "processed",
            format!("{} events since its last (re)start", p.events_processed),
        ),
    ];
    if let Some(m) = p.missing_since {
        out.push((
            "missing since",
            format!("{} ({})", m.format("%Y-%m-%d %H:%M:%S UTC"), ago(m, now)),
        ));
    }
    if !p.waiting_for.is_empty() {
        out.push(("waits for", p.waiting_for.join(", ")));
    }
    if let Some(b) = &p.build {
        out.push((
            "building",
            format!(
                "version {} ({}): position {}, lag {} events{}{}",
                b.version,
                b.state,
                b.position,
                b.lag,
                b.eta_seconds
                    .map(|s| format!(", ETA {}", duration(s)))
                    .unwrap_or_default(),
                b.error
                    .as_ref()
                    .map(|e| format!(", broken: {e}"))
                    .unwrap_or_default()
            ),
        ));
    }
    if !p.partitions.is_empty() {
        out.push((
            "partitions",
            p.partitions
                .iter()
                .map(|x| format!("#{} at {} (lag {})", x.partition, x.position, x.lag))
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    if !p.kept_versions.is_empty() {
        out.push((
            "kept versions",
            p.kept_versions
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    if let Some(e) = &p.error {
        out.push((
            "error",
            format!(
                "#{} {}: {}",
                p.error_position.unwrap_or_default(),
                p.error_type.clone().unwrap_or_default(),
                e
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::status::Head;
    use crate::ledger::LateEvent;
    use crate::store::Holder;

    fn projector(name: &str, state: ShownState) -> ProjectorStatus {
        ProjectorStatus {
            position: Some(90),
            lag: Some(10),
            behind_seconds: Some(125.0),
            version: Some(1),
            tables: vec!["band".into()],
            events_processed: 90,
            ..ProjectorStatus::blank(name, "from_beginning", state)
        }
    }

    #[test]
    fn the_table_shows_each_projector_its_error_late_events_and_what_holds_the_head() {
        let mut broken = projector("band", ShownState::Ledger(State::Broken));
        broken.error = Some(format!(
            "null value in column \"lat\" {}\nsecond line",
            "x".repeat(80)
        ));
        broken.error_position = Some(91);
        broken.error_type = Some("BandCreated".into());
        let mut late = projector("event", ShownState::Ledger(State::Live));
        late.late_events.push(LateEvent {
            projector: "event".into(),
            position: 17,
            event_type: Some("EventCreated".into()),
        });
        let report = StatusReport {
            head: Head {
                position: 100,
                time: None,
            },
            holding: vec![Holder {
                pid: None,
                seconds: 300.0,
                application: "app".into(),
                state: "prepared".into(),
                prepared: Some("tx1".into()),
            }],
            projectors: vec![broken, late, projector("new_one", ShownState::New)],
            time: chrono::Utc::now(),
        };
        let text = table(&report, false);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].split_whitespace().eq([
            "PROJECTOR",
            "MODE",
            "STATE",
            "POSITION",
            "LAG",
            "BEHIND",
            "UPDATED",
            "ERROR"
        ]));
        let band = lines
            .iter()
            .find(|l| l.trim_start().starts_with("band"))
            .unwrap();
        assert!(
            band.contains("broken")
                && band.contains("2m")
                && band.contains("#91 BandCreated: null value")
        );
        assert!(
            band.trim_end().ends_with('…'),
            "long errors are cut: {band}"
        );
        let event = lines
            .iter()
            .find(|l| l.trim_start().starts_with("event"))
            .unwrap();
        assert!(
            event.contains("1 late event(s) not applied (#17 EventCreated…): reset it"),
            "{event}"
        );
        assert!(text.contains("head: position 100"));
        assert!(
            text.contains("held back by: prepared transaction 'tx1' (owner app)"),
            "{text}"
        );
        // -v shows the whole error.
        assert!(table(&report, true).contains("second line"));
    }
}
