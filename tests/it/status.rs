//! `status` and `verify` against a real PostgreSQL: every state and
//! derived state in the table and in `--json`, lag in events and in time,
//! `--max-lag`, the exit codes, the detail view, the footer, and a verify
//! mismatch healed.

use crate::harness::*;
use serde_json::Value;

/// A store of `n` events of type `Thing` (positions 1..=n), and a manifest
/// with the given projectors over it.
/// The rows of the status table, split on whitespace, by projector name
/// (the header and the footer left out).
fn table_rows(stdout: &str) -> Vec<Vec<String>> {
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "PROJECTOR",
            "MODE",
            "STATE",
            "POSITION",
            "LAG",
            "BEHIND",
            "UPDATED",
            "ERROR"
        ],
        "{stdout}"
    );
    lines
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

fn row<'a>(rows: &'a [Vec<String>], name: &str) -> &'a Vec<String> {
    rows.iter()
        .find(|r| r[0] == name)
        .unwrap_or_else(|| panic!("no row for {name} in {rows:?}"))
}

fn line<'a>(stdout: &'a str, name: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no line for {name} in\n{stdout}"))
}

fn json_projector<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["projectors"]
        .as_array()
        .expect("projectors is a list")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no projector {name} in {json}"))
}

const ONCE_AND_OTHERS: &str = r#"
[projectors.backfill]
mode = "once"
tables = ["backfill_log"]
on.BandCreated = "INSERT INTO backfill_log (id) VALUES (:position)"

[projectors.stuck]
tables = ["stuck_log"]
on.BandCreated = "INSERT INTO stuck_log (id) VALUES (:position)"
"#;

const GOING: &str = r#"
[projectors.gone]
tables = ["gone_log"]
on.BandCreated = "INSERT INTO gone_log (id) VALUES (:position)"

[projectors.old]
tables = ["old_log"]
on.BandCreated = "INSERT INTO old_log (id) VALUES (:position)"
"#;

/// The example's projectors and five more over 500 events, booted into every
/// state: band live; dancehall, event and userpreferences new (never booted);
/// backfill finished; stuck booting; gone orphaned; old retired.
async fn every_state(db: &TestDb) {
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE backfill_log (id bigint PRIMARY KEY); CREATE TABLE stuck_log (id bigint PRIMARY KEY); \
             CREATE TABLE gone_log (id bigint PRIMARY KEY); CREATE TABLE old_log (id bigint PRIMARY KEY)",
        )
        .await
        .unwrap();
    db.gen_events(500);
    example_only(db, &SQL_PROJECTORS, &format!("{ONCE_AND_OTHERS}\n{GOING}"));
    // dancehall, event and userpreferences are never booted: new.
    db.run(&["boot", "band", "backfill", "stuck", "gone", "old"])
        .expect(0);
    let c = db.client().await;
    c.execute(
        "UPDATE projectionist.projectors SET state = 'booting' WHERE name = 'stuck'",
        &[],
    )
    .await
    .unwrap();
    // gone and old leave the manifest; a boot records when it first saw them missing.
    example_only(db, &SQL_PROJECTORS, ONCE_AND_OTHERS);
    db.run(&["boot", "band"]).expect(0);
    let missing: i64 = db
        .count("SELECT count(*) FROM projectionist.projectors WHERE missing_since IS NOT NULL")
        .await;
    assert_eq!(missing, 2, "boot records gone and old as missing");
    c.execute(
        "UPDATE projectionist.projectors SET state = 'retired' WHERE name = 'old'",
        &[],
    )
    .await
    .unwrap();
}

/// `status` shows every state of [`every_state`] in its table.
fn assert_every_state_in_the_table(db: &TestDb) {
    let run = db.run(&["status"]);
    run.expect(0);
    let rows = table_rows(&run.stdout);
    assert_eq!(rows.len(), 8, "{}", run.stdout);
    // Manifest order first, then the ledger's others by name.
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        names,
        [
            "band",
            "dancehall",
            "event",
            "userpreferences",
            "backfill",
            "stuck",
            "gone",
            "old"
        ],
        "{}",
        run.stdout
    );
    assert_eq!(
        row(&rows, "band")[1..6],
        ["from_beginning", "live", "500", "0", "0s"],
        "{}",
        run.stdout
    );
    for new in ["dancehall", "event", "userpreferences"] {
        assert_eq!(
            row(&rows, new)[1..7],
            ["from_beginning", "new", "-", "-", "-", "-"],
            "{}",
            run.stdout
        );
    }
    assert_eq!(
        row(&rows, "backfill")[1..5],
        ["once", "finished", "500", "0"],
        "{}",
        run.stdout
    );
    assert_eq!(
        row(&rows, "stuck")[1..5],
        ["from_beginning", "booting", "500", "0"],
        "{}",
        run.stdout
    );
    assert_eq!(
        row(&rows, "gone")[1..6],
        ["from_beginning", "orphaned", "500", "-", "-"],
        "{}",
        run.stdout
    );
    assert!(
        line(&run.stdout, "gone").contains("removed from manifest"),
        "{}",
        run.stdout
    );
    assert!(line(&run.stdout, "gone").contains("ago"), "{}", run.stdout);
    assert_eq!(
        row(&rows, "old")[1..6],
        ["from_beginning", "retired", "500", "-", "-"],
        "{}",
        run.stdout
    );
    assert!(
        !line(&run.stdout, "old").contains("removed from manifest"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("\nhead: position 500"),
        "{}",
        run.stdout
    );
}

/// `status --json` shows every state of [`every_state`].
fn assert_every_state_in_the_json(db: &TestDb) {
    let run = db.run(&["status", "--json"]);
    run.expect(0);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["head"]["position"], 500);
    assert!(json["head"]["time"].is_string(), "{json}");
    let list = json["projectors"].as_array().unwrap();
    assert_eq!(list.len(), 8);
    for p in list {
        for key in [
            "name",
            "mode",
            "state",
            "position",
            "lag",
            "behind_seconds",
            "updated_at",
            "error",
        ] {
            assert!(p.get(key).is_some(), "projector without `{key}`: {p}");
        }
    }
    let band = json_projector(&json, "band");
    assert_eq!(band["mode"], "from_beginning");
    assert_eq!(band["state"], "live");
    assert_eq!(band["position"], 500);
    assert_eq!(band["lag"], 0);
    assert_eq!(band["behind_seconds"].as_f64(), Some(0.0));
    assert!(band["updated_at"].is_string());
    assert!(band["error"].is_null());
    for new in ["dancehall", "event", "userpreferences"] {
        let p = json_projector(&json, new);
        assert_eq!(p["state"], "new");
        assert!(
            p["position"].is_null() && p["lag"].is_null() && p["behind_seconds"].is_null(),
            "{p}"
        );
        assert!(p["updated_at"].is_null(), "{p}");
    }
    assert_eq!(json_projector(&json, "backfill")["state"], "finished");
    assert_eq!(json_projector(&json, "backfill")["mode"], "once");
    assert_eq!(json_projector(&json, "stuck")["state"], "booting");
    let gone = json_projector(&json, "gone");
    assert_eq!(gone["state"], "orphaned");
    assert_eq!(gone["position"], 500);
    assert!(gone["lag"].is_null(), "{gone}");
    let old = json_projector(&json, "old");
    assert_eq!(old["state"], "retired");
    assert!(old["lag"].is_null(), "{old}");
}

#[tokio::test]
async fn status_shows_live_new_finished_booting_orphaned_and_retired_in_the_table_and_json() {
    let db = TestDb::new().await;
    every_state(&db).await;
    assert_every_state_in_the_table(&db);
    assert_every_state_in_the_json(&db);
}

/// `status` and `status -v` (the table) with fragile broken at #50 with the
/// `long` error, and follower stalled behind it.
fn assert_broken_and_stalled_in_the_table(db: &TestDb, long: &str) {
    let run = db.run(&["status"]);
    run.expect(1);
    assert!(run.stderr.contains("fragile is broken"), "{}", run.stderr);
    assert!(run.stderr.contains("follower is stalled"), "{}", run.stderr);
    let rows = table_rows(&run.stdout);
    assert_eq!(
        row(&rows, "fragile")[1..5],
        ["from_beginning", "broken", "49", "51"],
        "{}",
        run.stdout
    );
    assert_eq!(row(&rows, "follower")[2], "stalled", "{}", run.stdout);
    let fragile = line(&run.stdout, "fragile");
    assert!(
        fragile.contains("#50 Thing: invalid input syntax for type integer"),
        "{}",
        run.stdout
    );
    // Cut short without -v.
    assert!(fragile.contains('…'), "{}", run.stdout);
    assert!(!fragile.contains(long), "{}", run.stdout);

    // -v: the whole error, and a piped table is never wrapped.
    let run = db.run(&["status", "-v"]);
    run.expect(1);
    let fragile = line(&run.stdout, "fragile");
    assert!(fragile.contains(long), "{}", run.stdout);
    assert!(fragile.len() > 150, "{}", run.stdout);
    assert!(
        fragile.contains("#50 Thing: invalid input syntax"),
        "{}",
        run.stdout
    );
}

/// `status NAME` and `status NAME --json` of fragile, broken at #50 with the
/// `long` error: its failures with position, type and error.
fn assert_broken_in_the_detail(db: &TestDb, long: &str) {
    let run = db.run(&["status", "fragile"]);
    run.expect(1);
    assert!(
        run.stdout.contains("state         broken"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("position      49"), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("error         #50 Thing: invalid input syntax"),
        "{}",
        run.stdout
    );
    let failures = &run.stdout[run
        .stdout
        .find("last failures:")
        .expect("a failures section")..];
    let failure = failures
        .lines()
        .find(|l| l.trim_start().starts_with("50 "))
        .unwrap_or_else(|| panic!("no failure at position 50 in\n{}", run.stdout));
    assert!(failure.contains("Thing"), "{failure}");
    assert!(failure.contains("boot"), "{failure}");
    assert!(failure.contains(long), "{failure}");

    let run = db.run(&["status", "fragile", "--json"]);
    run.expect(1);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["projector"]["state"], "broken");
    assert_eq!(json["failures"][0]["position"], 50);
    assert_eq!(json["failures"][0]["event_type"], "Thing");
}

#[tokio::test]
async fn broken_and_stalled_exit_1_with_the_error_in_the_table_the_detail_and_verbose() {
    let db = TestDb::new().await;
    things(
        &db,
        100,
        r#"
[projectors.fragile]
tables = ["thing_log"]
on.Thing = "INSERT INTO thing_log (id, v) VALUES (:position, CASE WHEN :position = 50 THEN ('not a number at all: ' || repeat('x', 80) || :position)::int ELSE 1 END)"

[projectors.follower]
tables = ["after_log"]
after = ["fragile"]
on.Thing = "INSERT INTO after_log (id) VALUES (:position)"
"#,
    )
    .await;
    db.run(&["boot", "--batch-size", "10"]).expect(1);
    let long = format!("not a number at all: {}50", "x".repeat(80));

    assert_broken_and_stalled_in_the_table(&db, &long);

    let run = db.run(&["status", "--json"]);
    run.expect(1);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    let p = json_projector(&json, "fragile");
    assert_eq!(p["state"], "broken");
    assert_eq!(p["position"], 49);
    assert_eq!(p["lag"], 51);
    assert!(p["error"].as_str().unwrap().contains(&long), "{p}");
    assert_eq!(p["error_position"], 50);
    assert_eq!(p["error_type"], "Thing");
    assert_eq!(json_projector(&json, "follower")["state"], "stalled");
    assert!(
        run.stderr.is_empty() || !run.stderr.contains("unhealthy"),
        "--json keeps stderr quiet: {}",
        run.stderr
    );

    // One projector in detail: its failures with position, type and error.
    assert_broken_in_the_detail(&db, &long);

    db.run(&["status", "follower"]).expect(1);
    let run = db.run(&["status", "nosuch"]);
    run.expect(2);
    assert!(
        run.stderr.contains("no projector `nosuch`"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn lag_in_events_and_time_and_max_lag() {
    let db = TestDb::new().await;
    example_only(&db, &SQL_PROJECTORS, "");
    db.gen_events(1_000);
    db.run(&["boot"]).expect(0);
    let run = db.run(&["status", "band"]);
    run.expect(0);
    assert!(run.stdout.contains("state         live"), "{}", run.stdout);
    assert!(
        run.stdout.contains("last failures:\n  none"),
        "{}",
        run.stdout
    );
    db.run(&["status", "--max-lag", "0"]).expect(0);

    // The generator spaces events 1 s apart: 100 new events are ~100 s ahead.
    db.gen_events(100);
    let run = db.run(&["status", "--json"]);
    run.expect(0);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["head"]["position"], 1_100);
    for name in ["band", "dancehall", "event", "userpreferences"] {
        let p = json_projector(&json, name);
        assert_eq!(p["position"], 1_000, "{p}");
        assert_eq!(p["lag"], 100, "{p}");
        let behind = p["behind_seconds"].as_f64().unwrap();
        assert!((90.0..=110.0).contains(&behind), "{p}");
    }
    let run = db.run(&["status"]);
    run.expect(0);
    let rows = table_rows(&run.stdout);
    assert_eq!(
        row(&rows, "band")[3..6],
        ["1000", "100", "1m"],
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("head: position 1100 at "),
        "{}",
        run.stdout
    );

    let run = db.run(&["status", "--max-lag", "10"]);
    run.expect(1);
    assert!(
        run.stderr.contains("band lags 100 events (max 10)"),
        "{}",
        run.stderr
    );
    db.run(&["status", "--max-lag", "100"]).expect(0);
    db.run(&["status", "--max-lag", "1000000"]).expect(0);
    db.run(&["status", "--max-lag", "1h"]).expect(0);
    let run = db.run(&["status", "--max-lag", "10s"]);
    run.expect(1);
    assert!(run.stderr.contains("behind (max 10s)"), "{}", run.stderr);
    db.run(&["status", "--max-lag", "10s", "--json"]).expect(1);
    let run = db.run(&["status", "--max-lag", "soon"]);
    run.expect(2);
    assert!(run.stderr.contains("--max-lag"), "{}", run.stderr);
}

#[tokio::test]
async fn an_unreachable_database_exits_3() {
    let db = TestDb::new().await;
    let run = db.run(&["status", "--database-url", "postgres://u@127.0.0.1:1/x"]);
    run.expect(3);
    assert!(
        run.stderr.contains("cannot connect to the database"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    db.run(&[
        "status",
        "--json",
        "--database-url",
        "postgres://u@127.0.0.1:1/x",
    ])
    .expect(3);
    db.run(&["verify", "--database-url", "postgres://u@127.0.0.1:1/x"])
        .expect(3);
}

#[tokio::test]
async fn the_footer_names_a_running_transaction_that_holds_the_head_back() {
    let db = TestDb::new().await;
    example_only(&db, &SQL_PROJECTORS, "");
    db.gen_events(100);
    db.run(&["boot"]).expect(0);
    let holder = db.client().await;
    let pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    holder
        .batch_execute(
            "BEGIN; INSERT INTO events (aggregate_id, aggregate_name, name, data) \
             VALUES (gen_random_uuid(), 'band', 'BandCreated', '{\"name\": \"uncommitted\"}')",
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let run = db.run(&["status"]);
    run.expect(0);
    assert!(
        run.stdout.contains("head: position 100"),
        "the uncommitted event is not the head: {}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!("held back by: pid {pid} (")),
        "{}",
        run.stdout
    );
    let json: Value =
        serde_json::from_str(&db.run(&["status", "--json"]).expect(0).stdout).unwrap();
    assert!(
        json["holding"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["pid"] == pid),
        "{json}"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    let run = db.run(&["status"]);
    run.expect(0);
    assert!(
        !run.stdout.contains(&format!("held back by: pid {pid} ")),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn verify_reports_ok_then_a_mismatch_and_heal_rebuilds() {
    let db = TestDb::new().await;
    example_only(&db, &SQL_PROJECTORS, "");
    db.gen_events(3_000);
    db.run(&["boot"]).expect(0);
    let run = db.run(&["verify"]);
    run.expect(0);
    let checks: Vec<&str> = run
        .stdout
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(checks.len(), 6, "{}", run.stdout);
    for l in &checks {
        assert!(l.contains(" OK "), "{l}");
    }
    assert!(!run.stdout.contains("MISMATCH"), "{}", run.stdout);

    // A row deleted behind the projector's back.
    let bands = db.count("SELECT count(*) FROM band").await;
    assert!(bands > 1);
    db.client()
        .await
        .execute(
            "DELETE FROM band WHERE name = (SELECT min(name) FROM band)",
            &[],
        )
        .await
        .unwrap();
    let run = db.run(&["verify"]);
    run.expect(1);
    let band = line(&run.stdout, "band");
    assert!(band.contains("MISMATCH"), "{}", run.stdout);
    // Both values: the projection's and the events'.
    let values: Vec<String> = band
        .split_whitespace()
        .rev()
        .take(2)
        .map(|v| v.trim_matches(|c| c == '(' || c == ')').to_string())
        .collect();
    assert_eq!(
        values,
        [bands.to_string(), (bands - 1).to_string()],
        "{}",
        run.stdout
    );
    assert_eq!(run.stdout.matches("MISMATCH").count(), 1, "{}", run.stdout);
    // Only the other projectors' checks: OK.
    db.run(&["verify", "dancehall", "event"]).expect(0);
    db.run(&["verify", "nosuch"]).expect(2);

    let run = db.run(&["verify", "--json"]);
    run.expect(1);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    let list = json["checks"].as_array().expect("a list of checks");
    assert_eq!(json["healed"], serde_json::json!([]));
    assert_eq!(list.len(), 6);
    let bad: Vec<&Value> = list.iter().filter(|c| c["ok"] == false).collect();
    assert_eq!(bad.len(), 1, "{json}");
    assert_eq!(bad[0]["projector"], "band");
    let value = |v: &Value| {
        v.as_str()
            .unwrap()
            .trim_matches(|c| c == '(' || c == ')')
            .to_string()
    };
    assert_eq!(
        value(&bad[0]["projection"][0]),
        (bands - 1).to_string(),
        "{json}"
    );
    assert_eq!(value(&bad[0]["events"][0]), bands.to_string(), "{json}");

    let run = db.run(&["verify", "--heal"]);
    run.expect(0);
    assert!(
        run.stderr.contains("healing: resetting band"),
        "{}",
        run.stderr
    );
    assert_eq!(db.count("SELECT count(*) FROM band").await, bands);
    assert_eq!(db.ledger("band").await.unwrap(), ("live".into(), 3_000));
    // Healed beside the live table and swapped in: the damaged one is kept.
    assert_eq!(
        db.count("SELECT count(*) FROM projectionist_previous.band__v1")
            .await,
        bands - 1
    );
    db.assert_tables_match_expected().await;
    db.run(&["verify"]).expect(0);
}

#[tokio::test]
async fn an_orphan_says_when_it_left_the_manifest_once_a_boot_has_seen_it() {
    // The detail of an orphaned projector shows when it went missing.
    let db = TestDb::new().await;
    example_only(&db, &SQL_PROJECTORS, "");
    db.gen_events(300);
    db.run(&["boot"]).expect(0);
    example_without(&db, &["event"], "");
    let run = db.run(&["status"]);
    run.expect(0);
    let rows = table_rows(&run.stdout);
    assert_eq!(row(&rows, "event")[2], "orphaned", "{}", run.stdout);
    assert!(
        line(&run.stdout, "event").contains("not in the manifest"),
        "{}",
        run.stdout
    );
    db.run(&["boot"]).expect(0);
    let run = db.run(&["status", "event"]);
    run.expect(0);
    assert!(
        run.stdout.contains("state         orphaned"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("missing since "), "{}", run.stdout);
    let run = db.run(&["status"]);
    assert!(
        line(&run.stdout, "event").contains("removed from manifest"),
        "{}",
        run.stdout
    );
}
