//! What runs for an event.
//!
//! - [`sql_text`]: the placeholder rewriter shared by every SQL handler.
//! - [`sql`]: SQL projectors, compiled into one PL/pgSQL function per
//!   projector so that a whole batch runs inside PostgreSQL.
//! - [`command`]: command projectors, a child process speaking JSON lines.

pub mod command;
pub mod sql;
pub mod sql_text;
