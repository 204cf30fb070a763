//! The dancefinder example (`projectors.toml`, `migrations/`): manifests made
//! of its projectors, its events (`scripts/gen-events`), and the set-based
//! projection (`scripts/sql/expected.sql`) its nine tables must equal.

use std::process::Command;

use super::{TestDb, root};

/// The example's read-model tables.
pub const EXAMPLE_TABLES: [&str; 9] = [
    "band",
    "dance_hall",
    "event",
    "origin",
    "ignored_band",
    "ignored_dance_hall",
    "ignored_city",
    "ignored_municipality",
    "ignored_state",
];

/// The example's SQL projectors (the nine tables of `assert_tables_match_expected`).
pub const SQL_PROJECTORS: [&str; 4] = ["band", "dancehall", "event", "userpreferences"];

impl TestDb {
    /// Appends `n` generated dancefinder events.
    pub fn gen_events(&self, n: u64) {
        let out = Command::new(root().join("scripts/gen-events"))
            .arg(n.to_string())
            .env("DATABASE_URL", &self.url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gen-events: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Fills schema `expected` with the set-based projection of the events.
    pub fn expected_projection(&self) {
        let out = Command::new("psql")
            .arg(&self.url)
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                "schema=expected",
                "-f",
            ])
            .arg(root().join("scripts/sql/expected.sql"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "expected.sql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Asserts the nine read-model tables equal the set-based projection.
    pub async fn assert_tables_match_expected(&self) {
        self.expected_projection();
        let c = self.client().await;
        for t in EXAMPLE_TABLES {
            let diff: i64 = c
                .query_one(
                    &format!(
                        "SELECT (SELECT count(*) FROM (SELECT * FROM public.{t} EXCEPT SELECT * FROM expected.{t}) a) \
                              + (SELECT count(*) FROM (SELECT * FROM expected.{t} EXCEPT SELECT * FROM public.{t}) b)"
                    ),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(diff, 0, "table {t} differs from the set-based projection");
        }
    }
}

/// The example manifest with only the `keep` projectors (an `after` on a
/// dropped one removed), and `extra` appended.
pub fn example_only(db: &TestDb, keep: &[&str], extra: &str) {
    let text = std::fs::read_to_string(root().join("projectors.toml")).unwrap();
    let mut out = String::new();
    let mut current: Option<String> = None;
    let mut dropped = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line
            .strip_prefix("[[projectors.")
            .or_else(|| line.strip_prefix("[projectors."))
        {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !keep.contains(&name.as_str()) && !dropped.contains(&name) {
                dropped.push(name.clone());
            }
            current = Some(name);
        } else if line.starts_with('[') {
            current = None;
        }
        if current.as_deref().is_none_or(|c| keep.contains(&c)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    for name in &dropped {
        out = out.replace(&format!("after = [\"{name}\"]\n"), "");
    }
    for name in keep {
        assert!(
            out.contains(&format!("[projectors.{name}]")),
            "no [projectors.{name}] in the example manifest"
        );
    }
    db.write_manifest(&format!("{out}\n{extra}\n"));
}

/// The example's SQL projectors without `names`.
pub fn example_without(db: &TestDb, names: &[&str], extra: &str) {
    let keep: Vec<&str> = SQL_PROJECTORS
        .iter()
        .copied()
        .filter(|p| !names.contains(p))
        .collect();
    example_only(db, &keep, extra);
}

/// The example's four SQL projectors.
pub fn example(db: &TestDb) {
    example_only(db, &SQL_PROJECTORS, "");
}
