//! The command line itself: manifest errors that point at the line
//! and change nothing, `migrate` (reporting, idempotence, concurrency),
//! `validate` against the database, connection errors that never show a
//! password, `init`, completions, the man page and `--help`.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::harness::*;

// ---------------------------------------------------------------------------
// Helpers

/// The example's `[store]`, as the first lines (1-6) of test manifests.
const STORE: &str = "[store]\ntable = \"events\"\nposition = \"id\"\ntype = \"name\"\ndata = \"data\"\nstream = \"aggregate_id\"\n";

/// Everything a command could have written: the ledger's rows, the events,
/// the read models, and every relation, function and schema outside the catalogs.
async fn fingerprint(db: &TestDb) -> String {
    let c = db.client().await;
    let objects: Option<String> = c
        .query_one(
            "SELECT string_agg(x, ',' ORDER BY x) FROM ( \
               SELECT 'rel:' || n.nspname || '.' || c.relname FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
                  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
               UNION ALL \
               SELECT 'fn:' || n.nspname || '.' || p.proname FROM pg_proc p \
                 JOIN pg_namespace n ON n.oid = p.pronamespace \
                WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
                  AND n.nspname NOT LIKE 'pg\\_temp%' \
               UNION ALL \
               SELECT 'ns:' || nspname FROM pg_namespace \
                WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' \
             ) t(x)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut out = objects.unwrap_or_default();
    let mut tables: Vec<String> = vec![
        "projectionist.projectors".into(),
        "projectionist.failures".into(),
        "projectionist.holes".into(),
        "projectionist.schema_history".into(),
        "events".into(),
        "hall_city".into(),
    ];
    tables.extend(EXAMPLE_TABLES.iter().map(|t| t.to_string()));
    for t in tables {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await
            .unwrap()
            .get(0);
        out.push_str(&format!("\n{t}={n}"));
    }
    out
}

/// The rendered problems of a manifest error, one string per `×` header.
fn problems(stderr: &str) -> Vec<String> {
    let mut blocks: Vec<String> = Vec::new();
    for line in stderr.lines() {
        if line.trim_start().starts_with('×') {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    blocks
}

/// A problem's text with miette's wrapping undone (for matching messages).
fn flat(block: &str) -> String {
    let mut words = Vec::new();
    for line in block.lines() {
        let l = line.trim_start();
        let l = l
            .strip_prefix('×')
            .or_else(|| l.strip_prefix('│'))
            .unwrap_or(l);
        words.extend(l.split_whitespace().map(str::to_string));
    }
    words.join(" ")
}

/// Asserts that exactly one rendered problem contains `message`, that its
/// header gives `projectors.toml:LINE:COL`, and that the source line `text` is
/// shown with `len` characters underlined from COL (`len` 0: a `▲` marker).
#[track_caller]
fn assert_problem(stderr: &str, message: &str, line: usize, col: usize, text: &str, len: usize) {
    let blocks = problems(stderr);
    let matching: Vec<&String> = blocks
        .iter()
        .filter(|b| flat(b).contains(message))
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "expected one problem saying {message:?}, found {}:\n{stderr}",
        matching.len()
    );
    let block = matching[0];
    let header = flat(block.split("╭─").next().unwrap());
    assert!(
        header.contains(&format!("projectors.toml:{line}:{col})")),
        "the message of {message:?} should end with (…projectors.toml:{line}:{col}):\n{block}"
    );
    let lines: Vec<&str> = block.lines().collect();
    let shown = format!("{line} │ {}", text.trim_end());
    let i = lines
        .iter()
        .position(|l| l.trim() == shown.trim_end())
        .unwrap_or_else(|| panic!("source line {shown:?} not shown:\n{block}"));
    let src: Vec<char> = lines[i].chars().collect();
    let bar = src.iter().position(|c| *c == '│').unwrap();
    let at = bar + 2 + (col - 1);
    let under: Vec<char> = lines
        .get(i + 1)
        .unwrap_or_else(|| panic!("nothing under {shown:?}:\n{block}"))
        .chars()
        .collect();
    assert!(
        under.iter().take(at).all(|c| *c == ' ' || *c == '·'),
        "the underline of {message:?} should start at column {col}:\n{block}"
    );
    if len == 0 {
        assert_eq!(under.get(at), Some(&'▲'), "no ▲ at column {col}:\n{block}");
    } else {
        for k in at..at + len {
            assert!(
                matches!(under.get(k), Some('─' | '┬' | '┼')),
                "column {} of line {line} is not underlined for {message:?}:\n{block}",
                k - bar - 1
            );
        }
        assert!(
            !matches!(under.get(at + len), Some('─' | '┬')),
            "the underline of {message:?} is longer than {len}:\n{block}"
        );
    }
}

/// `boot` and `validate` with the manifest `text` both exit 2, print the same
/// problems, and change nothing in the database. Returns boot's stderr.
async fn rejected(text: &str, problem_count: usize) -> String {
    let db = TestDb::new().await;
    db.gen_events(100);
    let before = fingerprint(&db).await;
    db.write_manifest(text);
    let boot = db.run(&["boot"]);
    boot.expect(2);
    let validate = db.run(&["validate"]);
    validate.expect(2);
    assert_eq!(
        boot.stderr, validate.stderr,
        "boot and validate report a manifest differently"
    );
    assert!(boot.stdout.is_empty(), "stdout: {}", boot.stdout);
    let n = problems(&boot.stderr).len();
    assert_eq!(n, problem_count, "problems reported:\n{}", boot.stderr);
    assert!(
        boot.stderr.contains(&format!(
            "found {n} problem{} in {}; nothing was changed",
            if n == 1 { "" } else { "s" },
            db.manifest_path().display()
        )),
        "no summary line:\n{}",
        boot.stderr
    );
    assert_eq!(
        db.count("SELECT count(*) FROM projectionist.projectors")
            .await,
        0
    );
    assert_eq!(fingerprint(&db).await, before, "the database changed");
    boot.stderr
}

/// `projectionist ARGS` in `dir`, without DATABASE_URL unless given.
fn bare(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir)
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("GITHUB_ACTIONS")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    c
}

fn run(mut c: Command) -> Run {
    Run::from(c.output().unwrap())
}

fn example_manifest() -> String {
    root().join("projectors.toml").display().to_string()
}

// ---------------------------------------------------------------------------
// 1. Manifest errors: exit 2, file:line:column, the text underlined, nothing changed.

#[tokio::test]
async fn three_mistakes_are_all_reported_with_their_lines() {
    let stderr = rejected(
        &format!(
            "{STORE}\n[projectors.band]\nmode = \"sometimes\"\ntabels = [\"band\"]\non.BandCreated = \"INSERT INTO band (name) VALUES (:dta.name)\"\n"
        ),
        3,
    )
    .await;
    assert_problem(
        &stderr,
        "unknown mode `sometimes` for projector `band`",
        9,
        8,
        "mode = \"sometimes\"",
        "\"sometimes\"".len(),
    );
    assert_problem(
        &stderr,
        "unknown key `tabels` in [projectors.band]",
        10,
        1,
        "tabels = [\"band\"]",
        "tabels".len(),
    );
    assert_problem(
        &stderr,
        "unknown placeholder `:dta.name` in the handler of projector `band` for event BandCreated",
        11,
        51,
        "on.BandCreated = \"INSERT INTO band (name) VALUES (:dta.name)\"",
        ":dta.name".len(),
    );
    assert!(
        stderr.contains("mode is one of: from_beginning, from_now, once"),
        "{stderr}"
    );
}

#[tokio::test]
async fn toml_syntax_error() {
    let stderr = rejected(
        &format!("{STORE}[projectors.band\non.BandCreated = \"SELECT 1\"\n"),
        1,
    )
    .await;
    assert_problem(&stderr, "invalid TOML", 7, 17, "[projectors.band", 0);
    assert!(stderr.contains("expected `]`"), "{stderr}");
}

#[tokio::test]
async fn wrong_type() {
    let stderr = rejected(
        &format!(
            "{STORE}[projectors.mailer]\nside_effects = \"yes\"\non.BandCreated = \"SELECT 1\"\n"
        ),
        1,
    )
    .await;
    assert_problem(
        &stderr,
        "projectors.mailer.side_effects must be true or false",
        8,
        16,
        "side_effects = \"yes\"",
        5,
    );
    assert!(stderr.contains("this is a string"), "{stderr}");
}

#[tokio::test]
async fn projector_with_neither_on_nor_command() {
    let stderr = rejected(
        &format!("{STORE}[projectors.idle]\nmode = \"once\"\ntables = [\"band\"]\n"),
        1,
    )
    .await;
    assert_problem(
        &stderr,
        "projector `idle` has neither `on` handlers nor a `command`",
        7,
        13,
        "[projectors.idle]",
        4,
    );
}

#[tokio::test]
async fn unknown_placeholder_names_projector_event_type_and_placeholder() {
    // Inside a multi-line string: the line is the placeholder's own line.
    let stderr = rejected(
        &format!(
            "{STORE}[projectors.band]\ntables = [\"band\"]\non.BandCreated = \"\"\"\nINSERT INTO band (id, name, created)\nVALUES (:stream::uuid, :data.name, :tiem)\n\"\"\"\n"
        ),
        1,
    )
    .await;
    assert_problem(
        &stderr,
        "unknown placeholder `:tiem` in the handler of projector `band` for event BandCreated",
        11,
        36,
        "VALUES (:stream::uuid, :data.name, :tiem)",
        5,
    );
}

#[tokio::test]
async fn a_handler_for_the_same_event_twice() {
    let stderr = rejected(
        &format!(
            "{STORE}[projectors.band]\ntables = [\"band\"]\non.BandCreated = \"SELECT 1\"\non.BandCreated = \"SELECT 2\"\n"
        ),
        1,
    )
    .await;
    assert_problem(
        &stderr,
        "invalid TOML",
        10,
        4,
        "on.BandCreated = \"SELECT 2\"",
        "BandCreated".len(),
    );
    assert!(stderr.contains("duplicate key"), "{stderr}");
}

#[tokio::test]
async fn an_empty_manifest() {
    let stderr = rejected("", 2).await;
    let blocks = problems(&stderr);
    assert!(
        flat(&blocks[0]).contains("the manifest has no [store] section")
            && blocks[0].contains("projectors.toml:1:1)"),
        "{stderr}"
    );
    assert!(
        flat(&blocks[1]).contains("the manifest defines no projectors")
            && blocks[1].contains("projectors.toml:1:1)"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_cycle_in_after_names_both_projectors() {
    let stderr = rejected(
        &format!(
            "{STORE}[projectors.alpha]\nafter = [\"beta\"]\non.BandCreated = \"SELECT 1\"\n[projectors.beta]\nafter = [\"alpha\"]\non.BandCreated = \"SELECT 1\"\n"
        ),
        1,
    )
    .await;
    assert_problem(
        &stderr,
        "`after` has a cycle: alpha → beta → alpha",
        7,
        13,
        "[projectors.alpha]",
        "alpha".len(),
    );
    assert!(
        flat(&stderr).contains("projectors `alpha` and `beta` wait for each other"),
        "{stderr}"
    );
}

#[tokio::test]
async fn after_naming_an_unknown_projector() {
    let stderr = rejected(
        &format!(
            "{STORE}[projectors.prefs]\nafter = [\"bands\"]\non.BandIgnored = \"SELECT 1\"\n[projectors.band]\non.BandCreated = \"SELECT 1\"\n"
        ),
        1,
    )
    .await;
    let blocks = problems(&stderr);
    let text = flat(&blocks[0]);
    assert!(
        text.contains("projector `prefs` comes after `bands`, which is not in the manifest"),
        "{stderr}"
    );
    assert!(
        blocks[0].contains("projectors.toml:8:10"),
        "the bad entry itself: {stderr}"
    );
    assert!(text.contains("known projectors: band, prefs"), "{stderr}");
}

#[tokio::test]
async fn a_missing_manifest_exits_2_and_points_at_init() {
    let db = TestDb::new().await;
    std::fs::remove_file(db.manifest_path()).unwrap();
    for cmd in ["validate", "boot", "status"] {
        let r = db.run(&[cmd]);
        r.expect(2);
        assert!(
            r.stderr.contains("cannot read the manifest")
                && r.stderr.contains("projectionist init"),
            "{cmd}: {}",
            r.stderr
        );
    }
    assert_eq!(
        db.count("SELECT count(*) FROM projectionist.projectors")
            .await,
        0
    );
}

// ---------------------------------------------------------------------------
// 2. migrate

/// The project's migrations as `V{n}__name`, in order.
fn project_migrations() -> Vec<String> {
    migrations_in(&root().join("migrations"))
}

/// The migrations of a directory as `V{n}__name`, in order.
fn migrations_in(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    v.sort_by_key(|s| s[1..].split_once("__").unwrap().0.parse::<u64>().unwrap());
    v
}

/// The ledger's own migrations, in order.
fn ledger_migrations() -> Vec<String> {
    migrations_in(&root().join("src/ledger/migrations"))
}

fn migrate(db: &TestDb) -> Command {
    let dir = root().join("migrations");
    let mut c = db.command(&["migrate", "--dir", dir.to_str().unwrap()]);
    c.current_dir(root());
    c
}

#[tokio::test]
async fn migrate_reports_each_migration_then_nothing() {
    let db = TestDb::empty().await;
    let r = Run::from(migrate(&db).output().unwrap());
    r.expect(0);
    let mut expected: Vec<String> = ledger_migrations()
        .iter()
        .map(|m| format!("applied ledger migration {m}"))
        .collect();
    expected.extend(
        project_migrations()
            .iter()
            .map(|m| format!("applied project migration {m}")),
    );
    assert!(expected.len() >= 3, "{expected:?}");
    assert!(expected.contains(&"applied project migration V1__events".to_string()));
    assert!(expected.contains(&"applied project migration V2__dancefinder".to_string()));
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines, expected,
        "stdout:\n{}\nstderr:\n{}",
        r.stdout, r.stderr
    );

    let again = Run::from(migrate(&db).output().unwrap());
    again.expect(0);
    assert!(
        again.stdout.contains("nothing to apply") && !again.stdout.contains("applied"),
        "{}",
        again.stdout
    );
    assert_eq!(
        db.count("SELECT count(*) FROM projectionist.schema_history")
            .await,
        ledger_migrations().len() as i64
    );
    assert_eq!(
        db.count("SELECT count(*) FROM refinery_schema_history")
            .await,
        project_migrations().len() as i64
    );
}

#[tokio::test]
async fn two_migrates_at_once_apply_each_migration_once() {
    let db = TestDb::empty().await;
    let mut a = migrate(&db);
    let mut b = migrate(&db);
    a.stdout(Stdio::piped()).stderr(Stdio::piped());
    b.stdout(Stdio::piped()).stderr(Stdio::piped());
    let a = a.spawn().unwrap();
    let b = b.spawn().unwrap();
    let a = Run::from(a.wait_with_output().unwrap());
    let b = Run::from(b.wait_with_output().unwrap());
    a.expect(0);
    b.expect(0);
    let both = format!("{}{}", a.stdout, b.stdout);
    let mut names: Vec<String> = ledger_migrations()
        .iter()
        .map(|m| format!("ledger migration {m}"))
        .collect();
    names.extend(
        project_migrations()
            .iter()
            .map(|m| format!("project migration {m}")),
    );
    for m in &names {
        assert_eq!(
            both.matches(&format!("applied {m}\n")).count(),
            1,
            "{m} should be reported once:\n--- a\n{}\n--- b\n{}",
            a.stdout,
            b.stdout
        );
    }
    assert_eq!(
        db.count("SELECT count(*) FROM projectionist.schema_history")
            .await,
        ledger_migrations().len() as i64
    );
    assert_eq!(
        db.count("SELECT count(*) FROM refinery_schema_history")
            .await,
        project_migrations().len() as i64
    );
    assert_eq!(
        db.count("SELECT count(DISTINCT version) FROM refinery_schema_history")
            .await,
        project_migrations().len() as i64
    );
}

// ---------------------------------------------------------------------------
// 3. validate

#[tokio::test]
async fn validate_passes_on_the_example() {
    let db = TestDb::new().await;
    db.gen_events(1000);
    let before = fingerprint(&db).await;
    let r = db.run(&["validate"]);
    r.expect(0);
    assert!(
        r.stdout.contains("every handler check out"),
        "stdout: {}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&db.name),
        "names the database: {}",
        r.stdout
    );
    assert_eq!(fingerprint(&db).await, before, "validate wrote something");
}

#[tokio::test]
async fn validate_reports_every_schema_problem_and_writes_nothing() {
    let db = TestDb::new().await;
    db.gen_events(200);
    let before = fingerprint(&db).await;
    // data = "aggregate_id" is a uuid column; metadata names no column.
    db.write_manifest(
        "[store]\ntable = \"events\"\nposition = \"id\"\ntype = \"name\"\ndata = \"aggregate_id\"\nmetadata = \"meta\"\nstream = \"aggregate_id\"\n\
         \n[projectors.ghost]\ntables = [\"no_such_table\"]\non.BandCreated = \"SELECT 1\"\n\
         \n[projectors.band]\ntables = [\"band\"]\non.BandCreated = \"UPDATE band SET nickname = :data.name WHERE id = :stream::uuid\"\non.BandRenamed = \"SELECT 1\"\n",
    );
    for cmd in ["validate", "boot"] {
        let r = db.run(&[cmd]);
        r.expect(2);
        let blocks = problems(&r.stderr);
        let text: Vec<String> = blocks.iter().map(|b| flat(b)).collect();
        let find = |needle: &str| {
            text.iter()
                .find(|t| t.contains(needle))
                .unwrap_or_else(|| panic!("{cmd}: no problem saying {needle:?}:\n{}", r.stderr))
        };
        // Each store problem underlines its own key's value.
        let data = find("store.data is uuid; expected jsonb, json, text, character varying, bytea");
        assert!(data.contains("projectors.toml:5:8)"), "{data}");
        let metadata = find("store.metadata: column `meta` does not exist in events");
        assert!(metadata.contains("projectors.toml:6:12)"), "{metadata}");
        let table = find("projector `ghost` owns table `no_such_table`, which does not exist");
        assert!(table.contains("projectors.toml:9:13)"), "{table}");
        let handler = find("the handler of projector `band` for BandCreated does not prepare");
        assert!(
            handler.contains("column \"nickname\" of relation \"band\" does not exist"),
            "{handler}"
        );
        assert!(handler.contains("projectors.toml:15:18)"), "{handler}");
        assert_eq!(blocks.len(), 4, "{cmd}:\n{}", r.stderr);
        assert!(
            r.stderr.contains("found 4 problems") && r.stderr.contains("nothing was changed"),
            "{}",
            r.stderr
        );
    }
    assert_eq!(
        db.count("SELECT count(*) FROM projectionist.projectors")
            .await,
        0
    );
    assert_eq!(
        fingerprint(&db).await,
        before,
        "validate or boot wrote something"
    );
}

#[tokio::test]
async fn validate_reports_a_missing_events_table() {
    let db = TestDb::new().await;
    let before = fingerprint(&db).await;
    db.write_manifest(
        "[store]\ntable = \"app.events\"\nposition = \"id\"\ntype = \"name\"\ndata = \"data\"\n\
         \n[projectors.band]\ntables = [\"band\"]\non.BandCreated = \"SELECT 1\"\n",
    );
    let r = db.run(&["validate"]);
    r.expect(2);
    assert!(
        flat(&r.stderr).contains("the events table `app.events` does not exist"),
        "{}",
        r.stderr
    );
    assert_eq!(fingerprint(&db).await, before);
}

// ---------------------------------------------------------------------------
// 4. Connection

const SECRET: &str = "s3cretpw";

#[track_caller]
fn assert_no_secret(what: &str, r: &Run) {
    assert!(
        !r.stdout.contains(SECRET) && !r.stderr.contains(SECRET),
        "{what}: the password appears in the output\n--- stdout\n{}\n--- stderr\n{}",
        r.stdout,
        r.stderr
    );
}

#[test]
fn an_unreachable_database_exits_3_and_never_shows_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = example_manifest();
    let migrations = root().join("migrations");
    for url in [
        "postgres://u:s3cretpw@127.0.0.1:1/db",
        "host=127.0.0.1 port=1 user=u password=s3cretpw dbname=db",
    ] {
        for args in [
            vec!["validate"],
            vec!["boot"],
            vec!["status"],
            vec!["verify"],
            vec!["migrate", "--dir", migrations.to_str().unwrap()],
        ] {
            for verbose in [None, Some("-vv")] {
                let mut c = bare(
                    dir.path(),
                    &["--manifest", &manifest, "--database-url", url],
                );
                c.args(verbose).args(&args);
                let r = run(c);
                let what = format!("{args:?} {verbose:?} with {url}");
                r.expect(3);
                assert!(
                    r.stderr
                        .contains("cannot connect to the database at 127.0.0.1:1/db"),
                    "{what}: {}",
                    r.stderr
                );
                assert_no_secret(&what, &r);
            }
        }
        // The same through DATABASE_URL.
        let mut c = bare(dir.path(), &["--manifest", &manifest, "validate"]);
        c.env("DATABASE_URL", url);
        let r = run(c);
        r.expect(3);
        assert!(r.stderr.contains("127.0.0.1:1"), "{}", r.stderr);
        assert_no_secret(url, &r);
    }
}

#[tokio::test]
async fn a_refused_login_exits_3_with_the_servers_message_and_no_password() {
    let admin = url::Url::parse(&std::env::var("DATABASE_URL").unwrap()).unwrap();
    let host = admin.host_str().unwrap().to_string();
    let port = admin.port().unwrap_or(5432);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://no_such_role_pj:{SECRET}@{host}:{port}/postgres?sslmode=disable");
    let r = run(bare(
        dir.path(),
        &[
            "--manifest",
            &example_manifest(),
            "--database-url",
            &url,
            "validate",
        ],
    ));
    r.expect(3);
    assert!(
        r.stderr.contains(&format!("{host}:{port}")) && r.stderr.contains("no_such_role_pj"),
        "{}",
        r.stderr
    );
    assert_no_secret("refused login", &r);
}

#[test]
fn a_malformed_database_url_exits_2_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        "postgres://u:s3cretpw@127.0.0.1:notaport/db",
        "host=127.0.0.1 password=s3cretpw bogus_option=1",
        "host=127.0.0.1 password='s3cretpw",
        "postgres://u:s3cretpw@127.0.0.1:1/db?sslmode=sometimes",
    ] {
        let r = run(bare(
            dir.path(),
            &[
                "--manifest",
                &example_manifest(),
                "--database-url",
                url,
                "validate",
            ],
        ));
        r.expect(2);
        assert!(r.stderr.starts_with("error: "), "{url}: {}", r.stderr);
        assert_no_secret(url, &r);
    }
}

#[test]
fn no_database_url_exits_2_and_says_to_pass_one() {
    let dir = tempfile::tempdir().unwrap();
    let migrations = root().join("migrations");
    for args in [
        vec!["validate"],
        vec!["boot"],
        vec!["status"],
        vec!["migrate", "--dir", migrations.to_str().unwrap()],
    ] {
        let mut c = bare(dir.path(), &["--manifest", &example_manifest()]);
        c.args(&args);
        let r = run(c);
        r.expect(2);
        assert!(
            r.stderr.contains("--database-url") && r.stderr.contains("DATABASE_URL"),
            "{args:?}: {}",
            r.stderr
        );
    }
}

#[test]
fn help_never_shows_the_database_url() {
    let dir = tempfile::tempdir().unwrap();
    let mut helps: Vec<Vec<&str>> = vec![vec!["--help"], vec!["-h"], vec!["help"]];
    for cmd in [
        "init",
        "validate",
        "migrate",
        "boot",
        "play",
        "status",
        "reset",
        "retire",
        "verify",
        "notify",
        "completions",
        "man",
    ] {
        helps.push(vec![cmd, "--help"]);
    }
    helps.push(vec!["help", "boot"]);
    helps.push(vec!["notify", "install", "--help"]);
    for args in helps {
        let mut c = bare(dir.path(), &args);
        c.env("DATABASE_URL", format!("postgres://u:{SECRET}@h/db"));
        let r = run(c);
        r.expect(0);
        assert!(!r.stdout.is_empty(), "{args:?}: empty help");
        assert_no_secret(&format!("{args:?}"), &r);
    }
    // Usage errors print help too.
    for args in [vec![], vec!["boot", "--bogus"], vec!["status", "--max-lag"]] {
        let mut c = bare(dir.path(), &args);
        c.env("DATABASE_URL", format!("postgres://u:{SECRET}@h/db"));
        let r = run(c);
        r.expect(2);
        assert_no_secret(&format!("{args:?}"), &r);
    }
    // The option is documented, just without its value.
    let mut c = bare(dir.path(), &["boot", "--help"]);
    c.env("DATABASE_URL", format!("postgres://u:{SECRET}@h/db"));
    let r = run(c);
    assert!(r.stdout.contains("--database-url"), "{}", r.stdout);
    assert!(r.stdout.contains("DATABASE_URL"), "{}", r.stdout);
}

#[test]
fn verify_full_without_its_root_certificate_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(bare(
        dir.path(),
        &[
            "--manifest",
            &example_manifest(),
            "--database-url",
            "postgres://u:s3cretpw@127.0.0.1:1/db?sslmode=verify-full&sslrootcert=/nonexistent.crt",
            "validate",
        ],
    ));
    r.expect(2);
    assert!(
        r.stderr.contains("sslrootcert") && r.stderr.contains("/nonexistent.crt"),
        "{}",
        r.stderr
    );
    assert_no_secret("verify-full", &r);

    // key=value form, and no sslrootcert at all (nor ~/.postgresql/root.crt).
    for conn in [
        "host=127.0.0.1 port=1 user=u password=s3cretpw sslmode=verify-ca sslrootcert=/nonexistent.crt",
        "host=127.0.0.1 port=1 user=u password=s3cretpw sslmode=verify-full",
    ] {
        let mut c = bare(
            dir.path(),
            &[
                "--manifest",
                &example_manifest(),
                "--database-url",
                conn,
                "validate",
            ],
        );
        c.env("HOME", dir.path());
        let r = run(c);
        r.expect(2);
        assert!(r.stderr.contains("sslrootcert"), "{conn}: {}", r.stderr);
        assert_no_secret(conn, &r);
    }
}

// ---------------------------------------------------------------------------
// 5. init

#[test]
fn init_writes_the_starter_files_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(bare(dir.path(), &["init"]));
    r.expect(0);
    let manifest = dir.path().join("projectors.toml");
    let migration = dir.path().join("migrations/V1__read_models.sql");
    assert!(manifest.is_file() && migration.is_file(), "{}", r.stdout);
    assert!(
        r.stdout.contains("projectors.toml") && r.stdout.contains("V1__read_models.sql"),
        "{}",
        r.stdout
    );
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(
        text.contains("[store]") && text.contains("[projectors."),
        "{text}"
    );
    assert!(
        text.lines()
            .filter(|l| l.trim_start().starts_with('#'))
            .count()
            >= 3,
        "commented"
    );

    // The user edits it; a second init changes nothing.
    let edited = format!("{text}\n# my edit\n");
    std::fs::write(&manifest, &edited).unwrap();
    let sql = std::fs::read_to_string(&migration).unwrap();
    let again = run(bare(dir.path(), &["init"]));
    again.expect(2);
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
    assert_eq!(std::fs::read_to_string(&manifest).unwrap(), edited);
    assert_eq!(std::fs::read_to_string(&migration).unwrap(), sql);
    assert_eq!(
        std::fs::read_dir(dir.path().join("migrations"))
            .unwrap()
            .count(),
        1
    );
}

#[tokio::test]
async fn the_starter_manifest_parses_and_its_migration_applies() {
    let db = TestDb::empty().await;
    let r = run(bare(db.dir.path(), &["init"]));
    r.expect(0);
    // The manifest parses: validate gets to the database and finds the tables missing.
    let v = db.run(&["validate"]);
    v.expect(2);
    let text = flat(&v.stderr);
    assert!(
        !text.contains("invalid TOML") && !text.contains("unknown"),
        "{}",
        v.stderr
    );
    assert!(
        text.contains("the events table `events` does not exist"),
        "{}",
        v.stderr
    );
    assert!(
        text.contains("projector `band` owns table `band`, which does not exist"),
        "{}",
        v.stderr
    );
    // Its migration creates the read model: only the events table is then
    // missing (for the store and for the check's `events` query).
    db.run(&["migrate"]).expect(0);
    let v = db.run(&["validate"]);
    v.expect(2);
    let blocks: Vec<String> = problems(&v.stderr).iter().map(|b| flat(b)).collect();
    assert_eq!(blocks.len(), 2, "{}", v.stderr);
    assert!(
        blocks[0].contains("the events table `events` does not exist"),
        "{}",
        v.stderr
    );
    assert!(
        blocks[1].contains("the `events` query of check \"one band per BandCreated name\"")
            && blocks[1].contains("relation \"events\" does not exist"),
        "{}",
        v.stderr
    );
    // With the example's event store it validates.
    let c = db.client().await;
    c.batch_execute(&std::fs::read_to_string(root().join("migrations/V1__events.sql")).unwrap())
        .await
        .unwrap();
    db.run(&["validate"]).expect(0);
}

// ---------------------------------------------------------------------------
// 6. Completions, man page, help

#[test]
fn completions_and_man_page() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let r = run(bare(dir.path(), &["completions", shell]));
        r.expect(0);
        assert!(
            r.stdout.contains("projectionist") && r.stdout.contains("validate"),
            "{shell}: {}",
            r.stdout
        );
    }
    let r = run(bare(dir.path(), &["man"]));
    r.expect(0);
    assert!(
        r.stdout.contains(".TH") && r.stdout.contains("projectionist"),
        "{}",
        r.stdout
    );
    let r = run(bare(dir.path(), &["completions", "tcsh"]));
    r.expect(2);
}

#[test]
fn every_subcommand_has_an_example_in_its_help() {
    let dir = tempfile::tempdir().unwrap();
    let top = run(bare(dir.path(), &["--help"]));
    top.expect(0);
    let mut commands: Vec<Vec<String>> = Vec::new();
    let listed = |help: &str| -> Vec<String> {
        help.lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            // Wrapped descriptions continue with deeper indentation.
            .filter(|l| !l[2..].starts_with(' '))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .filter(|c| c != "help")
            .collect()
    };
    for c in listed(&top.stdout) {
        let help = run(bare(dir.path(), &[&c, "--help"]));
        help.expect(0);
        for sub in listed(&help.stdout) {
            commands.push(vec![c.clone(), sub]);
        }
        commands.push(vec![c]);
    }
    assert!(commands.len() >= 12, "{commands:?}");
    for c in &commands {
        let mut args: Vec<&str> = c.iter().map(String::as_str).collect();
        args.push("--help");
        let r = run(bare(dir.path(), &args));
        r.expect(0);
        assert!(
            r.stdout.contains("Example"),
            "{c:?} --help has no example:\n{}",
            r.stdout
        );
    }
    assert!(top.stdout.contains("Exit codes"), "{}", top.stdout);
}
