//! A running `projectionist play` ([`Player`]), the projectors it owns, and
//! [`wait_for`]: polling a condition with a deadline, showing the players'
//! logs when it does not come.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{TestDb, owners};

/// A running `projectionist play`, its stderr in a file; killed when dropped.
pub struct Player {
    pub child: Child,
    log: PathBuf,
}

impl Player {
    pub fn start(db: &TestDb, label: &str, args: &[&str]) -> Player {
        let log = db.dir.path().join(format!("play-{label}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut all = vec!["play"];
        all.extend_from_slice(args);
        let mut cmd = db.command(&all);
        cmd.stdout(Stdio::null()).stderr(file);
        Player {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        format!(
            "--- play pid {} stderr ({})\n{}",
            self.pid(),
            self.log.display(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "play exited ({status}) while it should be running\n{}",
                self.log()
            );
        }
    }

    /// SIGTERM, then waits up to 10 s for the exit.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        self.assert_running();
        let sent = Instant::now();
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, sent.elapsed());
            }
            if sent.elapsed() > Duration::from_secs(10) {
                panic!("play did not exit within 10 s of SIGTERM\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM; asserts exit 0 within 10 s.
    #[track_caller]
    pub fn stop(&mut self) -> Duration {
        let (status, took) = self.terminate();
        assert_eq!(
            status.code(),
            Some(0),
            "play exited {status} on SIGTERM\n{}",
            self.log()
        );
        took
    }

    pub fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Player {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Projectors owned by the runner with this OS pid.
pub async fn owned_by(c: &Client, runner: &Player) -> Vec<String> {
    let tag = format!("pid {}", runner.pid());
    owners(c)
        .await
        .into_iter()
        .filter(|(_, app)| app.ends_with(&tag))
        .map(|(p, _)| p)
        .collect()
}

/// How long `wait_for` waits for what should happen within a second or two:
/// generous, because a loaded CI machine can stall a commit for seconds (the
/// timing the contract promises is asserted separately, on the returned time).
pub const PATIENCE: f64 = 30.0;

/// Polls `cond` every 20 ms until it holds; panics after `secs` with the
/// logs of `players` (none: `&[]`). Returns how long it took.
pub async fn wait_for(
    what: &str,
    secs: f64,
    players: &[&Player],
    mut cond: impl AsyncFnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if cond().await {
            return start.elapsed();
        }
        if start.elapsed() > Duration::from_secs_f64(secs) {
            let logs: Vec<String> = players.iter().map(|p| p.log()).collect();
            panic!(
                "timed out after {secs} s waiting for {what}\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
