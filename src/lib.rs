//! projectionist: deploy, run and maintain the projectors of an event-sourced
//! system whose events live in PostgreSQL.
//!
//! The library holds the whole engine; the `projectionist` binary is a thin
//! command-line layer over it (one function per command: `init`, `validate`,
//! `migrate`, `boot`, `play`, `status`, `reset`, `retire`, `verify`,
//! `notify install`, `completions`, `man`). The modules follow the
//! architecture:
//!
//! - [`manifest`]: the model of `projectors.toml`, parsed with errors that point at the line,
//!   and the placeholder lexer of its SQL.
//! - [`store`]: the event-store reader: the store's shape (tables, partitions, views;
//!   columns or expressions; payload decoding), heads, and where each batch may end
//!   without skipping an event.
//! - [`ledger`]: the tool's own schema and every statement on it: positions, states,
//!   failures, passed holes, late events; the advisory locks.
//! - [`handlers`]: what runs for an event: SQL handlers compiled into a PL/pgSQL batch
//!   function, and command projectors speaking JSON lines.
//! - [`failure`]: a projector's failure at an event.
//! - [`engine`]: the commands' logic, one module per command.
//! - [`report`]: what people and machines read: progress, tables, JSON, metrics.
//! - [`db`]: connecting (URLs, key=value strings, TLS, timeouts, server-side session
//!   limits), typed rows, database errors rendered whole.
//! - [`error`]: the failures that choose the exit code, and which errors are transient.

pub mod db;
pub mod engine;
pub mod error;
pub mod failure;
pub mod handlers;
pub mod ledger;
pub mod manifest;
pub mod report;
pub mod store;
