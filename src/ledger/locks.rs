//! The advisory locks that keep runs apart, keyed by the ledger schema so two
//! ledgers in one database never collide. Every lock projectionist takes is a
//! [`LockKey`]; waiting for one says who holds it.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use tokio_postgres::{Client, GenericClient};

use crate::db::{Database, RowExt};
use crate::error::Failure;

/// Every advisory lock projectionist takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKey<'a> {
    /// One boot at a time per database (session lock of boot's control connection).
    Boot,
    /// One migrate at a time.
    Migrate,
    /// A projector being worked on: boot and reset hold it as a session lock
    /// for their whole run; play takes it per batch (a transaction lock), so
    /// play never interleaves with them.
    Projector(&'a str),
    /// The runner that plays a projector (session lock on that projector's
    /// own connection, held while it plays): one runner per projector.
    Owner(&'a str),
    /// The runner that plays one part of a partitioned projector.
    PartOwner(&'a str, i32),
    /// Held shared by every `play` runner that can play a partitioned
    /// projector at this version and number of partitions: how many share
    /// its parts.
    Sharing(&'a str, i32, i32),
    /// A projector's version being built beside the live one (held while it
    /// builds; play goes on playing the live version meanwhile).
    Build(&'a str),
}

impl LockKey<'_> {
    fn text(&self) -> String {
        match self {
            LockKey::Boot => "boot".into(),
            LockKey::Migrate => "migrate".into(),
            LockKey::Projector(name) => format!("projector:{name}"),
            LockKey::Owner(name) => format!("owner:{name}"),
            LockKey::PartOwner(name, part) => format!("owner:{name}#{part}"),
            LockKey::Sharing(name, version, parts) => format!("sharing:{name}:{version}:{parts}"),
            LockKey::Build(name) => format!("build:{name}"),
        }
    }

    /// What the lock guards, for messages.
    fn what(&self) -> String {
        match self {
            LockKey::Boot => "boot (one at a time per database)".into(),
            LockKey::Migrate => "migrate".into(),
            LockKey::Projector(name) => format!("projector `{name}`"),
            LockKey::Owner(name) => format!("the runner of projector `{name}`"),
            LockKey::PartOwner(name, part) => {
                format!("the runner of partition {part} of projector `{name}`")
            }
            LockKey::Sharing(name, ..) => format!("the runners sharing projector `{name}`"),
            LockKey::Build(name) => format!("the build of projector `{name}`"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Locks {
    namespace: String,
}

/// Who holds a lock, for the message of the one who waits.
#[derive(Clone, Debug)]
pub struct LockHolder {
    pub pid: i32,
    pub application: String,
    pub client: Option<String>,
    pub since: Option<DateTime<Utc>>,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({}", self.pid, self.application)?;
        if let Some(c) = &self.client {
            write!(f, " from {c}")?;
        }
        write!(f, ")")?;
        if let Some(s) = self.since {
            write!(f, " since {}", s.format("%Y-%m-%d %H:%M:%S UTC"))?;
        }
        Ok(())
    }
}

/// The granted advisory locks of this database on the key `($1, $2)`
/// (namespace, key text) as `pg_locks` shows them: two `hashtext` ints
/// (`objsubid = 2`), each as an unsigned oid.
const HELD: &str = "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND l.classid::bigint = (hashtext($1)::bigint & 4294967295) \
     AND l.objid::bigint = (hashtext($2)::bigint & 4294967295)";

impl Locks {
    pub fn new(ledger_schema: &str) -> Locks {
        Locks {
            namespace: format!("projectionist:{ledger_schema}"),
        }
    }

    /// Calls the advisory-lock function `function` on `key`: every lock
    /// function takes the namespace and the key as two `hashtext` ints.
    async fn call(
        &self,
        client: &impl GenericClient,
        function: &str,
        key: LockKey<'_>,
    ) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
        client
            .query_one(
                &format!("SELECT {function}(hashtext($1), hashtext($2))::text"),
                &[&self.namespace, &key.text()],
            )
            .await
    }

    /// Calls a `pg_try_advisory_*` function: whether the lock was taken.
    async fn try_call(
        &self,
        client: &impl GenericClient,
        function: &str,
        key: LockKey<'_>,
    ) -> Result<bool> {
        let taken: String = self
            .call(client, function, key)
            .await
            .context("taking an advisory lock")?
            .col(0)?;
        Ok(taken == "true")
    }

    /// Tries a session-level lock once.
    pub async fn try_lock(&self, client: &impl GenericClient, key: LockKey<'_>) -> Result<bool> {
        self.try_call(client, "pg_try_advisory_lock", key).await
    }

    /// Takes a shared session-level lock (never waits: nothing takes it alone).
    pub async fn try_lock_shared(
        &self,
        client: &impl GenericClient,
        key: LockKey<'_>,
    ) -> Result<bool> {
        self.try_call(client, "pg_try_advisory_lock_shared", key)
            .await
    }

    /// Releases a shared session-level lock.
    pub async fn unlock_shared(&self, client: &impl GenericClient, key: LockKey<'_>) -> Result<()> {
        self.call(client, "pg_advisory_unlock_shared", key)
            .await
            .context("releasing an advisory lock")?;
        Ok(())
    }

    /// How many sessions of this database hold `key` (shared or not).
    pub async fn holders(&self, client: &impl GenericClient, key: LockKey<'_>) -> Result<usize> {
        let n: i64 = client
            .query_one(
                &format!("SELECT count(DISTINCT l.pid) FROM pg_locks l {HELD}"),
                &[&self.namespace, &key.text()],
            )
            .await
            .context("counting the holders of a lock")?
            .col(0)?;
        Ok(n as usize)
    }

    /// Tries a transaction-level lock (released at commit or rollback).
    pub async fn try_xact_lock(
        &self,
        client: &impl GenericClient,
        key: LockKey<'_>,
    ) -> Result<bool> {
        self.try_call(client, "pg_try_advisory_xact_lock", key)
            .await
    }

    /// Tries a shared transaction-level lock: held with other shared ones,
    /// never with the exclusive one.
    pub async fn try_xact_lock_shared(
        &self,
        client: &impl GenericClient,
        key: LockKey<'_>,
    ) -> Result<bool> {
        self.try_call(client, "pg_try_advisory_xact_lock_shared", key)
            .await
    }

    /// Takes a transaction-level lock, waiting for it (bounded by the
    /// transaction's `lock_timeout`).
    pub async fn xact_lock(&self, client: &impl GenericClient, key: LockKey<'_>) -> Result<()> {
        self.call(client, "pg_advisory_xact_lock", key)
            .await
            .with_context(|| format!("waiting for {}", key.what()))?;
        Ok(())
    }

    pub async fn unlock(&self, client: &impl GenericClient, key: LockKey<'_>) -> Result<()> {
        self.call(client, "pg_advisory_unlock", key).await?;
        Ok(())
    }

    /// Waits for a lock up to `timeout` (`None`: fail at once), saying who
    /// holds it. Each try must answer within the liveness budget of
    /// `database`: waiting on a dead network gives up (exit 3), never hangs.
    pub async fn lock(
        &self,
        database: &Database,
        client: &Client,
        key: LockKey<'_>,
        timeout: Option<std::time::Duration>,
    ) -> Result<()> {
        if database.within(self.try_lock(client, key)).await?? {
            return Ok(());
        }
        let what = key.what();
        let holder = database.within(self.holder(client, key)).await??;
        let who = holder
            .as_ref()
            .map(|h| h.to_string())
            .unwrap_or_else(|| "another session".into());
        let Some(timeout) = timeout else {
            return Err(Failure::Locked(format!(
                "{what} is locked by {who}\n  wait for it to finish (drop --no-wait to wait up to --lock-timeout)"
            ))
            .into());
        };
        tracing::warn!("waiting for {what}: locked by {who}");
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_note = tokio::time::Instant::now();
        // Queued in the server's lock queue (a busy holder that takes the
        // lock again between short transactions cannot starve the wait), in
        // slices the liveness budget bounds: a dead network still gives up.
        let slice = database.liveness().answer_within() / 2;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(Failure::Locked(format!(
                    "gave up waiting for {what} after {}: locked by {who}\n  raise --lock-timeout, or find out why it runs so long \
                     (a holder whose machine died is dropped by the server within --session-timeout)",
                    humantime::format_duration(timeout)
                ))
                .into());
            }
            let wait = left.min(slice).max(std::time::Duration::from_millis(1));
            if database.within(self.wait_lock(client, key, wait)).await?? {
                return Ok(());
            }
            if last_note.elapsed() >= std::time::Duration::from_secs(10) {
                tracing::warn!("still waiting for {what}: locked by {who}");
                last_note = tokio::time::Instant::now();
            }
        }
    }

    /// Waits in the server's queue for a session-level lock, up to `wait`
    /// (the session's `lock_timeout` for that one statement).
    async fn wait_lock(
        &self,
        client: &Client,
        key: LockKey<'_>,
        wait: std::time::Duration,
    ) -> Result<bool> {
        let ms = wait.as_millis().to_string();
        let before: String = client
            .query_one("SELECT current_setting('lock_timeout')", &[])
            .await?
            .col(0)?;
        client
            .execute("SELECT set_config('lock_timeout', $1, false)", &[&ms])
            .await?;
        let taken = self.call(client, "pg_advisory_lock", key).await;
        client
            .execute("SELECT set_config('lock_timeout', $1, false)", &[&before])
            .await?;
        match taken {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                Ok(false)
            }
            Err(e) => Err(e).with_context(|| format!("waiting for {}", key.what())),
        }
    }

    /// The session holding `key` in this database, if any.
    pub async fn holder(
        &self,
        client: &impl GenericClient,
        key: LockKey<'_>,
    ) -> Result<Option<LockHolder>> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT a.pid, coalesce(nullif(a.application_name, ''), 'unknown'), a.client_addr::text, a.backend_start \
                     FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid {HELD} LIMIT 1"
                ),
                &[&self.namespace, &key.text()],
            )
            .await
            .context("looking up who holds a lock")?;
        row.map(|r| {
            Ok(LockHolder {
                pid: r.col(0)?,
                application: r.col(1)?,
                client: r.col(2)?,
                since: r.col(3)?,
            })
        })
        .transpose()
    }
}
