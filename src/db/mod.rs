//! Connecting to PostgreSQL: `postgres://` URLs and key=value strings, TLS
//! (see `tls.rs`), bounded failure on dead networks, typed row access that
//! never panics, and database errors rendered whole.
//!
//! Bounded failure: every connection gets a connect timeout, TCP keepalives
//! and a TCP user timeout on the client side (the URL's `connect_timeout`,
//! `keepalives*` and `tcp_user_timeout` when given, safe defaults otherwise),
//! and projectionist's own server sessions set the server-side equivalents
//! plus idle timeouts, so that the server drops a dead or frozen client's
//! session, its locks and its transaction within the [`Liveness`] budget.
//! Sessions that may sit idle while holding a lock send a heartbeat well
//! within it. The password is never part of any message.

mod tls;

use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Result;
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::error::DbError;
use tokio_postgres::types::FromSql;
use tokio_postgres::{Client, Config, GenericClient, Row};

use crate::error::Failure;

/// libpq's `sslmode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = Failure;
    fn from_str(s: &str) -> Result<Self, Failure> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Failure::Usage(format!(
                    "unknown sslmode `{other}`: use disable, prefer, require, verify-ca or verify-full"
                )));
            }
        })
    }
}

/// How long a silent session of projectionist's may live: the server drops
/// it after this long, and everything else (keepalives, heartbeats, client
/// timeouts on short queries) is derived from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    pub session: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            session: Duration::from_secs(60),
        }
    }
}

impl Liveness {
    /// How often an idle session that holds a lock proves it is alive.
    pub fn heartbeat(&self) -> Duration {
        (self.session / 4).max(Duration::from_millis(250))
    }

    /// How long a heartbeat or a short query may take before the database
    /// counts as lost (whole milliseconds, so it reads well in messages).
    pub fn answer_within(&self) -> Duration {
        Duration::from_millis((self.session / 3).max(Duration::from_secs(1)).as_millis() as u64)
    }

    fn keepalive_idle(&self) -> Duration {
        (self.session / 6).max(Duration::from_secs(1))
    }

    fn keepalive_interval(&self) -> Duration {
        (self.session / 12).max(Duration::from_secs(1))
    }

    fn user_timeout(&self) -> Duration {
        (self.session / 2).max(Duration::from_secs(1))
    }
}

/// What a session is for, which decides the server-side limits it sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Session {
    /// Holds locks or a transaction others wait for (boot, play's runners,
    /// reset, migrate): the server drops it once it is silent, idle or idle
    /// in a transaction, for the session timeout. It must heartbeat when it
    /// waits longer than that.
    Holder,
    /// Reads and reports (status, validate, verify, retire, play's control):
    /// dropped when idle in a transaction, never merely for being idle.
    Reader,
    /// Waits for notifications: only keepalives.
    Listener,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection's driver: it must be polled (spawned) for the client to work.
type Connection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
        tokio_postgres::Socket,
    >>::Stream,
>;
const KEEPALIVE_RETRIES: u32 = 3;

/// A parsed database address: what to connect to and how, without a password
/// anywhere in its printable form.
#[derive(Clone)]
pub struct Database {
    config: Config,
    ssl: SslMode,
    root_cert: Option<PathBuf>,
    /// Connection options the user gave (their values win over our defaults).
    given: HashSet<String>,
    liveness: Liveness,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.target())
    }
}

impl Database {
    /// Parses a `postgres://` URL or a key=value connection string.
    pub fn parse(conn: &str) -> Result<Database> {
        let options = split_options(conn)?;
        let mut config = Config::from_str(&options.rest).map_err(|e| {
            Failure::Usage(format!(
                "the database URL is not valid: {e}\n  expected postgres://user:password@host:port/dbname or key=value pairs"
            ))
        })?;
        let ssl = match options.sslmode {
            Some(m) => m.parse()?,
            None => SslMode::Prefer,
        };
        config.ssl_mode(match ssl {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        if config.get_hosts().is_empty() {
            config.host("localhost");
        }
        if config.get_user().is_none() {
            let user = std::env::var("PGUSER")
                .or_else(|_| std::env::var("USER"))
                .unwrap_or_else(|_| "postgres".into());
            config.user(&user);
        }
        Ok(Database {
            config,
            ssl,
            root_cert: options.root_cert.map(PathBuf::from),
            given: options.keys,
            liveness: Liveness::default(),
        })
    }

    /// The same database with another liveness budget (`--session-timeout`).
    pub fn with_liveness(mut self, liveness: Liveness) -> Database {
        self.liveness = liveness;
        self
    }

    pub fn liveness(&self) -> Liveness {
        self.liveness
    }

    /// `host:port/dbname` for messages: never the user's password.
    pub fn target(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let db = self
            .config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or("postgres");
        format!("{host}:{port}/{db}")
    }

    /// The same server, another database (tests and the demo create databases).
    pub fn with_dbname(&self, dbname: &str) -> Database {
        let mut other = self.clone();
        other.config.dbname(dbname);
        other
    }

    pub fn dbname(&self) -> Option<&str> {
        self.config.get_dbname()
    }

    /// The client-side configuration: the user's options, and bounded
    /// defaults for the ones not given.
    fn client_config(&self, application_name: &str) -> Config {
        let mut config = self.config.clone();
        config.application_name(application_name);
        let l = self.liveness;
        if !self.given.contains("connect_timeout") {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if !self.given.contains("keepalives") {
            config.keepalives(true);
        }
        if !self.given.contains("keepalives_idle") {
            config.keepalives_idle(l.keepalive_idle());
        }
        if !self.given.contains("keepalives_interval") {
            config.keepalives_interval(l.keepalive_interval());
        }
        if !self.given.contains("keepalives_retries") {
            config.keepalives_retries(KEEPALIVE_RETRIES);
        }
        if !self.given.contains("tcp_user_timeout") {
            config.tcp_user_timeout(l.user_timeout());
        }
        config
    }

    /// How long connecting may take in all (TCP, TLS and the startup handshake).
    fn connect_deadline(&self, config: &Config) -> Duration {
        config
            .get_connect_timeout()
            .copied()
            .unwrap_or(CONNECT_TIMEOUT)
            + Duration::from_secs(5)
    }

    fn unreachable(&self, why: String) -> Failure {
        Failure::Unreachable(format!(
            "cannot connect to the database at {}: {why}\n  check --database-url / DATABASE_URL, and that the server is running and accepts connections",
            self.target()
        ))
    }

    /// Connects (TCP, TLS, the startup handshake) within the connect deadline.
    async fn open(&self, application_name: &str) -> Result<(Client, Connection)> {
        let config = self.client_config(application_name);
        let tls = tls::connector(self.ssl, self.root_cert.as_deref())?;
        let deadline = self.connect_deadline(&config);
        let opened = tokio::time::timeout(deadline, config.connect(tls))
            .await
            .map_err(|_| {
                self.unreachable(format!(
                    "no answer within {}",
                    humantime::format_duration(deadline)
                ))
            })?
            .map_err(|e| self.unreachable(describe_connect_error(&e)))?;
        Ok(opened)
    }

    /// Opens a connection whose driver task runs in the background, with the
    /// server-side limits of `session`. Failure to connect is a
    /// [`Failure::Unreachable`] naming host and port.
    pub async fn connect(&self, application_name: &str, session: Session) -> Result<Client> {
        let (client, connection) = self.open(application_name).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection closed: {e}");
            }
        });
        self.limit_session(&client, session).await?;
        Ok(client)
    }

    /// A connection whose notifications (LISTEN/NOTIFY) arrive on the returned channel.
    pub async fn connect_listening(
        &self,
        application_name: &str,
    ) -> Result<(
        Client,
        tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
    )> {
        let (client, mut connection) = self.open(application_name).await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
                match m {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if tx.send(n).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!("listening connection closed: {e}");
                        break;
                    }
                }
            }
        });
        self.limit_session(&client, Session::Listener).await?;
        Ok((client, rx))
    }

    /// Sets the server-side equivalents of the client's limits, so the server
    /// drops this session (its locks, its transaction) when we go silent.
    async fn limit_session(&self, client: &Client, session: Session) -> Result<()> {
        let sql = session_settings(self.liveness, session);
        self.within(client.simple_query(&sql))
            .await?
            .map_err(|e| self.unreachable(format!("setting the session's timeouts: {e}")))?;
        Ok(())
    }

    /// Runs a short database call, counting the database as lost when it
    /// does not answer within the liveness budget.
    pub async fn within<T>(&self, call: impl std::future::Future<Output = T>) -> Result<T> {
        let limit = self.liveness.answer_within();
        tokio::time::timeout(limit, call).await.map_err(|_| {
            Failure::Unreachable(format!(
                "lost the database at {}: no answer within {}",
                self.target(),
                humantime::format_duration(limit)
            ))
            .into()
        })
    }

    /// Runs `work` (which must not use `client` itself), proving the session
    /// alive with a heartbeat whenever it takes long: a session that holds a
    /// lock or a transaction while waiting on something else (a command
    /// projector's process) is never taken for dead by the server.
    pub async fn keep_alive<T>(
        &self,
        client: &impl GenericClient,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Ok(out),
                _ = tokio::time::sleep(self.liveness.heartbeat()) => self.heartbeat(client).await?,
            }
        }
    }

    /// A heartbeat: a trivial query that must answer within the budget.
    pub async fn heartbeat(&self, client: &impl GenericClient) -> Result<()> {
        self.within(client.simple_query("SELECT 1"))
            .await?
            .map_err(|e| {
                anyhow::Error::new(e).context(format!("lost the database at {}", self.target()))
            })?;
        Ok(())
    }
}

/// The `SET`s of a session, as one statement: values are ours (numbers),
/// and settings the server does not know (older versions) are skipped.
fn session_settings(l: Liveness, session: Session) -> String {
    let secs = |d: Duration| d.as_secs().max(1);
    let ms = |d: Duration| d.as_millis().max(1);
    let mut sets = vec![
        format!(
            "set_config('tcp_keepalives_idle', '{}', false)",
            secs(l.keepalive_idle())
        ),
        format!(
            "set_config('tcp_keepalives_interval', '{}', false)",
            secs(l.keepalive_interval())
        ),
        format!("set_config('tcp_keepalives_count', '{KEEPALIVE_RETRIES}', false)"),
        format!(
            "CASE WHEN current_setting('server_version_num')::int >= 120000 \
             THEN set_config('tcp_user_timeout', '{}', false) END",
            ms(l.user_timeout())
        ),
    ];
    if session != Session::Listener {
        sets.push(format!(
            "set_config('idle_in_transaction_session_timeout', '{}', false)",
            ms(l.session)
        ));
    }
    if session == Session::Holder {
        sets.push(format!(
            "CASE WHEN current_setting('server_version_num')::int >= 140000 \
             THEN set_config('idle_session_timeout', '{}', false) END",
            ms(l.session)
        ));
    }
    format!("SELECT {}", sets.join(", "))
}

fn describe_connect_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => describe_db_error(db),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(cause) = src {
                s.push_str(": ");
                s.push_str(&cause.to_string());
                src = cause.source();
            }
            s
        }
    }
}

/// Reading a column without panicking: a column the database returns in a
/// type projectionist cannot read (a ledger or store table altered by hand)
/// is a clear error, never a crash.
pub trait RowExt {
    fn col<'a, T: FromSql<'a>>(&'a self, idx: usize) -> Result<T>;
}

impl RowExt for Row {
    fn col<'a, T: FromSql<'a>>(&'a self, idx: usize) -> Result<T> {
        self.try_get(idx).map_err(|e| {
            let (name, ty) = match self.columns().get(idx) {
                Some(c) => (c.name().to_string(), c.type_().to_string()),
                None => (format!("#{idx}"), "nothing".into()),
            };
            Failure::Usage(format!(
                "the database returned `{name}` as {ty}, which projectionist cannot read as {}: {e}\n  \
                 was a table of projectionist's ledger (or the store) altered by hand? \
                 Compare it with the ledger's migrations and restore the column's type",
                std::any::type_name::<T>()
            ))
            .into()
        })
    }
}

/// Connection options taken apart: TLS options out, the rest kept as written.
struct Options {
    rest: String,
    sslmode: Option<String>,
    root_cert: Option<String>,
    /// Every option key present (e.g. `connect_timeout`).
    keys: HashSet<String>,
}

/// Takes `sslmode` and `sslrootcert` out of a URL or key=value string, and
/// notes which options were given.
fn split_options(conn: &str) -> Result<Options> {
    let mut keys = HashSet::new();
    let conn = conn.trim();
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        let mut url = url::Url::parse(conn)
            .map_err(|e| Failure::Usage(format!("the database URL is not valid: {e}")))?;
        let mut sslmode = None;
        let mut root = None;
        // Filter the raw `k=v` pairs, so the others keep their encoding as written
        // (re-encoding would turn `%20` into `+`, which the driver does not decode).
        let raw = url.query().unwrap_or("").to_string();
        let mut kept = Vec::new();
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = url::form_urlencoded::parse(pair.as_bytes())
                .next()
                .unwrap_or_default();
            keys.insert(k.to_string());
            match k.as_ref() {
                "sslmode" => sslmode = Some(v.into_owned()),
                "sslrootcert" => root = Some(v.into_owned()),
                _ => kept.push(pair),
            }
        }
        url.set_query((!kept.is_empty()).then(|| kept.join("&")).as_deref());
        return Ok(Options {
            rest: url.to_string(),
            sslmode,
            root_cert: root,
            keys,
        });
    }
    // key=value pairs; values may be single-quoted with backslash escapes.
    let mut kept = Vec::new();
    let mut sslmode = None;
    let mut root = None;
    let mut chars = conn.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_string();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut raw = String::new();
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            raw.push(chars.next().unwrap());
            while let Some(c) = chars.next() {
                raw.push(c);
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            raw.push(n);
                            value.push(n);
                        }
                    }
                    '\'' => break,
                    _ => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c.is_whitespace() {
                    break;
                }
                raw.push(c);
                value.push(c);
                chars.next();
            }
        }
        keys.insert(key.clone());
        match key.as_str() {
            "sslmode" => sslmode = Some(value),
            "sslrootcert" => root = Some(value),
            _ => kept.push(format!("{key}={raw}")),
        }
    }
    Ok(Options {
        rest: kept.join(" "),
        sslmode,
        root_cert: root,
        keys,
    })
}

/// A manifest problem from a database error: underlined with the database's
/// message, its detail and hint as the help (`default_help` when it has none).
pub fn problem(
    span: crate::manifest::Span,
    message: String,
    e: &tokio_postgres::Error,
    default_help: Option<&str>,
) -> crate::manifest::Problem {
    let (label, help) = match e.as_db_error() {
        Some(db) => (
            db.message().to_string(),
            [
                db.detail().map(|d| format!("detail: {d}")),
                db.hint().map(|h| format!("hint: {h}")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("\n"),
        ),
        None => (e.to_string(), String::new()),
    };
    let p = crate::manifest::Problem::new(span, message, label);
    match (help.is_empty(), default_help) {
        (false, _) => p.help(help),
        (true, Some(h)) => p.help(h),
        (true, None) => p,
    }
}

/// A database error, whole: severity, message, detail, hint, position, context.
pub fn describe_db_error(db: &DbError) -> String {
    let mut s = format!("{}: {}", db.severity(), db.message());
    if let Some(d) = db.detail() {
        s.push_str(&format!("\n  detail: {d}"));
    }
    if let Some(h) = db.hint() {
        s.push_str(&format!("\n  hint: {h}"));
    }
    if let Some(p) = db.position() {
        match p {
            tokio_postgres::error::ErrorPosition::Original(n) => {
                s.push_str(&format!("\n  position: character {n}"))
            }
            tokio_postgres::error::ErrorPosition::Internal { position, query } => {
                s.push_str(&format!("\n  position: character {position} of `{query}`"))
            }
        }
    }
    if let Some(w) = db.where_() {
        s.push_str(&format!("\n  where: {}", w.replace('\n', "\n    ")));
    }
    s.push_str(&format!("\n  sqlstate: {}", db.code().code()));
    s
}

/// Quotes an SQL identifier (`"` doubled), whatever it contains.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a possibly schema-qualified name written `schema.table`.
pub fn quote_qualified(name: &str) -> String {
    name.split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

/// Quotes an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_other_options_and_lose_tls_ones() {
        let o = split_options(
            "postgres://u:secret@h:5/db?sslmode=verify-full&sslrootcert=/r.crt&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(o.rest, "postgres://u:secret@h:5/db?connect_timeout=3");
        assert_eq!(o.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(o.root_cert.as_deref(), Some("/r.crt"));
        assert!(o.keys.contains("connect_timeout"));
    }

    #[test]
    fn other_url_options_keep_their_encoding() {
        let o =
            split_options("postgres://u@h/db?options=-c%20statement_timeout%3D5&sslmode=require")
                .unwrap();
        assert_eq!(
            o.rest,
            "postgres://u@h/db?options=-c%20statement_timeout%3D5"
        );
        assert_eq!(o.sslmode.as_deref(), Some("require"));
    }

    #[test]
    fn key_value_strings_with_quotes() {
        let o = split_options(
            "host=h password='it\\'s x' sslmode=verify-ca sslrootcert='/a b/r.crt' keepalives_idle=5",
        )
        .unwrap();
        assert_eq!(o.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(o.root_cert.as_deref(), Some("/a b/r.crt"));
        assert!(o.rest.starts_with("host=h password="));
        assert!(o.keys.contains("keepalives_idle"));
    }

    #[test]
    fn target_never_shows_the_password() {
        let db = Database::parse("postgres://alice:hunter2@db.example:6543/app").unwrap();
        assert_eq!(db.target(), "db.example:6543/app");
        assert!(!format!("{db:?}").contains("hunter2"));
    }

    #[test]
    fn verify_full_without_root_cert_is_a_usage_error() {
        let db = Database::parse(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/root.crt",
        )
        .unwrap();
        let err = tls::connector(db.ssl, db.root_cert.as_deref())
            .err()
            .unwrap();
        assert_eq!(
            crate::error::exit_status(&err),
            crate::error::ExitStatus::Usage
        );
    }

    #[test]
    fn defaults_bound_the_connection_unless_the_url_says_otherwise() {
        let db = Database::parse("postgres://u@h/db").unwrap();
        let c = db.client_config("t");
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(10));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(30)));
        let db = Database::parse("postgres://u@h/db?connect_timeout=2&keepalives_idle=7").unwrap();
        let c = db.client_config("t");
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(7));
    }

    #[test]
    fn session_settings_differ_by_what_the_session_is_for() {
        let l = Liveness::default();
        let holder = session_settings(l, Session::Holder);
        assert!(
            holder.contains("idle_session_timeout', '60000'"),
            "{holder}"
        );
        assert!(holder.contains("idle_in_transaction_session_timeout"));
        let reader = session_settings(l, Session::Reader);
        assert!(!reader.contains("idle_session_timeout'"), "{reader}");
        let listener = session_settings(l, Session::Listener);
        assert!(!listener.contains("idle_in_transaction"), "{listener}");
        assert!(
            listener.contains("tcp_keepalives_idle', '10'"),
            "{listener}"
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(quote_qualified("app.events"), r#""app"."events""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
