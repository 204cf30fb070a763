//! What the ledger (`projectionist.projectors`) and the owner locks of `play`
//! say, read through a client of the test's database.

use tokio_postgres::Client;

/// (state, position) of a projector's ledger row.
pub async fn ledger(c: &Client, name: &str) -> Option<(String, i64)> {
    c.query_opt(
        "SELECT state, position FROM projectionist.projectors WHERE name = $1",
        &[&name],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1)))
}

/// A projector's position, -1 when it has no ledger row.
pub async fn position(c: &Client, name: &str) -> i64 {
    ledger(c, name).await.map(|l| l.1).unwrap_or(-1)
}

/// The single bigint `sql` returns.
pub async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// (projector, application_name of the session holding its `owner:` lock), for
/// the projectors of this database's ledger that have an owner.
pub async fn owners(c: &Client) -> Vec<(String, String)> {
    c.query(
        "SELECT p.name, a.application_name FROM projectionist.projectors p \
         JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.classid::bigint = (hashtext('projectionist:projectionist')::bigint & 4294967295) \
           AND l.objid::bigint = (hashtext('owner:' || p.name)::bigint & 4294967295) \
         JOIN pg_stat_activity a ON a.pid = l.pid \
         ORDER BY 1, 2",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}
