//! Bounded failure under real faults: a network that goes silent (the
//! harness's [`Proxy`] frozen: sockets open, the kernel still ACKing, nothing
//! delivered), a server shut down, restarted or full (a private [`Cluster`]),
//! deadlocks and cancellations from outside, and signals at every step.
//!
//! What each test holds projectionist to: no command hangs (boot exits 3 within
//! its heartbeat budget, status within `--timeout`, a connection attempt within
//! its deadline); the server drops a frozen client's sessions, locks and
//! transaction within `--session-timeout`, so a second boot or a standby runner
//! goes on; play waits for a lost, restarted or full database instead of
//! exiting; a transient error is never a handler failure; and every event
//! lands exactly once whatever was cut, killed or frozen when (the counter
//! projectors count each event, and their `seen` tables refuse a second one).
//!
//! The tests run with `--session-timeout 4s`, so the bounds are short:
//! heartbeat 1 s, a short query's answer within 1.33 s, the server-side idle
//! timeouts 4 s. Projectionist talks to the database through the proxy when
//! the test freezes the network; the test's own checks always go direct.
//! Timing bounds leave generous margins (a loaded 2-core CI machine): each
//! test prints what it measured.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::harness::*;

/// The session timeout of every projectionist process in these tests.
const SESSION_TIMEOUT: &str = "4s";

// ---------------------------------------------------------------------------
// Helpers

/// A projectionist process of a test (not `play`: see [`Player`]), its output
/// in files of the test's directory.
struct Proc {
    child: Child,
    label: String,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    /// `projectionist --session-timeout 4s ARGS` against `url`.
    fn start(db: &TestDb, label: &str, url: &str, args: &[&str]) -> Proc {
        let out = db.dir.path().join(format!("{label}.stdout"));
        let err = db.dir.path().join(format!("{label}.stderr"));
        let mut all = vec!["--session-timeout", SESSION_TIMEOUT];
        all.extend_from_slice(args);
        let child = db
            .command(&all)
            .env("DATABASE_URL", url)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Proc {
            child,
            label: label.to_string(),
            out,
            err,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// `kill -SIG pid` (e.g. "KILL", "TERM", "HUP").
    fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Waits for the exit, up to `limit`; kills it and fails past that.
    /// Returns the run and when its exit was seen (polled every 10 ms).
    async fn finish(mut self, limit: Duration) -> (Run, Instant) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let at = Instant::now();
                return (
                    Run {
                        code: status.code().unwrap_or(-1),
                        stdout: self.stdout(),
                        stderr: self.stderr(),
                    },
                    at,
                );
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} still running after {limit:?}: it hangs\n--- stdout\n{}\n--- stderr\n{}",
                    self.label,
                    self.stdout(),
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// A counter projector: every `Thing` adds one to `{name}_n` and its
/// position to `{name}_seen` (a second application of an event would break
/// it on the primary key), then sleeps `pace.delay` seconds (the test sets
/// the pace: slow while it injects a fault, 0 to finish quickly).
fn counter(name: &str) -> String {
    format!(
        "[projectors.{name}]\ntables = [\"{name}_seen\"]\n\
         on.Thing = [\"UPDATE {name}_n SET n = n + 1\", \"INSERT INTO {name}_seen (id) VALUES (:position)\", \
         \"SELECT pg_sleep(delay) FROM pace\"]\n\n"
    )
}

fn counter_tables(name: &str) -> String {
    format!(
        "CREATE TABLE {name}_n (n bigint NOT NULL); INSERT INTO {name}_n VALUES (0); \
         CREATE TABLE {name}_seen (id bigint PRIMARY KEY);"
    )
}

/// The Thing store (with its transaction column), the tables of `names`'
/// counters and of `extra`, the `pace` table at `delay` seconds per event, a
/// manifest of the counters and `extra_projectors`, and `events` Things.
/// Returns a direct client.
async fn counters(
    db: &TestDb,
    names: &[&str],
    delay: f64,
    events: i64,
    extra_tables: &str,
    extra_projectors: &str,
) -> Client {
    let tables: String = names.iter().map(|n| counter_tables(n)).collect();
    let projectors: String = names.iter().map(|n| counter(n)).collect();
    let c = thing_store(
        db,
        false,
        &format!("{tables} CREATE TABLE pace (delay float8 NOT NULL); {extra_tables}"),
        &format!("{projectors}{extra_projectors}"),
    )
    .await;
    c.execute("INSERT INTO pace VALUES ($1)", &[&delay])
        .await
        .unwrap();
    if events > 0 {
        add_things(&c, events).await;
    }
    c
}

async fn set_pace(c: &Client, delay: f64) {
    c.execute("UPDATE pace SET delay = $1", &[&delay])
        .await
        .unwrap();
}

async fn failures(c: &Client) -> i64 {
    count(c, "SELECT count(*) FROM projectionist.failures").await
}

/// The counter `name` is live at `head` and counted each of `things` events
/// exactly once; nothing was ever recorded as a failure.
async fn assert_exactly_once(c: &Client, name: &str, head: i64, things: i64) {
    assert_eq!(
        ledger(c, name).await.unwrap(),
        ("live".into(), head),
        "{name}: ledger"
    );
    assert_eq!(
        count(c, &format!("SELECT n FROM {name}_n")).await,
        things,
        "{name}: every event applied exactly once (counter)"
    );
    assert_eq!(
        count(c, &format!("SELECT count(*) FROM {name}_seen")).await,
        things,
        "{name}: every event applied (seen)"
    );
    assert_eq!(failures(c).await, 0, "no failure was recorded");
}

/// What a projector's counter says, and its position, agree (read in one
/// snapshot): only whole batches were ever committed. Returns the position.
async fn assert_whole_batches(c: &Client, name: &str) -> i64 {
    let row = c
        .query_one(
            &format!(
                "SELECT p.position, (SELECT n FROM {name}_n), \
                   (SELECT count(*) FROM events e WHERE e.name = 'Thing' AND e.id <= p.position) \
                 FROM projectionist.projectors p WHERE p.name = $1"
            ),
            &[&name],
        )
        .await
        .unwrap();
    let (p, n, things): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        n, things,
        "{name}: the counter matches the committed position {p}"
    );
    p
}

async fn things_count(c: &Client) -> i64 {
    count(c, "SELECT count(*) FROM events WHERE name = 'Thing'").await
}

/// The pid of the backend of a `projectionist play` session of this database
/// sleeping in a handler (a batch in flight), if any.
async fn sleeping_worker(c: &Client) -> Option<i32> {
    c.query_opt(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
           AND application_name LIKE 'projectionist play%' AND wait_event = 'PgSleep' LIMIT 1",
        &[],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

// ---------------------------------------------------------------------------
// 1. A network that goes silent under boot.

#[tokio::test]
async fn a_boot_whose_network_freezes_exits_3_within_the_session_budget_then_resumes_exactly_once()
{
    let db = TestDb::new().await;
    let c = counters(&db, &["fz_boot"], 0.002, 3_000, "", "").await;
    let proxy = Proxy::start(server_addr(&db.url));
    let boot = Proc::start(
        &db,
        "boot-frozen",
        &proxy.url_for(&db.url),
        &["boot", "--batch-size", "50"],
    );
    wait_for("boot to be under way", PATIENCE, &[], async || {
        position(&c, "fz_boot").await >= 300
    })
    .await;

    proxy.freeze();
    let frozen = Instant::now();
    let (run, exited) = boot.finish(Duration::from_secs(60)).await;
    let took = exited - frozen;
    eprintln!("boot exited {} {took:?} after the freeze", run.code);
    run.expect(3);
    // Heartbeat every 1 s, an answer within 1.33 s: about 2.3 s.
    assert!(
        took < Duration::from_secs(10),
        "boot took {took:?} to give up on a silent database\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("lost the database"),
        "the message says the database was lost: {}",
        run.stderr
    );
    assert!(!run.stderr.contains("broke at"), "{}", run.stderr);
    // Nothing recorded as a failure: the projector is still booting, with whole batches.
    assert_eq!(ledger(&c, "fz_boot").await.unwrap().0, "booting");
    assert_eq!(failures(&c).await, 0);
    let p = assert_whole_batches(&c, "fz_boot").await;
    assert!((300..3_000).contains(&p), "stopped at {p}");

    // The network comes back (what the proxy held is delivered: a batch whose
    // COMMIT it held would commit now); the next boot, direct, finishes the
    // job exactly once.
    proxy.resume();
    set_pace(&c, 0.0).await;
    let again = Instant::now();
    db.run(&["--session-timeout", SESSION_TIMEOUT, "boot"])
        .expect(0);
    eprintln!("the next boot finished in {:?}", again.elapsed());
    assert_exactly_once(&c, "fz_boot", 3_000, 3_000).await;
}

#[tokio::test]
async fn a_boot_started_during_a_partition_exits_3_within_the_connect_deadline() {
    let db = TestDb::new().await;
    let c = counters(&db, &["fz_part"], 0.0, 100, "", "").await;
    let proxy = Proxy::start(server_addr(&db.url));
    let url = proxy.url_for(&db.url);
    proxy.freeze();
    let boot = Proc::start(&db, "boot-partitioned", &url, &["boot"]);
    let started = Instant::now();
    let (run, exited) = boot.finish(Duration::from_secs(60)).await;
    let took = exited - started;
    eprintln!("boot exited {} {took:?} after it started", run.code);
    run.expect(3);
    // The TCP connect succeeds (the proxy accepts), the startup handshake gets
    // no answer: connect_timeout (10 s) bounds the TCP connect only, and the
    // whole attempt is bounded by connect_timeout + 5 s = 15 s.
    assert!(
        took < Duration::from_secs(20),
        "a boot during a partition took {took:?} to give up\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("cannot connect to the database")
            && run.stderr.contains("no answer within"),
        "{}",
        run.stderr
    );
    assert_eq!(ledger(&c, "fz_part").await, None, "nothing was written");

    // The partition heals: the same command through the same proxy works.
    proxy.resume();
    let boot = Proc::start(&db, "boot-healed", &url, &["boot"]);
    let (run, _) = boot.finish(Duration::from_secs(60)).await;
    run.expect(0);
    assert_exactly_once(&c, "fz_part", 100, 100).await;
}

#[tokio::test]
async fn status_through_a_frozen_network_exits_3_within_its_timeout() {
    let db = TestDb::new().await;
    let c = counters(&db, &["fz_status"], 0.0, 10, "", "").await;
    db.run(&["boot"]).expect(0);
    let proxy = Proxy::start(server_addr(&db.url));
    let url = proxy.url_for(&db.url);

    // Frozen before it starts: the connection attempt is what hangs.
    proxy.freeze();
    let status = Proc::start(&db, "status-frozen", &url, &["status", "--timeout", "3s"]);
    let started = Instant::now();
    let (run, exited) = status.finish(Duration::from_secs(60)).await;
    let took = exited - started;
    eprintln!("status exited {} {took:?} after it started", run.code);
    run.expect(3);
    assert!(
        took < Duration::from_secs(6),
        "status --timeout 3s took {took:?}\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("did not answer within 3s"),
        "{}",
        run.stderr
    );

    // Frozen while `status --watch` is connected and refreshing.
    proxy.resume();
    let watch = Proc::start(
        &db,
        "status-watch",
        &url,
        &["status", "--watch", "0.3", "--timeout", "3s"],
    );
    wait_for(
        "status --watch to print a table",
        PATIENCE,
        &[],
        async || watch.stdout().contains("fz_status"),
    )
    .await;
    proxy.freeze();
    let frozen = Instant::now();
    let (run, exited) = watch.finish(Duration::from_secs(60)).await;
    let took = exited - frozen;
    eprintln!(
        "status --watch exited {} {took:?} after the freeze",
        run.code
    );
    run.expect(3);
    assert!(
        took < Duration::from_secs(6),
        "status --watch --timeout 3s took {took:?} after the freeze\n{}",
        run.stderr
    );
    assert_eq!(ledger(&c, "fz_status").await.unwrap(), ("live".into(), 10));
}

#[tokio::test]
async fn the_server_drops_a_frozen_boots_locks_and_a_second_boot_finishes_exactly_once() {
    let db = TestDb::new().await;
    let c = counters(&db, &["fz_lock"], 0.002, 3_000, "", "").await;
    let proxy = Proxy::start(server_addr(&db.url));
    let first = Proc::start(
        &db,
        "boot-first",
        &proxy.url_for(&db.url),
        &["boot", "--batch-size", "50"],
    );
    wait_for(
        "the first boot to be under way",
        PATIENCE,
        &[],
        async || position(&c, "fz_lock").await >= 300,
    )
    .await;

    // The first boot's network goes silent: it holds the boot lock and the
    // projector's lock in sessions the server still sees, until the server
    // drops them (idle timeouts of --session-timeout 4s).
    proxy.freeze();
    let frozen = Instant::now();
    set_pace(&c, 0.0).await;
    let second = Proc::start(
        &db,
        "boot-second",
        &db.url,
        &["boot", "--lock-timeout", "60s"],
    );
    let (run, exited) = second.finish(Duration::from_secs(90)).await;
    let took = exited - frozen;
    eprintln!("the second boot finished {took:?} after the freeze");
    run.expect(0);
    assert!(
        run.stderr.contains("waiting for boot"),
        "the second boot had to wait for the frozen one's lock: {}",
        run.stderr
    );
    assert!(
        took < Duration::from_secs(15),
        "the second boot took {took:?} after the freeze\n{}",
        run.stderr
    );
    let (first_run, _) = first.finish(Duration::from_secs(30)).await;
    first_run.expect(3);
    assert_exactly_once(&c, "fz_lock", 3_000, 3_000).await;

    // What the proxy held, delivered now, changes nothing.
    proxy.resume();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once(&c, "fz_lock", 3_000, 3_000).await;
}

#[tokio::test]
async fn a_boot_waiting_for_the_boot_lock_on_a_frozen_network_exits_3() {
    let db = TestDb::new().await;
    let c = counters(&db, &["fz_wait"], 0.0, 100, "", "").await;
    // The test holds the boot lock, as a running boot would.
    c.execute(
        "SELECT pg_advisory_lock(hashtext('projectionist:projectionist'), hashtext('boot'))",
        &[],
    )
    .await
    .unwrap();
    let proxy = Proxy::start(server_addr(&db.url));
    let boot = Proc::start(
        &db,
        "boot-waiting",
        &proxy.url_for(&db.url),
        &["boot", "--lock-timeout", "60s"],
    );
    wait_for(
        "boot to wait for the boot lock",
        PATIENCE,
        &[],
        async || boot.stderr().contains("waiting for boot"),
    )
    .await;
    proxy.freeze();
    let frozen = Instant::now();
    let (run, exited) = boot.finish(Duration::from_secs(40)).await;
    let took = exited - frozen;
    eprintln!("boot exited {} {took:?} after the freeze", run.code);
    run.expect(3);
    assert!(
        took < Duration::from_secs(10),
        "a boot waiting for the lock took {took:?} to give up on a silent database\n{}",
        run.stderr
    );
    assert_eq!(ledger(&c, "fz_wait").await, None);
}

// ---------------------------------------------------------------------------
// 2. A runner on a network that goes silent.

/// A projector that writes into the store: every `Thing` is echoed by an
/// `Echo` event (`{"of": position}`). Its batches hold a write lock on the
/// store, so a batch in flight holds the other readers' horizon (the store
/// has a transaction column) until it ends.
fn echo(name: &str) -> String {
    format!(
        "[projectors.{name}]\n\
         on.Thing = [\"INSERT INTO events (aggregate_id, aggregate_name, name, data) \
         VALUES (gen_random_uuid(), 'echo', 'Echo', jsonb_build_object('of', :position))\", \
         \"SELECT pg_sleep(delay) FROM pace\"]\n\n"
    )
}

/// Every `Thing` echoed exactly once.
async fn assert_echoed_once(c: &Client) {
    let things = things_count(c).await;
    assert_eq!(
        count(c, "SELECT count(*) FROM events WHERE name = 'Echo'").await,
        things,
        "one Echo per Thing"
    );
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM events t WHERE t.name = 'Thing' AND NOT EXISTS \
             (SELECT 1 FROM events e WHERE e.name = 'Echo' AND (e.data->>'of')::bigint = t.id)"
        )
        .await,
        0,
        "every Thing echoed"
    );
}

/// Both projectors at the head, and every Thing echoed.
async fn caught_up(c: &Client, names: &[&str]) -> bool {
    let h = head(c).await;
    for n in names {
        if position(c, n).await != h {
            return false;
        }
    }
    count(c, "SELECT count(*) FROM events WHERE name = 'Echo'").await == things_count(c).await
}

/// Runner A (through `proxy`) owns `names` (fr_count and fr_echo) and runner B
/// (direct) owns fr_watch, which only B's manifest has. Returns a direct
/// client, the proxy, A and B.
async fn a_and_b_running(db: &TestDb, names: &[&str]) -> (Client, Proxy, Player, Player) {
    let c = counters(db, &["fr_count", "fr_watch"], 0.0, 20, "", &echo("fr_echo")).await;
    // A's manifest: fr_count and fr_echo.
    things_manifest(db, &format!("{}{}", counter("fr_count"), echo("fr_echo")));
    db.run(&["boot"]).expect(0);
    let proxy = Proxy::start(server_addr(&db.url));
    let url = proxy.url_for(&db.url);
    let opts = [
        "--session-timeout",
        SESSION_TIMEOUT,
        "--poll",
        "200ms",
        "--batch-size",
        "5",
    ];
    let mut a_args = vec!["--database-url", url.as_str()];
    a_args.extend_from_slice(&opts);
    let a = Player::start(db, "a", &a_args);
    wait_for(
        "A to own fr_count and fr_echo",
        PATIENCE,
        &[&a],
        async || owned_by(&c, &a).await == names,
    )
    .await;
    // B's manifest adds fr_watch, which only B plays: a reader that is never
    // frozen, whose horizon A's frozen echo batch holds.
    things_manifest(
        db,
        &format!(
            "{}{}{}",
            counter("fr_count"),
            echo("fr_echo"),
            counter("fr_watch")
        ),
    );
    db.run(&["boot"]).expect(0);
    let b = Player::start(db, "b", &opts);
    wait_for("B to own fr_watch", PATIENCE, &[&b], async || {
        owned_by(&c, &b).await == ["fr_watch"]
    })
    .await;
    (c, proxy, a, b)
}

/// A gets busy, then its network goes silent mid-batch: fr_watch (B's) is not
/// held back, B takes A's projectors over and projects every event, each within
/// the bounds, and every event lands exactly once.
async fn freeze_a_mid_batch_and_b_takes_over(
    c: &Client,
    proxy: &Proxy,
    a: &mut Player,
    b: &Player,
    names: &[&str],
    all: &[&str],
) {
    // A is busy: a batch of 5 events takes 0.25 s.
    set_pace(c, 0.05).await;
    add_things(c, 200).await;
    wait_for("A to be busy", PATIENCE, &[a], async || {
        position(c, "fr_count").await > 60 && position(c, "fr_echo").await > 60
    })
    .await;
    assert_eq!(owned_by(c, a).await, names);

    // A's network goes silent mid-batch: its owner locks, and the open
    // transaction of its echo batch (a writer of the store, which holds the
    // readers' horizon), live on in the server until it drops the sessions.
    proxy.freeze();
    let frozen = Instant::now();
    set_pace(c, 0.0).await;
    add_things(c, 30).await; // Committed after the freeze.
    let things = things_count(c).await;
    wait_for(
        "fr_watch (B's) to count the events committed after the freeze",
        PATIENCE,
        &[a, b],
        async || count(c, "SELECT n FROM fr_watch_n").await == things,
    )
    .await;
    let watched = frozen.elapsed();
    wait_for(
        "B to take A's projectors over",
        PATIENCE,
        &[a, b],
        async || owned_by(c, b).await == all,
    )
    .await;
    let took_over = frozen.elapsed();
    wait_for(
        "B to project every event, those committed after the freeze included",
        PATIENCE,
        &[a, b],
        async || caught_up(c, all).await,
    )
    .await;
    let caught = frozen.elapsed();
    eprintln!(
        "after the freeze: fr_watch had the new events in {watched:?}, B took over in {took_over:?}, caught up in {caught:?}"
    );
    assert!(
        watched < Duration::from_secs(15),
        "fr_watch was held {watched:?} by the frozen runner's transaction\n{}",
        b.log()
    );
    assert!(
        took_over < Duration::from_secs(15),
        "B took {took_over:?} to take over\n{}\n{}",
        a.log(),
        b.log()
    );
    assert!(
        caught < Duration::from_secs(15),
        "B took {caught:?} to project what was committed after the freeze\n{}",
        b.log()
    );
    a.assert_running();
    let h = head(c).await;
    for n in ["fr_count", "fr_watch"] {
        assert_exactly_once(c, n, h, things).await;
    }
    assert_echoed_once(c).await;
}

/// A's network comes back: A reconnects (a session of its own opened after
/// now), takes nothing from B, and double-applies nothing.
async fn resume_a_and_it_takes_nothing(
    c: &Client,
    proxy: &Proxy,
    a: &mut Player,
    b: &Player,
    all: &[&str],
) {
    let resumed: String = c.query_one("SELECT now()::text", &[]).await.unwrap().get(0);
    proxy.resume();
    let a_pid = a.pid();
    wait_for("A to reconnect", PATIENCE, &[a], async || {
        count(
            c,
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name LIKE 'projectionist play%pid {a_pid}' \
                 AND backend_start > '{resumed}'::timestamptz"
            ),
        )
        .await
            > 0
    })
    .await;
    add_things(c, 10).await;
    wait_for("B to project new events", PATIENCE, &[a, b], async || {
        caught_up(c, all).await
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    a.assert_running();
    assert!(a.log().contains("lost the database"), "{}", a.log());
    assert_eq!(owned_by(c, a).await, Vec::<String>::new(), "{}", a.log());
    assert_eq!(owned_by(c, b).await, all);
    let (h, things) = (head(c).await, things_count(c).await);
    for n in ["fr_count", "fr_watch"] {
        assert_exactly_once(c, n, h, things).await;
    }
    assert_echoed_once(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_frozen_runners_projectors_and_the_frozen_runner_comes_back_harmless()
 {
    let db = TestDb::new().await;
    let all = ["fr_count", "fr_echo", "fr_watch"];
    let names = ["fr_count", "fr_echo"];
    let (c, proxy, mut a, mut b) = a_and_b_running(&db, &names).await;
    freeze_a_mid_batch_and_b_takes_over(&c, &proxy, &mut a, &b, &names, &all).await;
    resume_a_and_it_takes_nothing(&c, &proxy, &mut a, &b, &all).await;

    // A is a working standby again: B stops, A takes its projectors back.
    b.stop();
    wait_for(
        "A to take its projectors back",
        PATIENCE,
        &[&a],
        async || owned_by(&c, &a).await == names,
    )
    .await;
    add_things(&c, 10).await;
    wait_for("A to project new events", PATIENCE, &[&a], async || {
        caught_up(&c, &names).await
    })
    .await;
    let (h, things) = (head(&c).await, things_count(&c).await);
    assert_exactly_once(&c, "fr_count", h, things).await;
    assert_echoed_once(&c).await;
    a.stop();
}

/// Sends SIGTERM to `play` and waits up to `limit` for its exit: its exit
/// status and how long it took, or None (then it is killed).
async fn sigterm_within(play: &mut Player, limit: Duration) -> Option<(Option<i32>, Duration)> {
    play.assert_running();
    let sent = Instant::now();
    signal(play.pid(), "TERM");
    while sent.elapsed() < limit {
        if let Some(status) = play.child.try_wait().unwrap() {
            return Some((status.code(), sent.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn sigterm_stops_a_play_whose_network_froze_mid_batch() {
    let db = TestDb::new().await;
    let c = counters(&db, &["ft_batch"], 0.0, 0, "", "").await;
    db.run(&["boot"]).expect(0);
    let proxy = Proxy::start(server_addr(&db.url));
    let url = proxy.url_for(&db.url);
    // A 30 s poll: the supervisor's next pass (which would notice the silence
    // and drop the worker) is far away. With the default 1 s poll the same
    // happens whenever SIGTERM comes before the next pass after the freeze.
    let mut play = Player::start(
        &db,
        "term-frozen-batch",
        &[
            "--database-url",
            &url,
            "--session-timeout",
            SESSION_TIMEOUT,
            "--poll",
            "30s",
            "--batch-size",
            "10",
        ],
    );
    wait_for("play to own ft_batch", PATIENCE, &[&play], async || {
        owned_by(&c, &play).await == ["ft_batch"]
    })
    .await;
    set_pace(&c, 0.2).await;
    add_things(&c, 10).await; // One batch of 2 s.
    wait_for(
        "the batch to be in flight",
        PATIENCE,
        &[&play],
        async || sleeping_worker(&c).await.is_some(),
    )
    .await;
    proxy.freeze();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Some((code, took)) = sigterm_within(&mut play, Duration::from_secs(20)).await else {
        panic!(
            "play did not exit within 20 s of SIGTERM (its batch in flight is on a frozen network)\n{}",
            play.log()
        );
    };
    eprintln!("play exited {code:?} {took:?} after SIGTERM");
    // The batch cannot finish: giving it up (the server rolls it back) and
    // exiting 0 as SIGTERM asks, or 3 for the lost database, are both fine.
    assert!(matches!(code, Some(0) | Some(3)), "exit {code:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    set_pace(&c, 0.0).await;
    assert_whole_batches(&c, "ft_batch").await;
    let mut again = Player::start(&db, "again", &["--poll", "200ms"]);
    wait_for(
        "the events to be projected",
        PATIENCE,
        &[&again],
        async || position(&c, "ft_batch").await == 10,
    )
    .await;
    assert_exactly_once(&c, "ft_batch", 10, 10).await;
    again.stop();
}

#[tokio::test]
async fn sigterm_stops_a_play_reconnecting_through_a_frozen_network_at_once() {
    let db = TestDb::new().await;
    let c = counters(&db, &["ft_idle"], 0.0, 10, "", "").await;
    db.run(&["boot"]).expect(0);
    let proxy = Proxy::start(server_addr(&db.url));
    let url = proxy.url_for(&db.url);
    let mut play = Player::start(
        &db,
        "term-frozen-idle",
        &[
            "--database-url",
            &url,
            "--session-timeout",
            SESSION_TIMEOUT,
            "--poll",
            "200ms",
        ],
    );
    wait_for("play to own ft_idle", PATIENCE, &[&play], async || {
        owned_by(&c, &play).await == ["ft_idle"]
    })
    .await;
    proxy.freeze();
    // Play notices within 1.33 s, drops its runner and tries to reconnect.
    wait_for(
        "play to notice the silence",
        PATIENCE,
        &[&play],
        async || play.log().contains("lost the database"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let Some((code, took)) = sigterm_within(&mut play, Duration::from_secs(30)).await else {
        panic!("play did not exit within 30 s of SIGTERM\n{}", play.log());
    };
    eprintln!("play exited {code:?} {took:?} after SIGTERM");
    assert_eq!(code, Some(0));
    assert!(
        took < Duration::from_secs(5),
        "an idle play on a frozen network took {took:?} to stop\n{}",
        play.log()
    );
}

#[tokio::test]
async fn play_whose_network_freezes_during_its_start_up_checks_notices_and_retries() {
    let db = TestDb::new().await;
    let c = counters(&db, &["fv_start"], 0.0, 10, "", "").await;
    db.run(&["boot"]).expect(0);
    // Validation prepares the handlers: a lock on their table holds it up.
    let locker = db.client().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE fv_start_n IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let proxy = Proxy::start(server_addr(&db.url));
    let url = proxy.url_for(&db.url);
    let mut play = Player::start(
        &db,
        "start-frozen",
        &[
            "--database-url",
            &url,
            "--session-timeout",
            SESSION_TIMEOUT,
            "--poll",
            "200ms",
        ],
    );
    wait_for(
        "play's start-up checks to wait for the lock",
        PATIENCE,
        &[&play],
        async || {
            count(
                &c,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE 'projectionist play%' AND wait_event_type = 'Lock'",
            )
            .await
                > 0
        },
    )
    .await;
    proxy.freeze();
    let frozen = Instant::now();
    locker.batch_execute("COMMIT").await.unwrap();
    // The answer never comes: play should notice within its answer budget, say
    // so, and keep trying, as it does for a database it cannot reach.
    tokio::time::sleep(Duration::from_secs(10)).await;
    play.assert_running();
    assert!(
        play.log().contains("cannot reach the database"),
        "play said nothing {:?} after its network froze during its start-up checks\n{}",
        frozen.elapsed(),
        play.log()
    );
    proxy.resume();
    let h = add_things(&c, 5).await;
    wait_for(
        "play to play once the network is back",
        PATIENCE,
        &[&play],
        async || position(&c, "fv_start").await == h,
    )
    .await;
    assert_exactly_once(&c, "fv_start", h, h).await;
    play.stop();
}

// ---------------------------------------------------------------------------
// 3. Transient errors in play are not handler failures.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_in_a_play_batch_is_retried_and_never_a_handler_failure() {
    let db = TestDb::new().await;
    // The handler takes dl_b, sleeps, then takes dl_a.
    let c = thing_store(
        &db,
        false,
        &format!(
            "{} CREATE TABLE dl_a (n int NOT NULL); INSERT INTO dl_a VALUES (0); \
             CREATE TABLE dl_b (n int NOT NULL); INSERT INTO dl_b VALUES (0);",
            counter_tables("fd_dead")
        ),
        "[projectors.fd_dead]\ntables = [\"fd_dead_seen\"]\n\
         on.Thing = [\"UPDATE dl_b SET n = n + 1\", \"SELECT pg_sleep(1.5)\", \"UPDATE dl_a SET n = n + 1\", \
         \"UPDATE fd_dead_n SET n = n + 1\", \"INSERT INTO fd_dead_seen (id) VALUES (:position)\"]\n",
    )
    .await;
    db.run(&["boot"]).expect(0);
    let mut play = Player::start(
        &db,
        "deadlock",
        &["--session-timeout", SESSION_TIMEOUT, "--poll", "200ms"],
    );
    wait_for("play to own fd_dead", PATIENCE, &[&play], async || {
        owned_by(&c, &play).await == ["fd_dead"]
    })
    .await;

    // While play's batch holds dl_b and sleeps, the test's session takes
    // dl_a and waits for dl_b; play's batch then waits for dl_a: a deadlock.
    // The test's session checks for deadlocks only after 60 s, so play's
    // session (deadlock_timeout 1 s) is the one the server aborts. (The test's
    // transaction starts after the event is committed: a transaction running
    // in this database holds back the events committed after it began.)
    let p = add_event(&c, "Thing", serde_json::json!({})).await;
    wait_for(
        "play's batch to hold dl_b",
        PATIENCE,
        &[&play],
        async || sleeping_worker(&c).await.is_some(),
    )
    .await;
    let t = db.client().await;
    t.batch_execute("BEGIN; SET LOCAL deadlock_timeout = '60s'; UPDATE dl_a SET n = n + 1")
        .await
        .unwrap();
    let other = tokio::spawn(async move {
        t.batch_execute("UPDATE dl_b SET n = n + 1").await?;
        t.batch_execute("COMMIT").await
    });
    tokio::time::timeout(Duration::from_secs(30), other)
        .await
        .expect("the test's session waits for dl_b past 30 s: no deadlock was detected")
        .unwrap()
        .expect("the test's session was the deadlock's victim, not play's");

    let took = wait_for(
        "the event to be projected",
        PATIENCE,
        &[&play],
        async || position(&c, "fd_dead").await == p,
    )
    .await;
    eprintln!("projected {took:?} after the deadlock");
    play.assert_running();
    assert!(
        play.log().contains("not a handler failure"),
        "play retried the batch: {}",
        play.log()
    );
    assert_exactly_once(&c, "fd_dead", p, 1).await;
    assert_eq!(count(&c, "SELECT n::bigint FROM dl_a").await, 2);
    assert_eq!(count(&c, "SELECT n::bigint FROM dl_b").await, 2);
    play.stop();
}

#[tokio::test]
async fn a_batch_cancelled_from_outside_in_play_is_retried_and_never_a_handler_failure() {
    let db = TestDb::new().await;
    let c = counters(&db, &["fd_cancel"], 1.0, 0, "", "").await;
    db.run(&["boot"]).expect(0);
    let mut play = Player::start(
        &db,
        "cancel",
        &["--session-timeout", SESSION_TIMEOUT, "--poll", "200ms"],
    );
    wait_for("play to own fd_cancel", PATIENCE, &[&play], async || {
        owned_by(&c, &play).await == ["fd_cancel"]
    })
    .await;
    let p = add_event(&c, "Thing", serde_json::json!({})).await;
    let mut worker = None;
    wait_for(
        "play's batch to sleep in its handler",
        PATIENCE,
        &[&play],
        async || {
            worker = sleeping_worker(&c).await;
            worker.is_some()
        },
    )
    .await;
    let cancelled: bool = c
        .query_one("SELECT pg_cancel_backend($1)", &[&worker.unwrap()])
        .await
        .unwrap()
        .get(0);
    assert!(cancelled);
    set_pace(&c, 0.0).await;
    wait_for(
        "the event to be projected",
        PATIENCE,
        &[&play],
        async || position(&c, "fd_cancel").await == p,
    )
    .await;
    play.assert_running();
    assert!(
        play.log().contains("not a handler failure"),
        "play retried the batch: {}",
        play.log()
    );
    assert_exactly_once(&c, "fd_cancel", p, 1).await;
    play.stop();
}

// ---------------------------------------------------------------------------
// 4. The server goes away: shut down, restarted, not up yet, full.

/// Boots a slow counter projector `name` over 3,000 Things on a private
/// server and, once 300 are in, stops the server with `stop`. Whatever the
/// stop, boot exits 3, the projector is still booting with no failure
/// recorded, and its counter matches its committed position (whole batches);
/// the next boot then applies every event exactly once. Returns the position
/// boot had committed when the server went.
async fn boot_through_a_server_stop(name: &str, stop: impl FnOnce(&Cluster)) -> i64 {
    let cluster = Cluster::start();
    let db = cluster.test_db().await;
    let c = counters(&db, &[name], 0.002, 3_000, "", "").await;
    let boot = Proc::start(&db, "boot", &db.url, &["boot", "--batch-size", "50"]);
    wait_for("boot to be under way", PATIENCE, &[], async || {
        position(&c, name).await >= 300
    })
    .await;
    let stopping = Instant::now();
    stop(&cluster);
    let (run, exited) = boot.finish(Duration::from_secs(60)).await;
    eprintln!(
        "boot exited {} {:?} after the server began to stop\n{}",
        run.code,
        exited - stopping,
        run.stderr
    );
    run.expect(3);
    assert!(!run.stderr.contains("broke at"), "{}", run.stderr);

    cluster.start_again();
    let c = db.client().await;
    assert_eq!(ledger(&c, name).await.unwrap().0, "booting", "not broken");
    assert_eq!(failures(&c).await, 0, "nothing recorded as a failure");
    let p = assert_whole_batches(&c, name).await;
    set_pace(&c, 0.0).await;
    db.run(&["--session-timeout", SESSION_TIMEOUT, "boot"])
        .expect(0);
    assert_exactly_once(&c, name, 3_000, 3_000).await;
    p
}

#[tokio::test]
async fn a_server_shut_down_during_boot_exits_3_and_the_next_boot_resumes_exactly_once() {
    let p = boot_through_a_server_stop("fs_boot", Cluster::stop_fast).await;
    assert!((300..3_000).contains(&p), "stopped at {p}");
}

#[tokio::test]
async fn a_server_crash_during_boot_loses_only_whole_batches_and_the_next_boot_resumes_exactly_once()
 {
    // Boot's batches commit without waiting for the disk: a crash may lose
    // the last of them, but each with its position, never half of one.
    let p = boot_through_a_server_stop("crash_boot", Cluster::stop_immediate).await;
    assert!(p < 3_000, "stopped at {p}");
}

#[tokio::test]
async fn play_rides_out_a_server_restart_and_every_event_lands_exactly_once() {
    let cluster = Cluster::start();
    let db = cluster.test_db().await;
    let c = counters(&db, &["fs_play"], 0.0, 0, "", "").await;
    db.run(&["boot"]).expect(0);
    let mut play = Player::start(
        &db,
        "restart",
        &[
            "--session-timeout",
            SESSION_TIMEOUT,
            "--poll",
            "200ms",
            "--batch-size",
            "50",
        ],
    );
    wait_for("play to own fs_play", PATIENCE, &[&play], async || {
        owned_by(&c, &play).await == ["fs_play"]
    })
    .await;
    set_pace(&c, 0.002).await;
    add_things(&c, 2_000).await;
    wait_for("play to be busy", PATIENCE, &[&play], async || {
        position(&c, "fs_play").await >= 200
    })
    .await;

    cluster.restart();
    let restarted = Instant::now();
    let c = db.client().await;
    set_pace(&c, 0.0).await;
    let h = add_things(&c, 100).await;
    wait_for(
        "play to project the events appended after the restart",
        PATIENCE,
        &[&play],
        async || position(&c, "fs_play").await == h,
    )
    .await;
    let took = restarted.elapsed();
    eprintln!("play caught up {took:?} after the restart");
    play.assert_running();
    assert!(
        took < Duration::from_secs(20),
        "play took {took:?} to come back after a restart\n{}",
        play.log()
    );
    assert!(
        play.log().contains("lost the database") || play.log().contains("paused"),
        "play says it lost the database: {}",
        play.log()
    );
    assert_exactly_once(&c, "fs_play", h, h).await;
    play.stop();
}

#[tokio::test]
async fn play_started_while_the_server_is_down_waits_for_it_then_plays() {
    let cluster = Cluster::start();
    let db = cluster.test_db().await;
    let c = counters(&db, &["fs_down"], 0.0, 10, "", "").await;
    db.run(&["boot"]).expect(0);
    drop(c);
    cluster.stop_fast();

    let mut play = Player::start(
        &db,
        "down",
        &["--session-timeout", SESSION_TIMEOUT, "--poll", "200ms"],
    );
    wait_for(
        "play to say it cannot reach the database yet",
        PATIENCE,
        &[&play],
        async || play.log().contains("cannot reach the database yet"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    play.assert_running();

    cluster.start_again();
    let started = Instant::now();
    let c = db.client().await;
    let h = add_things(&c, 5).await;
    wait_for("play to begin playing", PATIENCE, &[&play], async || {
        position(&c, "fs_down").await == h
    })
    .await;
    let took = started.elapsed();
    eprintln!("play played {took:?} after the server came up");
    // Its backoff (1 s, 2 s, 4 s …) bounds the wait.
    assert!(
        took < Duration::from_secs(20),
        "took {took:?}\n{}",
        play.log()
    );
    play.assert_running();
    assert_exactly_once(&c, "fs_down", h, h).await;
    play.stop();
}

#[tokio::test]
async fn play_started_while_the_server_is_full_waits_for_a_free_connection() {
    let cluster = Cluster::start();
    let db = cluster.test_db().await;
    let c = counters(&db, &["fs_full"], 0.0, 10, "", "").await;
    db.run(&["boot"]).expect(0);
    // Take every connection the server has (max_connections = 50).
    let mut taken = Vec::new();
    loop {
        match tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                taken.push(client);
            }
            Err(e) => {
                assert!(
                    format!("{e:?}").contains("too many clients"),
                    "connecting failed for another reason: {e:?}"
                );
                break;
            }
        }
        assert!(taken.len() < 100, "the server never filled up");
    }

    let mut play = Player::start(
        &db,
        "full",
        &["--session-timeout", SESSION_TIMEOUT, "--poll", "200ms"],
    );
    wait_for(
        "play to say it cannot reach the database yet",
        PATIENCE,
        &[&play],
        async || play.log().contains("cannot reach the database yet"),
    )
    .await;
    assert!(play.log().contains("too many clients"), "{}", play.log());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    play.assert_running();

    taken.truncate(taken.len() - 5);
    let freed = Instant::now();
    let h = add_things(&c, 5).await;
    wait_for("play to begin playing", PATIENCE, &[&play], async || {
        position(&c, "fs_full").await == h
    })
    .await;
    let took = freed.elapsed();
    eprintln!("play played {took:?} after connections were freed");
    assert!(
        took < Duration::from_secs(20),
        "took {took:?}\n{}",
        play.log()
    );
    play.assert_running();
    assert_exactly_once(&c, "fs_full", h, h).await;
    play.stop();
    drop(taken);
}

// ---------------------------------------------------------------------------
// 5. Signals.

#[tokio::test]
async fn sighup_mid_batch_is_ignored_by_play_and_the_batch_commits() {
    let db = TestDb::new().await;
    let c = counters(&db, &["fh_hup"], 0.2, 0, "", "").await;
    db.run(&["boot"]).expect(0);
    let mut play = Player::start(
        &db,
        "hup",
        &[
            "--session-timeout",
            SESSION_TIMEOUT,
            "--poll",
            "200ms",
            "--batch-size",
            "10",
        ],
    );
    wait_for("play to own fh_hup", PATIENCE, &[&play], async || {
        owned_by(&c, &play).await == ["fh_hup"]
    })
    .await;
    let h = add_things(&c, 10).await; // One batch of 2 s.
    wait_for(
        "the batch to be in flight",
        PATIENCE,
        &[&play],
        async || sleeping_worker(&c).await.is_some(),
    )
    .await;
    assert_eq!(position(&c, "fh_hup").await, 0);
    signal(play.pid(), "HUP");
    wait_for("play to log the SIGHUP", PATIENCE, &[&play], async || {
        play.log().contains("SIGHUP ignored")
    })
    .await;
    play.assert_running();
    wait_for(
        "the batch in flight to commit",
        PATIENCE,
        &[&play],
        async || position(&c, "fh_hup").await == h,
    )
    .await;
    play.assert_running();
    set_pace(&c, 0.0).await;
    let h = add_things(&c, 5).await;
    wait_for(
        "later events to be projected",
        PATIENCE,
        &[&play],
        async || position(&c, "fh_hup").await == h,
    )
    .await;
    assert_exactly_once(&c, "fh_hup", h, h).await;
    play.stop();
}

/// Where a boot is killed.
#[derive(Clone, Copy, Debug)]
enum At {
    /// This long after it was started.
    After(Duration),
    /// As soon as its ledger row exists (it just started).
    Row,
    /// As soon as its position is past this.
    Past(i64),
    /// As soon as it is live (before it has exited, most times).
    Live,
}

#[tokio::test]
async fn boot_killed_at_any_step_then_booted_again_applies_every_event_exactly_once() {
    const EVENTS: i64 = 10_000;
    let rounds: [(&str, At); 7] = [
        ("KILL", At::After(Duration::ZERO)),
        ("KILL", At::After(Duration::from_millis(30))),
        ("TERM", At::After(Duration::from_millis(80))),
        ("KILL", At::Row),
        ("KILL", At::Past(EVENTS / 3)),
        ("TERM", At::Past(EVENTS * 2 / 3)),
        ("KILL", At::Live),
    ];
    let names: Vec<String> = (0..=rounds.len()).map(|i| format!("fk_{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let db = TestDb::new().await;
    let c = counters(&db, &refs, 0.0, EVENTS, "", "").await;
    let args = |name: &str| {
        vec![
            "--session-timeout".to_string(),
            SESSION_TIMEOUT.to_string(),
            "boot".to_string(),
            name.to_string(),
            "--batch-size".to_string(),
            "500".to_string(),
        ]
    };
    let started = Instant::now();
    let full = Instant::now();
    let a = args("fk_0");
    db.run(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .expect(0);
    eprintln!("a whole boot: {:?}", full.elapsed());
    assert_exactly_once(&c, "fk_0", EVENTS, EVENTS).await;

    for (i, (sig, at)) in rounds.iter().enumerate() {
        let name = &names[i + 1];
        let a = args(name);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut boot = Proc::start(&db, &format!("boot-{name}"), &db.url, &a[2..]);
        match *at {
            At::After(d) => tokio::time::sleep(d).await,
            At::Row => {
                while ledger(&c, name).await.is_none() && !boot.exited() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            At::Past(p) => {
                while position(&c, name).await <= p && !boot.exited() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            At::Live => {
                while ledger(&c, name).await.is_none_or(|l| l.0 != "live") && !boot.exited() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
        if !boot.exited() {
            boot.signal(sig);
        }
        let (run, _) = boot.finish(Duration::from_secs(30)).await;
        let found = ledger(&c, name).await;
        eprintln!(
            "round {}: SIG{sig} at {at:?}: exit {}, ledger {found:?}",
            i + 1,
            run.code
        );
        if found.is_some() {
            assert_whole_batches(&c, name).await;
        }
        db.run(&a).expect(0);
        assert_exactly_once(&c, name, EVENTS, EVENTS).await;
    }
    eprintln!("all rounds: {:?}", started.elapsed());
}
