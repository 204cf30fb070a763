//! Command projectors: projectors written in any language, run as a child
//! process that reads events as JSON lines on stdin and acknowledges them on
//! stdout.
//!
//! The protocol: one JSON object per event
//! (`position`, `type`, `stream`, `time`, `data`, `metadata`), then
//! `{"checkpoint": P}` at the end of each batch; the process answers
//! `{"ack": P}` once every event up to P is done, or
//! `{"error": "…", "position": P}`. Anything else on stdout is a protocol
//! error. The highest acknowledged position is what the ledger records, so
//! delivery is at least once and the event's `position` is the idempotency key.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;
use tokio_postgres::GenericClient;

use crate::db::Database;
use crate::failure::{HandlerFailure, Origin};
use crate::ledger::Run;
use crate::manifest::Projector;
use crate::store::{Position, StoreShape};

/// Lines of the child's stderr kept for error reports.
const STDERR_TAIL: usize = 20;
/// Events read from the store per query while delivering a batch.
const PAGE: i64 = 5_000;

/// What the child said on stdout.
#[derive(Debug, PartialEq)]
enum Reply {
    Ack(i64),
    Error {
        message: String,
        position: i64,
    },
    /// A line the protocol does not allow.
    Protocol(String),
}

fn parse_reply(line: &str) -> Reply {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(line) else {
        return Reply::Protocol(line.to_string());
    };
    match (
        map.get("ack"),
        map.get("error"),
        map.get("position"),
        map.len(),
    ) {
        (Some(a), None, None, 1) => match a.as_i64() {
            Some(p) => Reply::Ack(p),
            None => Reply::Protocol(line.to_string()),
        },
        (None, Some(e), Some(p), 2) => match (e.as_str(), p.as_i64()) {
            (Some(e), Some(p)) => Reply::Error {
                message: e.to_string(),
                position: p,
            },
            _ => Reply::Protocol(line.to_string()),
        },
        _ => Reply::Protocol(line.to_string()),
    }
}

/// Why a delivery ended early.
#[derive(Debug)]
enum Stop {
    /// `{"error": …, "position": P}`: it stopped at P.
    ErrorLine { position: i64, message: String },
    /// Writing to its stdin failed.
    StdinClosed(std::io::Error),
    /// It exited with a failure.
    Exited(std::process::ExitStatus),
    /// It closed its stdout before acknowledging the checkpoint.
    StdoutClosed {
        status: Option<std::process::ExitStatus>,
        checkpoint: i64,
    },
    /// No ack within `ack_timeout` after a checkpoint.
    NoAck { timeout: Duration, checkpoint: i64 },
    /// It acknowledged a position that was not sent in this batch.
    UnknownAck(i64),
    /// A line the protocol does not allow.
    Protocol(String),
    /// An event of the batch cannot be sent: its payload does not decode.
    Undecodable(Box<HandlerFailure>),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::ErrorLine { position, message } => write!(f, "error at {position}: {message}"),
            Stop::StdinClosed(e) => write!(f, "its stdin closed: {e}"),
            Stop::Exited(status) => write!(f, "it exited with {status}"),
            Stop::StdoutClosed {
                status: Some(status),
                checkpoint,
            } => write!(
                f,
                "it closed its stdout ({status}) before acknowledging {checkpoint}"
            ),
            Stop::StdoutClosed {
                status: None,
                checkpoint,
            } => write!(f, "it closed its stdout before acknowledging {checkpoint}"),
            Stop::NoAck {
                timeout,
                checkpoint,
            } => write!(
                f,
                "no ack within {} (ack_timeout) after checkpoint {checkpoint}",
                humantime::format_duration(*timeout)
            ),
            Stop::UnknownAck(p) => write!(
                f,
                "protocol error: it acknowledged position {p}, which was not sent in this batch"
            ),
            Stop::Protocol(line) => write!(
                f,
                "protocol error: unexpected line on stdout: `{}` (expected {{\"ack\": P}} or {{\"error\": \"…\", \"position\": P}}; write logs to stderr)",
                line.chars().take(200).collect::<String>()
            ),
            Stop::Undecodable(failure) => write!(f, "event #{} does not decode", failure.position),
        }
    }
}

/// A running command projector.
pub struct CommandRunner {
    name: String,
    argv: Vec<String>,
    run: Run,
    database: Database,
    types: Option<Vec<String>>,
    ack_timeout: Duration,
    dir: std::path::PathBuf,
    process: Option<Process>,
}

struct Process {
    child: Child,
    stdin: BufWriter<ChildStdin>,
    replies: mpsc::UnboundedReceiver<Reply>,
    stderr: Arc<Mutex<VecDeque<String>>>,
    /// Ends when the child's stderr closes: awaited so the tail is complete.
    stderr_done: tokio::task::JoinHandle<()>,
}

/// The end of one delivered batch.
#[derive(Debug)]
pub enum Delivery {
    /// Every event up to the batch's end was acknowledged; `sent` were delivered.
    Done { sent: i64 },
    /// The process failed: `acked` is the last acknowledged event of this batch, if any.
    Failed {
        acked: Option<Position>,
        sent: i64,
        failure: Box<HandlerFailure>,
    },
}

impl CommandRunner {
    /// `dir`: where the command runs (the manifest's directory); `argv` its command.
    pub fn new(
        p: &Projector,
        argv: &[String],
        run: Run,
        database: &Database,
        dir: &std::path::Path,
    ) -> CommandRunner {
        CommandRunner {
            name: p.name.clone(),
            argv: argv.to_vec(),
            run,
            database: database.clone(),
            types: p.events.clone(),
            ack_timeout: p.ack_timeout,
            dir: dir.to_path_buf(),
            process: None,
        }
    }

    fn spawn(&self) -> Result<Process> {
        let mut child = tokio::process::Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .env("PROJECTIONIST_PROJECTOR", &self.name)
            .env("PROJECTIONIST_RUN", self.run.as_str())
            .current_dir(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting the command of projector `{}`: {}",
                    self.name,
                    self.argv.join(" ")
                )
            })?;
        let (Some(stdin), Some(stdout), Some(child_stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            anyhow::bail!("the command of projector `{}` has no pipes", self.name);
        };
        let stdin = BufWriter::with_capacity(256 * 1024, stdin);
        let (tx, replies) = mpsc::unbounded_channel();
        let mut stdout = BufReader::new(stdout).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                if line.trim().is_empty() {
                    continue;
                }
                if tx.send(parse_reply(line.trim())).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr.clone();
        let name = self.name.clone();
        let mut err_lines = BufReader::new(child_stderr).lines();
        let stderr_done = tokio::spawn(async move {
            while let Ok(Some(line)) = err_lines.next_line().await {
                // The child's logs, passed on (and kept for the error report).
                tracing::info!("{name}: {line}");
                let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                if t.len() == STDERR_TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        Ok(Process {
            child,
            stdin,
            replies,
            stderr,
            stderr_done,
        })
    }

    /// Delivers the events in (from, to] and waits for their acknowledgement.
    /// `client` reads the events; while the process works, it is kept alive
    /// with heartbeats.
    pub async fn deliver(
        &mut self,
        shape: &StoreShape,
        client: &impl GenericClient,
        from: Position,
        to: Position,
    ) -> Result<Delivery> {
        if let Some(p) = &mut self.process
            && p.child.try_wait()?.is_some()
        {
            self.process = None;
        }
        let mut process = match self.process.take() {
            Some(p) => p,
            None => self.spawn()?,
        };
        let mut batch = Sent::default();
        let (stop, undecodable) = match self
            .send(&mut process, &mut batch, shape, client, from, to)
            .await
        {
            Ok(Some(Stop::Undecodable(f))) => (None, Some(f)),
            Ok(stop) => (stop, None),
            Err(e) => {
                self.process = Some(process);
                return Err(e);
            }
        };
        // The events before an undecodable one are delivered and acknowledged first.
        let stop = match (stop, batch.events.last()) {
            (Some(stop), _) => Some(stop),
            (None, None) => None,
            (None, Some((last, _))) => {
                let last = last.id;
                self.await_checkpoint(&mut process, &mut batch, client, last)
                    .await?
            }
        };
        let sent = batch.events.len() as i64;
        match (stop, undecodable) {
            (Some(stop), _) => Ok(self.failed(process, batch, stop).await),
            (None, Some(failure)) => {
                self.process = Some(process);
                Ok(Delivery::Failed {
                    acked: batch.events.last().map(|(p, _)| *p),
                    sent,
                    failure,
                })
            }
            (None, None) => {
                self.process = Some(process);
                Ok(Delivery::Done { sent })
            }
        }
    }

    /// Writes the batch's events page by page; takes replies as they come.
    async fn send(
        &self,
        process: &mut Process,
        batch: &mut Sent,
        shape: &StoreShape,
        client: &impl GenericClient,
        from: Position,
        to: Position,
    ) -> Result<Option<Stop>> {
        let mut after = from;
        loop {
            let page = match shape
                .read_event_lines(client, after, to, self.types.as_deref(), PAGE)
                .await
            {
                Ok(page) => page,
                Err(e) if crate::error::trouble(&e) == crate::error::Trouble::Other => {
                    // A row that does not decode: find it, and stop before it.
                    return match self.undecodable(shape, client, after, to, &e).await {
                        Some(failure) => Ok(Some(Stop::Undecodable(failure))),
                        None => Err(e),
                    };
                }
                Err(e) => return Err(e),
            };
            let Some(last) = page.last().map(|(p, _, _)| *p) else {
                return Ok(None);
            };
            for (pos, event_type, line) in page {
                batch.events.push((pos, event_type));
                let write = write_line(&mut process.stdin, &line);
                if let Err(e) = self.database.keep_alive(client, write).await? {
                    return Ok(Some(Stop::StdinClosed(e)));
                }
            }
            // Acks and errors may come while we write; take them as they come.
            while let Ok(reply) = process.replies.try_recv() {
                if let Some(stop) = batch.take(reply) {
                    return Ok(Some(stop));
                }
            }
            after = last;
        }
    }

    /// Sends the checkpoint and waits for everything to be acknowledged.
    async fn await_checkpoint(
        &self,
        process: &mut Process,
        batch: &mut Sent,
        client: &impl GenericClient,
        last: i64,
    ) -> Result<Option<Stop>> {
        let checkpoint = format!("{{\"checkpoint\":{last}}}\n");
        let write = async {
            process.stdin.write_all(checkpoint.as_bytes()).await?;
            process.stdin.flush().await
        };
        if let Err(e) = self.database.keep_alive(client, write).await? {
            return Ok(Some(Stop::StdinClosed(e)));
        }
        loop {
            if batch.all_acked() {
                return Ok(None);
            }
            let wait = tokio::time::timeout(self.ack_timeout, process.replies.recv());
            let stop = match self.database.keep_alive(client, wait).await? {
                Err(_) => Some(Stop::NoAck {
                    timeout: self.ack_timeout,
                    checkpoint: last,
                }),
                Ok(None) => Some(match process.child.wait().await {
                    Ok(status) if !status.success() => Stop::Exited(status),
                    Ok(status) => Stop::StdoutClosed {
                        status: Some(status),
                        checkpoint: last,
                    },
                    Err(_) => Stop::StdoutClosed {
                        status: None,
                        checkpoint: last,
                    },
                }),
                Ok(Some(reply)) => batch.take(reply),
            };
            if stop.is_some() {
                return Ok(stop);
            }
        }
    }

    /// The first event of (after, to] that does not decode, as a failure of
    /// that event (after a page failed to read).
    async fn undecodable(
        &self,
        shape: &StoreShape,
        client: &impl GenericClient,
        after: Position,
        to: Position,
        error: &anyhow::Error,
    ) -> Option<Box<HandlerFailure>> {
        let mut at = after;
        while let Ok(Some(next)) = shape.successor(client, at, to).await {
            if shape
                .read_event_lines(client, at, next, None, 1)
                .await
                .is_err()
            {
                return Some(Box::new(HandlerFailure {
                    origin: Origin::Event,
                    position: next.id,
                    tx: next.tx,
                    event_type: String::new(),
                    stream: None,
                    sqlstate: String::new(),
                    message: format!(
                        "the event's payload is not UTF-8 JSON: {}",
                        crate::error::render(error)
                    ),
                    detail: None,
                    hint: None,
                    context: None,
                }));
            }
            at = next;
        }
        None
    }
}

/// The events of a batch sent so far, and how far they are acknowledged.
#[derive(Default)]
struct Sent {
    events: Vec<(Position, String)>,
    /// Index of the last acknowledged event.
    acked: Option<usize>,
}

impl Sent {
    fn all_acked(&self) -> bool {
        !self.events.is_empty() && self.acked == Some(self.events.len() - 1)
    }

    /// Applies one reply; returns why delivery must end, if it must.
    fn take(&mut self, reply: Reply) -> Option<Stop> {
        match reply {
            Reply::Ack(p) => {
                // Acks may come early and often; each covers every event up to it.
                if let Some(i) = self.events.iter().rposition(|(pos, _)| pos.id == p) {
                    if self.acked.is_none_or(|a| i > a) {
                        self.acked = Some(i);
                    }
                    None
                } else if self.acked.is_some_and(|a| self.events[a].0.id == p)
                    || self.events.first().is_none_or(|f| p < f.0.id)
                {
                    // A repeated or late ack of something already acknowledged.
                    None
                } else {
                    Some(Stop::UnknownAck(p))
                }
            }
            Reply::Error { message, position } => {
                // Everything before the failing event counts as done.
                if let Some(i) = self.events.iter().position(|(pos, _)| pos.id == position)
                    && i > 0
                {
                    self.acked = Some(i - 1).max(self.acked);
                }
                Some(Stop::ErrorLine { position, message })
            }
            Reply::Protocol(line) => Some(Stop::Protocol(line)),
        }
    }
}

impl CommandRunner {
    /// Ends the process and describes the failure at the first unacknowledged event.
    async fn failed(&mut self, mut p: Process, mut batch: Sent, mut stop: Stop) -> Delivery {
        drop(p.stdin);
        // Give it a moment to exit and flush its stderr, then make sure it is gone.
        if tokio::time::timeout(Duration::from_secs(2), p.child.wait())
            .await
            .is_err()
        {
            let _ = p.child.kill().await;
        }
        // What it acknowledged before it went counts (not after an error line:
        // that is where it stopped).
        let reported_error = matches!(stop, Stop::ErrorLine { .. });
        while !reported_error
            && let Ok(Some(reply)) =
                tokio::time::timeout(Duration::from_millis(200), p.replies.recv()).await
        {
            if let Some(end) = batch.take(reply)
                && !matches!(end, Stop::UnknownAck(_))
            {
                stop = end;
                break;
            }
        }
        // Its exit status explains a closed pipe.
        if matches!(stop, Stop::StdinClosed(_))
            && let Ok(Some(status)) = p.child.try_wait()
            && !status.success()
        {
            stop = Stop::Exited(status);
        }
        // Every line it wrote before exiting is in the tail once its stderr closes.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut p.stderr_done).await;
        let mut stderr_tail = String::new();
        let tail = p.stderr.lock().unwrap_or_else(|p| p.into_inner());
        if !tail.is_empty() {
            stderr_tail = format!(
                "\nstderr (last {} lines):\n{}",
                tail.len(),
                tail.iter().cloned().collect::<Vec<_>>().join("\n")
            );
        }
        let events = &batch.events;
        let first_unacked = batch
            .acked
            .map(|a| a + 1)
            .unwrap_or(0)
            .min(events.len().saturating_sub(1));
        let (pos, event_type) = events.get(first_unacked).cloned().unwrap_or_default();
        Delivery::Failed {
            acked: batch.acked.map(|a| events[a].0),
            sent: events.len() as i64,
            failure: Box::new(HandlerFailure {
                origin: Origin::Command,
                position: pos.id,
                tx: pos.tx,
                event_type,
                stream: None,
                sqlstate: String::new(),
                message: format!("command `{}` failed: {stop}{stderr_tail}", self.argv.join(" ")),
                detail: None,
                hint: Some("the command must acknowledge each checkpoint with {\"ack\": P} on stdout and exit 0".into()),
                context: None,
            }),
        }
    }

    /// Closes stdin and waits briefly for the process to exit (end of a run).
    pub async fn finish(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.stdin.shutdown().await;
            drop(p.stdin);
            if tokio::time::timeout(Duration::from_secs(5), p.child.wait())
                .await
                .is_err()
            {
                let _ = p.child.kill().await;
            }
        }
    }
}

async fn write_line(stdin: &mut BufWriter<ChildStdin>, line: &str) -> std::io::Result<()> {
    stdin.write_all(line.as_bytes()).await?;
    stdin.write_all(b"\n").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(parse_reply(r#"{"ack": 12}"#), Reply::Ack(12));
        assert_eq!(
            parse_reply(r#"{"error": "smtp down", "position": 7}"#),
            Reply::Error {
                message: "smtp down".into(),
                position: 7
            }
        );
        assert!(matches!(
            parse_reply("sending email to bob"),
            Reply::Protocol(_)
        ));
        assert!(matches!(
            parse_reply(r#"{"ack": "12"}"#),
            Reply::Protocol(_)
        ));
        assert!(matches!(
            parse_reply(r#"{"ack": 1, "extra": 2}"#),
            Reply::Protocol(_)
        ));
    }
}
