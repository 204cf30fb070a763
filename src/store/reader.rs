//! Where the next batch may end without skipping an event that a
//! transaction committing out of order could still put behind it.
//!
//! Batches are bounded by events (the next `size` rows), never by ranges of
//! positions, so sparse positions cost nothing. Gap safety:
//! - with `[store].transaction`, events are read in (transaction id,
//!   position) order and only below the oldest transaction still running in
//!   this database (the [horizon](horizon_sql)): nothing can appear behind a
//!   reader;
//! - without it, the holes of a batch (positions no visible row holds) are
//!   passed only once every transaction that was in progress when they were
//!   first seen has ended: the in-progress list of a snapshot taken then
//!   (`pg_xact_status` of each), plus the virtual transactions of statements
//!   running then that had no transaction id yet. This holds wherever the
//!   store's rows come from (a table, partitions, inheritance, a view). The
//!   passed holes go to the ledger with the batch, so an event that appears
//!   in one later (an explicit position, a sequence cache) is found as late.
//!
//! Both rules look at this database only (other databases cannot write the
//! store), and leave out projectionist's own sessions that hold no write lock
//! on the store's sources: a batch that only writes read models can never
//! fill a hole, and must not hold the other projectors back.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use super::{Position, StoreShape};
use crate::db::RowExt;

/// Whether this role may see other roles' transactions (else the rules use
/// the cluster-wide snapshot, which is safe but holds back more).
const PRIVILEGED: &str = "(pg_has_role('pg_read_all_stats', 'MEMBER') \
     OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user))";

/// A session of projectionist's own (`a`) that holds no write lock on the
/// store's sources (`sources`: an oid[] parameter).
fn own_reader(sources: &str) -> String {
    format!(
        "(a.application_name LIKE 'projectionist %' AND NOT EXISTS ( \
           SELECT 1 FROM pg_locks w WHERE w.pid = a.pid AND w.locktype = 'relation' \
             AND w.relation = ANY({sources}) \
             AND w.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')))"
    )
}

/// The 32-bit transaction ids (as bigint) that may still add events in this
/// database: its backends' (but projectionist's readers') and its prepared
/// transactions'.
fn writer_xids(sources: &str) -> String {
    format!(
        "SELECT a.backend_xid::text::bigint FROM pg_stat_activity a \
           WHERE a.datname = current_database() AND a.backend_xid IS NOT NULL \
             AND a.pid <> pg_backend_pid() AND NOT {own} \
         UNION ALL SELECT p.transaction::text::bigint FROM pg_prepared_xacts p \
           WHERE p.database = current_database()",
        own = own_reader(sources)
    )
}

/// The oldest transaction id that may still insert an event: the lowest
/// running writer of this database, or the snapshot's xmax when none runs.
/// Without the privilege to see other roles' sessions: the cluster-wide xmin.
pub fn horizon_sql(sources: &str) -> String {
    format!(
        "SELECT CASE WHEN NOT {PRIVILEGED} THEN pg_snapshot_xmin(pg_current_snapshot()) \
         ELSE coalesce((SELECT min(x) FROM pg_snapshot_xip(pg_current_snapshot()) x \
            WHERE (x::text::bigint % 4294967296) IN ({writers})), \
           pg_snapshot_xmax(pg_current_snapshot())) END",
        writers = writer_xids(sources)
    )
}

/// A running transaction that holds the head back (or a prepared one).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Holder {
    /// The backend, or `None` for a prepared transaction.
    pub pid: Option<i32>,
    pub seconds: f64,
    pub application: String,
    pub state: String,
    /// A prepared transaction's global id.
    pub prepared: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let running = humantime::format_duration(Duration::from_secs(self.seconds as u64));
        match (&self.prepared, self.pid) {
            (Some(gid), _) => write!(
                f,
                "prepared transaction '{gid}' (owner {}), prepared {running} ago: COMMIT PREPARED or ROLLBACK PREPARED it",
                self.application
            ),
            (None, pid) => {
                write!(
                    f,
                    "pid {} ({}), transaction running for {running}",
                    pid.unwrap_or_default(),
                    if self.application.is_empty() {
                        "no application name"
                    } else {
                        &self.application
                    }
                )?;
                if !self.state.is_empty() {
                    write!(f, ", {}", self.state)?;
                }
                Ok(())
            }
        }
    }
}

/// A batch passes holes on the way to its end: they are recorded with it
/// (the ledger finds them in the store again, inside the batch's transaction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassedHoles {
    /// When they were first seen (server time).
    pub first_seen: DateTime<Utc>,
}

/// What a reader may do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Play (after, end], passing holes on the way if `holes` (recorded with the batch).
    Batch {
        end: Position,
        holes: Option<PassedHoles>,
    },
    /// Everything visible (up to the bound) is read.
    CaughtUp,
    /// Events are visible past `after`, but a running transaction may still
    /// commit one before them.
    Held { visible: Position, by: Vec<Holder> },
}

/// The transactions in progress when holes were first seen.
#[derive(Clone, Debug)]
struct Watch {
    /// The last position of the window the holes were seen in: every hole at
    /// or before it existed when this was taken.
    covers: i64,
    xids: Vec<String>,
    vxids: Vec<String>,
    first_seen: DateTime<Utc>,
}

/// One reader's view of the store (per projector runner): remembers the
/// transactions it waits on between calls.
#[derive(Debug, Default)]
pub struct Reader {
    watch: Option<Watch>,
    /// The ledger's query for holes passed before (see `Ledger::known_holes_sql`).
    known_holes: Option<String>,
}

/// How long `plan` waits for a hole's transactions before settling for the
/// events before the hole (short writers end within milliseconds).
const BRIEF_WAIT: Duration = Duration::from_millis(100);

impl Reader {
    pub fn new() -> Reader {
        Reader::default()
    }

    /// A reader that passes at once the holes some projector passed before
    /// (only a late event can fill them, and that is found as late), given
    /// the ledger's query for them.
    pub fn knowing_holes(known_holes_sql: String) -> Reader {
        Reader {
            watch: None,
            known_holes: Some(known_holes_sql),
        }
    }

    /// Which of `gaps` are known to be passable.
    async fn known(&self, client: &impl GenericClient, gaps: &[(i64, i64)]) -> Result<Vec<bool>> {
        let mut known = vec![false; gaps.len()];
        let Some(sql) = &self.known_holes else {
            return Ok(known);
        };
        if gaps.is_empty() {
            return Ok(known);
        }
        let (lo, hi): (Vec<i64>, Vec<i64>) = gaps.iter().copied().unzip();
        for r in client
            .query(sql, &[&lo, &hi])
            .await
            .context("looking up holes passed before")?
        {
            let i: i32 = r.col(0)?;
            if let Some(k) = known.get_mut(i as usize - 1) {
                *k = true;
            }
        }
        Ok(known)
    }

    /// The next batch after `after`: at most `size` events, never past `bound`.
    pub async fn plan(
        &mut self,
        shape: &StoreShape,
        client: &impl GenericClient,
        after: Position,
        bound: Option<Position>,
        size: i64,
    ) -> Result<Plan> {
        if bound.is_some_and(|b| b <= after) {
            return Ok(Plan::CaughtUp);
        }
        match &shape.transaction {
            Some(_) => plan_by_transaction(shape, client, after, bound, size).await,
            None => self.plan_by_holes(shape, client, after, bound, size).await,
        }
    }

    async fn plan_by_holes(
        &mut self,
        shape: &StoreShape,
        client: &impl GenericClient,
        after: Position,
        bound: Option<Position>,
        size: i64,
    ) -> Result<Plan> {
        let p = shape.position_expr();
        let upto = match bound {
            Some(_) => format!(" AND {p} <= $3::bigint"),
            None => String::new(),
        };
        // The window's last position and its number of rows, by the index: it
        // has holes when it spans more positions than it has rows.
        let sql = format!(
            "SELECT max(b.p), count(*) FROM (SELECT {p}::bigint AS p FROM {rel} \
               WHERE {p} > $1::bigint{upto} ORDER BY {p} LIMIT $2::bigint) b",
            rel = shape.relation(),
        );
        let bound_id = bound.map(|b| b.id);
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after.id, &size];
        if let Some(b) = &bound_id {
            params.push(b);
        }
        let row = client
            .query_one(&sql, &params)
            .await
            .context("reading the next batch's positions")?;
        let Some(end) = row.col::<Option<i64>>(0)? else {
            return Ok(Plan::CaughtUp);
        };
        let rows: i64 = row.col(1)?;
        let at = |id: i64| Position { tx: None, id };
        if end - after.id == rows {
            return Ok(Plan::Batch {
                end: at(end),
                holes: None,
            });
        }
        let watch = match self.watch.take().filter(|w| w.covers > after.id) {
            Some(w) => w,
            None => {
                let w = self.snapshot(shape, client, end).await?;
                if w.xids.is_empty() && w.vxids.is_empty() {
                    // Nothing was running: no hole seen now can be filled any more.
                    return Ok(Plan::Batch {
                        end: at(end),
                        holes: Some(PassedHoles {
                            first_seen: w.first_seen,
                        }),
                    });
                }
                w
            }
        };
        let passed = Some(PassedHoles {
            first_seen: watch.first_seen,
        });
        // Something runs: the holes some projector passed before need not wait for it.
        let gaps = self.gaps(shape, client, after, at(end)).await?;
        let known = self.known(client, &gaps).await?;
        let unknown: Vec<(i64, i64)> = gaps
            .iter()
            .zip(&known)
            .filter(|(_, k)| !**k)
            .map(|(g, _)| *g)
            .collect();
        let Some(&(first, first_hi)) = unknown.first() else {
            return Ok(Plan::Batch {
                end: at(end),
                holes: passed,
            });
        };
        let started = Instant::now();
        loop {
            if !self.still_running(client, &watch).await? {
                // Every hole up to `covers` is passable; one beyond it waits for a new look.
                let end = match unknown.iter().find(|(lo, _)| *lo > watch.covers) {
                    Some((lo, _)) => lo - 1,
                    None => end,
                };
                return Ok(Plan::Batch {
                    end: at(end),
                    holes: passed,
                });
            }
            if started.elapsed() >= BRIEF_WAIT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.watch = Some(watch);
        if first - 1 > after.id {
            // The events before the first hole that may still fill are safe
            // (the known holes before it are passed).
            return Ok(Plan::Batch {
                end: at(first - 1),
                holes: passed,
            });
        }
        Ok(Plan::Held {
            visible: at(first_hi + 1),
            by: holders(shape, client).await?,
        })
    }

    /// The holes in (after, end]: first and last position of each.
    async fn gaps(
        &self,
        shape: &StoreShape,
        client: &impl GenericClient,
        after: Position,
        end: Position,
    ) -> Result<Vec<(i64, i64)>> {
        let p = shape.position_expr();
        let sql = format!(
            "SELECT coalesce(array_agg(g.lo ORDER BY g.lo) FILTER (WHERE g.lo <= g.hi), '{{}}'), \
                    coalesce(array_agg(g.hi ORDER BY g.lo) FILTER (WHERE g.lo <= g.hi), '{{}}') \
             FROM (SELECT lag(b.p, 1, $1::bigint) OVER (ORDER BY b.p) + 1 AS lo, b.p - 1 AS hi \
                   FROM (SELECT {p}::bigint AS p FROM {rel} WHERE {p} > $1::bigint AND {p} <= $2::bigint) b) g",
            rel = shape.relation(),
        );
        let row = client
            .query_one(&sql, &[&after.id, &end.id])
            .await
            .context("finding the holes of a batch")?;
        let lo: Vec<i64> = row.col(0)?;
        let hi: Vec<i64> = row.col(1)?;
        Ok(lo.into_iter().zip(hi).collect())
    }

    /// The transactions that may still fill a hole seen now.
    async fn snapshot(
        &self,
        shape: &StoreShape,
        client: &impl GenericClient,
        covers: i64,
    ) -> Result<Watch> {
        let sql = format!(
            "SELECT coalesce((SELECT array_agg(x::text) FROM pg_snapshot_xip(pg_current_snapshot()) x \
                 WHERE NOT {PRIVILEGED} OR (x::text::bigint % 4294967296) IN ({writers})), '{{}}'), \
               coalesce((SELECT array_agg(l.virtualxid) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'virtualxid' AND l.granted \
                   AND a.datid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND a.pid <> pg_backend_pid() AND a.backend_xid IS NULL \
                   AND (a.state IS NULL OR a.state NOT IN ('idle in transaction', 'idle in transaction (aborted)')) \
                   AND NOT {own}), '{{}}'), \
               clock_timestamp()",
            writers = writer_xids("$1::oid[]"),
            own = own_reader("$1::oid[]"),
        );
        let row = client
            .query_one(&sql, &[&shape.sources])
            .await
            .context("listing the transactions that may fill a hole")?;
        Ok(Watch {
            covers,
            xids: row.col(0)?,
            vxids: row.col(1)?,
            first_seen: row.col(2)?,
        })
    }

    /// Whether any transaction of the watch is still in progress (a virtual
    /// one only while it runs a statement or has written).
    async fn still_running(&self, client: &impl GenericClient, w: &Watch) -> Result<bool> {
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM unnest($1::text[]) x WHERE pg_xact_status(x::xid8) = 'in progress') \
                     OR EXISTS (SELECT 1 FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                       WHERE l.locktype = 'virtualxid' AND l.virtualxid = ANY($2::text[]) \
                         AND (a.backend_xid IS NOT NULL OR a.state IS NULL \
                              OR a.state NOT IN ('idle in transaction', 'idle in transaction (aborted)')))",
                &[&w.xids, &w.vxids],
            )
            .await
            .context("looking whether the transactions a hole waits on ended")?;
        row.col(0)
    }

    /// Where a `from_now` projector starts: the newest committed event now,
    /// once no transaction can still commit an event behind it (waiting up to
    /// `wait`). History is never played, and a new event is never skipped.
    pub async fn release_head(
        &mut self,
        shape: &StoreShape,
        client: &impl GenericClient,
        wait: Duration,
    ) -> Result<Position> {
        let Some((visible, _)) = shape.visible_head(client).await? else {
            return Ok(Position::START);
        };
        let deadline = Instant::now() + wait;
        let watch = match shape.transaction {
            Some(_) => None,
            None => Some(self.snapshot(shape, client, visible.id).await?),
        };
        loop {
            let clear = match &watch {
                None => {
                    let sql = format!("SELECT ({}) > $2::text::xid8", horizon_sql("$1::oid[]"));
                    client
                        .query_one(&sql, &[&shape.sources, &visible.tx_text()])
                        .await?
                        .col::<Option<bool>>(0)?
                        .unwrap_or(true)
                }
                Some(w) => !self.still_running(client, w).await?,
            };
            if clear {
                return Ok(visible);
            }
            if Instant::now() >= deadline {
                let by = holders(shape, client).await?;
                tracing::warn!(
                    "starting at {visible} while transactions still run ({}): an event they commit behind it is not played",
                    by.iter()
                        .map(|h| h.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                return Ok(visible);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// With a transaction column: the next events below the horizon.
async fn plan_by_transaction(
    shape: &StoreShape,
    client: &impl GenericClient,
    after: Position,
    bound: Option<Position>,
    size: i64,
) -> Result<Plan> {
    let t = shape.tx_expr();
    let p = shape.position_expr();
    let upto = match bound {
        Some(_) => format!(" AND ({t}, {p}) <= ($5::text::xid8, $6::bigint)"),
        None => String::new(),
    };
    let sql = format!(
        "SELECT s.t::text, s.p FROM ( \
           SELECT {t} AS t, {p}::bigint AS p FROM {rel} \
           WHERE ({t}, {p}) > ($1::text::xid8, $2::bigint){upto} AND {t} < ({horizon}) \
           ORDER BY {order} LIMIT $4::bigint) s \
         ORDER BY s.t DESC, s.p DESC LIMIT 1",
        rel = shape.relation(),
        order = shape.order(),
        horizon = horizon_sql("$3::oid[]"),
    );
    let after_tx = after.tx_text().unwrap_or_else(|| "0".into());
    let bound_tx = bound.map(|b| b.tx_text().unwrap_or_else(|| "0".into()));
    let bound_id = bound.map(|b| b.id);
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after_tx, &after.id, &shape.sources, &size];
    if let (Some(tx), Some(id)) = (&bound_tx, &bound_id) {
        params.push(tx);
        params.push(id);
    }
    // Nothing below the horizon: is anything visible beyond it? Asked in a
    // second statement, so a transaction that committed in between shows
    // here below the new horizon: then the batch is read again at once
    // rather than reported held (which makes play look again only later).
    let (cond, range) = match bound {
        Some(b) => shape.range_params(after, b, 1),
        None => shape.after_params(after, 1),
    };
    let n = range.len();
    let beyond = format!(
        "SELECT {t}::text, {p}::bigint, {t} < ({horizon}) FROM {rel} WHERE {cond} ORDER BY {order} LIMIT 1",
        rel = shape.relation(),
        order = shape.order(),
        horizon = horizon_sql(&format!("${}::oid[]", n + 1)),
    );
    let mut beyond_params: Vec<&(dyn ToSql + Sync)> =
        range.iter().map(|b| b.as_ref() as _).collect();
    beyond_params.push(&shape.sources);
    let mut visible = None;
    for _ in 0..3 {
        if let Some(r) = client
            .query_opt(&sql, &params)
            .await
            .context("reading the next batch's end")?
        {
            return Ok(Plan::Batch {
                end: Position::from_parts(r.col(0)?, r.col(1)?)?,
                holes: None,
            });
        }
        match client.query_opt(&beyond, &beyond_params).await? {
            None => return Ok(Plan::CaughtUp),
            Some(r) => {
                visible = Some(Position::from_parts(r.col(0)?, r.col(1)?)?);
                let below: bool = r.col(2)?;
                if !below {
                    break;
                }
            }
        }
    }
    match visible {
        Some(visible) => Ok(Plan::Held {
            visible,
            by: holders(shape, client).await?,
        }),
        None => Ok(Plan::CaughtUp),
    }
}

/// The running transactions of this database that hold the head back
/// (writers that may still commit an event behind it, prepared transactions
/// included), oldest first; only those older than a second are worth a line.
pub async fn holders(shape: &StoreShape, client: &impl GenericClient) -> Result<Vec<Holder>> {
    let sql = format!(
        "SELECT a.pid, extract(epoch FROM clock_timestamp() - a.xact_start)::float8, \
                coalesce(a.application_name, ''), coalesce(a.state, ''), NULL::text \
         FROM pg_stat_activity a \
         WHERE a.datname = current_database() AND a.backend_xid IS NOT NULL \
           AND a.pid <> pg_backend_pid() AND NOT {own} \
           AND a.xact_start < clock_timestamp() - interval '1 second' \
         UNION ALL \
         SELECT NULL, extract(epoch FROM clock_timestamp() - p.prepared)::float8, p.owner::text, 'prepared', p.gid \
         FROM pg_prepared_xacts p \
         WHERE p.database = current_database() AND p.prepared < clock_timestamp() - interval '1 second' \
         ORDER BY 2 DESC LIMIT 3",
        own = own_reader("$1::oid[]"),
    );
    client
        .query(&sql, &[&shape.sources])
        .await
        .context("looking for transactions that hold the head back")?
        .iter()
        .map(|r| {
            Ok(Holder {
                pid: r.col(0)?,
                seconds: r.col::<Option<f64>>(1)?.unwrap_or(0.0),
                application: r.col(2)?,
                state: r.col(3)?,
                prepared: r.col(4)?,
            })
        })
        .collect()
}
