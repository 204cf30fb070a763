//! The integration tests of `projectionist`, in one binary: one module per
//! area, and the [`harness`] they share. nextest runs every test in a process
//! of its own; the tests run the real binary against a real PostgreSQL (see
//! scripts/test).

mod harness;

mod after;
mod boot;
mod cli;
mod command;
mod faults;
mod gaps;
mod operator;
mod partitions;
mod play;
mod rebuild;
mod reliability;
mod reset_retire;
mod status;
mod stores;
mod tls;
mod trust;
