//! `reset` and `retire` against a real PostgreSQL: rebuilds,
//! confirmation, side effects, `from_now`, the retirement migration and its
//! refusals, applying it with `migrate`, quoting, and rollback safety.

use std::path::{Path, PathBuf};

use crate::harness::*;
use serde_json::Value;

/// A store of `n` events of type `Thing` (positions 1..=n), a few tables for
/// projectors to own, and a manifest with the given projectors over it.
/// A migrations directory that `migrate` accepts on a test database: the
/// repository's migrations, applied to the template, must be in it (refinery
/// checks them).
fn migrations_dir(db: &TestDb) -> PathBuf {
    let dir = db.dir.path().join("deploy/migrations");
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(root().join("migrations")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    dir
}

/// The file a `retire` says it wrote: `V{next}__retire_{name}.sql` in `dir`,
/// next being one above the directory's highest version.
fn written(stdout: &str, dir: &Path, name: &str) -> PathBuf {
    let highest = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|f| {
            let f = f.unwrap().file_name().to_string_lossy().to_string();
            let v = f
                .strip_prefix('V')?
                .split_once("__")?
                .0
                .parse::<u64>()
                .ok()?;
            (!f.contains("__retire_")).then_some(v)
        })
        .max()
        .unwrap_or(0);
    let path = dir.join(format!("V{}__retire_{name}.sql", highest + 1));
    assert!(
        stdout.contains(&format!("wrote {}", path.display())),
        "{stdout}"
    );
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn table_exists(db: &TestDb, name: &str) -> bool {
    db.client()
        .await
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await
        .unwrap()
        .get(0)
}

async fn events_processed(db: &TestDb, name: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT events_processed FROM projectionist.projectors WHERE name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

async fn missing_since_is_set(db: &TestDb, name: &str) -> bool {
    db.client()
        .await
        .query_one(
            "SELECT missing_since IS NOT NULL FROM projectionist.projectors WHERE name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

// ---------------------------------------------------------------------------
// reset

#[tokio::test]
async fn reset_empties_the_tables_and_replays_and_asks_for_yes_off_a_terminal() {
    let db = TestDb::new().await;
    example(&db);
    db.gen_events(2_000);
    db.run(&["boot"]).expect(0);
    let processed = events_processed(&db, "band").await;
    assert!(processed > 0);
    // A row that no event explains: a reset must drop it.
    db.client()
        .await
        .execute("INSERT INTO band (id, name, created) VALUES (gen_random_uuid(), 'not from an event', now())", &[])
        .await
        .unwrap();
    let bands = db.count("SELECT count(*) FROM band").await;

    // Not on a terminal and no --yes: usage error, nothing changed.
    let run = db.run(&["reset", "band"]);
    run.expect(2);
    assert!(run.stderr.contains("--yes"), "{}", run.stderr);
    assert_eq!(db.count("SELECT count(*) FROM band").await, bands);
    assert_eq!(db.ledger("band").await.unwrap(), ("live".into(), 2_000));
    assert_eq!(events_processed(&db, "band").await, processed);

    let run = db.run(&["reset", "nosuch", "--yes"]);
    run.expect(2);
    assert!(
        run.stderr.contains("no projector `nosuch`"),
        "{}",
        run.stderr
    );
    assert_eq!(db.count("SELECT count(*) FROM band").await, bands);

    let run = db.run(&["reset", "band", "--yes"]);
    run.expect(0);
    assert!(run.stdout.contains("band"), "{}", run.stdout);
    assert_eq!(
        db.count("SELECT count(*) FROM band WHERE name = 'not from an event'")
            .await,
        0
    );
    assert_eq!(db.ledger("band").await.unwrap(), ("live".into(), 2_000));
    // The counter restarted with the reset and counts the replay alone.
    assert_eq!(events_processed(&db, "band").await, processed);
    db.assert_tables_match_expected().await;
    // The others were left alone.
    assert_eq!(db.ledger("event").await.unwrap(), ("live".into(), 2_000));
}

#[tokio::test]
async fn reset_no_replay_leaves_it_booting_at_the_start_for_the_next_boot() {
    let db = TestDb::new().await;
    example(&db);
    db.gen_events(2_000);
    db.run(&["boot"]).expect(0);
    let run = db.run(&["reset", "band", "--yes", "--no-replay"]);
    run.expect(0);
    assert!(
        run.stdout
            .contains("the next `projectionist boot` replays it"),
        "{}",
        run.stdout
    );
    assert_eq!(db.count("SELECT count(*) FROM band").await, 0);
    assert_eq!(db.ledger("band").await.unwrap(), ("booting".into(), 0));
    assert_eq!(events_processed(&db, "band").await, 0);
    let run = db.run(&["status", "--json"]);
    run.expect(0);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    let band = json["projectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "band")
        .unwrap();
    assert_eq!(band["state"], "booting");
    assert_eq!(band["lag"], 2_000);

    let run = db.run(&["boot", "--json"]);
    run.expect(0);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    let booted: Vec<&str> = json["projectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(booted, ["band"], "{json}");
    assert_eq!(db.ledger("band").await.unwrap(), ("live".into(), 2_000));
    db.assert_tables_match_expected().await;
}

#[tokio::test]
async fn reset_refuses_a_side_effecting_projector_unless_allowed() {
    let db = TestDb::new().await;
    things(
        &db,
        100,
        r#"
[projectors.mailer]
side_effects = true
tables = ["mail_log"]
on.Thing = "INSERT INTO mail_log (id) VALUES (:position)"

[projectors.keeper]
tables = ["thing_log"]
on.Thing = "INSERT INTO thing_log (id) VALUES (:position)"
"#,
    )
    .await;
    db.run(&["boot"]).expect(0);
    db.client()
        .await
        .execute("DELETE FROM mail_log WHERE id > 50", &[])
        .await
        .unwrap();

    let run = db.run(&["reset", "mailer", "--yes"]);
    run.expect(2);
    assert!(run.stderr.contains("side effects"), "{}", run.stderr);
    assert!(
        run.stderr.contains("--allow-side-effects"),
        "{}",
        run.stderr
    );
    assert_eq!(
        db.count("SELECT count(*) FROM mail_log").await,
        50,
        "nothing changed"
    );
    // One refused name refuses them all, before anything is written.
    db.run(&["reset", "keeper", "mailer", "--yes"]).expect(2);
    assert_eq!(db.count("SELECT count(*) FROM mail_log").await, 50);

    db.run(&["reset", "mailer", "--yes", "--allow-side-effects"])
        .expect(0);
    assert_eq!(db.count("SELECT count(*) FROM mail_log").await, 100);
    assert_eq!(db.ledger("mailer").await.unwrap(), ("live".into(), 100));
}

#[tokio::test]
async fn reset_of_a_from_now_projector_puts_it_at_the_head() {
    let db = TestDb::new().await;
    things(
        &db,
        100,
        r#"
[projectors.welcome]
mode = "from_now"
tables = ["seen"]
on.Thing = "INSERT INTO seen (id) VALUES (:position)"
"#,
    )
    .await;
    db.run(&["boot"]).expect(0);
    assert_eq!(db.ledger("welcome").await.unwrap(), ("live".into(), 100));
    add_things(&db.client().await, 30).await;
    assert_eq!(
        db.count("SELECT count(*) FROM seen").await,
        0,
        "from_now replays no history"
    );
    db.client()
        .await
        .execute("INSERT INTO seen VALUES (1)", &[])
        .await
        .unwrap();
    db.run(&["reset", "welcome", "--yes"]).expect(0);
    // Emptied, at the head, and no history replayed.
    assert_eq!(db.ledger("welcome").await.unwrap(), ("live".into(), 130));
    assert_eq!(db.count("SELECT count(*) FROM seen").await, 0);
}

/// A transaction that began before the last events were committed (here one
/// that never touches the store) must not make a `from_now` reset replay them.
#[tokio::test(flavor = "multi_thread")]
async fn reset_of_a_from_now_projector_replays_nothing_while_an_older_transaction_runs() {
    let db = TestDb::new().await;
    things(
        &db,
        100,
        r#"
[projectors.welcome]
mode = "from_now"
tables = ["seen"]
on.Thing = "INSERT INTO seen (id) VALUES (:position)"
"#,
    )
    .await;
    db.run(&["boot"]).expect(0);
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT pg_current_xact_id()")
        .await
        .unwrap();
    add_things(&db.client().await, 30).await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        holder.batch_execute("COMMIT").await.unwrap();
    });
    db.run(&["reset", "welcome", "--yes"]).expect(0);
    release.await.unwrap();
    assert_eq!(db.ledger("welcome").await.unwrap(), ("live".into(), 130));
    assert_eq!(
        db.count("SELECT count(*) FROM seen").await,
        0,
        "a from_now reset replayed history"
    );
}

// ---------------------------------------------------------------------------
// retire

#[tokio::test]
async fn retire_writes_a_reviewable_migration_that_migrate_applies() {
    let db = TestDb::new().await;
    example(&db);
    db.gen_events(500);
    db.run(&["boot"]).expect(0);

    // Still in the manifest.
    let run = db.run(&["retire", "band"]);
    run.expect(2);
    assert!(run.stderr.contains("still in"), "{}", run.stderr);

    example_without(&db, &["band"], "");
    // No boot or play has seen it missing yet.
    let run = db.run(&["retire", "band", "--min-age", "0s"]);
    run.expect(2);
    assert!(run.stderr.contains("projectionist boot"), "{}", run.stderr);
    db.run(&["boot"]).expect(0);
    assert!(missing_since_is_set(&db, "band").await);

    // Gone for less than the default 72h.
    let run = db.run(&["retire", "band"]);
    run.expect(2);
    assert!(run.stderr.contains("--min-age"), "{}", run.stderr);
    db.run(&["retire", "band", "--min-age", "1h"]).expect(2);
    assert!(!db.dir.path().join("migrations").exists());

    let run = db.run(&["retire", "band", "--min-age", "0s", "--dry-run"]);
    run.expect(0);
    assert!(run.stdout.starts_with("--"), "{}", run.stdout);
    assert!(
        run.stdout.contains("DROP TABLE IF EXISTS \"band\";"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("DELETE FROM \"projectionist\".projectors WHERE name = 'band';"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("retired'"), "{}", run.stdout);
    assert!(
        !db.dir.path().join("migrations").exists(),
        "--dry-run writes no file"
    );

    let dir = migrations_dir(&db);
    assert!(
        std::fs::read_dir(&dir)
            .unwrap()
            .all(|f| f.unwrap().file_name().to_string_lossy().as_ref() < "V7"),
        "the repository's migrations reached V7: raise the numbers below"
    );
    std::fs::write(dir.join("V7__x.sql"), "SELECT 1;\n").unwrap();
    let run = db.run(&["retire", "band", "--min-age", "0s", "--dir", s(&dir)]);
    run.expect(0);
    let file = dir.join("V8__retire_band.sql");
    assert!(run.stdout.contains("V8__retire_band.sql"), "{}", run.stdout);
    let sql = std::fs::read_to_string(&file).unwrap();
    assert!(sql.starts_with("--"), "{sql}");
    assert!(sql.contains("DROP TABLE IF EXISTS \"band\";"), "{sql}");
    assert!(
        sql.contains("DELETE FROM \"projectionist\".projectors WHERE name = 'band';"),
        "{sql}"
    );
    // It writes nothing to the database.
    assert!(table_exists(&db, "public.band").await);
    assert!(db.ledger("band").await.is_some());
    // Never overwrites: a second retire writes the next version.
    let again = db.run(&["retire", "band", "--min-age", "0s", "--dir", s(&dir)]);
    again.expect(0);
    assert!(
        again.stdout.contains("V9__retire_band.sql"),
        "{}",
        again.stdout
    );
    std::fs::remove_file(dir.join("V9__retire_band.sql")).unwrap();

    let run = db.run(&["migrate", "--dir", s(&dir)]);
    run.expect(0);
    assert!(run.stdout.contains("V8__retire_band"), "{}", run.stdout);
    assert!(!table_exists(&db, "public.band").await, "band is dropped");
    assert!(
        db.ledger("band").await.is_none(),
        "its ledger row is deleted"
    );
    let status = db.run(&["status", "--json"]);
    status.expect(0);
    let json: Value = serde_json::from_str(&status.stdout).unwrap();
    assert!(
        json["projectors"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["name"] != "band"),
        "{json}"
    );
    let run = db.run(&["retire", "band", "--min-age", "0s", "--dry-run"]);
    run.expect(2);
    assert!(run.stderr.contains("nothing to retire"), "{}", run.stderr);
}

const MAILER: &str = r#"
[projectors.mailer]
side_effects = true
tables = ["mail_log"]
on.Thing = "INSERT INTO mail_log (id) VALUES (:position)"
"#;

const KEEPER: &str = r#"
[projectors.keeper]
tables = ["thing_log"]
on.Thing = "INSERT INTO thing_log (id) VALUES (:position)"
"#;

#[tokio::test]
async fn retiring_a_side_effecting_projector_keeps_its_row_and_boot_refuses_to_revive_it() {
    let db = TestDb::new().await;
    things(&db, 100, &format!("{MAILER}\n{KEEPER}")).await;
    db.run(&["boot"]).expect(0);
    things_manifest(&db, KEEPER);
    db.run(&["boot"]).expect(0);
    let dir = migrations_dir(&db);
    let run = db.run(&["retire", "mailer", "--min-age", "0s", "--dir", s(&dir)]);
    run.expect(0);
    let sql = std::fs::read_to_string(written(&run.stdout, &dir, "mailer")).unwrap();
    assert!(sql.starts_with("--"), "{sql}");
    assert!(sql.contains("DROP TABLE IF EXISTS \"mail_log\";"), "{sql}");
    assert!(sql.contains("SET state = 'retired'"), "{sql}");
    assert!(!sql.contains("DELETE"), "{sql}");
    db.run(&["migrate", "--dir", s(&dir)]).expect(0);
    assert!(!table_exists(&db, "public.mail_log").await);
    assert_eq!(db.ledger("mailer").await.unwrap(), ("retired".into(), 100));

    // status shows it retired, not orphaned.
    let run = db.run(&["status", "--json"]);
    run.expect(0);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    let mailer = json["projectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "mailer")
        .unwrap();
    assert_eq!(mailer["state"], "retired");
    let run = db.run(&["retire", "mailer", "--min-age", "0s", "--dry-run"]);
    run.expect(2);
    assert!(run.stderr.contains("already retired"), "{}", run.stderr);

    // A rollback brings it back (with its table): boot refuses to replay it.
    db.client()
        .await
        .batch_execute("CREATE TABLE mail_log (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    things_manifest(&db, &format!("{MAILER}\n{KEEPER}"));
    let run = db.run(&["boot"]);
    run.expect(2);
    assert!(run.stderr.contains("`mailer` is retired"), "{}", run.stderr);
    assert!(
        run.stderr.contains("reset mailer --allow-side-effects"),
        "{}",
        run.stderr
    );
    assert_eq!(db.ledger("mailer").await.unwrap(), ("retired".into(), 100));
    assert_eq!(
        db.count("SELECT count(*) FROM mail_log").await,
        0,
        "no side effect fired again"
    );
    // `boot NAME` of another projector is not blocked by it.
    db.run(&["boot", "keeper"]).expect(0);

    // Reviving it deliberately, as the message says.
    db.run(&["reset", "mailer", "--yes", "--allow-side-effects"])
        .expect(0);
    assert_eq!(db.ledger("mailer").await.unwrap(), ("live".into(), 100));
    assert_eq!(db.count("SELECT count(*) FROM mail_log").await, 100);
}

#[tokio::test]
async fn retire_quotes_identifiers() {
    let db = TestDb::new().await;
    things(
        &db,
        20,
        &format!(
            r#"
[projectors.odd]
tables = ['weird "name"']
on.Thing = '''INSERT INTO "weird ""name""" (id) VALUES (:position)'''
{KEEPER}"#
        ),
    )
    .await;
    db.client()
        .await
        .batch_execute(r#"CREATE TABLE "weird ""name""" (id bigint PRIMARY KEY)"#)
        .await
        .unwrap();
    db.run(&["boot"]).expect(0);
    assert_eq!(
        db.count(r#"SELECT count(*) FROM "weird ""name""""#).await,
        20
    );
    things_manifest(&db, KEEPER);
    db.run(&["boot"]).expect(0);
    let run = db.run(&["retire", "odd", "--min-age", "0s", "--dry-run"]);
    run.expect(0);
    assert!(
        run.stdout
            .contains(r#"DROP TABLE IF EXISTS "weird ""name""";"#),
        "{}",
        run.stdout
    );
    // And the SQL runs.
    let dir = migrations_dir(&db);
    db.run(&["retire", "odd", "--min-age", "0s", "--dir", s(&dir)])
        .expect(0);
    db.run(&["migrate", "--dir", s(&dir)]).expect(0);
    assert!(!table_exists(&db, r#""weird ""name""""#).await);
    assert!(table_exists(&db, "public.thing_log").await);
    assert!(db.ledger("odd").await.is_none());
}

#[tokio::test]
async fn a_projector_put_back_before_retirement_resumes_without_a_rebuild() {
    let db = TestDb::new().await;
    example(&db);
    db.gen_events(1_000);
    db.run(&["boot"]).expect(0);
    let halls = db.count("SELECT count(*) FROM dance_hall").await;
    assert!(halls > 0);

    // Deploy without it, then roll back.
    example_without(&db, &["dancehall"], "");
    db.run(&["boot"]).expect(0);
    assert!(missing_since_is_set(&db, "dancehall").await);
    // A marker row: a rebuild would truncate it.
    db.client()
        .await
        .execute("INSERT INTO dance_hall (id, name, created) VALUES (gen_random_uuid(), 'marker', now())", &[])
        .await
        .unwrap();
    example(&db);
    let run = db.run(&["boot", "--json"]);
    run.expect(0);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        json["projectors"].as_array().unwrap().len(),
        0,
        "nothing rebuilt: {json}"
    );
    assert_eq!(
        db.ledger("dancehall").await.unwrap(),
        ("live".into(), 1_000)
    );
    assert!(
        !missing_since_is_set(&db, "dancehall").await,
        "back in the manifest: no longer missing"
    );
    assert_eq!(db.count("SELECT count(*) FROM dance_hall").await, halls + 1);
    assert_eq!(
        db.count("SELECT count(*) FROM dance_hall WHERE name = 'marker'")
            .await,
        1
    );
    let run = db.run(&["status"]);
    run.expect(0);
    assert!(!run.stdout.contains("orphaned"), "{}", run.stdout);
    // It can no longer be retired.
    db.run(&["retire", "dancehall", "--min-age", "0s", "--dry-run"])
        .expect(2);

    db.client()
        .await
        .execute("DELETE FROM dance_hall WHERE name = 'marker'", &[])
        .await
        .unwrap();
    db.assert_tables_match_expected().await;
}

#[tokio::test]
async fn a_broken_projector_put_back_resumes_from_its_position() {
    let db = TestDb::new().await;
    things(
        &db,
        100,
        r#"
[projectors.keeper]
tables = ["thing_log"]
on.Thing = "INSERT INTO thing_log (id) VALUES (:position + 0 / (:position - 60))"
"#,
    )
    .await;
    db.run(&["boot"]).expect(1);
    assert_eq!(db.ledger("keeper").await.unwrap(), ("broken".into(), 59));
    // Removed, then put back fixed: boot resumes at 59, it does not start over.
    things_manifest(&db, MAILER);
    db.run(&["boot"]).expect(0);
    assert!(missing_since_is_set(&db, "keeper").await);
    // A marker row: a rebuild would truncate it.
    db.client()
        .await
        .execute("INSERT INTO thing_log (id) VALUES (-1)", &[])
        .await
        .unwrap();
    things_manifest(&db, &format!("{MAILER}\n{KEEPER}"));
    let run = db.run(&["boot", "--json"]);
    run.expect(0);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    let keeper = json["projectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "keeper")
        .unwrap();
    assert_ne!(keeper["action"], "rebuild", "{json}");
    assert_eq!(db.ledger("keeper").await.unwrap(), ("live".into(), 100));
    assert!(!missing_since_is_set(&db, "keeper").await);
    assert_eq!(
        db.count("SELECT count(*) FROM thing_log WHERE id = -1")
            .await,
        1,
        "not truncated"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM thing_log WHERE id > 0")
            .await,
        100
    );
}
