//! Connecting to PostgreSQL: `postgres://` URLs and key=value strings, TLS with
//! rustls and every libpq `sslmode`, and database errors rendered whole.
//!
//! tokio-postgres understands only `disable|prefer|require`; `verify-ca` and
//! `verify-full` (and `sslrootcert`) are taken out of the string here and
//! turned into a rustls verifier. The password is never part of any message.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::error::DbError;
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

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

/// A parsed database address: what to connect to and how, without a password
/// anywhere in its printable form.
#[derive(Clone)]
pub struct Database {
    config: Config,
    ssl: SslMode,
    root_cert: Option<PathBuf>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.target())
    }
}

impl Database {
    /// Parses a `postgres://` URL or a key=value connection string.
    pub fn parse(conn: &str) -> Result<Database> {
        let (rest, sslmode, root_cert) = split_tls_options(conn)?;
        let mut config = Config::from_str(&rest).map_err(|e| {
            Failure::Usage(format!(
                "the database URL is not valid: {e}\n  expected postgres://user:password@host:port/dbname or key=value pairs"
            ))
        })?;
        let ssl = match sslmode {
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
            root_cert: root_cert.map(PathBuf::from),
        })
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

    /// Opens a connection whose driver task runs in the background.
    /// Failure to connect is a [`Failure::Unreachable`] naming host and port.
    pub async fn connect(&self, application_name: &str) -> Result<Client> {
        let mut config = self.config.clone();
        config.application_name(application_name);
        let tls = self.tls_connector()?;
        let (client, connection) = config.connect(tls).await.map_err(|e| {
            let why = match e.as_db_error() {
                Some(db) => describe_db_error(db),
                None => {
                    let mut s = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(cause) = src {
                        s.push_str(": ");
                        s.push_str(&cause.to_string());
                        src = cause.source();
                    }
                    s
                }
            };
            Failure::Unreachable(format!(
                "cannot connect to the database at {}: {why}\n  check --database-url / DATABASE_URL, and that the server is running and accepts connections",
                self.target()
            ))
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection closed: {e}");
            }
        });
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
        let mut config = self.config.clone();
        config.application_name(application_name);
        let tls = self.tls_connector()?;
        let (client, mut connection) = config.connect(tls).await.map_err(|e| {
            Failure::Unreachable(format!(
                "cannot connect to the database at {}: {e}",
                self.target()
            ))
        })?;
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
        Ok((client, rx))
    }

    fn tls_connector(&self) -> Result<MakeRustlsConnect> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS setup")?;
        let roots = self.root_store()?;
        let config = match (self.ssl, roots) {
            (SslMode::VerifyFull, Some(roots)) => {
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            (SslMode::VerifyCa, Some(roots)) => {
                let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .context("TLS verifier")?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
                    .with_no_client_auth()
            }
            (SslMode::VerifyFull | SslMode::VerifyCa, None) => {
                return Err(Failure::Usage(format!(
                    "sslmode={} needs the server's root certificate: add sslrootcert=/path/to/root.crt to the database URL (or place it at ~/.postgresql/root.crt)",
                    if self.ssl == SslMode::VerifyFull { "verify-full" } else { "verify-ca" }
                ))
                .into());
            }
            // libpq: require/prefer encrypt without verifying, unless a root certificate is given.
            (_, Some(roots)) if self.root_cert.is_some() => {
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            _ => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
                .with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }

    fn root_store(&self) -> Result<Option<rustls::RootCertStore>> {
        let path = match &self.root_cert {
            Some(p) => p.clone(),
            None => match std::env::var_os("HOME") {
                Some(home) => PathBuf::from(home).join(".postgresql/root.crt"),
                None => return Ok(None),
            },
        };
        if !path.exists() {
            if self.root_cert.is_some() {
                return Err(Failure::Usage(format!(
                    "sslrootcert {} does not exist",
                    path.display()
                ))
                .into());
            }
            return Ok(None);
        }
        let mut store = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&path)
            .with_context(|| format!("reading sslrootcert {}", path.display()))?
        {
            let cert = cert.with_context(|| format!("parsing sslrootcert {}", path.display()))?;
            store
                .add(cert)
                .with_context(|| format!("adding a certificate of {}", path.display()))?;
        }
        Ok(Some(store))
    }
}

/// Takes `sslmode` and `sslrootcert` out of a URL or key=value string.
fn split_tls_options(conn: &str) -> Result<(String, Option<String>, Option<String>)> {
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
            match k.as_ref() {
                "sslmode" => sslmode = Some(v.into_owned()),
                "sslrootcert" => root = Some(v.into_owned()),
                _ => kept.push(pair),
            }
        }
        url.set_query((!kept.is_empty()).then(|| kept.join("&")).as_deref());
        return Ok((url.to_string(), sslmode, root));
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
        match key.as_str() {
            "sslmode" => sslmode = Some(value),
            "sslrootcert" => root = Some(value),
            _ => kept.push(format!("{key}={raw}")),
        }
    }
    Ok((kept.join(" "), sslmode, root))
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

/// `require`/`prefer` without a root certificate: encrypted, not verified (as libpq).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the root certificate; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
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
        let (rest, mode, root) = split_tls_options(
            "postgres://u:secret@h:5/db?sslmode=verify-full&sslrootcert=/r.crt&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:secret@h:5/db?connect_timeout=3");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/r.crt"));
    }

    #[test]
    fn other_url_options_keep_their_encoding() {
        let (rest, mode, _) = split_tls_options(
            "postgres://u@h/db?options=-c%20statement_timeout%3D5&sslmode=require",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@h/db?options=-c%20statement_timeout%3D5");
        assert_eq!(mode.as_deref(), Some("require"));
    }

    #[test]
    fn key_value_strings_with_quotes() {
        let (rest, mode, root) = split_tls_options(
            "host=h password='it\\'s x' sslmode=verify-ca sslrootcert='/a b/r.crt'",
        )
        .unwrap();
        assert_eq!(mode.as_deref(), Some("verify-ca"));
        assert_eq!(root.as_deref(), Some("/a b/r.crt"));
        assert!(rest.starts_with("host=h password="));
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
        let err = db.tls_connector().err().unwrap();
        assert_eq!(
            crate::error::exit_status(&err),
            crate::error::ExitStatus::Usage
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(quote_qualified("app.events"), r#""app"."events""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
