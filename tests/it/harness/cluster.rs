//! A private PostgreSQL server for one test ([`Cluster`]): for tests that must
//! stop, kill or restart the server, which they must never do to the shared
//! server of `DATABASE_URL`. initdb in a temporary directory, 127.0.0.1 on a
//! free port, no durability; removed when dropped.
//!
//! The server binaries are found as scripts/lib/pg.sh finds them:
//! `PROJECTIONIST_TEST_PG_BINDIR` (which scripts/test exports), else
//! `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin, else the
//! directory of `initdb` on PATH. PostgreSQL refuses to run as root: as root,
//! the server runs as `nobody`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{TestDb, free_port};

/// A PostgreSQL server of the test's own; stopped (`-m immediate`) and its
/// directory removed when dropped.
pub struct Cluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    port: u16,
    /// `nobody`'s group when we are root (the server then runs as `nobody`).
    nobody_gid: Option<String>,
}

impl Cluster {
    /// initdb and start a new cluster (a couple of seconds). Blocks the
    /// calling thread meanwhile.
    pub fn start() -> Cluster {
        let bindir = pg_bindir();
        let nobody_gid = is_root().then(|| {
            let gid = stdout_of(Command::new("id").args(["-g", "nobody"]))
                .expect("running as root and there is no user `nobody` to run PostgreSQL as");
            gid.trim().to_string()
        });
        let mut dir = tempfile::Builder::new();
        dir.prefix("projectionist-cluster.");
        let dir = if let Some(gid) = &nobody_gid {
            // Under /tmp, which `nobody` can reach (TMPDIR may not be).
            let dir = dir.tempdir_in("/tmp").unwrap();
            let ok = Command::new("chown")
                .arg(format!("nobody:{gid}"))
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown nobody {}", dir.path().display());
            dir
        } else {
            dir.tempdir().unwrap()
        };
        let mut cluster = Cluster {
            dir,
            bindir,
            port: 0,
            nobody_gid,
        };
        let data = cluster.data();
        let out = cluster
            .pg("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.append_conf(&format!(
            "\n# a private cluster of a projectionist test: speed over durability\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 16MB\n\
             max_connections = 50\n",
            cluster.dir.path().display()
        ));
        // free_port can race with another process: on a bind failure, another port.
        for _ in 0..10 {
            cluster.port = free_port();
            cluster.append_conf(&format!("port = {}\n", cluster.port));
            match cluster.pg_ctl_start() {
                Ok(()) => return cluster,
                Err(log) if log.contains("could not bind") || log.contains("already in use") => {
                    let _ = std::fs::write(cluster.log_path(), "");
                }
                Err(log) => panic!("the private cluster did not start:\n{log}"),
            }
        }
        panic!("the private cluster found no free port in 10 tries");
    }

    /// postgres://postgres@127.0.0.1:PORT/postgres (a superuser, trusted).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A fresh database on this server, like the shared harness's
    /// [`TestDb::new`]: the ledger and the example's tables (the template is
    /// built on this server first).
    pub async fn test_db(&self) -> TestDb {
        TestDb::new_on(&self.url()).await
    }

    /// `pg_ctl stop -m fast`: sessions are terminated, a clean shutdown.
    pub fn stop_fast(&self) {
        self.stop("fast");
    }

    /// `pg_ctl stop -m immediate`: as if the server crashed.
    pub fn stop_immediate(&self) {
        self.stop("immediate");
    }

    /// Starts the stopped server again: the same port and data.
    pub fn start_again(&self) {
        if let Err(log) = self.pg_ctl_start() {
            panic!("the private cluster did not start again:\n{log}");
        }
    }

    /// `stop_fast`, then `start_again`.
    pub fn restart(&self) {
        self.stop_fast();
        self.start_again();
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn append_conf(&self, text: &str) {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(self.data().join("postgresql.conf"))
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }

    /// A server program, run as the cluster's owner, in the cluster's directory.
    fn pg(&self, program: &str) -> Command {
        let program = self.bindir.join(program);
        let mut c = match &self.nobody_gid {
            None => Command::new(program),
            Some(gid) if on_path("setpriv").is_some() => {
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid=nobody",
                    &format!("--regid={gid}"),
                    "--clear-groups",
                    "--",
                ])
                .arg(program);
                c
            }
            Some(_) => {
                let mut c = Command::new("runuser");
                c.args(["-u", "nobody", "--"]).arg(program);
                c
            }
        };
        c.current_dir(self.dir.path()).stdin(Stdio::null());
        c
    }

    /// `pg_ctl start -w`; the server log when it fails.
    fn pg_ctl_start(&self) -> Result<(), String> {
        let out = self
            .pg("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "60", "start"])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            ))
        }
    }

    fn stop(&self, mode: &str) {
        let out = self
            .pg("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "stop"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl -m {mode} stop failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self
                .pg("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // The TempDir removes the directory.
    }
}

fn stdout_of(c: &mut Command) -> Option<String> {
    let out = c.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    stdout_of(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn has_server(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|p| dir.join(p).is_file())
}

/// The directory of initdb, pg_ctl and postgres (see the module's doc).
fn pg_bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PROJECTIONIST_TEST_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        assert!(
            has_server(&dir),
            "PROJECTIONIST_TEST_PG_BINDIR={} has no initdb, pg_ctl and postgres",
            dir.display()
        );
        return dir;
    }
    if let Some(dir) = stdout_of(Command::new("pg_config").arg("--bindir")) {
        let dir = PathBuf::from(dir.trim());
        if has_server(&dir) {
            return dir;
        }
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e
                .file_name()
                .to_str()?
                .split('.')
                .map(|n| n.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return dir;
    }
    if let Some(dir) = on_path("initdb")
        .and_then(|p| p.canonicalize().ok())
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|d| has_server(d))
    {
        return dir;
    }
    panic!(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) for a private cluster: \
         install the server or set PROJECTIONIST_TEST_PG_BINDIR"
    );
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    // Through the harness's re-exports, as the tests that use it see it.
    use crate::harness::{Cluster, connect};

    async fn answers(url: &str) -> bool {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                c.query_one("SELECT 1", &[]).await.is_ok()
            }
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn a_private_cluster_starts_answers_stops_and_starts_again() {
        let started = Instant::now();
        let cluster = Cluster::start();
        eprintln!("private cluster up in {:?}", started.elapsed());
        assert!(answers(&cluster.url()).await);

        let db = cluster.test_db().await;
        assert_eq!(
            db.count("SELECT count(*) FROM projectionist.projectors")
                .await,
            0
        );
        db.client()
            .await
            .batch_execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)")
            .await
            .unwrap();

        cluster.stop_fast();
        assert!(!answers(&cluster.url()).await, "answers after stop -m fast");
        cluster.start_again();
        assert!(answers(&cluster.url()).await);
        assert_eq!(db.count("SELECT count(*) FROM kept").await, 1);

        let c = connect(&db.url).await;
        cluster.restart();
        assert!(
            c.query_one("SELECT 1", &[]).await.is_err(),
            "a session survived the restart"
        );
        assert!(answers(&db.url).await);

        cluster.stop_immediate();
        assert!(
            !answers(&cluster.url()).await,
            "answers after stop -m immediate"
        );
        cluster.start_again();
        assert_eq!(db.count("SELECT count(*) FROM kept").await, 1);
    }
}
