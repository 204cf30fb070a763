//! A projector's failure at an event: what the handlers report, what the
//! ledger records, what reports and alerts print. It lives apart from both
//! the handlers and the ledger, which share it.

use crate::store::Position;

/// Where a failure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// An SQL handler: the database's error (with its SQLSTATE).
    Handler,
    /// The event itself could not be read: a payload that is not UTF-8 JSON,
    /// a type or stream expression that fails on this row.
    Event,
    /// A command projector's process: an error line, a non-zero exit, a
    /// closed pipe, a protocol error or a missing ack.
    Command,
}

/// A failure at one event: the event and the error.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HandlerFailure {
    pub origin: Origin,
    pub position: i64,
    /// The failing event's transaction id (with a transaction column).
    #[serde(skip)]
    pub tx: Option<u64>,
    pub event_type: String,
    pub stream: Option<String>,
    /// The database's SQLSTATE; empty for a command's failure.
    pub sqlstate: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    pub context: Option<String>,
}

impl HandlerFailure {
    /// The failing event's place in the order.
    pub fn at(&self) -> Position {
        Position {
            tx: self.tx,
            id: self.position,
        }
    }

    /// One line: `#412312 EventUpdated: null value in column "band"`.
    pub fn short(&self) -> String {
        format!("#{} {}: {}", self.position, self.event_type, self.message)
    }
}
