//! The manifest model: `projectors.toml` as the engine sees it.
//!
//! [`Manifest::load`] parses the file (see `parse.rs`), checks everything that
//! can be checked without a database, and reports every problem at once as a
//! [`ManifestError`] that points at the line and key.

mod diagnostics;
mod parse;
pub mod sql_text;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use diagnostics::{ManifestError, Problem};

use sql_text::Statement;

/// The schema of the ledger when `[ledger] schema` does not say.
pub const DEFAULT_LEDGER_SCHEMA: &str = "projectionist";

/// Byte range in the manifest's text, for error messages.
pub type Span = Range<usize>;

#[derive(Clone, Debug)]
pub struct Manifest {
    pub path: PathBuf,
    /// The file's text, kept to point at lines in later (database) errors.
    pub source: String,
    pub store: Store,
    pub ledger_schema: String,
    /// Where rebuilds build beside the live tables.
    pub build_schema: String,
    /// Where previous versions' tables are kept until `prune`.
    pub previous_schema: String,
    pub alert: Option<Vec<String>>,
    /// In the file's order.
    pub projectors: Vec<Projector>,
}

/// Where the events are: a table (or partitioned table, or view) and the
/// columns, or SQL expressions over the row, that hold each part of an event.
#[derive(Clone, Debug)]
pub struct Store {
    /// `table` or `schema.table`.
    pub table: String,
    /// A bigint column, unique and increasing.
    pub position: String,
    /// A column or an SQL expression (e.g. `message->>'type'`).
    pub event_type: String,
    /// A json, jsonb, text or bytea (UTF-8 JSON) column.
    pub data: String,
    /// A column or an SQL expression.
    pub stream: Option<String>,
    /// A timestamptz or timestamp (UTC) column, or an SQL expression.
    pub time: Option<String>,
    /// A json, jsonb, text or bytea (UTF-8 JSON) column.
    pub metadata: Option<String>,
    /// An xid8 column holding `pg_current_xact_id()`: read in (transaction, position) order.
    pub transaction: Option<String>,
    /// A LISTEN/NOTIFY channel that a trigger on the table notifies.
    pub notify: Option<String>,
    /// An SQL condition over the row: rows that are not events for projectors are skipped.
    pub filter: Option<String>,
    /// The `[store]` table.
    pub span: Span,
    /// Where each key's value is, so errors underline the key at fault.
    pub spans: std::collections::BTreeMap<&'static str, Span>,
}

impl Store {
    /// The span of `key`'s value (or of `[store]` when the key is absent).
    pub fn span_of(&self, key: &str) -> Span {
        self.spans.get(key).cloned().unwrap_or(self.span.clone())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    FromBeginning,
    FromNow,
    Once,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "from_beginning" => Mode::FromBeginning,
            "from_now" => Mode::FromNow,
            "once" => Mode::Once,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::FromBeginning => "from_beginning",
            Mode::FromNow => "from_now",
            Mode::Once => "once",
        }
    }
}

/// How a projector is rebuilt (a version bump, `reset`, `verify --heal`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rebuild {
    /// Built beside the live tables in the build schema, then swapped in,
    /// in one short transaction: readers never see an empty read model.
    Swap,
    /// The tables are emptied and replayed where they are.
    InPlace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    Stop,
    Retry,
    Skip,
}

#[derive(Clone, Debug)]
pub struct Projector {
    pub name: String,
    pub mode: Mode,
    pub tables: Vec<String>,
    pub side_effects: bool,
    pub version: i32,
    pub after: Vec<String>,
    /// Where each `after` entry is, for errors.
    pub after_spans: Vec<Span>,
    /// SQL handlers, one per event type, in the file's order.
    pub handlers: Vec<Handler>,
    pub command: Option<Vec<String>>,
    /// Event types a command projector receives (all when `None`).
    pub events: Option<Vec<String>>,
    pub checks: Vec<Check>,
    pub reset: Option<String>,
    /// How a rebuild happens: beside the live tables, then swapped in, or in place.
    pub rebuild: Rebuild,
    /// SQL run on the build's tables before a rebuild beside replays (a new column, an index).
    pub prepare: Option<String>,
    /// Parts its events are split into by a hash of the stream, each with its
    /// own position, played concurrently (1: not partitioned).
    pub partitions: i32,
    /// Where `partitions` is, for errors.
    pub partitions_span: Option<Span>,
    pub on_error: OnError,
    pub max_retries: u32,
    pub ack_timeout: Duration,
    /// The projector's table header or key, for errors.
    pub span: Span,
}

impl Projector {
    /// Event types this projector handles (`None`: every type).
    pub fn event_types(&self) -> Option<Vec<String>> {
        if self.command.is_some() {
            self.events.clone()
        } else {
            Some(self.handlers.iter().map(|h| h.event_type.clone()).collect())
        }
    }
}

#[derive(Clone, Debug)]
pub struct Handler {
    pub event_type: String,
    /// Each SQL string of the handler, split into statements.
    pub statements: Vec<Statement>,
    /// The handler's value in the file.
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub projection: String,
    pub events: String,
    pub span: Span,
}

impl Manifest {
    /// Reads and checks a manifest file.
    pub fn load(path: &Path) -> anyhow::Result<Manifest> {
        let source = std::fs::read_to_string(path).map_err(|e| {
            crate::error::Failure::Usage(format!(
                "cannot read the manifest {}: {e}\n  pass --manifest PATH, or run `projectionist init` to write a starter one",
                path.display()
            ))
        })?;
        Ok(Self::parse(path, source)?)
    }

    /// Parses manifest text; every problem found is in the error.
    pub fn parse(path: &Path, source: String) -> Result<Manifest, ManifestError> {
        parse::parse(path, source)
    }

    /// The manifest's directory: commands (projectors, alert) run there.
    pub fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }

    /// The projectors' names, in the file's order.
    pub fn names(&self) -> Vec<String> {
        self.projectors.iter().map(|p| p.name.clone()).collect()
    }

    pub fn projector(&self, name: &str) -> Option<&Projector> {
        self.projectors.iter().find(|p| p.name == name)
    }

    /// An error pointing into this manifest (used by checks against the database).
    pub fn error(&self, problems: Vec<Problem>) -> ManifestError {
        ManifestError::new(&self.path, &self.source, problems)
    }
}

/// Projector names name migration files, metrics and locks.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 48
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
