//! The failures that decide the process exit code, how an error chain is
//! shown to a person (database errors whole: message, detail, hint,
//! position), and which database errors are worth retrying.
//!
//! The engine returns `anyhow::Error`; a [`Failure`] somewhere in its chain
//! picks the exit code. A lost connection, or a server that shuts down,
//! refuses or cannot be reached, is exit 3 wherever it happens. Anything else
//! is a plain failure (1).

use std::fmt::Write as _;

use tokio_postgres::error::SqlState;

/// The process exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Success = 0,
    /// A projector broke, is unhealthy, or a check failed (also: any other runtime error).
    Unhealthy = 1,
    /// Bad usage or manifest; nothing was changed.
    Usage = 2,
    /// The database is unreachable, was lost, or refused the connection.
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
    /// Could not connect, or lost the database: exit 3. The message names
    /// host and port, never the password.
    #[error("{0}")]
    Unreachable(String),
    /// A lock is held by someone else: exit 4.
    #[error("{0}")]
    Locked(String),
}

/// What kind of trouble a database error is, for retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trouble {
    /// Worth trying again soon on the same connection: a deadlock, a
    /// serialization failure, a statement cancelled from outside.
    Transient,
    /// The connection is gone or the server is going away: reconnect (play)
    /// or exit 3 (every other command).
    Connection,
    /// Anything else.
    Other,
}

/// Classifies an error chain.
pub fn trouble(err: &anyhow::Error) -> Trouble {
    for cause in err.chain() {
        if let Some(Failure::Unreachable(_)) = cause.downcast_ref::<Failure>() {
            return Trouble::Connection;
        }
        if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
            if pg.is_closed() {
                return Trouble::Connection;
            }
            match pg.code() {
                Some(code) => return classify_sqlstate(code),
                // No SQLSTATE: an I/O error on the socket is the connection's;
                // anything else (a value that does not convert) is not.
                None if io_source(pg) => return Trouble::Connection,
                None => return Trouble::Other,
            }
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return Trouble::Connection;
        }
    }
    Trouble::Other
}

/// Whether an error was caused by an I/O error (the socket).
fn io_source(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

fn classify_sqlstate(code: &SqlState) -> Trouble {
    let c = code.code();
    if c.starts_with("08") // connection exception
        || *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
        || *code == SqlState::TOO_MANY_CONNECTIONS
        || *code == SqlState::IDLE_SESSION_TIMEOUT
        || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
    {
        Trouble::Connection
    } else if *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::QUERY_CANCELED
    {
        Trouble::Transient
    } else {
        Trouble::Other
    }
}

/// The SQLSTATE of the database error in a chain, if any.
pub fn sqlstate(err: &anyhow::Error) -> Option<String> {
    err.chain()
        .find_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .and_then(|pg| pg.code())
        .map(|c| c.code().to_string())
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
    }
    if trouble(err) == Trouble::Connection {
        return ExitStatus::Unreachable;
    }
    ExitStatus::Unhealthy
}

/// An error chain on one line, for logs: each cause's first line, the
/// database's message included (`running a batch: ERROR: deadlock detected`).
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = match cause.downcast_ref::<tokio_postgres::Error>() {
            Some(pg) => match pg.as_db_error() {
                Some(db) => format!("{}: {}", db.severity(), db.message()),
                None => pg.to_string(),
            },
            None if cause.is::<tokio_postgres::error::DbError>() => continue,
            None => cause.to_string(),
        };
        let first = text.lines().next().unwrap_or_default().trim().to_string();
        if first.is_empty() || first == "db error" || parts.iter().any(|p| p.contains(&first)) {
            continue;
        }
        parts.push(first);
    }
    parts.join(": ")
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
    if exit_status(err) == ExitStatus::Unreachable && !out.contains("next:") {
        out.push_str(
            "\nnext: check that the database is up and reachable, then run the command again; \
             work committed so far is kept and resumes exactly once",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_is_a_connection_trouble_and_exit_3() {
        let e: anyhow::Error = Failure::Unreachable("gone".into()).into();
        assert_eq!(trouble(&e), Trouble::Connection);
        assert_eq!(exit_status(&e), ExitStatus::Unreachable);
        assert!(render(&e).contains("next:"));
    }

    #[test]
    fn sqlstates_are_classified() {
        assert_eq!(
            classify_sqlstate(&SqlState::T_R_DEADLOCK_DETECTED),
            Trouble::Transient
        );
        assert_eq!(
            classify_sqlstate(&SqlState::ADMIN_SHUTDOWN),
            Trouble::Connection
        );
        assert_eq!(
            classify_sqlstate(&SqlState::CONNECTION_FAILURE),
            Trouble::Connection
        );
        assert_eq!(
            classify_sqlstate(&SqlState::UNIQUE_VIOLATION),
            Trouble::Other
        );
    }

    #[test]
    fn one_line_keeps_every_cause() {
        let e = anyhow::anyhow!("deadlock detected\n  detail: …").context("running a batch");
        assert_eq!(one_line(&e), "running a batch: deadlock detected");
    }

    #[test]
    fn usage_is_exit_2_and_other_errors_exit_1() {
        let e: anyhow::Error = Failure::Usage("bad".into()).into();
        assert_eq!(exit_status(&e), ExitStatus::Usage);
        let e = anyhow::anyhow!("something else");
        assert_eq!(exit_status(&e), ExitStatus::Unhealthy);
        assert_eq!(trouble(&e), Trouble::Other);
    }
}
