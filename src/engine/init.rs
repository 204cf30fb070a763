//! `init`: a commented starter `projectors.toml` and a `migrations/`
//! directory. It never overwrites anything.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::error::Failure;

const STARTER_MANIFEST: &str = include_str!("starter.toml");
const STARTER_MIGRATION: &str = "-- Read-model tables of your projectors. `projectionist migrate` applies the files\n\
-- of this directory in order (refinery naming: V{n}__name.sql).\n\
CREATE TABLE IF NOT EXISTS band (\n    id      uuid PRIMARY KEY,\n    name    text NOT NULL UNIQUE,\n    created timestamptz NOT NULL\n);\n";

/// Writes the starter files next to `manifest`; returns what it wrote.
pub fn init(manifest: &Path) -> Result<Vec<PathBuf>> {
    if manifest.exists() {
        return Err(Failure::Usage(format!(
            "{} already exists; init never overwrites\n  edit it, or pass --manifest PATH to write a new one elsewhere",
            manifest.display()
        ))
        .into());
    }
    let dir = manifest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut written = Vec::new();
    std::fs::write(manifest, STARTER_MANIFEST)
        .with_context(|| format!("writing {}", manifest.display()))?;
    written.push(manifest.to_path_buf());
    let migrations = dir.join("migrations");
    if !migrations.exists() {
        std::fs::create_dir_all(&migrations)
            .with_context(|| format!("creating {}", migrations.display()))?;
        let first = migrations.join("V1__read_models.sql");
        std::fs::write(&first, STARTER_MIGRATION)
            .with_context(|| format!("writing {}", first.display()))?;
        written.push(first);
    }
    Ok(written)
}
