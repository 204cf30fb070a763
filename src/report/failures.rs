//! `failures`' table: every recorded failure and dead letter.

use chrono::Utc;
use comfy_table::{Table, presets::NOTHING};

use crate::engine::retry::Retried;
use crate::ledger::FailureRecord;

/// The failures, one row each.
pub fn table(failures: &[FailureRecord]) -> String {
    if failures.is_empty() {
        return "no failures recorded".into();
    }
    let now = Utc::now();
    let mut t = Table::new();
    t.load_style(NOTHING);
    t.set_header(vec![
        "PROJECTOR",
        "POSITION",
        "TYPE",
        "STREAM",
        "RUN",
        "WHEN",
        "DEAD LETTER",
        "ERROR",
    ]);
    for f in failures {
        let when = crate::report::status::duration((now - f.at).num_milliseconds() as f64 / 1000.0);
        t.add_row(vec![
            f.projector.clone(),
            f.position.to_string(),
            f.event_type.clone().unwrap_or_default(),
            f.stream.clone().unwrap_or_default(),
            f.run.clone(),
            format!("{when} ago"),
            match (f.dead_letter, f.resolved_at) {
                (false, _) => "-".into(),
                (true, None) => "waiting".into(),
                (true, Some(_)) if f.resolved_by.as_deref() == Some("rebuild") => "rebuilt".into(),
                (true, Some(_)) => "resolved".into(),
            },
            f.error.lines().next().unwrap_or_default().to_string(),
        ]);
    }
    t.to_string()
}

/// What `retry` did, one row per dead letter.
pub fn retried(projector: &str, retried: &[Retried]) -> String {
    if retried.is_empty() {
        return format!("no dead letters of `{projector}` are waiting");
    }
    let mut t = Table::new();
    t.load_style(NOTHING);
    t.set_header(vec!["PROJECTOR", "POSITION", "TYPE", "RESULT", "ERROR"]);
    for r in retried {
        t.add_row(vec![
            projector.to_string(),
            r.position.to_string(),
            r.event_type.clone().unwrap_or_default(),
            if r.ok {
                "applied".into()
            } else {
                "failed again".into()
            },
            r.error
                .as_deref()
                .and_then(|e| e.lines().next())
                .unwrap_or_default()
                .to_string(),
        ]);
    }
    t.to_string()
}
