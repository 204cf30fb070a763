//! The failures that decide the process exit code, and how an error chain is
//! shown to a person (database errors whole: message, detail, hint, position).
//!
//! The engine returns `anyhow::Error`; a [`Failure`] somewhere in its chain
//! picks the exit code of PRODUCT.md. Anything else is a plain failure (1).

use std::fmt::Write as _;

/// Exit codes of PRODUCT.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Success = 0,
    /// A projector broke, is unhealthy, or a check failed (also: any other runtime error).
    Unhealthy = 1,
    /// Bad usage or manifest; nothing was changed.
    Usage = 2,
    /// The database is unreachable or refused the connection.
    Unreachable = 3,
    /// A lock is held and `--no-wait` was given (or the wait timed out).
    Locked = 4,
}

impl ExitStatus {
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// An error that carries its own exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Bad usage, a bad manifest or a schema that does not fit it: exit 2.
    #[error("{0}")]
    Usage(String),
    /// Could not connect: exit 3. The message names host and port, never the password.
    #[error("{0}")]
    Unreachable(String),
    /// A lock is held by someone else: exit 4.
    #[error("{0}")]
    Locked(String),
}

/// The exit status an error asks for.
pub fn exit_status(err: &anyhow::Error) -> ExitStatus {
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return match f {
                Failure::Usage(_) => ExitStatus::Usage,
                Failure::Unreachable(_) => ExitStatus::Unreachable,
                Failure::Locked(_) => ExitStatus::Locked,
            };
        }
        if cause.is::<crate::manifest::ManifestError>() {
            return ExitStatus::Usage;
        }
        if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>()
            && pg.is_closed()
        {
            return ExitStatus::Unreachable;
        }
    }
    ExitStatus::Unhealthy
}

/// Renders an error chain for a person: each cause once, database errors whole.
///
/// tokio-postgres prints a bare "db error" and hides the server's message in
/// its source; this walks the chain and prints the server's fields instead.
pub fn render(err: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut first = true;
    for cause in err.chain() {
        let text = match cause.downcast_ref::<tokio_postgres::Error>() {
            Some(pg) => match pg.as_db_error() {
                Some(db) => crate::db::describe_db_error(db),
                None => pg.to_string(),
            },
            None => {
                if cause
                    .downcast_ref::<tokio_postgres::error::DbError>()
                    .is_some()
                {
                    // Already printed through its tokio_postgres::Error wrapper.
                    continue;
                }
                cause.to_string()
            }
        };
        if text == "db error" || text.is_empty() {
            continue;
        }
        if first {
            out.push_str(&text);
            first = false;
        } else {
            let _ = write!(out, "\n  caused by: {}", text.replace('\n', "\n    "));
        }
    }
    out
}
