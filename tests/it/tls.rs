//! TLS: `sslmode=verify-full` against a server with a self-signed
//! certificate fails without `sslrootcert` and succeeds with it. Needs the
//! throwaway cluster of scripts/test, which serves TLS with a test CA and
//! exports PROJECTIONIST_TEST_SSLROOTCERT; against another server it is skipped.

use crate::harness::*;

fn tls_url(host: &str, query: &str) -> Option<String> {
    let Ok(root) = std::env::var("PROJECTIONIST_TEST_SSLROOTCERT") else {
        eprintln!(
            "skipped: PROJECTIONIST_TEST_SSLROOTCERT is not set (run scripts/test without DATABASE_URL for a TLS cluster)"
        );
        return None;
    };
    let admin = url::Url::parse(&std::env::var("DATABASE_URL").unwrap()).unwrap();
    let port = admin.port().unwrap_or(5432);
    Some(format!(
        "postgres://postgres@{host}:{port}/postgres?{}",
        query.replace("{root}", &root)
    ))
}

fn connect_with(url: &str) -> Run {
    Run::from(
        std::process::Command::new(BIN)
            .args([
                "--manifest",
                "/nonexistent/projectors.toml",
                "migrate",
                "--dir",
                "/nonexistent",
            ])
            .env("DATABASE_URL", url)
            .output()
            .unwrap(),
    )
}

#[test]
fn verify_full_needs_the_root_certificate_and_checks_the_host_name() {
    let Some(ok) = tls_url("localhost", "sslmode=verify-full&sslrootcert={root}") else {
        return;
    };
    connect_with(&ok).expect(0);

    // No root certificate: refused before connecting.
    let no_root = tls_url("localhost", "sslmode=verify-full").unwrap();
    let run = connect_with(&no_root);
    run.expect(2);
    assert!(run.stderr.contains("sslrootcert"), "{}", run.stderr);

    // The certificate is for localhost, not 127.0.0.1: verify-full refuses, verify-ca accepts.
    let by_ip = tls_url("127.0.0.1", "sslmode=verify-full&sslrootcert={root}").unwrap();
    let run = connect_with(&by_ip);
    run.expect(3);
    assert!(run.stderr.contains("not valid for name"), "{}", run.stderr);
    connect_with(&tls_url("127.0.0.1", "sslmode=verify-ca&sslrootcert={root}").unwrap()).expect(0);

    // A root that did not sign the server's certificate.
    let other_root = tls_url(
        "localhost",
        "sslmode=verify-full&sslrootcert=/etc/ssl/certs/ca-certificates.crt",
    )
    .unwrap();
    if std::path::Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
        connect_with(&other_root).expect(3);
    }

    // require encrypts without verifying, as libpq does.
    connect_with(&tls_url("127.0.0.1", "sslmode=require").unwrap()).expect(0);
}
