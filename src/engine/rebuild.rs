//! Rebuilds without downtime: a new version of a projector is built beside
//! the live one, in the build schema, then swapped in.
//!
//! - **Build beside**: the projector's tables are created in the build schema
//!   like the live ones (`LIKE … INCLUDING ALL`: columns, defaults,
//!   constraints, indexes, comments; plus grants, the owner, foreign keys to
//!   other tables and triggers), the optional `prepare` SQL runs there, and the
//!   handlers run with the build schema first on the search path. Play goes on
//!   playing the live version meanwhile.
//! - **Swap**: in one short transaction, holding the projectors' locks, the
//!   live tables move to the previous-versions schema (renamed
//!   `name__v{version}`), the built ones move in (their indexes and sequences
//!   take the old names), the views that depended on them are recreated, the
//!   ledger row takes the new version, and `pg_notify('projectionist', …)`
//!   says so. Readers wait at most for that transaction. Projectors linked by
//!   `after` swap together.
//! - **Rollback**: the same exchange, bringing a kept previous version back.
//! - **Prune**: a reviewable migration that drops previous versions.
//!
//! A rebuild beside is refused, with what stands in the way named, when
//! foreign keys point at an owned table, a materialized view or row-level
//! security policies depend on one, or a handler names an owned table with
//! its schema (it would write into the live table): `rebuild = "in_place"`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use chrono::Utc;
use tokio_postgres::{Client, GenericClient, Transaction};

use crate::db::{RowExt, quote_ident, quote_literal, quote_qualified};
use crate::engine::Context;
use crate::error::Failure;
use crate::ledger::{LockKey, State, VersionRow};
use crate::manifest::{Mode, Projector, Rebuild};
use crate::store::Position;

/// How long the swap waits for a lock (a long reader on a live table)
/// before it gives up and tries again: readers queue behind a waiting swap.
const SWAP_LOCK_TIMEOUT: &str = "2s";
/// How many times the swap tries.
const SWAP_ATTEMPTS: u32 = 15;

/// Whether `p` is rebuilt beside its live tables (else in place): SQL
/// projectors that own tables, unless they say `rebuild = "in_place"` or
/// have their own `reset` SQL (it resets more than their tables).
pub fn beside(p: &Projector) -> bool {
    p.rebuild == Rebuild::Swap && p.command.is_none() && !p.tables.is_empty() && p.reset.is_none()
}

/// A table's schema and name, from how the manifest writes it (`band`,
/// `app.band`), resolved against the database.
#[derive(Clone, Debug)]
struct Table {
    /// As the manifest writes it.
    listed: String,
    schema: String,
    name: String,
}

impl Table {
    fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

async fn resolve(client: &impl GenericClient, listed: &str) -> Result<Table> {
    let row = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1)",
            &[&quote_qualified(listed)],
        )
        .await?
        .ok_or_else(|| Failure::Usage(format!("the table `{listed}` does not exist")))?;
    Ok(Table {
        listed: listed.to_string(),
        schema: row.col(0)?,
        name: row.col(1)?,
    })
}

/// Refuses a rebuild beside what cannot be swapped, naming what stands in
/// the way.
pub async fn check_swappable(client: &impl GenericClient, p: &Projector) -> Result<()> {
    let mut problems = Vec::new();
    let tables: Vec<String> = p.tables.iter().map(|t| quote_qualified(t)).collect();
    let rows = client
        .query(
            "SELECT c.conname::text, c.conrelid::regclass::text, c.confrelid::regclass::text FROM pg_constraint c \
             WHERE c.contype = 'f' AND c.confrelid IN (SELECT to_regclass(t) FROM unnest($1::text[]) t)",
            &[&tables],
        )
        .await
        .context("looking for foreign keys")?;
    for r in rows {
        let (name, from, to): (String, String, String) = (r.col(0)?, r.col(1)?, r.col(2)?);
        problems.push(format!("foreign key {name} of {from} points at {to}"));
    }
    let rows = client
        .query(
            "SELECT DISTINCT v.oid::regclass::text FROM pg_depend d \
             JOIN pg_rewrite w ON w.oid = d.objid JOIN pg_class v ON v.oid = w.ev_class \
             WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass \
               AND d.refobjid IN (SELECT to_regclass(t) FROM unnest($1::text[]) t) AND v.relkind = 'm'",
            &[&tables],
        )
        .await
        .context("looking for materialized views")?;
    for r in rows {
        let v: String = r.col(0)?;
        problems.push(format!("materialized view {v} depends on it"));
    }
    let rows = client
        .query(
            "SELECT DISTINCT p.polrelid::regclass::text FROM pg_policy p \
             WHERE p.polrelid IN (SELECT to_regclass(t) FROM unnest($1::text[]) t)",
            &[&tables],
        )
        .await
        .context("looking for row-level security policies")?;
    for r in rows {
        let t: String = r.col(0)?;
        problems.push(format!("{t} has row-level security policies"));
    }
    let owned: Vec<String> = p
        .tables
        .iter()
        .map(|t| {
            t.rsplit('.')
                .next()
                .unwrap_or(t)
                .trim_matches('"')
                .to_lowercase()
        })
        .collect();
    for h in &p.handlers {
        for s in &h.statements {
            let sql = s.render(&crate::handlers::sql::Parameters);
            if let Some(t) = crate::manifest::sql_text::written_table(&sql)
                && !owned.contains(&t)
            {
                problems.push(format!(
                    "its handler for {} writes table `{t}`, which it does not own (a build would apply its events there a second time: add it to `tables`)",
                    h.event_type
                ));
            }
        }
    }
    for t in &p.tables {
        let name = t.rsplit('.').next().unwrap_or(t);
        for h in &p.handlers {
            for s in &h.statements {
                let sql = s.render(&crate::handlers::sql::Parameters);
                if crate::manifest::sql_text::names_qualified(&sql, name) {
                    problems.push(format!(
                        "its handler for {} names its table `{name}` with a schema (the build could not replace it: write `{name}` unqualified)",
                        h.event_type
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Failure::Usage(format!(
        "projector `{}` cannot be rebuilt beside its live tables: {}\n  \
         set rebuild = \"in_place\" under [projectors.{}] (its tables are emptied and replayed where they are), \
         or remove what stands in the way",
        p.name,
        problems.join("; "),
        p.name
    ))
    .into())
}

/// Sets this session's search path with the build schema first: the
/// handlers' unqualified table names then mean the build's tables.
pub async fn enter_build_schema(ctx: &Context, client: &Client) -> Result<()> {
    let current: String = client
        .query_one("SELECT current_setting('search_path')", &[])
        .await?
        .col(0)?;
    client
        .batch_execute(&format!(
            "SET search_path TO {}, {current}",
            quote_ident(&ctx.manifest.build_schema)
        ))
        .await
        .context("setting the search path of a build")
}

/// Creates a build's tables in the build schema like the live ones (and runs
/// the projector's `prepare` SQL there); returns their qualified names, in
/// the order of `p.tables`.
pub async fn create_build_tables(
    ctx: &Context,
    client: &mut Client,
    p: &Projector,
) -> Result<Vec<String>> {
    check_swappable(&*client, p).await?;
    let build = quote_ident(&ctx.manifest.build_schema);
    ensure_schema(&*client, &ctx.manifest.build_schema).await?;
    let tx = client.transaction().await?;
    let mut stored = Vec::new();
    let mut seen = Vec::new();
    for listed in &p.tables {
        let live = resolve(&tx, listed).await?;
        if seen.contains(&live.name) {
            return Err(Failure::Usage(format!(
                "projector `{}` owns two tables named `{}`: a rebuild beside needs distinct names (or rebuild = \"in_place\")",
                p.name, live.name
            ))
            .into());
        }
        seen.push(live.name.clone());
        let target = format!("{build}.{}", quote_ident(&live.name));
        tx.batch_execute(&format!(
            "DROP TABLE IF EXISTS {target} CASCADE; CREATE TABLE {target} (LIKE {} INCLUDING ALL)",
            live.qualified()
        ))
        .await
        .with_context(|| format!("creating the build's table {target}"))?;
        copy_around(&tx, &live, &target).await?;
        stored.push(format!("{}.{}", ctx.manifest.build_schema, live.name));
    }
    if let Some(prepare) = &p.prepare {
        let current: String = tx
            .query_one("SELECT current_setting('search_path')", &[])
            .await?
            .col(0)?;
        tx.batch_execute(&format!(
            "SET LOCAL search_path TO {build}, {current}; {prepare}"
        ))
        .await
        .with_context(|| format!("running the `prepare` SQL of projector `{}`", p.name))?;
    }
    tx.commit().await.context("creating the build's tables")?;
    Ok(stored)
}

/// Creates `schema` unless it exists, on its own (not in a transaction):
/// builds of one boot run side by side, and a concurrent `CREATE SCHEMA IF
/// NOT EXISTS` can still meet the other's (a unique violation): it exists.
pub async fn ensure_schema(client: &impl GenericClient, schema: &str) -> Result<()> {
    match client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(schema)
        ))
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.code().map(|c| c.code()), Some("23505") | Some("42P06")) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating schema {schema}")),
    }
}

/// What `LIKE … INCLUDING ALL` leaves out: grants, the owner, row-level
/// security, foreign keys to other tables, triggers.
async fn copy_around(tx: &Transaction<'_>, live: &Table, target: &str) -> Result<()> {
    let oid_of = "to_regclass($1)";
    let src = live.qualified();
    // Definitions with every name qualified.
    let saved = qualify_names(tx).await?;
    let mut statements = Vec::new();
    for r in tx
        .query(
            &format!(
                "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END, \
                        a.privilege_type, a.is_grantable \
                 FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a WHERE c.oid = {oid_of}"
            ),
            &[&src],
        )
        .await?
    {
        let (grantee, privilege, grantable): (String, String, bool) = (r.col(0)?, r.col(1)?, r.col(2)?);
        statements.push(format!(
            "GRANT {privilege} ON {target} TO {grantee}{}",
            if grantable { " WITH GRANT OPTION" } else { "" }
        ));
    }
    let owner = tx
        .query_one(
            &format!(
                "SELECT quote_ident(pg_get_userbyid(relowner)), pg_has_role(relowner, 'MEMBER'), relrowsecurity \
                 FROM pg_class WHERE oid = {oid_of}"
            ),
            &[&src],
        )
        .await?;
    let (owner, may_own, rls): (String, bool, bool) = (owner.col(0)?, owner.col(1)?, owner.col(2)?);
    if may_own {
        statements.push(format!("ALTER TABLE {target} OWNER TO {owner}"));
    } else {
        tracing::warn!(
            "the build's table {target} is owned by the current user, not by {owner} (no privilege to give it away)"
        );
    }
    if rls {
        statements.push(format!("ALTER TABLE {target} ENABLE ROW LEVEL SECURITY"));
    }
    let comment: Option<String> = tx
        .query_one(
            &format!("SELECT obj_description({oid_of}, 'pg_class')"),
            &[&src],
        )
        .await?
        .col(0)?;
    if let Some(c) = comment {
        statements.push(format!(
            "COMMENT ON TABLE {target} IS {}",
            quote_literal(&c)
        ));
    }
    for r in tx
        .query(
            &format!(
                "SELECT quote_ident(conname), pg_get_constraintdef(oid) FROM pg_constraint \
                 WHERE conrelid = {oid_of} AND contype = 'f'"
            ),
            &[&src],
        )
        .await?
    {
        let (name, def): (String, String) = (r.col(0)?, r.col(1)?);
        statements.push(format!("ALTER TABLE {target} ADD CONSTRAINT {name} {def}"));
    }
    let on_live = format!(" ON {src} ");
    for r in tx
        .query(
            &format!(
                "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = {oid_of} AND NOT tgisinternal"
            ),
            &[&src],
        )
        .await?
    {
        let def: String = r.col(0)?;
        statements.push(def.replacen(&on_live, &format!(" ON {target} "), 1));
    }
    restore_search_path(tx, &saved).await?;
    for s in statements {
        tx.batch_execute(&s)
            .await
            .with_context(|| format!("copying to the build's table: {s}"))?;
    }
    Ok(())
}

/// A projector whose version `incoming` (a build, or a kept previous
/// version) becomes live in a swap, in state `state`.
pub struct Member<'a> {
    pub projector: &'a Projector,
    pub incoming: VersionRow,
    pub state: State,
}

/// What a swap did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Swapped {
    pub projectors: Vec<String>,
    /// How long the live tables were locked (readers waited at most this).
    pub lock_ms: f64,
    /// How many tries it took (a long reader makes it try again).
    pub attempts: u32,
}

/// Swaps every member's incoming version in, in one transaction, trying
/// again while long readers hold the live tables.
pub async fn swap(ctx: &Context, client: &mut Client, members: &[Member<'_>]) -> Result<Swapped> {
    ensure_schema(&*client, &ctx.manifest.previous_schema).await?;
    let mut attempt = 1;
    loop {
        match swap_once(ctx, client, members).await {
            Ok(lock) => {
                let swapped = Swapped {
                    projectors: members.iter().map(|m| m.projector.name.clone()).collect(),
                    lock_ms: lock.as_secs_f64() * 1000.0,
                    attempts: attempt,
                };
                tracing::info!(
                    "swapped in {} (readers waited at most {:.1} ms)",
                    swapped
                        .projectors
                        .iter()
                        .zip(members)
                        .map(|(n, m)| format!("`{n}` version {}", m.incoming.version))
                        .collect::<Vec<_>>()
                        .join(", "),
                    swapped.lock_ms
                );
                return Ok(swapped);
            }
            Err(e)
                if attempt < SWAP_ATTEMPTS
                    && matches!(
                        crate::error::sqlstate(&e).as_deref(),
                        Some("55P03") | Some("40P01")
                    ) =>
            {
                tracing::warn!(
                    "the swap gave way to a reader of the live tables ({}): trying again (attempt {attempt} of {SWAP_ATTEMPTS})",
                    if crate::error::sqlstate(&e).as_deref() == Some("40P01") {
                        "it held one table and wanted another the swap held".to_string()
                    } else {
                        format!("it held a table longer than {SWAP_LOCK_TIMEOUT}")
                    }
                );
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// One try at the swap; returns how long the live tables were locked.
async fn swap_once(ctx: &Context, client: &mut Client, members: &[Member<'_>]) -> Result<Duration> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'"))
        .await?;
    // Play's batches hold these while they run; taking them waits for the batch in flight.
    let mut lives = Vec::new();
    for m in members {
        let name = &m.projector.name;
        ctx.locks.xact_lock(&tx, LockKey::Projector(name)).await?;
        let live = ctx
            .ledger
            .lock_row(&tx, name, crate::ledger::Record::Live, None)
            .await?
            .ok_or_else(|| Failure::Usage(format!("projector `{name}` has no ledger row")))?;
        check_swappable(&tx, m.projector).await?;
        lives.push(live);
    }
    // Every live table at once, in one order: a reader of several waits for
    // the whole swap (or, holding one, makes the swap give way and try again).
    let tables: Vec<String> = members
        .iter()
        .flat_map(|m| m.projector.tables.iter().map(|t| quote_qualified(t)))
        .collect();
    if !tables.is_empty() {
        tx.batch_execute(&format!(
            "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            tables.join(", ")
        ))
        .await
        .context("locking the live tables")?;
    }
    let locked = Instant::now();
    let views = dependent_views(&tx, members).await?;
    for (m, live) in members.iter().zip(&lives) {
        let (stored, renamed) = exchange_tables(ctx, &tx, m, live.version).await?;
        ctx.ledger
            .exchange(&tx, &m.incoming, m.state, (live, &stored, &renamed))
            .await?;
        let note = serde_json::json!({
            "event": "swapped",
            "projector": m.projector.name,
            "version": m.incoming.version,
            "previous_version": live.version,
        });
        tx.execute(
            "SELECT pg_notify('projectionist', $1)",
            &[&note.to_string()],
        )
        .await?;
    }
    for (name, def) in &views {
        tx.batch_execute(&format!("CREATE OR REPLACE VIEW {name} AS {def}"))
            .await
            .with_context(|| format!("recreating view {name} on the new tables"))?;
    }
    tx.commit().await.context("committing the swap")?;
    Ok(locked.elapsed())
}

/// The views that read the members' live tables: (qualified name, definition
/// with every name qualified), to recreate on the tables that take the names.
async fn dependent_views(
    tx: &Transaction<'_>,
    members: &[Member<'_>],
) -> Result<Vec<(String, String)>> {
    let tables: Vec<String> = members
        .iter()
        .flat_map(|m| m.projector.tables.iter().map(|t| quote_qualified(t)))
        .collect();
    let views: Vec<u32> = tx
        .query(
            "SELECT DISTINCT v.oid FROM pg_depend d \
             JOIN pg_rewrite w ON w.oid = d.objid JOIN pg_class v ON v.oid = w.ev_class \
             WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass \
               AND d.refobjid IN (SELECT to_regclass(t) FROM unnest($1::text[]) t) AND v.relkind = 'v'",
            &[&tables],
        )
        .await
        .context("looking for the views that read the live tables")?
        .iter()
        .map(|r| r.col(0))
        .collect::<Result<_>>()?;
    let saved = qualify_names(tx).await?;
    let rows = tx
        .query(
            "SELECT oid::regclass::text, pg_get_viewdef(oid) FROM pg_class WHERE oid = ANY($1)",
            &[&views],
        )
        .await?;
    restore_search_path(tx, &saved).await?;
    rows.iter().map(|r| Ok((r.col(0)?, r.col(1)?))).collect()
}

/// Sets the search path so that definitions come out with every name
/// qualified; returns the search path to restore.
async fn qualify_names(tx: &Transaction<'_>) -> Result<String> {
    let saved: String = tx
        .query_one("SELECT current_setting('search_path')", &[])
        .await?
        .col(0)?;
    tx.batch_execute("SET LOCAL search_path = pg_catalog")
        .await?;
    Ok(saved)
}

async fn restore_search_path(tx: &Transaction<'_>, saved: &str) -> Result<()> {
    tx.execute("SELECT set_config('search_path', $1, true)", &[&saved])
        .await?;
    Ok(())
}

/// Moves a member's live tables out to the previous schema and its incoming
/// tables in; returns where the outgoing tables went, and the companions
/// (indexes, sequences) renamed on the way.
async fn exchange_tables(
    ctx: &Context,
    tx: &Transaction<'_>,
    m: &Member<'_>,
    live_version: i32,
) -> Result<(Vec<String>, serde_json::Value)> {
    let previous = quote_ident(&ctx.manifest.previous_schema);
    let mut stored = Vec::new();
    let mut renamed = serde_json::Map::new();
    for (i, listed) in m.projector.tables.iter().enumerate() {
        let live = resolve(tx, listed).await?;
        let incoming = m.incoming.stored.get(i).ok_or_else(|| {
            Failure::Usage(format!(
                "version {} of projector `{}` has no table for `{listed}` (its tables changed): rebuild it",
                m.incoming.version, m.projector.name
            ))
        })?;
        let incoming = resolve(tx, incoming).await?;
        // Sequences a serial column of the live table owns stay where they
        // are (the build's column default uses them too) and go to the new table.
        let serials = detach_sequences(tx, &live, &incoming).await?;
        // The live table and its companions go out, renamed by version.
        let suffix = format!("__v{live_version}");
        let out_name = free_name(tx, &ctx.manifest.previous_schema, &live.name, &suffix).await?;
        let old_companions = companions(tx, &live.qualified()).await?;
        for c in &old_companions {
            let new = free_name(tx, &ctx.manifest.previous_schema, &c.name, &suffix).await?;
            tx.batch_execute(&format!(
                "ALTER {} {}.{} RENAME TO {}",
                c.kind,
                quote_ident(&live.schema),
                quote_ident(&c.name),
                quote_ident(&new)
            ))
            .await?;
            renamed.insert(
                format!("{}.{new}", ctx.manifest.previous_schema),
                c.name.clone().into(),
            );
        }
        tx.batch_execute(&format!(
            "ALTER TABLE {} SET SCHEMA {previous}; ALTER TABLE {previous}.{} RENAME TO {}",
            live.qualified(),
            quote_ident(&live.name),
            quote_ident(&out_name)
        ))
        .await
        .with_context(|| format!("moving {} out", live.qualified()))?;
        stored.push(format!("{}.{out_name}", ctx.manifest.previous_schema));
        // The incoming table takes the live name, and its companions the old names.
        if incoming.name != live.name {
            tx.batch_execute(&format!(
                "ALTER TABLE {} RENAME TO {}",
                incoming.qualified(),
                quote_ident(&live.name)
            ))
            .await
            .with_context(|| format!("naming {} {}", incoming.qualified(), live.name))?;
        }
        tx.batch_execute(&format!(
            "ALTER TABLE {}.{} SET SCHEMA {}",
            quote_ident(&incoming.schema),
            quote_ident(&live.name),
            quote_ident(&live.schema)
        ))
        .await
        .with_context(|| format!("moving the new {} in", live.qualified()))?;
        let moved_in = Table {
            listed: live.listed.clone(),
            schema: live.schema.clone(),
            name: live.name.clone(),
        };
        restore_companion_names(
            tx,
            &moved_in,
            &incoming,
            &old_companions,
            &m.incoming.renamed,
        )
        .await?;
        for (seq, column) in serials {
            tx.batch_execute(&format!(
                "ALTER SEQUENCE {seq} OWNED BY {}.{}",
                moved_in.qualified(),
                quote_ident(&column)
            ))
            .await
            .with_context(|| {
                format!("giving sequence {seq} to the new {}", moved_in.qualified())
            })?;
        }
    }
    Ok((stored, serde_json::Value::Object(renamed)))
}

/// An index or sequence that goes with a table.
#[derive(Clone, Debug)]
struct Companion {
    /// `INDEX` or `SEQUENCE`.
    kind: &'static str,
    name: String,
    /// What it is, whatever its name and its table's: an index's definition
    /// after `USING` (and whether it is unique), a sequence's column.
    shape: String,
}

async fn companions(tx: &Transaction<'_>, table: &str) -> Result<Vec<Companion>> {
    let mut out = Vec::new();
    for r in tx
        .query(
            "SELECT i.relname::text, pg_get_indexdef(i.oid) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid \
             WHERE x.indrelid = to_regclass($1) ORDER BY i.relname",
            &[&table],
        )
        .await?
    {
        let (name, def): (String, String) = (r.col(0)?, r.col(1)?);
        let unique = def.starts_with("CREATE UNIQUE");
        let using = def.split_once(" USING ").map(|x| x.1).unwrap_or(&def);
        out.push(Companion {
            kind: "INDEX",
            name,
            shape: format!("{unique} {using}"),
        });
    }
    for r in tx
        .query(
            "SELECT s.relname::text, a.attname::text FROM pg_depend d \
             JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
             JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
             WHERE d.classid = 'pg_class'::regclass AND d.refobjid = to_regclass($1) AND d.deptype IN ('a', 'i') \
             ORDER BY s.relname",
            &[&table],
        )
        .await?
    {
        let (name, column): (String, String) = (r.col(0)?, r.col(1)?);
        out.push(Companion {
            kind: "SEQUENCE",
            name,
            shape: format!("sequence of {column}"),
        });
    }
    Ok(out)
}

/// After the incoming table took the live name: its companions take back the
/// names they had when it was live (a kept version, by `renamed`), or the
/// names of the outgoing table's companions of the same shape (a build).
async fn restore_companion_names(
    tx: &Transaction<'_>,
    table: &Table,
    incoming: &Table,
    old: &[Companion],
    renamed: &serde_json::Value,
) -> Result<()> {
    let mine = companions(tx, &table.qualified()).await?;
    let mut taken: Vec<bool> = vec![false; old.len()];
    for c in mine {
        let key = format!("{}.{}", incoming.schema, c.name);
        let original = match renamed.get(&key).and_then(|v| v.as_str()) {
            Some(o) => Some(o.to_string()),
            None => old
                .iter()
                .enumerate()
                .find(|(i, o)| !taken[*i] && o.kind == c.kind && o.shape == c.shape)
                .map(|(i, o)| {
                    taken[i] = true;
                    o.name.clone()
                }),
        };
        if let Some(original) = original.filter(|o| *o != c.name) {
            let exists: bool = tx
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL",
                    &[&format!(
                        "{}.{}",
                        quote_ident(&table.schema),
                        quote_ident(&original)
                    )],
                )
                .await?
                .col(0)?;
            if !exists {
                tx.batch_execute(&format!(
                    "ALTER {} {}.{} RENAME TO {}",
                    c.kind,
                    quote_ident(&table.schema),
                    quote_ident(&c.name),
                    quote_ident(&original)
                ))
                .await?;
            }
        }
    }
    Ok(())
}

/// Serial columns' sequences owned by the live table whose column the
/// incoming table has: detached (so they stay in the live schema when the
/// table moves out), to be owned by the incoming table once it is in, so
/// dropping the previous version later keeps them. Returns (sequence, column).
async fn detach_sequences(
    tx: &Transaction<'_>,
    live: &Table,
    incoming: &Table,
) -> Result<Vec<(String, String)>> {
    let rows = tx
        .query(
            "SELECT s.oid::regclass::text, a.attname::text FROM pg_depend d \
             JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
             JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
             WHERE d.classid = 'pg_class'::regclass AND d.refobjid = to_regclass($1) AND d.deptype = 'a' \
               AND EXISTS (SELECT 1 FROM pg_attribute b WHERE b.attrelid = to_regclass($2) \
                           AND b.attname = a.attname AND NOT b.attisdropped)",
            &[&live.qualified(), &incoming.qualified()],
        )
        .await?;
    let mut detached = Vec::new();
    for r in rows {
        let (seq, column): (String, String) = (r.col(0)?, r.col(1)?);
        tx.batch_execute(&format!("ALTER SEQUENCE {seq} OWNED BY NONE"))
            .await
            .with_context(|| format!("detaching sequence {seq}"))?;
        detached.push((seq, column));
    }
    Ok(detached)
}

/// `name + suffix`, cut to PostgreSQL's 63 bytes, made unique in `schema`.
async fn free_name(tx: &Transaction<'_>, schema: &str, name: &str, suffix: &str) -> Result<String> {
    for n in 0.. {
        let tail = if n == 0 {
            suffix.to_string()
        } else {
            format!("{suffix}_{n}")
        };
        let mut head = name.to_string();
        while head.len() + tail.len() > 63 {
            head.pop();
        }
        let candidate = format!("{head}{tail}");
        let taken: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace \
                 WHERE s.nspname = $1 AND c.relname = $2)",
                &[&schema, &candidate],
            )
            .await?
            .col(0)?;
        if !taken {
            return Ok(candidate);
        }
    }
    unreachable!("some name is free")
}

/// What `rollback` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RolledBack {
    pub projector: String,
    pub from_version: i32,
    pub to_version: i32,
    /// Where the kept version stood when it stopped being live.
    pub kept_position: i64,
    pub swap: Swapped,
}

/// Swaps the kept previous version that the manifest names back in; the
/// caller then catches it up (it is left `booting` at the position it kept).
pub async fn rollback(ctx: &Context, client: &mut Client, name: &str) -> Result<RolledBack> {
    let p = ctx.projector(name)?;
    let live = ctx.ledger.row(&*client, name).await?.ok_or_else(|| {
        Failure::Usage(format!(
            "projector `{name}` has no ledger row: nothing to roll back"
        ))
    })?;
    if live.version == p.version {
        return Err(Failure::Usage(format!(
            "projector `{name}` is live at version {} already, the version of {}: nothing to roll back",
            p.version,
            ctx.manifest.path.display()
        ))
        .into());
    }
    let Some(kept) = ctx.ledger.previous(&*client, name, p.version).await? else {
        return Err(Failure::Usage(format!(
            "no previous version {} of projector `{name}` is kept (it was pruned, rebuilt in place, or never live): \
             `projectionist boot` rebuilds version {} from the events",
            p.version, p.version
        ))
        .into());
    };
    let kept_position = kept.position.id;
    let member = Member {
        projector: p,
        incoming: kept,
        state: State::Booting,
    };
    let swap = swap(ctx, client, std::slice::from_ref(&member)).await?;
    Ok(RolledBack {
        projector: name.to_string(),
        from_version: live.version,
        to_version: p.version,
        kept_position,
        swap,
    })
}

/// What `projectionist rollback` did: the swap, then the catch-up.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RollbackReport {
    pub rolled_back: RolledBack,
    pub catch_up: crate::engine::boot::BootReport,
}

/// `projectionist rollback NAME`: under the boot lock, swaps the kept
/// version the manifest names back in, then catches it up from the position
/// it kept (as boot does).
pub async fn roll_back(
    ctx: &Context,
    name: &str,
    lock_timeout: Option<Duration>,
    progress: &crate::report::progress::Progress,
) -> Result<RollbackReport> {
    let mut client = ctx.connect("rollback", crate::db::Session::Holder).await?;
    ctx.ledger.ensure_exists(&client).await?;
    crate::engine::validate::validate(&ctx.manifest, &mut client).await?;
    ctx.locks
        .lock(&ctx.database, &client, LockKey::Boot, lock_timeout)
        .await?;
    let rolled_back = rollback(ctx, &mut client, name).await;
    ctx.locks.unlock(&client, LockKey::Boot).await.ok();
    let rolled_back = rolled_back?;
    let opts = crate::engine::boot::BootOptions {
        names: vec![name.to_string()],
        lock_timeout,
        ..Default::default()
    };
    let catch_up = crate::engine::boot::boot(ctx, opts, progress).await?;
    Ok(RollbackReport {
        rolled_back,
        catch_up,
    })
}

/// A reviewable migration that drops previous versions.
#[derive(Debug)]
pub struct Pruning {
    pub path: PathBuf,
    pub sql: String,
    /// (projector, version) of what it drops.
    pub dropped: Vec<(String, i32)>,
}

/// Writes (returns) the migration that drops the previous versions kept for
/// longer than `min_age`; `None` when there is nothing to drop.
pub async fn prune(
    ctx: &Context,
    client: &impl GenericClient,
    min_age: Duration,
    migrations: &Path,
) -> Result<Option<Pruning>> {
    let cutoff = Utc::now() - chrono::Duration::from_std(min_age).unwrap_or_default();
    let old: Vec<VersionRow> = ctx
        .ledger
        .versions(client)
        .await?
        .into_iter()
        .filter(|v| v.kind == crate::ledger::Kind::Previous)
        .filter(|v| v.kept_since.is_some_and(|k| k <= cutoff))
        .collect();
    if old.is_empty() {
        return Ok(None);
    }
    let mut by_projector: BTreeMap<&str, Vec<&VersionRow>> = BTreeMap::new();
    for v in &old {
        by_projector.entry(&v.projector).or_default().push(v);
    }
    let mut sql = format!(
        "-- Prune previous versions of projectors (written by `projectionist prune` on {}).\n\
         -- They were swapped out by rebuilds and kept so that `projectionist rollback` could bring them back;\n\
         -- after this migration, a rollback to them rebuilds from the events instead.\n",
        Utc::now().format("%Y-%m-%d")
    );
    for (name, versions) in &by_projector {
        for v in versions {
            sql.push_str(&format!(
                "\n-- `{name}` version {}, kept since {}.\n",
                v.version,
                v.kept_since
                    .map(|k| k.format("%Y-%m-%d %H:%M UTC").to_string())
                    .unwrap_or_default()
            ));
            for t in &v.stored {
                sql.push_str(&format!("DROP TABLE IF EXISTS {};\n", quote_qualified(t)));
            }
            sql.push_str(&format!(
                "DELETE FROM {} WHERE version_id = {};\n",
                ctx.ledger.table("holes"),
                v.id
            ));
            sql.push_str(&format!(
                "DELETE FROM {} WHERE id = {};\n",
                ctx.ledger.table("versions"),
                v.id
            ));
        }
    }
    let version = crate::engine::migrate::next_version(migrations)?;
    Ok(Some(Pruning {
        path: migrations.join(format!("V{version}__prune_previous_versions.sql")),
        sql,
        dropped: old
            .iter()
            .map(|v| (v.projector.clone(), v.version))
            .collect(),
    }))
}

/// Starts a build of `p` (or resumes the one under way at the same version):
/// its tables in the build schema, its ledger record. Returns the build's
/// record and where it stands.
pub async fn start_build(
    ctx: &Context,
    shape: &crate::store::StoreShape,
    client: &mut Client,
    p: &Projector,
    writer_wait: Duration,
) -> Result<(i64, Position)> {
    if let Some(b) = ctx.ledger.build(&*client, &p.name).await? {
        let same = b.version == p.version
            && b.mode == p.mode
            && b.tables == p.tables
            && b.partitions == p.partitions
            && tables_exist(&*client, &b.stored).await?;
        if same {
            ctx.ledger.resume_build(&*client, b.id).await?;
            return Ok((b.id, b.position));
        }
        // A build of another version (or shape) was left behind: start over.
        for t in &b.stored {
            client
                .batch_execute(&format!(
                    "DROP TABLE IF EXISTS {} CASCADE",
                    quote_qualified(t)
                ))
                .await?;
        }
        ctx.ledger.forget_version(&*client, b.id).await?;
    }
    let stored = create_build_tables(ctx, client, p).await?;
    let (start, time) =
        crate::engine::start::start_position(shape, &*client, p, writer_wait).await?;
    let id = ctx
        .ledger
        .start_build(&*client, p, (start, time), &stored)
        .await?;
    Ok((id, start))
}

async fn tables_exist(client: &impl GenericClient, tables: &[String]) -> Result<bool> {
    for t in tables {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&quote_qualified(t)])
            .await?
            .col(0)?;
        if !exists {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The state a projector of `mode` is in once it reached the head.
pub fn done_state(mode: Mode) -> State {
    if mode == Mode::Once {
        State::Finished
    } else {
        State::Live
    }
}
