//! Set-wise application of a partitioned projector's handlers: each handler
//! statement rewritten to apply to many events at once.
//!
//! A partitioned projector's handlers only read and write the state of the
//! event's own stream, so events of different streams commute. A batch is
//! therefore applied in waves: wave k holds the k-th event of each stream in
//! the batch, and each handler statement runs once per wave over all its
//! events of that type, instead of once per event. The batch function fills
//! `pg_temp.projectionist_wave` (one row per event, with the decoded values
//! the projector's handlers read, the others NULL) and runs the statements
//! below with the wave number as `$1`.
//!
//! The rewrites keep the statement's own SQL:
//! - `INSERT … VALUES (row)` selects the row from the wave's events;
//!   `INSERT … SELECT` runs its query laterally per event;
//! - `UPDATE` becomes a `MERGE` whose source is the wave's events: a row
//!   matched by two events is an error (cardinality violation) rather than
//!   one update silently lost, and the batch then runs event by event;
//! - `DELETE` joins the wave's events with `USING` (deleting a row twice is
//!   deleting it once).
//!
//! The events of a wave are in no particular order of position, since the
//! streams of a wave commute. The wave table is filled in the streams' bytewise
//! order, and the statements read it in that order (no sort): a read model
//! keyed by a UUID stream then takes its rows in its index's order, each
//! descent next to the one before (8% off a partitioned boot of the
//! benchmark's store, in time and CPU).
//!
//! Anything else (a `WITH`, `RETURNING`, several `VALUES` rows, `UPDATE …
//! FROM`, a `SELECT` for its side effects) is not rewritten, and the
//! projector runs event by event.

use crate::db::quote_literal;
use crate::manifest::sql_text::{Statement, ValueNames, code_only};

/// The table of a batch's events, numbered by wave.
pub const WAVE_TABLE: &str = "pg_temp.projectionist_wave";

/// Its definition (one per session; emptied at each commit).
/// Its columns are prefixed: a handler's unqualified column names (`id`,
/// `stream`, `time`) must still mean its own tables' columns.
pub const CREATE_WAVE_TABLE: &str = "CREATE TEMP TABLE IF NOT EXISTS projectionist_wave (\n  \
     pj_wave bigint, pj_position bigint, pj_type text, pj_stream text,\n  \
     pj_time timestamptz, pj_data jsonb, pj_metadata jsonb) ON COMMIT DELETE ROWS";

/// The alias of the wave's events in a rewritten statement.
const EVENT: &str = "projectionist_ev";

/// The event's values as columns of the wave table.
struct Columns;

impl ValueNames for Columns {
    fn position(&self) -> &str {
        "projectionist_ev.pj_position"
    }
    fn event_type(&self) -> &str {
        "projectionist_ev.pj_type"
    }
    fn stream(&self) -> &str {
        "projectionist_ev.pj_stream"
    }
    fn time(&self) -> &str {
        "projectionist_ev.pj_time"
    }
    fn data(&self) -> &str {
        "projectionist_ev.pj_data"
    }
    fn metadata(&self) -> &str {
        "projectionist_ev.pj_metadata"
    }
}

/// The statement applied to all events of `event_type` in wave `$1`, or why
/// it cannot be.
pub fn rewrite(statement: &Statement, event_type: &str) -> Result<String, String> {
    // A text that ends in a `--` comment must end its line before more SQL
    // follows; so does each part cut out of it below (none is trimmed).
    let sql = format!("{}\n", statement.render(&Columns).trim_end());
    let sql = sql.as_str();
    let words = top_level_words(sql);
    let word = |i: usize| words.get(i).map(|(_, w)| w.as_str());
    let find = |w: &str, from: usize| {
        words
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, (_, x))| x == w)
            .map(|(i, _)| i)
    };
    if find("returning", 0).is_some() {
        return Err("it has RETURNING".into());
    }
    let wave = format!(
        "{EVENT}.pj_wave = $1 AND {EVENT}.pj_type = {}",
        quote_literal(event_type)
    );
    let events = format!("{WAVE_TABLE} {EVENT}");
    match (word(0), word(1)) {
        (Some("insert"), Some("into")) => {
            let source = words
                .iter()
                .position(|(_, w)| {
                    matches!(
                        w.as_str(),
                        "values" | "select" | "with" | "table" | "default" | "overriding"
                    )
                })
                .ok_or("its INSERT has no VALUES or SELECT")?;
            // The source ends where `ON CONFLICT` starts.
            let conflict = (source..words.len())
                .find(|&i| word(i) == Some("on") && word(i + 1) == Some("conflict"))
                .map(|i| words[i].0);
            let (start, end) = (words[source].0, conflict.unwrap_or(sql.len()));
            let tail = &sql[end..];
            let head = &sql[..start];
            match word(source) {
                Some("values") => {
                    let open = start + "values".len();
                    let open = open + (sql[open..].len() - sql[open..].trim_start().len());
                    let close = matching_paren(sql, open).ok_or("its VALUES is not one row")?;
                    if !code(sql)[close + 1..end].trim().is_empty() {
                        return Err("its VALUES has more than one row".into());
                    }
                    let row = &sql[open + 1..close];
                    Ok(format!(
                        "{head}SELECT {row} FROM {events} WHERE {wave} {tail}"
                    ))
                }
                Some("select") => {
                    let query = &sql[start..end];
                    Ok(format!(
                        "{head}SELECT projectionist_q.* FROM {events} CROSS JOIN LATERAL ({query}) projectionist_q \
                         WHERE {wave} {tail}"
                    ))
                }
                _ => Err("its INSERT's source is neither VALUES nor SELECT".into()),
            }
        }
        (Some("update"), _) => {
            let set = find("set", 1).ok_or("its UPDATE has no SET")?;
            if find("from", set).is_some() {
                return Err("its UPDATE has a FROM list".into());
            }
            let condition = find("where", set);
            if condition.is_some_and(|i| word(i + 1) == Some("current")) {
                return Err("it updates WHERE CURRENT OF a cursor".into());
            }
            let target = &sql[words[0].0 + "update".len()..words[set].0];
            let end = condition.map_or(sql.len(), |i| words[i].0);
            let assignments = &sql[words[set].0 + "set".len()..end];
            let on = condition.map_or("TRUE\n", |i| &sql[words[i].0 + "where".len()..]);
            Ok(format!(
                "MERGE INTO {} USING (SELECT * FROM {events} WHERE {wave}) {EVENT} ON ({on}) \
                 WHEN MATCHED THEN UPDATE SET {assignments}",
                target.trim_start()
            ))
        }
        (Some("delete"), Some("from")) => {
            let using = find("using", 2);
            let condition = find("where", 2);
            if condition.is_some_and(|i| word(i + 1) == Some("current")) {
                return Err("it deletes WHERE CURRENT OF a cursor".into());
            }
            let target_end = using.or(condition).map_or(sql.len(), |i| words[i].0);
            let target = &sql[..target_end];
            let others = using.map(|i| {
                let end = condition.map_or(sql.len(), |c| words[c].0);
                format!(",{}", &sql[words[i].0 + "using".len()..end])
            });
            let filter = condition.map_or(String::new(), |i| {
                format!(" AND ({})", &sql[words[i].0 + "where".len()..])
            });
            Ok(format!(
                "{target} USING {events}{} WHERE {wave}{filter}",
                others.unwrap_or_default()
            ))
        }
        _ => Err("it is not an INSERT, UPDATE or DELETE".into()),
    }
}

/// The words of `sql` outside literals, comments, quoted identifiers and
/// parentheses: (byte offset, lowercased word).
fn top_level_words(sql: &str) -> Vec<(usize, String)> {
    let code = code(sql);
    let bytes = code.as_bytes();
    let mut words = Vec::new();
    let (mut depth, mut i) = (0i32, 0);
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'(' | b'[' => depth += 1,
            b')' | b']' => depth -= 1,
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += 1;
                }
            }
            _ if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'$')
                {
                    i += 1;
                }
                // A word glued to a `.` or digits before it is part of a name.
                let glued = start > 0 && (bytes[start - 1] == b'.' || bytes[start - 1] == b'$');
                if depth == 0 && !glued {
                    words.push((start, code[start..i].to_ascii_lowercase()));
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    words
}

/// `sql` with its literals and comments blanked, byte for byte.
fn code(sql: &str) -> String {
    let mut code = code_only(sql);
    code.push_str(&" ".repeat(sql.len() - code.len()));
    code
}

/// The `)` that closes the `(` at `open`, outside literals and comments.
fn matching_paren(sql: &str, open: usize) -> Option<usize> {
    let code = code(sql);
    let bytes = code.as_bytes();
    if bytes.get(open) != Some(&b'(') {
        return None;
    }
    let mut depth = 0;
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::sql_text::parse;

    fn set_wise(sql: &str) -> Result<String, String> {
        let statements = parse(sql).unwrap();
        assert_eq!(statements.len(), 1);
        rewrite(&statements[0], "T")
    }

    fn squeeze(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn an_insert_of_one_row_selects_it_from_the_wave() {
        let sql = set_wise(
            "INSERT INTO event (id, name) VALUES (:stream::uuid, lower(:data.name))\n\
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name -- why\n",
        )
        .unwrap();
        assert_eq!(
            squeeze(&sql),
            "INSERT INTO event (id, name) SELECT projectionist_ev.pj_stream::uuid, \
             lower((projectionist_ev.pj_data #>> '{name}')) FROM pg_temp.projectionist_wave projectionist_ev \
             WHERE projectionist_ev.pj_wave = $1 AND projectionist_ev.pj_type = 'T' \
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name -- why"
        );
    }

    #[test]
    fn an_insert_select_runs_its_query_per_event() {
        let sql = set_wise(
            "INSERT INTO ignored (subject, band_id) SELECT :data.subject::text, b.id FROM band b \
             JOIN x ON x.id = b.id WHERE b.name = :data.band ON CONFLICT DO NOTHING",
        )
        .unwrap();
        assert_eq!(
            squeeze(&sql),
            "INSERT INTO ignored (subject, band_id) SELECT projectionist_q.* FROM pg_temp.projectionist_wave \
             projectionist_ev CROSS JOIN LATERAL (SELECT (projectionist_ev.pj_data #>> '{subject}')::text, b.id \
             FROM band b JOIN x ON x.id = b.id WHERE b.name = (projectionist_ev.pj_data #>> '{band}') ) \
             projectionist_q WHERE projectionist_ev.pj_wave = $1 AND projectionist_ev.pj_type = 'T' \
             ON CONFLICT DO NOTHING"
        );
    }

    #[test]
    fn an_update_becomes_a_merge_over_the_wave() {
        let sql = set_wise(
            "UPDATE ONLY event e SET n = e.n + 1, \"where\" = 'set' WHERE e.id = :stream::uuid",
        )
        .unwrap();
        assert_eq!(
            squeeze(&sql),
            "MERGE INTO ONLY event e USING (SELECT * FROM pg_temp.projectionist_wave projectionist_ev \
             WHERE projectionist_ev.pj_wave = $1 AND projectionist_ev.pj_type = 'T') projectionist_ev \
             ON ( e.id = projectionist_ev.pj_stream::uuid ) WHEN MATCHED THEN UPDATE SET n = e.n + 1, \"where\" = 'set'"
        );
        let all = set_wise("UPDATE totals SET n = n + 1").unwrap();
        assert!(squeeze(&all).contains("ON (TRUE )"), "{all}");
    }

    #[test]
    fn a_delete_joins_the_wave() {
        assert_eq!(
            squeeze(&set_wise("DELETE FROM event WHERE id = :stream::uuid OR false").unwrap()),
            "DELETE FROM event USING pg_temp.projectionist_wave projectionist_ev WHERE \
             projectionist_ev.pj_wave = $1 AND projectionist_ev.pj_type = 'T' AND ( id = projectionist_ev.pj_stream::uuid OR false )"
        );
        assert_eq!(
            squeeze(
                &set_wise("DELETE FROM a USING b WHERE a.id = b.id AND b.s = :stream").unwrap()
            ),
            "DELETE FROM a USING pg_temp.projectionist_wave projectionist_ev, b WHERE \
             projectionist_ev.pj_wave = $1 AND projectionist_ev.pj_type = 'T' AND ( a.id = b.id AND b.s = projectionist_ev.pj_stream )"
        );
    }

    #[test]
    fn aliases_multiple_assignments_and_trailing_comments_are_kept() {
        let update = set_wise(
            "UPDATE app.event AS e SET (band, city) = (:data.band, 'x') -- why\nWHERE e.id = :stream::uuid -- which",
        )
        .unwrap();
        assert!(
            squeeze(&update).starts_with("MERGE INTO app.event AS e USING"),
            "{update}"
        );
        assert!(
            squeeze(&update).ends_with(
                "ON ( e.id = projectionist_ev.pj_stream::uuid -- which ) WHEN MATCHED THEN UPDATE SET \
                 (band, city) = ((projectionist_ev.pj_data #>> '{band}'), 'x') -- why"
            ),
            "{update}"
        );
        // Each comment still ends at its line's end.
        assert!(update.contains("-- which\n)"), "{update}");
        let delete =
            set_wise("DELETE FROM app.event e WHERE e.id = :stream::uuid -- gone").unwrap();
        assert!(delete.contains("-- gone\n)"), "{delete}");
        assert!(
            squeeze(&delete).starts_with("DELETE FROM app.event e USING"),
            "{delete}"
        );
        let all = set_wise("DELETE FROM app.seen -- everything").unwrap();
        assert!(
            all.starts_with("DELETE FROM app.seen -- everything\n USING"),
            "{all}"
        );
        let listed = set_wise("DELETE FROM a USING b -- joined\nWHERE a.id = b.id").unwrap();
        assert!(listed.contains(", b -- joined\n WHERE"), "{listed}");
    }

    #[test]
    fn other_statements_stay_event_by_event() {
        for sql in [
            "SELECT pg_notify('x', :stream)",
            "WITH d AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM d",
            "INSERT INTO a VALUES (1), (2)",
            "INSERT INTO a VALUES (:stream) RETURNING id",
            "INSERT INTO a DEFAULT VALUES",
            "UPDATE a SET n = b.n FROM b WHERE a.id = b.id",
            "DELETE FROM a WHERE CURRENT OF c",
            "TRUNCATE a",
        ] {
            assert!(set_wise(sql).is_err(), "{sql}");
        }
        // Words inside literals, comments and parentheses are not the statement's.
        let commented = set_wise("INSERT INTO a VALUES ('returning') -- returning");
        assert!(commented.is_ok(), "{commented:?}");
        assert!(
            set_wise("UPDATE a SET n = (SELECT n FROM b WHERE b.id = a.id) WHERE id = 1").is_ok()
        );
    }
}
