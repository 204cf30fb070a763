//! The `[alert]` command: run with a JSON document on stdin when a projector
//! breaks. Its own failure is reported, never fatal.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// How long an alert command may take before it is killed.
const ALERT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `command` (no shell) with `doc` on stdin; `Err` says why it failed.
pub async fn run(
    command: &[String],
    dir: &std::path::Path,
    doc: &serde_json::Value,
) -> Result<(), String> {
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
    let mut stdin = child.stdin.take().expect("piped stdin");
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
