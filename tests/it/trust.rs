//! Trust on the stores teams really have: what projectionist does when the
//! positions, the ledger or the traffic are not the tidy ones of a demo.
//!
//! - Late events: without a transaction column, an event that appears inside
//!   a hole a projector already passed (an explicit position below the head,
//!   a sequence `CACHE` shared by sessions) is never silently lost: `status`,
//!   `status NAME`, `verify`, play's metrics and the alert command (once per
//!   event) report it, and `reset` applies it. With the transaction column it
//!   cannot happen: the projector simply gets the event.
//! - The version guard: a `play` started with the manifest at version N never
//!   writes into the projector once a deploy rebuilt it at version N+1.
//! - The ledger: a column altered by hand is exit 2 naming the column (never
//!   a panic); a ledger table dropped by hand is recreated by `migrate`, and
//!   boot then refuses to replay projectors over the rows their tables still
//!   hold, unless told how (`boot --adopt`, `reset`).
//! - Sparse positions (a gap of a million, 5 % rolled-back ids, a sequence
//!   with INCREMENT BY 1000) boot as fast as dense ones, every event applied.
//! - `verify` under traffic: never a MISMATCH for a projector that is merely
//!   behind, and `--heal` heals nothing; a real mismatch is still one.
//! - `status` names a prepared transaction that holds the head back.
//!
//! Projector names start with `trust_`: play's owner locks are advisory locks,
//! visible server-wide, and the tests run in parallel on one server.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::harness::*;

// ---------------------------------------------------------------------------
// Shared helpers

/// The Thing store's `[store]`, with or without the transaction column.
fn store(with_tx: bool) -> String {
    if with_tx {
        THINGS_STORE.to_string()
    } else {
        THINGS_STORE.replace("transaction = \"tx\"\n", "")
    }
}

/// An alert command appending each document (one JSON line) to alerts.jsonl
/// in the manifest's directory.
const ALERT_TO_FILE: &str = "[alert]\ncommand = [\"sh\", \"-c\", \"cat >> alerts.jsonl\"]\n";

const INSERT: &str = "INSERT INTO events (aggregate_id, aggregate_name, name, data) \
                      VALUES (gen_random_uuid(), 'thing', 'Thing', '{}') RETURNING id";

/// Inserts one event and commits it (autocommit); returns its position.
async fn committed(c: &Client) -> i64 {
    c.query_one(INSERT, &[]).await.unwrap().get(0)
}

/// Inserts one event in a transaction that rolls back: a hole at the returned position.
async fn rolled_back(c: &Client) -> i64 {
    c.batch_execute("BEGIN").await.unwrap();
    let gone: i64 = c.query_one(INSERT, &[]).await.unwrap().get(0);
    c.batch_execute("ROLLBACK").await.unwrap();
    gone
}

/// Inserts one event at an explicit position (below the head: into a hole).
async fn insert_at(c: &Client, position: i64) {
    c.execute(
        "INSERT INTO events (id, aggregate_id, aggregate_name, name, data) \
         VALUES ($1, gen_random_uuid(), 'thing', 'Thing', '{}')",
        &[&position],
    )
    .await
    .unwrap();
}

async fn ids(c: &Client, table: &str) -> Vec<i64> {
    c.query(&format!("SELECT id FROM {table} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The passed holes `status NAME --json` shows, one entry per batch that
/// passed any (the latest ten): (first position, last position, holes).
fn passed_holes(db: &TestDb, name: &str) -> Vec<(i64, i64, i64)> {
    let run = db.run(&["status", name, "--json"]);
    assert!(run.code == 0 || run.code == 1, "{run:?}");
    parse_json(&run)["holes"]
        .as_array()
        .unwrap_or_else(|| panic!("no holes list in {}", run.stdout))
        .iter()
        .map(|h| {
            let n = |k: &str| h[k].as_i64().unwrap_or_else(|| panic!("{k} in {h}"));
            (n("first_position"), n("last_position"), n("holes"))
        })
        .collect()
}

/// Inserts events at the explicit positions `late` (inside passed holes):
/// `status --json` must list exactly them as late events of `name`.
async fn assert_found_late(db: &TestDb, c: &Client, name: &str, late: &[i64]) {
    for p in late {
        insert_at(c, *p).await;
    }
    let run = db.run(&["status", "--json"]);
    run.expect(1);
    let found: Vec<i64> = late_in_status(&parse_json(&run), name)
        .iter()
        .map(|l| l["position"].as_i64().unwrap())
        .collect();
    assert_eq!(found, late, "the late events found in the recorded holes");
}

fn parse_json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n--- stdout\n{}\n--- stderr\n{}",
            run.stdout, run.stderr
        )
    })
}

/// The positions of the late events `status --json` shows for `name`.
fn late_in_status(json: &Value, name: &str) -> Vec<Value> {
    let p = json["projectors"]
        .as_array()
        .expect("projectors is a list")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no projector {name} in {json}"));
    p["late_events"]
        .as_array()
        .unwrap_or_else(|| panic!("no late_events list for {name} in {json}"))
        .clone()
}

/// The line of a table whose first word is `first`.
fn line<'a>(stdout: &'a str, first: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no line for {first} in\n{stdout}"))
}

/// The alert documents written so far (whole lines only).
fn alert_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("alert line is not JSON ({e}): {l}"))
        })
        .collect()
}

/// Runs a command to the end, timed.
fn timed(db: &TestDb, args: &[&str]) -> (Run, Duration) {
    let started = Instant::now();
    let run = db.run(args);
    (run, started.elapsed())
}

// ---------------------------------------------------------------------------
// 1. Late events

/// The status, status NAME and verify of a projector with exactly the late
/// events `late` (positions of `Thing` events).
fn assert_reported_late(db: &TestDb, name: &str, late: &[i64]) {
    let expected: Vec<Value> = late
        .iter()
        .map(|p| json!({"projector": name, "position": p, "type": "Thing"}))
        .collect();

    let run = db.run(&["status"]);
    run.expect(1);
    let row = line(&run.stdout, name);
    let first = format!(
        "{} late event(s) not applied (#{} Thing…): reset it",
        late.len(),
        late[0]
    );
    assert!(row.contains(&first), "status row: {row}\n{}", run.stdout);
    assert!(
        run.stderr.contains(&format!("unhealthy: {name} missed")),
        "{}",
        run.stderr
    );

    let run = db.run(&["status", "--json"]);
    run.expect(1);
    assert_eq!(late_in_status(&parse_json(&run), name), expected);

    let run = db.run(&["status", name]);
    run.expect(1);
    assert!(
        run.stdout.contains(&format!(
            "not applied: `projectionist reset {name}` applies them"
        )),
        "{}",
        run.stdout
    );
    for p in late {
        assert!(
            run.stdout.contains(&format!("\n  #{p} Thing\n")),
            "status {name} does not list #{p}\n{}",
            run.stdout
        );
    }

    let run = db.run(&["verify"]);
    run.expect(1);
    let row = line(&run.stdout, name);
    assert!(
        row.contains("no late events") && row.contains("LATE EVENTS"),
        "{}",
        run.stdout
    );
    assert!(
        row.contains(&format!("{} not applied", late.len()))
            && row.contains(&format!("#{} Thing", late[0])),
        "{}",
        run.stdout
    );
    let run = db.run(&["verify", "--json"]);
    run.expect(1);
    let json = parse_json(&run);
    let checks = json["checks"].as_array().expect("checks is a list");
    assert_eq!(checks.len(), 1, "{json}");
    assert_eq!(checks[0]["projector"], name);
    assert_eq!(checks[0]["check"], "no late events");
    assert_eq!(checks[0]["result"], "late_events");
    assert_eq!(checks[0]["ok"], false);
}

/// Status, status NAME and verify say nothing is late.
fn assert_nothing_late(db: &TestDb, name: &str) {
    let run = db.run(&["status", "--json"]);
    run.expect(0);
    assert_eq!(late_in_status(&parse_json(&run), name), Vec::<Value>::new());
    let run = db.run(&["status", name]);
    run.expect(0);
    assert!(!run.stdout.contains("late events ("), "{}", run.stdout);
    let run = db.run(&["verify"]);
    run.expect(0);
    assert!(!run.stdout.contains("LATE EVENTS"), "{}", run.stdout);
}

/// A logger `name` (into trust_late_log, alerting to alerts.jsonl) over the
/// Thing store without the transaction column, booted over events 1, 3 and 5:
/// it passed the holes at 2 and 4.
async fn booted_over_two_holes(db: &TestDb, c: &Client, name: &str) {
    c.batch_execute("CREATE TABLE trust_late_log (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    db.write_manifest(&format!(
        "{}\n{ALERT_TO_FILE}\n{}",
        store(false),
        logger(name, "from_beginning", "trust_late_log")
    ));
    let positions = [
        committed(c).await,
        rolled_back(c).await,
        committed(c).await,
        rolled_back(c).await,
        committed(c).await,
    ];
    assert_eq!(positions, [1, 2, 3, 4, 5]);
    db.run(&["boot"]).expect(0);
    assert_eq!(ids(c, "trust_late_log").await, [1, 3, 5]);
    assert_eq!(db.ledger(name).await, Some(("live".into(), 5)));
    assert_eq!(passed_holes(db, name), [(2, 4, 2)]);
    db.run(&["status"]).expect(0);
}

/// play with the late event #2 of [`booted_over_two_holes`]: its metrics
/// export it (play looks at start, then every 30 s) and the alert command runs
/// once for it; then a second late event (#4) and a new ordinary one (#6),
/// which play applies at once: play's second look exports both and alerts
/// only #4.
async fn play_exports_and_alerts_each_late_event_once(db: &TestDb, c: &Client, name: &str) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let mut play = Player::start(db, "late", &["--poll", "200ms", "--metrics", &addr]);
    let gauge = |n: usize| format!("projectionist_late_events{{projector=\"{name}\"}} {n}");
    let took = wait_for(
        "play's metrics to export 1 late event",
        35.0,
        &[&play],
        async || {
            get_metrics(port)
                .await
                .is_some_and(|b| b.contains(&gauge(1)))
        },
    )
    .await;
    assert!(
        took < Duration::from_secs(15),
        "the late event reached the metrics after {took:?}: play should look at start\n{}",
        play.log()
    );
    let alerts = db.dir.path().join("alerts.jsonl");
    wait_for("the alert command to run", PATIENCE, &[&play], async || {
        !alert_docs(&alerts).is_empty()
    })
    .await;
    let docs = alert_docs(&alerts);
    assert_eq!(docs.len(), 1, "{docs:?}");
    assert_eq!(docs[0]["event"], "late_events");
    assert_eq!(docs[0]["run"], "play");
    assert_eq!(
        docs[0]["late_events"],
        json!([{"projector": name, "position": 2, "type": "Thing"}])
    );

    // A second late event, and a new ordinary one that play applies at once.
    insert_at(c, 4).await;
    assert_eq!(committed(c).await, 6);
    wait_for("play to apply event 6", PATIENCE, &[&play], async || {
        position(c, name).await == 6
    })
    .await;
    // Play's second look (30 s after its first): it exports both, and alerts
    // only the new one: #2 was alerted already.
    wait_for(
        "play's second look to export 2 late events",
        (45.0 - started.elapsed().as_secs_f64()).max(5.0),
        &[&play],
        async || {
            get_metrics(port)
                .await
                .is_some_and(|b| b.contains(&gauge(2)))
        },
    )
    .await;
    wait_for(
        "the alert command to run for the second late event",
        PATIENCE,
        &[&play],
        async || alert_docs(&alerts).len() >= 2,
    )
    .await;
    play.stop();
    let docs = alert_docs(&alerts);
    assert_eq!(docs.len(), 2, "{docs:?}");
    assert_eq!(
        docs[1]["late_events"],
        json!([{"projector": name, "position": 4, "type": "Thing"}]),
        "the second look alerts only the new late event: {docs:?}"
    );
    assert!(
        play.log()
            .contains("late event(s) appeared inside holes their projectors had already passed"),
        "{}",
        play.log()
    );
}

/// An event inserted at the explicit position of a hole the projector passed:
/// every report shows it, play exports it and alerts once per late event
/// (not again at its next look), nobody applies it behind the projector's
/// back, and `reset` applies it.
#[tokio::test]
async fn a_late_event_at_an_explicit_position_is_reported_alerted_once_and_applied_by_reset() {
    const NAME: &str = "trust_late";
    let db = TestDb::new().await;
    let c = db.client().await;
    booted_over_two_holes(&db, &c, NAME).await;

    // An event at the position of the first hole, below the projector's position.
    insert_at(&c, 2).await;
    assert_reported_late(&db, NAME, &[2]);
    assert_eq!(
        ids(&c, "trust_late_log").await,
        [1, 3, 5],
        "status and verify change nothing"
    );

    // play: the late event in its metrics (it looks at start, then every 30 s),
    // and the alert command once for it.
    play_exports_and_alerts_each_late_event_once(&db, &c, NAME).await;
    let alerts = db.dir.path().join("alerts.jsonl");
    // Nobody applied them behind the projector's back.
    assert_eq!(ids(&c, "trust_late_log").await, [1, 3, 5, 6]);
    assert_reported_late(&db, NAME, &[2, 4]);

    // reset applies them; then nothing is late any more, and nothing is alerted.
    db.run(&["reset", NAME, "--yes"]).expect(0);
    assert_eq!(ids(&c, "trust_late_log").await, [1, 2, 3, 4, 5, 6]);
    assert_eq!(db.ledger(NAME).await, Some(("live".into(), 6)));
    db.run(&["status"]).expect(0);
    assert_nothing_late(&db, NAME);
    assert_eq!(alert_docs(&alerts).len(), 2);
}

/// The manifest and tables of the sequence-cache scenario.
async fn cache_store(db: &TestDb, with_tx: bool) -> Client {
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE trust_cache_log (id bigint PRIMARY KEY); \
         ALTER SEQUENCE events_id_seq CACHE 50",
    )
    .await
    .unwrap();
    db.write_manifest(&format!(
        "{}\n{}",
        store(with_tx),
        logger("trust_cache", "from_beginning", "trust_cache_log")
    ));
    c
}

/// Two sessions share a sequence with CACHE 50: S1 takes 1 (and holds 2..50
/// in its cache), S2 takes 51.. ; both committed, S1 idle outside any
/// transaction. Returns the two sessions.
async fn two_cached_sessions(db: &TestDb) -> (Client, Client) {
    let s1 = db.client().await;
    let s2 = db.client().await;
    assert_eq!(committed(&s1).await, 1);
    let mut taken = Vec::new();
    for _ in 0..3 {
        taken.push(committed(&s2).await);
    }
    assert_eq!(taken, [51, 52, 53], "S2 takes ids past S1's cache");
    (s1, s2)
}

/// Without a transaction column, boot passes the hole 2..50 (no transaction
/// is running), and S1's next insert lands in it: a late event, reported, not
/// lost, and applied by `reset`.
#[tokio::test]
async fn a_sequence_cache_shared_by_sessions_makes_a_late_event_that_is_reported_and_reset_applies()
{
    const NAME: &str = "trust_cache";
    let db = TestDb::new().await;
    let c = cache_store(&db, false).await;
    let (s1, _s2) = two_cached_sessions(&db).await;

    let (run, took) = timed(&db, &["boot"]);
    run.expect(0);
    assert!(
        took < Duration::from_secs(5),
        "boot waited at a hole no running transaction can fill: {took:?}"
    );
    assert_eq!(ids(&c, "trust_cache_log").await, [1, 51, 52, 53]);
    assert_eq!(db.ledger(NAME).await, Some(("live".into(), 53)));
    assert_eq!(passed_holes(&db, NAME), [(2, 50, 1)]);
    db.run(&["status"]).expect(0);

    // S1, still connected and outside any transaction, takes the next id of its cache.
    assert_eq!(committed(&s1).await, 2);
    assert_reported_late(&db, NAME, &[2]);
    // Not lost: another boot has nothing to do and it stays reported.
    db.run(&["boot"]).expect(0);
    assert_eq!(ids(&c, "trust_cache_log").await, [1, 51, 52, 53]);
    assert_reported_late(&db, NAME, &[2]);

    db.run(&["reset", NAME, "--yes"]).expect(0);
    assert_eq!(ids(&c, "trust_cache_log").await, [1, 2, 51, 52, 53]);
    assert_nothing_late(&db, NAME);
}

/// The same scenario with the transaction column: no late event; play gets
/// the event S1 inserts after boot.
#[tokio::test]
async fn with_the_transaction_column_a_shared_sequence_cache_makes_no_late_event() {
    const NAME: &str = "trust_cache";
    let db = TestDb::new().await;
    let c = cache_store(&db, true).await;
    let (s1, _s2) = two_cached_sessions(&db).await;

    let (run, took) = timed(&db, &["boot"]);
    run.expect(0);
    assert!(took < Duration::from_secs(5), "boot took {took:?}");
    assert_eq!(ids(&c, "trust_cache_log").await, [1, 51, 52, 53]);
    assert_eq!(db.ledger(NAME).await, Some(("live".into(), 53)));

    let mut play = Player::start(&db, "cache", &["--poll", "100ms"]);
    wait_for("play to own trust_cache", PATIENCE, &[&play], async || {
        owned_by(&c, &play).await == [NAME]
    })
    .await;
    assert_eq!(committed(&s1).await, 2);
    wait_for("play to apply event 2", PATIENCE, &[&play], async || {
        ids(&c, "trust_cache_log").await.contains(&2)
    })
    .await;
    play.stop();
    assert_eq!(ids(&c, "trust_cache_log").await, [1, 2, 51, 52, 53]);
    // Its place in the (transaction, position) order is after 53.
    assert_eq!(db.ledger(NAME).await, Some(("live".into(), 2)));
    assert_eq!(
        passed_holes(&db, NAME),
        [],
        "no holes with a transaction column"
    );
    db.run(&["status"]).expect(0);
    assert_nothing_late(&db, NAME);
}

// ---------------------------------------------------------------------------
// 2. The version guard

/// A projector writing marks of its version: (position, version).
fn marks(version: i32) -> String {
    format!(
        "[projectors.trust_marks]\ntables = [\"trust_marks\"]\nversion = {version}\n\
         on.Thing = \"INSERT INTO trust_marks (id, version) VALUES (:position, {version})\"\n"
    )
}

/// The marks table: (version, rows) per version.
async fn marks_by_version(c: &Client) -> Vec<(i32, i64)> {
    c.query(
        "SELECT version, count(*) FROM trust_marks GROUP BY 1 ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// One round of [`a_play_at_the_old_version_never_writes_into_the_rebuild`]:
/// a play at version `v` projects, a deploy rebuilds the projector at version
/// v+1 while it runs, and the marks are then exactly the rebuild's, the old
/// play having said it leaves the projector alone.
async fn a_deploy_rebuilds_under_a_play_at_version(db: &TestDb, c: &Client, name: &str, v: i32) {
    // The manifest at version v: play reads it at start.
    db.write_manifest(&format!("{THINGS_STORE}\n{}", marks(v)));
    // No notify: play v plays a batch, then idles until its next poll.
    let mut old = Player::start(db, &format!("v{v}"), &["--poll", "1s"]);
    let from = position(c, name).await;
    wait_for(
        &format!("play at version {v} to project new events"),
        PATIENCE,
        &[&old],
        async || owned_by(c, &old).await == [name] && position(c, name).await > from,
    )
    .await;
    // Every mark so far is version v (one query: play keeps writing).
    let versions: Vec<i32> = marks_by_version(c).await.iter().map(|m| m.0).collect();
    assert_eq!(versions, [v], "round {v}");

    // A deploy (version v+1) lands right after one of play v's batches, so
    // the rebuild runs while play v idles, and play v wakes up to a live
    // projector again: only the version tells it is no longer its own.
    let seen = position(c, name).await;
    wait_for(
        &format!("play at version {v} to commit another batch"),
        PATIENCE,
        &[&old],
        async || position(c, name).await > seen,
    )
    .await;
    db.write_manifest(&format!("{THINGS_STORE}\n{}", marks(v + 1)));
    db.run(&["boot", "--writer-wait", "10s"]).expect(0);
    // Play v wakes at least twice more while events keep coming.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    old.assert_running();

    let version: i32 = c
        .query_one(
            "SELECT version FROM projectionist.projectors WHERE name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, v + 1, "round {v}");
    let rebuilt_to = position(c, name).await;
    let by_version = marks_by_version(c).await;
    let expected = count(
        c,
        &format!("SELECT count(*) FROM events WHERE id <= {rebuilt_to}"),
    )
    .await;
    assert_eq!(
        by_version,
        [(v + 1, expected)],
        "round {v}: the marks after the rebuild at version {} (up to {rebuilt_to}) are not exactly the rebuild's\n{}",
        v + 1,
        old.log()
    );
    let beyond = count(
        c,
        &format!("SELECT count(*) FROM trust_marks WHERE id > {rebuilt_to}"),
    )
    .await;
    assert_eq!(
        beyond, 0,
        "round {v}: play at version {v} wrote past the rebuild"
    );
    assert_eq!(
        db.ledger(name).await,
        Some(("live".into(), rebuilt_to)),
        "round {v}"
    );
    assert_eq!(
        count(c, "SELECT count(*) FROM projectionist.failures").await,
        0,
        "round {v}: a handler failed (two runs wrote the same marks?)"
    );
    let log = old.log();
    assert!(
        log.contains("alone") && log.contains(&format!("version {}", v + 1)),
        "round {v}: play at version {v} did not say it leaves the projector alone\n{log}"
    );
    old.stop();
}

/// Five rounds: a play started at version N keeps running while events keep
/// coming and a deploy rebuilds the projector at version N+1; the marks table
/// then holds exactly the rebuild's rows, all of version N+1, and the old play
/// says it leaves the projector alone. Finally a play at the last version
/// takes it, and every event is marked once, at that version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_play_at_the_old_version_never_writes_into_the_rebuild() {
    const NAME: &str = "trust_marks";
    let db = TestDb::new().await;
    let c = thing_store(
        &db,
        true,
        "CREATE TABLE trust_marks (id bigint PRIMARY KEY, version int NOT NULL)",
        &marks(1),
    )
    .await;
    add_things(&c, 200).await;
    db.run(&["boot"]).expect(0);

    // A single writer appends all along (ids and transactions in the same order).
    let stop = tokio_util::sync::CancellationToken::new();
    let appender = {
        let stop = stop.clone();
        let w = db.client().await;
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                add_things(&w, 1).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    for v in 1..=5 {
        a_deploy_rebuilds_under_a_play_at_version(&db, &c, NAME, v).await;
    }

    // A play at the last version takes it over; everything after is that version.
    let mut new = Player::start(&db, "v6", &["--poll", "50ms"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    appender.await.unwrap();
    let h = head(&c).await;
    wait_for(
        "play at version 6 to reach the head",
        PATIENCE,
        &[&new],
        async || position(&c, NAME).await == h,
    )
    .await;
    new.stop();
    assert_eq!(marks_by_version(&c).await, [(6, h)]);
    assert_eq!(db.ledger(NAME).await, Some(("live".into(), h)));
}

// ---------------------------------------------------------------------------
// 3. The ledger, altered or dropped by hand

/// `position` altered to numeric: every command that reads the ledger exits
/// 2 naming the column, never panics.
#[tokio::test]
async fn a_ledger_column_altered_by_hand_is_exit_2_naming_it() {
    let db = TestDb::new().await;
    things(
        &db,
        100,
        &logger("trust_altered", "from_beginning", "thing_log"),
    )
    .await;
    db.run(&["boot"]).expect(0);
    db.client()
        .await
        .batch_execute("ALTER TABLE projectionist.projectors ALTER COLUMN position TYPE numeric")
        .await
        .unwrap();
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["status", "trust_altered"],
        vec!["boot"],
        vec!["verify"],
    ] {
        let run = db.run(&args);
        assert_eq!(
            run.code, 2,
            "{args:?}: expected exit 2\n--- stdout\n{}\n--- stderr\n{}",
            run.stdout, run.stderr
        );
        assert!(
            run.stderr.contains("`position`") && !run.stderr.contains("panicked"),
            "{args:?}: {}",
            run.stderr
        );
    }
    assert_eq!(
        db.count("SELECT count(*) FROM thing_log").await,
        100,
        "nothing was changed"
    );
}

/// reset, like status, boot and verify, exits 2 naming the column (and
/// changes nothing).
#[tokio::test]
async fn reset_exits_2_over_a_ledger_column_altered_by_hand() {
    let db = TestDb::new().await;
    things(
        &db,
        100,
        &logger("trust_altered_reset", "from_beginning", "thing_log"),
    )
    .await;
    db.run(&["boot"]).expect(0);
    db.client()
        .await
        .batch_execute("ALTER TABLE projectionist.projectors ALTER COLUMN position TYPE numeric")
        .await
        .unwrap();
    let run = db.run(&["reset", "trust_altered_reset", "--yes"]);
    run.expect(2);
    assert!(
        run.stderr.contains("`position`") && !run.stderr.contains("reachable"),
        "{}",
        run.stderr
    );
    assert_eq!(db.count("SELECT count(*) FROM thing_log").await, 100);
}

/// play, like every other command, exits 2 at start over an altered ledger
/// column instead of retrying it forever.
#[tokio::test]
async fn play_exits_2_over_a_ledger_column_altered_by_hand() {
    let db = TestDb::new().await;
    things(
        &db,
        100,
        &logger("trust_altered_play", "from_beginning", "thing_log"),
    )
    .await;
    db.run(&["boot"]).expect(0);
    db.client()
        .await
        .batch_execute("ALTER TABLE projectionist.projectors ALTER COLUMN position TYPE numeric")
        .await
        .unwrap();
    let mut play = Player::start(&db, "altered", &["--poll", "100ms"]);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = play.child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(10) {
            panic!(
                "play still runs 10 s after start over an altered ledger column\n{}",
                play.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(2), "{}", play.log());
    assert!(play.log().contains("`position`"), "{}", play.log());
}

/// `projectors` dropped by hand after a boot: commands say to run migrate;
/// migrate recreates the ledger; boot then refuses the projectors whose
/// tables hold rows (nothing written); `--adopt` boots an idempotent one over
/// its rows; a counter (not idempotent) is never replayed over its rows by
/// default, and `reset` rebuilds it exactly.
#[tokio::test]
async fn a_dropped_ledger_is_recreated_by_migrate_and_boot_never_replays_over_filled_tables() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE trust_idem (id bigint PRIMARY KEY); \
         CREATE TABLE trust_count (k int PRIMARY KEY, n bigint NOT NULL)",
    )
    .await
    .unwrap();
    db.write_manifest(&format!(
        "{THINGS_STORE}\n\
         [projectors.trust_idem]\ntables = [\"trust_idem\"]\n\
         on.Thing = \"INSERT INTO trust_idem (id) VALUES (:position) ON CONFLICT DO NOTHING\"\n\n\
         [projectors.trust_counter]\ntables = [\"trust_count\"]\n\
         on.Thing = \"INSERT INTO trust_count (k, n) VALUES (1, 1) ON CONFLICT (k) DO UPDATE SET n = trust_count.n + 1\"\n"
    ));
    add_things(&c, 1_010).await;
    db.run(&["boot"]).expect(0);
    let counter = async || count(&c, "SELECT n FROM trust_count").await;
    assert_eq!(counter().await, 1_010);

    c.batch_execute("DROP TABLE projectionist.projectors CASCADE")
        .await
        .unwrap();
    for args in [vec!["boot"], vec!["status"]] {
        let run = db.run(&args);
        run.expect(2);
        assert!(
            run.stderr.contains("run `projectionist migrate`") && run.stderr.contains("projectors"),
            "{args:?}: {}",
            run.stderr
        );
    }

    let run = db.run(&["migrate"]);
    run.expect(0);
    assert!(
        run.stderr.contains("recreating it") && run.stderr.contains("projectionist_before_repair"),
        "migrate should say it recreates the ledger: {}",
        run.stderr
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM projectionist.projectors").await,
        0
    );
    assert_eq!(
        count(
            &c,
            "SELECT (to_regclass('projectionist_before_repair.failures') IS NOT NULL)::int::bigint"
        )
        .await,
        1,
        "the surviving ledger tables are set aside"
    );

    // Both projectors count as new, and both tables hold rows: refused, nothing written.
    let refused = |run: &Run, name: &str| {
        run.expect(2);
        assert!(
            run.stderr.contains("never booted")
                && run.stderr.contains(&format!("`{name}` (table"))
                && run.stderr.contains("already hold")
                && run.stderr.contains("projectionist reset ")
                && run.stderr.contains(&format!("--adopt {name}")),
            "{}",
            run.stderr
        );
    };
    // Every refused projector is named at once.
    let run = db.run(&["boot"]);
    refused(&run, "trust_idem");
    refused(&run, "trust_counter");
    // The counter is refused too: adopting the other one does not boot it.
    let run = db.run(&["boot", "--adopt", "trust_idem"]);
    refused(&run, "trust_counter");
    let run = db.run(&["boot", "trust_counter"]);
    refused(&run, "trust_counter");
    assert_eq!(
        count(&c, "SELECT count(*) FROM projectionist.projectors").await,
        0,
        "a refused boot writes nothing"
    );
    assert_eq!(
        counter().await,
        1_010,
        "the counter was replayed over its rows"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM trust_idem").await, 1_010);

    // The counter is rebuilt from scratch: exactly one count per event.
    db.run(&["reset", "trust_counter", "--yes"]).expect(0);
    assert_eq!(counter().await, 1_010);
    assert_eq!(
        db.ledger("trust_counter").await,
        Some(("live".into(), 1_010))
    );
    // The idempotent one is adopted over its rows.
    db.run(&["boot"]).expect(2);
    db.run(&["boot", "--adopt", "trust_idem"]).expect(0);
    assert_eq!(count(&c, "SELECT count(*) FROM trust_idem").await, 1_010);
    assert_eq!(db.ledger("trust_idem").await, Some(("live".into(), 1_010)));
    assert_eq!(counter().await, 1_010);
    db.run(&["status"]).expect(0);
    db.run(&["boot"]).expect(0);
    assert_eq!(counter().await, 1_010);
}

// ---------------------------------------------------------------------------
// 4. Sparse positions

/// A logger over the store without a transaction column, and its table.
async fn sparse_store(db: &TestDb) -> Client {
    let c = db.client().await;
    c.batch_execute("CREATE TABLE trust_sparse_log (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    db.write_manifest(&format!(
        "{}\n{}",
        store(false),
        logger("trust_sparse", "from_beginning", "trust_sparse_log")
    ));
    c
}

/// Boots, and asserts it took less than `limit` and applied every event.
async fn boot_applies_all(db: &TestDb, c: &Client, limit: Duration) -> Duration {
    let events = count(c, "SELECT count(*) FROM events").await;
    let h = head(c).await;
    let (run, took) = timed(db, &["boot"]);
    run.expect(0);
    eprintln!("boot of {events} events up to position {h}: {took:?}");
    assert!(took < limit, "boot took {took:?} (limit {limit:?})");
    assert_eq!(
        count(c, "SELECT count(*) FROM trust_sparse_log").await,
        events
    );
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM events e WHERE NOT EXISTS (SELECT 1 FROM trust_sparse_log l WHERE l.id = e.id)"
        )
        .await,
        0
    );
    assert_eq!(db.ledger("trust_sparse").await, Some(("live".into(), h)));
    // Batches are bounded by events (10,000 by default), not by positions:
    // the holes are recorded per batch that passed any.
    let batches = passed_holes(db, "trust_sparse").len() as i64;
    assert!(
        batches <= events / 10_000 + 1,
        "{batches} batches recorded holes for {events} events"
    );
    took
}

/// How many holes the sparse logger passed, as `status NAME` counts them.
fn hole_count(db: &TestDb) -> i64 {
    passed_holes(db, "trust_sparse").iter().map(|h| h.2).sum()
}

#[tokio::test]
async fn a_gap_of_a_million_positions_boots_fast() {
    let db = TestDb::new().await;
    let c = sparse_store(&db).await;
    add_things(&c, 1_000).await;
    c.batch_execute("ALTER SEQUENCE events_id_seq RESTART WITH 1001001")
        .await
        .unwrap();
    add_things(&c, 10).await;
    assert_eq!(head(&c).await, 1_001_010);
    boot_applies_all(&db, &c, Duration::from_secs(5)).await;
    assert_eq!(passed_holes(&db, "trust_sparse"), [(1_001, 1_001_000, 1)]);
    assert_found_late(&db, &c, "trust_sparse", &[1_001, 500_000, 1_001_000]).await;
}

#[tokio::test]
async fn five_percent_rolled_back_ids_boot_fast() {
    let db = TestDb::new().await;
    let c = sparse_store(&db).await;
    // 42,105 inserts, every 20th rolled back (a subtransaction): its id stays unused.
    c.batch_execute(
        "DO $$ BEGIN \
           FOR i IN 1..42105 LOOP \
             IF i % 20 = 0 THEN \
               BEGIN \
                 INSERT INTO events (aggregate_id, aggregate_name, name, data) \
                   VALUES (gen_random_uuid(), 'thing', 'Thing', '{}'); \
                 RAISE EXCEPTION 'rolled back'; \
               EXCEPTION WHEN raise_exception THEN NULL; \
               END; \
             ELSE \
               INSERT INTO events (aggregate_id, aggregate_name, name, data) \
                 VALUES (gen_random_uuid(), 'thing', 'Thing', '{}'); \
             END IF; \
           END LOOP; \
         END $$",
    )
    .await
    .unwrap();
    assert_eq!(count(&c, "SELECT count(*) FROM events").await, 40_000);
    assert_eq!(head(&c).await, 42_105);
    boot_applies_all(&db, &c, Duration::from_secs(15)).await;
    assert_eq!(hole_count(&db), 2_105);
    // The holes recorded are the rolled-back ids: an event at one is late.
    assert_found_late(&db, &c, "trust_sparse", &[20, 20_000, 42_100]).await;
}

#[tokio::test]
async fn a_sequence_incrementing_by_1000_boots_fast() {
    let db = TestDb::new().await;
    let c = sparse_store(&db).await;
    c.batch_execute("ALTER SEQUENCE events_id_seq INCREMENT BY 1000")
        .await
        .unwrap();
    add_things(&c, 10_000).await;
    assert_eq!(head(&c).await, 9_999_001);
    boot_applies_all(&db, &c, Duration::from_secs(10)).await;
    assert_eq!(hole_count(&db), 9_999);
    assert_found_late(&db, &c, "trust_sparse", &[2, 1_500, 9_998_999]).await;
}

// ---------------------------------------------------------------------------
// 5. verify under traffic

/// A check of `band` that does not stop its events query at `:position`.
const BAND_CHECK_WITHOUT_POSITION: &str = "[[projectors.band.check]]\n\
name = \"bands, without position\"\n\
projection = \"SELECT count(*) FROM band\"\n\
events = \"SELECT count(DISTINCT data->>'name') FROM events WHERE name = 'BandCreated'\"\n";

/// The checks of a `verify --json`.
fn checks_of(run: &Run) -> Vec<Value> {
    parse_json(run)["checks"]
        .as_array()
        .expect("checks is a list")
        .clone()
}

/// Traffic until `stop`: a writer thread running `scripts/gen-events 200` in a
/// loop (it returns how many runs), and a task inserting a band of its own
/// every 20 ms, a commit each (it returns how many bands).
async fn start_traffic(
    db: &TestDb,
    stop: &Arc<AtomicBool>,
) -> (std::thread::JoinHandle<i32>, tokio::task::JoinHandle<i32>) {
    // A writer appends dancefinder events all along.
    let writer = {
        let stop = stop.clone();
        let url = db.url.clone();
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(Ordering::SeqCst) {
                let out = Command::new(root().join("scripts/gen-events"))
                    .arg("200")
                    .env("DATABASE_URL", &url)
                    .stdout(Stdio::null())
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "gen-events: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                runs += 1;
            }
            runs
        })
    };

    // And bands of their own, one every 20 ms (a commit each).
    let bands = {
        let stop = stop.clone();
        let w = db.client().await;
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                w.execute(
                    "INSERT INTO events (aggregate_id, aggregate_name, name, data) \
                     VALUES (gen_random_uuid(), 'domain.Band', 'BandCreated', jsonb_build_object('name', $1::text))",
                    &[&format!("Trust Band {n}")],
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            n
        })
    };
    (writer, bands)
}

/// 20 `verify --json` under traffic, 100 ms apart: each exits 0 with its 7
/// checks ok, but the check without :position, which may be BEHIND. Returns in
/// how many it was.
async fn twenty_verifies_without_a_mismatch(db: &TestDb) -> usize {
    let mut behind = 0;
    for i in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let run = db.run(&["verify", "--json"]);
        let checks = checks_of(&run);
        assert_eq!(
            run.code, 0,
            "verify #{i} under traffic failed\n{}\n{}",
            run.stdout, run.stderr
        );
        assert_eq!(checks.len(), 7, "{}", run.stdout);
        for check in &checks {
            if check["check"] == "bands, without position" {
                // Differs whenever band is behind in verify's snapshot: BEHIND then.
                assert!(
                    check["result"] == "ok" || check["result"] == "behind",
                    "verify #{i}: {check}"
                );
                behind += usize::from(check["result"] == "behind");
            } else {
                assert_eq!(check["result"], "ok", "verify #{i}: {check}");
            }
        }
    }
    behind
}

/// With play stopped: a check without :position while band lags is BEHIND
/// (exit 0), and a row deleted behind band's back is still a MISMATCH.
async fn behind_then_a_real_mismatch(db: &TestDb, c: &Client) {
    // A check without :position while band lags (play is stopped): BEHIND, exit 0.
    c.execute(
        "INSERT INTO events (aggregate_id, aggregate_name, name, data) \
         VALUES (gen_random_uuid(), 'domain.Band', 'BandCreated', '{\"name\": \"Trust Lagging Band\"}')",
        &[],
    )
    .await
    .unwrap();
    let run = db.run(&["verify", "--json"]);
    run.expect(0);
    let checks = checks_of(&run);
    let result = |checks: &[Value], name: &str| {
        checks
            .iter()
            .find(|k| k["check"] == name)
            .unwrap_or_else(|| panic!("no check {name} in {checks:?}"))["result"]
            .clone()
    };
    assert_eq!(result(&checks, "bands, without position"), "behind");
    assert_eq!(result(&checks, "one band per BandCreated name"), "ok");
    let run = db.run(&["verify"]);
    run.expect(0);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.contains("bands, without position") && l.contains("BEHIND")),
        "{}",
        run.stdout
    );

    // A row deleted behind band's back: a mismatch at its position, still.
    c.execute(
        "DELETE FROM band WHERE name = (SELECT min(name) FROM band)",
        &[],
    )
    .await
    .unwrap();
    let run = db.run(&["verify", "--json"]);
    run.expect(1);
    let checks = checks_of(&run);
    assert_eq!(result(&checks, "one band per BandCreated name"), "mismatch");
    assert_eq!(result(&checks, "bands, without position"), "behind");
    let run = db.run(&["verify"]);
    run.expect(1);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.contains("one band per BandCreated name") && l.contains("MISMATCH")),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_under_traffic_reports_no_mismatch_and_heals_nothing() {
    let db = TestDb::new().await;
    // The example's four SQL projectors and their six checks (all stop their
    // events query at :position), and one check of band that does not.
    example_only(&db, &SQL_PROJECTORS, BAND_CHECK_WITHOUT_POSITION);
    db.gen_events(2_000);
    db.run(&["boot"]).expect(0);
    let c = db.client().await;
    let mut play = Player::start(&db, "traffic", &["--poll", "100ms"]);
    wait_for(
        "play to own the four projectors",
        PATIENCE,
        &[&play],
        async || owned_by(&c, &play).await.len() == SQL_PROJECTORS.len(),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let (writer, bands) = start_traffic(&db, &stop).await;

    let before = head(&c).await;
    let behind = twenty_verifies_without_a_mismatch(&db).await;
    let run = db.run(&["verify", "--heal", "--json"]);
    run.expect(0);
    let json = parse_json(&run);
    assert_eq!(json["healed"], json!([]), "{json}");
    assert_eq!(json["after_heal"], json!([]), "{json}");
    assert!(!run.stderr.contains("healing"), "{}", run.stderr);
    let after = head(&c).await;
    stop.store(true, Ordering::SeqCst);
    let runs = writer.join().unwrap();
    let bands = bands.await.unwrap();
    eprintln!(
        "{runs} gen-events runs and {bands} bands; head {before} -> {after} during the verifies; \
         band was behind in {behind} of the 20 verifies"
    );
    assert!(
        after >= before + 100,
        "the writer did not keep appending during the verifies ({before} -> {after})"
    );

    let h = head(&c).await;
    wait_for(
        "every projector to reach the head",
        PATIENCE,
        &[&play],
        async || {
            let mut all = true;
            for p in SQL_PROJECTORS {
                all &= position(&c, p).await == h;
            }
            all
        },
    )
    .await;
    play.stop();
    db.assert_tables_match_expected().await;
    db.run(&["verify"]).expect(0);

    behind_then_a_real_mismatch(&db, &c).await;
}

// ---------------------------------------------------------------------------
// 6. A prepared transaction in status

/// Rolls a prepared transaction back when dropped, if it is still there (a
/// prepared transaction would keep its database from being dropped).
struct PreparedGuard {
    url: String,
    gid: String,
}

impl Drop for PreparedGuard {
    fn drop(&mut self) {
        let (url, gid) = (self.url.clone(), self.gid.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    tokio::spawn(conn);
                    let _ = c.batch_execute(&format!("ROLLBACK PREPARED '{gid}'")).await;
                }
            });
        })
        .join();
    }
}

#[tokio::test]
async fn a_prepared_transaction_holding_the_head_back_shows_in_status() {
    let db = TestDb::new().await;
    let c = thing_store(
        &db,
        true,
        "CREATE TABLE trust_prep_log (id bigint PRIMARY KEY)",
        &logger("trust_prep", "from_beginning", "trust_prep_log"),
    )
    .await;
    let max: String = c
        .query_one("SHOW max_prepared_transactions", &[])
        .await
        .unwrap()
        .get(0);
    if max == "0" {
        eprintln!(
            "SKIP: max_prepared_transactions is 0 on this server: no prepared transaction to show \
             (scripts/test's throwaway cluster sets it)"
        );
        return;
    }
    add_things(&c, 5).await;
    db.run(&["boot"]).expect(0);

    // A transaction that ran NOTIFY cannot be prepared: no notify trigger here.
    c.batch_execute("DROP TRIGGER events_notify ON events")
        .await
        .unwrap();
    let gid = format!("{}_held", db.name);
    let _guard = PreparedGuard {
        url: db.url.clone(),
        gid: gid.clone(),
    };
    let w = db.client().await;
    w.batch_execute(&format!(
        "BEGIN; INSERT INTO events (aggregate_id, aggregate_name, name, data) \
         VALUES (gen_random_uuid(), 'thing', 'Thing', '{{}}'); PREPARE TRANSACTION '{gid}'"
    ))
    .await
    .unwrap();
    // An event committed after it (position 7: the prepared one holds 6).
    assert_eq!(add_event(&c, "Thing", json!({})).await, 7);
    // status lists the transactions older than a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let run = db.run(&["status"]);
    run.expect(0);
    assert!(
        run.stdout
            .contains(&format!("held back by: prepared transaction '{gid}'")),
        "{}",
        run.stdout
    );
    let run = db.run(&["status", "--json"]);
    run.expect(0);
    let json = parse_json(&run);
    let holding = json["holding"].as_array().expect("holding is a list");
    assert_eq!(holding.len(), 1, "{json}");
    assert_eq!(holding[0]["prepared"], gid.as_str(), "{json}");
    assert_eq!(holding[0]["pid"], Value::Null, "{json}");
    // The event committed after it is held back: a boot plays nothing past it.
    db.write_manifest(&format!(
        "{THINGS_STORE}\n{}{}",
        logger("trust_prep", "from_beginning", "trust_prep_log"),
        logger("trust_prep_new", "from_beginning", "thing_log")
    ));
    c.batch_execute("CREATE TABLE thing_log (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    db.run(&["boot", "--writer-wait", "1s"]).expect(0);
    assert_eq!(ids(&c, "thing_log").await, [1, 2, 3, 4, 5]);

    c.batch_execute(&format!("COMMIT PREPARED '{gid}'"))
        .await
        .unwrap();
    let run = db.run(&["status"]);
    run.expect(0);
    assert!(
        !run.stdout.contains("prepared transaction"),
        "{}",
        run.stdout
    );
    let run = db.run(&["status", "--json"]);
    run.expect(0);
    assert_eq!(parse_json(&run)["holding"], json!([]));
}
