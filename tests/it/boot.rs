//! `boot` against a real PostgreSQL: run modes, failure semantics, crash
//! safety and concurrency.

use tokio_postgres::Client;

use crate::harness::*;

#[tokio::test]
async fn boot_makes_the_example_live_and_equal_to_set_based_sql() {
    let db = TestDb::new().await;
    db.gen_events(20_000);
    let run = db.run(&["boot"]);
    run.expect(0);
    for p in ["band", "dancehall", "event", "userpreferences"] {
        assert_eq!(db.ledger(p).await.unwrap().0, "live", "{p}");
        assert_eq!(db.ledger(p).await.unwrap().1, 20_000, "{p}");
    }
    db.assert_tables_match_expected().await;
    // A second boot has nothing to do.
    let again = db.run(&["boot", "--json"]);
    again.expect(0);
    let json: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(json["projectors"].as_array().unwrap().len(), 0);
}

const FRAGILE: &str = r#"
[projectors.fragile]
tables = ["thing_log"]
on.Thing = "INSERT INTO thing_log (id, v) VALUES (:position, 100 / (:position - 5000))"

[projectors.follower]
tables = ["after_log"]
after = ["fragile"]
on.Thing = "INSERT INTO after_log (id) VALUES (:position)"
"#;

#[tokio::test]
async fn a_failing_handler_breaks_its_projector_stalls_the_others_and_resumes_once_fixed() {
    let db = TestDb::new().await;
    things(
        &db,
        10_000,
        &format!("[alert]\ncommand = [\"sh\", \"-c\", \"cat > alert.json\"]\n{FRAGILE}"),
    )
    .await;
    let run = Run::from(
        db.command(&["boot", "--batch-size", "1000"])
            .env("GITHUB_ACTIONS", "true")
            .output()
            .unwrap(),
    );
    run.expect(1);
    assert!(
        run.stderr
            .contains("projector `fragile` broke at event #5000 (Thing"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("division by zero"), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("::error title=projectionist boot::projector fragile broke at event #5000"),
        "{}",
        run.stderr
    );
    assert_eq!(db.ledger("fragile").await.unwrap(), ("broken".into(), 4999));
    let (state, pos) = db.ledger("follower").await.unwrap();
    assert_eq!(state, "stalled");
    assert!(
        pos <= 4999,
        "follower went past the broken projector: {pos}"
    );
    let c = db.client().await;
    let row = c
        .query_one("SELECT error, error_position, error_type FROM projectionist.projectors WHERE name = 'fragile'", &[])
        .await
        .unwrap();
    assert!(row.get::<_, String>(0).contains("division by zero"));
    assert_eq!(row.get::<_, i64>(1), 5000);
    assert_eq!(row.get::<_, String>(2), "Thing");
    assert_eq!(db.count("SELECT count(*) FROM projectionist.failures WHERE projector = 'fragile' AND position = 5000").await, 1);
    // Everything before the failing event was kept, nothing after it.
    assert_eq!(db.count("SELECT count(*) FROM thing_log").await, 4999);
    let alert: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(db.dir.path().join("alert.json")).unwrap())
            .unwrap();
    assert_eq!(alert["projector"], "fragile");
    assert_eq!(alert["position"], 5000);
    assert_eq!(alert["type"], "Thing");

    // Fix the handler; the next boot resumes both from their positions.
    db.write_manifest(
        &std::fs::read_to_string(db.manifest_path())
            .unwrap()
            .replace("100 / (:position - 5000)", "1"),
    );
    db.run(&["boot"]).expect(0);
    assert_eq!(db.ledger("fragile").await.unwrap(), ("live".into(), 10_000));
    assert_eq!(
        db.ledger("follower").await.unwrap(),
        ("live".into(), 10_000)
    );
    assert_eq!(db.count("SELECT count(*) FROM thing_log").await, 10_000);
    assert_eq!(db.count("SELECT count(*) FROM after_log").await, 10_000);
}

#[tokio::test]
async fn a_failing_alert_command_is_reported_not_fatal() {
    let db = TestDb::new().await;
    things(
        &db,
        6_000,
        &format!("[alert]\ncommand = [\"sh\", \"-c\", \"echo pager down >&2; exit 7\"]\n{FRAGILE}"),
    )
    .await;
    let run = db.run(&["boot"]);
    run.expect(1);
    assert!(run.stderr.contains("the alert command"), "{}", run.stderr);
    assert!(run.stderr.contains("pager down"), "{}", run.stderr);
}

const COUNTER: &str = r#"
[projectors.counter]
tables = []
on.Thing = ["UPDATE counter SET n = n + 1", "INSERT INTO seen (id) VALUES (:position)"]
"#;

#[tokio::test]
async fn sigkill_mid_boot_then_boot_again_applies_every_event_exactly_once() {
    let db = TestDb::new().await;
    things(&db, 120_000, COUNTER).await;
    // Kill it twice at different points, then let it finish.
    for kill_after in [15_000i64, 60_000] {
        let mut child = db
            .command(&["boot", "--batch-size", "500", "-q"])
            .spawn()
            .unwrap();
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if let Some(status) = child.try_wait().unwrap() {
                panic!("boot ended before it could be killed: {status}");
            }
            if db
                .ledger("counter")
                .await
                .is_some_and(|(_, p)| p >= kill_after)
            {
                break;
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let (state, _) = db.ledger("counter").await.unwrap();
        assert_eq!(state, "booting");
    }
    db.run(&["boot"]).expect(0);
    assert_eq!(
        db.ledger("counter").await.unwrap(),
        ("live".into(), 120_000)
    );
    assert_eq!(db.count("SELECT n FROM counter").await, 120_000);
    assert_eq!(db.count("SELECT count(*) FROM seen").await, 120_000);
}

#[tokio::test]
async fn two_boots_started_together_one_waits_both_succeed_nothing_applied_twice() {
    let db = TestDb::new().await;
    things(&db, 100_000, COUNTER).await;
    let a = db
        .command(&["boot", "--batch-size", "1000"])
        .spawn()
        .unwrap();
    let b = db
        .command(&["boot", "--batch-size", "1000"])
        .spawn()
        .unwrap();
    let (a, b) = (
        Run::from(a.wait_with_output().unwrap()),
        Run::from(b.wait_with_output().unwrap()),
    );
    a.expect(0);
    b.expect(0);
    assert_eq!(db.count("SELECT n FROM counter").await, 100_000);
    assert_eq!(
        db.ledger("counter").await.unwrap(),
        ("live".into(), 100_000)
    );
}

#[tokio::test]
async fn no_wait_exits_4_naming_the_holder() {
    let db = TestDb::new().await;
    things(&db, 10, COUNTER).await;
    let holder = db.client().await;
    holder
        .execute(
            "SELECT pg_advisory_lock(hashtext('projectionist:projectionist'), hashtext('boot'))",
            &[],
        )
        .await
        .unwrap();
    let run = db.run(&["boot", "--no-wait"]);
    run.expect(4);
    assert!(run.stderr.contains("pid"), "{}", run.stderr);
    let run = db.run(&["boot", "--lock-timeout", "1s"]);
    run.expect(4);
    assert!(
        db.ledger("counter").await.is_none(),
        "nothing booted while locked"
    );
}

#[tokio::test]
async fn run_modes_from_now_and_once() {
    let db = TestDb::new().await;
    things(
        &db,
        10_000,
        r#"
[projectors.welcome]
mode = "from_now"
tables = ["seen"]
on.Thing = "INSERT INTO seen (id) VALUES (:position)"

[projectors.backfill]
mode = "once"
tables = ["thing_log"]
on.Thing = "INSERT INTO thing_log (id) VALUES (:position)"
"#,
    )
    .await;
    db.run(&["boot"]).expect(0);
    // from_now: the head at first boot, nothing historical played.
    assert_eq!(db.ledger("welcome").await.unwrap(), ("live".into(), 10_000));
    assert_eq!(db.count("SELECT count(*) FROM seen").await, 0);
    // once: played to the head, then finished.
    assert_eq!(
        db.ledger("backfill").await.unwrap(),
        ("finished".into(), 10_000)
    );
    assert_eq!(db.count("SELECT count(*) FROM thing_log").await, 10_000);
    // Neither is booted again; the once projector never plays again.
    add_things(&db.client().await, 50).await;
    db.run(&["boot"]).expect(0);
    assert_eq!(
        db.ledger("backfill").await.unwrap(),
        ("finished".into(), 10_000)
    );
    assert_eq!(db.count("SELECT count(*) FROM thing_log").await, 10_000);
}

#[tokio::test]
async fn a_version_bump_rebuilds_and_a_retired_projector_is_refused() {
    let db = TestDb::new().await;
    db.gen_events(5_000);
    db.run(&["boot"]).expect(0);
    let c = db.client().await;
    c.execute(
        "DELETE FROM band WHERE name IN (SELECT name FROM band LIMIT 10)",
        &[],
    )
    .await
    .unwrap();
    c.execute("INSERT INTO band (id, name, created) VALUES (gen_random_uuid(), 'not from an event', now())", &[])
        .await
        .unwrap();
    let manifest = std::fs::read_to_string(db.manifest_path()).unwrap();
    let bumped = manifest.replacen(
        "[projectors.band]\nmode = \"from_beginning\"\ntables = [\"band\"]\nversion = 1",
        "[projectors.band]\nmode = \"from_beginning\"\ntables = [\"band\"]\nversion = 2",
        1,
    );
    assert_ne!(
        bumped, manifest,
        "the example manifest's band section changed shape"
    );
    db.write_manifest(&bumped);
    let run = db.run(&["boot", "--json"]);
    run.expect(0);
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["projectors"][0]["name"], "band");
    assert_eq!(json["projectors"][0]["action"], "rebuild");
    db.assert_tables_match_expected().await;
    assert_eq!(
        db.count("SELECT version::bigint FROM projectionist.projectors WHERE name = 'band'")
            .await,
        2
    );

    c.execute(
        "UPDATE projectionist.projectors SET state = 'retired' WHERE name = 'event'",
        &[],
    )
    .await
    .unwrap();
    let run = db.run(&["boot"]);
    run.expect(2);
    assert!(run.stderr.contains("`event` is retired"), "{}", run.stderr);
    assert!(
        run.stderr.contains("reset event --allow-side-effects"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn boot_names_limit_the_selection_and_unknown_names_are_usage_errors() {
    let db = TestDb::new().await;
    db.gen_events(2_000);
    db.run(&["boot", "band"]).expect(0);
    assert_eq!(db.ledger("band").await.unwrap().0, "live");
    assert!(db.ledger("event").await.is_none());
    let run = db.run(&["boot", "nosuch"]);
    run.expect(2);
    assert!(
        run.stderr.contains("no projector `nosuch`"),
        "{}",
        run.stderr
    );
}

/// A read model that grows while one in three events deletes a row by its key.
const GROWING: &str = r#"
[projectors.growing]
tables = ["growing"]
on.Thing = "INSERT INTO growing (id, pad) VALUES (:data.i::bigint, repeat('x', 400))"
on.Gone = "DELETE FROM growing WHERE id = :data.i::bigint - 1"
"#;

#[tokio::test]
async fn handler_plans_follow_a_read_model_that_grows_during_boot() {
    // PostgreSQL keeps a statement's plan for the session. The DELETE's plan
    // is first made while the table has a page or two (a sequential scan);
    // kept, every later delete would scan the whole growing table.
    let db = TestDb::new().await;
    let c = thing_store(
        &db,
        false,
        "CREATE TABLE growing (id bigint PRIMARY KEY, pad text NOT NULL)",
        GROWING,
    )
    .await;
    c.execute(
        "INSERT INTO events (aggregate_id, aggregate_name, name, data) \
         SELECT gen_random_uuid(), 'thing', CASE WHEN i % 3 = 0 THEN 'Gone' ELSE 'Thing' END, \
                jsonb_build_object('i', i) \
         FROM generate_series(1, 30000) i",
        &[],
    )
    .await
    .unwrap();
    c.batch_execute("ANALYZE growing").await.unwrap();
    db.run(&["boot", "--batch-size", "500"]).expect(0);
    assert_eq!(db.count("SELECT count(*) FROM growing").await, 10_000);
    // The boot's sessions have ended: their table statistics are in.
    let mut scans = (0, 0);
    for _ in 0..50 {
        let row = c
            .query_one(
                "SELECT pg_stat_clear_snapshot()::text, seq_scan, coalesce(idx_scan, 0) \
                 FROM pg_stat_user_tables WHERE relname = 'growing'",
                &[],
            )
            .await
            .unwrap();
        scans = (row.get::<_, i64>(1), row.get::<_, i64>(2));
        if scans.0 + scans.1 >= 9_000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // 10,000 deletes: only those of the first thousand events may scan.
    assert!(scans.1 >= 9_000, "{scans:?}");
    assert!(
        scans.0 < 1_000,
        "sequential scans {}, index scans {}",
        scans.0,
        scans.1
    );
}

/// A store with a projector `name` whose handler records, for each event, the
/// value of the server setting `setting` it runs under (`setting_seen`).
async fn setting_seen_store(db: &TestDb, name: &str, setting: &str) -> Client {
    thing_store(
        db,
        false,
        "CREATE TABLE setting_seen (id bigint PRIMARY KEY, value text NOT NULL)",
        &format!(
            "[projectors.{name}]\ntables = [\"setting_seen\"]\n\
             on.Thing = \"INSERT INTO setting_seen (id, value) VALUES (:position, current_setting('{setting}'))\"\n"
        ),
    )
    .await
}

/// Sets the test database's defaults for the sessions that start after.
async fn set_database_defaults(c: &Client, db: &TestDb, settings: &[&str]) {
    for setting in settings {
        c.batch_execute(&format!("ALTER DATABASE \"{}\" SET {setting}", db.name))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn batches_run_without_jit_whatever_the_server_says() {
    // The planner cannot estimate a batch's range: on a big store it costs the
    // reading as a large scan, and JIT would compile it for every batch. Here
    // JIT is asked for on every statement; the handlers see it off.
    let db = TestDb::new().await;
    let c = setting_seen_store(&db, "jit", "jit").await;
    add_things(&c, 50).await;
    set_database_defaults(&c, &db, &["jit = on", "jit_above_cost = 0"]).await;
    db.run(&["boot"]).expect(0);
    assert_eq!(
        db.count("SELECT count(*) FROM setting_seen WHERE value = 'off'")
            .await,
        50
    );
}

#[tokio::test]
async fn booting_batches_commit_without_waiting_for_the_disk_and_play_s_wait() {
    // A server crash can only take back a booting projector's last batches
    // whole: boot commits them asynchronously. Play's batches wait for the
    // disk, as the server is configured.
    let db = TestDb::new().await;
    let c = setting_seen_store(&db, "commits", "synchronous_commit").await;
    let booted = add_things(&c, 50).await;
    db.run(&["boot"]).expect(0);
    assert_eq!(
        db.count("SELECT count(*) FROM setting_seen WHERE value = 'off'")
            .await,
        50
    );

    set_database_defaults(&c, &db, &["synchronous_commit = local"]).await;
    let mut play = Player::start(&db, "commits", &["--poll", "100ms"]);
    let h = add_things(&c, 5).await;
    wait_for("play to reach the head", PATIENCE, &[&play], async || {
        position(&c, "commits").await == h
    })
    .await;
    play.stop();
    let played: Vec<String> = c
        .query(
            "SELECT DISTINCT value FROM setting_seen WHERE id > $1",
            &[&booted],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(played, ["local"]);
}
