//! Boot's results: a table (or JSON) on stdout, and the failure report on
//! stderr, with a GitHub Actions annotation when running there.

use comfy_table::{Table, presets::NOTHING};

use crate::engine::boot::BootReport;
use crate::failure::Origin;
use crate::ledger::State;

/// The summary table of a boot, for stdout.
pub fn table(report: &BootReport) -> String {
    let mut t = Table::new();
    t.load_style(NOTHING);
    t.set_header(vec![
        "PROJECTOR",
        "ACTION",
        "STATE",
        "POSITION",
        "EVENTS",
        "TIME",
    ]);
    for p in &report.projectors {
        t.add_row(vec![
            p.name.clone(),
            p.action.as_str().to_string(),
            p.state.as_str().to_string(),
            p.position.to_string(),
            p.events.to_string(),
            format!("{:.1}s", p.seconds),
        ]);
    }
    t.to_string()
}

/// The error report of a failed boot: projector, event, database error, what next.
pub fn failure(report: &BootReport) -> Option<String> {
    let b = report.broken.as_ref()?;
    let f = &b.failure;
    let mut s = format!(
        "error: projector `{}` broke at event #{} ({}{})\n  {}",
        b.projector,
        f.position,
        f.event_type,
        f.stream
            .as_ref()
            .map(|s| format!(", stream {s}"))
            .unwrap_or_default(),
        f.message
    );
    if let Some(d) = &f.detail {
        s.push_str(&format!("\n  detail: {d}"));
    }
    if let Some(h) = &f.hint {
        s.push_str(&format!("\n  hint: {h}"));
    }
    if let Some(c) = &f.context {
        s.push_str(&format!("\n  where: {}", c.replace('\n', "\n    ")));
    }
    if !f.sqlstate.is_empty() {
        s.push_str(&format!("\n  sqlstate: {}", f.sqlstate));
    }
    let stalled: Vec<String> = report
        .projectors
        .iter()
        .filter(|p| p.state == State::Stalled)
        .map(|p| format!("{} at {}", p.name, p.position))
        .collect();
    if !stalled.is_empty() {
        s.push_str(&format!("\n  stalled: {}", stalled.join(", ")));
    }
    if let Some(a) = &report.alert_error {
        s.push_str(&format!("\nwarning: {a}"));
    }
    let what = match f.origin {
        Origin::Command => format!(
            "the command of `{}` (or the event it trips on)",
            b.projector
        ),
        Origin::Event => format!(
            "the event at #{} (its payload or metadata, or the [store] expression that reads it)",
            f.position
        ),
        Origin::Handler => format!(
            "the handler of `{}` for {} in the manifest (or the data it trips on)",
            b.projector, f.event_type
        ),
    };
    s.push_str(&format!(
        "\n\nnext: fix {what}, then run `projectionist boot` again:\n      broken and stalled projectors resume from their positions."
    ));
    Some(s)
}

/// The warning about late events found after a boot.
pub fn late_events(report: &BootReport) -> Option<String> {
    if report.late_events.is_empty() {
        return None;
    }
    Some(format!(
        "warning: {} late event(s) appeared inside holes already passed and were not applied ({}).\n  \
         reset the projectors named to apply them; a [store] transaction column prevents this",
        report.late_events.len(),
        crate::engine::late::describe(&report.late_events)
    ))
}

/// `::error` workflow command for GitHub Actions.
pub fn github_annotation(report: &BootReport) -> Option<String> {
    let b = report.broken.as_ref()?;
    let text = format!(
        "projector {} broke at event #{} ({}): {}",
        b.projector, b.failure.position, b.failure.event_type, b.failure.message
    );
    // Workflow commands escape %, CR and LF.
    let text = text
        .replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A");
    Some(format!("::error title=projectionist boot::{text}"))
}
