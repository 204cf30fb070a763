//! Partitioned projectors (`partitions = N`): the events of a projector split
//! by a hash of their stream into N parts, each with its own position in
//! `projectionist.partitions`, booted side by side and owned separately by
//! `play`. Whatever the parts do, the read model must be exactly the one an
//! unpartitioned projector builds, every event applied exactly once.
//!
//! Projector names are per test where `play` runs: the owner locks of play are
//! advisory locks, visible server-wide, and tests run in parallel on one server.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::Client;

use crate::harness::*;

// ---------------------------------------------------------------------------
// Helpers

const TX_LINE: &str = "transaction = \"tx\"\n";

/// The example's four SQL projectors, without the store's transaction column
/// unless `with_tx`, each `(projector, line)` of `settings` added under that
/// projector's header (e.g. `("event", "partitions = 3")`).
fn example_manifest(db: &TestDb, with_tx: bool, settings: &[(&str, &str)]) {
    example(db);
    let mut text = std::fs::read_to_string(db.manifest_path()).unwrap();
    if !with_tx {
        assert!(text.contains(TX_LINE), "no `{TX_LINE}` in the example");
        text = text.replacen(TX_LINE, "", 1);
    }
    for (name, line) in settings {
        let header = format!("[projectors.{name}]\n");
        assert!(text.contains(&header), "no {header} in the example");
        text = text.replacen(&header, &format!("{header}{line}\n"), 1);
    }
    db.write_manifest(&text);
}

/// Fills schema `expected` with the set-based projection of the events, in
/// the reader's order: (tx, id) with the transaction column, id without.
fn expected_projection(db: &TestDb, with_tx: bool) {
    let mut cmd = Command::new("psql");
    cmd.arg(&db.url)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", "schema=expected"]);
    if !with_tx {
        cmd.args(["-v", "order=id"]);
    }
    let out = cmd
        .arg("-f")
        .arg(root().join("scripts/sql/expected.sql"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "expected.sql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts the example's nine tables equal the set-based projection as
/// multisets (EXCEPT ALL both ways), and that they are not trivially empty.
async fn assert_equals_expected(db: &TestDb, with_tx: bool, context: &str) {
    assert_tables_equal_expected(db, with_tx, &EXAMPLE_TABLES, context).await;
}

/// Like [`assert_equals_expected`], for `tables` only.
async fn assert_tables_equal_expected(db: &TestDb, with_tx: bool, tables: &[&str], context: &str) {
    expected_projection(db, with_tx);
    let c = db.client().await;
    for t in tables {
        let extra = count(
            &c,
            &format!(
                "SELECT count(*) FROM (SELECT * FROM public.{t} EXCEPT ALL SELECT * FROM expected.{t}) d"
            ),
        )
        .await;
        let missing = count(
            &c,
            &format!(
                "SELECT count(*) FROM (SELECT * FROM expected.{t} EXCEPT ALL SELECT * FROM public.{t}) d"
            ),
        )
        .await;
        assert_eq!(
            (extra, missing),
            (0, 0),
            "{context}: table {t} differs from the set-based projection \
             ({extra} rows too many, {missing} missing)"
        );
    }
    for t in ["event", "dance_hall", "band"]
        .iter()
        .filter(|t| tables.contains(t))
    {
        assert!(
            count(&c, &format!("SELECT count(*) FROM public.{t}")).await > 10,
            "{context}: {t} is (nearly) empty: the comparison proves nothing"
        );
    }
}

/// The last event in the reader's order: (tx, id) with the transaction
/// column, id without.
async fn reader_head(c: &Client, with_tx: bool) -> i64 {
    let sql = if with_tx {
        "SELECT coalesce((SELECT id FROM events ORDER BY tx DESC, id DESC LIMIT 1), 0)"
    } else {
        "SELECT coalesce(max(id), 0) FROM events"
    };
    count(c, sql).await
}

/// One part's row of a live record in `projectionist.partitions`.
#[derive(Clone, Debug, PartialEq)]
struct Part {
    partition: i32,
    partitions: i32,
    position: i64,
    tx: Option<String>,
    events: i64,
}

/// The parts of the live record of `name`, by partition.
async fn parts(c: &Client, name: &str) -> Vec<Part> {
    c.query(
        "SELECT partition, partitions, position, tx::text, events_processed \
         FROM projectionist.partitions WHERE projector = $1 AND version_id IS NULL ORDER BY partition",
        &[&name],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| Part {
        partition: r.get(0),
        partitions: r.get(1),
        position: r.get(2),
        tx: r.get(3),
        events: r.get(4),
    })
    .collect()
}

/// (state, position, partitions) of a projector's ledger row.
async fn record(c: &Client, name: &str) -> (String, i64, i32) {
    let r = c
        .query_one(
            "SELECT state, position, partitions FROM projectionist.projectors WHERE name = $1",
            &[&name],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// Whether the live record of `name` has `n` parts, all at `head`.
async fn parts_at(c: &Client, name: &str, n: i32, head: i64) -> bool {
    let ps = parts(c, name).await;
    ps.len() == n as usize && ps.iter().all(|p| p.position == head)
}

/// Asserts `name` is live with `n` part rows (partitions 0..n, each knowing
/// it is one of `n`), every part at `head`, and the projector's own row at
/// the lowest part.
async fn assert_parts_at_head(c: &Client, name: &str, n: i32, head: i64) {
    let ps = parts(c, name).await;
    assert_eq!(
        ps.iter()
            .map(|p| (p.partition, p.partitions))
            .collect::<Vec<_>>(),
        (0..n).map(|k| (k, n)).collect::<Vec<_>>(),
        "{name}: the part rows of the live record: {ps:?}"
    );
    for p in &ps {
        assert_eq!(p.position, head, "{name}: part {p:?} is not at the head");
    }
    let lowest = ps.iter().map(|p| p.position).min().unwrap();
    let (state, position, partitions) = record(c, name).await;
    assert_eq!(state, "live", "{name}");
    assert_eq!(partitions, n, "{name}: projectors.partitions");
    assert_eq!(
        position, lowest,
        "{name}: the projector's position is the lowest part's"
    );
}

/// The part (0..n) of an event of stream `stream` (an SQL expression giving
/// text), as the contract defines it.
fn part_of(stream: &str, n: i32) -> String {
    format!("coalesce(abs(hashtextextended({stream}, 0) % {n}), 0)")
}

/// The store of the per-stream counters: `stream_count` counts each stream's
/// events as they are applied, so an event applied twice (or lost) shows.
const COUNTER_TABLES: &str = "CREATE TABLE stream_count (stream uuid PRIMARY KEY, n bigint NOT NULL); \
                              CREATE TABLE stream_seen (id bigint PRIMARY KEY)";

/// A projector counting each stream's `Thing` events (and logging their
/// positions: applying one twice breaks on the primary key).
fn counter_projector(name: &str, partitions: i32) -> String {
    format!(
        "[projectors.{name}]\npartitions = {partitions}\ntables = [\"stream_count\", \"stream_seen\"]\n\
         on.Thing = [\"INSERT INTO stream_count (stream, n) VALUES (:stream::uuid, 1) \
         ON CONFLICT (stream) DO UPDATE SET n = stream_count.n + 1\", \
         \"INSERT INTO stream_seen (id) VALUES (:position)\"]\n"
    )
}

/// A counter projector `name` in four parts over 1,000 events of 50
/// streams, booted.
async fn booted_counter_in_four_parts(db: &TestDb, name: &str) -> Client {
    let c = thing_store(db, true, COUNTER_TABLES, &counter_projector(name, 4)).await;
    add_stream_things(&c, 1_000, 50).await;
    db.run(&["boot"]).expect(0);
    c
}

/// Appends `n` `Thing` events over `streams` streams (the same streams on
/// every call) in one statement; returns the new head.
async fn add_stream_things(c: &Client, n: i64, streams: i64) -> i64 {
    c.execute(
        "INSERT INTO events (aggregate_id, aggregate_name, name, data) \
         SELECT md5('stream ' || (i % $2))::uuid, 'thing', 'Thing', jsonb_build_object('i', i) \
         FROM generate_series(1::bigint, $1) i",
        &[&n, &streams],
    )
    .await
    .unwrap();
    head(c).await
}

/// Asserts every stream's counter equals its number of events: none lost,
/// none applied twice.
async fn assert_every_event_counted_once(c: &Client) {
    let wrong = count(
        c,
        "SELECT count(*) FROM ( \
           (SELECT aggregate_id, count(*) FROM events GROUP BY 1 EXCEPT ALL SELECT stream, n FROM stream_count) \
           UNION ALL \
           (SELECT stream, n FROM stream_count EXCEPT ALL SELECT aggregate_id, count(*) FROM events GROUP BY 1)) d",
    )
    .await;
    let (events, counted) = (
        count(c, "SELECT count(*) FROM events").await,
        count(c, "SELECT coalesce(sum(n), 0)::bigint FROM stream_count").await,
    );
    assert_eq!(
        wrong, 0,
        "streams whose counter differs from their number of events ({counted} counted for {events} events)"
    );
    assert_eq!(counted, events);
    assert_eq!(count(c, "SELECT count(*) FROM stream_seen").await, events);
}

/// The parts of `name` (0..n) with the application name of the session
/// holding each one's `owner:NAME#k` lock (the runner playing it).
async fn part_owners(c: &Client, name: &str, n: i32) -> Vec<(i32, String)> {
    c.query(
        "SELECT k, a.application_name FROM generate_series(0, $2 - 1) k \
         JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.classid::bigint = (hashtext('projectionist:projectionist')::bigint & 4294967295) \
           AND l.objid::bigint = (hashtext('owner:' || $1 || '#' || k)::bigint & 4294967295) \
         JOIN pg_stat_activity a ON a.pid = l.pid \
         ORDER BY 1, 2",
        &[&name, &n],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// The parts of `name` the runner `p` owns.
async fn parts_owned_by(c: &Client, name: &str, n: i32, p: &Player) -> Vec<i32> {
    let tag = format!("pid {}", p.pid());
    part_owners(c, name, n)
        .await
        .into_iter()
        .filter(|(_, app)| app.ends_with(&tag))
        .map(|(k, _)| k)
        .collect()
}

/// Waits for `child` to exit, up to `limit`; kills it (and fails) past that.
async fn finish(mut child: Child, limit: Duration) -> Run {
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return Run::from(child.wait_with_output().unwrap());
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

/// `boot --json`, asserting exit 0; returns its JSON.
#[track_caller]
fn boot_json(db: &TestDb, args: &[&str]) -> Value {
    let mut all = vec!["boot", "--json"];
    all.extend_from_slice(args);
    let run = db.run(&all);
    run.expect(0);
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("boot --json printed no JSON ({e}):\n{}", run.stdout))
}

/// A projector's entry in the `projectors` list of a JSON document.
fn json_projector<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["projectors"]
        .as_array()
        .unwrap_or_else(|| panic!("no projectors list in {json}"))
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no projector {name} in {json}"))
}

/// A number below `limit`, from the clock's nanoseconds.
fn random_below(limit: i64) -> i64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as i64;
    nanos % limit
}

// ---------------------------------------------------------------------------
// 1. A partitioned boot builds exactly the read model an unpartitioned one does.

async fn partitioned_boot_equals_the_set_based_projection(with_tx: bool) {
    for n in [2, 3] {
        let db = TestDb::new().await;
        db.gen_events(3_000);
        let c = db.client().await;
        let parts_line = format!("partitions = {n}");
        // `event` (and with 3 parts `dancehall` too: its handlers touch only
        // the event's own stream) partitioned; band and userpreferences not.
        let mut settings = vec![("event", parts_line.as_str())];
        if n == 3 {
            settings.push(("dancehall", parts_line.as_str()));
        }
        example_manifest(&db, with_tx, &settings);
        // Small batches: every part commits several of them. With one job,
        // each projector's turn plays its parts one after the other.
        let jobs = if n == 3 { "1" } else { "2" };
        let json = boot_json(&db, &["--batch-size", "400", "--jobs", jobs]);
        let h = reader_head(&c, with_tx).await;
        assert!(h >= 3_000);
        let event = json_projector(&json, "event");
        assert_eq!(event["action"], "new", "{json}");
        assert_eq!(event["state"], "live", "{json}");
        assert_eq!(event["position"], h, "{json}");

        assert_parts_at_head(&c, "event", n, h).await;
        if n == 3 {
            assert_parts_at_head(&c, "dancehall", 3, h).await;
        } else {
            assert_eq!(parts(&c, "dancehall").await, Vec::<Part>::new());
            assert_eq!(record(&c, "dancehall").await, ("live".into(), h, 1));
        }
        for p in ["band", "userpreferences"] {
            assert_eq!(parts(&c, p).await, Vec::<Part>::new(), "{p}");
            assert_eq!(record(&c, p).await, ("live".into(), h, 1), "{p}");
        }
        // Each part applied its own streams' events, together all of them.
        let ps = parts(&c, "event").await;
        let handled = count(
            &c,
            "SELECT count(*) FROM events WHERE name IN ('EventCreated', 'EventUpdated', 'EventDeleted')",
        )
        .await;
        assert_eq!(ps.iter().map(|p| p.events).sum::<i64>(), handled, "{ps:?}");
        for p in &ps {
            let own = count(
                &c,
                &format!(
                    "SELECT count(*) FROM events WHERE name IN ('EventCreated', 'EventUpdated', 'EventDeleted') \
                     AND {} = {}",
                    part_of("aggregate_id::text", n),
                    p.partition
                ),
            )
            .await;
            assert_eq!(p.events, own, "events processed by part {p:?}");
        }
        if with_tx {
            assert!(ps.iter().all(|p| p.tx.is_some()), "{ps:?}");
        }
        assert_equals_expected(&db, with_tx, &format!("partitions = {n}")).await;
    }
}

#[tokio::test]
async fn a_partitioned_boot_equals_the_set_based_projection_with_transaction_column() {
    partitioned_boot_equals_the_set_based_projection(true).await;
}

#[tokio::test]
async fn a_partitioned_boot_equals_the_set_based_projection_without_transaction_column() {
    partitioned_boot_equals_the_set_based_projection(false).await;
}

// ---------------------------------------------------------------------------
// 2. play keeps the parts up to date: still the same read model.

async fn partitioned_play_equals_the_set_based_projection(with_tx: bool) {
    let db = TestDb::new().await;
    db.gen_events(2_000);
    let c = db.client().await;
    example_manifest(
        &db,
        with_tx,
        &[("event", "partitions = 3"), ("dancehall", "partitions = 2")],
    );
    db.run(&["boot"]).expect(0);
    let mut play = Player::start(&db, "parts", &["--poll", "200ms", "--batch-size", "100"]);
    wait_for("play to take every part", PATIENCE, &[&play], async || {
        let log = play.log();
        (0..3).all(|k| log.contains(&format!("playing partition {k} of 3 of projector `event`")))
            && (0..2).all(|k| {
                log.contains(&format!(
                    "playing partition {k} of 2 of projector `dancehall`"
                ))
            })
    })
    .await;

    // Several appends, each several transactions, many batches of 100.
    for _ in 0..4 {
        db.gen_events(500);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let h = reader_head(&c, with_tx).await;
    wait_for(
        "every projector and part to reach the head",
        PATIENCE,
        &[&play],
        async || {
            parts_at(&c, "event", 3, h).await
                && parts_at(&c, "dancehall", 2, h).await
                && position(&c, "event").await == h
                && position(&c, "dancehall").await == h
                && position(&c, "band").await == h
                && position(&c, "userpreferences").await == h
        },
    )
    .await;
    play.assert_running();
    assert_parts_at_head(&c, "event", 3, h).await;
    assert_parts_at_head(&c, "dancehall", 2, h).await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM projectionist.failures").await,
        0,
        "{}",
        play.log()
    );
    assert_equals_expected(&db, with_tx, "after play").await;
    play.stop();
}

#[tokio::test]
async fn partitioned_play_equals_the_set_based_projection_with_transaction_column() {
    partitioned_play_equals_the_set_based_projection(true).await;
}

#[tokio::test]
async fn partitioned_play_equals_the_set_based_projection_without_transaction_column() {
    partitioned_play_equals_the_set_based_projection(false).await;
}

// ---------------------------------------------------------------------------
// 3. SIGKILL mid-boot: each part resumes from its own position, exactly once.

#[tokio::test]
async fn sigkill_mid_boot_of_a_partitioned_projector_resumes_each_part_exactly_once() {
    let db = TestDb::new().await;
    let c = thing_store(
        &db,
        false,
        COUNTER_TABLES,
        &counter_projector("per_stream", 3),
    )
    .await;
    let total = add_stream_things(&c, 40_000, 300).await;
    let in_part = |k: i32| format!("{} = {k}", part_of("aggregate_id::text", 3));

    let mut processed_before = 0;
    for round in 0..2 {
        let mut boot = db
            .command(&["boot", "--batch-size", "200", "-q"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Killed at a random moment, once parts have committed batches
        // (2,000 to 10,000 events beyond what the last round did).
        let target = processed_before + 2_000 + random_below(8_000);
        wait_for("the parts to commit batches", PATIENCE, &[], async || {
            parts(&c, "per_stream")
                .await
                .iter()
                .map(|p| p.events)
                .sum::<i64>()
                >= target
        })
        .await;
        assert!(
            boot.try_wait().unwrap().is_none(),
            "round {round}: boot finished before it could be killed: give it more events"
        );
        boot.kill().unwrap(); // SIGKILL
        boot.wait().unwrap();

        let ps = parts(&c, "per_stream").await;
        eprintln!("round {round}: killed with the parts at {ps:?}");
        assert_eq!(ps.len(), 3);
        assert!(
            ps.iter().any(|p| p.position < total),
            "round {round}: not mid-boot: {ps:?}"
        );
        let (state, pos, _) = record(&c, "per_stream").await;
        assert_eq!(state, "booting");
        assert_eq!(pos, ps.iter().map(|p| p.position).min().unwrap());
        // What each part committed is exactly its streams' events up to its position.
        for p in &ps {
            let applied = count(
                &c,
                &format!(
                    "SELECT coalesce(sum(n), 0)::bigint FROM stream_count WHERE {}",
                    in_part(p.partition).replace("aggregate_id", "stream")
                ),
            )
            .await;
            let upto = c
                .query_one(
                    &format!(
                        "SELECT count(*) FROM events WHERE {} AND (tx, id) <= ($1::text::xid8, $2::bigint)",
                        in_part(p.partition)
                    ),
                    &[&p.tx, &p.position],
                )
                .await
                .unwrap()
                .get::<_, i64>(0);
            assert_eq!(
                applied, upto,
                "round {round}: part {p:?}: applied events vs its events up to its position"
            );
            assert_eq!(
                p.events, upto,
                "round {round}: part {p:?}: events_processed"
            );
        }
        processed_before = ps.iter().map(|p| p.events).sum();
    }

    let json = boot_json(&db, &[]);
    assert_eq!(
        json_projector(&json, "per_stream")["action"],
        "resume",
        "{json}"
    );
    assert_parts_at_head(&c, "per_stream", 3, total).await;
    assert_every_event_counted_once(&c).await;
    assert_eq!(
        parts(&c, "per_stream")
            .await
            .iter()
            .map(|p| p.events)
            .sum::<i64>(),
        total
    );
}

// ---------------------------------------------------------------------------
// 4. Several runners: parts owned separately, taken over when a runner dies.

/// Starts two runners of the 4 parts of `name`: the first plays parts 0 and
/// 1, the second parts 2 and 3. Returns (first, second).
async fn start_runners_on_separate_parts(db: &TestDb, c: &Client, name: &str) -> (Player, Player) {
    // Which runner plays which parts, decided here: parts 2 and 3 are held
    // by this test while the first runner starts (alone, it would take them
    // all). Its poll is long, so only the second runner (200 ms) takes them
    // once they are let go.
    let holder = db.client().await;
    for k in [2, 3] {
        holder
            .execute(
                "SELECT pg_advisory_lock(hashtext('projectionist:projectionist'), hashtext($1))",
                &[&format!("owner:{name}#{k}")],
            )
            .await
            .unwrap();
    }
    let first = Player::start(db, "first", &["--poll", "30s", "--batch-size", "50"]);
    wait_for(
        "the first runner to take parts 0 and 1",
        PATIENCE,
        &[&first],
        async || parts_owned_by(c, name, 4, &first).await == [0, 1],
    )
    .await;
    let second = Player::start(db, "second", &["--poll", "200ms", "--batch-size", "50"]);
    wait_for(
        "the second runner to start",
        PATIENCE,
        &[&second],
        async || second.log().contains("playing live projectors"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(parts_owned_by(c, name, 4, &second).await, Vec::<i32>::new());
    holder
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    wait_for(
        "the second runner to take parts 2 and 3",
        PATIENCE,
        &[&first, &second],
        async || parts_owned_by(c, name, 4, &second).await == [2, 3],
    )
    .await;
    assert_eq!(parts_owned_by(c, name, 4, &first).await, [0, 1]);
    (first, second)
}

/// Events in several transactions: every part of `name` advances, each in
/// the runner that owns it (parts 0 and 1 in `first`, 2 and 3 in `second`).
async fn assert_each_runner_plays_its_parts(
    c: &Client,
    name: &str,
    first: &Player,
    second: &Player,
) {
    let before = parts(c, name).await;
    for _ in 0..5 {
        add_stream_things(c, 200, 50).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let h = head(c).await;
    wait_for(
        "every part to reach the head",
        PATIENCE,
        &[first, second],
        async || parts_at(c, name, 4, h).await && position(c, name).await == h,
    )
    .await;
    let after = parts(c, name).await;
    for (b, a) in before.iter().zip(&after) {
        assert!(
            a.events > b.events,
            "part {} did not apply any new event: {b:?} -> {a:?}",
            a.partition
        );
    }
    assert_every_event_counted_once(c).await;
    let (one, two) = (first.log(), second.log());
    for k in 0..4 {
        let line = format!("playing partition {k} of 4 of projector `{name}`");
        assert_eq!(
            (one.contains(&line), two.contains(&line)),
            (k < 2, k >= 2),
            "which runner logged `{line}`\n{one}\n{two}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_play_separate_parts_and_one_takes_the_others_over_when_it_is_killed() {
    let db = TestDb::new().await;
    let name = "split_parts";
    let c = booted_counter_in_four_parts(&db, name).await;

    let (mut first, mut second) = start_runners_on_separate_parts(&db, &c, name).await;
    assert_each_runner_plays_its_parts(&c, name, &first, &second).await;

    // SIGKILL the first runner while events keep coming: the second takes its parts.
    first.sigkill();
    add_stream_things(&c, 300, 50).await;
    let took = wait_for(
        "the second runner to take every part over",
        PATIENCE,
        &[&second],
        async || parts_owned_by(&c, name, 4, &second).await == [0, 1, 2, 3],
    )
    .await;
    eprintln!("parts taken over {took:?} after SIGKILL");
    assert!(took < Duration::from_secs(10), "takeover took {took:?}");
    let h = add_stream_things(&c, 300, 50).await;
    wait_for(
        "every part to reach the head after the takeover",
        PATIENCE,
        &[&second],
        async || parts_at(&c, name, 4, h).await && position(&c, name).await == h,
    )
    .await;
    assert_parts_at_head(&c, name, 4, h).await;
    assert_every_event_counted_once(&c).await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM projectionist.failures").await,
        0,
        "{}",
        second.log()
    );
    second.stop();
}

/// Two runners of a partitioned projector share its parts: a second runner
/// started beside one that plays every part gets its share (scaling out),
/// the parts change hands while events keep coming, and every event is
/// still applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_runner_takes_its_share_of_the_parts_while_events_keep_coming() {
    let db = TestDb::new().await;
    let name = "share_parts";
    let c = booted_counter_in_four_parts(&db, name).await;
    let mut first = Player::start(&db, "first", &["--poll", "200ms", "--batch-size", "50"]);
    wait_for(
        "the first runner to play every part",
        PATIENCE,
        &[&first],
        async || parts_owned_by(&c, name, 4, &first).await == [0, 1, 2, 3],
    )
    .await;

    // A writer appends events all along, in small transactions.
    let stop_writer = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (stop, w) = (stop_writer.clone(), db.client().await);
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                add_stream_things(&w, 20, 50).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Scaling out: a second runner starts beside it; each ends with half.
    let mut second = Player::start(&db, "second", &["--poll", "200ms", "--batch-size", "50"]);
    let split = async || {
        part_owners(&c, name, 4).await.len() == 4
            && parts_owned_by(&c, name, 4, &first).await.len() == 2
            && parts_owned_by(&c, name, 4, &second).await.len() == 2
    };
    let took = wait_for(
        "each runner to play two of the four parts",
        PATIENCE,
        &[&first, &second],
        split,
    )
    .await;
    eprintln!("parts split {took:?} after the second runner started");
    assert!(
        took < Duration::from_secs(10),
        "the parts were split after {took:?}"
    );
    assert!(
        first.log().contains("to another runner"),
        "the first runner says it leaves parts\n{}",
        first.log()
    );
    // And they stay so: no part goes back and forth.
    let (one, two) = (
        parts_owned_by(&c, name, 4, &first).await,
        parts_owned_by(&c, name, 4, &second).await,
    );
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(parts_owned_by(&c, name, 4, &first).await, one);
        assert_eq!(parts_owned_by(&c, name, 4, &second).await, two);
    }
    stop_writer.cancel();
    writer.await.unwrap();
    let h = head(&c).await;
    wait_for(
        "every part to reach the head",
        PATIENCE,
        &[&first, &second],
        async || parts_at(&c, name, 4, h).await && position(&c, name).await == h,
    )
    .await;
    assert_every_event_counted_once(&c).await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM projectionist.failures").await,
        0,
        "{}\n{}",
        first.log(),
        second.log()
    );
    first.stop();
    second.stop();
}

/// A runner that cannot play a projector (here: an old deploy's, whose
/// manifest has the version before the one now live; the version guard
/// makes it leave the projector alone) must not count in the share of its
/// parts: the runner that can play them plays them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_cannot_play_a_partitioned_projector_leaves_it_all_to_one_that_can() {
    let db = TestDb::new().await;
    let name = "deployed_parts";
    let c = booted_counter_in_four_parts(&db, name).await;
    let mut old = Player::start(&db, "old", &["--poll", "200ms"]);
    wait_for(
        "the old runner to play every part",
        PATIENCE,
        &[&old],
        async || parts_owned_by(&c, name, 4, &old).await == [0, 1, 2, 3],
    )
    .await;

    // The deploy: version 2 is rebuilt and swapped in; the old runner (version
    // 1) leaves it alone, and a new runner with the new manifest starts
    // before the old one is stopped (a rolling update).
    let manifest = std::fs::read_to_string(db.manifest_path()).unwrap();
    db.write_manifest(&manifest.replacen(
        &format!("[projectors.{name}]\n"),
        &format!("[projectors.{name}]\nversion = 2\n"),
        1,
    ));
    db.run(&["boot"]).expect(0);
    wait_for(
        "the old runner to leave the new version alone",
        PATIENCE,
        &[&old],
        async || part_owners(&c, name, 4).await.is_empty(),
    )
    .await;
    let mut new = Player::start(&db, "new", &["--poll", "200ms"]);
    let h = add_stream_things(&c, 500, 50).await;
    wait_for(
        "the new runner to play every part to the head",
        15.0,
        &[&old, &new],
        async || parts_at(&c, name, 4, h).await,
    )
    .await;
    assert_eq!(parts_owned_by(&c, name, 4, &new).await, [0, 1, 2, 3]);
    assert_every_event_counted_once(&c).await;
    old.assert_running();
    old.stop();
    new.stop();
}

// ---------------------------------------------------------------------------
// 5. Changing the number of partitions rebuilds the projector.

async fn changing_partitions_rebuilds(in_place: bool) {
    let db = TestDb::new().await;
    db.gen_events(2_000);
    let c = db.client().await;
    let rebuild = if in_place {
        "rebuild = \"in_place\""
    } else {
        "rebuild = \"swap\""
    };
    example_manifest(
        &db,
        true,
        &[("event", "partitions = 2"), ("event", rebuild)],
    );
    db.run(&["boot"]).expect(0);
    let h = reader_head(&c, true).await;
    assert_parts_at_head(&c, "event", 2, h).await;

    for n in [3, 1] {
        db.gen_events(300);
        let parts_line = format!("partitions = {n}");
        example_manifest(
            &db,
            true,
            &[("event", parts_line.as_str()), ("event", rebuild)],
        );
        let json = boot_json(&db, &[]);
        let h = reader_head(&c, true).await;
        let event = json_projector(&json, "event");
        assert_eq!(event["action"], "rebuild", "2 -> {n}: {json}");
        assert_eq!(event["state"], "live", "{json}");
        assert_eq!(event["position"], h, "{json}");
        // Only `event` is rebuilt (the others are live: play's to catch up).
        assert_eq!(
            json["projectors"].as_array().unwrap().len(),
            1,
            "only event is booted: {json}"
        );
        let swapped: Vec<&Value> = json["swaps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["projectors"]
                    .as_array()
                    .unwrap()
                    .contains(&Value::from("event"))
            })
            .collect();
        assert_eq!(swapped.len(), usize::from(!in_place), "swaps: {json}");
        if n > 1 {
            assert_parts_at_head(&c, "event", n, h).await;
        } else {
            assert_eq!(
                parts(&c, "event").await,
                Vec::<Part>::new(),
                "unpartitioned again: no part rows left for the live record"
            );
            assert_eq!(record(&c, "event").await, ("live".into(), h, 1));
        }
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM projectionist.versions WHERE kind = 'build'"
            )
            .await,
            0,
            "no build left behind"
        );
        // Only `event` is at the head (the others wait for play).
        assert_tables_equal_expected(
            &db,
            true,
            &["event"],
            &format!("rebuilt with partitions = {n}"),
        )
        .await;
    }
}

#[tokio::test]
async fn changing_partitions_rebuilds_the_projector_beside_the_live_one() {
    changing_partitions_rebuilds(false).await;
}

#[tokio::test]
async fn changing_partitions_rebuilds_the_projector_in_place() {
    changing_partitions_rebuilds(true).await;
}

/// A version bump and a reset of a partitioned projector rebuild it beside
/// the live tables (the default `rebuild = "swap"`), parts and all.
#[tokio::test]
async fn a_version_bump_and_a_reset_of_a_partitioned_projector_rebuild_it_beside() {
    let db = TestDb::new().await;
    db.gen_events(2_000);
    let c = db.client().await;
    example_manifest(&db, true, &[("event", "partitions = 2")]);
    db.run(&["boot"]).expect(0);

    let run = db.run(&["reset", "event", "--yes"]);
    run.expect(0);
    let h = reader_head(&c, true).await;
    assert_parts_at_head(&c, "event", 2, h).await;
    assert_tables_equal_expected(&db, true, &["event"], "after reset").await;

    db.gen_events(300);
    let text = std::fs::read_to_string(db.manifest_path()).unwrap();
    let bumped = text.replacen(
        "[projectors.event]\npartitions = 2\nmode = \"from_beginning\"\ntables = [\"event\"]\nversion = 1\n",
        "[projectors.event]\npartitions = 2\nmode = \"from_beginning\"\ntables = [\"event\"]\nversion = 2\n",
        1,
    );
    assert_ne!(bumped, text, "the version line of `event` was not found");
    db.write_manifest(&bumped);
    let json = boot_json(&db, &[]);
    assert_eq!(
        json_projector(&json, "event")["action"],
        "rebuild",
        "{json}"
    );
    let h = reader_head(&c, true).await;
    assert_parts_at_head(&c, "event", 2, h).await;
    assert_eq!(
        count(
            &c,
            "SELECT version::bigint FROM projectionist.projectors WHERE name = 'event'"
        )
        .await,
        2
    );
    assert_tables_equal_expected(&db, true, &["event"], "after the version bump").await;
}

/// A rebuild beside the live tables replays every part into the build's
/// tables: the live tables are left as they were (and kept as the previous
/// version after the swap), and the new ones count every event once.
#[tokio::test]
async fn a_reset_of_a_partitioned_projector_replays_its_parts_into_the_build_tables_only() {
    let db = TestDb::new().await;
    let c = thing_store(&db, false, COUNTER_TABLES, &counter_projector("recount", 2)).await;
    let h = add_stream_things(&c, 5_000, 40).await;
    db.run(&["boot"]).expect(0);
    assert_every_event_counted_once(&c).await;

    db.run(&["reset", "recount", "--yes"]).expect(0);
    assert_parts_at_head(&c, "recount", 2, h).await;
    assert_every_event_counted_once(&c).await;
    // The tables before the reset, kept as they were: every event counted once.
    let kept = count(
        &c,
        "SELECT count(*) FROM ( \
           (SELECT aggregate_id, count(*) FROM events GROUP BY 1 \
            EXCEPT ALL SELECT stream, n FROM projectionist_previous.stream_count__v1) \
           UNION ALL \
           (SELECT stream, n FROM projectionist_previous.stream_count__v1 \
            EXCEPT ALL SELECT aggregate_id, count(*) FROM events GROUP BY 1)) d",
    )
    .await;
    assert_eq!(kept, 0, "the live tables were written to by the build");
    assert_eq!(
        count(&c, "SELECT count(*) FROM projectionist.failures").await,
        0
    );
}

/// A reset (rebuilt beside, swapped in) of a partitioned projector while
/// play runs it and events keep coming: play goes on with the new tables and
/// the new parts, and every event is applied exactly once in them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_of_a_partitioned_projector_while_play_runs_it_loses_and_doubles_nothing() {
    let db = TestDb::new().await;
    let name = "reset_parts";
    let c = thing_store(&db, true, COUNTER_TABLES, &counter_projector(name, 3)).await;
    add_stream_things(&c, 5_000, 60).await;
    db.run(&["boot"]).expect(0);
    let mut play = Player::start(&db, "reset", &["--poll", "200ms", "--batch-size", "100"]);
    wait_for("play to take every part", PATIENCE, &[&play], async || {
        part_owners(&c, name, 3).await.len() == 3
    })
    .await;
    let stop_writer = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (stop, w) = (stop_writer.clone(), db.client().await);
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                add_stream_things(&w, 15, 60).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = db.run(&["reset", name, "--yes"]);
    run.expect(0);
    assert!(
        run.stderr.contains("swapped in"),
        "rebuilt beside: {}",
        run.stderr
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_writer.cancel();
    writer.await.unwrap();
    let h = head(&c).await;
    wait_for(
        "every part to reach the head after the reset",
        PATIENCE,
        &[&play],
        async || parts_at(&c, name, 3, h).await && position(&c, name).await == h,
    )
    .await;
    play.assert_running();
    assert_parts_at_head(&c, name, 3, h).await;
    assert_every_event_counted_once(&c).await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM projectionist.failures").await,
        0,
        "{}",
        play.log()
    );
    play.stop();
}

// ---------------------------------------------------------------------------
// 6. A store without a stream cannot partition.

#[tokio::test]
async fn partitions_on_a_store_without_a_stream_are_refused_pointing_at_the_key() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE seen (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    add_things(&c, 10).await;
    let text = "[store]\ntable = \"events\"\nposition = \"id\"\ntype = \"name\"\ndata = \"data\"\n\
                time = \"tstamp\"\ntransaction = \"tx\"\n\n\
                [projectors.nostream]\ntables = [\"seen\"]\npartitions = 2\n\
                on.Thing = \"INSERT INTO seen (id) VALUES (:position)\"\n";
    db.write_manifest(text);
    let line = text.lines().position(|l| l == "partitions = 2").unwrap() + 1;
    let at = format!("projectors.toml:{line}:14");
    for cmd in ["validate", "boot", "play"] {
        let child = db
            .command(&[cmd])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let run = finish(child, Duration::from_secs(20)).await;
        run.expect(2);
        assert!(
            run.stderr.contains("partitioned by stream") && run.stderr.contains("no stream"),
            "{cmd}: the message says why\n{}",
            run.stderr
        );
        assert!(
            run.stderr.contains(&at),
            "{cmd}: the message points at the `partitions` value ({at})\n{}",
            run.stderr
        );
        assert!(
            run.stderr.contains("partitions = 2"),
            "{cmd}: the offending line is shown\n{}",
            run.stderr
        );
    }
    assert_eq!(db.ledger("nostream").await, None, "nothing booted");
    assert_eq!(count(&c, "SELECT count(*) FROM seen").await, 0);
}

// ---------------------------------------------------------------------------
// 7. verify under traffic never reports a partitioned projector as MISMATCH.

/// Two writers appending dancefinder events while they run: one runs
/// scripts/gen-events over and over, the other commits small transactions of
/// new dance events (and updates of them) as fast as it can.
struct Traffic {
    stop_gen_events: std::sync::Arc<std::sync::atomic::AtomicBool>,
    gen_events: std::thread::JoinHandle<u32>,
    stop_fast_writer: tokio_util::sync::CancellationToken,
    fast_writer: tokio::task::JoinHandle<u32>,
}

impl Traffic {
    async fn start(db: &TestDb) -> Traffic {
        // A writer appends dancefinder events all along.
        let stop_gen_events = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gen_events = {
            let (stop, url) = (stop_gen_events.clone(), db.url.clone());
            std::thread::spawn(move || {
                let mut appended = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let out = Command::new(root().join("scripts/gen-events"))
                        .arg("150")
                        .env("DATABASE_URL", &url)
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    appended += 1;
                    std::thread::sleep(Duration::from_millis(30));
                }
                appended
            })
        };
        // And another one commits small transactions of new dance events (and
        // updates of them) as fast as it can.
        let stop_fast_writer = tokio_util::sync::CancellationToken::new();
        let fast_writer = {
            let (stop, w) = (stop_fast_writer.clone(), db.client().await);
            tokio::spawn(async move {
                let mut transactions = 0;
                while !stop.is_cancelled() {
                    w.batch_execute(
                        "BEGIN; \
                         INSERT INTO events (aggregate_id, aggregate_name, name, data) \
                         SELECT gen_random_uuid(), 'event', 'EventCreated', jsonb_build_object( \
                            'band', 'Traffic ' || i, 'date', '2024-05-01', 'time', '20.00-00.00', \
                            'dance_hall', 'Hall ' || i, 'city', 'Umeå', 'municipality', 'Umeå', \
                            'state', 'Västerbottens län', 'country', 'Sverige', 'extra_info', 'traffic') \
                         FROM generate_series(1, 3) i; \
                         INSERT INTO events (aggregate_id, aggregate_name, name, data) \
                         SELECT aggregate_id, 'event', 'EventUpdated', data || '{\"extra_info\": \"updated\"}' \
                         FROM events WHERE name = 'EventCreated' AND data->>'extra_info' = 'traffic' \
                         ORDER BY id DESC LIMIT 2; \
                         COMMIT",
                    )
                    .await
                    .unwrap();
                    transactions += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                transactions
            })
        };
        Traffic {
            stop_gen_events,
            gen_events,
            stop_fast_writer,
            fast_writer,
        }
    }

    /// Stops both writers; returns how many gen-events runs and how many
    /// small transactions they made.
    async fn stop(self) -> (u32, u32) {
        self.stop_gen_events
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop_fast_writer.cancel();
        let appended = self.gen_events.join().unwrap();
        let transactions = self.fast_writer.await.unwrap();
        (appended, transactions)
    }
}

/// Runs `verify event dancehall --json` 8 times, asserting each check says
/// ok or behind (never a mismatch); returns every check's verdict.
async fn verify_runs_never_mismatch(db: &TestDb, play: &Player) -> Vec<String> {
    let mut verdicts: Vec<String> = Vec::new();
    for i in 0..8 {
        let run = db.run(&["verify", "event", "dancehall", "--json"]);
        let json: Value = serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("verify --json ({e}):\n{}\n{}", run.stdout, run.stderr));
        let checks = json["checks"].as_array().unwrap();
        assert_eq!(checks.len(), 3, "the checks of event and dancehall: {json}");
        for check in checks {
            let result = check["result"].as_str().unwrap();
            assert!(
                result == "ok" || result == "behind",
                "verify run {i} under traffic: {check}\n{}",
                play.log()
            );
            verdicts.push(format!("{}: {result}", check["projector"]));
        }
        run.expect(0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    verdicts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_of_partitioned_projectors_under_traffic_reports_no_mismatch() {
    let db = TestDb::new().await;
    db.gen_events(2_000);
    let c = db.client().await;
    example_manifest(
        &db,
        true,
        &[("event", "partitions = 3"), ("dancehall", "partitions = 2")],
    );
    db.run(&["boot"]).expect(0);
    let mut play = Player::start(&db, "verify", &["--poll", "100ms", "--batch-size", "40"]);

    let traffic = Traffic::start(&db).await;
    let verdicts = verify_runs_never_mismatch(&db, &play).await;
    let (appended, transactions) = traffic.stop().await;
    eprintln!(
        "{appended} gen-events runs and {transactions} small transactions while verify ran; verdicts {verdicts:?}"
    );
    assert!(
        appended >= 1 && transactions >= 20,
        "verify ran without traffic"
    );

    // At rest, every check holds (they can fail: the projections are counted).
    let h = reader_head(&c, true).await;
    wait_for(
        "every part to reach the head",
        PATIENCE,
        &[&play],
        async || parts_at(&c, "event", 3, h).await && parts_at(&c, "dancehall", 2, h).await,
    )
    .await;
    let run = db.run(&["verify", "--json"]);
    run.expect(0);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    for check in json["checks"].as_array().unwrap() {
        if check["projector"] == "event" || check["projector"] == "dancehall" {
            assert_eq!(check["result"], "ok", "at rest: {check}");
        }
    }
    assert_equals_expected(&db, true, "after verify under traffic").await;
    play.stop();
}

// ---------------------------------------------------------------------------
// 8. status shows the parts.

#[tokio::test]
async fn status_shows_each_part_with_its_position_lag_and_events() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE part_log (id bigint PRIMARY KEY); CREATE TABLE flat_log (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    // The stream is an expression: events without one (`{}`) go to part 0.
    c.execute(
        "INSERT INTO events (aggregate_id, aggregate_name, name, data) \
         SELECT gen_random_uuid(), 'thing', 'Thing', \
                CASE WHEN i % 10 = 0 THEN '{}'::jsonb ELSE jsonb_build_object('s', 'stream ' || (i % 37)) END \
         FROM generate_series(1, 1000) i",
        &[],
    )
    .await
    .unwrap();
    db.write_manifest(&format!(
        "[store]\ntable = \"events\"\nposition = \"id\"\ntype = \"name\"\ndata = \"data\"\n\
         stream = \"data->>'s'\"\ntime = \"tstamp\"\ntransaction = \"tx\"\n\n\
         [projectors.parted]\npartitions = 3\ntables = [\"part_log\"]\n\
         on.Thing = \"INSERT INTO part_log (id) VALUES (:position)\"\n\n{}",
        logger("flat", "from_beginning", "flat_log")
    ));
    db.run(&["boot"]).expect(0);
    let booted = head(&c).await;
    assert_parts_at_head(&c, "parted", 3, booted).await;
    // New events nobody plays: every part lags by them.
    let h = add_things(&c, 25).await;
    let lag = h - booted;

    let run = db.run(&["status", "--json"]);
    run.expect(0);
    let json: Value = serde_json::from_str(&run.stdout).unwrap();
    let parted = json_projector(&json, "parted");
    assert_eq!(parted["position"], booted, "{parted}");
    assert_eq!(parted["lag"], lag, "{parted}");
    let shown = parted["partitions"]
        .as_array()
        .unwrap_or_else(|| panic!("{parted}"));
    assert_eq!(shown.len(), 3, "{parted}");
    let mut total = 0;
    for (k, part) in shown.iter().enumerate() {
        let own = count(
            &c,
            &format!(
                "SELECT count(*) FROM events WHERE id <= {booted} AND {} = {k}",
                part_of("data->>'s'", 3)
            ),
        )
        .await;
        assert!(own > 0, "part {k} has no events: the test proves nothing");
        assert_eq!(part["partition"], k, "{parted}");
        assert_eq!(part["position"], booted, "{parted}");
        assert_eq!(part["lag"], lag, "{parted}");
        assert_eq!(part["events_processed"], own, "part {k}: {parted}");
        total += own;
    }
    assert_eq!(total, booted);
    assert!(
        shown[0]["events_processed"].as_i64().unwrap()
            >= count(
                &c,
                &format!("SELECT count(*) FROM events WHERE id <= {booted} AND data->>'s' IS NULL")
            )
            .await,
        "the events without a stream are part 0's: {parted}"
    );
    assert_eq!(
        json_projector(&json, "flat")["partitions"],
        serde_json::json!([]),
        "an unpartitioned projector has no parts"
    );

    let run = db.run(&["status", "parted"]);
    run.expect(0);
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("partitions"))
        .unwrap_or_else(|| panic!("no `partitions` line:\n{}", run.stdout));
    let want = (0..3)
        .map(|k| format!("#{k} at {booted} (lag {lag})"))
        .collect::<Vec<_>>()
        .join(", ");
    assert_eq!(
        line.trim_start_matches("partitions").trim(),
        want,
        "{}",
        run.stdout
    );
    let flat = db.run(&["status", "flat"]);
    flat.expect(0);
    assert!(
        !flat.stdout.lines().any(|l| l.starts_with("partitions")),
        "{}",
        flat.stdout
    );
}

// ---------------------------------------------------------------------------
// 9. Set-wise batches: waves of one event per stream, one statement per wave.

/// Whether a `-v` run logged a set-wise batch of projector `name`.
/// Asserts that the part of the 2-part counter projector `name` holding event
/// #`at` stopped just before it, having applied exactly its own events before
/// it; returns how many.
async fn assert_part_kept_only_before(c: &Client, name: &str, at: i64) -> i64 {
    let part_index: i32 = c
        .query_one(
            &format!(
                "SELECT {}::int FROM events WHERE id = {at}",
                part_of("aggregate_id::text", 2)
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let ps = parts(c, name).await;
    let part = ps.iter().find(|p| p.partition == part_index).unwrap();
    assert_eq!(part.position, at - 1, "{ps:?}");
    let kept = count(
        c,
        &format!(
            "SELECT count(*) FROM stream_seen s JOIN events e USING (id) WHERE {} = {part_index}",
            part_of("e.aggregate_id::text", 2)
        ),
    )
    .await;
    let before = count(
        c,
        &format!(
            "SELECT count(*) FROM events WHERE {} = {part_index} AND id < {at}",
            part_of("aggregate_id::text", 2)
        ),
    )
    .await;
    assert_eq!(kept, before);
    kept
}

fn applied_set_wise(run: &Run, name: &str) -> bool {
    run.stderr
        .lines()
        .any(|l| l.contains(&format!("projector `{name}`: ")) && l.contains("applied set-wise"))
}

#[tokio::test]
async fn a_set_wise_batch_runs_each_statement_once_per_wave_not_once_per_event() {
    let db = TestDb::new().await;
    // A statement-level trigger counts the statements that write stream_count.
    let tables = format!(
        "{COUNTER_TABLES}; CREATE TABLE statements (n int); \
         CREATE FUNCTION count_statement() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN INSERT INTO statements VALUES (1); RETURN NULL; END $$; \
         CREATE TRIGGER count_statement AFTER INSERT OR UPDATE ON stream_count \
         FOR EACH STATEMENT EXECUTE FUNCTION count_statement()"
    );
    let c = thing_store(&db, true, &tables, &counter_projector("waves", 2)).await;
    // 3,000 events of 300 streams, ten each, in one batch: ten waves per part.
    let h = add_stream_things(&c, 3_000, 300).await;
    let boot = db.run(&["boot", "-v"]);
    boot.expect(0);
    assert!(applied_set_wise(&boot, "waves"), "{}", boot.stderr);
    assert_parts_at_head(&c, "waves", 2, h).await;
    assert_every_event_counted_once(&c).await;
    // An upsert fires the INSERT and the UPDATE statement triggers: two a
    // statement (event by event: 6,000).
    let statements = count(&c, "SELECT count(*) FROM statements").await;
    assert!(
        statements <= 2 * 10 * 2,
        "{statements} statements wrote stream_count for 3,000 events: not one per wave and part"
    );
}

#[tokio::test]
async fn a_failing_event_of_a_set_wise_batch_is_named_and_the_events_before_it_are_kept() {
    let db = TestDb::new().await;
    let fragile = counter_projector("fragile_waves", 2).replace(
        "VALUES (:position)",
        "VALUES (:position + 0 * (1 / (:position - 1500)))",
    );
    let c = thing_store(&db, true, COUNTER_TABLES, &fragile).await;
    let h = add_stream_things(&c, 3_000, 300).await;
    let boot = db.run(&["boot", "-v"]);
    boot.expect(1);
    assert!(
        boot.stderr
            .contains("projector `fragile_waves` broke at event #1500 (Thing"),
        "{}",
        boot.stderr
    );
    assert!(boot.stderr.contains("division by zero"), "{}", boot.stderr);
    // The events before it were applied set-wise again, without it.
    assert!(applied_set_wise(&boot, "fragile_waves"), "{}", boot.stderr);
    // The failing part kept every one of its events before #1500, and no other.
    let seen = assert_part_kept_only_before(&c, "fragile_waves", 1500).await;
    assert!(seen > 0);
    // Every applied event counted exactly once, whichever part applied it.
    let wrong = count(
        &c,
        "SELECT count(*) FROM ( \
           (SELECT e.aggregate_id, count(*) FROM stream_seen s JOIN events e USING (id) GROUP BY 1 \
            EXCEPT ALL SELECT stream, n FROM stream_count) \
           UNION ALL (SELECT stream, n FROM stream_count EXCEPT ALL \
            SELECT e.aggregate_id, count(*) FROM stream_seen s JOIN events e USING (id) GROUP BY 1)) d",
    )
    .await;
    assert_eq!(
        wrong, 0,
        "a stream's counter differs from the events it saw"
    );

    // Fixed, the next boot resumes each part where it stopped.
    db.write_manifest(
        &std::fs::read_to_string(db.manifest_path())
            .unwrap()
            .replace(" + 0 * (1 / (:position - 1500))", ""),
    );
    db.run(&["boot"]).expect(0);
    assert_parts_at_head(&c, "fragile_waves", 2, h).await;
    assert_every_event_counted_once(&c).await;
}

#[tokio::test]
async fn a_statement_timeout_in_a_set_wise_batch_names_the_slow_event_and_bounds_the_batch() {
    let db = TestDb::new().await;
    // Event #1500 sleeps 3 s; the sessions' statement timeout is 1 s. Set-wise,
    // its wave times out; the batch must not then run on with the timeout
    // spent (it would sleep and succeed), but time out event by event at #1500.
    let slow = counter_projector("slow_waves", 2).replace(
        "VALUES (:position)",
        "VALUES (:position + coalesce(length(CASE WHEN :position = 1500 THEN pg_sleep(3)::text END), 0))",
    );
    let c = thing_store(&db, true, COUNTER_TABLES, &slow).await;
    add_stream_things(&c, 3_000, 300).await;
    let boot = db.run_with_server_option(&["boot", "-v"], "statement_timeout%3D1000");
    boot.expect(1);
    assert!(
        boot.stderr
            .contains("ran out of its statement timeout set-wise; it runs again event by event"),
        "{}",
        boot.stderr
    );
    assert!(
        boot.stderr
            .contains("projector `slow_waves` broke at event #1500 (Thing"),
        "{}",
        boot.stderr
    );
    assert!(boot.stderr.contains("statement timeout"), "{}", boot.stderr);
    assert_part_kept_only_before(&c, "slow_waves", 1500).await;
}

#[tokio::test]
async fn handlers_sharing_a_row_across_streams_run_event_by_event_and_count_exactly() {
    let db = TestDb::new().await;
    // Against the partitioning rule (state shared by every stream), yet
    // exact: two events of a wave meeting on one row make the set-wise
    // statement fail (a MERGE or an upsert may not touch a row twice), and
    // the batch runs event by event.
    let projector = "[projectors.totals]\npartitions = 2\ntables = [\"totals\", \"stream_seen\"]\n\
        on.Thing = [\"UPDATE totals SET n = n + 1 WHERE k = 'updates'\", \
        \"INSERT INTO totals VALUES ('upserts', 1) ON CONFLICT (k) DO UPDATE SET n = totals.n + 1\", \
        \"INSERT INTO stream_seen (id) VALUES (:position)\"]\n";
    let c = thing_store(
        &db,
        true,
        "CREATE TABLE totals (k text PRIMARY KEY, n bigint NOT NULL); \
         INSERT INTO totals VALUES ('updates', 0); \
         CREATE TABLE stream_seen (id bigint PRIMARY KEY)",
        projector,
    )
    .await;
    let h = add_stream_things(&c, 3_000, 300).await;
    // The `updates` row is there before the first event: adopted.
    let boot = db.run(&["boot", "-v", "--adopt", "totals"]);
    boot.expect(0);
    assert!(!applied_set_wise(&boot, "totals"), "{}", boot.stderr);
    assert_parts_at_head(&c, "totals", 2, h).await;
    for k in ["updates", "upserts"] {
        assert_eq!(
            count(&c, &format!("SELECT n FROM totals WHERE k = '{k}'")).await,
            3_000,
            "{k}"
        );
    }
    assert_eq!(count(&c, "SELECT count(*) FROM stream_seen").await, 3_000);
}

#[tokio::test]
async fn statements_that_cannot_run_set_wise_keep_their_projector_event_by_event() {
    let db = TestDb::new().await;
    // An event's value in ON CONFLICT DO UPDATE is refused by PostgreSQL once
    // set-wise (only the row and EXCLUDED are there); a SELECT runs for its
    // side effect, once per event.
    let by_conflict = counter_projector("by_conflict", 2)
        .replace("stream_count.n + 1", "stream_count.n + 1 + 0 * :position");
    let by_select = counter_projector("by_select", 2)
        .replace("stream_count", "select_count")
        .replace("stream_seen", "select_seen")
        .replace(
            "on.Thing = [",
            "on.Thing = [\"SELECT pg_notify('things', :stream)\", ",
        );
    let c = thing_store(
        &db,
        true,
        &format!(
            "{COUNTER_TABLES}; {}",
            COUNTER_TABLES
                .replace("stream_count", "select_count")
                .replace("stream_seen", "select_seen")
        ),
        &format!("{by_conflict}\n{by_select}"),
    )
    .await;
    let h = add_stream_things(&c, 3_000, 300).await;
    let boot = db.run(&["boot", "-v"]);
    boot.expect(0);
    for (name, why) in [
        ("by_conflict", "a set-wise statement does not plan"),
        ("by_select", "it is not an INSERT, UPDATE or DELETE"),
    ] {
        assert!(!applied_set_wise(&boot, name), "{}", boot.stderr);
        assert!(
            boot.stderr.lines().any(|l| l
                .contains(&format!("projector `{name}` runs event by event"))
                && l.contains(why)),
            "{name}: {}",
            boot.stderr
        );
        assert_parts_at_head(&c, name, 2, h).await;
    }
    assert_every_event_counted_once(&c).await;
    assert_eq!(
        count(&c, "SELECT coalesce(sum(n), 0)::bigint FROM select_count").await,
        3_000
    );
}
