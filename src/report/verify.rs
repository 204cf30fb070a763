//! `verify`'s table: each check, OK or MISMATCH, with both values.

use comfy_table::{Table, presets::NOTHING};

use crate::engine::verify::CheckResult;

fn shown(rows: &[String]) -> String {
    let mut s = rows.iter().take(3).cloned().collect::<Vec<_>>().join(" ");
    if rows.len() > 3 {
        s.push_str(&format!(" … ({} rows)", rows.len()));
    }
    if rows.is_empty() {
        s.push_str("(no rows)");
    }
    s
}

pub fn table(results: &[CheckResult]) -> String {
    let mut t = Table::new();
    t.load_style(NOTHING);
    t.set_header(vec!["PROJECTOR", "CHECK", "RESULT", "PROJECTION", "EVENTS"]);
    for r in results {
        t.add_row(vec![
            r.projector.clone(),
            r.check.clone(),
            r.result.as_str().to_string(),
            shown(&r.projection),
            shown(&r.events),
        ]);
    }
    if results.is_empty() {
        return "no checks: add [[projectors.NAME.check]] sections to the manifest".into();
    }
    t.to_string()
}
