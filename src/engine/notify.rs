//! `notify install`: a reviewable migration adding a statement-level trigger
//! on the events table that calls `pg_notify`, so `play` wakes within
//! milliseconds of a new event instead of at its next poll.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::db::{quote_ident, quote_literal, quote_qualified};
use crate::manifest::Manifest;

/// The migration's path and SQL.
pub fn migration(manifest: &Manifest, channel: &str, dir: &Path) -> Result<(PathBuf, String)> {
    let table = quote_qualified(&manifest.store.table);
    let function = quote_ident(&format!("projectionist_notify_{channel}"));
    let sql = format!(
        "-- Wake `projectionist play` within milliseconds of a new event (written by `projectionist notify install`).\n\
         -- A statement-level trigger on {table} calls pg_notify({ch}) once per INSERT statement,\n\
         -- whatever the number of rows. Set `notify = {ch}` under [store] in projectors.toml.\n\
         -- Notifications are only a wake-up: play still reads with gap safety, so nothing is skipped\n\
         -- if one is lost.\n\n\
         CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$\n\
         BEGIN\n  PERFORM pg_notify({ch}, '');\n  RETURN NULL;\nEND\n$$;\n\n\
         DROP TRIGGER IF EXISTS projectionist_notify ON {table};\n\
         CREATE TRIGGER projectionist_notify AFTER INSERT ON {table}\n  FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n",
        ch = quote_literal(channel),
    );
    let version = crate::engine::migrate::next_version(dir)?;
    Ok((
        dir.join(format!("V{version}__projectionist_notify.sql")),
        sql,
    ))
}
