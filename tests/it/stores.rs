//! Event stores as real libraries lay them out, and every store shape the
//! manifest's `[store]` accepts, end to end against a real PostgreSQL:
//!
//! 1. the layouts of Message DB, Emmett, pgmq and Python eventsourcing
//!    (`tests/fixtures/stores/`, mapped as their README says), appended to
//!    the way each library appends, projected by an SQL projector and a
//!    command projector through boot, play, status, verify and reset;
//! 2. a matrix of store shapes: with and without a transaction column, a
//!    stream, metadata (read by a handler through `:metadata.x`) and notify;
//!    time as timestamptz, as UTC `timestamp` and absent; a plain table, a
//!    partitioned table, an inheritance parent, a view; payloads as jsonb,
//!    json, text and bytea. Command projectors on stores without a
//!    transaction column are covered (they once failed with 42P18, "could not
//!    determine data type of parameter $1");
//! 3. gap safety without a transaction column on each kind of relation: a
//!    running writer holding a position is waited for (and a slow single
//!    INSERT statement, which has only a virtual transaction id), a
//!    rolled-back insert is passed at once and recorded; a position filled
//!    while a reader waits on it is not a passed hole, nor a late event;
//! 4. store problems reported at the value of the key at fault.
//!
//! What the projectors must have done is computed here with SQL over the
//! store's own columns (never with projectionist's expressions): the SQL
//! projector `{p}_sql` writes one row per handled event into `{p}_log` and a
//! count per stream into `{p}_counts`; the command projector `{p}_cmd` is
//! [`CONSUMER`], which records every event it receives whole. Every database
//! runs in the Asia/Kolkata time zone (UTC+05:30), so a `timestamp` read as
//! local time instead of UTC shows. Projector names differ between tests
//! (play's owner locks are advisory locks, visible server-wide).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::harness::*;

/// The command projectors' program: appends every event it receives, whole,
/// as a JSON line to `$RECORD_FILE`, and acknowledges each checkpoint once
/// the lines are flushed. (`tests/fixtures/recorder.py` keeps only position,
/// type and time; these tests compare streams, payloads and metadata too.)
const CONSUMER: &str = r#"import json, os, sys
out = open(os.environ["RECORD_FILE"], "a")
for line in sys.stdin:
    msg = json.loads(line)
    if "checkpoint" in msg:
        out.flush()
        print(json.dumps({"ack": msg["checkpoint"]}), flush=True)
    else:
        out.write(json.dumps(msg) + "\n")
"#;

// ---------------------------------------------------------------------------
// A store under test, its two projectors, and what they must have done.

/// A store and the projectors over it.
struct Case {
    /// Prefix of the projectors' and their tables' names.
    p: String,
    /// The `[store]` section.
    store: String,
    /// The event types `{p}_sql` handles (`{p}_cmd` gets every event).
    handled: Vec<&'static str>,
    /// The placeholder expression `{p}_sql` writes into `{p}_log.note`.
    note: String,
    /// The placeholder expression `{p}_sql` counts by in `{p}_counts`.
    key: String,
    /// The store's events (filtered rows left out), written by hand over the
    /// store's own columns: pos bigint, typ text, stream text, tm timestamptz,
    /// data jsonb, meta jsonb, note text (what `note` must give) and k text
    /// (what `key` must give).
    events: String,
    /// The newest position of the store, events or not.
    head: String,
    /// The store notifies: play polls every 30 s and must be woken.
    notify: bool,
}

impl Case {
    fn sql(&self) -> String {
        format!("{}_sql", self.p)
    }

    fn cmd(&self) -> String {
        format!("{}_cmd", self.p)
    }

    fn record(&self) -> String {
        format!("{}_cmd.jsonl", self.p)
    }

    fn handled_list(&self) -> String {
        self.handled
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn manifest(&self) -> String {
        let p = &self.p;
        let handler = format!(
            "[\n  '''INSERT INTO {p}_log VALUES (:position, :type, :stream, :time, :data, :metadata, {})''',\n  \
             '''INSERT INTO {p}_counts AS c VALUES ({}, 1) ON CONFLICT (k) DO UPDATE SET n = c.n + 1''',\n]",
            self.note, self.key
        );
        let mut m = format!(
            "{}\n[projectors.{p}_sql]\ntables = [\"{p}_log\", \"{p}_counts\"]\n",
            self.store
        );
        for t in &self.handled {
            m.push_str(&format!("on.\"{t}\" = {handler}\n"));
        }
        let (ev, h) = (&self.events, self.handled_list());
        m.push_str(&format!(
            "\n[[projectors.{p}_sql.check]]\nname = \"a row per handled event\"\n\
             projection = '''SELECT count(*), coalesce(sum(position), 0)::bigint FROM {p}_log'''\n\
             events = '''SELECT count(*), coalesce(sum(pos), 0)::bigint FROM ({ev}) e WHERE pos <= :position AND typ IN ({h})'''\n\
             \n[[projectors.{p}_sql.check]]\nname = \"a count per stream\"\n\
             projection = '''SELECT k, n FROM {p}_counts'''\n\
             events = '''SELECT k, count(*) FROM ({ev}) e WHERE pos <= :position AND typ IN ({h}) GROUP BY k'''\n\
             \n[projectors.{p}_cmd]\ncommand = [\"env\", \"RECORD_FILE={}\", \"python3\", \"consumer.py\"]\n",
            self.record()
        ));
        m
    }
}

/// Runs the test database in a time zone that is not UTC (new sessions).
async fn in_kolkata(db: &TestDb) {
    db.client()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} SET timezone TO 'Asia/Kolkata'",
            db.name
        ))
        .await
        .unwrap();
}

/// The read-model tables, the consumer and the manifest of `case`.
async fn prepare(db: &TestDb, case: &Case) -> Client {
    let c = db.client().await;
    let p = &case.p;
    c.batch_execute(&format!(
        "CREATE TABLE {p}_log (position bigint PRIMARY KEY, type text NOT NULL, stream text, \
           time timestamptz, data jsonb, meta jsonb, note text); \
         CREATE TABLE {p}_counts (k text PRIMARY KEY, n bigint NOT NULL)"
    ))
    .await
    .unwrap();
    std::fs::write(db.dir.path().join("consumer.py"), CONSUMER).unwrap();
    db.write_manifest(&case.manifest());
    c
}

/// The single text column of `sql`'s rows.
async fn texts(c: &Client, sql: &str) -> Vec<String> {
    c.query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn positions(c: &Client, sql: &str) -> Vec<i64> {
    c.query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `{p}_log`, row by row.
async fn log_rows(c: &Client, case: &Case) -> Vec<String> {
    texts(
        c,
        &format!(
            "SELECT row(position, type, stream, time, data, meta, note)::text FROM {}_log ORDER BY position",
            case.p
        ),
    )
    .await
}

/// `{p}_counts`, row by row.
async fn count_rows(c: &Client, case: &Case) -> Vec<String> {
    texts(
        c,
        &format!("SELECT row(k, n)::text FROM {}_counts ORDER BY k", case.p),
    )
    .await
}

/// The events the command projector received, in order (time as microseconds).
fn received(db: &TestDb, case: &Case) -> Vec<Value> {
    std::fs::read_to_string(db.dir.path().join(case.record()))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("recorded line {l}: {e}"));
            if let Some(t) = v["time"].as_str() {
                let t = chrono::DateTime::parse_from_rfc3339(t)
                    .unwrap_or_else(|e| panic!("time {t} is not RFC 3339: {e}"));
                v["time"] = json!(t.timestamp_micros());
            }
            v
        })
        .collect()
}

/// The positions the command projector received, in order.
fn received_positions(db: &TestDb, case: &Case) -> Vec<i64> {
    received(db, case)
        .iter()
        .map(|v| v["position"].as_i64().unwrap())
        .collect()
}

/// Asserts what both projectors did equals what the store's events say, and
/// that both are live at the head.
async fn assert_projected(db: &TestDb, case: &Case, when: &str) {
    let c = db.client().await;
    let (ev, h) = (&case.events, case.handled_list());
    let want_log = texts(
        &c,
        &format!(
            "SELECT row(pos::bigint, typ::text, stream::text, tm::timestamptz, data::jsonb, meta::jsonb, note::text)::text \
             FROM ({ev}) e WHERE typ IN ({h}) ORDER BY pos"
        ),
    )
    .await;
    assert!(
        !want_log.is_empty(),
        "{when}: the store holds no handled event"
    );
    assert_eq!(
        log_rows(&c, case).await,
        want_log,
        "{when}: {}_log is not one row per handled event of the store",
        case.p
    );
    let want_counts = texts(
        &c,
        &format!(
            "SELECT row(k::text, count(*))::text FROM ({ev}) e WHERE typ IN ({h}) GROUP BY k ORDER BY k"
        ),
    )
    .await;
    assert_eq!(
        count_rows(&c, case).await,
        want_counts,
        "{when}: {}_counts",
        case.p
    );
    let want_events: Vec<Value> = c
        .query(
            &format!(
                "SELECT jsonb_build_object('position', pos, 'type', typ, 'stream', stream, \
                   'time', (extract(epoch FROM tm) * 1000000)::bigint, 'data', data, 'metadata', meta) \
                 FROM ({ev}) e ORDER BY pos"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        received(db, case),
        want_events,
        "{when}: {} did not receive exactly the store's events, in order",
        case.cmd()
    );
    let head = count(&c, &case.head).await;
    for name in [case.sql(), case.cmd()] {
        assert_eq!(
            ledger(&c, &name).await,
            Some(("live".to_string(), head)),
            "{when}: {name} is not live at the head"
        );
    }
}

/// The whole life of `case`'s projectors: `append(client, 0)` before boot,
/// `append(client, 1)` while play runs; then status, verify and reset.
async fn exercise(db: &TestDb, case: &Case, append: impl AsyncFn(&Client, u32)) {
    let c = prepare(db, case).await;
    append(&c, 0).await;
    db.run(&["boot", "--writer-wait", "10s"]).expect(0);
    assert_projected(db, case, "after boot").await;

    // play: near-time with notify (its poll is 30 s), else by a short poll.
    let poll = if case.notify { "30s" } else { "200ms" };
    let mut play = Player::start(db, &case.p, &["--poll", poll]);
    wait_for(
        "play to own both projectors",
        PATIENCE,
        &[&play],
        async || owned_by(&c, &play).await == [case.cmd(), case.sql()],
    )
    .await;
    if case.notify {
        wait_for("play to LISTEN", PATIENCE, &[&play], async || {
            count(
                &c,
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND query LIKE 'LISTEN %'",
            )
            .await
                == 1
        })
        .await;
    }
    append(&c, 1).await;
    let head = count(&c, &case.head).await;
    let took = wait_for("play to reach the head", PATIENCE, &[&play], async || {
        position(&c, &case.sql()).await == head && position(&c, &case.cmd()).await == head
    })
    .await;
    // Without the notification, nothing would wake play for many seconds.
    assert!(
        !case.notify || took < Duration::from_secs(5),
        "with NOTIFY (and a 30 s poll) the new events took {took:?}\n{}",
        play.log()
    );
    play.stop();
    assert_projected(db, case, "after play").await;

    // status: healthy, both live at the head.
    db.run(&["status"]).expect(0);
    let run = db.run(&["status", "--json"]);
    run.expect(0);
    let status: Value = serde_json::from_str(&run.stdout).unwrap();
    for name in [case.sql(), case.cmd()] {
        let p = status["projectors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name.as_str())
            .unwrap_or_else(|| panic!("status --json has no {name}: {}", run.stdout));
        assert_eq!(p["state"], "live", "{name}: {p}");
        assert_eq!(p["lag"], 0, "{name}: {p}");
    }

    // verify: both checks (they use :position) compare equal.
    db.run(&["verify"]).expect(0);
    let run = db.run(&["verify", "--json"]);
    run.expect(0);
    let verify: Value = serde_json::from_str(&run.stdout).unwrap();
    let checks = verify["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 2, "{}", run.stdout);
    for check in checks {
        assert_eq!(check["result"], "ok", "{check}");
    }

    // A damaged read model: verify finds it, reset rebuilds the same tables
    // from the events; the command projector gets every event once more.
    let (log, counts) = (log_rows(&c, case).await, count_rows(&c, case).await);
    c.batch_execute(&format!(
        "DELETE FROM {p}_log WHERE position = (SELECT min(position) FROM {p}_log); \
         UPDATE {p}_counts SET n = n + 100",
        p = case.p
    ))
    .await
    .unwrap();
    db.run(&["verify"]).expect(1);
    db.run(&["reset", &case.sql(), "--yes"]).expect(0);
    assert_eq!(log_rows(&c, case).await, log, "{}_log after reset", case.p);
    assert_eq!(
        count_rows(&c, case).await,
        counts,
        "{}_counts after reset",
        case.p
    );
    std::fs::remove_file(db.dir.path().join(case.record())).unwrap();
    db.run(&["reset", &case.cmd(), "--yes"]).expect(0);
    assert_projected(db, case, "after reset").await;
    db.run(&["verify"]).expect(0);
}

// ---------------------------------------------------------------------------
// 1. Real event-store layouts (tests/fixtures/stores/).

/// Runs a fixture with psql, as its README says.
fn load_fixture(db: &TestDb, file: &str) {
    let out = Command::new("psql")
        .arg(&db.url)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(root().join("tests/fixtures/stores").join(file))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh database holding only the library's tables, and the ledger.
async fn library_db(fixture: &str) -> TestDb {
    let db = TestDb::empty().await;
    in_kolkata(&db).await;
    load_fixture(&db, fixture);
    let run = db.run(&["migrate"]);
    run.expect(0);
    assert!(
        run.stdout.contains("applied ledger migration V1__ledger"),
        "{}",
        run.stdout
    );
    db
}

/// Message DB's write_message: the category's advisory lock, the stream's
/// next position, the insert (global_position and time from the defaults).
async fn message_db_write(
    c: &Client,
    stream: &str,
    event_type: &str,
    data: Option<Value>,
    metadata: Option<Value>,
) {
    c.batch_execute("BEGIN").await.unwrap();
    c.execute(
        "SELECT pg_advisory_xact_lock(left('x' || md5(split_part($1::text, '-', 1)), 17)::bit(64)::bigint)",
        &[&stream],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO message_store.messages (id, stream_name, position, type, data, metadata) \
         VALUES (gen_random_uuid(), $1::text, \
           (SELECT coalesce(max(position), -1) + 1 FROM message_store.messages WHERE stream_name = $1::text), \
           $2, $3, $4)",
        &[&stream, &event_type, &data, &metadata],
    )
    .await
    .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
}

async fn message_db_round(c: &Client, round: u32) {
    let meta = |user: &str| Some(json!({"correlationStreamName": "transfer-7", "user": user}));
    let w = async |stream: &str, t: &str, data: Option<Value>, m: Option<Value>| {
        message_db_write(c, stream, t, data, m).await
    };
    if round == 0 {
        w(
            "account-1",
            "Opened",
            Some(json!({"owner": "Ada"})),
            meta("u1"),
        )
        .await;
        w(
            "account-1",
            "Deposited",
            Some(json!({"amount": 10})),
            meta("u1"),
        )
        .await;
        w("account-2", "Opened", Some(json!({"owner": "Bö 🎻"})), None).await;
        w(
            "transfer-7",
            "Initiated",
            Some(json!({"amount": 5})),
            meta("u2"),
        )
        .await;
        w(
            "account-1",
            "Withdrawn",
            Some(json!({"amount": 5})),
            meta("u2"),
        )
        .await;
        w("account-2", "Deposited", None, meta("u1")).await;
        w("account-2", "Deposited", Some(json!({"amount": 3})), None).await;
    } else {
        w(
            "account-3",
            "Opened",
            Some(json!({"owner": "Cy"})),
            meta("u3"),
        )
        .await;
        w("transfer-7", "Completed", Some(json!({})), meta("u2")).await;
        w(
            "account-3",
            "Deposited",
            Some(json!({"amount": 99})),
            meta("u3"),
        )
        .await;
        w("account-2", "Withdrawn", Some(json!({"amount": 1})), None).await;
    }
}

#[tokio::test]
async fn message_db_layout_is_projected_through_boot_play_status_verify_and_reset() {
    let db = library_db("message_db.sql").await;
    let case = Case {
        p: "mdb".into(),
        store: "[store]\ntable = \"message_store.messages\"\nposition = \"global_position\"\ntype = \"type\"\n\
                data = \"data\"\nstream = \"stream_name\"\ntime = \"time\"\nmetadata = \"metadata\"\n"
            .into(),
        handled: vec!["Opened", "Deposited", "Withdrawn"],
        note: ":data.amount".into(),
        key: ":stream".into(),
        // time: timestamp without time zone holding UTC.
        events: "SELECT global_position AS pos, type AS typ, stream_name AS stream, \
                 \"time\" AT TIME ZONE 'UTC' AS tm, data, metadata AS meta, data->>'amount' AS note, \
                 stream_name AS k FROM message_store.messages"
            .into(),
        head: "SELECT max(global_position) FROM message_store.messages".into(),
        notify: false,
    };
    exercise(&db, &case, message_db_round).await;
}

/// Emmett's appendToStream: the stream's row (inserted, or moved on from the
/// expected position), then its messages with transaction_id =
/// pg_current_xact_id(), in one transaction.
async fn emmett_append(
    c: &Client,
    stream: &str,
    kind: &str,
    archived: bool,
    messages: &[(&str, Value)],
) {
    c.batch_execute("BEGIN").await.unwrap();
    let n = messages.len() as i64;
    let current: Option<i64> = c
        .query_opt(
            "SELECT stream_position FROM emt_streams \
             WHERE stream_id = $1 AND partition = 'emt:default' AND is_archived = $2",
            &[&stream, &archived],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    match current {
        None => {
            c.execute(
                "INSERT INTO emt_streams (stream_id, stream_position, partition, stream_type, stream_metadata, is_archived) \
                 VALUES ($1, $2, 'emt:default', 'shopping_cart', '{}', $3)",
                &[&stream, &n, &archived],
            )
            .await
            .unwrap();
        }
        Some(expected) => {
            let moved = c
                .execute(
                    "UPDATE emt_streams SET stream_position = $2 WHERE stream_id = $1 AND stream_position = $3 \
                     AND partition = 'emt:default' AND is_archived = $4",
                    &[&stream, &(expected + n), &expected, &archived],
                )
                .await
                .unwrap();
            assert_eq!(moved, 1);
        }
    }
    let first = current.unwrap_or(0) + 1;
    for (i, (event_type, data)) in messages.iter().enumerate() {
        c.execute(
            "INSERT INTO emt_messages (stream_id, stream_position, partition, message_data, message_metadata, \
               message_schema_version, message_type, message_kind, message_id, transaction_id, is_archived) \
             VALUES ($1, $2, 'emt:default', $3, $4, '1', $5, $6, gen_random_uuid()::text, pg_current_xact_id(), $7)",
            &[
                &stream,
                &(first + i as i64),
                data,
                &json!({"correlationId": format!("c-{stream}"), "user": "u1"}),
                event_type,
                &kind,
                &archived,
            ],
        )
        .await
        .unwrap();
    }
    c.batch_execute("COMMIT").await.unwrap();
}

async fn emmett_round(c: &Client, round: u32) {
    let added = |p: &str, q: i64| ("ProductItemAdded", json!({"productId": p, "quantity": q}));
    if round == 0 {
        emmett_append(c, "cart-1", "E", false, &[added("p-1", 2), added("p-2", 1)]).await;
        emmett_append(c, "cart-2", "E", false, &[added("p-3", 5)]).await;
        // An archived stream's events and a command: not events for projectors.
        emmett_append(
            c,
            "cart-old",
            "E",
            true,
            &[added("p-9", 9), ("ShoppingCartConfirmed", json!({}))],
        )
        .await;
        emmett_append(
            c,
            "cart-2",
            "C",
            false,
            &[("AddProductItem", json!({"productId": "p-4", "quantity": 1}))],
        )
        .await;
        emmett_append(
            c,
            "cart-1",
            "E",
            false,
            &[
                ("DiscountApplied", json!({"percent": 10})),
                (
                    "ProductItemRemoved",
                    json!({"productId": "p-2", "quantity": 1}),
                ),
            ],
        )
        .await;
    } else {
        emmett_append(
            c,
            "cart-3",
            "E",
            false,
            &[added("p-5", 3), ("ShoppingCartConfirmed", json!({}))],
        )
        .await;
        emmett_append(c, "cart-gone", "E", true, &[added("p-6", 6)]).await;
        emmett_append(
            c,
            "cart-1",
            "E",
            false,
            &[("ShoppingCartConfirmed", json!({}))],
        )
        .await;
        // The newest row is a command.
        emmett_append(
            c,
            "cart-2",
            "C",
            false,
            &[("ConfirmShoppingCart", json!({}))],
        )
        .await;
    }
}

#[tokio::test]
async fn emmett_layout_is_projected_without_archived_rows_and_commands() {
    let db = library_db("emmett.sql").await;
    let case = Case {
        p: "emt".into(),
        store: "[store]\ntable = \"emt_messages\"\nposition = \"global_position\"\ntype = \"message_type\"\n\
                data = \"message_data\"\nstream = \"stream_id\"\ntime = \"created\"\nmetadata = \"message_metadata\"\n\
                transaction = \"transaction_id\"\nfilter = \"is_archived = FALSE AND message_kind = 'E'\"\n"
            .into(),
        handled: vec![
            "ProductItemAdded",
            "ProductItemRemoved",
            "ShoppingCartConfirmed",
        ],
        note: ":data.quantity".into(),
        key: ":stream".into(),
        events: "SELECT global_position AS pos, message_type AS typ, stream_id AS stream, created AS tm, \
                 message_data AS data, message_metadata AS meta, message_data->>'quantity' AS note, stream_id AS k \
                 FROM emt_messages WHERE NOT is_archived AND message_kind = 'E'"
            .into(),
        head: "SELECT max(global_position) FROM emt_messages".into(),
        notify: false,
    };
    exercise(&db, &case, emmett_round).await;
    // The filter did skip something: archived events of handled types, commands.
    let c = db.client().await;
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM emt_messages WHERE is_archived OR message_kind = 'C'"
        )
        .await,
        5
    );
}

/// pgmq.send / pgmq.send_batch: one statement, no lock.
async fn pgmq_send(c: &Client, messages: &[(Value, Option<Value>)]) -> Vec<i64> {
    let (m, h): (Vec<Value>, Vec<Option<Value>>) = messages.iter().cloned().unzip();
    positions_of(
        c.query(
            "INSERT INTO pgmq.q_events (vt, message, headers) \
             SELECT clock_timestamp(), unnest($1::jsonb[]), unnest($2::jsonb[]) RETURNING msg_id",
            &[&m, &h],
        )
        .await
        .unwrap(),
    )
}

fn positions_of(rows: Vec<tokio_postgres::Row>) -> Vec<i64> {
    rows.iter().map(|r| r.get(0)).collect()
}

/// What pgmq.read does to the rows it hands out.
async fn pgmq_read(c: &Client, ids: &[i64]) {
    c.execute(
        "UPDATE pgmq.q_events SET vt = clock_timestamp() + interval '30 seconds', read_ct = read_ct + 1, \
           last_read_at = clock_timestamp() WHERE msg_id = ANY($1)",
        &[&ids],
    )
    .await
    .unwrap();
}

async fn pgmq_round(c: &Client, round: u32) {
    let order = |t: &str, id: i64| json!({"type": t, "order_id": id});
    let group = |id: i64| Some(json!({"x-pgmq-group": format!("order-{id}")}));
    if round == 0 {
        pgmq_send(c, &[(order("OrderPlaced", 1), group(1))]).await;
        let batch = pgmq_send(
            c,
            &[
                (order("OrderPlaced", 2), group(2)),
                (order("OrderPaid", 1), group(1)),
                (json!({"type": "Ping"}), None),
                (order("OrderPaid", 1), group(1)),
            ],
        )
        .await;
        pgmq_send(c, &[(order("OrderShipped", 1), None)]).await;
        pgmq_read(c, &batch[..2]).await;
        // pgmq.archive: the row moves to a_events (a hole in q_events).
        c.execute(
            "WITH a AS (DELETE FROM pgmq.q_events WHERE msg_id = $1 RETURNING *) \
             INSERT INTO pgmq.a_events (msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers) \
             SELECT msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers FROM a",
            &[&batch[1]],
        )
        .await
        .unwrap();
    } else {
        let batch = pgmq_send(
            c,
            &[
                (order("OrderPaid", 2), group(2)),
                (order("OrderShipped", 2), group(2)),
            ],
        )
        .await;
        pgmq_read(c, &batch).await;
        pgmq_send(c, &[(json!({"type": "Ping"}), group(2))]).await;
    }
}

#[tokio::test]
async fn pgmq_layout_is_projected_with_the_type_inside_the_payload() {
    let db = library_db("pgmq.sql").await;
    let case = Case {
        p: "pgmq".into(),
        store: "[store]\ntable = \"pgmq.q_events\"\nposition = \"msg_id\"\ntype = \"message->>'type'\"\n\
                data = \"message\"\ntime = \"enqueued_at\"\nmetadata = \"headers\"\n"
            .into(),
        handled: vec!["OrderPlaced", "OrderPaid", "OrderShipped"],
        note: ":data.order_id".into(),
        key: "coalesce(:metadata->>'x-pgmq-group', 'none')".into(),
        events: "SELECT msg_id AS pos, message->>'type' AS typ, NULL::text AS stream, enqueued_at AS tm, \
                 message AS data, headers AS meta, message->>'order_id' AS note, \
                 coalesce(headers->>'x-pgmq-group', 'none') AS k FROM pgmq.q_events"
            .into(),
        head: "SELECT max(msg_id) FROM pgmq.q_events".into(),
        notify: false,
    };
    exercise(&db, &case, pgmq_round).await;
}

/// eventsourcing's PostgresApplicationRecorder.insert_events: lock the table,
/// NOTIFY, insert the unnested stored_event_uuid[] (state: UTF-8 JSON in
/// bytea), in one transaction.
async fn eventsourcing_insert(c: &Client, events: &[(&str, i64, &str, Value)]) {
    c.batch_execute(
        "BEGIN; SET LOCAL lock_timeout = '0s'; \
         LOCK TABLE \"public\".\"stored_events\" IN EXCLUSIVE MODE; NOTIFY \"stored_events\"",
    )
    .await
    .unwrap();
    let ids: Vec<String> = events.iter().map(|e| e.0.to_string()).collect();
    let versions: Vec<i64> = events.iter().map(|e| e.1).collect();
    let topics: Vec<String> = events.iter().map(|e| e.2.to_string()).collect();
    let states: Vec<String> = events
        .iter()
        .map(|e| {
            let mut s = e.3.clone();
            s["timestamp"] =
                json!({"_type_": "datetime_iso", "_data_": "2024-01-01T00:00:00+00:00"});
            s.to_string()
        })
        .collect();
    c.execute(
        "INSERT INTO \"public\".\"stored_events\" AS t (originator_id, originator_version, topic, state) \
         SELECT originator_id, originator_version, topic, state FROM unnest(ARRAY( \
           SELECT ROW(o::uuid, v, tp, convert_to(s, 'UTF8'))::\"public\".\"stored_event_uuid\" \
           FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[]) WITH ORDINALITY AS x(o, v, tp, s, n) \
           ORDER BY n)) RETURNING notification_id",
        &[&ids, &versions, &topics, &states],
    )
    .await
    .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
}

async fn eventsourcing_round(c: &Client, round: u32) {
    const A1: &str = "6f9619ff-8b86-d011-b42d-00cf4fc964ff";
    const A2: &str = "0e7ec0d5-2d6d-4b6c-9f0e-7b5c1f0a9d11";
    const A3: &str = "a8098c1a-f86e-11da-bd1a-00112444be1e";
    const CREATED: &str = "bank.domain:Account.Created";
    const CREDITED: &str = "bank.domain:Account.Credited";
    const DEBITED: &str = "bank.domain:Account.Debited";
    const CLOSED: &str = "bank.domain:Account.Closed";
    if round == 0 {
        eventsourcing_insert(
            c,
            &[
                (A1, 1, CREATED, json!({"full_name": "Ada Lovelace"})),
                (A1, 2, CREDITED, json!({"amount": 100})),
            ],
        )
        .await;
        eventsourcing_insert(
            c,
            &[
                (A2, 1, CREATED, json!({"full_name": "Bö 🎻 Ünïcode"})),
                (A2, 2, CREDITED, json!({"amount": 50})),
                (A2, 3, DEBITED, json!({"amount": 20})),
            ],
        )
        .await;
        eventsourcing_insert(c, &[(A1, 3, DEBITED, json!({"amount": 30}))]).await;
        eventsourcing_insert(c, &[(A2, 4, CLOSED, json!({}))]).await;
    } else {
        eventsourcing_insert(
            c,
            &[
                (A3, 1, CREATED, json!({"full_name": "Cy"})),
                (A3, 2, CREDITED, json!({"amount": 5})),
            ],
        )
        .await;
        eventsourcing_insert(c, &[(A1, 4, CREDITED, json!({"amount": 1}))]).await;
    }
}

#[tokio::test]
async fn eventsourcing_layout_is_projected_from_json_in_bytea_woken_by_its_notify() {
    let db = library_db("eventsourcing.sql").await;
    let state = "convert_from(state, 'UTF8')::jsonb";
    let case = Case {
        p: "es".into(),
        // The library NOTIFYs the table's name on every append.
        store: "[store]\ntable = \"public.stored_events\"\nposition = \"notification_id\"\ntype = \"topic\"\n\
                data = \"state\"\nstream = \"originator_id\"\nnotify = \"stored_events\"\n"
            .into(),
        handled: vec![
            "bank.domain:Account.Created",
            "bank.domain:Account.Credited",
            "bank.domain:Account.Debited",
        ],
        note: ":data.amount".into(),
        key: ":stream".into(),
        events: format!(
            "SELECT notification_id AS pos, topic AS typ, originator_id::text AS stream, NULL::timestamptz AS tm, \
             {state} AS data, NULL::jsonb AS meta, {state}->>'amount' AS note, originator_id::text AS k \
             FROM public.stored_events"
        ),
        head: "SELECT max(notification_id) FROM public.stored_events".into(),
        notify: true,
    };
    exercise(&db, &case, eventsourcing_round).await;
}

// ---------------------------------------------------------------------------
// 2. Store shapes.

/// The kind of relation the store is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Rel {
    Table,
    /// PARTITION BY RANGE (id), two partitions split at `Shape::split`.
    Partitioned,
    /// Rows in a child table; the store is the parent.
    Inherited,
    /// A view over a table (payloads converted by the view).
    View,
}

/// The event time column.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Time {
    Timestamptz,
    /// `timestamp` (without time zone) holding UTC.
    Utc,
    Absent,
}

/// A store shape built for a test: relation `{p}_ev`, columns id, kind,
/// [stream text], [at], body, [meta], [tx].
#[derive(Clone, Copy, Debug)]
struct Shape {
    p: &'static str,
    rel: Rel,
    tx: bool,
    stream: bool,
    time: Time,
    /// The payload's type.
    data: &'static str,
    /// The metadata's type, if the store has metadata.
    meta: Option<&'static str>,
    notify: bool,
    /// Where the partitions of [`Rel::Partitioned`] split.
    split: i64,
}

/// `x` (a jsonb expression) as a value of type `t`.
fn jsonb_as(x: &str, t: &str) -> String {
    match t {
        "jsonb" => x.to_string(),
        "bytea" => format!("convert_to(({x})::text, 'UTF8')"),
        _ => format!("({x})::{t}"),
    }
}

/// `x` (a value of type `t`) as jsonb.
fn as_jsonb(x: &str, t: &str) -> String {
    match t {
        "jsonb" => x.to_string(),
        "bytea" => format!("convert_from({x}, 'UTF8')::jsonb"),
        _ => format!("{x}::jsonb"),
    }
}

impl Shape {
    /// Where writers insert.
    fn writable(&self) -> String {
        match self.rel {
            Rel::Table | Rel::Partitioned => format!("{}_ev", self.p),
            Rel::Inherited => format!("{}_ev_child", self.p),
            Rel::View => format!("{}_base", self.p),
        }
    }

    /// The payload and metadata types of the writable table.
    fn stored_types(&self) -> (&'static str, &'static str) {
        match self.rel {
            Rel::View => ("jsonb", "jsonb"),
            _ => (self.data, self.meta.unwrap_or("jsonb")),
        }
    }

    fn ddl(&self) -> String {
        let p = self.p;
        let (data_t, meta_t) = self.stored_types();
        let mut cols = vec!["id bigserial".to_string(), "kind text NOT NULL".into()];
        if self.stream {
            cols.push("stream text NOT NULL".into());
        }
        match self.time {
            Time::Timestamptz => cols.push("at timestamptz NOT NULL DEFAULT now()".into()),
            Time::Utc => {
                cols.push("at timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'utc')".into())
            }
            Time::Absent => {}
        }
        cols.push(format!("body {data_t} NOT NULL"));
        if self.meta.is_some() {
            cols.push(format!("meta {meta_t}"));
        }
        if self.tx {
            cols.push("tx xid8 NOT NULL DEFAULT pg_current_xact_id()".into());
        }
        cols.push("PRIMARY KEY (id)".into());
        let cols = cols.join(", ");
        let split = self.split;
        let mut sql = match self.rel {
            Rel::Table => format!("CREATE TABLE {p}_ev ({cols});"),
            Rel::Partitioned => format!(
                "CREATE TABLE {p}_ev ({cols}) PARTITION BY RANGE (id); \
                 CREATE TABLE {p}_ev_1 PARTITION OF {p}_ev FOR VALUES FROM (MINVALUE) TO ({split}); \
                 CREATE TABLE {p}_ev_2 PARTITION OF {p}_ev FOR VALUES FROM ({split}) TO (MAXVALUE);"
            ),
            Rel::Inherited => format!(
                "CREATE TABLE {p}_ev ({cols}); CREATE TABLE {p}_ev_child () INHERITS ({p}_ev);"
            ),
            Rel::View => {
                let mut shown = vec!["id".to_string(), "kind".into()];
                if self.stream {
                    shown.push("stream".into());
                }
                if self.time != Time::Absent {
                    shown.push("at".into());
                }
                shown.push(format!("{} AS body", jsonb_as("body", self.data)));
                if let Some(t) = self.meta {
                    shown.push(format!("{} AS meta", jsonb_as("meta", t)));
                }
                if self.tx {
                    shown.push("tx".into());
                }
                format!(
                    "CREATE TABLE {p}_base ({cols}); CREATE VIEW {p}_ev AS SELECT {} FROM {p}_base;",
                    shown.join(", ")
                )
            }
        };
        if self.notify {
            sql.push_str(&format!(
                "CREATE FUNCTION {p}_notify() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN PERFORM pg_notify('{p}_wake', ''); RETURN NULL; END $$; \
                 CREATE TRIGGER {p}_notify AFTER INSERT ON {} FOR EACH STATEMENT EXECUTE FUNCTION {p}_notify();",
                self.writable()
            ));
        }
        sql
    }

    /// Appends the events i in $1..=$2 (int) in one statement: types Opened,
    /// Renamed and Noted, three streams, metadata missing on every fourth.
    fn insert_sql(&self) -> String {
        self.insert_sql_over(3)
    }

    /// [`insert_sql`](Self::insert_sql) over `streams` streams.
    fn insert_sql_over(&self, streams: u32) -> String {
        let (data_t, meta_t) = self.stored_types();
        let mut cols = vec!["kind"];
        let mut vals = vec!["(ARRAY['Opened', 'Renamed', 'Noted'])[1 + i % 3]".to_string()];
        if self.stream {
            cols.push("stream");
            vals.push(format!("'s' || i % {streams}"));
        }
        cols.push("body");
        vals.push(jsonb_as(
            "jsonb_build_object('i', i, 'name', 'n' || i || ' ünï 🎻', 'tag', 'it''s \"quoted\"')",
            data_t,
        ));
        if self.meta.is_some() {
            cols.push("meta");
            vals.push(jsonb_as(
                "CASE WHEN i % 4 = 0 THEN NULL ELSE jsonb_build_object('user', 'u' || i % 2) END",
                meta_t,
            ));
        }
        format!(
            "INSERT INTO {} ({}) SELECT {} FROM generate_series($1::int, $2::int) i",
            self.writable(),
            cols.join(", "),
            vals.join(", ")
        )
    }

    fn case(&self) -> Case {
        let p = self.p;
        let mut store = format!(
            "[store]\ntable = \"{p}_ev\"\nposition = \"id\"\ntype = \"kind\"\ndata = \"body\"\n"
        );
        if self.stream {
            store.push_str("stream = \"stream\"\n");
        }
        if self.time != Time::Absent {
            store.push_str("time = \"at\"\n");
        }
        if self.meta.is_some() {
            store.push_str("metadata = \"meta\"\n");
        }
        if self.tx {
            store.push_str("transaction = \"tx\"\n");
        }
        if self.notify {
            store.push_str(&format!("notify = \"{p}_wake\"\n"));
        }
        let data = as_jsonb("body", self.data);
        let meta = self.meta.map(|t| as_jsonb("meta", t));
        let stream = if self.stream { "stream" } else { "NULL::text" };
        let tm = match self.time {
            Time::Timestamptz => "at",
            Time::Utc => "at AT TIME ZONE 'UTC'",
            Time::Absent => "NULL::timestamptz",
        };
        // The handler reads the metadata through :metadata.user when there is some.
        let (note, note_sql) = match &meta {
            Some(m) => (":metadata.user", format!("{m}->>'user'")),
            None => (":data.name", format!("{data}->>'name'")),
        };
        Case {
            p: p.into(),
            store,
            handled: vec!["Opened", "Renamed"],
            note: note.into(),
            key: "coalesce(:stream, 'none')".into(),
            events: format!(
                "SELECT id AS pos, kind AS typ, {stream} AS stream, {tm} AS tm, {data} AS data, {} AS meta, \
                 {note_sql} AS note, coalesce({stream}, 'none') AS k FROM {p}_ev",
                meta.as_deref().unwrap_or("NULL::jsonb")
            ),
            head: format!("SELECT max(id) FROM {p}_ev"),
            notify: self.notify,
        }
    }
}

/// Boot, play (more events), status, verify, reset over a shape: ten events
/// in two statements before boot, four in two while play runs.
async fn shape_lifecycle(shape: Shape) {
    let db = TestDb::new().await;
    in_kolkata(&db).await;
    db.client().await.batch_execute(&shape.ddl()).await.unwrap();
    let insert = shape.insert_sql();
    exercise(&db, &shape.case(), async |c: &Client, round: u32| {
        let statements: [(i32, i32); 2] = if round == 0 {
            [(1, 6), (7, 10)]
        } else {
            [(11, 12), (13, 14)]
        };
        for (a, b) in statements {
            c.execute(&insert, &[&a, &b]).await.unwrap();
        }
    })
    .await;
    if shape.rel == Rel::Partitioned {
        let c = db.client().await;
        for part in ["1", "2"] {
            assert!(
                count(
                    &c,
                    &format!("SELECT count(*) FROM ONLY {}_ev_{part}", shape.p)
                )
                .await
                    > 0,
                "partition {part} holds no rows"
            );
        }
    }
}

const SHAPE: Shape = Shape {
    p: "",
    rel: Rel::Table,
    tx: false,
    stream: true,
    time: Time::Timestamptz,
    data: "jsonb",
    meta: None,
    notify: false,
    split: 6,
};

#[tokio::test]
async fn shape_template_events_table_with_transaction_uuid_stream_and_notify() {
    // The template's `events`: tx xid8, stream uuid, tstamp timestamptz, data
    // jsonb, no metadata; its trigger NOTIFYs `events`.
    let db = TestDb::new().await;
    in_kolkata(&db).await;
    let case = Case {
        p: "tpl".into(),
        store: format!("{THINGS_STORE}notify = \"events\"\n"),
        handled: vec!["Opened", "Renamed"],
        note: ":data.name".into(),
        key: ":stream".into(),
        events: "SELECT id AS pos, name AS typ, aggregate_id::text AS stream, tstamp AS tm, data, \
                 NULL::jsonb AS meta, data->>'name' AS note, aggregate_id::text AS k FROM events"
            .into(),
        head: "SELECT max(id) FROM events".into(),
        notify: true,
    };
    exercise(&db, &case, async |c: &Client, round: u32| {
        let statements: [(i32, i32); 2] = if round == 0 {
            [(1, 6), (7, 10)]
        } else {
            [(11, 12), (13, 14)]
        };
        for (a, b) in statements {
            c.execute(
                "INSERT INTO events (aggregate_id, aggregate_name, name, data) \
                 SELECT md5('s' || i % 3)::uuid, 'thing', (ARRAY['Opened', 'Renamed', 'Noted'])[1 + i % 3], \
                   jsonb_build_object('i', i, 'name', 'n' || i) \
                 FROM generate_series($1::int, $2::int) i",
                &[&a, &b],
            )
            .await
            .unwrap();
        }
    })
    .await;
}

#[tokio::test]
async fn shape_table_without_transaction_json_data_utc_timestamp_and_metadata() {
    shape_lifecycle(Shape {
        p: "sh_plain",
        time: Time::Utc,
        data: "json",
        meta: Some("jsonb"),
        ..SHAPE
    })
    .await;
}

#[tokio::test]
async fn shape_table_with_transaction_text_data_json_metadata_no_stream_no_time() {
    shape_lifecycle(Shape {
        p: "sh_text",
        tx: true,
        stream: false,
        time: Time::Absent,
        data: "text",
        meta: Some("json"),
        ..SHAPE
    })
    .await;
}

#[tokio::test]
async fn shape_table_without_transaction_bytea_data_and_metadata_no_stream_with_notify() {
    shape_lifecycle(Shape {
        p: "sh_bytea",
        stream: false,
        data: "bytea",
        meta: Some("bytea"),
        notify: true,
        ..SHAPE
    })
    .await;
}

#[tokio::test]
async fn shape_partitioned_table_without_transaction_with_metadata_and_notify() {
    shape_lifecycle(Shape {
        p: "sh_part",
        rel: Rel::Partitioned,
        meta: Some("jsonb"),
        notify: true,
        ..SHAPE
    })
    .await;
}

#[tokio::test]
async fn shape_partitioned_table_with_transaction_no_stream_no_time() {
    shape_lifecycle(Shape {
        p: "sh_partx",
        rel: Rel::Partitioned,
        tx: true,
        stream: false,
        time: Time::Absent,
        ..SHAPE
    })
    .await;
}

#[tokio::test]
async fn shape_inheritance_parent_with_rows_in_a_child_json_data_text_metadata_utc_time() {
    shape_lifecycle(Shape {
        p: "sh_inh",
        rel: Rel::Inherited,
        time: Time::Utc,
        data: "json",
        meta: Some("text"),
        ..SHAPE
    })
    .await;
}

#[tokio::test]
async fn shape_view_over_a_table_text_data_with_metadata_and_notify() {
    shape_lifecycle(Shape {
        p: "sh_view",
        rel: Rel::View,
        data: "text",
        meta: Some("jsonb"),
        notify: true,
        ..SHAPE
    })
    .await;
}

/// The handlers of a projector `q` over a shape's events: a log row per
/// event (when `log`), and per stream its last name and how many times it
/// was named (insert on conflict, update, conditional delete; comments that
/// end lines where the set-wise rewrite cuts the statement).
fn last_name_projector(q: &str, note: &str, partitions: i32, log: bool) -> String {
    let (log, log_table) = if log {
        (
            format!(
                "'''INSERT INTO {q}_log VALUES (:position, :type, :stream, :time, :data, :metadata, {note})''', "
            ),
            format!("\"{q}_log\", "),
        )
    } else {
        Default::default()
    };
    format!(
        "[projectors.{q}]\npartitions = {partitions}\ntables = [{log_table}\"{q}_last\"]\n\
         on.Opened = [{log}'''INSERT INTO {q}_last AS l VALUES (:stream, :data.name, 1) \
           ON CONFLICT (stream) DO UPDATE SET name = EXCLUDED.name, n = l.n + 1''']\n\
         on.Renamed = [{log}'''UPDATE {q}_last SET name = :data.name, n = n + 1 -- renamed\n\
           WHERE stream = :stream -- its own row''']\n\
         on.Noted = [{log}'''DELETE FROM {q}_last -- some\nWHERE stream = :stream AND (:data.i)::int % 4 = 2''']\n"
    )
}

/// Over a shape with a stream, a projector in two parts builds exactly what
/// the same handlers build unpartitioned, its batches applied set-wise (in
/// waves of one event per stream) from the shape's own columns: payload and
/// metadata as jsonb, json, text or bytea, time as timestamptz or timestamp,
/// with or without a transaction column, on a table, a partitioned table, an
/// inheritance parent or a view.
async fn set_wise_equals_event_by_event(shape: Shape) {
    let db = TestDb::new().await;
    in_kolkata(&db).await;
    let c = db.client().await;
    c.batch_execute(&shape.ddl()).await.unwrap();
    let case = shape.case();
    let (one, two) = (format!("{}_one", shape.p), format!("{}_two", shape.p));
    // Reads only the stream and the payload: its waves hold only those.
    let three = format!("{}_three", shape.p);
    for q in [&one, &two, &three] {
        c.batch_execute(&format!(
            "CREATE TABLE {q}_log (position bigint PRIMARY KEY, type text NOT NULL, stream text, \
               time timestamptz, data jsonb, meta jsonb, note text); \
             CREATE TABLE {q}_last (stream text PRIMARY KEY, name text, n int NOT NULL)"
        ))
        .await
        .unwrap();
    }
    db.write_manifest(&format!(
        "{}\n{}\n{}\n{}",
        case.store,
        last_name_projector(&one, &case.note, 1, true),
        last_name_projector(&two, &case.note, 2, true),
        last_name_projector(&three, &case.note, 2, false)
    ));
    // 2,000 events of 200 streams, ten each: a part's batch is about a
    // thousand events in ten waves.
    let insert = shape.insert_sql_over(200);
    for (a, b) in [(1, 1_200), (1_201, 2_000)] {
        c.execute(&insert, &[&a, &b]).await.unwrap();
    }
    let boot = db.run(&["boot", "-v"]);
    boot.expect(0);
    let set_wise = |q: &str| {
        boot.stderr
            .lines()
            .any(|l| l.contains(&format!("projector `{q}`: ")) && l.contains("applied set-wise"))
    };
    for q in [&two, &three] {
        assert!(
            set_wise(q),
            "`{q}` was not applied set-wise:\n{}",
            boot.stderr
        );
    }
    assert!(
        !set_wise(&one),
        "`{one}` is not partitioned:\n{}",
        boot.stderr
    );
    for (table, columns, other) in [
        (
            "log",
            "position, type, stream, time, data, meta, note",
            &two,
        ),
        ("last", "stream, name, n", &two),
        ("last", "stream, name, n", &three),
    ] {
        let differ = count(
            &c,
            &format!(
                "SELECT count(*) FROM ((SELECT {columns} FROM {one}_{table} EXCEPT ALL SELECT {columns} FROM {other}_{table}) \
                 UNION ALL (SELECT {columns} FROM {other}_{table} EXCEPT ALL SELECT {columns} FROM {one}_{table})) d"
            ),
        )
        .await;
        assert_eq!(
            differ, 0,
            "{}: {other}_{table} differs from event by event",
            shape.p
        );
    }
    assert_eq!(
        count(&c, &format!("SELECT count(*) FROM {two}_log")).await,
        2_000
    );
    let named = count(&c, &format!("SELECT count(*) FROM {two}_last")).await;
    assert!(
        named > 0 && named < 200,
        "{named} streams named: the deletes did not run"
    );
}

#[tokio::test]
async fn set_wise_batches_over_the_template_shape_with_transaction_and_timestamptz() {
    set_wise_equals_event_by_event(Shape {
        p: "sw_plain",
        tx: true,
        ..SHAPE
    })
    .await;
}

#[tokio::test]
async fn set_wise_batches_over_a_table_without_transaction_json_data_utc_time_and_metadata() {
    set_wise_equals_event_by_event(Shape {
        p: "sw_json",
        data: "json",
        time: Time::Utc,
        meta: Some("json"),
        ..SHAPE
    })
    .await;
}

#[tokio::test]
async fn set_wise_batches_over_bytea_data_and_metadata_without_time() {
    set_wise_equals_event_by_event(Shape {
        p: "sw_bytea",
        data: "bytea",
        meta: Some("bytea"),
        time: Time::Absent,
        ..SHAPE
    })
    .await;
}

#[tokio::test]
async fn set_wise_batches_over_a_partitioned_table_an_inheritance_parent_and_a_view() {
    for shape in [
        Shape {
            p: "sw_part",
            rel: Rel::Partitioned,
            tx: true,
            split: 900,
            ..SHAPE
        },
        Shape {
            p: "sw_inh",
            rel: Rel::Inherited,
            data: "text",
            meta: Some("text"),
            ..SHAPE
        },
        Shape {
            p: "sw_view",
            rel: Rel::View,
            data: "text",
            meta: Some("jsonb"),
            ..SHAPE
        },
    ] {
        set_wise_equals_event_by_event(shape).await;
    }
}

// ---------------------------------------------------------------------------
// 3. Gap safety without a transaction column, on each kind of relation.

/// How long the writer holds its position while boot runs.
const HOLD: Duration = Duration::from_secs(2);

/// A store of `rel` without a transaction column, its projectors prepared.
async fn gap_store(db: &TestDb, rel: Rel, p: &'static str) -> (Shape, Case, Client) {
    let shape = Shape {
        p,
        rel,
        stream: false,
        split: 3,
        ..SHAPE
    };
    db.client().await.batch_execute(&shape.ddl()).await.unwrap();
    let case = shape.case();
    let c = prepare(db, &case).await;
    (shape, case, c)
}

/// Inserts one handled event (in `c`'s transaction, if one is open).
async fn insert_one(c: &Client, shape: &Shape) -> i64 {
    c.query_one(
        &format!(
            "INSERT INTO {} (kind, body) VALUES ('Opened', '{{\"name\": \"x\"}}') RETURNING id",
            shape.writable()
        ),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

fn spawn(db: &TestDb, args: &[&str]) -> Child {
    db.command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
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

fn assert_running(child: &mut Child, what: &str) {
    if let Some(status) = child.try_wait().unwrap() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err).ok();
        }
        panic!("{what}: it exited ({status}) instead of waiting\n--- stderr\n{err}");
    }
}

async fn logged(c: &Client, case: &Case) -> Vec<i64> {
    positions(
        c,
        &format!("SELECT position FROM {}_log ORDER BY 1", case.p),
    )
    .await
}

/// A committed event A, a running writer's event B, a committed event C:
/// boot waits for the writer, and both projectors apply A, B and C.
async fn a_running_writer_is_waited_for(rel: Rel, p: &'static str) {
    let db = TestDb::new().await;
    let (shape, case, c) = gap_store(&db, rel, p).await;
    let writer = db.client().await;
    let a = insert_one(&c, &shape).await;
    writer.batch_execute("BEGIN").await.unwrap();
    let b = insert_one(&writer, &shape).await;
    let cc = insert_one(&c, &shape).await;
    assert!(a < b && b < cc, "{a} {b} {cc}");
    if rel == Rel::Partitioned {
        // A and B in the first partition, C in the second.
        assert_eq!(
            count(&c, &format!("SELECT count(*) FROM ONLY {p}_ev_2")).await,
            1
        );
    }

    let started = Instant::now();
    let mut boot = spawn(&db, &["boot", "--writer-wait", "30s"]);
    tokio::time::sleep(HOLD).await;
    assert_running(&mut boot, "boot with a writer holding a position");
    assert_eq!(
        logged(&c, &case).await,
        vec![a],
        "{}: played past the running writer's position (or not up to it)",
        case.sql()
    );
    assert_eq!(received_positions(&db, &case), vec![a], "{}", case.cmd());
    writer.batch_execute("COMMIT").await.unwrap();
    let run = finish(boot, Duration::from_secs(20)).await;
    let took = started.elapsed();
    run.expect(0);
    assert!(
        took >= HOLD,
        "boot took {took:?}, less than the writer's hold"
    );
    assert_eq!(
        logged(&c, &case).await,
        vec![a, b, cc],
        "{}: the writer's event was lost\n{}",
        case.sql(),
        run.stderr
    );
    assert_eq!(
        received_positions(&db, &case),
        vec![a, b, cc],
        "{}",
        case.cmd()
    );
    for name in [case.sql(), case.cmd()] {
        assert_eq!(ledger(&c, &name).await, Some(("live".into(), cc)), "{name}");
    }
}

#[tokio::test]
async fn gap_safety_table_waits_for_a_running_writer() {
    a_running_writer_is_waited_for(Rel::Table, "gap_table").await;
}

#[tokio::test]
async fn gap_safety_partitioned_table_waits_for_a_running_writer() {
    a_running_writer_is_waited_for(Rel::Partitioned, "gap_part").await;
}

#[tokio::test]
async fn gap_safety_inheritance_child_waits_for_a_running_writer() {
    a_running_writer_is_waited_for(Rel::Inherited, "gap_inh").await;
}

#[tokio::test]
async fn gap_safety_view_waits_for_a_running_writer() {
    a_running_writer_is_waited_for(Rel::View, "gap_view").await;
}

/// A single slow INSERT statement (autocommit) takes position B, then works
/// on for 2.5 s, usually without a transaction id yet (only its virtual one);
/// C commits meanwhile: boot waits for the statement and applies A, B and C.
async fn a_slow_insert_statement_is_waited_for(rel: Rel, p: &'static str) {
    let db = TestDb::new().await;
    let (shape, case, c) = gap_store(&db, rel, p).await;
    let a = insert_one(&c, &shape).await;
    let slow = db.client().await;
    let sql = format!(
        "INSERT INTO {} (kind, body) VALUES ('Opened', (SELECT '{{\"name\": \"slow\"}}'::jsonb FROM pg_sleep(2.5))) \
         RETURNING id",
        shape.writable()
    );
    let statement = tokio::spawn(async move {
        let id: i64 = slow.query_one(&sql, &[]).await.unwrap().get(0);
        (id, Instant::now())
    });
    let owner = if rel == Rel::View { "base" } else { "ev" };
    let taken = format!(
        "SELECT pg_sequence_last_value(pg_get_serial_sequence('{p}_{owner}', 'id')::regclass)"
    );
    wait_for(
        "the slow insert to take its position",
        PATIENCE,
        &[],
        async || count(&c, &taken).await == a + 1,
    )
    .await;
    let cc = insert_one(&c, &shape).await;
    assert_eq!(cc, a + 2);

    let boot = spawn(&db, &["boot", "--writer-wait", "30s"]);
    let boot = tokio::spawn(async move {
        let run = finish(boot, Duration::from_secs(20)).await;
        (run, Instant::now())
    });
    let (b, statement_ended) = statement.await.unwrap();
    let (run, boot_ended) = boot.await.unwrap();
    run.expect(0);
    assert_eq!(b, a + 1);
    assert!(
        boot_ended > statement_ended,
        "boot ended before the statement holding position {b} did"
    );
    assert_eq!(
        logged(&c, &case).await,
        vec![a, b, cc],
        "{}: the slow statement's event was lost\n{}",
        case.sql(),
        run.stderr
    );
    assert_eq!(
        received_positions(&db, &case),
        vec![a, b, cc],
        "{}",
        case.cmd()
    );
}

#[tokio::test]
async fn gap_safety_table_waits_for_a_slow_insert_statement() {
    a_slow_insert_statement_is_waited_for(Rel::Table, "slow_table").await;
}

#[tokio::test]
async fn gap_safety_view_waits_for_a_slow_insert_statement() {
    a_slow_insert_statement_is_waited_for(Rel::View, "slow_view").await;
}

/// A rolled-back insert X, a committed Y: boot passes the hole at once and
/// records it for both projectors.
async fn a_rolled_back_insert_is_passed_at_once(rel: Rel, p: &'static str) {
    let db = TestDb::new().await;
    let (shape, case, c) = gap_store(&db, rel, p).await;
    c.batch_execute("BEGIN").await.unwrap();
    let x = insert_one(&c, &shape).await;
    c.batch_execute("ROLLBACK").await.unwrap();
    let y = insert_one(&c, &shape).await;
    assert!(x < y);

    let started = Instant::now();
    let run = db.run(&["boot", "--writer-wait", "30s"]);
    let took = started.elapsed();
    run.expect(0);
    assert!(
        took < Duration::from_secs(3),
        "boot waited at a hole no transaction can fill: {took:?}\n{}",
        run.stderr
    );
    assert_eq!(logged(&c, &case).await, vec![y]);
    assert_eq!(received_positions(&db, &case), vec![y]);
    for name in [case.sql(), case.cmd()] {
        assert_eq!(ledger(&c, &name).await, Some(("live".into(), y)), "{name}");
        let recorded: Vec<(i64, i64)> = c
            .query(
                "SELECT first_position, last_position FROM projectionist.holes \
                 WHERE projector = $1 ORDER BY 1",
                &[&name],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(recorded, vec![(x, x)], "{name}: the passed holes");
    }
    db.run(&["status"]).expect(0);
}

#[tokio::test]
async fn rolled_back_hole_in_a_table_is_passed_at_once_and_recorded() {
    a_rolled_back_insert_is_passed_at_once(Rel::Table, "hole_table").await;
}

#[tokio::test]
async fn rolled_back_hole_in_a_partitioned_table_is_passed_at_once_and_recorded() {
    a_rolled_back_insert_is_passed_at_once(Rel::Partitioned, "hole_part").await;
}

#[tokio::test]
async fn rolled_back_hole_in_an_inheritance_child_is_passed_at_once_and_recorded() {
    a_rolled_back_insert_is_passed_at_once(Rel::Inherited, "hole_inh").await;
}

#[tokio::test]
async fn rolled_back_hole_under_a_view_is_passed_at_once_and_recorded() {
    a_rolled_back_insert_is_passed_at_once(Rel::View, "hole_view").await;
}

// ---------------------------------------------------------------------------
// 4. Store problems point at the value of their key.

/// `projectors.toml:LINE:COL` of the value of the first line `key = …` (the
/// opening quote), 1-based.
fn value_at(text: &str, key: &str) -> String {
    for (i, line) in text.lines().enumerate() {
        let rest = line.trim_start();
        if let Some(after) = rest.strip_prefix(key)
            && after.trim_start().starts_with('=')
        {
            let col = line.find('"').unwrap() + 1;
            return format!("projectors.toml:{}:{col}", i + 1);
        }
    }
    panic!("no `{key} =` line in\n{text}");
}

/// Asserts validate exits 2 with one problem per key in `keys`, each at that
/// key's value, and none at `[store]`.
fn assert_problems_at_values(db: &TestDb, text: &str, keys: &[&str]) {
    db.write_manifest(text);
    let run = db.run(&["validate"]);
    run.expect(2);
    for key in keys {
        let at = value_at(text, key);
        assert!(
            run.stderr
                .lines()
                .any(|l| l.contains(&format!("store.{key}")) && l.contains(&at)),
            "no problem about store.{key} at {at}\n{}",
            run.stderr
        );
    }
    let store_line = text.lines().position(|l| l == "[store]").unwrap() + 1;
    assert!(
        !run.stderr
            .contains(&format!("projectors.toml:{store_line}:")),
        "a problem points at [store] instead of its key\n{}",
        run.stderr
    );
}

const ERR_PROJECTOR: &str =
    "\n[projectors.st_err]\ntables = [\"band\"]\non.Thing = \"SELECT :data.name\"\n";

#[tokio::test]
async fn store_problems_point_at_the_value_of_their_key() {
    let db = TestDb::new().await;
    // data names a uuid column; type is an unfinished expression; the filter
    // is text, not a condition. Odd spacing: the columns are the values'.
    let text = format!(
        "# a store with three problems\n[store]\ntable = \"events\"\nposition = \"id\"\n\
         type     =   \"data->>\"\n  data = \"aggregate_id\"\nstream = \"aggregate_id\"\n\
         filter =    \"aggregate_name\"\n{ERR_PROJECTOR}"
    );
    assert_problems_at_values(&db, &text, &["type", "data", "filter"]);
    // boot refuses it the same way, having written nothing.
    db.run(&["boot"]).expect(2);
    assert_eq!(db.ledger("st_err").await, None);

    // An unknown function in type; a filter over a missing column.
    let text = format!(
        "[store]\ntable = \"events\"\nposition = \"id\"\ndata = \"data\"\n\n\
         type = \"nosuchfunc(data)\"\n   filter   = \"nosuchcolumn = 1\"\n{ERR_PROJECTOR}"
    );
    assert_problems_at_values(&db, &text, &["type", "filter"]);

    // A filter that is a syntax error.
    let text = format!(
        "[store]\ntable = \"events\"\nposition = \"id\"\ntype = \"name\"\ndata = \"data\"\n\
         filter = \"aggregate_name = \"\n{ERR_PROJECTOR}"
    );
    assert_problems_at_values(&db, &text, &["filter"]);
}

#[tokio::test]
async fn a_view_store_without_a_transaction_column_validates_without_a_gap_warning() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute(
            "CREATE VIEW events_view AS SELECT id, name, data, aggregate_id, tstamp FROM events; \
             CREATE TABLE view_log (id bigint PRIMARY KEY)",
        )
        .await
        .unwrap();
    db.write_manifest(
        "[store]\ntable = \"events_view\"\nposition = \"id\"\ntype = \"name\"\ndata = \"data\"\n\
         stream = \"aggregate_id\"\ntime = \"tstamp\"\n\n\
         [projectors.view_logger]\ntables = [\"view_log\"]\non.Thing = \"INSERT INTO view_log VALUES (:position)\"\n\n\
         [[projectors.view_logger.check]]\nname = \"one row per Thing\"\n\
         projection = \"SELECT count(*) FROM view_log\"\n\
         events = \"SELECT count(*) FROM events_view WHERE name = 'Thing' AND id <= :position\"\n",
    );
    let run = db.run(&["validate"]);
    run.expect(0);
    assert!(run.stdout.contains("check out"), "{}", run.stdout);
    assert!(
        !run.stderr.to_lowercase().contains("warning"),
        "validate warned about a view store without a transaction column\n{}",
        run.stderr
    );
}

/// A writer holds a position while a reader waits on it, then commits: the
/// position is filled, so it must not be recorded as a passed hole, nor
/// reported as a late event. Once under boot, then five times under play
/// (the reader may see the commit at any moment of its wait). Up to b817804
/// the reader passed the holes it had listed before the commit, so the filled
/// position went to projectionist.holes and status said "late event … not
/// applied" (exit 1) about an event that was applied.
#[tokio::test]
async fn a_writer_committing_while_waited_for_leaves_no_hole_and_no_late_event() {
    let db = TestDb::new().await;
    let (shape, case, c) = gap_store(&db, Rel::Table, "late_false").await;
    let writer = db.client().await;
    let mut filled = Vec::new();

    insert_one(&c, &shape).await;
    writer.batch_execute("BEGIN").await.unwrap();
    filled.push(insert_one(&writer, &shape).await);
    insert_one(&c, &shape).await;
    let boot = spawn(&db, &["boot", "--writer-wait", "30s"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    writer.batch_execute("COMMIT").await.unwrap();
    let boot = finish(boot, Duration::from_secs(20)).await;
    boot.expect(0);

    let mut play = Player::start(&db, "late_false", &["--poll", "100ms"]);
    wait_for(
        "play to own both projectors",
        PATIENCE,
        &[&play],
        async || owned_by(&c, &play).await == [case.cmd(), case.sql()],
    )
    .await;
    for _ in 0..5 {
        writer.batch_execute("BEGIN").await.unwrap();
        filled.push(insert_one(&writer, &shape).await);
        let last = insert_one(&c, &shape).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        writer.batch_execute("COMMIT").await.unwrap();
        wait_for("play to reach the head", PATIENCE, &[&play], async || {
            position(&c, &case.sql()).await == last && position(&c, &case.cmd()).await == last
        })
        .await;
    }
    play.stop();

    let all = positions(&c, &format!("SELECT id FROM {}_ev ORDER BY 1", shape.p)).await;
    assert_eq!(logged(&c, &case).await, all, "every event applied once");
    assert_eq!(received_positions(&db, &case), all);
    // Each batch here passes at most one hole: a batch's span is its hole.
    let recorded: Vec<(String, i64)> = c
        .query(
            "SELECT h.projector, f FROM projectionist.holes h CROSS JOIN LATERAL unnest($1::bigint[]) AS f \
             WHERE f BETWEEN h.first_position AND h.last_position ORDER BY 2, 1",
            &[&filled],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        recorded,
        vec![],
        "filled positions (the writers' {filled:?}) recorded as passed holes\n--- boot stderr\n{}\n{}",
        boot.stderr,
        play.log()
    );
    assert!(
        !boot.stderr.contains("late event"),
        "boot reported a late event:\n{}",
        boot.stderr
    );
    db.run(&["status"]).expect(0);
    db.run(&["verify"]).expect(0);
}
