//! The `[alert]` command: run with a JSON document on stdin when a projector
//! breaks, or once when late events are found. Its own failure is reported,
//! never fatal. The documents are built here, and only here.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::engine::Context;
use crate::failure::HandlerFailure;
use crate::ledger::{LateEvent, Run};

/// The document of a broken projector; `stalled` (boot): the projectors
/// stalled beside it, with their positions.
pub fn projector_broken(
    ctx: &Context,
    run: Run,
    projector: &str,
    f: &HandlerFailure,
    stalled: Option<Vec<(String, i64)>>,
) -> Value {
    let mut doc = json!({
        "event": "projector_broken",
        "run": run.as_str(),
        "projector": projector,
        "position": f.position,
        "type": f.event_type,
        "stream": f.stream,
        "error": f.message,
        "detail": f.detail,
        "hint": f.hint,
        "sqlstate": f.sqlstate,
        "database": ctx.database.target(),
        "time": chrono::Utc::now().to_rfc3339(),
    });
    if let Some(stalled) = stalled {
        doc["stalled"] = stalled
            .into_iter()
            .map(|(name, position)| json!({"name": name, "position": position}))
            .collect();
    }
    doc
}

/// The document of late events found (each alerted once).
pub fn late_events(ctx: &Context, run: Run, late: &[LateEvent]) -> Value {
    json!({
        "event": "late_events",
        "run": run.as_str(),
        "late_events": late,
        "error": format!(
            "{} event(s) appeared inside holes their projectors had already passed; they were not applied: reset the projectors to apply them",
            late.len()
        ),
        "database": ctx.database.target(),
        "time": chrono::Utc::now().to_rfc3339(),
    })
}

/// Runs the manifest's alert command, if it has one; `Err` says why it failed.
pub async fn send(ctx: &Context, doc: &Value) -> Result<(), String> {
    match &ctx.manifest.alert {
        Some(command) => run(command, ctx.manifest.dir(), doc).await,
        None => Ok(()),
    }
}

/// How long an alert command may take before it is killed.
const ALERT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `command` (no shell) with `doc` on stdin; `Err` says why it failed.
async fn run(command: &[String], dir: &std::path::Path, doc: &Value) -> Result<(), String> {
    let shown = command.join(" ");
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("the alert command `{shown}` could not start: {e}"))?;
    let Some(mut stdin) = child.stdin.take() else {
        return Err(format!("the alert command `{shown}` has no stdin"));
    };
    let body = format!("{doc}\n");
    let write = async move {
        // A command that ignores its stdin is fine: a closed pipe is not an error here.
        let _ = stdin.write_all(body.as_bytes()).await;
    };
    let wait = async {
        write.await;
        child.wait_with_output().await
    };
    match tokio::time::timeout(ALERT_TIMEOUT, wait).await {
        Err(_) => Err(format!(
            "the alert command `{shown}` did not finish within {}s and was killed",
            ALERT_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("the alert command `{shown}` failed: {e}")),
        Ok(Ok(out)) if !out.status.success() => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(format!(
                "the alert command `{shown}` exited with {}{}",
                out.status,
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", tail.join(" | "))
                }
            ))
        }
        Ok(Ok(_)) => Ok(()),
    }
}
