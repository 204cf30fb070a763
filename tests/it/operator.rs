//! The operator tools against a real PostgreSQL, through the real binary:
//!
//! - `failures` and `retry`: an event skipped by `on_error = "skip"` in
//!   `play` is recorded as a dead letter, listed, counted by `status` and the
//!   metrics, and applied again by `retry` once the cause is fixed (a new
//!   failure row when it fails again; `--position` retries only those);
//!   a command projector gets its dead letter re-delivered through the
//!   protocol with `PROJECTIONIST_RUN=retry`; a rebuild that replays a dead
//!   letter's event leaves nothing to retry;
//! - `pause` and `resume`: a ledger state that every runner, a restarted
//!   runner and `boot` respect; a busy projector is paused after its batch in
//!   flight;
//! - play's `--metrics` endpoint scraped over HTTP while events flow, and
//!   `/healthz` following the database (a private server stopped and
//!   started; a network that goes silent);
//! - the Grafana dashboard (deploy/grafana/projectionist.json): every metric
//!   name it queries has a series in a running `play`'s `/metrics`.
//!
//! Each test uses projector names of its own (play's owner locks are
//! advisory locks; the tests run in parallel on one server).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::harness::*;

// ---------------------------------------------------------------------------
// Helpers

/// `GET path` on 127.0.0.1:`port`: (status code, body), or None when nothing
/// answers there.
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8(out).ok()?;
    let code = text.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((code, body.to_string()))
}

/// The value of the sample `series` (`name{labels}` or `name`) in a metrics
/// text, if it is there.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split(' ').next()?.parse().ok()
    })
}

/// Scrapes `/metrics` until `cond` holds for the body; returns the body.
/// (One scrape may show one gauge of a supervision pass updated and the next
/// not yet: wait for every value a check needs together.)
async fn wait_for_metrics(
    port: u16,
    what: &str,
    players: &[&Player],
    cond: impl Fn(&str) -> bool,
) -> String {
    let mut body = String::new();
    wait_for(what, PATIENCE, players, async || {
        body = get_metrics(port).await.unwrap_or_default();
        cond(&body)
    })
    .await;
    body
}

/// Scrapes `/metrics` until `series` has the value `want`; returns the body.
async fn wait_for_sample(port: u16, series: &str, want: f64, players: &[&Player]) -> String {
    wait_for_metrics(
        port,
        &format!("`{series} {want}` in the metrics"),
        players,
        |body| sample(body, series) == Some(want),
    )
    .await
}

/// `failures [NAME] --json`, parsed.
fn failures_json(db: &TestDb, name: &str) -> Vec<Value> {
    let run = db.run(&["failures", name, "--json"]);
    run.expect(0);
    serde_json::from_str::<Value>(&run.stdout)
        .unwrap_or_else(|e| panic!("failures --json: {e}\n{}", run.stdout))
        .as_array()
        .unwrap_or_else(|| panic!("failures --json is not a list: {}", run.stdout))
        .clone()
}

/// The failures recorded at `position`.
fn at(failures: &[Value], position: i64) -> Vec<&Value> {
    failures
        .iter()
        .filter(|f| f["position"] == json!(position))
        .collect()
}

/// The line of a table whose whitespace-separated cells start with `cells`.
fn row<'a>(table: &'a str, cells: &[&str]) -> Option<&'a str> {
    table.lines().find(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.len() >= cells.len() && words[..cells.len()] == *cells
    })
}

/// `status --json`: the entry of projector `name`.
fn status_of(db: &TestDb, name: &str) -> Value {
    let run = db.run(&["status", "--json"]);
    run.expect(0);
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    doc["projectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no `{name}` in status --json:\n{}", run.stdout))
        .clone()
}

/// Appends a BandCreated event named `name`; returns its position.
async fn band_created(db: &TestDb, name: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "INSERT INTO events (aggregate_id, aggregate_name, name, data) \
             VALUES (gen_random_uuid(), 'band', 'BandCreated', jsonb_build_object('name', $1::text)) RETURNING id",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

async fn max_id(db: &TestDb) -> i64 {
    db.count("SELECT coalesce(max(id), 0) FROM events").await
}

/// A small command projector (python3): acknowledges every checkpoint and
/// records each event it receives as `position type run` in $RECORD_FILE;
/// answers `{"error": ..., "position": P}` for position $POISON_AT the first
/// time only (it leaves the file $MARKER behind).
const CONSUMER: &str = r#"import json, os, sys
record = open(os.environ["RECORD_FILE"], "a")
poison = int(os.environ.get("POISON_AT", "0"))
marker = os.environ.get("MARKER", "")
run = os.environ["PROJECTIONIST_RUN"]
for line in sys.stdin:
    msg = json.loads(line)
    if "checkpoint" in msg:
        record.flush()
        print(json.dumps({"ack": msg["checkpoint"]}), flush=True)
        continue
    if msg["position"] == poison and not os.path.exists(marker):
        open(marker, "w").close()
        print(json.dumps({"error": "poison event, first time", "position": poison}), flush=True)
        continue
    record.write(f"{msg['position']} {msg['type']} {run}\n")
"#;

/// Writes [`CONSUMER`] into the test's directory; returns a manifest section
/// of a command projector `name` running it with `env` (`"K=V", ` items).
fn consumer(db: &TestDb, name: &str, env: &str, extra: &str) -> String {
    let script = db.dir.path().join("consumer.py");
    std::fs::write(&script, CONSUMER).unwrap();
    format!(
        "[projectors.{name}]\ncommand = [\"env\", {env} \"python3\", \"{}\"]\n{extra}\n\n",
        script.display()
    )
}

/// (position, type, run) of each line of the consumer's record file.
fn recorded(db: &TestDb, file: &str) -> Vec<(i64, String, String)> {
    std::fs::read_to_string(db.dir.path().join(file))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut w = l.split(' ');
            (
                w.next().unwrap().parse().unwrap(),
                w.next().unwrap().to_string(),
                w.next().unwrap().to_string(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Dead letters of an SQL projector: failures, status, metrics, retry.

/// The example with `on_error = "skip"` for band, 1,500 events booted, and a
/// constraint on band that refuses the poison bands (until it is dropped).
async fn example_skipping_poison_bands(db: &TestDb) {
    example(db);
    let manifest = std::fs::read_to_string(db.manifest_path()).unwrap();
    assert!(manifest.contains("[projectors.band]\n"));
    db.write_manifest(&manifest.replace(
        "[projectors.band]\n",
        "[projectors.band]\non_error = \"skip\"\n",
    ));
    db.gen_events(1_500);
    db.run(&["boot"]).expect(0);
    // The poison: band names the constraint refuses (until it is "fixed").
    // Not "NAME 123": scripts/gen-events may have users ignore such a band,
    // and userpreferences would then miss a band that was skipped.
    db.client()
        .await
        .batch_execute(
            "ALTER TABLE band ADD CONSTRAINT band_no_poison CHECK (name NOT LIKE 'POISON%')",
        )
        .await
        .unwrap();
}

/// Waits for `play` to bring band, live, to the last event.
async fn wait_for_band_at_head(db: &TestDb, play: &Player, what: &str) {
    let h = max_id(db).await;
    wait_for(what, PATIENCE, &[play], async || {
        db.ledger("band").await == Some(("live".into(), h))
    })
    .await;
}

/// Scrapes `/metrics` until band has `n` dead letters; returns the body.
async fn wait_for_band_dead_letters(port: u16, n: f64, play: &Player) -> String {
    wait_for_sample(
        port,
        "projectionist_dead_letters{projector=\"band\"}",
        n,
        &[play],
    )
    .await
}

/// `failures` lists band's one dead letter at `p1`, as a table and as JSON.
async fn assert_the_dead_letter_is_listed(db: &TestDb, p1: i64) {
    let table = db.run(&["failures"]);
    table.expect(0);
    let line = row(&table.stdout, &["band", &p1.to_string(), "BandCreated"])
        .unwrap_or_else(|| panic!("no row of band's dead letter #{p1}:\n{}", table.stdout));
    assert!(
        line.contains(" play ") && line.contains("waiting") && line.contains("band_no_poison"),
        "{line}"
    );
    assert_eq!(table.stdout.lines().count(), 2, "{}", table.stdout);
    let stream: String = db
        .client()
        .await
        .query_one(
            "SELECT aggregate_id::text FROM events WHERE id = $1",
            &[&p1],
        )
        .await
        .unwrap()
        .get(0);
    let f = failures_json(db, "band");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0]["projector"], "band");
    assert_eq!(f[0]["position"], json!(p1));
    assert_eq!(f[0]["type"], "BandCreated");
    assert_eq!(f[0]["stream"], json!(stream));
    assert_eq!(f[0]["run"], "play");
    assert_eq!(f[0]["dead_letter"], true);
    assert_eq!(f[0]["resolved_at"], Value::Null);
    assert_eq!(f[0]["sqlstate"], "23514");
    assert!(
        f[0]["error"].as_str().unwrap().contains("band_no_poison"),
        "{f:#?}"
    );
    assert!(failures_json(db, "dancehall").is_empty());
}

/// `status` and play's metrics count band's one dead letter.
async fn assert_status_and_metrics_count_one_dead_letter(db: &TestDb, port: u16, play: &Player) {
    // status: says so, and exits 0 (a dead letter is not a broken projector).
    let status = db.run(&["status"]);
    status.expect(0);
    assert!(
        status
            .stdout
            .contains("1 dead letter(s) waiting: projectionist retry band"),
        "{}",
        status.stdout
    );
    assert_eq!(status_of(db, "band")["dead_letters"], json!(1));
    assert_eq!(status_of(db, "event")["dead_letters"], json!(0));

    // play's metrics.
    let body = wait_for_band_dead_letters(port, 1.0, play).await;
    assert_eq!(
        sample(&body, "projectionist_dead_letters{projector=\"event\"}"),
        Some(0.0),
        "{body}"
    );
}

/// `retry` while the cause is still there: fails again, recorded, still waiting.
async fn assert_retry_fails_again_while_the_cause_is_there(db: &TestDb, p1: i64) {
    let run = db.run(&["retry", "band"]);
    run.expect(1);
    let line = row(&run.stdout, &["band", &p1.to_string(), "BandCreated"])
        .unwrap_or_else(|| panic!("{}", run.stdout));
    assert!(
        line.contains("failed again") && line.contains("band_no_poison"),
        "{}",
        run.stdout
    );
    let f = failures_json(db, "band");
    assert_eq!(f.len(), 2, "{f:#?}");
    let runs: Vec<&Value> = f.iter().map(|x| &x["run"]).collect();
    assert_eq!(runs, [&json!("play"), &json!("retry")], "{f:#?}");
    for x in &f {
        assert_eq!(x["position"], json!(p1), "{f:#?}");
        assert_eq!(x["dead_letter"], true, "{f:#?}");
        assert_eq!(x["resolved_at"], Value::Null, "{f:#?}");
    }
    assert_eq!(status_of(db, "band")["dead_letters"], json!(1));
    assert_eq!(
        db.count("SELECT count(*) FROM band WHERE name LIKE 'POISON%'")
            .await,
        0
    );
}

/// `retry --position p2` applies the dead letter at `p2` and leaves the one
/// at `p1` waiting.
async fn assert_retry_of_one_position_applies_that_one_only(db: &TestDb, p1: i64, p2: i64) {
    let run = db.run(&["retry", "band", "--position", &p2.to_string()]);
    run.expect(0);
    let line = row(
        &run.stdout,
        &["band", &p2.to_string(), "BandCreated", "applied"],
    );
    assert!(line.is_some(), "{}", run.stdout);
    assert!(!run.stdout.contains(&p1.to_string()), "{}", run.stdout);
    assert_eq!(
        db.count("SELECT count(*) FROM band WHERE name = 'POISON-2'")
            .await,
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM band WHERE name = 'POISON-1'")
            .await,
        0,
        "retry --position {p2} applied #{p1} too"
    );
    let f = failures_json(db, "band");
    assert!(
        at(&f, p2).iter().all(|x| x["resolved_at"].is_string()),
        "{f:#?}"
    );
    assert!(
        at(&f, p1).iter().all(|x| x["resolved_at"].is_null()),
        "{f:#?}"
    );
}

/// `retry --json` applies the one dead letter left, at `p1`: every failure
/// of band is resolved.
fn assert_retry_applies_the_one_left(db: &TestDb, p1: i64) {
    let run = db.run(&["retry", "band", "--json"]);
    run.expect(0);
    let retried: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        retried,
        json!([{"position": p1, "type": "BandCreated", "ok": true, "error": null}]),
        "{}",
        run.stdout
    );
    let f = failures_json(db, "band");
    assert_eq!(f.len(), 3, "{f:#?}");
    for x in &f {
        assert!(x["resolved_at"].is_string(), "{f:#?}");
        assert_eq!(x["dead_letter"], true, "{f:#?}");
    }
    let table = db.run(&["failures", "band"]);
    assert_eq!(
        table.stdout.matches("resolved").count(),
        3,
        "{}",
        table.stdout
    );
    assert!(!table.stdout.contains("waiting"), "{}", table.stdout);
}

/// No dead letter waiting: `status` says none, and `retry` exits 0 saying so.
fn assert_no_dead_letter_waiting(db: &TestDb) {
    let status = db.run(&["status"]);
    status.expect(0);
    assert!(!status.stdout.contains("dead letter"), "{}", status.stdout);
    assert_eq!(status_of(db, "band")["dead_letters"], json!(0));

    // Nothing waiting: exit 0, and says so.
    let run = db.run(&["retry", "band"]);
    run.expect(0);
    assert!(
        run.stdout.contains("no dead letters of `band` are waiting"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn dead_letters_skipped_in_play_are_listed_counted_and_applied_again_by_retry() {
    let db = TestDb::new().await;
    example_skipping_poison_bands(&db).await;

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let play = Player::start(&db, "deadletters", &["--poll", "200ms", "--metrics", &addr]);
    let p1 = band_created(&db, "POISON-1").await;
    db.gen_events(200);
    wait_for_band_at_head(&db, &play, "band to play past the poison").await;
    assert_eq!(
        db.count("SELECT count(*) FROM band WHERE name LIKE 'POISON%'")
            .await,
        0
    );

    assert_the_dead_letter_is_listed(&db, p1).await;
    assert_status_and_metrics_count_one_dead_letter(&db, port, &play).await;
    assert_retry_fails_again_while_the_cause_is_there(&db, p1).await;

    // A second poison event: two dead letters.
    let p2 = band_created(&db, "POISON-2").await;
    db.gen_events(100);
    wait_for_band_at_head(&db, &play, "band to play past the second poison").await;
    wait_for_band_dead_letters(port, 2.0, &play).await;
    assert!(
        db.run(&["status"])
            .expect(0)
            .stdout
            .contains("2 dead letter(s) waiting"),
    );

    // The cause fixed: retry --position retries that one only.
    db.client()
        .await
        .batch_execute("ALTER TABLE band DROP CONSTRAINT band_no_poison")
        .await
        .unwrap();
    assert_retry_of_one_position_applies_that_one_only(&db, p1, p2).await;
    wait_for_band_dead_letters(port, 1.0, &play).await;

    // retry: the one left, with --json.
    assert_retry_applies_the_one_left(&db, p1);
    wait_for_band_dead_letters(port, 0.0, &play).await;
    assert_no_dead_letter_waiting(&db);

    // The read model is what the events say, the poison bands included.
    let h = max_id(&db).await;
    wait_for(
        "every projector at the head",
        PATIENCE,
        &[&play],
        async || {
            let mut all = true;
            for p in SQL_PROJECTORS {
                all &= db.ledger(p).await.map(|l| l.1) == Some(h);
            }
            all
        },
    )
    .await;
    db.assert_tables_match_expected().await;
    drop(play);
}

// ---------------------------------------------------------------------------
// 2. A command projector's dead letter, re-delivered through the protocol.

#[tokio::test]
async fn a_command_projectors_dead_letter_is_delivered_again_by_retry_with_run_retry() {
    let db = TestDb::new().await;
    let c = thing_store(&db, true, "", "").await;
    add_things(&c, 10).await;
    let poison = 15;
    let marker = db.dir.path().join("poisoned");
    let section = consumer(
        &db,
        "op_cmd",
        &format!(
            "\"RECORD_FILE=record.txt\", \"POISON_AT={poison}\", \"MARKER={}\",",
            marker.display()
        ),
        "on_error = \"skip\"",
    );
    things_manifest(&db, &section);
    db.run(&["boot"]).expect(0);
    let play = Player::start(&db, "cmd", &["--poll", "200ms"]);
    wait_for("play to own op_cmd", PATIENCE, &[&play], async || {
        owned_by(&c, &play).await == ["op_cmd"]
    })
    .await;
    let h = add_things(&c, 10).await;
    assert_eq!(h, 20);
    wait_for(
        "op_cmd to play past the poison",
        PATIENCE,
        &[&play],
        async || db.ledger("op_cmd").await == Some(("live".into(), h)),
    )
    .await;
    assert!(marker.exists(), "the consumer never saw the poison event");
    let f = failures_json(&db, "op_cmd");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0]["position"], json!(poison));
    assert_eq!(f[0]["type"], "Thing");
    assert_eq!(f[0]["run"], "play");
    assert_eq!(f[0]["dead_letter"], true);
    assert_eq!(f[0]["resolved_at"], Value::Null);
    assert!(
        f[0]["error"]
            .as_str()
            .unwrap()
            .contains("poison event, first time"),
        "{f:#?}"
    );
    let before = recorded(&db, "record.txt");
    let positions: BTreeSet<i64> = before.iter().map(|r| r.0).collect();
    assert_eq!(
        positions,
        (1..=h).filter(|p| *p != poison).collect(),
        "{before:?}"
    );
    assert!(before.iter().all(|r| r.2 == "boot" || r.2 == "play"));

    // retry: exactly that event, through the protocol, in a run of its own.
    let run = db.run(&["retry", "op_cmd"]);
    run.expect(0);
    assert!(
        row(
            &run.stdout,
            &["op_cmd", &poison.to_string(), "Thing", "applied"]
        )
        .is_some(),
        "{}",
        run.stdout
    );
    let after = recorded(&db, "record.txt");
    assert_eq!(
        after[before.len()..],
        [(poison, "Thing".to_string(), "retry".to_string())],
        "{after:?}"
    );
    let f = failures_json(&db, "op_cmd");
    assert_eq!(f.len(), 1, "{f:#?}");
    assert!(f[0]["resolved_at"].is_string(), "{f:#?}");
    assert_eq!(status_of(&db, "op_cmd")["dead_letters"], json!(0));
    // The ledger is play's: retry neither moved it nor broke it.
    assert_eq!(db.ledger("op_cmd").await, Some(("live".into(), h)));
    let run = db.run(&["retry", "op_cmd"]);
    run.expect(0);
    assert!(run.stdout.contains("no dead letters"), "{}", run.stdout);
    assert_eq!(recorded(&db, "record.txt").len(), after.len());
    drop(play);
}

// ---------------------------------------------------------------------------
// 3. pause and resume: a ledger state every runner, restart and boot respect.

/// Three loggers (`op_paused`, the control `op_ctl`, and `op_unbooted`, left
/// to the boot of the test) over 100 Things; the first two booted.
async fn paused_and_control_loggers_booted(db: &TestDb) -> Client {
    let c = thing_store(
        db,
        true,
        "CREATE TABLE op_paused_log (id bigint PRIMARY KEY); CREATE TABLE op_ctl_log (id bigint PRIMARY KEY); \
         CREATE TABLE op_unbooted_log (id bigint PRIMARY KEY)",
        &[
            logger("op_paused", "from_beginning", "op_paused_log"),
            logger("op_ctl", "from_beginning", "op_ctl_log"),
            logger("op_unbooted", "from_beginning", "op_unbooted_log"),
        ]
        .concat(),
    )
    .await;
    add_things(&c, 100).await;
    db.run(&["boot", "op_paused", "op_ctl"]).expect(0);
    c
}

/// `pause op_paused` at `paused_at`: the ledger, `status` and the metrics of
/// `r2` (on `port`) say paused, and no runner owns it any more.
async fn assert_pause_takes_op_paused_out_of_play(
    db: &TestDb,
    c: &Client,
    paused_at: i64,
    port: u16,
    (r1, r2): (&Player, &Player),
) {
    let run = db.run(&["pause", "op_paused"]);
    run.expect(0);
    assert!(
        run.stdout.contains("paused op_paused: paused (was live)"),
        "{}",
        run.stdout
    );
    assert_eq!(
        ledger(c, "op_paused").await,
        Some(("paused".into(), paused_at))
    );
    let status = db.run(&["status"]);
    status.expect(0);
    assert!(
        row(&status.stdout, &["op_paused", "from_beginning", "paused"]).is_some(),
        "{}",
        status.stdout
    );
    assert_eq!(status_of(db, "op_paused")["state"], "paused");
    let body = wait_for_sample(
        port,
        "projectionist_state{projector=\"op_paused\",state=\"paused\"}",
        1.0,
        &[r2],
    )
    .await;
    assert_eq!(
        sample(
            &body,
            "projectionist_state{projector=\"op_paused\",state=\"live\"}"
        ),
        Some(0.0),
        "{body}"
    );
    // The runner that played it lets it go.
    wait_for(
        "no runner to own op_paused",
        PATIENCE,
        &[r1, r2],
        async || owners(c).await.iter().all(|(p, _)| p != "op_paused"),
    )
    .await;
}

/// New events: the control projector plays them, the paused one (at
/// `paused_at`) does not. Returns the new head.
async fn assert_only_the_control_plays_new_events(
    c: &Client,
    paused_at: i64,
    what: &str,
    players: &[&Player],
) -> i64 {
    let h = add_things(c, 10).await;
    wait_for(what, PATIENCE, players, async || {
        position(c, "op_ctl").await == h
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ledger(c, "op_paused").await.unwrap(),
        ("paused".into(), paused_at),
        "{what}: the paused projector moved\n{}",
        players
            .iter()
            .map(|p| p.log())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        count(c, "SELECT count(*) FROM op_paused_log").await,
        paused_at
    );
    h
}

/// `boot` leaves op_paused paused at `paused_at` (and says so), and boots
/// op_unbooted to the head `h`.
async fn assert_boot_leaves_op_paused_paused(db: &TestDb, c: &Client, paused_at: i64, h: i64) {
    let run = db.run(&["boot"]);
    run.expect(0);
    assert!(
        run.stderr.contains("projector `op_paused` is paused"),
        "{}",
        run.stderr
    );
    assert_eq!(
        ledger(c, "op_paused").await,
        Some(("paused".into(), paused_at))
    );
    assert_eq!(
        count(c, "SELECT count(*) FROM op_paused_log").await,
        paused_at
    );
    assert_eq!(ledger(c, "op_unbooted").await, Some(("live".into(), h)));
}

/// `resume op_paused`: a runner takes it and it catches up; the metrics of
/// `r2` (on `port`) say live again.
async fn assert_resume_lets_op_paused_catch_up(
    db: &TestDb,
    c: &Client,
    port: u16,
    (r2, r3): (&Player, &Player),
) {
    let run = db.run(&["resume", "op_paused"]);
    run.expect(0);
    assert!(
        run.stdout.contains("resumed op_paused: live (was paused)"),
        "{}",
        run.stdout
    );
    let h = add_things(c, 5).await;
    wait_for(
        "op_paused to catch up after resume",
        PATIENCE,
        &[r2, r3],
        async || position(c, "op_paused").await == h,
    )
    .await;
    assert_eq!(ledger(c, "op_paused").await, Some(("live".into(), h)));
    assert_eq!(count(c, "SELECT count(*) FROM op_paused_log").await, h);
    wait_for_sample(
        port,
        "projectionist_state{projector=\"op_paused\",state=\"live\"}",
        1.0,
        &[r2],
    )
    .await;
    let owned = owners(c).await;
    assert!(
        owned.iter().any(|(p, _)| p == "op_paused"),
        "nobody owns op_paused after resume: {owned:?}"
    );
}

/// What cannot be paused or resumed: exit 2, saying why.
async fn assert_pause_and_resume_refuse_what_they_cannot_change(db: &TestDb, c: &Client) {
    db.run(&["pause", "op_paused"]).expect(0);
    let run = db.run(&["pause", "op_paused"]);
    run.expect(2);
    assert!(run.stderr.contains("paused already"), "{}", run.stderr);
    db.run(&["resume", "op_paused"]).expect(0);
    // (op_unbooted was booted above: a projector with no ledger row at all.)
    let extra = logger("op_never", "from_beginning", "op_unbooted_log");
    let manifest = std::fs::read_to_string(db.manifest_path()).unwrap();
    db.write_manifest(&format!("{manifest}\n{extra}"));
    let run = db.run(&["pause", "op_never"]);
    run.expect(2);
    assert!(run.stderr.contains("no ledger row"), "{}", run.stderr);
    let run = db.run(&["resume", "op_ctl"]);
    run.expect(2);
    assert!(run.stderr.contains("it is live"), "{}", run.stderr);
    assert_eq!(ledger(c, "op_ctl").await.unwrap().0, "live");
}

#[tokio::test]
async fn a_paused_projector_stays_paused_across_runners_restarts_and_boot_until_resumed() {
    let db = TestDb::new().await;
    let c = paused_and_control_loggers_booted(&db).await;

    // Runner 1 owns both; runner 2 stands by (and serves metrics).
    let opts = ["--poll", "200ms"];
    let mut r1 = Player::start(&db, "r1", &opts);
    wait_for("runner 1 to own both", PATIENCE, &[&r1], async || {
        owned_by(&c, &r1).await == ["op_ctl", "op_paused"]
    })
    .await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let r2 = Player::start(&db, "r2", &[&opts[..], &["--metrics", &addr]].concat());
    wait_for_sample(
        port,
        "projectionist_state{projector=\"op_paused\",state=\"live\"}",
        1.0,
        &[&r2],
    )
    .await;
    let h = add_things(&c, 10).await;
    wait_for("both at the head", PATIENCE, &[&r1, &r2], async || {
        position(&c, "op_paused").await == h && position(&c, "op_ctl").await == h
    })
    .await;
    assert_eq!(owned_by(&c, &r1).await, ["op_ctl", "op_paused"]);

    let paused_at = h;
    assert_pause_takes_op_paused_out_of_play(&db, &c, paused_at, port, (&r1, &r2)).await;
    assert_only_the_control_plays_new_events(
        &c,
        paused_at,
        "op_ctl to play the new events (two runners)",
        &[&r1, &r2],
    )
    .await;

    // The runner that owned it dies; a new one starts: still paused.
    r1.sigkill();
    let r3 = Player::start(&db, "r3", &opts);
    wait_for(
        "a runner to own op_ctl again",
        PATIENCE,
        &[&r2, &r3],
        async || owners(&c).await.iter().any(|(p, _)| p == "op_ctl"),
    )
    .await;
    wait_for(
        "runner 3 to reach the database",
        PATIENCE,
        &[&r3],
        async || r3.log().contains("playing live projectors"),
    )
    .await;
    let h = assert_only_the_control_plays_new_events(
        &c,
        paused_at,
        "op_ctl to play the new events (after a restart)",
        &[&r2, &r3],
    )
    .await;

    // boot leaves it paused (and says so), and boots the others.
    assert_boot_leaves_op_paused_paused(&db, &c, paused_at, h).await;
    // resume: a runner takes it and it catches up.
    assert_resume_lets_op_paused_catch_up(&db, &c, port, (&r2, &r3)).await;
    assert_pause_and_resume_refuse_what_they_cannot_change(&db, &c).await;
    drop((r2, r3));
}

/// A projector working through a backlog is paused after the batch in
/// flight, not after the backlog: nothing is played once `pause` returns.
#[tokio::test]
async fn pause_of_a_busy_projector_takes_effect_after_the_batch_in_flight() {
    let db = TestDb::new().await;
    // 5 ms an event, 400 events a batch: a batch takes about 2 s, the
    // backlog of 4,000 events about 20 s; between two batches the lock is
    // free for a few milliseconds only.
    let c = thing_store(
        &db,
        true,
        "CREATE TABLE op_busy_log (id bigint PRIMARY KEY)",
        "[projectors.op_busy]\ntables = [\"op_busy_log\"]\n\
         on.Thing = \"INSERT INTO op_busy_log (id) SELECT :position FROM pg_sleep(0.005)\"\n",
    )
    .await;
    add_things(&c, 10).await;
    db.run(&["boot"]).expect(0);
    let play = Player::start(&db, "busy", &["--poll", "200ms", "--batch-size", "400"]);
    let h = add_things(&c, 4_000).await;
    wait_for("op_busy to be busy", PATIENCE, &[&play], async || {
        position(&c, "op_busy").await > 400
    })
    .await;

    let started = Instant::now();
    let run = db.run(&["pause", "op_busy", "--lock-timeout", "8s"]);
    let took = started.elapsed();
    eprintln!(
        "pause of a busy projector: exit {} after {took:?}, at {:?}",
        run.code,
        ledger(&c, "op_busy").await
    );
    run.expect(0);
    let paused_at = position(&c, "op_busy").await;
    assert!(
        took < Duration::from_secs(5),
        "pause took {took:?} (a batch takes about 2 s)"
    );
    assert!(
        paused_at < h,
        "op_busy played its whole backlog before the pause took effect"
    );
    assert_eq!(
        ledger(&c, "op_busy").await,
        Some(("paused".into(), paused_at))
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        ledger(&c, "op_busy").await,
        Some(("paused".into(), paused_at)),
        "a batch was played after the pause\n{}",
        play.log()
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM op_busy_log").await,
        paused_at
    );
    drop(play);
}

// ---------------------------------------------------------------------------
// 4. play's metrics scraped over HTTP while events flow; /healthz follows the
// database.

/// The Thing store without a transaction column (holes are passed by the
/// snapshot rule and recorded).
const STORE_WITHOUT_TX: &str = "[store]\ntable = \"events\"\nposition = \"id\"\ntype = \"name\"\ndata = \"data\"\nstream = \"aggregate_id\"\ntime = \"tstamp\"\n";

/// The metrics once `op_m` has played up to `h` (after a batch of 5 events
/// with a hole): position, events processed and holes passed, and every other
/// series of op_m and of the runner at its settled value.
async fn assert_metrics_after_a_batch_with_a_hole(port: u16, h: i64, play: &Player) {
    // The batch's position, the events it handled and the hole it passed.
    let body = wait_for_metrics(
        port,
        "op_m at the head, 5 events processed and a hole passed, in the metrics",
        &[play],
        |body| {
            sample(body, "projectionist_position{projector=\"op_m\"}") == Some(h as f64)
                && sample(
                    body,
                    "projectionist_events_processed_total{projector=\"op_m\"}",
                ) == Some(5.0)
                && sample(body, "projectionist_holes_passed{projector=\"op_m\"}")
                    .is_some_and(|n| n >= 1.0)
        },
    )
    .await;
    for (series, want) in [
        ("projectionist_lag_events{projector=\"op_m\"}", 0.0),
        ("projectionist_lag_seconds{projector=\"op_m\"}", 0.0),
        (
            "projectionist_state{projector=\"op_m\",state=\"live\"}",
            1.0,
        ),
        (
            "projectionist_state{projector=\"op_m\",state=\"paused\"}",
            0.0,
        ),
        ("projectionist_up", 1.0),
        ("projectionist_owned_projectors", 1.0),
        ("projectionist_late_events{projector=\"op_m\"}", 0.0),
        ("projectionist_dead_letters{projector=\"op_m\"}", 0.0),
        ("projectionist_build_position{projector=\"op_m\"}", 0.0),
        ("projectionist_build_lag_events{projector=\"op_m\"}", 0.0),
    ] {
        assert_eq!(sample(&body, series), Some(want), "{series}\n{body}");
    }
}

/// Waits for `/healthz` to answer 503 once the database is gone or silent:
/// within the session timeout the tests run play with (4 s).
async fn assert_healthz_503_within_the_session_timeout(port: u16, play: &Player, what: &str) {
    let took = wait_for("/healthz to answer 503", PATIENCE, &[play], async || {
        http_get(port, "/healthz")
            .await
            .is_some_and(|(code, _)| code == 503)
    })
    .await;
    eprintln!("/healthz answered 503 {took:?} {what}");
    assert!(
        took < Duration::from_secs(4),
        "/healthz took {took:?} to answer 503 {what} (session timeout 4s)\n{}",
        play.log()
    );
}

/// The server of `cluster` stopped: `/healthz` answers 503 within the
/// session timeout, and the metrics endpoint stays up saying the database is
/// down.
async fn assert_healthz_503_while_the_server_is_stopped(
    cluster: &Cluster,
    port: u16,
    play: &Player,
) {
    cluster.stop_fast();
    assert_healthz_503_within_the_session_timeout(port, play, "after the server stopped").await;
    let body = get_metrics(port)
        .await
        .expect("the metrics endpoint stays up");
    assert_eq!(sample(&body, "projectionist_up"), Some(0.0), "{body}");
}

#[tokio::test]
async fn metrics_over_http_follow_the_run_and_healthz_follows_the_database() {
    let cluster = Cluster::start();
    let db = cluster.test_db().await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE op_m_log (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    db.write_manifest(&format!(
        "{STORE_WITHOUT_TX}\n{}",
        logger("op_m", "from_beginning", "op_m_log")
    ));
    add_things(&c, 20).await;
    db.run(&["boot"]).expect(0);

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let play = Player::start(
        &db,
        "metrics",
        &[
            "--poll",
            "200ms",
            "--metrics",
            &addr,
            "--session-timeout",
            "4s",
        ],
    );
    // A rolled-back insert: a hole play passes (and records).
    c.batch_execute("BEGIN").await.unwrap();
    add_things(&c, 1).await;
    c.batch_execute("ROLLBACK").await.unwrap();
    let h = add_things(&c, 5).await;
    assert_eq!(h, 26);
    assert_metrics_after_a_batch_with_a_hole(port, h, &play).await;

    // More events: the counter grows by them between two scrapes.
    let h = add_things(&c, 7).await;
    wait_for_metrics(
        port,
        "op_m at the head and 5 + 7 events processed, in the metrics",
        &[&play],
        |body| {
            sample(body, "projectionist_position{projector=\"op_m\"}") == Some(h as f64)
                && sample(
                    body,
                    "projectionist_events_processed_total{projector=\"op_m\"}",
                ) == Some(12.0)
        },
    )
    .await;

    assert_eq!(http_get(port, "/healthz").await, Some((200, "ok\n".into())));

    // The database goes away: 503 within the session timeout.
    assert_healthz_503_while_the_server_is_stopped(&cluster, port, &play).await;

    // Back: 200 again, and play goes on.
    cluster.start_again();
    let back = Instant::now();
    wait_for(
        "/healthz to answer 200 again",
        PATIENCE,
        &[&play],
        async || http_get(port, "/healthz").await == Some((200, "ok\n".into())),
    )
    .await;
    eprintln!(
        "/healthz answered 200 {:?} after the server started",
        back.elapsed()
    );
    let h = add_things(&db.client().await, 3).await;
    wait_for_sample(
        port,
        "projectionist_position{projector=\"op_m\"}",
        h as f64,
        &[&play],
    )
    .await;
    wait_for_sample(port, "projectionist_up", 1.0, &[&play]).await;
    drop(play);
}

/// A silent database (the network to it frozen: sockets open, nothing
/// answers) is as gone as a stopped one: 503 within the session timeout.
#[tokio::test]
async fn healthz_answers_503_within_the_session_timeout_when_the_network_freezes() {
    let db = TestDb::new().await;
    let c = thing_store(
        &db,
        false,
        "CREATE TABLE op_h_log (id bigint PRIMARY KEY)",
        &logger("op_h", "from_beginning", "op_h_log"),
    )
    .await;
    add_things(&c, 10).await;
    db.run(&["boot"]).expect(0);
    let proxy = Proxy::start(server_addr(&db.url));
    let url = proxy.url_for(&db.url);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let play = Player::start(
        &db,
        "healthz",
        &[
            "--database-url",
            &url,
            "--poll",
            "200ms",
            "--metrics",
            &addr,
            "--session-timeout",
            "4s",
        ],
    );
    let h = add_things(&c, 5).await;
    wait_for_sample(
        port,
        "projectionist_position{projector=\"op_h\"}",
        h as f64,
        &[&play],
    )
    .await;
    assert_eq!(http_get(port, "/healthz").await, Some((200, "ok\n".into())));

    proxy.freeze();
    assert_healthz_503_within_the_session_timeout(port, &play, "after the freeze").await;

    proxy.resume();
    let back = wait_for(
        "/healthz to answer 200 again",
        PATIENCE,
        &[&play],
        async || http_get(port, "/healthz").await == Some((200, "ok\n".into())),
    )
    .await;
    eprintln!("/healthz answered 200 {back:?} after the network came back");
    let h = add_things(&c, 3).await;
    wait_for(
        "op_h to play the new events",
        PATIENCE,
        &[&play],
        async || position(&c, "op_h").await == h,
    )
    .await;
    drop(play);
}

// ---------------------------------------------------------------------------
// 5. The Grafana dashboard queries what a running play exports.

/// The PromQL of the dashboard: every `expr`, and the variables' `query` and
/// `definition`.
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| dashboard_queries(i, out)),
        _ => {}
    }
}

/// The `projectionist_*` metric names in `queries`.
fn metric_names(queries: &[String]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for q in queries {
        let mut rest = q.as_str();
        while let Some(at) = rest.find("projectionist_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

#[tokio::test]
async fn every_metric_the_grafana_dashboard_queries_has_a_series_in_a_running_play() {
    let path = root().join("deploy/grafana/projectionist.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let names = metric_names(&queries);
    assert!(names.len() >= 10, "{names:?} from {queries:#?}");

    // One projector of each kind, and one that fails (so failures_total and
    // dead_letters have a series of their own).
    let db = TestDb::new().await;
    let c = thing_store(
        &db,
        true,
        "CREATE TABLE op_d_log (id bigint PRIMARY KEY); \
         CREATE TABLE op_d_skip_log (id bigint PRIMARY KEY, v int CHECK (v >= 0))",
        "",
    )
    .await;
    things_manifest(
        &db,
        &format!(
            "{}[projectors.op_d_skip]\non_error = \"skip\"\ntables = [\"op_d_skip_log\"]\n\
             on.Thing = \"INSERT INTO op_d_skip_log (id, v) VALUES (:position, :data.i::int)\"\n\n{}",
            logger("op_d_sql", "from_beginning", "op_d_log"),
            consumer(&db, "op_d_cmd", "\"RECORD_FILE=record.txt\",", ""),
        ),
    );
    add_things(&c, 10).await;
    db.run(&["boot"]).expect(0);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let play = Player::start(&db, "dashboard", &["--poll", "200ms", "--metrics", &addr]);
    add_things(&c, 5).await;
    add_event(&c, "Thing", json!({"i": -1})).await;
    let h = add_things(&c, 5).await;
    let body = wait_for_metrics(
        port,
        "the failure counted, the dead letter waiting and every projector at the head, in the metrics",
        &[&play],
        |body| {
            sample(body, "projectionist_failures_total{projector=\"op_d_skip\"}") == Some(1.0)
                && sample(body, "projectionist_dead_letters{projector=\"op_d_skip\"}")
                    == Some(1.0)
                && ["op_d_sql", "op_d_skip", "op_d_cmd"].iter().all(|p| {
                    sample(body, &format!("projectionist_position{{projector=\"{p}\"}}"))
                        == Some(h as f64)
                })
        },
    )
    .await;
    let series: BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    eprintln!("the dashboard queries {names:?}");
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !series.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which have no series in play's /metrics:\n{body}"
    );
    // The setup gives every family play exports a series (so the check above
    // would see a name the dashboard got wrong).
    for l in body.lines() {
        let Some(family) = l.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut w = family.split(' ');
        let (name, kind) = (w.next().unwrap(), w.next().unwrap_or(""));
        let sampled = if kind == "counter" {
            format!("{name}_total")
        } else {
            name.to_string()
        };
        assert!(
            series.contains(sampled.as_str()),
            "family {name} has no series:\n{body}"
        );
    }
    drop(play);
}

// ---------------------------------------------------------------------------
// 6. A rebuild replays every event: the dead letters of the read model it
// replaces are not waiting any more.

#[tokio::test]
async fn a_rebuild_that_applies_a_dead_letters_event_leaves_nothing_to_retry() {
    let db = TestDb::new().await;
    // A log without a key: applying an event twice shows as a second row.
    let c = thing_store(
        &db,
        true,
        "CREATE TABLE op_r_log (id bigint, v int CONSTRAINT op_r_positive CHECK (v >= 0))",
        "[projectors.op_r]\non_error = \"skip\"\ntables = [\"op_r_log\"]\n\
         on.Thing = \"INSERT INTO op_r_log (id, v) VALUES (:position, :data.i::int)\"\n",
    )
    .await;
    add_things(&c, 10).await;
    db.run(&["boot"]).expect(0);
    let play = Player::start(&db, "rebuild", &["--poll", "200ms"]);
    let poison = add_event(&c, "Thing", json!({"i": -1})).await;
    let h = add_things(&c, 5).await;
    wait_for("op_r past the poison", PATIENCE, &[&play], async || {
        position(&c, "op_r").await == h
    })
    .await;
    assert_eq!(status_of(&db, "op_r")["dead_letters"], json!(1));
    drop(play);

    // The cause fixed, the projector rebuilt from scratch: the poison event is
    // applied by the replay.
    c.batch_execute("ALTER TABLE op_r_log DROP CONSTRAINT op_r_positive")
        .await
        .unwrap();
    db.run(&["reset", "op_r", "--yes"]).expect(0);
    assert_eq!(
        count(&c, "SELECT count(*) FROM op_r_log").await,
        h,
        "the rebuild applies every event once"
    );
    assert_eq!(
        count(
            &c,
            &format!("SELECT count(*) FROM op_r_log WHERE id = {poison}")
        )
        .await,
        1
    );

    // Nothing is waiting any more: status does not ask for a retry, and a
    // retry does not apply the event a second time.
    let status = db.run(&["status"]);
    status.expect(0);
    assert_eq!(
        status_of(&db, "op_r")["dead_letters"],
        json!(0),
        "the dead letter of the replaced read model is still waiting after the rebuild applied its event\n{}",
        status.stdout
    );
    db.run(&["retry", "op_r"]).expect(0);
    assert_eq!(
        count(
            &c,
            &format!("SELECT count(*) FROM op_r_log WHERE id = {poison}")
        )
        .await,
        1,
        "retry applied the event the rebuild had applied already"
    );
}
