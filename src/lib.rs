//! projectionist: deploy, run and maintain the projectors of an event-sourced
//! system whose events live in PostgreSQL.
//!
//! The library holds the whole engine; the `projectionist` binary is a thin
//! command-line layer over it. The modules follow the architecture:
//!
//! - [`manifest`]: the model of `projectors.toml`, parsed with errors that point at the line.
//! - [`handlers`]: what runs for an event: SQL handlers (placeholders, compiled batches).
//! - [`store`]: the event-store reader: heads, batches, gap safety.
//! - [`ledger`]: the tool's own schema: positions, states, failures, holes, locks.
//! - [`engine`]: the commands' logic: migrate, validate, boot, init.
//! - [`report`]: what people and machines read: progress, tables, JSON.
//! - [`db`]: connecting (URLs, key=value strings, TLS) and rendering database errors.
//! - [`error`]: the failures that choose the exit code.

pub mod db;
pub mod engine;
pub mod error;
pub mod failure;
pub mod handlers;
pub mod ledger;
pub mod manifest;
pub mod report;
pub mod store;
