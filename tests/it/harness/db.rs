//! The databases tests run against: a fresh database per test ([`TestDb`]),
//! cloned from a template that holds the ledger and the dancefinder example's
//! schema, on the shared server of `DATABASE_URL` or on any server given by an
//! admin URL (a [`Cluster`](super::Cluster) of the test's own); and [`Run`],
//! a finished `projectionist` command.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use tokio_postgres::{Client, NoTls};

pub const BIN: &str = env!("CARGO_BIN_EXE_projectionist");

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shared server of the suite: never stopped or restarted by a test.
fn shared_admin_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL must point at a PostgreSQL server where tests may create databases: run scripts/test",
    )
}

/// `admin` (a server's URL) with another database name.
fn with_dbname(admin: &str, dbname: &str) -> String {
    let mut url = url::Url::parse(admin)
        .unwrap_or_else(|e| panic!("the admin URL must be a postgres:// URL in tests: {e}"));
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
    let mut files: Vec<PathBuf> = ["migrations", "src/ledger/migrations"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root().join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        std::fs::read_to_string(&f).unwrap().hash(&mut h);
    }
    format!("projectionist_tpl_{:x}", h.finish())
}

/// Makes sure the server of `admin_url` (connected as `admin`) holds the
/// template; returns its name.
async fn ensure_template(admin: &Client, admin_url: &str) -> String {
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
            .env("DATABASE_URL", with_dbname(admin_url, &building))
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
    /// The server's admin URL, to drop the database with.
    admin: String,
}

impl TestDb {
    /// A fresh database with the ledger and the example's tables, no events,
    /// on the shared server.
    pub async fn new() -> TestDb {
        TestDb::new_on(&shared_admin_url()).await
    }

    /// Like [`TestDb::new`], on the server of `admin_url` (the template is
    /// built there first if it is missing).
    pub async fn new_on(admin_url: &str) -> TestDb {
        let admin = connect(admin_url).await;
        let template = ensure_template(&admin, admin_url).await;
        let db = TestDb::create(&admin, admin_url, Some(&template)).await;
        std::fs::copy(root().join("projectors.toml"), db.manifest_path()).unwrap();
        // The example's command projectors run in the manifest's directory.
        std::os::unix::fs::symlink(root().join("examples"), db.dir.path().join("examples"))
            .unwrap();
        db
    }

    /// An empty database (no ledger, no tables) on the shared server.
    pub async fn empty() -> TestDb {
        let admin_url = shared_admin_url();
        let admin = connect(&admin_url).await;
        TestDb::create(&admin, &admin_url, None).await
    }

    async fn create(admin: &Client, admin_url: &str, template: Option<&str>) -> TestDb {
        let name = format!(
            "pjtest_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let from = template
            .map(|t| format!(" TEMPLATE {t}"))
            .unwrap_or_default();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}{from}"))
            .await
            .unwrap();
        TestDb {
            url: with_dbname(admin_url, &name),
            name,
            dir: tempfile::tempdir().unwrap(),
            admin: admin_url.to_string(),
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

    /// Runs the binary with a server setting passed in the URL
    /// (`options=-c name%3Dvalue`), so every session it opens has it.
    pub fn run_with_server_option(&self, args: &[&str], setting: &str) -> Run {
        let url = format!("{}?options=-c%20{setting}", self.url);
        Run::from(
            self.command(args)
                .env("DATABASE_URL", url)
                .output()
                .unwrap(),
        )
    }

    /// (state, position) of a projector's ledger row.
    pub async fn ledger(&self, name: &str) -> Option<(String, i64)> {
        super::ledger(&self.client().await, name).await
    }

    /// The single bigint `sql` returns.
    pub async fn count(&self, sql: &str) -> i64 {
        super::count(&self.client().await, sql).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = self.admin.clone();
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
