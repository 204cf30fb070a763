//! Faults and hostile input: bad event payloads, injection attempts,
//! a connection killed mid-boot, passwords in URLs.

use crate::harness::*;

async fn insert(db: &TestDb, kind: &str, data: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "INSERT INTO events (aggregate_id, aggregate_name, name, data) VALUES (gen_random_uuid(), 'x', $1, $2::text::jsonb) RETURNING id",
            &[&kind, &data],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn hostile_strings_are_data_never_sql() {
    let db = TestDb::new().await;
    let hostile = [
        "'); DROP TABLE band; --",
        "$1",
        ":data.x",
        "$$; DROP TABLE band; $$",
        "\\'; DELETE FROM band; --",
        "ünïcødé 🎻 \u{202e}",
        "' OR 1=1 --",
    ];
    for name in hostile {
        insert(
            &db,
            "BandCreated",
            &serde_json::json!({ "name": name }).to_string(),
        )
        .await;
    }
    db.write_manifest(&format!(
        "{THINGS_STORE}\n[projectors.band]\ntables = [\"band\"]\non.BandCreated = \"\"\"\nINSERT INTO band (id, name, created) VALUES (:stream::uuid, :data.name, :time)\nON CONFLICT (name) DO UPDATE SET id = EXCLUDED.id\n\"\"\"\n"
    ));
    db.run(&["boot"]).expect(0);
    let c = db.client().await;
    let names: Vec<String> = c
        .query("SELECT name FROM band ORDER BY name", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut want: Vec<String> = hostile.iter().map(|s| s.to_string()).collect();
    want.sort();
    let mut got = names.clone();
    got.sort();
    assert_eq!(got, want, "every hostile name stored as it was");
}

#[tokio::test]
async fn bad_payloads_project_or_break_with_the_events_position() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute("CREATE TABLE geo (id bigint PRIMARY KEY, lat float8, raw jsonb)")
        .await
        .unwrap();
    insert(&db, "Geo", r#"{"lat": 1.5}"#).await;
    insert(&db, "Geo", r#""a string payload""#).await; // not an object: :data.lat is NULL
    insert(&db, "Geo", r#"[1, 2, 3]"#).await;
    insert(&db, "Geo", r#"{}"#).await; // missing field
    let huge = format!(
        r#"{{"lat": 2.5, "blob": "{}"}}"#,
        "x".repeat(10 * 1024 * 1024)
    );
    insert(&db, "Geo", &huge).await;
    let bad = insert(&db, "Geo", r#"{"lat": "not a number"}"#).await;
    db.write_manifest(&format!(
        "{THINGS_STORE}\n[projectors.geo]\ntables = [\"geo\"]\non.Geo = \"INSERT INTO geo (id, lat, raw) VALUES (:position, :data.lat::float8, :data)\"\n"
    ));
    let run = db.run(&["boot"]);
    run.expect(1);
    assert!(
        run.stderr.contains(&format!("broke at event #{bad} (Geo")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("invalid input syntax for type double precision"),
        "{}",
        run.stderr
    );
    // Everything before the bad event was projected, the 10 MB payload included.
    assert_eq!(db.count("SELECT count(*) FROM geo").await, bad - 1);
    assert_eq!(
        db.count("SELECT count(*) FROM geo WHERE lat IS NULL").await,
        3,
        "non-objects and missing fields give NULL"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM geo WHERE length(raw::text) > 10000000")
            .await,
        1
    );
    assert_eq!(db.ledger("geo").await.unwrap(), ("broken".into(), bad - 1));
}

#[tokio::test]
async fn a_connection_killed_mid_boot_fails_clearly_and_the_next_boot_resumes() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE counter (n bigint NOT NULL); INSERT INTO counter VALUES (0); \
             INSERT INTO events (aggregate_id, aggregate_name, name, data) \
             SELECT gen_random_uuid(), 'x', 'Thing', '{}' FROM generate_series(1, 80000)",
        )
        .await
        .unwrap();
    db.write_manifest(&format!(
        "{THINGS_STORE}\n[projectors.counter]\non.Thing = \"UPDATE counter SET n = n + 1\"\n"
    ));
    let child = db
        .command(&["boot", "--batch-size", "500"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let c = db.client().await;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if db.ledger("counter").await.is_some_and(|(_, p)| p > 20_000) {
            break;
        }
    }
    c.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'projectionist boot%' AND datname = current_database()",
        &[],
    )
    .await
    .unwrap();
    let run = Run::from(child.wait_with_output().unwrap());
    assert_ne!(run.code, 0, "a killed connection fails the boot");
    assert!(
        run.stderr.contains("terminat") || run.stderr.contains("connection"),
        "the error says what happened: {}",
        run.stderr
    );
    db.run(&["boot"]).expect(0);
    assert_eq!(
        db.count("SELECT n FROM counter").await,
        80_000,
        "every event exactly once"
    );
}

#[tokio::test]
async fn the_password_never_appears_in_output_or_logs() {
    let db = TestDb::new().await;
    db.gen_events(200);
    // Local connections trust any password, so the URL works and carries a secret.
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_password(Some("s3cr3t-pw")).unwrap();
    let url = url.to_string();
    let mut outputs = Vec::new();
    for args in [
        vec!["validate"],
        vec!["migrate", "--dir", "/nonexistent"],
        vec!["boot", "-vv"],
        vec!["status", "-v"],
        vec!["status", "--json"],
        vec!["verify"],
        vec!["boot", "--help"],
        vec!["--help"],
    ] {
        let out = db
            .command(&args)
            .env("DATABASE_URL", &url)
            .output()
            .unwrap();
        outputs.push(Run::from(out));
    }
    // And a failing connection with the password in the URL.
    let out = db
        .command(&["status"])
        .env("DATABASE_URL", "postgres://u:s3cr3t-pw@127.0.0.1:1/x")
        .output()
        .unwrap();
    outputs.push(Run::from(out));
    for r in &outputs {
        assert!(
            !r.stdout.contains("s3cr3t-pw") && !r.stderr.contains("s3cr3t-pw"),
            "{r:?}"
        );
    }
    assert_eq!(outputs[0].code, 0, "{:?}", outputs[0]);
}

#[tokio::test]
async fn a_statement_timeout_in_a_handler_is_a_handler_failure_with_a_clear_message() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE slow (id bigint PRIMARY KEY); \
             INSERT INTO events (aggregate_id, aggregate_name, name, data) \
             SELECT gen_random_uuid(), 'x', 'Thing', '{}' FROM generate_series(1, 20)",
        )
        .await
        .unwrap();
    db.write_manifest(&format!(
        "{THINGS_STORE}\n[projectors.slow]\ntables = [\"slow\"]\non.Thing = [\"SELECT CASE WHEN :position = 7 THEN pg_sleep(5) END\", \"INSERT INTO slow VALUES (:position)\"]\n"
    ));
    let run = db.run_with_server_option(&["boot"], "statement_timeout%3D1000");
    run.expect(1);
    assert!(
        run.stderr.contains("broke at event #7 (Thing"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("statement timeout"), "{}", run.stderr);
    assert_eq!(db.ledger("slow").await.unwrap(), ("broken".into(), 6));
    assert_eq!(db.count("SELECT count(*) FROM slow").await, 6);
}

#[tokio::test]
async fn sigkill_during_a_reset_replay_then_boot_finishes_it_exactly_once() {
    let db = TestDb::new().await;
    things(
        &db,
        60_000,
        "[projectors.counter]\ntables = [\"seen\"]\nreset = \"TRUNCATE seen; UPDATE counter SET n = 0\"\non.Thing = [\"UPDATE counter SET n = n + 1\", \"INSERT INTO seen (id) VALUES (:position)\"]\n",
    )
    .await;
    db.run(&["boot"]).expect(0);
    let mut child = db
        .command(&["reset", "counter", "--yes", "-q"])
        .spawn()
        .unwrap();
    wait_for("counter to be booting past 5,000", 30.0, &[], async || {
        db.ledger("counter")
            .await
            .is_some_and(|(s, p)| s == "booting" && p > 5_000)
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    // The reset committed (tables emptied, position at the start); boot finishes the replay.
    db.run(&["boot"]).expect(0);
    assert_eq!(db.ledger("counter").await.unwrap(), ("live".into(), 60_000));
    assert_eq!(db.count("SELECT n FROM counter").await, 60_000);
    assert_eq!(db.count("SELECT count(*) FROM seen").await, 60_000);
}

#[tokio::test]
async fn sigkill_during_migrate_then_migrate_applies_each_migration_once() {
    let db = TestDb::empty().await;
    let dir = db.dir.path().join("migrations");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("V1__first.sql"), "CREATE TABLE first (id int);").unwrap();
    std::fs::write(
        dir.join("V2__slow.sql"),
        "CREATE TABLE slow (id int); INSERT INTO slow VALUES (1); SELECT pg_sleep(3);",
    )
    .unwrap();
    let mut child = db
        .command(&["migrate", "--dir", dir.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it while V2 runs: V1 committed, V2 not.
    let c = db.client().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let running: i64 = c
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(3)%' AND pid <> pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        if running > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "V2 never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let run = db.run(&["migrate", "--dir", dir.to_str().unwrap()]);
    run.expect(0);
    assert!(run.stdout.contains("V2__slow"), "{}", run.stdout);
    assert!(
        !run.stdout.contains("V1__first"),
        "V1 was applied before the kill: {}",
        run.stdout
    );
    assert_eq!(db.count("SELECT count(*) FROM slow").await, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM refinery_schema_history")
            .await,
        2
    );
}

#[tokio::test]
async fn a_lock_timeout_in_a_handler_is_a_handler_failure() {
    let db = TestDb::new().await;
    things(
        &db,
        10,
        "[projectors.locked]\ntables = [\"seen\"]\non.Thing = [\"UPDATE counter SET n = n + 1\", \"INSERT INTO seen (id) VALUES (:position)\"]\n",
    )
    .await;
    // A row lock: validation (which prepares) goes through, the handler's UPDATE waits.
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT * FROM counter FOR UPDATE")
        .await
        .unwrap();
    let run = db.run_with_server_option(&["boot"], "lock_timeout%3D300");
    run.expect(1);
    assert!(
        run.stderr.contains("broke at event #1 (Thing"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("lock timeout"), "{}", run.stderr);
    holder.batch_execute("ROLLBACK").await.unwrap();
    db.run(&["boot"]).expect(0);
    assert_eq!(db.count("SELECT count(*) FROM seen").await, 10);
}

#[tokio::test]
async fn sigkill_during_the_alert_command_loses_nothing() {
    let db = TestDb::new().await;
    things(
        &db,
        1_000,
        "[alert]\ncommand = [\"sh\", \"-c\", \"touch alert-started; sleep 30\"]\n\
         [projectors.fragile]\ntables = [\"thing_log\"]\non.Thing = \"INSERT INTO thing_log (id, v) VALUES (:position, 100 / (:position - 500))\"\n",
    )
    .await;
    let mut child = db.command(&["boot", "-q"]).spawn().unwrap();
    let started = db.dir.path().join("alert-started");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !started.exists() {
        assert!(std::time::Instant::now() < deadline, "the alert never ran");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The failure was committed before the alert ran.
    assert_eq!(db.ledger("fragile").await.unwrap(), ("broken".into(), 499));
    let manifest = std::fs::read_to_string(db.manifest_path()).unwrap();
    db.write_manifest(
        &manifest
            .replace("100 / (:position - 500)", "1")
            .replace("sleep 30", "true"),
    );
    db.run(&["boot"]).expect(0);
    assert_eq!(db.count("SELECT count(*) FROM thing_log").await, 1_000);
}

/// A store whose payload and metadata are text: event 1500's payload and
/// event 2000's metadata are not JSON. A projector breaks at the first row it
/// reads that does not decode, and only then; one that reads neither (a count
/// per stream) projects every event, event by event and set-wise alike.
#[tokio::test]
async fn a_row_that_does_not_decode_breaks_only_the_projectors_that_read_it() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE loose (id bigserial PRIMARY KEY, type text NOT NULL, stream text NOT NULL, \
           data text NOT NULL, metadata text); \
         INSERT INTO loose (type, stream, data, metadata) \
         SELECT 'Thing', 's' || (g % 100), \
                CASE WHEN g = 1500 THEN 'not json' ELSE format('{\"i\": %s}', g) END, \
                CASE WHEN g = 2000 THEN '{broken' ELSE '{\"by\": \"test\"}' END \
         FROM generate_series(1, 3000) g; \
         CREATE TABLE payload (id bigint PRIMARY KEY, i int); \
         CREATE TABLE payload_in_parts (id bigint PRIMARY KEY, i int); \
         CREATE TABLE meta (id bigint PRIMARY KEY, by_whom text); \
         CREATE TABLE counted (stream text PRIMARY KEY, n int NOT NULL); \
         CREATE TABLE counted_in_parts (stream text PRIMARY KEY, n int NOT NULL)",
    )
    .await
    .unwrap();
    let count = |q: &str, partitions: i32| {
        format!(
            "[projectors.{q}]\npartitions = {partitions}\n\
             on.Thing = \"INSERT INTO {q} AS c VALUES (:stream, 1) ON CONFLICT (stream) DO UPDATE SET n = c.n + 1\"\n"
        )
    };
    db.write_manifest(&format!(
        "[store]\ntable = \"loose\"\nposition = \"id\"\ntype = \"type\"\ndata = \"data\"\n\
         stream = \"stream\"\nmetadata = \"metadata\"\n\n\
         [projectors.payload]\non.Thing = \"INSERT INTO payload VALUES (:position, (:data.i)::int)\"\n\
         [projectors.payload_in_parts]\npartitions = 2\n\
         on.Thing = \"INSERT INTO payload_in_parts VALUES (:position, (:data.i)::int)\"\n\
         [projectors.meta]\non.Thing = \"INSERT INTO meta VALUES (:position, :metadata.by)\"\n{}{}",
        count("counted", 1),
        count("counted_in_parts", 2)
    ));
    for q in ["counted", "counted_in_parts"] {
        let run = db.run(&["boot", "-v", q]);
        run.expect(0);
        if q == "counted_in_parts" {
            assert!(
                run.stderr
                    .lines()
                    .any(|l| l.contains("projector `counted_in_parts`: ")
                        && l.contains("applied set-wise")),
                "not applied set-wise:\n{}",
                run.stderr
            );
        }
        assert_eq!(
            db.count(&format!("SELECT sum(n) FROM {q}")).await,
            3_000,
            "{q}"
        );
        assert_eq!(db.ledger(q).await.unwrap().0, "live", "{q}");
    }
    for (q, at, what) in [
        ("payload", 1_500, "payload is not UTF-8 JSON (text)"),
        (
            "payload_in_parts",
            1_500,
            "payload is not UTF-8 JSON (text)",
        ),
        ("meta", 2_000, "metadata is not UTF-8 JSON (text)"),
    ] {
        let run = db.run(&["boot", q]);
        run.expect(1);
        assert!(
            run.stderr.contains(&format!("event #{at} (Thing")) && run.stderr.contains(what),
            "{q}: {}",
            run.stderr
        );
        assert_eq!(db.ledger(q).await.unwrap().0, "broken", "{q}");
        // Every event before the broken one was projected, none after.
        assert_eq!(
            db.count(&format!("SELECT count(*) FROM {q} WHERE id < {at}"))
                .await,
            at - 1,
            "{q}"
        );
        // None after it in its part (the other part may be further on).
        let same_part = if q == "payload_in_parts" {
            format!(
                "AND id IN (SELECT id FROM loose WHERE stream = 's{}')",
                at % 100
            )
        } else {
            String::new()
        };
        assert_eq!(
            db.count(&format!(
                "SELECT count(*) FROM {q} WHERE id >= {at} {same_part}"
            ))
            .await,
            0,
            "{q}"
        );
    }
}
