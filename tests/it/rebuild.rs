//! Rebuilds without downtime, through the real binary against a real
//! PostgreSQL: a version bump (or `reset`) builds the new version beside the
//! live tables, in the build schema, while the live version keeps serving and
//! `play` keeps it up to date; then one short transaction swaps it in
//! (projectors linked by `after` together), keeping the old version in the
//! previous-versions schema for `rollback` until `prune`.
//!
//! What each test holds projectionist to:
//! - readers never see a rebuild: a reader polling in REPEATABLE READ sees
//!   the live counts all along, and never a mix of versions across linked
//!   projectors; the swap locks the live tables for well under a second;
//! - the tables equal the set-based projection afterwards, the ledger says
//!   the new version is live, the old one is kept (`name__v1`);
//! - `play` of the old version keeps the live version up to date during the
//!   build and leaves the projector alone after the swap;
//! - `rollback` swaps a kept version back in and catches it up; `prune`
//!   writes the migration that drops kept versions;
//! - views, grants, comments and sequences survive a swap;
//! - what cannot be swapped (foreign keys pointing at an owned table,
//!   materialized views, RLS policies, handlers writing tables they do not
//!   own or naming theirs with a schema) is refused with exit 2, naming it,
//!   and nothing changes; `rebuild = "in_place"` and `reset --in-place`
//!   rebuild where the tables are (readers see that);
//! - SIGKILL at any point of a build or a swap loses nothing: the live
//!   version stays complete until the swap commits, the next boot resumes the
//!   build, and every event lands exactly once; a build that breaks leaves
//!   the live version live.
//!
//! Each test makes its own database; builds are slowed down with
//! `--batch-size` (one transaction per batch) rather than with big stores.
//! Tests that found a bug in projectionist assert the correct behaviour and
//! are ignored with the bug's one-line description.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::{Client, IsolationLevel};

use crate::harness::*;

// ---------------------------------------------------------------------------
// Helpers

/// Sets `version = V` of `[projectors.NAME]` in the manifest, with `extra`
/// lines (a `prepare`, a `rebuild`) right after it.
fn bump(db: &TestDb, name: &str, version: i32, extra: &str) {
    let text = std::fs::read_to_string(db.manifest_path()).unwrap();
    let header = format!("[projectors.{name}]\n");
    let start = text
        .find(&header)
        .unwrap_or_else(|| panic!("no {header} in the manifest"))
        + header.len();
    let section_end = text[start..]
        .find("\n[")
        .map(|i| start + i + 1)
        .unwrap_or(text.len());
    let section = &text[start..section_end];
    let mut lines: Vec<String> = section
        .lines()
        .filter(|l| !l.starts_with("version = "))
        .map(str::to_string)
        .collect();
    let mut new = vec![format!("version = {version}")];
    new.extend(extra.lines().filter(|l| !l.is_empty()).map(str::to_string));
    lines.splice(0..0, new);
    let mut section = lines.join("\n");
    section.push('\n');
    db.write_manifest(&format!(
        "{}{section}{}",
        &text[..start],
        &text[section_end..]
    ));
}

/// A `prepare` adding marker column `v` (default `version`) to `tables`:
/// rows written by that version say so.
fn marker(version: i32, tables: &[&str]) -> String {
    let sql: Vec<String> = tables
        .iter()
        .map(|t| {
            format!(
                "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS v int; ALTER TABLE {t} ALTER COLUMN v SET DEFAULT {version}"
            )
        })
        .collect();
    format!("prepare = \"{}\"", sql.join("; "))
}

/// The version the marker of a table's first row says (1 without a marker
/// column, -1 when the table is empty), as an SQL expression.
fn marker_of(table: &str) -> String {
    format!(
        "coalesce((SELECT coalesce((to_jsonb(t) ->> 'v')::int, 1) FROM {table} t LIMIT 1), -1)::bigint"
    )
}

/// A projectionist process, its output in files of the test's directory.
struct Spawned {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Spawned {
    fn start(db: &TestDb, label: &str, args: &[&str]) -> Spawned {
        let out = db.dir.path().join(format!("{label}.stdout"));
        let err = db.dir.path().join(format!("{label}.stderr"));
        let child = db
            .command(args)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Spawned { child, out, err }
    }

    fn run(&self) -> Run {
        Run {
            code: -1,
            stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err).unwrap_or_default(),
        }
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
        self.child.wait().unwrap();
    }

    /// Waits for the exit (without blocking the runtime), up to `limit`.
    async fn finish(mut self, limit: Duration) -> Run {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut run = self.run();
                run.code = status.code().unwrap_or(-1);
                return run;
            }
            if started.elapsed() > limit {
                self.sigkill();
                let run = self.run();
                panic!(
                    "still running after {limit:?}\n--- stdout\n{}\n--- stderr\n{}",
                    run.stdout, run.stderr
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `projectionist ARGS` to the end without blocking the runtime (a reader
/// task polls meanwhile).
async fn run_async(db: &TestDb, label: &str, args: &[&str]) -> Run {
    Spawned::start(db, label, args)
        .finish(Duration::from_secs(120))
        .await
}

/// One poll of a [`Reader`]: the bigint columns of its query, or the error.
#[derive(Debug, Clone)]
struct Poll {
    values: Result<Vec<i64>, String>,
    took: Duration,
}

/// A reader polling `sql` (one row of bigint columns) every 20 ms, each poll
/// in a REPEATABLE READ transaction of its own, until stopped.
struct Reader {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Poll>>,
}

impl Reader {
    async fn start(db: &TestDb, sql: String) -> Reader {
        Reader::start_every(db, sql, Duration::from_millis(20)).await
    }

    /// Starts polling; returns once the first poll is done.
    async fn start_every(db: &TestDb, sql: String, every: Duration) -> Reader {
        let mut client = db.client().await;
        let stop = Arc::new(AtomicBool::new(false));
        let polled = Arc::new(AtomicBool::new(false));
        let (stopped, first) = (stop.clone(), polled.clone());
        let task = tokio::spawn(async move {
            let mut polls = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                let started = Instant::now();
                let values = poll_once(&mut client, &sql).await;
                polls.push(Poll {
                    values,
                    took: started.elapsed(),
                });
                first.store(true, Ordering::SeqCst);
                tokio::time::sleep(every).await;
            }
            polls
        });
        while !polled.load(Ordering::SeqCst) && !task.is_finished() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Reader { stop, task }
    }

    /// Polls a little longer, then stops; returns every poll.
    async fn stop(self) -> Vec<Poll> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

async fn poll_once(client: &mut Client, sql: &str) -> Result<Vec<i64>, String> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|e| e.to_string())?;
    let row = tx.query_one(sql, &[]).await.map_err(|e| format!("{e:?}"))?;
    let values = (0..row.len()).map(|i| row.get::<_, i64>(i)).collect();
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(values)
}

/// (version, state, position) of a projector's live ledger row.
async fn live(c: &Client, name: &str) -> (i32, String, i64) {
    let r = c
        .query_one(
            "SELECT version, state, position FROM projectionist.projectors WHERE name = $1",
            &[&name],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// (id, version, state, position) of a projector's build, if one is under way.
async fn build_row(c: &Client, name: &str) -> Option<(i64, i32, String, i64)> {
    c.query_opt(
        "SELECT id, version, state, position FROM projectionist.versions WHERE projector = $1 AND kind = 'build'",
        &[&name],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
}

/// The kept previous versions of a projector, by the ledger.
async fn kept(c: &Client, name: &str) -> Vec<i32> {
    c.query(
        "SELECT version FROM projectionist.versions WHERE projector = $1 AND kind = 'previous' ORDER BY version",
        &[&name],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn exists(c: &Client, relation: &str) -> bool {
    c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&relation])
        .await
        .unwrap()
        .get(0)
}

/// `status --json`'s entry for `name`.
fn status_of(db: &TestDb, name: &str) -> Value {
    let run = db.run(&["status", "--json"]);
    let json: Value =
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("status --json: {e}\n{run:?}"));
    json["projectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in status --json: {json}"))
        .clone()
}

fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n--- stdout\n{}\n--- stderr\n{}",
            run.stdout, run.stderr
        )
    })
}

/// Asserts public.`table` equals the set-based projection's (schema
/// `expected`, filled by [`TestDb::expected_projection`]).
async fn assert_table_matches(c: &Client, table: &str) {
    let diff = count(
        c,
        &format!(
            "SELECT (SELECT count(*) FROM (TABLE public.{table} EXCEPT TABLE expected.{table}) a) \
                  + (SELECT count(*) FROM (TABLE expected.{table} EXCEPT TABLE public.{table}) b)"
        ),
    )
    .await;
    assert_eq!(
        diff, 0,
        "table {table} differs from the set-based projection"
    );
}

/// A migrations directory `migrate` accepts on a test database: the
/// repository's migrations (applied to the template) copied in.
fn migrations_dir(db: &TestDb) -> PathBuf {
    let dir = db.dir.path().join("deploy/migrations");
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(root().join("migrations")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `play` until every one of `names` is at the head (boot leaves live
/// projectors to play), then stops it.
async fn play_to_head(db: &TestDb, names: &[&str]) {
    let c = db.client().await;
    let h = head(&c).await;
    let mut play = Player::start(db, "catch-up", &[]);
    wait_for(
        "play to bring them to the head",
        PATIENCE,
        &[&play],
        async || {
            let mut all = true;
            for name in names {
                all &= position(&c, name).await == h;
            }
            all
        },
    )
    .await;
    play.stop();
}

/// A small pseudo-random number below `n` (no rand crate in the suite).
fn random_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() % n
}

// ---------------------------------------------------------------------------
// 1. Readers never see a rebuild.

/// What a reader of the example polls: the counts of band and of the six
/// userpreferences tables, and the version markers of band, origin and
/// ignored_band (v2 of each adds a column `v`), in one statement.
fn example_poll() -> String {
    format!(
        "SELECT (SELECT count(*) FROM band), (SELECT count(*) FROM origin), (SELECT count(*) FROM ignored_band), \
                (SELECT count(*) FROM ignored_dance_hall), (SELECT count(*) FROM ignored_city), \
                (SELECT count(*) FROM ignored_municipality), (SELECT count(*) FROM ignored_state), \
                {}, {}, {}",
        marker_of("band"),
        marker_of("origin"),
        marker_of("ignored_band")
    )
}

/// Every poll of the example's reader saw the counts of `before` and one
/// version of band and userpreferences together; polls saw each version and
/// none waited long.
fn assert_polls_saw_one_whole_version_at_a_time(polls: &[Poll], before: &[i64]) {
    let mut saw = [0usize; 3];
    for (i, p) in polls.iter().enumerate() {
        let v = p
            .values
            .as_ref()
            .unwrap_or_else(|e| panic!("poll {i} of {} failed: {e}", polls.len()));
        // No event arrives meanwhile: every complete version has the same counts.
        assert_eq!(
            &v[..7],
            &before[..7],
            "poll {i}: the counts moved during the rebuild (v1 {before:?}, then {v:?})"
        );
        assert!(
            v[7] == v[8] && v[8] == v[9],
            "poll {i}: band and userpreferences at different versions in one snapshot: {v:?}"
        );
        saw[v[7] as usize] += 1;
    }
    let slowest = polls.iter().map(|p| p.took).max().unwrap();
    println!(
        "{} polls: {} saw v1, {} saw v2; the slowest took {slowest:?}",
        polls.len(),
        saw[1],
        saw[2]
    );
    assert!(
        saw[1] > 0 && saw[2] > 0,
        "the reader saw both versions (it polled through the swap): {saw:?}"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a poll waited {slowest:?}"
    );
}

/// The boot's report: band and userpreferences swapped together, in one
/// short transaction, and every projector rebuilt and live.
fn assert_one_short_swap_of_the_linked_pair(run: &Run) {
    let report = json(run);
    let swaps = report["swaps"].as_array().unwrap();
    assert_eq!(swaps.len(), 1, "one swap for the linked pair: {report}");
    let mut swapped: Vec<&str> = swaps[0]["projectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    swapped.sort();
    assert_eq!(swapped, ["band", "userpreferences"], "{report}");
    let lock_ms = swaps[0]["lock_ms"].as_f64().unwrap();
    println!("the swap locked the live tables for {lock_ms:.1} ms");
    assert!(
        lock_ms > 0.0 && lock_ms < 1000.0,
        "lock_ms {lock_ms}: {report}"
    );
    for p in report["projectors"].as_array().unwrap() {
        assert_eq!(p["action"], "rebuild", "{report}");
        assert_eq!(p["state"], "live", "{report}");
    }
}

/// After the swap: v2 of band and userpreferences live at the head, their
/// v1 tables kept (band's complete, with `v1_bands` rows), the others
/// untouched, and nothing left in the build schema.
async fn assert_v2_live_and_v1_kept(db: &TestDb, c: &Client, v1_bands: i64) {
    let head = head(c).await;
    for name in ["band", "userpreferences"] {
        assert_eq!(live(c, name).await, (2, "live".into(), head), "{name}");
        assert_eq!(kept(c, name).await, [1], "{name}");
        assert_eq!(build_row(c, name).await, None, "{name}");
    }
    for name in ["dancehall", "event"] {
        assert_eq!(live(c, name).await, (1, "live".into(), head), "{name}");
    }
    for t in [
        "band",
        "origin",
        "ignored_band",
        "ignored_dance_hall",
        "ignored_city",
        "ignored_municipality",
        "ignored_state",
    ] {
        assert!(
            exists(c, &format!("projectionist_previous.{t}__v1")).await,
            "{t}__v1 is kept"
        );
    }
    assert_eq!(
        count(c, "SELECT count(*) FROM projectionist_previous.band__v1").await,
        v1_bands,
        "the kept v1 is complete"
    );
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'projectionist_build'"
        )
        .await,
        0,
        "nothing left in the build schema"
    );
    let status = status_of(db, "band");
    assert_eq!(status["kept_versions"], serde_json::json!([1]), "{status}");
    assert!(status["build"].is_null(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_sees_the_rebuild_of_linked_projectors() {
    let db = TestDb::new().await;
    example(&db);
    db.gen_events(100_000);
    db.run(&["boot"]).expect(0);
    let c = db.client().await;
    let mut c2 = db.client().await;
    let before = poll_once(&mut c2, &example_poll()).await.unwrap();
    assert_eq!(&before[7..], &[1, 1, 1], "v1 everywhere before: {before:?}");
    assert!(before[..7].iter().all(|n| *n > 0), "{before:?}");

    bump(&db, "band", 2, &marker(2, &["band"]));
    bump(
        &db,
        "userpreferences",
        2,
        &marker(2, &["origin", "ignored_band"]),
    );
    let reader = Reader::start(&db, example_poll()).await;
    let run = run_async(&db, "boot-v2", &["boot", "--json", "--batch-size", "100"]).await;
    let polls = reader.stop().await;
    run.expect(0);
    assert_polls_saw_one_whole_version_at_a_time(&polls, &before);

    // The swap: both together, in one short transaction.
    assert_one_short_swap_of_the_linked_pair(&run);

    // The tables: the set-based projection (the markers' defaults are in the
    // expected tables too: they are made LIKE the live ones).
    db.assert_tables_match_expected().await;
    assert_v2_live_and_v1_kept(&db, &c, before[0]).await;
}

/// The other bug the test above ran into, made deterministic: a reader in a
/// transaction has read `pair_b` and then reads `pair_a`, while the swap
/// holds `pair_a` (moved out) and waits for `pair_b`. The swap must give way
/// (try again after the reader), never deadlock: the reader gets its rows
/// and the boot swaps in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_of_two_tables_never_deadlocks_with_the_swap() {
    let pair = |version: i32| {
        format!(
            "[projectors.pair]\ntables = [\"pair_a\", \"pair_b\"]\nversion = {version}\n\
             on.Thing = [\"INSERT INTO pair_a (id) VALUES (:position)\", \"INSERT INTO pair_b (id) VALUES (:position)\"]\n"
        )
    };
    let db = TestDb::new().await;
    let c = thing_store(
        &db,
        false,
        "CREATE TABLE pair_a (id bigint PRIMARY KEY); CREATE TABLE pair_b (id bigint PRIMARY KEY);",
        &pair(1),
    )
    .await;
    add_things(&c, 1_000).await;
    db.run(&["boot"]).expect(0);

    let reader = db.client().await;
    reader
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    assert_eq!(count(&reader, "SELECT count(*) FROM pair_b").await, 1_000);
    things_manifest(&db, &pair(2));
    let boot = Spawned::start(&db, "boot", &["boot"]);
    wait_for("the swap to wait for pair_b", PATIENCE, &[], async || {
        count(
            &c,
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'public.pair_b'::regclass",
        )
        .await
            > 0
    })
    .await;
    // The reader goes on (within the server's deadlock_timeout of the swap's wait).
    let second = reader.query_one("SELECT count(*) FROM pair_a", &[]).await;
    reader.batch_execute("COMMIT").await.ok();
    let run = boot.finish(Duration::from_secs(60)).await;
    assert_eq!(
        second
            .map(|r| r.get::<_, i64>(0))
            .map_err(|e| format!("{e:?}")),
        Ok(1_000),
        "the reader's second query\n{run:?}"
    );
    run.expect(0);
    assert_eq!(live(&c, "pair").await, (2, "live".into(), 1_000));
}

/// The bug the test above ran into, on its own: two builds in one boot.
#[tokio::test]
async fn two_builds_in_one_boot_share_the_build_schema() {
    let db = TestDb::new().await;
    example(&db);
    db.gen_events(2_000);
    db.run(&["boot"]).expect(0);
    bump(&db, "band", 2, "");
    bump(&db, "dancehall", 2, "");
    let run = db.run(&["boot", "--json"]);
    run.expect(0);
    assert_eq!(
        json(&run)["swaps"].as_array().unwrap().len(),
        2,
        "{}",
        run.stdout
    );
    let c = db.client().await;
    for name in ["band", "dancehall"] {
        assert_eq!(live(&c, name).await.0, 2, "{name}");
    }
    db.assert_tables_match_expected().await;
}

// ---------------------------------------------------------------------------
// 2. Play keeps the live version up to date during the build.

/// Events appended while band v2 builds: `v1_play` gives them to the live
/// band (still version 1) while the build is still under way. Returns the
/// head the live band reached.
async fn assert_play_keeps_the_live_band_up_to_date_during_the_build(
    db: &TestDb,
    c: &Client,
    v1_play: &Player,
) -> i64 {
    // Events appended during the build: play v1 gives them to the live band.
    let build_start = head(c).await;
    db.gen_events(2_000);
    let h1 = head(c).await;
    let new_bands = count(
        c,
        &format!("SELECT count(DISTINCT data->>'name') FROM events WHERE id > {build_start} AND name = 'BandCreated'"),
    )
    .await;
    assert!(new_bands > 0, "the appended events create bands");
    wait_for(
        "the live band to reach the new head",
        PATIENCE,
        &[v1_play],
        async || live(c, "band").await.2 == h1,
    )
    .await;
    let (id, version, state, position) = build_row(c, "band")
        .await
        .expect("the build is still under way when the live band has the new events");
    println!("live band at {h1} while the build (id {id}) is {state} at {position}");
    assert_eq!((version, state.as_str()), (2, "booting"));
    assert_eq!(live(c, "band").await, (1, "live".into(), h1));
    assert_eq!(
        count(
            c,
            &format!(
                "SELECT count(*) FROM events e WHERE e.id > {build_start} AND e.name = 'BandCreated' \
                 AND NOT EXISTS (SELECT 1 FROM public.band b WHERE b.name = e.data->>'name')"
            )
        )
        .await,
        0,
        "the live band has the bands created during the build"
    );
    assert_eq!(
        count(c, "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'band' AND column_name = 'v'").await,
        0,
        "the live band is still version 1"
    );
    h1
}

/// After the swap, `v1_play` leaves band (at `swapped_at`) alone and plays
/// the others. Returns the head it brought dancehall to.
async fn assert_play_v1_leaves_band_v2_alone(
    db: &TestDb,
    c: &Client,
    v1_play: &Player,
    swapped_at: &(i32, String, i64),
) -> i64 {
    db.gen_events(2_000);
    let h2 = head(c).await;
    wait_for(
        "play v1 to bring dancehall to the head",
        PATIENCE,
        &[v1_play],
        async || live(c, "dancehall").await.2 == h2,
    )
    .await;
    wait_for(
        "play v1 to say it leaves band alone",
        PATIENCE,
        &[v1_play],
        async || {
            let log = v1_play.log();
            log.lines()
                .any(|l| l.contains("`band`") && l.contains("alone"))
        },
    )
    .await;
    assert_eq!(
        &live(c, "band").await,
        swapped_at,
        "play v1 wrote nothing into band v2\n{}",
        v1_play.log()
    );
    h2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn play_keeps_the_live_version_up_to_date_during_the_build_and_leaves_it_after_the_swap() {
    let db = TestDb::new().await;
    example(&db);
    db.gen_events(50_000);
    db.run(&["boot"]).expect(0);
    let c = db.client().await;
    let mut v1_play = Player::start(&db, "v1", &[]);
    wait_for(
        "play v1 to own the four projectors",
        PATIENCE,
        &[&v1_play],
        async || owned_by(&c, &v1_play).await.len() == 4,
    )
    .await;

    // Version 2 of band, built slowly (one transaction per 50 positions).
    bump(&db, "band", 2, &marker(2, &["band"]));
    let boot = Spawned::start(&db, "boot-v2", &["boot", "--json", "--batch-size", "50"]);
    wait_for("the build of band v2", PATIENCE, &[&v1_play], async || {
        build_row(&c, "band").await.is_some()
    })
    .await;
    let h1 = assert_play_keeps_the_live_band_up_to_date_during_the_build(&db, &c, &v1_play).await;

    let run = boot.finish(Duration::from_secs(120)).await;
    run.expect(0);
    assert_eq!(
        json(&run)["swaps"].as_array().unwrap().len(),
        1,
        "{}",
        run.stdout
    );
    let swapped_at = live(&c, "band").await;
    assert_eq!(swapped_at.0, 2, "band v2 is live");
    assert!(
        swapped_at.2 >= h1,
        "the build played the events appended meanwhile"
    );

    // After the swap, play v1 leaves band alone (and plays the others).
    let h2 = assert_play_v1_leaves_band_v2_alone(&db, &c, &v1_play, &swapped_at).await;
    v1_play.stop();

    // Play v2 catches band (and userpreferences, after it) up.
    let v2_play = Player::start(&db, "v2", &[]);
    wait_for(
        "play v2 to bring every projector to the head",
        PATIENCE,
        &[&v2_play],
        async || {
            let mut all = true;
            for p in SQL_PROJECTORS {
                all &= live(&c, p).await.2 == h2;
            }
            all
        },
    )
    .await;
    drop(v2_play);
    assert_eq!(live(&c, "band").await, (2, "live".into(), h2));
    db.assert_tables_match_expected().await;
}

// ---------------------------------------------------------------------------
// 3. Rollback.

/// `rollback band --json`'s report: band rolled back from v2 to v1 (kept at
/// the swap's head), in a short swap, and caught up to `h`.
fn assert_rollback_report(run: &Run, h: i64) {
    let report = json(run);
    let rolled = &report["rolled_back"];
    assert_eq!(
        (
            &rolled["projector"],
            &rolled["from_version"],
            &rolled["to_version"]
        ),
        (&Value::from("band"), &Value::from(2), &Value::from(1)),
        "{report}"
    );
    assert_eq!(
        rolled["kept_position"], 20_000,
        "v1 stood at the swap's head: {report}"
    );
    assert!(
        rolled["swap"]["lock_ms"].as_f64().unwrap() < 1000.0,
        "{report}"
    );
    let caught_up = &report["catch_up"]["projectors"][0];
    assert_eq!(caught_up["name"], "band", "{report}");
    assert_eq!(caught_up["position"], h, "{report}");
}

/// After the rollback: the v1 table of band is live again, caught up to `h`
/// and equal to the set-based projection; the v2 table (`v1_bands` rows
/// marked v2) is the one kept, and status says so.
async fn assert_v1_live_again_and_v2_kept(
    db: &TestDb,
    c: &Client,
    run: &Run,
    h: i64,
    v1_bands: i64,
) {
    assert_eq!(
        live(c, "band").await,
        (1, "live".into(), h),
        "band v1 is live again and caught up\n{run:?}"
    );
    assert_eq!(
        count(c, "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'band' AND column_name = 'v'").await,
        0,
        "the live band is the v1 table (no marker column)"
    );
    assert!(
        count(c, "SELECT count(*) FROM band").await > v1_bands,
        "the v1 table got the bands created since"
    );
    db.expected_projection();
    assert_table_matches(c, "band").await;
    assert!(
        exists(c, "projectionist_previous.band__v2").await,
        "v2 is kept"
    );
    assert!(
        !exists(c, "projectionist_previous.band__v1").await,
        "v1 left the previous schema"
    );
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM projectionist_previous.band__v2 WHERE v = 2"
        )
        .await,
        v1_bands,
        "the kept v2 is the table that was live"
    );
    let status = status_of(db, "band");
    assert_eq!(status["kept_versions"], serde_json::json!([2]), "{status}");
    assert_eq!(status["version"], 1, "{status}");
    let detail = db.run(&["status", "band"]);
    assert!(
        detail
            .stdout
            .lines()
            .any(|l| l.starts_with("kept versions") && l.ends_with(" 2")),
        "{}",
        detail.stdout
    );
}

/// A second rollback, and one to a version never kept, are refused (exit 2,
/// saying why) and change nothing.
async fn assert_no_second_rollback(db: &TestDb, c: &Client) {
    // Again: nothing to roll back.
    let run = db.run(&["rollback", "band"]);
    run.expect(2);
    assert!(
        run.stderr.contains("nothing to roll back"),
        "{}",
        run.stderr
    );
    // To a version never kept: named.
    bump(db, "band", 3, "");
    let run = db.run(&["rollback", "band"]);
    run.expect(2);
    assert!(
        run.stderr.contains("no previous version 3"),
        "{}",
        run.stderr
    );
    assert_eq!(live(c, "band").await.0, 1, "nothing changed");
    assert_eq!(kept(c, "band").await, [2]);
}

#[tokio::test]
async fn rollback_swaps_the_kept_version_back_in_and_catches_it_up() {
    let db = TestDb::new().await;
    example(&db);
    db.gen_events(20_000);
    db.run(&["boot"]).expect(0);
    let c = db.client().await;
    let v1_bands = count(&c, "SELECT count(*) FROM band").await;
    bump(&db, "band", 2, &marker(2, &["band"]));
    db.run(&["boot"]).expect(0);
    assert_eq!(live(&c, "band").await.0, 2);
    assert!(exists(&c, "projectionist_previous.band__v1").await);

    // The deploy is rolled back: the manifest says version 1 again.
    example(&db);
    db.gen_events(3_000);
    let h = head(&c).await;
    let run = db.run(&["rollback", "band", "--json"]);
    run.expect(0);
    assert_rollback_report(&run, h);
    assert_v1_live_again_and_v2_kept(&db, &c, &run, h, v1_bands).await;
    // The others were not part of it: play (v1) catches them up, and plays
    // the rolled-back band on; all nine match.
    db.gen_events(500);
    play_to_head(&db, &SQL_PROJECTORS).await;
    assert_eq!(live(&c, "band").await, (1, "live".into(), head(&c).await));
    db.assert_tables_match_expected().await;

    assert_no_second_rollback(&db, &c).await;
}

// ---------------------------------------------------------------------------
// 4. Views, grants, comments and sequences survive a swap.

/// A role of the test's own (roles are server-wide), dropped at the end.
struct Role {
    name: String,
    url: String,
}

impl Role {
    async fn create(db: &TestDb) -> Role {
        let name = format!("{}_reader", db.name);
        db.client()
            .await
            .batch_execute(&format!("CREATE ROLE {name}"))
            .await
            .unwrap();
        Role {
            name,
            url: db.url.clone(),
        }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let (name, url) = (self.name.clone(), self.url.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP OWNED BY {name}; DROP ROLE {name}"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A projector of the Thing store writing `pos` and `tag` = 'v{version}'
/// into `table`.
fn tagger(table: &str, version: i32) -> String {
    format!(
        "[projectors.{table}]\ntables = [\"{table}\"]\nversion = {version}\n\
         on.Thing = \"INSERT INTO {table} (pos, tag) VALUES (:position, 'v{version}')\"\n"
    )
}

/// How many relations of the previous-versions schema the rules of view
/// `view` read (a view still reading a swapped-out table).
async fn view_reads_previous(c: &Client, view: &str) -> i64 {
    count(
        c,
        &format!(
            "SELECT count(*) FROM pg_depend d JOIN pg_rewrite w ON w.oid = d.objid \
             JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace n ON n.oid = t.relnamespace \
             WHERE d.classid = 'pg_rewrite'::regclass AND w.ev_class = '{view}'::regclass \
               AND n.nspname = 'projectionist_previous'"
        ),
    )
    .await
}

#[tokio::test]
async fn views_grants_and_an_identity_column_survive_the_swap_and_the_prune() {
    let db = TestDb::new().await;
    let role = Role::create(&db).await;
    let r = &role.name;
    let c = thing_store(
        &db,
        false,
        &format!(
            "CREATE TABLE item (k bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, pos bigint NOT NULL UNIQUE, tag text NOT NULL); \
             COMMENT ON COLUMN item.tag IS 'the version that wrote it'; \
             CREATE VIEW item_tags AS SELECT k, pos, tag FROM item; \
             CREATE VIEW item_v2 AS SELECT pos FROM item_tags WHERE tag = 'v2'; \
             GRANT SELECT ON item TO {r}; GRANT SELECT ON item_tags TO {r}; GRANT SELECT ON item_v2 TO {r};"
        ),
        &tagger("item", 1),
    )
    .await;
    add_things(&c, 1_000).await;
    db.run(&["boot"]).expect(0);
    assert_eq!(
        count(&c, "SELECT count(*) FROM item_tags WHERE tag = 'v1'").await,
        1_000
    );

    things_manifest(&db, &tagger("item", 2));
    db.run(&["boot"]).expect(0);
    assert!(exists(&c, "projectionist_previous.item__v1").await);
    // The views read the new table: through them, the v2 rows.
    assert_eq!(
        count(&c, "SELECT count(*) FROM item_tags WHERE tag = 'v2'").await,
        1_000
    );
    assert_eq!(count(&c, "SELECT count(*) FROM item_tags").await, 1_000);
    assert_eq!(
        count(&c, "SELECT count(*) FROM item_v2").await,
        1_000,
        "the view over the view"
    );
    assert_eq!(view_reads_previous(&c, "item_tags").await, 0);
    assert!(
        count(
            &c,
            "SELECT count(*) FROM pg_depend d JOIN pg_rewrite w ON w.oid = d.objid \
             WHERE w.ev_class = 'item_tags'::regclass AND d.refobjid = 'public.item'::regclass"
        )
        .await
            > 0,
        "pg_depend: item_tags reads public.item"
    );
    // Grants, on the table and on the recreated view; nothing more.
    let row = c
        .query_one(
            &format!(
                "SELECT has_table_privilege('{r}', 'public.item', 'SELECT'), \
                        has_table_privilege('{r}', 'public.item_tags', 'SELECT'), \
                        has_table_privilege('{r}', 'public.item_v2', 'SELECT'), \
                        has_table_privilege('{r}', 'public.item', 'INSERT'), \
                        col_description('public.item'::regclass, 3)"
            ),
            &[],
        )
        .await
        .unwrap();
    let privileges: (bool, bool, bool, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        privileges,
        (true, true, true, false),
        "SELECT kept on the table and both views"
    );
    assert_eq!(
        row.get::<_, Option<String>>(4).as_deref(),
        Some("the version that wrote it"),
        "the column comment"
    );

    // The identity column goes on after the swap, and after the prune.
    add_things(&c, 10).await;
    play_to_head(&db, &["item"]).await;
    let k: i64 = c
        .query_one(
            "INSERT INTO item (pos, tag) VALUES (-1, 'by hand') RETURNING k",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        k > 1_010,
        "the identity goes on past the replayed rows: {k}"
    );
    let dir = migrations_dir(&db);
    db.run(&["prune", "--min-age", "0s", "--dir", s(&dir)])
        .expect(0);
    db.run(&["migrate", "--dir", s(&dir)]).expect(0);
    assert!(!exists(&c, "projectionist_previous.item__v1").await);
    let h = add_things(&c, 10).await;
    play_to_head(&db, &["item"]).await;
    assert_eq!(live(&c, "item").await, (2, "live".into(), h));
    assert_eq!(count(&c, "SELECT count(DISTINCT k) FROM item").await, 1_021);
    assert_eq!(count(&c, "SELECT count(*) FROM item_v2").await, 1_020);
}

/// A tagger of `table` (made by `ddl`) booted at version 1 over `things`
/// events, then at version 2 (rebuilt beside and swapped in).
async fn booted_then_bumped(db: &TestDb, ddl: &str, table: &str, things: i64) -> Client {
    let c = thing_store(db, false, ddl, &tagger(table, 1)).await;
    add_things(&c, things).await;
    db.run(&["boot"]).expect(0);
    things_manifest(db, &tagger(table, 2));
    db.run(&["boot"]).expect(0);
    c
}

#[tokio::test]
async fn the_table_comment_survives_the_swap() {
    let db = TestDb::new().await;
    let c = booted_then_bumped(
        &db,
        "CREATE TABLE item (pos bigint PRIMARY KEY, tag text NOT NULL); COMMENT ON TABLE item IS 'items by position';",
        "item",
        100,
    )
    .await;
    assert_eq!(live(&c, "item").await.0, 2);
    let comment: Option<String> = c
        .query_one(
            "SELECT obj_description('public.item'::regclass, 'pg_class')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(comment.as_deref(), Some("items by position"));
}

#[tokio::test]
async fn a_serial_column_survives_the_swap_and_the_prune() {
    let db = TestDb::new().await;
    let c = booted_then_bumped(
        &db,
        "CREATE TABLE entry (n bigserial PRIMARY KEY, pos bigint NOT NULL UNIQUE, tag text NOT NULL);",
        "entry",
        1_000,
    )
    .await;
    assert_eq!(live(&c, "entry").await.0, 2);
    assert_eq!(
        count(&c, "SELECT count(*) FROM entry WHERE tag = 'v2'").await,
        1_000
    );
    // The prune drops the previous version; the sequence stays the live table's.
    let dir = migrations_dir(&db);
    db.run(&["prune", "--min-age", "0s", "--dir", s(&dir)])
        .expect(0);
    db.run(&["migrate", "--dir", s(&dir)]).expect(0);
    assert!(!exists(&c, "projectionist_previous.entry__v1").await);
    // The projector inserts through the sequence: no "relation does not exist".
    let h = add_things(&c, 100).await;
    play_to_head(&db, &["entry"]).await;
    assert_eq!(live(&c, "entry").await, (2, "live".into(), h));
    assert_eq!(
        count(&c, "SELECT count(DISTINCT n) FROM entry").await,
        1_100
    );
    let seq: Option<String> = c
        .query_one("SELECT pg_get_serial_sequence('public.entry', 'n')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(seq.is_some(), "the live table owns its sequence");
}

// ---------------------------------------------------------------------------
// 5. What cannot be swapped is refused, named, and nothing changes.

/// Nothing of a rebuild of `name` happened: live at version `version`, no
/// build, nothing kept, the build schema empty.
async fn assert_untouched(c: &Client, name: &str, version: i32) {
    assert_eq!(live(c, name).await.0, version, "{name}: the live version");
    assert_eq!(build_row(c, name).await, None, "{name}: no build");
    assert_eq!(
        kept(c, name).await,
        Vec::<i32>::new(),
        "{name}: nothing kept"
    );
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname IN ('projectionist_build', 'projectionist_previous')"
        )
        .await,
        0,
        "no table was built or moved"
    );
}

#[tokio::test]
async fn a_foreign_key_to_an_owned_table_refuses_the_swap_naming_it() {
    let db = TestDb::new().await;
    example(&db);
    db.gen_events(3_000);
    db.run(&["boot"]).expect(0);
    let c = db.client().await;
    c.batch_execute("CREATE TABLE band_fan (fan text, band text REFERENCES band (name))")
        .await
        .unwrap();
    let bands = count(&c, "SELECT count(*) FROM band").await;
    bump(&db, "band", 2, "");
    let run = db.run(&["boot"]);
    run.expect(2);
    for needle in ["band_fan_band_fkey", "band_fan", "rebuild = \"in_place\""] {
        assert!(run.stderr.contains(needle), "{needle}: {}", run.stderr);
    }
    assert_untouched(&c, "band", 1).await;
    assert_eq!(count(&c, "SELECT count(*) FROM band").await, bands);
    // reset refuses the same way.
    let run = db.run(&["reset", "band", "--yes"]);
    run.expect(2);
    assert!(run.stderr.contains("band_fan_band_fkey"), "{}", run.stderr);
    assert_untouched(&c, "band", 1).await;
}

#[tokio::test]
async fn rebuild_in_place_rebuilds_a_table_a_foreign_key_points_at() {
    let db = TestDb::new().await;
    example(&db);
    db.gen_events(3_000);
    db.run(&["boot"]).expect(0);
    let c = db.client().await;
    c.batch_execute("CREATE TABLE band_fan (fan text, band text REFERENCES band (name))")
        .await
        .unwrap();
    bump(&db, "band", 2, "rebuild = \"in_place\"");
    let run = db.run(&["boot", "--json"]);
    run.expect(0);
    assert_eq!(
        json(&run)["swaps"],
        serde_json::json!([]),
        "in place: no swap"
    );
    assert_eq!(live(&c, "band").await, (2, "live".into(), head(&c).await));
    assert_eq!(kept(&c, "band").await, Vec::<i32>::new());
    db.assert_tables_match_expected().await;
}

#[tokio::test]
async fn handlers_writing_unowned_or_qualified_tables_and_matviews_and_policies_refuse_the_swap() {
    let db = TestDb::new().await;
    let projector = |name: &str, version: i32, handler: &str| {
        format!(
            "[projectors.{name}]\ntables = [\"{name}_t\"]\nversion = {version}\non.Thing = [\"INSERT INTO {name}_t (id) VALUES (:position)\"{handler}]\n\n"
        )
    };
    let handlers = [
        ("writes", ", \"UPDATE counter SET n = n + 1\""),
        (
            "qualified",
            ", \"DELETE FROM public.qualified_t WHERE id < 0\"",
        ),
        ("viewed", ""),
        ("policed", ""),
    ];
    let manifest = |bumped: Option<&str>| {
        handlers
            .iter()
            .map(|(n, h)| projector(n, if bumped == Some(*n) { 2 } else { 1 }, h))
            .collect::<String>()
    };
    let c = thing_store(
        &db,
        false,
        "CREATE TABLE counter (n bigint NOT NULL); INSERT INTO counter VALUES (0); \
         CREATE TABLE writes_t (id bigint PRIMARY KEY); CREATE TABLE qualified_t (id bigint PRIMARY KEY); \
         CREATE TABLE viewed_t (id bigint PRIMARY KEY); CREATE TABLE policed_t (id bigint PRIMARY KEY); \
         CREATE MATERIALIZED VIEW viewed_m AS SELECT count(*) FROM viewed_t; \
         ALTER TABLE policed_t ENABLE ROW LEVEL SECURITY; CREATE POLICY mine ON policed_t USING (id > 0);",
        &manifest(None),
    )
    .await;
    add_things(&c, 100).await;
    // A first boot is no rebuild: nothing to refuse.
    db.run(&["boot"]).expect(0);
    let wants = [
        ("writes", "`counter`, which it does not own"),
        ("qualified", "with a schema"),
        ("viewed", "materialized view viewed_m"),
        ("policed", "row-level security"),
    ];
    for (name, want) in wants {
        things_manifest(&db, &manifest(Some(name)));
        let run = db.run(&["boot"]);
        run.expect(2);
        assert!(
            run.stderr.contains(&format!("`{name}`")) && run.stderr.contains(want),
            "{name}: {want}: {}",
            run.stderr
        );
        assert!(run.stderr.contains("in_place"), "{}", run.stderr);
        assert_untouched(&c, name, 1).await;
        assert_eq!(
            count(&c, &format!("SELECT count(*) FROM {name}_t")).await,
            100
        );
    }
    assert_eq!(
        count(&c, "SELECT n FROM counter").await,
        100,
        "counted once"
    );
}

// ---------------------------------------------------------------------------
// 6. reset swaps by default; --in-place does not.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_swaps_by_default_and_in_place_readers_see_the_rebuild() {
    let db = TestDb::new().await;
    example(&db);
    db.gen_events(100_000);
    db.run(&["boot"]).expect(0);
    let c = db.client().await;
    let bands = count(&c, "SELECT count(*) FROM band").await;
    let sql = "SELECT count(*) FROM band".to_string();

    let reader = Reader::start_every(&db, sql.clone(), Duration::from_millis(5)).await;
    run_async(&db, "reset", &["reset", "band", "--yes"])
        .await
        .expect(0);
    let polls = reader.stop().await;
    let counts: Vec<i64> = polls.iter().map(|p| p.values.clone().unwrap()[0]).collect();
    println!(
        "reset (swap): {} polls, min {:?}",
        counts.len(),
        counts.iter().min()
    );
    assert!(
        counts.iter().all(|n| *n == bands),
        "a reader saw band change during a reset that swaps: {counts:?}"
    );
    assert_eq!(kept(&c, "band").await, [1], "the old table is kept");
    assert!(exists(&c, "projectionist_previous.band__v1").await);

    let reader = Reader::start_every(&db, sql, Duration::from_millis(5)).await;
    run_async(
        &db,
        "reset-in-place",
        &["reset", "band", "--yes", "--in-place"],
    )
    .await
    .expect(0);
    let polls = reader.stop().await;
    let counts: Vec<i64> = polls.iter().map(|p| p.values.clone().unwrap()[0]).collect();
    let low = counts.iter().min().copied().unwrap();
    println!("reset --in-place: {} polls, min {low}", counts.len());
    assert!(
        low < bands,
        "in place, a reader sees the emptied or partial band at some poll: {counts:?}"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM band").await, bands);
    assert_eq!(live(&c, "band").await, (1, "live".into(), head(&c).await));
    db.assert_tables_match_expected().await;
}

// ---------------------------------------------------------------------------
// 7. SIGKILL at every step of a swap rebuild.

/// The counter projector `rc` at `version`: every Thing adds one to the
/// counter in `rc_n` and its position to `rc_seen` (a second application of
/// an event breaks it on the primary key). Versions above 1 mark their
/// `rc_seen` rows with `v` = the version.
fn rc(version: i32) -> String {
    let prepare = if version > 1 {
        format!("{}\n", marker(version, &["rc_n", "rc_seen"]))
    } else {
        String::new()
    };
    format!(
        "[projectors.rc]\ntables = [\"rc_n\", \"rc_seen\"]\nversion = {version}\n{prepare}\
         on.Thing = [\"INSERT INTO rc_n (k, n) VALUES (1, 1) ON CONFLICT (k) DO UPDATE SET n = rc_n.n + 1\", \"INSERT INTO rc_seen (id) VALUES (:position)\"]\n"
    )
}

/// The live `rc` is complete at `events`: its ledger row, its two tables
/// (the counter, the seen table), every row of both marked with the ledger's
/// version, and in the previous-versions schema the two tables of each kept
/// version and nothing else. Returns the live version.
async fn assert_rc_live_complete(c: &Client, events: i64, when: &str) -> i32 {
    let (version, state, position) = live(c, "rc").await;
    assert_eq!(
        (state.as_str(), position),
        ("live", events),
        "{when}: the live row"
    );
    let marked = |t: &str| {
        format!(
            "(SELECT count(*) FROM {t} s WHERE coalesce((to_jsonb(s) ->> 'v')::int, 1) = {version})"
        )
    };
    let r = c
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM rc_n), (SELECT sum(n)::bigint FROM rc_n), {}, \
                        (SELECT count(*) FROM rc_seen), (SELECT count(DISTINCT id) FROM rc_seen), {}",
                marked("rc_n"),
                marked("rc_seen")
            ),
            &[],
        )
        .await
        .unwrap();
    let got: (i64, Option<i64>, i64, i64, i64, i64) =
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
    assert_eq!(
        got,
        (1, Some(events), 1, events, events, events),
        "{when}: the live tables of version {version} (rc_n rows, counter, rc_n rows marked v{version}, \
         seen rows, distinct seen, seen rows marked v{version})"
    );
    let mut want: Vec<String> = kept(c, "rc")
        .await
        .iter()
        .flat_map(|v| [format!("rc_n__v{v}"), format!("rc_seen__v{v}")])
        .collect();
    want.sort();
    let previous: Vec<String> = c
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'projectionist_previous' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(previous, want, "{when}: the kept versions' tables");
    version
}

/// Waits until no session of a projectionist process is left in the database.
async fn wait_for_killed_boot_sessions_to_end(c: &Client) {
    wait_for("the killed boot's sessions to end", PATIENCE, &[], async || {
        count(
            c,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'projectionist%'",
        )
        .await
            == 0
    })
    .await;
}

/// Boots the build of rc v2 and kills it as soon as it exists, then twice
/// further on: each time the build is the same record, never goes back, and
/// v1 stays live and complete. Returns the build's position at the last kill.
async fn kill_the_build_of_v2_three_times(db: &TestDb, c: &Client, events: i64) -> i64 {
    let mut build_id = None;
    let mut last = 0;
    for (i, past) in [0, 5_000, 12_000].into_iter().enumerate() {
        let mut boot = Spawned::start(db, &format!("build-{i}"), &["boot", "--batch-size", "50"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((_, _, state, pos)) = build_row(c, "rc").await
                && pos >= past
                && state == "booting"
            {
                break;
            }
            assert!(
                !boot.exited(),
                "boot ended before the kill point {past}: {:?}",
                boot.run()
            );
            assert!(Instant::now() < deadline, "the build never passed {past}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        boot.sigkill();
        let (id, version, state, pos) = build_row(c, "rc").await.unwrap();
        println!("killed the build at {pos} (kill point {past})");
        assert_eq!(version, 2);
        assert_eq!(
            *build_id.get_or_insert(id),
            id,
            "the build resumes: same record"
        );
        assert!(pos >= last, "the build went back from {last} to {pos}");
        assert_ne!(state, "built", "killed before the end");
        last = pos;
        assert_eq!(
            assert_rc_live_complete(c, events, &format!("after kill {i}")).await,
            1,
            "v1 stays live, complete"
        );
        let status = status_of(db, "rc");
        assert_eq!(status["build"]["version"], 2, "{status}");
        assert_eq!(status["build"]["position"], pos, "{status}");
        let table = db.run(&["status"]);
        assert!(
            table.stdout.contains(&format!(
                "building v2 (booting): position {pos}, lag {}",
                events - pos
            )),
            "{}",
            table.stdout
        );
    }
    last
}

/// Kills the boot of rc v3 in the middle of its swap: v2 stays live, whole,
/// and the next boot swaps v3 in.
async fn kill_the_swap_of_v3_midway(db: &TestDb, c: &Client, events: i64) {
    // A reader holds rc_seen, so the swap has exchanged rc_n and waits for
    // rc_seen; kill it there.
    things_manifest(db, &rc(3));
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; SELECT count(*) FROM rc_seen")
        .await
        .unwrap();
    let mut boot = Spawned::start(db, "mid-swap", &["boot"]);
    wait_for("the swap to wait for rc_seen", PATIENCE, &[], async || {
        count(
            c,
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'public.rc_seen'::regclass",
        )
        .await
            > 0
    })
    .await;
    assert_eq!(build_row(c, "rc").await.unwrap().2, "built");
    boot.sigkill();
    // The dead boot's session ends at its lock timeout; its transaction never commits.
    wait_for_killed_boot_sessions_to_end(c).await;
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        assert_rc_live_complete(c, events, "killed mid-swap").await,
        2,
        "the half-done swap rolled back: v2 is live, whole"
    );
    assert_eq!(build_row(c, "rc").await.unwrap().2, "built");
    db.run(&["boot"]).expect(0);
    assert_eq!(assert_rc_live_complete(c, events, "v3 swapped in").await, 3);
}

/// Bumps rc from v3 on and kills each boot 0-60 ms after the build is seen
/// done (the swap commits some 25 ms after that here), until kills landed on
/// both sides of its commit (at most 8 tries): the live version is always
/// whole, the old or the new one, and the next boot swaps the new one in.
/// Returns the last version.
async fn kill_around_the_swap_commit(db: &TestDb, c: &Client, events: i64) -> i32 {
    let mut outcomes = [0; 2];
    let mut version = 3;
    while version < 11 && (version < 7 || outcomes.contains(&0)) {
        version += 1;
        things_manifest(db, &rc(version));
        let mut boot = Spawned::start(db, &format!("around-{version}"), &["boot"]);
        loop {
            let built = build_row(c, "rc").await.is_some_and(|b| b.2 == "built");
            if built || live(c, "rc").await.0 == version || boot.exited() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let delay = random_below(60);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        boot.sigkill();
        wait_for_killed_boot_sessions_to_end(c).await;
        let now = assert_rc_live_complete(
            c,
            events,
            &format!("killed {delay} ms after v{version} was built"),
        )
        .await;
        assert!(
            now == version - 1 || now == version,
            "v{now} live after killing the swap of v{version}"
        );
        outcomes[(now == version) as usize] += 1;
        db.run(&["boot"]).expect(0);
        assert_eq!(
            assert_rc_live_complete(c, events, &format!("v{version} after the next boot")).await,
            version
        );
    }
    println!(
        "kills around the swap: {} landed before it committed, {} after",
        outcomes[0], outcomes[1]
    );
    version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_build_and_around_the_swap_loses_nothing() {
    const EVENTS: i64 = 20_000;
    let db = TestDb::new().await;
    let c = thing_store(
        &db,
        false,
        "CREATE TABLE rc_n (k int PRIMARY KEY, n bigint NOT NULL); \
         CREATE TABLE rc_seen (id bigint PRIMARY KEY);",
        &rc(1),
    )
    .await;
    add_things(&c, EVENTS).await;
    db.run(&["boot"]).expect(0);
    assert_eq!(assert_rc_live_complete(&c, EVENTS, "v1 booted").await, 1);

    // During the build: kill as soon as it exists, then twice further on.
    things_manifest(&db, &rc(2));
    let last = kill_the_build_of_v2_three_times(&db, &c, EVENTS).await;
    let run = db.run(&["boot", "--json"]);
    run.expect(0);
    let report = json(&run);
    let processed = report["projectors"][0]["events"].as_i64().unwrap();
    assert!(
        processed <= EVENTS - last,
        "the last boot resumed from {last}: {report}"
    );
    assert_eq!(
        assert_rc_live_complete(&c, EVENTS, "v2 swapped in").await,
        2
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM projectionist_previous.rc_seen__v1"
        )
        .await,
        EVENTS,
        "v1 kept, complete"
    );

    // In the middle of the swap.
    kill_the_swap_of_v3_midway(&db, &c, EVENTS).await;

    // Around the swap, at random.
    let version = kill_around_the_swap_commit(&db, &c, EVENTS).await;
    assert_eq!(kept(&c, "rc").await, (1..version).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------
// 8. A build that breaks leaves the live version live.

fn bt(version: i32, value: &str) -> String {
    format!(
        "[projectors.bt]\ntables = [\"bt\"]\nversion = {version}\n\
         on.Thing = \"INSERT INTO bt (id, v) VALUES (:position, {value})\"\n"
    )
}

#[tokio::test]
async fn a_build_that_breaks_leaves_the_live_version_live_and_resumes_once_fixed() {
    const EVENTS: i64 = 2_000;
    let db = TestDb::new().await;
    let c = thing_store(
        &db,
        false,
        "CREATE TABLE bt (id bigint PRIMARY KEY, v int NOT NULL);",
        &bt(1, "1"),
    )
    .await;
    add_things(&c, EVENTS).await;
    db.run(&["boot"]).expect(0);

    things_manifest(&db, &bt(2, "2 + 0 / (:position - 700)"));
    let run = db.run(&["boot", "--batch-size", "300"]);
    run.expect(1);
    assert!(run.stderr.contains("#700"), "{}", run.stderr);
    assert!(run.stderr.contains("division by zero"), "{}", run.stderr);
    assert_eq!(live(&c, "bt").await, (1, "live".into(), EVENTS), "v1 live");
    assert_eq!(
        count(&c, "SELECT count(*) FROM bt WHERE v = 1").await,
        EVENTS,
        "the live table untouched"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM bt").await, EVENTS);
    let (build_id, version, state, position) = build_row(&c, "bt").await.unwrap();
    assert_eq!((version, state.as_str(), position), (2, "broken", 699));
    let status = status_of(&db, "bt");
    assert_eq!(status["state"], "live", "{status}");
    assert_eq!(status["version"], 1, "{status}");
    assert_eq!(status["build"]["state"], "broken", "{status}");
    assert_eq!(status["build"]["version"], 2, "{status}");
    assert_eq!(status["build"]["position"], 699, "{status}");
    assert!(
        status["build"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("division by zero"),
        "{status}"
    );
    let text = db.run(&["status"]);
    assert!(text.stdout.contains("build v2 broken"), "{}", text.stdout);
    assert!(
        count(
            &c,
            "SELECT count(*) FROM projectionist.failures WHERE projector = 'bt' AND version = 2"
        )
        .await
            > 0,
        "the failure is recorded against version 2"
    );
    // Boot again without a fix: still broken at the same event, v1 still live.
    db.run(&["boot"]).expect(1);
    assert_eq!(
        build_row(&c, "bt").await.unwrap(),
        (build_id, 2, "broken".into(), 699)
    );
    assert_eq!(live(&c, "bt").await.0, 1);

    // Fixed (same version): the build resumes where it broke and swaps in.
    things_manifest(&db, &bt(2, "2"));
    let run = db.run(&["boot", "--json"]);
    run.expect(0);
    let report = json(&run);
    assert_eq!(
        report["projectors"][0]["events"],
        EVENTS - 699,
        "resumed at 699: {report}"
    );
    assert_eq!(report["swaps"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(live(&c, "bt").await, (2, "live".into(), EVENTS));
    assert_eq!(
        count(&c, "SELECT count(*) FROM bt WHERE v = 2").await,
        EVENTS
    );
    assert_eq!(count(&c, "SELECT count(*) FROM bt").await, EVENTS);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM projectionist_previous.bt__v1 WHERE v = 1"
        )
        .await,
        EVENTS
    );
    assert!(status_of(&db, "bt")["build"].is_null());
}

// ---------------------------------------------------------------------------
// 9. prune.

fn pt(version: i32) -> String {
    format!(
        "[projectors.pt]\ntables = [\"pt_log\"]\nversion = {version}\n\
         on.Thing = \"INSERT INTO pt_log (id) VALUES (:position)\"\n"
    )
}

/// Right after a swap, the kept version is younger than any `--min-age`
/// prune uses by default or is given here: nothing to prune, no file written.
fn assert_nothing_to_prune_right_after_the_swap(db: &TestDb) {
    for args in [
        vec!["prune"],
        vec!["prune", "--min-age", "72h"],
        vec!["prune", "--min-age", "72h", "--dry-run"],
    ] {
        let run = db.run(&args);
        run.expect(0);
        assert!(
            run.stdout.contains("nothing to prune"),
            "{args:?} right after the swap: {}",
            run.stdout
        );
    }
    assert!(
        !db.dir.path().join("migrations").exists(),
        "no file written"
    );
}

/// `prune --dry-run` (default min-age 72h) shows the drop of pt v1, kept for
/// four days, and not of v2; it writes no file.
fn assert_dry_run_shows_only_the_version_older_than_72h(db: &TestDb) {
    let run = db.run(&["prune", "--dry-run"]);
    run.expect(0);
    assert!(
        run.stdout
            .contains("DROP TABLE IF EXISTS \"projectionist_previous\".\"pt_log__v1\";"),
        "{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains("pt_log__v2"),
        "v2 is younger than 72h: {}",
        run.stdout
    );
    assert!(
        !db.dir.path().join("migrations").exists(),
        "--dry-run writes no file"
    );
}

/// `prune --min-age 0s --dir DIR` writes one migration into `dir`, named in
/// its output, that drops the tables of pt v1 and v2.
fn assert_prune_writes_one_migration_dropping_both(db: &TestDb, dir: &Path) {
    let before: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|f| f.unwrap().file_name())
        .collect();
    let run = db.run(&["prune", "--min-age", "0s", "--dir", s(dir)]);
    run.expect(0);
    let written: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|f| f.unwrap())
        .filter(|f| !before.contains(&f.file_name()))
        .map(|f| f.path())
        .collect();
    assert_eq!(written.len(), 1, "one migration written: {}", run.stdout);
    let name = written[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    assert!(name.ends_with("__prune_previous_versions.sql"), "{name}");
    assert!(run.stdout.contains(&name), "{}", run.stdout);
    let sql = std::fs::read_to_string(&written[0]).unwrap();
    for t in ["pt_log__v1", "pt_log__v2"] {
        assert!(
            sql.contains(&format!(
                "DROP TABLE IF EXISTS \"projectionist_previous\".\"{t}\";"
            )),
            "{sql}"
        );
    }
}

/// `migrate --dir DIR` applies the prune migration: the kept tables of pt
/// are dropped, the ledger and status keep no version, and nothing is left
/// to prune.
async fn assert_migrate_applies_the_prune(db: &TestDb, c: &Client, dir: &Path) {
    let run = db.run(&["migrate", "--dir", s(dir)]);
    run.expect(0);
    assert!(
        run.stdout.contains("prune_previous_versions"),
        "{}",
        run.stdout
    );
    for t in ["pt_log__v1", "pt_log__v2"] {
        assert!(
            !exists(c, &format!("projectionist_previous.{t}")).await,
            "{t} dropped"
        );
    }
    assert_eq!(kept(c, "pt").await, Vec::<i32>::new());
    let status = status_of(db, "pt");
    assert_eq!(status["kept_versions"], serde_json::json!([]), "{status}");
    let run = db.run(&["prune", "--min-age", "0s", "--dry-run"]);
    run.expect(0);
    assert!(run.stdout.contains("nothing to prune"), "{}", run.stdout);
}

#[tokio::test]
async fn prune_writes_the_migration_that_drops_kept_versions_older_than_min_age() {
    let db = TestDb::new().await;
    let c = thing_store(
        &db,
        false,
        "CREATE TABLE pt_log (id bigint PRIMARY KEY);",
        &pt(1),
    )
    .await;
    add_things(&c, 500).await;
    db.run(&["boot"]).expect(0);
    let run = db.run(&["prune", "--min-age", "0s"]);
    run.expect(0);
    assert!(
        run.stdout.contains("nothing to prune"),
        "no kept version yet: {}",
        run.stdout
    );

    things_manifest(&db, &pt(2));
    db.run(&["boot"]).expect(0);
    assert_nothing_to_prune_right_after_the_swap(&db);

    // v2 kept too; v1 kept for four days already.
    things_manifest(&db, &pt(3));
    db.run(&["boot"]).expect(0);
    assert_eq!(kept(&c, "pt").await, [1, 2]);
    c.execute(
        "UPDATE projectionist.versions SET kept_since = now() - interval '4 days' WHERE projector = 'pt' AND version = 1",
        &[],
    )
    .await
    .unwrap();
    assert_dry_run_shows_only_the_version_older_than_72h(&db);

    let dir = migrations_dir(&db);
    assert_prune_writes_one_migration_dropping_both(&db, &dir);
    // Written, not applied.
    assert!(exists(&c, "projectionist_previous.pt_log__v1").await);
    assert_eq!(kept(&c, "pt").await, [1, 2]);

    assert_migrate_applies_the_prune(&db, &c, &dir).await;
    // The live version goes on.
    let h = add_things(&c, 10).await;
    play_to_head(&db, &["pt"]).await;
    assert_eq!(live(&c, "pt").await, (3, "live".into(), h));
    assert_eq!(count(&c, "SELECT count(*) FROM pt_log").await, h);
    // A rollback to a pruned version is refused, named.
    things_manifest(&db, &pt(1));
    let run = db.run(&["rollback", "pt"]);
    run.expect(2);
    assert!(
        run.stderr.contains("no previous version 1"),
        "{}",
        run.stderr
    );
}
