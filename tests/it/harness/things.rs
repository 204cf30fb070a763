//! The small "Thing" stores tests build for themselves: the store's
//! `[store]` header, tables for the tests' projectors, appending events, and
//! a one-line logging projector.

use tokio_postgres::Client;

use super::TestDb;

/// The `[store]` of the small "Thing" stores the tests build.
pub const THINGS_STORE: &str = "[store]\ntable = \"events\"\nposition = \"id\"\ntype = \"name\"\ndata = \"data\"\nstream = \"aggregate_id\"\ntime = \"tstamp\"\ntransaction = \"tx\"\n";

/// A store of `n` events of type `Thing` (positions 1..=n), the tables the
/// tests' projectors write to (`thing_log`, `after_log`, `mail_log`, `seen`,
/// `counter`), and a manifest with `projectors` over them.
pub async fn things(db: &TestDb, n: i64, projectors: &str) {
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE thing_log (id bigint PRIMARY KEY, v int); \
         CREATE TABLE after_log (id bigint PRIMARY KEY); \
         CREATE TABLE mail_log (id bigint PRIMARY KEY); \
         CREATE TABLE seen (id bigint PRIMARY KEY); \
         CREATE TABLE counter (n bigint NOT NULL); INSERT INTO counter VALUES (0)",
    )
    .await
    .unwrap();
    add_things(&c, n).await;
    things_manifest(db, projectors);
}

/// A manifest of `projectors` over the Thing store.
pub fn things_manifest(db: &TestDb, projectors: &str) {
    db.write_manifest(&format!("{THINGS_STORE}\n{projectors}"));
}

/// Creates `tables`, writes a manifest of the Thing store (with the NOTIFY
/// channel when `notify`) and `projectors`, and returns a client.
pub async fn thing_store(db: &TestDb, notify: bool, tables: &str, projectors: &str) -> Client {
    let c = db.client().await;
    if !tables.is_empty() {
        c.batch_execute(tables).await.unwrap();
    }
    db.write_manifest(&format!(
        "{THINGS_STORE}{}\n{projectors}",
        if notify { "notify = \"events\"\n" } else { "" }
    ));
    c
}

/// Appends `n` events of type `Thing` in one statement; returns the new head.
pub async fn add_things(c: &Client, n: i64) -> i64 {
    c.execute(
        "INSERT INTO events (aggregate_id, aggregate_name, name, data) \
         SELECT gen_random_uuid(), 'thing', 'Thing', jsonb_build_object('i', i) FROM generate_series(1::bigint, $1) i",
        &[&n],
    )
    .await
    .unwrap();
    head(c).await
}

/// Appends one event; returns its position.
pub async fn add_event(c: &Client, event_type: &str, data: serde_json::Value) -> i64 {
    c.query_one(
        "INSERT INTO events (aggregate_id, aggregate_name, name, data) VALUES (gen_random_uuid(), 'thing', $1, $2) RETURNING id",
        &[&event_type, &data],
    )
    .await
    .unwrap()
    .get(0)
}

/// The position of the last event (0 when there is none).
pub async fn head(c: &Client) -> i64 {
    c.query_one("SELECT coalesce(max(id), 0) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

/// A projector logging every `Thing` into `table` (id bigint PRIMARY KEY).
pub fn logger(name: &str, mode: &str, table: &str) -> String {
    format!(
        "[projectors.{name}]\nmode = \"{mode}\"\ntables = [\"{table}\"]\n\
         on.Thing = \"INSERT INTO {table} (id) VALUES (:position)\"\n\n"
    )
}
