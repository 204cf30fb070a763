//! Test harness: a fresh database per test, cloned from a template that holds
//! the ledger and the dancefinder example's schema, on the server of
//! `DATABASE_URL` (scripts/test starts a throwaway one). Tests run the real
//! binary, as users do.
#![allow(dead_code)]

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use tokio_postgres::{Client, NoTls};

pub const BIN: &str = env!("CARGO_BIN_EXE_projectionist");

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn admin_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL must point at a PostgreSQL server where tests may create databases: run scripts/test",
    )
}

/// `admin_url` with another database name.
pub fn url_for(dbname: &str) -> String {
    let mut url =
        url::Url::parse(&admin_url()).expect("DATABASE_URL must be a postgres:// URL in tests");
    url.set_path(&format!("/{dbname}"));
    url.to_string()
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The template's name changes whenever the schema it holds changes.
fn template_name() -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("migrations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.push(root().join("src/ledger/migrations/V1__ledger.sql"));
    files.sort();
    for f in files {
        std::fs::read_to_string(&f).unwrap().hash(&mut h);
    }
    format!("projectionist_tpl_{:x}", h.finish())
}

async fn ensure_template(admin: &Client) -> String {
    let name = template_name();
    // Tests run as separate processes (nextest): an advisory lock makes one of them build it.
    admin
        .execute("SELECT pg_advisory_lock(7327001)", &[])
        .await
        .unwrap();
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .is_some();
    if !exists {
        let building = format!("{name}_building");
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {building}"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {building}"))
            .await
            .unwrap();
        let out = Command::new(BIN)
            .current_dir(root())
            .args(["migrate", "--manifest", "/nonexistent/projectors.toml"])
            .env("DATABASE_URL", url_for(&building))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "migrate of the template failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        admin
            .batch_execute(&format!("ALTER DATABASE {building} RENAME TO {name}"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("ALTER DATABASE {name} WITH is_template = true"))
            .await
            .unwrap();
    }
    admin
        .execute("SELECT pg_advisory_unlock(7327001)", &[])
        .await
        .unwrap();
    name
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A database of its own for one test, dropped at the end.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl TestDb {
    /// A fresh database with the ledger and the example's tables, no events.
    pub async fn new() -> TestDb {
        let admin = connect(&admin_url()).await;
        let template = ensure_template(&admin).await;
        let name = format!(
            "pjtest_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        admin
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .await
            .unwrap();
        let db = TestDb {
            url: url_for(&name),
            name,
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::copy(root().join("projectors.toml"), db.manifest_path()).unwrap();
        // The example's command projectors run in the manifest's directory.
        std::os::unix::fs::symlink(root().join("examples"), db.dir.path().join("examples"))
            .unwrap();
        db
    }

    /// An empty database (no ledger, no tables).
    pub async fn empty() -> TestDb {
        let admin = connect(&admin_url()).await;
        let name = format!(
            "pjtest_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        TestDb {
            url: url_for(&name),
            name,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.dir.path().join("projectors.toml")
    }

    /// Replaces the manifest with `text`.
    pub fn write_manifest(&self, text: &str) {
        std::fs::write(self.manifest_path(), text).unwrap();
    }

    /// The example manifest with `extra` appended.
    pub fn example_manifest_with(&self, extra: &str) {
        let base = std::fs::read_to_string(root().join("projectors.toml")).unwrap();
        self.write_manifest(&format!("{base}\n{extra}\n"));
    }

    /// Appends `n` generated dancefinder events.
    pub fn gen_events(&self, n: u64) {
        let out = Command::new(root().join("scripts/gen-events"))
            .arg(n.to_string())
            .env("DATABASE_URL", &self.url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gen-events: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A `projectionist` command against this database and manifest.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(self.dir.path())
            .arg("--manifest")
            .arg(self.manifest_path())
            .args(args)
            .env("DATABASE_URL", &self.url)
            .env_remove("GITHUB_ACTIONS")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        c
    }

    /// Runs `projectionist ARGS` to the end.
    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().unwrap())
    }

    /// Fills schema `expected` with the set-based projection of the events.
    pub fn expected_projection(&self) {
        let out = Command::new("psql")
            .arg(&self.url)
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                "schema=expected",
                "-f",
            ])
            .arg(root().join("scripts/sql/expected.sql"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "expected.sql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Asserts the nine read-model tables equal the set-based projection.
    pub async fn assert_tables_match_expected(&self) {
        self.expected_projection();
        let c = self.client().await;
        for t in EXAMPLE_TABLES {
            let diff: i64 = c
                .query_one(
                    &format!(
                        "SELECT (SELECT count(*) FROM (SELECT * FROM public.{t} EXCEPT SELECT * FROM expected.{t}) a) \
                              + (SELECT count(*) FROM (SELECT * FROM expected.{t} EXCEPT SELECT * FROM public.{t}) b)"
                    ),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(diff, 0, "table {t} differs from the set-based projection");
        }
    }

    /// (state, position) of a projector's ledger row.
    pub async fn ledger(&self, name: &str) -> Option<(String, i64)> {
        self.client()
            .await
            .query_opt(
                "SELECT state, position FROM projectionist.projectors WHERE name = $1",
                &[&name],
            )
            .await
            .unwrap()
            .map(|r| (r.get(0), r.get(1)))
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0)
    }
}

pub const EXAMPLE_TABLES: [&str; 9] = [
    "band",
    "dance_hall",
    "event",
    "origin",
    "ignored_band",
    "ignored_dance_hall",
    "ignored_city",
    "ignored_municipality",
    "ignored_state",
];

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = admin_url();
        // Drop from a thread of its own: Drop cannot await, and may run inside a runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&admin, NoTls).await {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A finished command: exit code and output.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Asserts the exit code, showing the output when it differs.
    #[track_caller]
    pub fn expect(&self, code: i32) -> &Run {
        assert_eq!(
            self.code, code,
            "expected exit {code}, got {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

/// The `[store]` of the small "Thing" stores the tests build.
pub const THINGS_STORE: &str = "[store]\ntable = \"events\"\nposition = \"id\"\ntype = \"name\"\ndata = \"data\"\nstream = \"aggregate_id\"\ntime = \"tstamp\"\ntransaction = \"tx\"\n";

/// A store of `n` events of type `Thing` (positions 1..=n), the tables the
/// tests' projectors write to (`thing_log`, `after_log`, `mail_log`, `seen`,
/// `counter`), and a manifest with `projectors` over them.
pub async fn things(db: &TestDb, n: i64, projectors: &str) {
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE thing_log (id bigint PRIMARY KEY, v int); \
             CREATE TABLE after_log (id bigint PRIMARY KEY); \
             CREATE TABLE mail_log (id bigint PRIMARY KEY); \
             CREATE TABLE seen (id bigint PRIMARY KEY); \
             CREATE TABLE counter (n bigint NOT NULL); INSERT INTO counter VALUES (0)",
        )
        .await
        .unwrap();
    add_things(db, n).await;
    things_manifest(db, projectors);
}

/// A manifest of `projectors` over the Thing store.
pub fn things_manifest(db: &TestDb, projectors: &str) {
    db.write_manifest(&format!("{THINGS_STORE}\n{projectors}"));
}

/// Appends `n` Thing events.
pub async fn add_things(db: &TestDb, n: i64) {
    db.client()
        .await
        .execute(
            "INSERT INTO events (aggregate_id, aggregate_name, name, data) \
             SELECT gen_random_uuid(), 'thing', 'Thing', jsonb_build_object('i', i) FROM generate_series(1::bigint, $1) i",
            &[&n],
        )
        .await
        .unwrap();
}

/// The example's SQL projectors (the nine tables of `assert_tables_match_expected`).
pub const SQL_PROJECTORS: [&str; 4] = ["band", "dancehall", "event", "userpreferences"];

/// The example manifest with only the `keep` projectors (an `after` on a
/// dropped one removed), and `extra` appended.
pub fn example_only(db: &TestDb, keep: &[&str], extra: &str) {
    let text = std::fs::read_to_string(root().join("projectors.toml")).unwrap();
    let mut out = String::new();
    let mut current: Option<String> = None;
    let mut dropped = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line
            .strip_prefix("[[projectors.")
            .or_else(|| line.strip_prefix("[projectors."))
        {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !keep.contains(&name.as_str()) && !dropped.contains(&name) {
                dropped.push(name.clone());
            }
            current = Some(name);
        } else if line.starts_with('[') {
            current = None;
        }
        if current.as_deref().is_none_or(|c| keep.contains(&c)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    for name in &dropped {
        out = out.replace(&format!("after = [\"{name}\"]\n"), "");
    }
    for name in keep {
        assert!(
            out.contains(&format!("[projectors.{name}]")),
            "no [projectors.{name}] in the example manifest"
        );
    }
    db.write_manifest(&format!("{out}\n{extra}\n"));
}

/// The example's SQL projectors without `names`.
pub fn example_without(db: &TestDb, names: &[&str], extra: &str) {
    let keep: Vec<&str> = SQL_PROJECTORS
        .iter()
        .copied()
        .filter(|p| !names.contains(p))
        .collect();
    example_only(db, &keep, extra);
}

/// The example's four SQL projectors.
pub fn example(db: &TestDb) {
    example_only(db, &SQL_PROJECTORS, "");
}
