//! Gap safety against a real PostgreSQL: no event is ever skipped
//! because transactions commit out of order, with and without the store's
//! transaction column; holes left by rolled-back inserts are passed promptly
//! and recorded.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;
use tokio_postgres::Client;

/// The store, with or without `transaction = "tx"`, and the given projectors.
fn manifest(with_tx: bool, projectors: &str) -> String {
    format!(
        "[store]\ntable = \"events\"\nposition = \"id\"\ntype = \"name\"\ndata = \"data\"\ntime = \"tstamp\"\n{}\n{projectors}",
        if with_tx {
            "transaction = \"tx\"\n"
        } else {
            ""
        }
    )
}

fn seen(version: i32) -> String {
    format!(
        "[projectors.seen]\ntables = [\"seen\"]\nversion = {version}\non.Thing = \"INSERT INTO seen (id) VALUES (:position)\"\n"
    )
}

const SEEN_LATER: &str = "[projectors.seen_later]\ntables = [\"seen_later\"]\non.Thing = \"INSERT INTO seen_later (id) VALUES (:position)\"\n";

async fn setup(db: &TestDb, with_tx: bool) {
    db.client()
        .await
        .batch_execute("CREATE TABLE seen (id bigint PRIMARY KEY); CREATE TABLE seen_later (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    db.write_manifest(&manifest(with_tx, &seen(1)));
}

const INSERT: &str = "INSERT INTO events (aggregate_id, aggregate_name, name, data) \
                      VALUES (gen_random_uuid(), 'x', 'Thing', '{}') RETURNING id";

/// Opens a transaction on `c` that inserts one event, and leaves it open.
async fn open_writer(c: &Client) -> i64 {
    c.batch_execute("BEGIN").await.unwrap();
    c.query_one(INSERT, &[]).await.unwrap().get(0)
}

/// Inserts one event and commits it (autocommit).
async fn committed(c: &Client) -> i64 {
    c.query_one(INSERT, &[]).await.unwrap().get(0)
}

async fn ids(db: &TestDb, table: &str) -> Vec<i64> {
    db.client()
        .await
        .query(&format!("SELECT id FROM {table} ORDER BY id"), &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

fn spawn(db: &TestDb, args: &[&str]) -> Child {
    db.command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` to exit, up to `limit`; kills it (and fails) past that.
async fn finish(mut child: Child, limit: Duration) -> (Run, Duration) {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return (
                Run::from(child.wait_with_output().unwrap()),
                started.elapsed(),
            );
        }
        if started.elapsed() > limit {
            child.kill().ok();
            let run = Run::from(child.wait_with_output().unwrap());
            panic!(
                "still running after {limit:?}\n--- stdout\n{}\n--- stderr\n{}",
                run.stdout, run.stderr
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Asserts `child` is still running.
fn assert_running(child: &mut Child, what: &str) {
    if let Some(status) = child.try_wait().unwrap() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err).ok();
        }
        panic!("{what}: it exited ({status}) instead of waiting\n--- stderr\n{err}");
    }
}

// (a) A running transaction holds an event behind a committed one.

async fn open_writer_holds_boot_until_it_commits(with_tx: bool) {
    let db = TestDb::new().await;
    setup(&db, with_tx).await;
    let (ca, cb) = (db.client().await, db.client().await);
    let a = open_writer(&ca).await;
    let b = committed(&cb).await;
    assert!(a < b);

    let mut boot = spawn(&db, &["boot", "--writer-wait", "30s"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_running(
        &mut boot,
        "boot with a running writer behind a committed event",
    );
    assert_eq!(
        ids(&db, "seen").await,
        Vec::<i64>::new(),
        "an event was played past the running transaction's"
    );
    assert_eq!(db.ledger("seen").await, Some(("booting".into(), 0)));

    ca.batch_execute("COMMIT").await.unwrap();
    let (run, took) = finish(boot, Duration::from_secs(5)).await;
    run.expect(0);
    assert!(
        took < Duration::from_secs(2),
        "boot took {took:?} to notice the commit"
    );
    assert_eq!(ids(&db, "seen").await, vec![a, b]);
    assert_eq!(db.ledger("seen").await, Some(("live".into(), b)));

    // A second boot over an already-booted store: `seen` is rebuilt (version 2)
    // and `seen_later` is new; again one new event is held behind a running one.
    db.write_manifest(&manifest(with_tx, &format!("{}\n{SEEN_LATER}", seen(2))));
    let a2 = open_writer(&ca).await;
    let b2 = committed(&cb).await;
    assert!(a2 < b2);
    let mut boot = spawn(&db, &["boot", "--writer-wait", "30s"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_running(&mut boot, "second boot with a running writer");
    for t in ["seen", "seen_later"] {
        assert_eq!(
            ids(&db, t).await,
            vec![a, b],
            "{t}: played past the running transaction's event, or missed settled ones"
        );
    }
    // The new `seen_later` boots; `seen` version 2 is built beside the live
    // version 1, which keeps serving (live at b).
    assert_eq!(
        db.ledger("seen_later").await,
        Some(("booting".into(), b)),
        "seen_later"
    );
    assert_eq!(db.ledger("seen").await, Some(("live".into(), b)), "seen");
    let build: (String, i64) = {
        let r = db
            .client()
            .await
            .query_one(
                "SELECT state, position FROM projectionist.versions WHERE projector = 'seen' AND kind = 'build'",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(build, ("booting".into(), b), "the build of seen");
    ca.batch_execute("COMMIT").await.unwrap();
    let (run, _) = finish(boot, Duration::from_secs(5)).await;
    run.expect(0);
    assert!(!run.stderr.contains("duplicate key"), "{}", run.stderr);
    for t in ["seen", "seen_later"] {
        assert_eq!(ids(&db, t).await, vec![a, b, a2, b2], "{t}");
        assert_eq!(
            db.count(&format!("SELECT count(*) FROM {t}")).await,
            4,
            "{t}"
        );
    }
    for p in ["seen", "seen_later"] {
        assert_eq!(db.ledger(p).await, Some(("live".into(), b2)), "{p}");
    }
}

#[tokio::test]
async fn open_writer_holds_boot_until_it_commits_with_transaction_column() {
    open_writer_holds_boot_until_it_commits(true).await;
}

#[tokio::test]
async fn open_writer_holds_boot_until_it_commits_without_transaction_column() {
    open_writer_holds_boot_until_it_commits(false).await;
}

// (a') The writer never commits while boot waits: boot gives up after
// --writer-wait, marks the projector live *before* the held event, and play
// projects both once the writer commits.

async fn writer_wait_expires_without_skipping(with_tx: bool) {
    let db = TestDb::new().await;
    setup(&db, with_tx).await;
    let (ca, cb) = (db.client().await, db.client().await);
    let first = committed(&cb).await;
    let a = open_writer(&ca).await;
    let b = committed(&cb).await;

    let started = Instant::now();
    let run = db.run(&["boot", "--writer-wait", "1s"]);
    let took = started.elapsed();
    run.expect(0);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "boot took {took:?}"
    );
    assert!(
        run.stderr.contains("still hold committed events"),
        "boot should say it left events behind a running transaction\n{}",
        run.stderr
    );
    // Live, but not past the running transaction's event: B was neither played nor skipped.
    assert_eq!(db.ledger("seen").await, Some(("live".into(), first)));
    assert_eq!(ids(&db, "seen").await, vec![first]);

    ca.batch_execute("COMMIT").await.unwrap();
    // Boot leaves a live projector to play; a new projector booted now sees all three.
    db.write_manifest(&manifest(with_tx, &format!("{}\n{SEEN_LATER}", seen(1))));
    let again = db.run(&["boot", "--writer-wait", "1s", "--json"]);
    again.expect(0);
    let json: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(
        json["projectors"].as_array().unwrap().len(),
        1,
        "{}",
        again.stdout
    );
    assert_eq!(json["projectors"][0]["name"], "seen_later");
    assert_eq!(ids(&db, "seen_later").await, vec![first, a, b]);
    assert_eq!(ids(&db, "seen").await, vec![first]);

    // play takes the live projector from where boot left it.
    let mut play = spawn(&db, &["play", "--poll", "100ms"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while db.ledger("seen").await.unwrap().1 != b {
        assert_running(&mut play, "play");
        assert!(
            Instant::now() < deadline,
            "play did not catch up: {:?}",
            db.ledger("seen").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = play.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (run, _) = finish(play, Duration::from_secs(5)).await;
    run.expect(0);
    assert_eq!(ids(&db, "seen").await, vec![first, a, b]);
}

#[tokio::test]
async fn writer_wait_expires_without_skipping_with_transaction_column() {
    writer_wait_expires_without_skipping(true).await;
}

#[tokio::test]
async fn writer_wait_expires_without_skipping_without_transaction_column() {
    writer_wait_expires_without_skipping(false).await;
}

// (b) and (c): a rolled-back insert.

/// A rolled-back insert, then a committed one: (rolled-back id, committed id).
async fn rolled_back_then_committed(c: &Client) -> (i64, i64) {
    c.batch_execute("BEGIN").await.unwrap();
    let gone: i64 = c.query_one(INSERT, &[]).await.unwrap().get(0);
    c.batch_execute("ROLLBACK").await.unwrap();
    (gone, committed(c).await)
}

async fn holes(db: &TestDb) -> Vec<(i64, i64)> {
    db.client()
        .await
        .query(
            "SELECT DISTINCT first_position, last_position FROM projectionist.holes ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Runs boot to the end, timed.
fn timed_boot(db: &TestDb) -> (Run, Duration) {
    let started = Instant::now();
    let run = db.run(&["boot", "--writer-wait", "30s"]);
    (run, started.elapsed())
}

#[tokio::test]
async fn a_rolled_back_insert_leaves_a_hole_that_is_passed_at_once_and_recorded() {
    let db = TestDb::new().await;
    setup(&db, false).await;
    let c = db.client().await;
    let (gone, kept) = rolled_back_then_committed(&c).await;

    let (run, took) = timed_boot(&db);
    run.expect(0);
    assert!(
        took < Duration::from_secs(3),
        "boot waited at a hole no transaction can fill: {took:?}"
    );
    assert_eq!(ids(&db, "seen").await, vec![kept]);
    assert_eq!(db.ledger("seen").await, Some(("live".into(), kept)));
    assert_eq!(holes(&db).await, vec![(gone, gone)]);

    // More events, and a transaction that is still running with an insert of
    // its own (beyond the head, so it holds nothing back). Had the hole not been
    // recorded, a rebuild would wait at it for this transaction (it holds a
    // write lock on the table and began before the hole would be seen again).
    let more = [committed(&c).await, committed(&c).await];
    let other = db.client().await;
    let pending = open_writer(&other).await;
    db.write_manifest(&manifest(false, &seen(2)));
    let (run, took) = timed_boot(&db);
    run.expect(0);
    assert!(
        took < Duration::from_secs(3),
        "the second boot waited at a recorded hole: {took:?}\n{}",
        run.stderr
    );
    assert_eq!(ids(&db, "seen").await, vec![kept, more[0], more[1]]);
    assert_eq!(db.ledger("seen").await, Some(("live".into(), more[1])));
    assert_eq!(holes(&db).await, vec![(gone, gone)]);
    other.batch_execute("ROLLBACK").await.unwrap();
    assert!(pending > more[1]);
}

#[tokio::test]
async fn a_rolled_back_insert_is_irrelevant_with_the_transaction_column() {
    let db = TestDb::new().await;
    setup(&db, true).await;
    let c = db.client().await;
    let (_gone, kept) = rolled_back_then_committed(&c).await;

    let (run, took) = timed_boot(&db);
    run.expect(0);
    assert!(took < Duration::from_secs(3), "boot waited: {took:?}");
    assert_eq!(ids(&db, "seen").await, vec![kept]);
    assert_eq!(db.ledger("seen").await, Some(("live".into(), kept)));
    assert_eq!(
        holes(&db).await,
        vec![],
        "no hole logic with a transaction column"
    );

    // A transaction that began after the committed events does not hold them back.
    let more = [committed(&c).await, committed(&c).await];
    let other = db.client().await;
    let _pending = open_writer(&other).await;
    db.write_manifest(&manifest(true, &seen(2)));
    let (run, took) = timed_boot(&db);
    run.expect(0);
    assert!(
        took < Duration::from_secs(3),
        "boot waited for an unrelated later transaction: {took:?}\n{}",
        run.stderr
    );
    assert_eq!(ids(&db, "seen").await, vec![kept, more[0], more[1]]);
    assert_eq!(db.ledger("seen").await, Some(("live".into(), more[1])));
    assert_eq!(holes(&db).await, vec![]);
    other.batch_execute("ROLLBACK").await.unwrap();
}
