//! Command projectors with real child processes: delivery, failure,
//! at-least-once across SIGKILL, protocol errors, filtering.

use std::collections::HashMap;

use crate::harness::*;

fn recorder_manifest(db: &TestDb, env_prefix: &str, extra: &str) {
    let recorder = root().join("tests/fixtures/recorder.py");
    db.write_manifest(&format!(
        "[store]\ntable = \"events\"\nposition = \"id\"\ntype = \"name\"\ndata = \"data\"\nstream = \"aggregate_id\"\ntime = \"tstamp\"\ntransaction = \"tx\"\n\n\
         [projectors.recorder]\ncommand = [\"env\", {env_prefix} \"python3\", \"{}\"]\n{extra}\n",
        recorder.display()
    ));
}

async fn add_events(db: &TestDb, n: i64, kind: &str) {
    db.client()
        .await
        .execute(
            "INSERT INTO events (aggregate_id, aggregate_name, name, data) \
             SELECT gen_random_uuid(), 'thing', $2, jsonb_build_object('i', i, 'text', 'it''s \"quoted\" ünïcode') \
             FROM generate_series(1::bigint, $1) i",
            &[&n, &kind],
        )
        .await
        .unwrap();
}

fn recorded(db: &TestDb) -> Vec<i64> {
    std::fs::read_to_string(db.dir.path().join("record.txt"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn boot_delivers_each_event_exactly_once_in_order() {
    let db = TestDb::new().await;
    add_events(&db, 25_000, "Thing").await;
    recorder_manifest(&db, "\"RECORD_FILE=record.txt\",", "");
    db.run(&["boot", "--batch-size", "1000"]).expect(0);
    let seen = recorded(&db);
    assert_eq!(seen, (1..=25_000).collect::<Vec<i64>>());
    assert_eq!(
        db.ledger("recorder").await.unwrap(),
        ("live".into(), 25_000)
    );
    // Each line is the protocol's event: time in RFC 3339.
    let first = std::fs::read_to_string(db.dir.path().join("record.txt")).unwrap();
    let time = first.lines().next().unwrap().split(' ').nth(2).unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{time}");
}

#[tokio::test]
async fn only_the_listed_event_types_are_sent() {
    let db = TestDb::new().await;
    add_events(&db, 100, "Thing").await;
    add_events(&db, 50, "Other").await;
    recorder_manifest(&db, "\"RECORD_FILE=record.txt\",", "events = [\"Other\"]");
    db.run(&["boot"]).expect(0);
    assert_eq!(recorded(&db), (101..=150).collect::<Vec<i64>>());
    assert_eq!(db.ledger("recorder").await.unwrap().1, 150);
}

#[tokio::test]
async fn sigkill_mid_boot_then_boot_again_delivers_at_least_once_duplicates_only_after_the_checkpoint()
 {
    let db = TestDb::new().await;
    add_events(&db, 200_000, "Thing").await;
    recorder_manifest(&db, "\"RECORD_FILE=record.txt\", \"ACK_EVERY=250\",", "");
    let mut child = db
        .command(&["boot", "--batch-size", "1000", "-q"])
        .spawn()
        .unwrap();
    let checkpoint = loop {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "boot finished before it could be killed"
        );
        if let Some((_, p)) = db.ledger("recorder").await
            && p >= 30_000
        {
            child.kill().unwrap();
            child.wait().unwrap();
            break db.ledger("recorder").await.unwrap().1;
        }
    };
    // Let the orphaned child see its closed stdin and exit.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    db.run(&["boot"]).expect(0);
    let seen = recorded(&db);
    let mut counts: HashMap<i64, u32> = HashMap::new();
    for p in &seen {
        *counts.entry(*p).or_default() += 1;
    }
    for p in 1..=200_000 {
        assert!(counts.contains_key(&p), "event {p} never delivered");
    }
    for (p, n) in &counts {
        if *n > 1 {
            assert!(
                *p > checkpoint,
                "event {p} delivered {n} times but the checkpoint was {checkpoint}"
            );
        }
    }
    assert_eq!(
        db.ledger("recorder").await.unwrap(),
        ("live".into(), 200_000)
    );
}

#[tokio::test]
async fn a_consumer_exiting_3_breaks_the_projector_at_that_event_with_its_stderr() {
    let db = TestDb::new().await;
    add_events(&db, 500, "Thing").await;
    // It acknowledges each event as it goes, so the first unacknowledged one is the 100th.
    recorder_manifest(
        &db,
        "\"RECORD_FILE=record.txt\", \"EXIT_AT=100\", \"ACK_EVERY=1\",",
        "",
    );
    let run = db.run(&["boot"]);
    run.expect(1);
    assert!(
        run.stderr
            .contains("projector `recorder` broke at event #100 (Thing"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("recorder: giving up at event 100"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("exited with exit status: 3"),
        "{}",
        run.stderr
    );
    let c = db.client().await;
    let row = c
        .query_one("SELECT state, position, error_position, error FROM projectionist.projectors WHERE name = 'recorder'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "broken");
    assert_eq!(row.get::<_, i64>(1), 99, "the acknowledged events are kept");
    assert_eq!(row.get::<_, i64>(2), 100);
    assert!(row.get::<_, String>(3).contains("giving up at event 100"));
}

#[tokio::test]
async fn an_error_line_breaks_at_its_position_and_keeps_what_came_before() {
    let db = TestDb::new().await;
    add_events(&db, 300, "Thing").await;
    recorder_manifest(&db, "\"RECORD_FILE=record.txt\", \"ERROR_AT=120\",", "");
    db.run(&["boot"]).expect(1);
    assert_eq!(db.ledger("recorder").await.unwrap(), ("broken".into(), 119));
    assert_eq!(
        db.count("SELECT error_position FROM projectionist.projectors WHERE name = 'recorder'")
            .await,
        120
    );
}

#[tokio::test]
async fn stray_stdout_is_a_protocol_error_naming_the_line() {
    let db = TestDb::new().await;
    add_events(&db, 50, "Thing").await;
    recorder_manifest(&db, "\"RECORD_FILE=record.txt\", \"GARBAGE_AT=10\",", "");
    let run = db.run(&["boot"]);
    run.expect(1);
    assert!(
        run.stderr
            .contains("unexpected line on stdout: `hello from the projector`"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn no_ack_within_ack_timeout_breaks_the_projector() {
    let db = TestDb::new().await;
    add_events(&db, 20, "Thing").await;
    recorder_manifest(
        &db,
        "\"RECORD_FILE=record.txt\", \"NO_ACK=1\",",
        "ack_timeout = \"1s\"",
    );
    let started = std::time::Instant::now();
    let run = db.run(&["boot"]);
    run.expect(1);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert!(run.stderr.contains("no ack within 1s"), "{}", run.stderr);
    assert_eq!(db.ledger("recorder").await.unwrap(), ("broken".into(), 0));
}

#[tokio::test]
async fn the_example_command_projectors_work() {
    let db = TestDb::new().await;
    db.gen_events(3_000);
    db.run(&["boot"]).expect(0);
    // hall_city keeps a table through psql.
    db.run(&["verify", "hall_city"]).expect(0);
    assert!(db.count("SELECT count(*) FROM hall_city").await > 0);
    // welcome_email is from_now: nothing historical was sent.
    assert_eq!(db.ledger("welcome_email").await.unwrap().1, 3_000);
    assert!(!db.dir.path().join("welcome_email_outbox.jsonl").exists());
    // It refuses a reset without --allow-side-effects.
    let run = db.run(&["reset", "welcome_email", "--yes"]);
    run.expect(2);
    assert!(run.stderr.contains("side effects"), "{}", run.stderr);
}
