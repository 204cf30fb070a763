//! Command projectors: projectors written in any language, run as a child
//! process that reads events as JSON lines on stdin and acknowledges them on
//! stdout.
//!
//! The protocol (PRODUCT.md, "Command projectors"): one JSON object per event
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

use crate::handlers::sql::HandlerFailure;
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

/// A running command projector.
pub struct CommandRunner {
    name: String,
    argv: Vec<String>,
    run: &'static str,
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
    /// `dir`: where the command runs (the manifest's directory).
    pub fn new(p: &Projector, run: &'static str, dir: &std::path::Path) -> CommandRunner {
        CommandRunner {
            name: p.name.clone(),
            argv: p.command.clone().expect("a command projector"),
            run,
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
            .env("PROJECTIONIST_RUN", self.run)
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
        let stdin = BufWriter::with_capacity(256 * 1024, child.stdin.take().expect("piped"));
        let (tx, replies) = mpsc::unbounded_channel();
        let mut stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
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
        let mut err_lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let stderr_done = tokio::spawn(async move {
            while let Ok(Some(line)) = err_lines.next_line().await {
                // The child's logs, passed on (and kept for the error report).
                tracing::info!("{name}: {line}");
                let mut t = tail.lock().unwrap();
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
        if self.process.is_none() {
            self.process = Some(self.spawn()?);
        }
        let mut sent: Vec<(Position, String)> = Vec::new();
        let mut after = from;
        let mut acked: Option<usize> = None;
        loop {
            let page = shape
                .read_event_lines(client, after, to, self.types.as_deref(), PAGE)
                .await?;
            let Some(last) = page.last().map(|(p, _, _)| *p) else {
                break;
            };
            let process = self.process.as_mut().expect("spawned");
            for (pos, event_type, line) in page {
                if let Err(e) = write_line(&mut process.stdin, &line).await {
                    sent.push((pos, event_type));
                    return self
                        .failed(&sent, acked, format!("its stdin closed: {e}"))
                        .await;
                }
                sent.push((pos, event_type));
            }
            // Acks and errors may come while we write; take them as they come.
            while let Ok(reply) = process.replies.try_recv() {
                if let Some(end) = take_reply(reply, &sent, &mut acked) {
                    return self.failed(&sent, acked, end).await;
                }
            }
            after = last;
        }
        let Some((last, _)) = sent.last().cloned() else {
            return Ok(Delivery::Done { sent: 0 });
        };
        let process = self.process.as_mut().expect("spawned");
        let checkpoint = format!("{{\"checkpoint\":{}}}\n", last.id);
        if let Err(e) = async {
            process.stdin.write_all(checkpoint.as_bytes()).await?;
            process.stdin.flush().await
        }
        .await
        {
            return self
                .failed(&sent, acked, format!("its stdin closed: {e}"))
                .await;
        }
        loop {
            if acked == Some(sent.len() - 1) {
                return Ok(Delivery::Done {
                    sent: sent.len() as i64,
                });
            }
            let process = self.process.as_mut().expect("spawned");
            let reply = tokio::time::timeout(self.ack_timeout, process.replies.recv()).await;
            let end = match reply {
                Err(_) => Some(format!(
                    "no ack within {} (ack_timeout) after checkpoint {}",
                    humantime::format_duration(self.ack_timeout),
                    last.id
                )),
                Ok(None) => Some(match process.child.wait().await {
                    Ok(status) if !status.success() => format!("it exited with {status}"),
                    Ok(status) => format!(
                        "it closed its stdout ({status}) before acknowledging {}",
                        last.id
                    ),
                    Err(e) => format!("it closed its stdout: {e}"),
                }),
                Ok(Some(reply)) => take_reply(reply, &sent, &mut acked),
            };
            if let Some(end) = end {
                return self.failed(&sent, acked, end).await;
            }
        }
    }
}

/// Applies one reply; returns why delivery must end, if it must.
fn take_reply(
    reply: Reply,
    sent: &[(Position, String)],
    acked: &mut Option<usize>,
) -> Option<String> {
    {
        match reply {
            Reply::Ack(p) => {
                // Acks may come early and often; each covers every event up to it.
                if let Some(i) = sent.iter().rposition(|(pos, _)| pos.id == p) {
                    if acked.is_none_or(|a| i > a) {
                        *acked = Some(i);
                    }
                    None
                } else if acked.is_some_and(|a| sent[a].0.id == p)
                    || sent.first().is_none_or(|f| p < f.0.id)
                {
                    // A repeated or late ack of something already acknowledged.
                    None
                } else {
                    Some(format!(
                        "protocol error: it acknowledged position {p}, which was not sent in this batch"
                    ))
                }
            }
            Reply::Error { message, position } => {
                // Everything before the failing event counts as done.
                if let Some(i) = sent.iter().position(|(pos, _)| pos.id == position) {
                    *acked = if i == 0 {
                        *acked
                    } else {
                        Some(i - 1).max(*acked)
                    };
                }
                Some(format!("error at {position}: {message}"))
            }
            Reply::Protocol(line) => Some(format!(
                "protocol error: unexpected line on stdout: `{}` (expected {{\"ack\": P}} or {{\"error\": \"…\", \"position\": P}}; write logs to stderr)",
                line.chars().take(200).collect::<String>()
            )),
        }
    }
}

impl CommandRunner {
    /// Ends the process and describes the failure at the first unacknowledged event.
    async fn failed(
        &mut self,
        sent: &[(Position, String)],
        mut acked: Option<usize>,
        mut why: String,
    ) -> Result<Delivery> {
        let mut stderr_tail = String::new();
        if let Some(mut p) = self.process.take() {
            drop(p.stdin);
            // Give it a moment to exit and flush its stderr, then make sure it is gone.
            if tokio::time::timeout(Duration::from_secs(2), p.child.wait())
                .await
                .is_err()
            {
                let _ = p.child.kill().await;
            }
            // What it acknowledged before it went counts (not after an error line: that is
            // where it stopped); its exit status explains a closed pipe.
            let reported_error = why.starts_with("error at ");
            while !reported_error
                && let Ok(Some(reply)) =
                    tokio::time::timeout(Duration::from_millis(200), p.replies.recv()).await
            {
                if let Some(end) = take_reply(reply, sent, &mut acked)
                    && !end.starts_with("protocol error: it acknowledged")
                {
                    why = end;
                    break;
                }
            }
            if why.starts_with("its stdin closed")
                && let Ok(Some(status)) = p.child.try_wait()
                && !status.success()
            {
                why = format!("it exited with {status}");
            }
            // Every line it wrote before exiting is in the tail once its stderr closes.
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut p.stderr_done).await;
            let tail = p.stderr.lock().unwrap();
            if !tail.is_empty() {
                stderr_tail = format!(
                    "\nstderr (last {} lines):\n{}",
                    tail.len(),
                    tail.iter().cloned().collect::<Vec<_>>().join("\n")
                );
            }
        }
        let first_unacked = acked
            .map(|a| a + 1)
            .unwrap_or(0)
            .min(sent.len().saturating_sub(1));
        let (pos, event_type) = sent.get(first_unacked).cloned().unwrap_or_default();
        Ok(Delivery::Failed {
            acked: acked.map(|a| sent[a].0),
            sent: sent.len() as i64,
            failure: Box::new(HandlerFailure {
                position: pos.id,
                tx: pos.tx,
                event_type,
                stream: None,
                sqlstate: String::new(),
                message: format!("command `{}` failed: {why}{stderr_tail}", self.argv.join(" ")),
                detail: None,
                hint: Some("the command must acknowledge each checkpoint with {\"ack\": P} on stdout and exit 0".into()),
                context: None,
            }),
        })
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
